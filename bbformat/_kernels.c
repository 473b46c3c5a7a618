/* bbformat's compiled inner loops: the entropy stage's two (SPEC.md section 13), where numpy needs several passes
 * per word and these need one, and the section checksum. bbformat/kernels.py holds the same functions in numpy /
 * zlib: the reference the tests compare these against, and the fallback when this module was not built.
 *
 * unpack:   one symbol stream (a class of lines) + per-line bases + escapes  ->  those lines' top bytes
 * assemble: a piece's top bytes (line-major) + the low byte planes            ->  its words (rotated back)
 *
 * Every length is checked before any memory is touched; the GIL is released while the loops run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h> /* x86-64 baseline: 32 nibbles per step */
#endif

#define ESCAPE 15

/* dst[t] = src[t] + b: a separate function so that `restrict` lets the compiler vectorize it */
static void add_base(uint8_t *restrict dst, const uint8_t *restrict src, size_t n, uint8_t b) {
    for (size_t t = 0; t < n; t++) dst[t] = (uint8_t)(src[t] + b);
}

/* unpack(top, line_len, classes, bases, shift, nibbles, k, stream, escapes) -> escapes used
 *
 * Fills the lines of class k in `top` (writable, n_lines * line_len bytes, line-major).
 * classes:  n_lines bytes, the class of each line
 * bases:    n_lines bytes, each line's base exponent (added shifted left by `shift`)
 * stream:   the residuals of class k's lines, in line order: two per byte (low nibble first) when nibbles,
 *           else one per byte
 * escapes:  the top bytes of this stream's escaped words (nibble ESCAPE), in order
 */
static PyObject *unpack(PyObject *self, PyObject *args) {
    Py_buffer top, cls, bases, stream, esc;
    Py_ssize_t line_len;
    int shift, nibbles, k;
    if (!PyArg_ParseTuple(args, "w*ny*y*iiiy*y*", &top, &line_len, &cls, &bases, &shift, &nibbles, &k, &stream,
                          &esc))
        return NULL;
    const char *err = NULL;
    const Py_ssize_t n_lines = cls.len;
    const uint8_t *c8 = (const uint8_t *)cls.buf, *b8 = (const uint8_t *)bases.buf;
    const uint8_t *s = (const uint8_t *)stream.buf, *e8 = (const uint8_t *)esc.buf;
    uint8_t *t8 = (uint8_t *)top.buf;
    Py_ssize_t count = 0, e = 0;
    if (line_len < 0 || bases.len != n_lines || (line_len && top.len / line_len != n_lines) ||
        top.len != n_lines * line_len || shift < 0 || shift > 7 || k < 0 || k > 255) {
        err = "unpack: inconsistent sizes";
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_lines; i++) count += c8[i] == k;
    Py_ssize_t want = count * line_len;
    if (nibbles) want = (want + 1) / 2;
    if (stream.len != want) { err = "a symbol stream's length does not match its lines"; goto done; }

    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t q = 0; /* position in the stream, in symbols */
    for (Py_ssize_t i = 0; i < n_lines && !err; i++) {
        if (c8[i] != k) continue;
        uint8_t *dst = t8 + i * line_len;
        const uint8_t b = (uint8_t)(b8[i] << shift);
        if (!nibbles) {
            add_base(dst, s + q, (size_t)line_len, b);
            q += line_len;
            continue;
        }
        Py_ssize_t t = 0;
        while (t < line_len) {
#if defined(__SSE2__)
            if (!(q & 1)) { /* 16 packed bytes -> 32 top bytes, while the block has no escape */
                const __m128i m15 = _mm_set1_epi8(15), vb = _mm_set1_epi8((char)b);
                while (t + 32 <= line_len) {
                    const __m128i v = _mm_loadu_si128((const __m128i *)(s + (q >> 1)));
                    const __m128i lo = _mm_and_si128(v, m15), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m15);
                    if (_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(lo, m15), _mm_cmpeq_epi8(hi, m15)))) break;
                    _mm_storeu_si128((__m128i *)(dst + t), _mm_add_epi8(_mm_unpacklo_epi8(lo, hi), vb));
                    _mm_storeu_si128((__m128i *)(dst + t + 16), _mm_add_epi8(_mm_unpackhi_epi8(lo, hi), vb));
                    t += 32;
                    q += 32;
                }
            }
#endif
            /* one symbol at a time: a block with an escape, an odd start, or the line's tail */
            const Py_ssize_t stop = t + 32 < line_len ? t + 32 : line_len;
            for (; t < stop; t++, q++) {
                const uint8_t r = (q & 1) ? s[q >> 1] >> 4 : s[q >> 1] & 15;
                if (r == ESCAPE) {
                    if (e >= esc.len) { err = "the escape stream is too short"; break; }
                    dst[t] = e8[e++];
                } else {
                    dst[t] = (uint8_t)(b + r);
                }
            }
            if (err) break;
        }
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&top); PyBuffer_Release(&cls); PyBuffer_Release(&bases); PyBuffer_Release(&stream);
    PyBuffer_Release(&esc);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromSsize_t(e);
}

#define TILE 64  /* columns per transpose tile */
#define TR 256   /* rows per transpose tile: 4 cache lines per column copied out */

#if defined(__SSE2__)
#define HAVE_SSE2 1
/* A 16x16 byte transpose: four rounds of interleaving row i with row i + 8 (a perfect shuffle). */
static inline void transpose16(__m128i x[16]) {
    __m128i y[16];
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            y[2 * i] = _mm_unpacklo_epi8(x[i], x[i + 8]);
            y[2 * i + 1] = _mm_unpackhi_epi8(x[i], x[i + 8]);
        }
        memcpy(x, y, sizeof(y));
    }
}

/* One full TR x TILE tile of 2-byte words: tile[c * TR + r] holds the top bytes (column-major), lo + r * cols + c
 * the low bytes; words go to o + r * cols + c. */
static void tile2_sse(const uint8_t *tile, const uint8_t *lo, uint16_t *o, Py_ssize_t rt, Py_ssize_t ct,
                      Py_ssize_t cols) {
    for (int cb = 0; cb < TILE; cb += 16)
        for (int rb = 0; rb < TR; rb += 16) {
            __m128i x[16];
            for (int i = 0; i < 16; i++) x[i] = _mm_loadu_si128((const __m128i *)(tile + (cb + i) * TR + rb));
            transpose16(x); /* x[j]: the top bytes of row rt + rb + j, columns ct + cb .. + 15 */
            for (int j = 0; j < 16; j++) {
                const Py_ssize_t at = (rt + rb + j) * cols + ct + cb;
                const __m128i l = _mm_loadu_si128((const __m128i *)(lo + at));
                __m128i w0 = _mm_unpacklo_epi8(l, x[j]), w1 = _mm_unpackhi_epi8(l, x[j]);
                w0 = _mm_or_si128(_mm_srli_epi16(w0, 1), _mm_slli_epi16(w0, 15));
                w1 = _mm_or_si128(_mm_srli_epi16(w1, 1), _mm_slli_epi16(w1, 15));
                _mm_storeu_si128((__m128i *)(o + at), w0);
                _mm_storeu_si128((__m128i *)(o + at + 8), w1);
            }
        }
}
#else
#define HAVE_SSE2 0
static void tile2_sse(const uint8_t *tile, const uint8_t *lo, uint16_t *o, Py_ssize_t rt, Py_ssize_t ct,
                      Py_ssize_t cols) {
    (void)tile; (void)lo; (void)o; (void)rt; (void)ct; (void)cols;
}
#endif

/* assemble(out, top, planes, offset, rows, cols, by_cols, word_size, r0, r1)
 *
 * out:     writable, the section's words (word_size bytes each, little-endian)
 * top:     the piece's top bytes, line-major: rows x cols, or cols x rows when by_cols (lines are columns)
 * planes:  word_size - 1 buffers, each one byte per word of the whole section (plane 0 = lowest byte)
 * For the piece's rows r0 <= r < r1, word (r, c) is out[offset + r * cols + c] =
 * rotr1(top << (8 ws - 8) | plane[ws - 2] << (8 ws - 16) | ... | plane[0]).
 */
static PyObject *assemble(PyObject *self, PyObject *args) {
    Py_buffer out, top;
    PyObject *planes;
    Py_ssize_t offset, rows, cols, r0, r1;
    int by_cols, ws;
    if (!PyArg_ParseTuple(args, "w*y*Onnniinn", &out, &top, &planes, &offset, &rows, &cols, &by_cols, &ws, &r0,
                          &r1))
        return NULL;
    PyObject *seq = NULL;
    Py_buffer pbuf[3];
    Py_ssize_t got = 0;
    const char *err = NULL;
    if (ws != 2 && ws != 4) { err = "word size must be 2 or 4"; goto done; }
    seq = PySequence_Fast(planes, "planes must be a sequence of buffers");
    if (!seq) goto done;
    if (PySequence_Fast_GET_SIZE(seq) != ws - 1) { err = "need word_size - 1 planes"; goto done; }
    for (got = 0; got < ws - 1; got++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &pbuf[got], PyBUF_SIMPLE) < 0) goto done;
    const Py_ssize_t n = out.len / ws;
    if (out.len % ws || rows < 0 || cols < 0 || offset < 0 || offset > n || (cols && rows > (n - offset) / cols) ||
        top.len != rows * cols || r0 < 0 || r1 < r0 || r1 > rows) {
        err = "assemble: inconsistent sizes";
        goto done;
    }
    for (Py_ssize_t k = 0; k < ws - 1; k++)
        if (pbuf[k].len != n) { err = "a byte plane does not match the section length"; goto done; }

    const uint8_t *t8 = (const uint8_t *)top.buf;
    const uint8_t *a = (const uint8_t *)pbuf[0].buf + offset;
    const uint8_t *b = ws == 4 ? (const uint8_t *)pbuf[1].buf + offset : NULL;
    const uint8_t *c2 = ws == 4 ? (const uint8_t *)pbuf[2].buf + offset : NULL;
    uint16_t *o2 = (uint16_t *)out.buf + offset;
    uint32_t *o4 = (uint32_t *)out.buf + offset;
    Py_BEGIN_ALLOW_THREADS
#define W2(i, tv) do { uint16_t w = (uint16_t)((tv) << 8 | a[i]); o2[i] = (uint16_t)(w >> 1 | w << 15); } while (0)
#define W4(i, tv) do { uint32_t w = (uint32_t)(tv) << 24 | (uint32_t)c2[i] << 16 | (uint32_t)b[i] << 8 | a[i]; \
                       o4[i] = w >> 1 | w << 31; } while (0)
#define LOOP(W)                                                                                                   \
    if (!by_cols) {                                                                                               \
        for (Py_ssize_t i = r0 * cols; i < r1 * cols; i++) W(i, t8[i]);                                           \
    } else { /* blocked transpose; each tile's lines are copied out first: they lie `rows` bytes apart, which */ \
             /* maps them all to a few cache sets when rows is a multiple of 4096 (49152 for a vocabulary) */     \
        uint8_t tile[TILE * TR];                                                                                  \
        for (Py_ssize_t rt = r0; rt < r1; rt += TR)                                                                \
            for (Py_ssize_t ct = 0; ct < cols; ct += TILE) {                                                      \
                const Py_ssize_t re = rt + TR < r1 ? rt + TR : r1, ce = ct + TILE < cols ? ct + TILE : cols;      \
                for (Py_ssize_t c = ct; c < ce; c++) memcpy(tile + (c - ct) * TR, t8 + c * rows + rt, re - rt);    \
                if (FAST_TILE(re - rt, ce - ct)) {                                                                \
                    tile2_sse(tile, a, o2, rt, ct, cols);                                                         \
                    continue;                                                                                     \
                }                                                                                                 \
                for (Py_ssize_t r = rt; r < re; r++)                                                              \
                    for (Py_ssize_t c = ct; c < ce; c++) W(r * cols + c, tile[(c - ct) * TR + (r - rt)]);         \
            }                                                                                                     \
    }
    if (ws == 2) {
#define FAST_TILE(nr, nc) (HAVE_SSE2 && (nr) == TR && (nc) == TILE)
        LOOP(W2)
#undef FAST_TILE
    } else {
#define FAST_TILE(nr, nc) 0
        LOOP(W4)
#undef FAST_TILE
    }
#undef LOOP
#undef W2
#undef W4
    Py_END_ALLOW_THREADS
done:
    for (Py_ssize_t k = 0; k < got; k++) PyBuffer_Release(&pbuf[k]);
    Py_XDECREF(seq);
    PyBuffer_Release(&out); PyBuffer_Release(&top);
    if (err) PyErr_SetString(PyExc_ValueError, err);
    if (err || PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}


/* crc32(data, value=0) -> zlib.crc32(data, value), folded with carry-less multiplies (PCLMULQDQ) where the CPU has
 * them: ~4x zlib's speed, and every section's checksum is checked on every read. The folding constants are those
 * of Intel's "Fast CRC Computation Using PCLMULQDQ" for the reflected polynomial 0xEDB88320. */
static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc_bytes(uint32_t c, const uint8_t *p, size_t n) { /* c: the running (inverted) register */
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_CLMUL_PATH 1

/* n >= 64 and a multiple of 16 */
__attribute__((target("pclmul,sse2"))) static uint32_t crc_clmul(uint32_t c, const uint8_t *p, size_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x1 = _mm_loadu_si128((const __m128i *)p), x2 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32)), x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    p += 64;
    n -= 64;
#define FOLD(x, k, next) x = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), \
                                                         _mm_clmulepi64_si128(x, k, 0x11)), next)
    while (n >= 64) {
        FOLD(x1, k1k2, _mm_loadu_si128((const __m128i *)p));
        FOLD(x2, k1k2, _mm_loadu_si128((const __m128i *)(p + 16)));
        FOLD(x3, k1k2, _mm_loadu_si128((const __m128i *)(p + 32)));
        FOLD(x4, k1k2, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    FOLD(x1, k3k4, x2);
    FOLD(x1, k3k4, x3);
    FOLD(x1, k3k4, x4);
    while (n >= 16) {
        FOLD(x1, k3k4, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
#undef FOLD
    /* 128 -> 64 bits, then 64 -> 32, then Barrett reduction */
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(k3k4, x1, 0x01), _mm_srli_si128(x1, 8));
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00), _mm_srli_si128(x1, 4));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, mask32), poly, 0x00);
    x1 = _mm_xor_si128(x1, t);
    return (uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(x1, 4));
}
#endif

static int clmul_ok = 0;

static PyObject *crc32(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &value)) return NULL;
    uint32_t c = ~(uint32_t)value;
    const uint8_t *p = (const uint8_t *)data.buf;
    size_t n = (size_t)data.len;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_CLMUL_PATH
    if (clmul_ok && n >= 64) {
        const size_t bulk = n & ~(size_t)15;
        c = crc_clmul(c, p, bulk);
        p += bulk;
        n -= bulk;
    }
#endif
    c = crc_bytes(c, p, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(~c);
}

static PyMethodDef methods[] = {
    {"unpack", unpack, METH_VARARGS, "Symbol streams + bases + escapes -> a piece's top bytes (line-major)."},
    {"assemble", assemble, METH_VARARGS, "A piece's top bytes + the low byte planes -> its words."},
    {"crc32", crc32, METH_VARARGS, "zlib.crc32(data, value), with carry-less multiplies where the CPU has them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "bbformat's compiled inner loops.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    crc_init();
#ifdef HAVE_CLMUL_PATH
    __builtin_cpu_init();
    clmul_ok = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "CLMUL", clmul_ok) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* bbformat's compiled inner loops: the entropy stage's decoding (SPEC.md section 13), where numpy needs several
 * passes per word and this needs one, and the section checksum. bbformat/kernels.py holds the same functions in
 * numpy / zlib: the reference the tests compare these against, and the fallback when this module was not built.
 *
 * decode: a piece's symbol streams (one per class of lines) + bases + escapes + the low byte planes -> words
 * rans_table / rans_encode / rans_decode / pack_bits: entropy method 2 (rANS over one symbol per word)
 * triangle: an `exact` carrier's packed triangle -> its k x k block
 * tied_restore: `exact`'s tied head, predicted words + residual words -> its words (SPEC.md 12.6)
 * crc32:  zlib.crc32
 *
 * Every length is checked before any memory is touched; the GIL is released while the loops run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h> /* x86-64 baseline: 32 words per step */
#endif

#define ESCAPE 15
#define MAX_CLASSES 16
#define BATCH 2048 /* nibbles unpacked at a time per stream, into a buffer that stays in L1 */
#define SLACK 32   /* take() may write up to 31 bytes past what it was asked for */

/* Where the words go: shared by a piece's streams. */
typedef struct {
    int ws, nibbles;
    const uint8_t *p0, *p1, *p2; /* the low planes, from the piece's first word */
    uint16_t *o2;                /* the words, from the piece's first word (ws 2) */
    uint32_t *o4;                /* (ws 4) */
    /* float16 with split exponents (SPEC 13.4): the top byte is (top << 3 | m), m from three bit-planes; m0..m2
     * start at the window's word 0, which is word -moff of the piece; mlen bytes each (NULL: no split) */
    const uint8_t *m0, *m1, *m2;
    Py_ssize_t moff, mlen;
} Out;

/* The split mantissa bits m of piece word i (SPEC 13.4: bit j of m is bit (k mod 8) of byte k / 8 of plane j, k the
 * word's index in the window) */
static inline uint8_t mant3(const Out *o, Py_ssize_t i) {
    const Py_ssize_t k = o->moff + i, b = k >> 3;
    const int sh = (int)(k & 7);
    return (uint8_t)(((o->m0[b] >> sh) & 1) | ((o->m1[b] >> sh) & 1) << 1 | ((o->m2[b] >> sh) & 1) << 2);
}

static inline uint8_t split_top(const Out *o, Py_ssize_t i, uint8_t t) {
    return o->m0 ? (uint8_t)(t << 3 | mant3(o, i)) : t;
}

/* One class's symbol stream being decoded. */
typedef struct {
    const uint8_t *s;    /* symbols: nibbles (two per byte, low first) or bytes */
    Py_ssize_t q, total; /* next symbol, symbols in the stream */
    const uint8_t *esc;  /* escaped top bytes, consumed in order */
    Py_ssize_t e, n_esc;
    uint8_t *tmp;        /* unpacked nibbles tmp[u .. avail) not used yet */
    Py_ssize_t u, avail;
} Stream;

static inline void put_word(const Out *o, Py_ssize_t i, uint8_t t) {
    t = split_top(o, i, t);
    if (o->ws == 2) {
        const uint16_t w = (uint16_t)(t << 8 | o->p0[i]);
        o->o2[i] = (uint16_t)(w >> 1 | w << 15);
    } else {
        const uint32_t w = (uint32_t)t << 24 | (uint32_t)o->p2[i] << 16 | (uint32_t)o->p1[i] << 8 | o->p0[i];
        o->o4[i] = w >> 1 | w << 31;
    }
}

/* Residuals res[0 .. n) -> the words at piece positions i0 .. i0 + n - 1. Each gets base bv[t] (per element, when
 * bv is given: a by_cols piece) or bc (one base: a row); with nibbles, residual 15 takes the next escape instead: of
 * stream st, or, when ecls is given (a whole row of a by_cols piece), of stream st + ecls[t].
 * Returns 0, or -1 when the escapes run out. */
#if defined(__SSE2__)
/* bits k .. k + 15 of a bit-plane as 16 bytes of 0 / 1 << j (4 bytes are read from byte k / 8 on) */
static inline __m128i plane_bits16(const uint8_t *plane, Py_ssize_t k, int j) {
    uint32_t v;
    memcpy(&v, plane + (k >> 3), 4);
    __m128i x = _mm_cvtsi32_si128((int)((v >> (k & 7)) & 0xFFFF));
    x = _mm_unpacklo_epi8(x, x);
    x = _mm_unpacklo_epi16(x, x);
    x = _mm_unpacklo_epi32(x, x); /* bytes 0-7: bits 0-7, bytes 8-15: bits 8-15 */
    const __m128i bit = _mm_set_epi8((char)128, 64, 32, 16, 8, 4, 2, 1, (char)128, 64, 32, 16, 8, 4, 2, 1);
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(x, bit), bit), _mm_set1_epi8((char)(1 << j)));
}
#endif

static int decode_avx2_ok = 0;
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_DECODE_AVX2 1
/* decode_seg's bulk for ws 2 on AVX2: 32 words per step, from *pt on (advanced past the steps done). */
__attribute__((target("avx2"))) static int decode_seg_avx2(const Out *o, Stream *st, const uint8_t *res,
                                                           Py_ssize_t i0, Py_ssize_t n, const uint8_t *bv,
                                                           uint8_t bc, const uint8_t *ecls, Py_ssize_t *pt) {
    const __m256i m15 = _mm256_set1_epi8(15), vb = _mm256_set1_epi8((char)bc), f8 = _mm256_set1_epi8((char)0xF8);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    Py_ssize_t t = *pt, n32 = n; /* split mantissa bits: a step reads 8 bytes of each bit-plane from byte k / 8 */
    if (o->m0 && (o->mlen - 7) * 8 - (o->moff + i0) + 31 < n32) n32 = (o->mlen - 7) * 8 - (o->moff + i0) + 31;
    for (; t + 32 <= n32; t += 32) {
        const __m256i r = _mm256_loadu_si256((const __m256i *)(res + t));
        unsigned mask = o->nibbles ? (unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(r, m15)) : 0;
        __m256i top = _mm256_add_epi8(r, bv ? _mm256_loadu_si256((const __m256i *)(bv + t)) : vb);
        if (mask) {
            uint8_t buf[32];
            _mm256_storeu_si256((__m256i *)buf, top);
            for (; mask; mask &= mask - 1) {
                const int lane = __builtin_ctz(mask);
                Stream *es = ecls ? st + ecls[t + lane] : st;
                if (es->e >= es->n_esc) return -1;
                buf[lane] = es->esc[es->e++];
            }
            top = _mm256_loadu_si256((const __m256i *)buf);
        }
        if (o->m0) { /* bit k + i of plane j -> bit j of byte i */
            const Py_ssize_t k = o->moff + i0 + t;
            const uint8_t *pl[3] = {o->m0, o->m1, o->m2};
            __m256i m = _mm256_and_si256(_mm256_slli_epi16(top, 3), f8);
            for (int j = 0; j < 3; j++) {
                uint64_t v;
                memcpy(&v, pl[j] + (k >> 3), 8);
                const __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(uint32_t)(v >> (k & 7))), spread);
                m = _mm256_or_si256(m, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit),
                                                        _mm256_set1_epi8((char)(1 << j))));
            }
            top = m;
        }
        const __m256i l = _mm256_loadu_si256((const __m256i *)(o->p0 + i0 + t));
        __m256i w0 = _mm256_unpacklo_epi8(l, top), w1 = _mm256_unpackhi_epi8(l, top); /* words 0-7 16-23, 8-15 24-31 */
        w0 = _mm256_or_si256(_mm256_srli_epi16(w0, 1), _mm256_slli_epi16(w0, 15));
        w1 = _mm256_or_si256(_mm256_srli_epi16(w1, 1), _mm256_slli_epi16(w1, 15));
        _mm256_storeu_si256((__m256i *)(o->o2 + i0 + t), _mm256_permute2x128_si256(w0, w1, 0x20));
        _mm256_storeu_si256((__m256i *)(o->o2 + i0 + t + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
    }
    *pt = t;
    return 0;
}
#endif

static int decode_seg(const Out *o, Stream *st, const uint8_t *res, Py_ssize_t i0, Py_ssize_t n, const uint8_t *bv,
                      uint8_t bc, const uint8_t *ecls) {
    Py_ssize_t t = 0;
#ifdef HAVE_DECODE_AVX2
    if (decode_avx2_ok && o->ws == 2 && decode_seg_avx2(o, st, res, i0, n, bv, bc, ecls, &t)) return -1;
#endif
#if defined(__SSE2__)
    if (o->ws == 2) { /* 16 words per step; a step with an escape patches its top bytes one by one */
        const __m128i m15 = _mm_set1_epi8(15), vb = _mm_set1_epi8((char)bc), f8 = _mm_set1_epi8((char)0xF8);
        Py_ssize_t n16 = n; /* with split mantissa bits a step reads 4 bytes of each bit-plane, from its first
                             * word's byte k / 8: steps stop where that would pass the planes' end */
        if (o->m0 && (o->mlen - 3) * 8 - (o->moff + i0) + 15 < n16) n16 = (o->mlen - 3) * 8 - (o->moff + i0) + 15;
        for (; t + 16 <= n16; t += 16) {
            const __m128i r = _mm_loadu_si128((const __m128i *)(res + t));
            int mask = o->nibbles ? _mm_movemask_epi8(_mm_cmpeq_epi8(r, m15)) : 0;
            __m128i top = _mm_add_epi8(r, bv ? _mm_loadu_si128((const __m128i *)(bv + t)) : vb);
            if (mask) {
                uint8_t buf[16];
                _mm_storeu_si128((__m128i *)buf, top);
                for (; mask; mask &= mask - 1) {
                    const int lane = __builtin_ctz((unsigned)mask);
                    Stream *es = ecls ? st + ecls[t + lane] : st;
                    if (es->e >= es->n_esc) return -1;
                    buf[lane] = es->esc[es->e++];
                }
                top = _mm_loadu_si128((const __m128i *)buf);
            }
            if (o->m0) {
                const Py_ssize_t k = o->moff + i0 + t;
                top = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(top, 3), f8),
                                   _mm_or_si128(plane_bits16(o->m0, k, 0),
                                                _mm_or_si128(plane_bits16(o->m1, k, 1), plane_bits16(o->m2, k, 2))));
            }
            const __m128i l = _mm_loadu_si128((const __m128i *)(o->p0 + i0 + t));
            __m128i w0 = _mm_unpacklo_epi8(l, top), w1 = _mm_unpackhi_epi8(l, top);
            w0 = _mm_or_si128(_mm_srli_epi16(w0, 1), _mm_slli_epi16(w0, 15));
            w1 = _mm_or_si128(_mm_srli_epi16(w1, 1), _mm_slli_epi16(w1, 15));
            _mm_storeu_si128((__m128i *)(o->o2 + i0 + t), w0);
            _mm_storeu_si128((__m128i *)(o->o2 + i0 + t + 8), w1);
        }
    }
#endif
    for (; t < n; t++) {
        const uint8_t r = res[t];
        if (o->nibbles && r == ESCAPE) {
            Stream *es = ecls ? st + ecls[t] : st;
            if (es->e >= es->n_esc) return -1;
            put_word(o, i0 + t, es->esc[es->e++]);
        } else {
            put_word(o, i0 + t, (uint8_t)(r + (bv ? bv[t] : bc)));
        }
    }
    return 0;
}

/* The stream's next n residuals into dst, nibbles unpacked (a by_cols piece's streams are read only so, from any
 * nibble position; a row piece's in unpack_nibbles' batches). dst has room for n + SLACK - 1 bytes: the bytes
 * after the n may be overwritten (with the next class's residuals of the same row, filled in after them). */
static void take(const Out *o, Stream *st, uint8_t *dst, Py_ssize_t n) {
    Py_ssize_t q = st->q, t = 0;
    if (!o->nibbles) {
        memcpy(dst, st->s + q, (size_t)n);
        st->q = q + n;
        return;
    }
    const uint8_t *s = st->s;
    if ((q & 1) && n) dst[t++] = s[q++ >> 1] >> 4;
#if defined(__SSE2__)
    const __m128i m15 = _mm_set1_epi8(15);
    const Py_ssize_t bytes = (st->total + 1) >> 1; /* the stream's length: no read past it (a shift: "/ 2" was an idiv) */
    for (; t < n && (q >> 1) + 16 <= bytes; t += 32, q += 32) { /* q is even here; may run up to 31 past n */
        const __m128i v = _mm_loadu_si128((const __m128i *)(s + (q >> 1)));
        const __m128i lo = _mm_and_si128(v, m15), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m15);
        _mm_storeu_si128((__m128i *)(dst + t), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128((__m128i *)(dst + t + 16), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; t < n; t++, q++) dst[t] = (q & 1) ? s[q >> 1] >> 4 : s[q >> 1] & 15;
    st->q = q - (t - n); /* (t - n: the residuals unpacked past n) */
}

/* Unpack the stream's next m nibbles (m <= BATCH) into its tmp, one byte each (tmp has take's slack). */
static void unpack_nibbles(const Out *o, Stream *st, Py_ssize_t m) {
    take(o, st, st->tmp, m);
    st->u = 0;
    st->avail = m;
}

/* The stream's next n symbols -> the words at piece positions i0 .. i0 + n - 1 (see decode_seg). */
static int decode_run(const Out *o, Stream *st, Py_ssize_t i0, Py_ssize_t n, uint8_t bc) {
    for (Py_ssize_t done = 0, len; done < n; done += len) {
        const uint8_t *res;
        if (o->nibbles) {
            if (st->u == st->avail) unpack_nibbles(o, st, st->total - st->q < BATCH ? st->total - st->q : BATCH);
            len = n - done < st->avail - st->u ? n - done : st->avail - st->u;
            res = st->tmp + st->u;
            st->u += len;
        } else {
            len = n - done;
            res = st->s + st->q;
            st->q += len;
        }
        if (decode_seg(o, st, res, i0 + done, len, NULL, bc, NULL)) return -1;
    }
    return 0;
}

/* decode(out, planes, offset, rows, cols, by_cols, classes, bases, shift, nibbles, streams, escapes)
 *
 * Writes the words of one piece: rows x cols words from word `offset` of `out`, row by row.
 * out:      writable, the section's words (ws = len(planes) + 1 bytes each, little-endian)
 * planes:   ws - 1 buffers, one byte per word of the whole section (plane 0 = lowest byte)
 * classes:  one byte per line (a row; a column when by_cols), each < K = len(streams); a by_cols piece's classes
 *           do not decrease, so each class is a range of columns
 * bases:    one byte per line, added shifted left by `shift`
 * streams:  K buffers, class c's residuals: its rows one after another; when by_cols, row by row across its
 *           columns. Two per byte (low nibble first, 15 = escape) when nibbles, else one per byte.
 * escapes:  K buffers, the top bytes of each stream's escaped words, in order; each must be used up exactly.
 * mantissa: None, or (float16 with split exponents: ws 2, nibbles, shift 0) 3 bit-planes of ceil(n / 8) bytes each,
 *           bit k of plane j = bit j of word k's mantissa bits m (n: the words of `out`); the top byte is then
 *           (top << 3 | m) mod 256, top the residual + base (or the escape byte).
 * Word (y, x) = rotr1(top << (8 ws - 8) | planes[ws - 2] << (8 ws - 16) | ... | planes[0]).
 */
static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer out, cls, bases;
    PyObject *planes, *streams, *escapes, *mantissa = Py_None;
    Py_ssize_t offset, rows, cols;
    int by_cols, shift, nibbles;
    if (!PyArg_ParseTuple(args, "w*Onnniy*y*iiOO|O", &out, &planes, &offset, &rows, &cols, &by_cols, &cls, &bases,
                          &shift, &nibbles, &streams, &escapes, &mantissa))
        return NULL;
    PyObject *pseq = NULL, *sseq = NULL, *eseq = NULL, *mseq = NULL;
    Py_buffer pbuf[3], sbuf[MAX_CLASSES], ebuf[MAX_CLASSES], mbuf[3];
    Py_ssize_t np_ = 0, got_p = 0, got_s = 0, got_e = 0, got_m = 0, K = 0;
    uint8_t *bv = NULL, *tmp = NULL, *row = NULL;
    const char *err = NULL;
    char msg[160];
    if (!(pseq = PySequence_Fast(planes, "planes must be a sequence of buffers"))) goto done;
    if (!(sseq = PySequence_Fast(streams, "streams must be a sequence of buffers"))) goto done;
    if (!(eseq = PySequence_Fast(escapes, "escapes must be a sequence of buffers"))) goto done;
    np_ = PySequence_Fast_GET_SIZE(pseq);
    K = PySequence_Fast_GET_SIZE(sseq);
    const Py_ssize_t ws = np_ + 1;
    if (ws != 2 && ws != 4) { err = "need 1 or 3 low planes (word size 2 or 4)"; goto done; }
    if (K < 1 || K > MAX_CLASSES || PySequence_Fast_GET_SIZE(eseq) != K) {
        err = "need 1 to 16 streams, and one escape buffer per stream";
        goto done;
    }
    for (; got_p < np_; got_p++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(pseq, got_p), &pbuf[got_p], PyBUF_SIMPLE) < 0) goto done;
    for (; got_s < K; got_s++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sseq, got_s), &sbuf[got_s], PyBUF_SIMPLE) < 0) goto done;
    for (; got_e < K; got_e++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(eseq, got_e), &ebuf[got_e], PyBUF_SIMPLE) < 0) goto done;
    if (mantissa != Py_None) {
        if (!(mseq = PySequence_Fast(mantissa, "mantissa must be None or a sequence of 3 buffers"))) goto done;
        if (PySequence_Fast_GET_SIZE(mseq) != 3 || ws != 2 || !nibbles || shift) {
            err = "split mantissa bits need 3 bit-planes, word size 2, nibbles and shift 0";
            goto done;
        }
        for (; got_m < 3; got_m++)
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(mseq, got_m), &mbuf[got_m], PyBUF_SIMPLE) < 0) goto done;
    }
    const Py_ssize_t n = out.len / ws, n_lines = by_cols ? cols : rows;
    for (Py_ssize_t j = 0; j < got_m; j++)
        if (mbuf[j].len != (n + 7) / 8) { err = "a mantissa bit-plane does not match the section length"; goto done; }
    if (out.len % ws || rows < 0 || cols < 0 || offset < 0 || offset > n || (cols && rows > (n - offset) / cols) ||
        cls.len != n_lines || bases.len != n_lines || shift < 0 || shift > 7 || (by_cols != 0 && by_cols != 1)) {
        err = "decode: inconsistent sizes";
        goto done;
    }
    for (Py_ssize_t j = 0; j < np_; j++)
        if (pbuf[j].len != n) { err = "a byte plane does not match the section length"; goto done; }
    const uint8_t *c8 = (const uint8_t *)cls.buf, *b8 = (const uint8_t *)bases.buf;
    Py_ssize_t count[MAX_CLASSES] = {0}, first[MAX_CLASSES];
    for (Py_ssize_t j = 0; j < n_lines; j++) {
        if (c8[j] >= K) { err = "a line class is >= the piece's class count"; goto done; }
        if (by_cols && j && c8[j] < c8[j - 1]) { err = "the column classes of a piece decrease"; goto done; }
        if (!count[c8[j]]++) first[c8[j]] = j;
    }
    Out o = {(int)ws, nibbles, (const uint8_t *)pbuf[0].buf + offset,
             ws == 4 ? (const uint8_t *)pbuf[1].buf + offset : NULL, ws == 4 ? (const uint8_t *)pbuf[2].buf + offset : NULL,
             (uint16_t *)out.buf + offset, (uint32_t *)out.buf + offset,
             got_m ? (const uint8_t *)mbuf[0].buf : NULL, got_m ? (const uint8_t *)mbuf[1].buf : NULL,
             got_m ? (const uint8_t *)mbuf[2].buf : NULL, offset, (n + 7) / 8};
    if (!(tmp = malloc((size_t)K * (BATCH + SLACK))) || !(bv = malloc((size_t)n_lines + 1)) ||
        (by_cols && !(row = malloc((size_t)cols + SLACK)))) {
        PyErr_NoMemory();
        goto done;
    }
    Stream st[MAX_CLASSES];
    for (Py_ssize_t c = 0; c < K; c++) {
        const Py_ssize_t total = count[c] * (by_cols ? rows : cols);
        if (sbuf[c].len != (nibbles ? (total + 1) / 2 : total)) {
            err = "a symbol stream's length does not match its lines";
            goto done;
        }
        st[c] = (Stream){(const uint8_t *)sbuf[c].buf, 0, total, (const uint8_t *)ebuf[c].buf, 0, ebuf[c].len,
                         tmp + c * (BATCH + SLACK), 0, 0};
    }
    for (Py_ssize_t j = 0; j < n_lines; j++) bv[j] = (uint8_t)(b8[j] << shift);
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t y = 0; y < rows && !bad; y++) { /* row by row, so the words are written in order */
        if (!by_cols) {
            bad = decode_run(&o, &st[c8[y]], y * cols, cols, bv[y]);
            continue;
        }
        /* a by_cols row: each class's next residuals into their range of columns, then the whole row in one pass
         * (column ranges are short, a few words in the head's case: one pass per range was 3x slower per word) */
        for (Py_ssize_t c = 0; c < K; c++)
            if (count[c]) take(&o, &st[c], row + first[c], count[c]);
        bad = decode_seg(&o, st, row, y * cols, cols, bv, 0, c8);
    }
    Py_END_ALLOW_THREADS
    if (bad) { err = "the escape stream is too short"; goto done; }
    for (Py_ssize_t c = 0; c < K; c++)
        if (st[c].e != st[c].n_esc) {
            snprintf(msg, sizeof msg, "class %zd used %zd escapes, the header declares %zd", c, st[c].e, st[c].n_esc);
            err = msg;
            goto done;
        }
done:
    free(row);
    free(bv);
    free(tmp);
    for (Py_ssize_t j = 0; j < got_p; j++) PyBuffer_Release(&pbuf[j]);
    for (Py_ssize_t j = 0; j < got_s; j++) PyBuffer_Release(&sbuf[j]);
    for (Py_ssize_t j = 0; j < got_e; j++) PyBuffer_Release(&ebuf[j]);
    for (Py_ssize_t j = 0; j < got_m; j++) PyBuffer_Release(&mbuf[j]);
    Py_XDECREF(pseq); Py_XDECREF(sseq); Py_XDECREF(eseq); Py_XDECREF(mseq);
    PyBuffer_Release(&out); PyBuffer_Release(&cls); PyBuffer_Release(&bases);
    if (err) PyErr_SetString(PyExc_ValueError, err);
    if (err || PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}


/* ---------------------------------------------------------------------------------------------------------------
 * Entropy method 2 (SPEC.md 13.8): a static rANS over one symbol per word, four interleaved states.
 *
 * State x is 32 bits in [2^16, 2^32); frequencies are 12-bit (each class's table sums to 4096); renormalisation
 * moves 16-bit words (little-endian). Symbol t of a chunk uses state t mod 4. A chunk's data: the 4 states the
 * decoder starts from (u32 little-endian each), then the 16-bit words in the order the decoder reads them. The
 * encoder starts every state at 2^16, so a decoder that ends elsewhere, or with words left, saw corrupt data.
 * Decode-table entry (one per 12-bit slot): symbol | (freq - 1) << 8 | (slot - cum) << 20.
 */
#define RANS_L (1u << 16)
#define RANS_BITS 12
#define RANS_M (1u << RANS_BITS)
#define RANS_SYMS 256
#define RANS_ESCAPE 255
#define RANS_STATES 4

/* rans_table(freqs) -> bytes: K decode tables (K x 4096 u32) from K x 256 u16 frequencies, each summing to 4096. */
static PyObject *rans_table(PyObject *self, PyObject *args) {
    Py_buffer fb;
    if (!PyArg_ParseTuple(args, "y*", &fb)) return NULL;
    const char *err = NULL;
    PyObject *res = NULL;
    const Py_ssize_t K = fb.len / (2 * RANS_SYMS);
    if (fb.len % (2 * RANS_SYMS) || K < 1 || K > MAX_CLASSES) {
        err = "rans_table: need 1 to 16 tables of 256 u16 frequencies";
        goto done;
    }
    res = PyBytes_FromStringAndSize(NULL, K * RANS_M * 4);
    if (!res) goto done;
    uint32_t *t = (uint32_t *)PyBytes_AS_STRING(res);
    const uint8_t *f8 = (const uint8_t *)fb.buf;
    for (Py_ssize_t c = 0; c < K && !err; c++) {
        uint32_t cum = 0;
        for (uint32_t s = 0; s < RANS_SYMS; s++) {
            const uint32_t f = f8[2 * (c * RANS_SYMS + s)] | (uint32_t)f8[2 * (c * RANS_SYMS + s) + 1] << 8;
            if (f > RANS_M - cum) { err = "a frequency table sums to more than 4096"; break; }
            for (uint32_t j = 0; j < f; j++) t[c * RANS_M + cum + j] = s | (f - 1) << 8 | j << 20;
            cum += f;
        }
        if (!err && cum != RANS_M) err = "a frequency table does not sum to 4096";
    }
done:
    PyBuffer_Release(&fb);
    if (err) {
        Py_XDECREF(res);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return res;
}

/* rans_encode(syms, classes, freqs) -> bytes: symbol t (a byte) coded with table classes[t] (freqs: K x 256 u16,
 * each summing to 4096); every symbol's frequency must be > 0. */
static PyObject *rans_encode(PyObject *self, PyObject *args) {
    Py_buffer sb, cb, fb;
    if (!PyArg_ParseTuple(args, "y*y*y*", &sb, &cb, &fb)) return NULL;
    const char *err = NULL;
    PyObject *res = NULL;
    uint8_t *buf = NULL;
    uint32_t cum[MAX_CLASSES][RANS_SYMS + 1], freq[MAX_CLASSES][RANS_SYMS];
    const Py_ssize_t n = sb.len, K = fb.len / (2 * RANS_SYMS);
    const uint8_t *s8 = (const uint8_t *)sb.buf, *c8 = (const uint8_t *)cb.buf, *f8 = (const uint8_t *)fb.buf;
    if (cb.len != n || fb.len % (2 * RANS_SYMS) || K < 1 || K > MAX_CLASSES) {
        err = "rans_encode: inconsistent sizes";
        goto done;
    }
    for (Py_ssize_t c = 0; c < K; c++) {
        cum[c][0] = 0;
        for (int s = 0; s < RANS_SYMS; s++) {
            freq[c][s] = f8[2 * (c * RANS_SYMS + s)] | (uint32_t)f8[2 * (c * RANS_SYMS + s) + 1] << 8;
            cum[c][s + 1] = cum[c][s] + freq[c][s];
        }
        if (cum[c][RANS_SYMS] != RANS_M) { err = "a frequency table does not sum to 4096"; goto done; }
    }
    for (Py_ssize_t t = 0; t < n; t++)
        if (c8[t] >= K || !freq[c8[t]][s8[t]]) { err = "a symbol has frequency 0 in its class"; goto done; }
    const size_t cap = 2 * (size_t)n + 4 * RANS_STATES;
    if (!(buf = malloc(cap))) { PyErr_NoMemory(); goto done; }
    uint8_t *p = buf + cap;
    uint32_t x[RANS_STATES] = {RANS_L, RANS_L, RANS_L, RANS_L};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = n - 1; t >= 0; t--) { /* backwards: the decoder reads forwards */
        uint32_t *st = &x[t & (RANS_STATES - 1)];
        const uint32_t c = c8[t], s = s8[t], f = freq[c][s];
        if ((uint64_t)*st >= (uint64_t)f << 20) { /* (L >> 12 << 16) * f: keep x below 2^32 after coding */
            p -= 2;
            p[0] = (uint8_t)*st;
            p[1] = (uint8_t)(*st >> 8);
            *st >>= 16;
        }
        *st = ((*st / f) << RANS_BITS) + (*st % f) + cum[c][s];
    }
    for (int i = RANS_STATES - 1; i >= 0; i--) {
        p -= 4;
        for (int b = 0; b < 4; b++) p[b] = (uint8_t)(x[i] >> 8 * b);
    }
    Py_END_ALLOW_THREADS
    res = PyBytes_FromStringAndSize((const char *)p, buf + cap - p);
done:
    free(buf);
    PyBuffer_Release(&sb); PyBuffer_Release(&cb); PyBuffer_Release(&fb);
    if (err) PyErr_SetString(PyExc_ValueError, err);
    return res;
}

/* pack_bits(values, ws, width) -> bytes: the low `width` bits (0..24) of each ws-byte little-endian word, LSB first. */
static PyObject *pack_bits(PyObject *self, PyObject *args) {
    Py_buffer vb;
    int ws, width;
    if (!PyArg_ParseTuple(args, "y*ii", &vb, &ws, &width)) return NULL;
    if ((ws != 2 && ws != 4) || vb.len % ws || width < 0 || width > 24) {
        PyBuffer_Release(&vb);
        PyErr_SetString(PyExc_ValueError, "pack_bits: inconsistent sizes");
        return NULL;
    }
    const Py_ssize_t n = vb.len / ws;
    PyObject *res = PyBytes_FromStringAndSize(NULL, (n * width + 7) / 8);
    if (res) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(res);
        const uint8_t *v = (const uint8_t *)vb.buf;
        const uint32_t mask = (1u << width) - 1;
        Py_BEGIN_ALLOW_THREADS
        uint64_t bb = 0;
        int nb = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t w = v[i * ws] | (uint32_t)v[i * ws + 1] << 8;
            if (ws == 4) w |= (uint32_t)v[i * ws + 2] << 16 | (uint32_t)v[i * ws + 3] << 24;
            bb |= (uint64_t)(w & mask) << nb;
            for (nb += width; nb >= 8; nb -= 8, bb >>= 8) *o++ = (uint8_t)bb;
        }
        if (nb) *o = (uint8_t)bb;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&vb);
    return res;
}

/* The state of one chunk's decoding: its rANS words, escapes and raw low bits (every read bounds-checked). */
typedef struct {
    const uint8_t *p, *end;   /* rANS words not read yet */
    const uint8_t *rp, *rend; /* raw bits: bytes not loaded into bb yet */
    uint64_t bb;              /* loaded raw bits, nb of them */
    int nb, width, ws;
    uint32_t rmask, tmask;
    const uint8_t *esc;       /* escaped top values (u16) */
    Py_ssize_t ei, n_esc;
    int bad;                  /* 1: stream too short, 2: escapes too short, 3: escape too wide */
} Rans;

/* afterwards nb >= 56, or every remaining byte is loaded */
static inline __attribute__((always_inline)) void raw_refill(Rans *d) {
    if (d->rend - d->rp >= 8) {
        uint64_t w8;
        memcpy(&w8, d->rp, 8); /* little-endian host assumed, as for the words themselves */
        d->bb |= w8 << d->nb;
        d->rp += (63 - d->nb) >> 3;
        d->nb |= 56;
    } else {
        while (d->nb <= 56 && d->rp < d->rend) { d->bb |= (uint64_t)*d->rp++ << d->nb; d->nb += 8; }
    }
}

static inline __attribute__((always_inline)) uint32_t raw_take(Rans *d) { /* the caller checked that the bits exist */
    if (__builtin_expect(d->nb < d->width, 0)) raw_refill(d);
    const uint32_t r = (uint32_t)d->bb & d->rmask;
    d->bb >>= d->width;
    d->nb -= d->width;
    return r;
}

static inline __attribute__((always_inline)) uint32_t escape_top(Rans *d) {
    if (d->ei >= d->n_esc) { d->bad = 2; return 0; }
    const uint32_t top = d->esc[2 * d->ei] | (uint32_t)d->esc[2 * d->ei + 1] << 8;
    d->ei++;
    if (top > d->tmask) d->bad = 3;
    return top;
}

/* One symbol with state X from table TB, base BASE -> top value TOP. FAST: at least 2 bytes of rANS words remain,
 * so the renormalisation reads branch-free. */
#define RANS_STEP(X, TB, BASE, TOP, FAST)                                                        \
    do {                                                                                         \
        const uint32_t e_ = (TB)[(X) & (RANS_M - 1)], s_ = e_ & 0xFF;                            \
        X = ((e_ >> 8 & (RANS_M - 1)) + 1) * ((X) >> RANS_BITS) + (e_ >> 20);                    \
        if (FAST) {                                                                              \
            const uint32_t w_ = d.p[0] | (uint32_t)d.p[1] << 8;                                  \
            const int need_ = (X) < RANS_L;                                                      \
            X = need_ ? (X) << 16 | w_ : (X);                                                    \
            d.p += 2 * need_;                                                                    \
        } else if ((X) < RANS_L) {                                                               \
            if (d.end - d.p < 2) { d.bad = 1; break; }                                           \
            X = (X) << 16 | d.p[0] | (uint32_t)d.p[1] << 8;                                      \
            d.p += 2;                                                                            \
        }                                                                                        \
        TOP = s_; (void)(BASE);                                                                  \
    } while (0)

#define PUT_WORD(I, TOP)                                                                         \
    do {                                                                                         \
        const uint32_t w_ = (TOP) << d.width | raw_take(&d);                                     \
        if (ws == 2) o2[I] = (uint16_t)(w_ >> 1 | w_ << 15);                                   \
        else o4[I] = w_ >> 1 | w_ << 31;                                                         \
    } while (0)

/* The decoding loop of one chunk, specialised (inlined with constants) on the word size and the line direction.
 * Two passes per batch of up to RANS_BATCH elements of a row: the rANS symbols alone (a tight loop over 4
 * independent states), then the words (top values, escapes, raw low bits), which the compiler can pipeline. */
#define RANS_BATCH 512
static inline __attribute__((always_inline)) void rans_chunk(Rans *dp, uint32_t *xs, const uint32_t **tbv,
                                                            const uint32_t *bv, uint16_t *o2, uint32_t *o4,
                                                            Py_ssize_t n, Py_ssize_t cols, Py_ssize_t y0,
                                                            Py_ssize_t pos0, Py_ssize_t l0, const int ws,
                                                            const int by_cols) {
    Rans d = *dp; /* local copies: kept in registers (the output stores could alias them otherwise) */
    uint32_t x0 = xs[0], x1 = xs[1], x2 = xs[2], x3 = xs[3];
    d.ws = ws;
    const Py_ssize_t cs = by_cols ? 1 : 0; /* a by_cols piece changes table and base every element */
    uint8_t sym[RANS_BATCH];
    Py_ssize_t t = 0, xx = pos0 - y0 * cols, y = y0;
    while (t < n && !d.bad) { /* one batch of one row at a time: t .. t + len - 1 are columns xx .. xx + len - 1 */
        Py_ssize_t len = cols - xx < n - t ? cols - xx : n - t;
        if (len > RANS_BATCH) len = RANS_BATCH;
        const uint32_t **tl = tbv + (by_cols ? xx : y - l0);
        const uint32_t *bl = bv + (by_cols ? xx : y - l0);
        Py_ssize_t j = 0;
#define SYM_STEP(X, J, FAST) RANS_STEP(X, tl[(J) * cs], 0, sym[J], FAST)
        /* pass 1: symbols. RANS_STEP's top value is the symbol itself here (base 0, no escape lookup) */
        for (; j < len && ((t + j) & 3) && !d.bad; j++) {
            switch ((t + j) & 3) {
            case 1: SYM_STEP(x1, j, 0); break;
            case 2: SYM_STEP(x2, j, 0); break;
            default: SYM_STEP(x3, j, 0); break;
            }
        }
        for (; j + 4 <= len && d.end - d.p >= 8; j += 4) {
            SYM_STEP(x0, j, 1);
            SYM_STEP(x1, j + 1, 1);
            SYM_STEP(x2, j + 2, 1);
            SYM_STEP(x3, j + 3, 1);
        }
        for (; j < len && !d.bad; j++) {
            switch ((t + j) & 3) {
            case 0: SYM_STEP(x0, j, 0); break;
            case 1: SYM_STEP(x1, j, 0); break;
            case 2: SYM_STEP(x2, j, 0); break;
            default: SYM_STEP(x3, j, 0); break;
            }
        }
#undef SYM_STEP
        if (d.bad) break;
        /* pass 2: words */
        for (j = 0; j < len; j++) {
            const uint32_t s = sym[j];
            const uint32_t top = __builtin_expect(s == RANS_ESCAPE, 0) ? escape_top(&d) : (bl[j * cs] + s) & d.tmask;
            PUT_WORD(t + j, top);
        }
        t += len;
        xx += len;
        if (xx == cols) { xx = 0; y++; }
    }
    *dp = d;
    xs[0] = x0; xs[1] = x1; xs[2] = x2; xs[3] = x3;
}

/* rans_decode(out, ws, word0, cols, by_cols, pos0, n, classes, bases, tables, stream, escapes, raw, bit0, width)
 *
 * One chunk of a method-2 piece: elements pos0 .. pos0 + n - 1 (row-major) of a piece of `cols` columns whose first
 * word is word `word0` of `out` (ws-byte words). Element (y, x) belongs to line x (by_cols) or y; its class and
 * base are classes[line] (u8) and bases[line] (u16 little-endian). tables: K decode tables (rans_table). Symbol s
 * gives the word's top value (base + s) mod 2^T, T = 8 ws - width; the escape symbol 255 takes the next u16 of
 * `escapes` instead (which must be < 2^T, and used up exactly). The low `width` bits come from `raw` (bit-packed,
 * LSB first) from bit `bit0` on. Word = rotr(top << width | low bits). Symbol t of the chunk uses state t mod 4;
 * the chunk must end with every state at 2^16 and every rANS word read. */
static PyObject *rans_decode(PyObject *self, PyObject *args) {
    Py_buffer out, cls, bases, tables, stream, escapes, raw;
    int ws, by_cols, width;
    Py_ssize_t word0, cols, pos0, n, bit0;
    if (!PyArg_ParseTuple(args, "w*innpnny*y*y*y*y*y*ni", &out, &ws, &word0, &cols, &by_cols, &pos0, &n, &cls, &bases,
                          &tables, &stream, &escapes, &raw, &bit0, &width))
        return NULL;
    const char *err = NULL;
    const uint32_t **tbv = NULL;
    uint32_t *bv = NULL;
    const Py_ssize_t K = tables.len / (RANS_M * 4), n_lines = cls.len;
    const Py_ssize_t words = (ws == 2 || ws == 4) ? out.len / ws : 0;
    if ((ws != 2 && ws != 4) || out.len % ws || width < 0 || width > 24 || width >= 8 * ws || cols < 1 ||
        word0 < 0 || pos0 < 0 || n < 1 || word0 > words || pos0 > words - word0 || n > words - word0 - pos0 ||
        tables.len % (RANS_M * 4) || K < 1 || K > MAX_CLASSES || bases.len != 2 * n_lines || escapes.len % 2 ||
        bit0 < 0 || bit0 > (Py_ssize_t)raw.len * 8 || (width && ((Py_ssize_t)raw.len * 8 - bit0) / width < n) ||
        (by_cols ? n_lines != cols : (pos0 + n - 1) / cols >= n_lines)) {
        err = "rans_decode: inconsistent sizes";
        goto done;
    }
    const uint8_t *c8 = (const uint8_t *)cls.buf, *b8 = (const uint8_t *)bases.buf;
    const Py_ssize_t y0 = pos0 / cols, y1 = (pos0 + n - 1) / cols;
    const Py_ssize_t l0 = by_cols ? 0 : y0, l1 = by_cols ? n_lines - 1 : y1; /* the lines this chunk touches */
    if (!(tbv = malloc(sizeof *tbv * (size_t)(l1 - l0 + 1))) || !(bv = malloc(sizeof *bv * (size_t)(l1 - l0 + 1)))) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = l0; j <= l1; j++) {
        if (c8[j] >= K) { err = "a line class is >= the piece's class count"; goto done; }
        tbv[j - l0] = (const uint32_t *)tables.buf + (Py_ssize_t)c8[j] * RANS_M;
        bv[j - l0] = b8[2 * j] | (uint32_t)b8[2 * j + 1] << 8;
    }
    if (stream.len < 4 * RANS_STATES || stream.len % 2) {
        err = "a rANS chunk is shorter than its states or odd";
        goto done;
    }
    Rans d = {(const uint8_t *)stream.buf + 4 * RANS_STATES, (const uint8_t *)stream.buf + stream.len,
              (const uint8_t *)raw.buf + bit0 / 8, (const uint8_t *)raw.buf + raw.len, 0, 0, width, ws,
              (1u << width) - 1, (uint32_t)((1ull << (8 * ws - width)) - 1), (const uint8_t *)escapes.buf, 0,
              escapes.len / 2, 0};
    uint32_t x[RANS_STATES];
    for (int i = 0; i < RANS_STATES; i++) {
        const uint8_t *q = (const uint8_t *)stream.buf + 4 * i;
        x[i] = q[0] | q[1] << 8 | q[2] << 16 | (uint32_t)q[3] << 24;
    }
    uint16_t *o2 = (uint16_t *)out.buf + word0 + pos0;
    uint32_t *o4 = (uint32_t *)out.buf + word0 + pos0;
    Py_BEGIN_ALLOW_THREADS
    if (width && (bit0 & 7)) { raw_refill(&d); d.bb >>= bit0 & 7; d.nb -= (int)(bit0 & 7); }
    if (ws == 2 && !by_cols) rans_chunk(&d, x, tbv, bv, o2, o4, n, cols, y0, pos0, l0, 2, 0);
    else if (ws == 2) rans_chunk(&d, x, tbv, bv, o2, o4, n, cols, y0, pos0, l0, 2, 1);
    else if (!by_cols) rans_chunk(&d, x, tbv, bv, o2, o4, n, cols, y0, pos0, l0, 4, 0);
    else rans_chunk(&d, x, tbv, bv, o2, o4, n, cols, y0, pos0, l0, 4, 1);
    if (!d.bad && d.p != d.end) d.bad = 4;
    for (int i = 0; i < RANS_STATES && !d.bad; i++)
        if (x[i] != RANS_L) d.bad = 4;
    Py_END_ALLOW_THREADS
    if (d.bad == 1) err = "a rANS chunk ends early";
    else if (d.bad == 2) err = "the escape stream is too short";
    else if (d.bad == 3) err = "an escaped top value does not fit the word";
    else if (d.bad == 4) err = "a rANS chunk does not end in its final states (corrupt data)";
    else if (d.ei != d.n_esc) err = "a chunk used fewer escapes than it declares";
done:
    free(tbv);
    free(bv);
    PyBuffer_Release(&out); PyBuffer_Release(&cls); PyBuffer_Release(&bases); PyBuffer_Release(&tables);
    PyBuffer_Release(&stream); PyBuffer_Release(&escapes); PyBuffer_Release(&raw);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* triangle(out, offset, ld, k, lower, tri)
 *
 * Fills the k x k block of words at word `offset` of `out` (rows `ld` words apart; the word size is tri's item
 * size, 2 or 4) from its packed triangle `tri` (k (k + 1) / 2 words, row by row): lower -> row i holds tri's next
 * i + 1 words then zeros; upper -> row i holds i zeros then tri's next k - i words. An `exact` carrier's block.
 */
static PyObject *triangle(PyObject *self, PyObject *args) {
    Py_buffer out, tri;
    Py_ssize_t offset, ld, k;
    int lower;
    if (!PyArg_ParseTuple(args, "w*nnniy*", &out, &offset, &ld, &k, &lower, &tri)) return NULL;
    const char *err = NULL;
    const Py_ssize_t cells = k * (k + 1) / 2, ws = cells ? tri.len / cells : 2;
    if (k < 0 || ld < k || offset < 0 || (ws != 2 && ws != 4) || tri.len != cells * ws || out.len % ws ||
        (k && (k - 1) > (out.len / ws - offset - k) / ld) || offset > out.len / ws) {
        err = "triangle: inconsistent sizes";
    } else {
        uint8_t *o = (uint8_t *)out.buf + offset * ws;
        const uint8_t *t = (const uint8_t *)tri.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < k; i++, o += ld * ws) {
            const Py_ssize_t zeros = lower ? k - i - 1 : i, m = k - zeros; /* m words from tri in this row */
            memcpy(lower ? o : o + zeros * ws, t, (size_t)(m * ws));
            memset(lower ? o + m * ws : o, 0, (size_t)(zeros * ws));
            t += m * ws;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&out); PyBuffer_Release(&tri);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}


/* tied_restore(out, e, c, nibbles, escapes, rest, rows, n, kind): `exact`'s tied head (SPEC.md 12.6). Row r of
 * out (n + m words): word j < n is the prediction word(f32(e[r, j]) * c[j]) (a float32 product, then the word
 * dtype, both to nearest even) corrected by its residual z: the residuals, row-major, are nibbles (low nibble first),
 * 15 meaning "the next word of `escapes`"; the difference of the words' value-order keys is z unzigzagged. Words
 * n.. are rest[r]. kind: 0 bfloat16, 1 float16, 2 float32. In place: rest may lie in out at word V*n on (row r is
 * written only after rest's row r - 1 has been read, and below its row r: SPEC 12.6's informative note). */
static inline uint16_t f32_to_f16(uint32_t x) {
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0)); /* inf (nan) */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);             /* >= 65520: rounds to inf */
    if (a >= 0x38800000u) {                                               /* normal: rebias, round 13 bits */
        const uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign;                           /* <= 2^-25: rounds to zero */
    const uint32_t e = a >> 23, mant = (a & 0x7FFFFFu) | 0x800000u, s = 126 - e; /* subnormal: mant >> s */
    uint32_t q = mant >> s;
    const uint32_t rem = mant & ((1u << s) - 1), half = 1u << (s - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    uint32_t b;
    if (e == 0) {
        if (!m) b = sign;
        else { /* subnormal: normalise */
            int sh = 0;
            uint32_t mm = m;
            while (!(mm & 0x400u)) { mm <<= 1; sh++; }
            b = sign | ((uint32_t)(113 - sh) << 23) | ((mm & 0x3FFu) << 13);
        }
    } else if (e == 31) b = sign | 0x7F800000u | (m << 13);
    else b = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t tied_pred16(uint16_t ew, float c, int kind) {
    float x, p;
    uint32_t b;
    if (kind == 0) {
        b = (uint32_t)ew << 16;
        memcpy(&x, &b, 4);
        p = x * c;
        memcpy(&b, &p, 4);
        return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    }
    p = f16_to_f32(ew) * c;
    memcpy(&b, &p, 4);
    return f32_to_f16(b);
}

/* branch-free: the signs are random, a branch on them mispredicts half the time */
static inline uint16_t tied_apply16(uint16_t w, uint16_t z) {
    const uint16_t key = w ^ (uint16_t)((uint16_t)((int16_t)w >> 15) | 0x8000u);
    const uint16_t k = (uint16_t)(key + (uint16_t)((z >> 1) ^ (uint16_t)(0u - (z & 1u))));
    return k ^ (uint16_t)((uint16_t)~(uint16_t)((int16_t)k >> 15) | 0x8000u);
}

static inline uint32_t tied_apply32(uint32_t w, uint32_t z) {
    const uint32_t key = w ^ ((uint32_t)((int32_t)w >> 31) | 0x80000000u);
    const uint32_t k = key + ((z >> 1) ^ (0u - (z & 1u)));
    return k ^ (~(uint32_t)((int32_t)k >> 31) | 0x80000000u);
}

/* The residuals being read: nibbles from index g on, escapes from e on. */
typedef struct {
    const uint8_t *nib, *esc;
    Py_ssize_t g, e, n_esc;
    int ws, bad;
} Resid;

static inline uint32_t resid_next(Resid *r) {
    const uint32_t v = (r->nib[r->g >> 1] >> (4 * (r->g & 1))) & 15u;
    r->g++;
    if (v != 15) return v;
    if (r->e >= r->n_esc) { r->bad |= 2; return 0; }
    const uint8_t *p = r->esc + r->e++ * r->ws;
    return r->ws == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 8
                      : (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int tied_avx2_ok = 0;
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_TIED_AVX2 1
/* One row with AVX2 + F16C, 8 words at a time from an even nibble index (the same IEEE conversions, to nearest
 * even, as the scalar path); a group with an escape is finished word by word. Returns the non-finite flag. */
/* expand16[m]: the pshufb control that puts 16-bit value i of a vector into the lane of the i-th set bit of m. */
static uint8_t expand16[256][16];

static void expand16_init(void) {
    for (int m = 0; m < 256; m++) {
        int i = 0;
        for (int lane = 0; lane < 8; lane++) {
            if (m >> lane & 1) {
                expand16[m][2 * lane] = (uint8_t)(2 * i);
                expand16[m][2 * lane + 1] = (uint8_t)(2 * i + 1);
                i++;
            } else {
                expand16[m][2 * lane] = expand16[m][2 * lane + 1] = 0x80; /* zero (blended away) */
            }
        }
    }
}

__attribute__((target("avx2,f16c"))) static uint32_t tied_row16_avx2(uint16_t *o, const uint16_t *e, const float *c,
                                                                      Py_ssize_t n, int kind, Resid *rs,
                                                                      Py_ssize_t nib_len) {
    const __m128i top = _mm_set1_epi16((short)0x8000), one = _mm_set1_epi16(1), ones = _mm_set1_epi16(-1);
    const __m128i fifteen = _mm_set1_epi16(15), expm = _mm_set1_epi16(kind == 0 ? 0x7F80 : 0x7C00);
    const uint32_t mask = kind == 0 ? 0x7F80u : 0x7C00u;
    __m128i nonfinite = _mm_setzero_si128();
    uint32_t bad = 0;
    Py_ssize_t j = 0;
    if ((rs->g & 1) && n) {
        bad |= (e[0] & mask) == mask;
        o[0] = tied_apply16(tied_pred16(e[0], c[0], kind), (uint16_t)resid_next(rs));
        j = 1;
    }
    /* branch-free over the escapes (a quarter of the groups have one, at random): every group loads the next 8
     * escape words and spreads as many as it has escape nibbles into their lanes; the last groups, where fewer
     * than 8 escape words are left, go word by word */
    const uint8_t *nib = rs->nib, *esc = rs->esc;
    Py_ssize_t g = rs->g, ei = rs->e;
    const Py_ssize_t n_esc = rs->n_esc;
    const __m256i top16 = _mm256_set1_epi16((short)0x8000), one16 = _mm256_set1_epi16(1);
    const __m256i expm16 = _mm256_set1_epi16(kind == 0 ? 0x7F80 : 0x7C00);
    __m256i nonfinite16 = _mm256_setzero_si256();
    for (; j + 16 <= n && (g >> 1) + 8 <= nib_len && ei + 16 <= n_esc; j += 16, g += 16) { /* 16 words a step */
        const __m256i ew = _mm256_loadu_si256((const __m256i *)(e + j));
        nonfinite16 = _mm256_or_si256(nonfinite16, _mm256_cmpeq_epi16(_mm256_and_si256(ew, expm16), expm16));
        const __m128i e0 = _mm256_castsi256_si128(ew), e1 = _mm256_extracti128_si256(ew, 1);
        const __m256 c0 = _mm256_loadu_ps(c + j), c1 = _mm256_loadu_ps(c + j + 8);
        __m256i w;
        if (kind == 0) {
            const __m256i rnd = _mm256_set1_epi32(0x7FFF), lsb = _mm256_set1_epi32(1);
            const __m256i b0 = _mm256_castps_si256(_mm256_mul_ps(
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(e0), 16)), c0));
            const __m256i b1 = _mm256_castps_si256(_mm256_mul_ps(
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(e1), 16)), c1));
            const __m256i r0 = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b0, rnd),
                                                                  _mm256_and_si256(_mm256_srli_epi32(b0, 16), lsb)), 16);
            const __m256i r1 = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b1, rnd),
                                                                  _mm256_and_si256(_mm256_srli_epi32(b1, 16), lsb)), 16);
            w = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8); /* (packus works per 128-bit lane) */
        } else {
            const int rd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            w = _mm256_set_m128i(_mm256_cvtps_ph(_mm256_mul_ps(_mm256_cvtph_ps(e1), c1), rd),
                                 _mm256_cvtps_ph(_mm256_mul_ps(_mm256_cvtph_ps(e0), c0), rd));
        }
        const __m128i v = _mm_loadl_epi64((const __m128i *)(nib + (g >> 1))), m4 = _mm_set1_epi8(15);
        __m256i zw = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4)));
        const __m256i is_esc = _mm256_cmpeq_epi16(zw, _mm256_set1_epi16(15));
        const unsigned em = (unsigned)_mm_movemask_epi8(_mm_packs_epi16(_mm256_castsi256_si128(is_esc),
                                                                        _mm256_extracti128_si256(is_esc, 1)));
        const __m128i x0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(esc + ei * 2)),
                                            _mm_loadu_si128((const __m128i *)expand16[em & 0xFF]));
        ei += __builtin_popcount(em & 0xFF);
        const __m128i x1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(esc + ei * 2)),
                                            _mm_loadu_si128((const __m128i *)expand16[em >> 8]));
        ei += __builtin_popcount(em >> 8);
        zw = _mm256_blendv_epi8(zw, _mm256_set_m128i(x1, x0), is_esc);
        const __m256i key = _mm256_xor_si256(w, _mm256_or_si256(_mm256_srai_epi16(w, 15), top16));
        const __m256i d = _mm256_xor_si256(_mm256_srli_epi16(zw, 1),
                                           _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_and_si256(zw, one16)));
        const __m256i k = _mm256_add_epi16(key, d);
        _mm256_storeu_si256((__m256i *)(o + j),
                            _mm256_xor_si256(k, _mm256_or_si256(_mm256_xor_si256(_mm256_srai_epi16(k, 15),
                                                                                 _mm256_set1_epi16(-1)), top16)));
    }
    bad |= !_mm256_testz_si256(nonfinite16, nonfinite16);
    for (; j + 8 <= n && (g >> 1) + 4 <= nib_len && ei + 8 <= n_esc; j += 8, g += 8) {
        const __m128i ew = _mm_loadu_si128((const __m128i *)(e + j));
        nonfinite = _mm_or_si128(nonfinite, _mm_cmpeq_epi16(_mm_and_si128(ew, expm), expm));
        const __m256 cf = _mm256_loadu_ps(c + j);
        __m128i w;
        if (kind == 0) {
            const __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(ew), 16));
            const __m256i b = _mm256_castps_si256(_mm256_mul_ps(x, cf));
            const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)),
                                                _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1))), 16);
            w = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        } else {
            w = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_cvtph_ps(ew), cf), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        uint32_t four;
        memcpy(&four, nib + (g >> 1), 4);
        const __m128i x4 = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)four));
        __m128i zw = _mm_or_si128(_mm_and_si128(x4, _mm_set1_epi32(15)), _mm_slli_epi32(_mm_srli_epi32(x4, 4), 16));
        const __m128i is_esc = _mm_cmpeq_epi16(zw, fifteen);
        const int em = _mm_movemask_epi8(_mm_packs_epi16(is_esc, _mm_setzero_si128())) & 0xFF; /* a bit per word */
        const __m128i ev = _mm_loadu_si128((const __m128i *)(esc + ei * 2));
        zw = _mm_blendv_epi8(zw, _mm_shuffle_epi8(ev, _mm_loadu_si128((const __m128i *)expand16[em])), is_esc);
        ei += __builtin_popcount((unsigned)em);
        const __m128i key = _mm_xor_si128(w, _mm_or_si128(_mm_srai_epi16(w, 15), top));
        const __m128i d = _mm_xor_si128(_mm_srli_epi16(zw, 1), _mm_sub_epi16(_mm_setzero_si128(), _mm_and_si128(zw, one)));
        const __m128i k = _mm_add_epi16(key, d);
        _mm_storeu_si128((__m128i *)(o + j), _mm_xor_si128(k, _mm_or_si128(_mm_xor_si128(_mm_srai_epi16(k, 15), ones), top)));
    }
    rs->g = g;
    rs->e = ei;
    bad |= _mm_movemask_epi8(nonfinite) != 0;
    for (; j < n; j++) {
        bad |= (e[j] & mask) == mask;
        o[j] = tied_apply16(tied_pred16(e[j], c[j], kind), (uint16_t)resid_next(rs));
    }
    return bad;
}
#endif

static PyObject *tied_restore(PyObject *self, PyObject *args) {
    Py_buffer out, e, c, nb, eb, rest;
    Py_ssize_t rows, n;
    int kind;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*nni", &out, &e, &c, &nb, &eb, &rest, &rows, &n, &kind)) return NULL;
    const char *err = NULL;
    const Py_ssize_t ws = kind == 2 ? 4 : 2;
    if (kind < 0 || kind > 2 || rows < 0 || n < 0 || c.len != n * 4 || (rows && n > e.len / ws / rows) ||
        e.len != rows * n * ws || nb.len != (rows * n + 1) / 2 || eb.len % ws ||
        (rows && out.len % (rows * ws)) || (rows && out.len / (rows * ws) < n) ||
        (rows && rest.len != rows * (out.len / (rows * ws) - n) * ws) || (!rows && (out.len || rest.len))) {
        err = "tied_restore: inconsistent sizes";
    } else if (rows) {
        const Py_ssize_t ld = out.len / (rows * ws), m = ld - n;
        const float *cf = (const float *)c.buf;
        Resid rs = {(const uint8_t *)nb.buf, (const uint8_t *)eb.buf, 0, 0, eb.len / ws, (int)ws, 0};
        uint32_t nonfinite = 0; /* a non-finite embedding word (a valid file has none: SPEC 12.2) */
        const uint32_t mask = kind == 0 ? 0x7F80u : kind == 1 ? 0x7C00u : 0x7F800000u;
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_TIED_AVX2
        const unsigned csr = _mm_getcsr();
        _mm_setcsr(csr & ~0x8040u); /* IEEE products: no flush-to-zero, no denormals-are-zero (SPEC 12.6) */
#endif
        for (Py_ssize_t r = 0; r < rows; r++) {
            if (ws == 2) {
                const uint16_t *er = (const uint16_t *)e.buf + r * n;
                uint16_t *o = (uint16_t *)out.buf + r * ld;
#ifdef HAVE_TIED_AVX2
                if (tied_avx2_ok) nonfinite |= tied_row16_avx2(o, er, cf, n, kind, &rs, nb.len);
                else
#endif
                for (Py_ssize_t j = 0; j < n; j++) {
                    nonfinite |= (er[j] & mask) == mask;
                    o[j] = tied_apply16(tied_pred16(er[j], cf[j], kind), (uint16_t)resid_next(&rs));
                }
                memmove(o + n, (const uint16_t *)rest.buf + r * m, (size_t)(m * 2)); /* (may overlap: in place) */
            } else {
                const uint32_t *er = (const uint32_t *)e.buf + r * n;
                uint32_t *o = (uint32_t *)out.buf + r * ld;
                for (Py_ssize_t j = 0; j < n; j++) {
                    float x, p;
                    uint32_t w;
                    nonfinite |= (er[j] & mask) == mask;
                    memcpy(&x, er + j, 4);
                    p = x * cf[j];
                    memcpy(&w, &p, 4);
                    o[j] = tied_apply32(w, resid_next(&rs));
                }
                memmove(o + n, (const uint32_t *)rest.buf + r * m, (size_t)(m * 4));
            }
        }
#ifdef HAVE_TIED_AVX2
        _mm_setcsr(csr);
#endif
        Py_END_ALLOW_THREADS
        if (nonfinite) err = "tied_restore: the embeddings hold a non-finite word";
        else if (rs.bad || rs.e != rs.n_esc) err = "tied_restore: the residuals' escapes do not match their nibbles";
        else if (((rows * n) & 1) && (((const uint8_t *)nb.buf)[nb.len - 1] >> 4)) err = "tied_restore: the last nibble byte's padding is not 0";
    }
    PyBuffer_Release(&out); PyBuffer_Release(&e); PyBuffer_Release(&c); PyBuffer_Release(&nb);
    PyBuffer_Release(&eb); PyBuffer_Release(&rest);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
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

/* Folding constants: a 128-bit lane folds forward by D bits with (x^(D+32) mod P, x^(D-32) mod P), each
 * bit-reflected and shifted left by one (low qword, high qword). K(D) lists them for D = 128 .. 2048. */
#define K128 0x1751997d0LL, 0x0ccaa009eLL
#define K256 0x0f1da05aaLL, 0x15a546366LL
#define K384 0x03db1ecdcLL, 0x174359406LL
#define K512 0x154442bd4LL, 0x1c6e41596LL
#define K2048 0x11542778aLL, 0x1322d1430LL
#define PAIR(lo, hi) _mm_set_epi64x(hi, lo)
#define KPAIR(k) PAIR(k)

/* Fold the remaining n bytes (a multiple of 16) into x1, 16 at a time, then reduce 128 bits to the CRC. */
__attribute__((target("pclmul,sse2"))) static uint32_t crc_finish(__m128i x1, const uint8_t *p, size_t n) {
    const __m128i k3k4 = KPAIR(K128);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    for (; n >= 16; p += 16, n -= 16)
        x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x00), _mm_clmulepi64_si128(x1, k3k4, 0x11)),
                           _mm_loadu_si128((const __m128i *)p));
    /* 128 -> 64 bits, then 64 -> 32, then Barrett reduction */
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(k3k4, x1, 0x01), _mm_srli_si128(x1, 8));
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00), _mm_srli_si128(x1, 4));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, mask32), poly, 0x00);
    x1 = _mm_xor_si128(x1, t);
    return (uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(x1, 4));
}

/* n >= 64 and a multiple of 16: four 128-bit lanes, 64 bytes per step */
__attribute__((target("pclmul,sse2"))) static uint32_t crc_clmul(uint32_t c, const uint8_t *p, size_t n) {
    const __m128i k1k2 = KPAIR(K512), k3k4 = KPAIR(K128);
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
#undef FOLD
    return crc_finish(x1, p, n);
}

/* n >= 64 and a multiple of 16: the four lanes of crc_clmul in two 256-bit registers (VPCLMULQDQ with AVX2, e.g.
 * AMD Zen 3: twice the 128-bit loop's bytes per carry-less multiply, 12.7 -> ~25 GB/s) */
__attribute__((target("avx2,vpclmulqdq,pclmul,sse2")))
static uint32_t crc_vclmul256(uint32_t c, const uint8_t *p, size_t n) {
    const __m256i k512 = _mm256_broadcastsi128_si256(KPAIR(K512));
    __m256i x1 = _mm256_loadu_si256((const __m256i *)p), x2 = _mm256_loadu_si256((const __m256i *)(p + 32));
    x1 = _mm256_xor_si256(x1, _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)c)));
    p += 64;
    n -= 64;
#define FOLD(x, k, next) x = _mm256_xor_si256(_mm256_xor_si256(_mm256_clmulepi64_epi128(x, k, 0x00), \
                                                               _mm256_clmulepi64_epi128(x, k, 0x11)), next)
    while (n >= 64) {
        FOLD(x1, k512, _mm256_loadu_si256((const __m256i *)p));
        FOLD(x2, k512, _mm256_loadu_si256((const __m256i *)(p + 32)));
        p += 64;
        n -= 64;
    }
#undef FOLD
    /* lanes 0..3 (x1 low, x1 high, x2 low, x2 high) -> one, as crc_clmul ends */
    const __m128i k3k4 = KPAIR(K128);
#define FOLD128(x, next) x = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k3k4, 0x00), \
                                                         _mm_clmulepi64_si128(x, k3k4, 0x11)), next)
    __m128i l = _mm256_castsi256_si128(x1);
    FOLD128(l, _mm256_extracti128_si256(x1, 1));
    FOLD128(l, _mm256_castsi256_si128(x2));
    FOLD128(l, _mm256_extracti128_si256(x2, 1));
#undef FOLD128
    return crc_finish(l, p, n);
}

/* n >= 256 and a multiple of 16: sixteen 128-bit lanes in four 512-bit registers, 256 bytes per step (VPCLMULQDQ,
 * where the CPU has it: ~3x the 128-bit loop) */
__attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse2")))
static uint32_t crc_vclmul(uint32_t c, const uint8_t *p, size_t n) {
    const __m512i k2048 = _mm512_broadcast_i32x4(KPAIR(K2048)), k512 = _mm512_broadcast_i32x4(KPAIR(K512));
    __m512i x1 = _mm512_loadu_si512(p), x2 = _mm512_loadu_si512(p + 64);
    __m512i x3 = _mm512_loadu_si512(p + 128), x4 = _mm512_loadu_si512(p + 192);
    x1 = _mm512_xor_si512(x1, _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)c)));
    p += 256;
    n -= 256;
#define FOLD(x, k, next) x = _mm512_xor_si512(_mm512_xor_si512(_mm512_clmulepi64_epi128(x, k, 0x00), \
                                                               _mm512_clmulepi64_epi128(x, k, 0x11)), next)
    while (n >= 256) {
        FOLD(x1, k2048, _mm512_loadu_si512(p));
        FOLD(x2, k2048, _mm512_loadu_si512(p + 64));
        FOLD(x3, k2048, _mm512_loadu_si512(p + 128));
        FOLD(x4, k2048, _mm512_loadu_si512(p + 192));
        p += 256;
        n -= 256;
    }
    FOLD(x1, k512, x2);
    FOLD(x1, k512, x3);
    FOLD(x1, k512, x4);
#undef FOLD
    /* the four lanes of x1 -> one: lane i folds forward by 128 (3 - i) bits onto lane 3 */
#define FOLD128(x, k) _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11))
    __m128i l = _mm512_extracti32x4_epi32(x1, 3);
    l = _mm_xor_si128(l, FOLD128(_mm512_extracti32x4_epi32(x1, 0), KPAIR(K384)));
    l = _mm_xor_si128(l, FOLD128(_mm512_extracti32x4_epi32(x1, 1), KPAIR(K256)));
    l = _mm_xor_si128(l, FOLD128(_mm512_extracti32x4_epi32(x1, 2), KPAIR(K128)));
#undef FOLD128
    return crc_finish(l, p, n);
}
#endif

static int clmul_ok = 0, vclmul_ok = 0, vclmul256_ok = 0;

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
        c = vclmul_ok && bulk >= 256 ? crc_vclmul(c, p, bulk)
            : vclmul256_ok ? crc_vclmul256(c, p, bulk) : crc_clmul(c, p, bulk);
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
    {"decode", decode, METH_VARARGS, "A piece's symbol streams + bases + escapes + the low byte planes -> its words."},
    {"rans_table", rans_table, METH_VARARGS, "Method-2 decode tables from frequency tables."},
    {"rans_encode", rans_encode, METH_VARARGS, "Method-2 rANS: symbols + their classes -> one chunk."},
    {"rans_decode", rans_decode, METH_VARARGS, "Method-2 rANS: one chunk -> its words."},
    {"pack_bits", pack_bits, METH_VARARGS, "The low bits of each word, bit-packed LSB first."},
    {"triangle", triangle, METH_VARARGS, "A packed triangle -> its k x k block of words, zeros included."},
    {"tied_restore", tied_restore, METH_VARARGS, "exact's tied head: predicted + residual words -> its words."},
    {"crc32", crc32, METH_VARARGS, "zlib.crc32(data, value), with carry-less multiplies where the CPU has them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "bbformat's compiled inner loops.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    crc_init();
#ifdef HAVE_TIED_AVX2
    __builtin_cpu_init();
    expand16_init();
    decode_avx2_ok = __builtin_cpu_supports("avx2") && !getenv("BBF_NO_AVX2");
    tied_avx2_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                   !getenv("BBF_NO_AVX2"); /* (the tests compare both paths) */
#endif
#ifdef HAVE_CLMUL_PATH
    __builtin_cpu_init();
    clmul_ok = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
    vclmul_ok = clmul_ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                __builtin_cpu_supports("vpclmulqdq");
    vclmul256_ok = clmul_ok && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq") &&
                   !getenv("BBF_NO_AVX2");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "CLMUL", clmul_ok) < 0 || PyModule_AddIntConstant(m, "VCLMUL", vclmul_ok) < 0 ||
              PyModule_AddIntConstant(m, "VCLMUL256", vclmul256_ok) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

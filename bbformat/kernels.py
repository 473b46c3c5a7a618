"""Inner loops with a compiled version (bbformat/_kernels.c, built by `pip install`) and a reference one here.

- `decode`: the entropy stage's inner loop, a piece's symbol streams + the low planes -> words (numpy reference below).
- `triangle`: an `exact` carrier's packed triangle -> its k x k block, zeros included.
- `rans_table`, `rans_encode`, `rans_decode`, `pack_bits`: entropy method 2's static rANS (SPEC.md 13.8). Its
  Python reference loops per word: correct, but only for small inputs (writers use method 2 only when compiled).
- `crc32`: zlib.crc32, folded with carry-less multiplies where the CPU has them (~4x faster).
- `tied_predict`, `tied_residuals`, `tied_pack`, `tied_restore`: `exact`'s tied head (SPEC.md 12.6): predicted
  words, the residuals that make them exact, their nibbles and escapes, and the decoder's fused loop.

The compiled module is used when it is importable, else the numpy/zlib versions (same results, slower). Both raise
ValueError on inconsistent input; the tests check that they agree. Set BBF_NO_C_KERNELS=1 to force the reference.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

ESCAPE = 15  # nibble value: the word's top byte is in the escape stream


def decode_numpy(out, planes, offset: int, rows: int, cols: int, by_cols: bool, classes, bases, shift: int,
                 nibbles: bool, streams, escapes, mantissa=None) -> None:
    """Write the words of one piece (rows x cols words from word `offset` of `out`): `streams[c]` holds the
    residuals of class c, `escapes[c]` its escaped top bytes; `mantissa`: None, or float16's split mantissa bits (3
    bit-planes). See `decode` in _kernels.c for the arguments."""
    ws = len(planes) + 1
    wd = {2: np.uint16, 4: np.uint32}.get(ws)
    o = np.frombuffer(out, np.uint8) if not isinstance(out, np.ndarray) else out.reshape(-1).view(np.uint8)
    cls, b = np.frombuffer(classes, np.uint8), np.frombuffer(bases, np.uint8)
    n_lines = cols if by_cols else rows
    if wd is None:
        raise ValueError("need 1 or 3 low planes (word size 2 or 4)")
    if not 1 <= len(streams) <= 16 or len(escapes) != len(streams):
        raise ValueError("need 1 to 16 streams, and one escape buffer per stream")
    if o.size % ws or min(offset, rows, cols) < 0 or offset + rows * cols > o.size // ws \
            or cls.size != n_lines or b.size != n_lines or not 0 <= shift <= 7:
        raise ValueError("decode: inconsistent sizes")
    if cls.size and cls.max() >= len(streams):
        raise ValueError("a line class is >= the piece's class count")
    if by_cols and (cls[1:] < cls[:-1]).any():
        raise ValueError("the column classes of a piece decrease")
    lo = [np.frombuffer(p, np.uint8) for p in planes]
    if any(p.size != o.size // ws for p in lo):
        raise ValueError("a byte plane does not match the section length")
    m3 = None
    if mantissa is not None:
        if len(mantissa) != 3 or ws != 2 or not nibbles or shift:
            raise ValueError("split mantissa bits need 3 bit-planes, word size 2, nibbles and shift 0")
        bits = [np.frombuffer(m, np.uint8) for m in mantissa]
        if any(b.size != (o.size // ws + 7) // 8 for b in bits):
            raise ValueError("a mantissa bit-plane does not match the section length")
        m3 = sum(np.unpackbits(b, bitorder="little")[:o.size // ws] << np.uint8(j) for j, b in enumerate(bits))
    o = o.view(wd)
    grid = np.arange(rows * cols).reshape(rows, cols)
    for k, (stream, escs) in enumerate(zip(streams, escapes)):
        lines = np.flatnonzero(cls == k)
        m = lines.size * (rows if by_cols else cols)
        s = np.frombuffer(stream, np.uint8)
        if s.size != ((m + 1) // 2 if nibbles else m):
            raise ValueError("a symbol stream's length does not match its lines")
        if nibbles:
            r = np.empty(2 * s.size, np.uint8)
            r[0::2], r[1::2] = s & 15, s >> 4
            r = r[:m]
        else:
            r = s
        shifted = b[lines] << np.uint8(shift)
        if by_cols:  # row by row across the class's columns
            r = r.reshape(rows, lines.size)
            t = r + shifted[None, :]
        else:
            r = r.reshape(lines.size, cols)
            t = r + shifted[:, None]
        esc = np.frombuffer(escs, np.uint8)
        where = np.flatnonzero(r.reshape(-1) == ESCAPE) if nibbles else np.zeros(0, np.int64)
        if where.size > esc.size:
            raise ValueError("the escape stream is too short")
        if where.size != esc.size:
            raise ValueError(f"class {k} used {where.size} escapes, the header declares {esc.size}")
        t.reshape(-1)[where] = esc
        idx = (grid[:, lines] if by_cols else grid[lines]).reshape(-1) + offset
        if m3 is not None:  # split exponents: the top byte is (exponent << 3 | the word's 3 mantissa bits)
            t = (t.reshape(-1) << np.uint8(3)) | m3[idx]
        w = t.astype(wd) << wd(8 * ws - 8)
        for j, p in enumerate(lo):
            w |= p[idx].reshape(w.shape).astype(wd) << wd(8 * j)
        o[idx] = ((w >> wd(1)) | (w << wd(8 * ws - 1))).reshape(-1)


def triangle_numpy(out, offset: int, ld: int, k: int, lower: bool, tri) -> None:
    """Fill the k x k block at word `offset` of `out` (rows `ld` words apart) from its packed triangle (row by row):
    the lower triangle (diagonal included) when `lower`, else the upper one; the rest of the block is zeros."""
    cells = k * (k + 1) // 2
    t = np.frombuffer(tri, np.uint8)
    ws = t.size // cells if cells else 2
    o = np.frombuffer(out, np.uint8) if not isinstance(out, np.ndarray) else out.reshape(-1).view(np.uint8)
    if k < 0 or ld < k or offset < 0 or ws not in (2, 4) or t.size != cells * ws or o.size % ws \
            or (k and offset + (k - 1) * ld + k > o.size // ws):
        raise ValueError("triangle: inconsistent sizes")
    wd = {2: np.uint16, 4: np.uint32}[ws]
    if k == 0:
        return
    block = o.view(wd)[offset:offset + (k - 1) * ld + k]
    block = np.lib.stride_tricks.as_strided(block, (k, k), (ld * ws, ws), writeable=True)
    block[...] = 0
    block[np.tril_indices(k) if lower else np.triu_indices(k)] = t.view(wd)


# Entropy method 2 (SPEC.md 13.8): static rANS, 4 interleaved 32-bit states, 12-bit frequencies, 16-bit words.
RANS_L, RANS_BITS, RANS_SYMS, RANS_ESCAPE, RANS_STATES = 1 << 16, 12, 256, 255, 4
RANS_M = 1 << RANS_BITS


def _freq_tables(freqs) -> np.ndarray:
    f = np.frombuffer(freqs, "<u2")
    if f.size % RANS_SYMS or not 1 <= f.size // RANS_SYMS <= 16:
        raise ValueError("rans_table: need 1 to 16 tables of 256 u16 frequencies")
    f = f.reshape(-1, RANS_SYMS).astype(np.int64)
    if (f.sum(1) != RANS_M).any():
        raise ValueError("a frequency table does not sum to 4096")
    return f


def rans_table_numpy(freqs) -> bytes:
    """K decode tables (K x 4096 u32: symbol | (freq - 1) << 8 | (slot - cum) << 20) from K x 256 u16 frequencies."""
    f = _freq_tables(freqs)
    out = np.empty((f.shape[0], RANS_M), np.uint32)
    for c, fc in enumerate(f):
        sym = np.repeat(np.arange(RANS_SYMS), fc)
        start = np.concatenate([[0], np.cumsum(fc)[:-1]])
        out[c] = sym | (fc[sym] - 1) << 8 | (np.arange(RANS_M) - start[sym]) << 20
    return out.astype("<u4").tobytes()


def rans_encode_py(syms, classes, freqs) -> bytes:
    """Symbol t coded with table classes[t]; the reference for _kernels.rans_encode (slow: small inputs only)."""
    s, c = np.frombuffer(syms, np.uint8), np.frombuffer(classes, np.uint8)
    f = _freq_tables(freqs)
    if c.size != s.size:
        raise ValueError("rans_encode: inconsistent sizes")
    if s.size and (c.max() >= f.shape[0] or (f[c, s] == 0).any()):
        raise ValueError("a symbol has frequency 0 in its class")
    cum = np.concatenate([np.zeros((f.shape[0], 1), np.int64), np.cumsum(f, 1)], 1)
    x, words = [RANS_L] * RANS_STATES, []
    for t in range(s.size - 1, -1, -1):
        i, fs, cs = t % RANS_STATES, int(f[c[t], s[t]]), int(cum[c[t], s[t]])
        if x[i] >= fs << 20:
            words.append(x[i] & 0xFFFF)
            x[i] >>= 16
        x[i] = (x[i] // fs << RANS_BITS) + x[i] % fs + cs
    head = np.array(x, "<u4").tobytes()
    return head + np.array(words[::-1], "<u2").tobytes()


def pack_bits_numpy(values, ws: int, width: int) -> bytes:
    """The low `width` bits (0..24) of each ws-byte word, bit-packed LSB first."""
    v = np.frombuffer(values, {2: "<u2", 4: "<u4"}[ws]).astype(np.uint32)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def rans_decode_py(out, ws, word0, cols, by_cols, pos0, n, classes, bases, tables, stream, escapes, raw, bit0,
                   width) -> None:
    """One chunk of a method-2 piece -> its words; see rans_decode in _kernels.c for the arguments."""
    o = np.frombuffer(out, np.uint8) if not isinstance(out, np.ndarray) else out.reshape(-1).view(np.uint8)
    cls, b = np.frombuffer(classes, np.uint8), np.frombuffer(bases, "<u2")
    tab = np.frombuffer(tables, "<u4")
    esc = np.frombuffer(escapes, "<u2") if memoryview(escapes).nbytes % 2 == 0 else None
    rawb = np.frombuffer(raw, np.uint8)
    words = o.size // ws if ws in (2, 4) else 0
    k = tab.size // RANS_M
    if ws not in (2, 4) or o.size % ws or not 0 <= width <= 24 or width >= 8 * ws or cols < 1 or min(word0, pos0) < 0 \
            or n < 1 or word0 + pos0 + n > words or tab.size % RANS_M or not 1 <= k <= 16 or b.size != cls.size \
            or esc is None or not 0 <= bit0 <= rawb.size * 8 or bit0 + n * width > rawb.size * 8 \
            or (cls.size != cols if by_cols else (pos0 + n - 1) // cols >= cls.size):
        raise ValueError("rans_decode: inconsistent sizes")
    lines = np.arange(pos0, pos0 + n) % cols if by_cols else np.arange(pos0 // cols, (pos0 + n - 1) // cols + 1)
    if (cls[lines] >= k).any():
        raise ValueError("a line class is >= the piece's class count")
    data = bytes(stream)
    if len(data) < 4 * RANS_STATES or len(data) % 2:
        raise ValueError("a rANS chunk is shorter than its states or odd")
    x = list(np.frombuffer(data[:16], "<u4").astype(np.int64))
    w16 = np.frombuffer(data[16:], "<u2").tolist()
    tab, tmask = tab.tolist(), (1 << (8 * ws - width)) - 1
    tops, p, e = np.empty(n, np.uint32), 0, 0
    for t in range(n):
        i = t % RANS_STATES
        pos = pos0 + t
        line = pos % cols if by_cols else pos // cols
        ent = tab[int(cls[line]) * RANS_M + (x[i] & (RANS_M - 1))]
        s = ent & 0xFF
        v = ((ent >> 8 & (RANS_M - 1)) + 1) * (x[i] >> RANS_BITS) + (ent >> 20)
        if v < RANS_L:
            if p >= len(w16):
                raise ValueError("a rANS chunk ends early")
            v = v << 16 | w16[p]
            p += 1
        x[i] = v
        if s == RANS_ESCAPE:
            if e >= esc.size:
                raise ValueError("the escape stream is too short")
            top = int(esc[e])
            e += 1
            if top > tmask:
                raise ValueError("an escaped top value does not fit the word")
        else:
            top = (int(b[line]) + s) & tmask
        tops[t] = top
    if p != len(w16) or any(v != RANS_L for v in x):
        raise ValueError("a rANS chunk does not end in its final states (corrupt data)")
    if e != esc.size:
        raise ValueError("a chunk used fewer escapes than it declares")
    bits = np.unpackbits(rawb, bitorder="little")[bit0:bit0 + n * width].reshape(n, width).astype(np.uint32)
    low = (bits << np.arange(width, dtype=np.uint32)).sum(1, dtype=np.uint32) if width else np.zeros(n, np.uint32)
    nbits = 8 * ws
    wd = {2: np.uint16, 4: np.uint32}[ws]
    w = (tops.astype(np.uint64) << np.uint64(width)) | low
    w = ((w >> np.uint64(1)) | (w << np.uint64(nbits - 1))) & np.uint64((1 << nbits) - 1)
    o.view(wd)[word0 + pos0:word0 + pos0 + n] = w.astype(wd)


# `exact`'s tied head (SPEC.md 12.6): word -> float32 value, exactly; float32 -> word, to nearest even
TIED_KIND = {"bfloat16": 0, "float16": 1, "float32": 2}


def _f32(words: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (words.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return words.view(np.float16).astype(np.float32) if dtype == "float16" else words.view(np.float32)


def _from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # (finite or inf: a product of finite values is never nan)
        b = x.view(np.uint32)
        return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return x.astype(np.float16).view(np.uint16) if dtype == "float16" else x.view(np.uint32)


def tied_predict(e, c, dtype: str) -> np.ndarray:
    """Predicted words: word(f32(e[r, j]) * c[j]), both steps rounded to nearest even; e (rows, n) words, c (n,)
    float32."""
    with np.errstate(over="ignore"):  # overflow predicts inf: still a word the residual corrects
        return _from_f32(_f32(np.asarray(e), dtype) * np.asarray(c, np.float32)[None, :], dtype)


def _key(w: np.ndarray) -> np.ndarray:
    """Sign-magnitude words -> unsigned integers in the order of their values (-0 just below +0)."""
    top = w.dtype.type(1 << (8 * w.itemsize - 1))
    return w ^ np.where(w & top, w.dtype.type(~0 & ((1 << 8 * w.itemsize) - 1)), top)


def _unkey(k: np.ndarray) -> np.ndarray:
    top = k.dtype.type(1 << (8 * k.itemsize - 1))
    return k ^ np.where(k & top, top, k.dtype.type(~0 & ((1 << 8 * k.itemsize) - 1)))


def tied_residuals(w, p) -> np.ndarray:
    """Residual words z with tied_restore(p, z) == w: the key difference mod 2^bits, zigzagged."""
    w, p = np.asarray(w), np.asarray(p)
    bits = 8 * w.itemsize
    d = (_key(w) - _key(p)).view(np.int16 if bits == 16 else np.int32)
    return ((d << 1) ^ (d >> (bits - 1))).view(w.dtype)


def _restore(p: np.ndarray, z: np.ndarray) -> np.ndarray:
    d = (z >> z.dtype.type(1)) ^ (z.dtype.type(0) - (z & z.dtype.type(1)))
    return _unkey(_key(p) + d)


TIED_ESCAPE = 15  # a residual nibble: the residual is the next word of the escapes


def tied_pack(z: np.ndarray) -> tuple[bytes, bytes]:
    """Residual words (any shape, row-major) -> (nibbles, escapes): SPEC 12.6's correction section."""
    z = np.ascontiguousarray(z).reshape(-1)
    nib = np.minimum(z, TIED_ESCAPE).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    esc = z[z >= TIED_ESCAPE]
    return (nib[0::2] | (nib[1::2] << np.uint8(4))).tobytes(), esc.astype(esc.dtype.newbyteorder("<")).tobytes()


def tied_unpack(nibbles, escapes, count: int, ws: int) -> np.ndarray:
    """The inverse of tied_pack: `count` residual words."""
    b = np.frombuffer(nibbles, np.uint8)
    if b.size != (count + 1) // 2 or len(escapes) % ws:
        raise ValueError("tied_restore: inconsistent sizes")
    nib = np.empty(2 * b.size, np.uint8)
    nib[0::2], nib[1::2] = b & 15, b >> 4
    if count % 2 and nib[-1]:
        raise ValueError("tied_restore: the last nibble byte's padding is not 0")
    nib = nib[:count]
    wd = {2: np.uint16, 4: np.uint32}[ws]
    z = nib.astype(wd)
    esc = np.frombuffer(escapes, np.dtype(wd).newbyteorder("<")).astype(wd)
    where = np.flatnonzero(nib == TIED_ESCAPE)
    if where.size != esc.size:
        raise ValueError("tied_restore: the residuals' escapes do not match their nibbles")
    z[where] = esc
    return z


def tied_restore_numpy(out, e, c, nibbles, escapes, rest, dtype: str) -> None:
    """out (rows, n + m) words <- [restored words | rest]: row r's first n words from e[r] (rows, n), the scales c
    (n float32) and the residuals (tied_pack's nibbles and escapes, row-major); its last m from rest[r]."""
    rows, n = e.shape
    m = out.shape[1] - n
    if np.asarray(c).shape != (n,) or rest.shape != (rows, m) or out.shape[0] != rows:
        raise ValueError("tied_restore: inconsistent sizes")
    mask = {"bfloat16": 0x7F80, "float16": 0x7C00, "float32": 0x7F800000}[dtype]
    z = tied_unpack(nibbles, escapes, rows * n, e.itemsize).reshape(rows, n)
    if np.any((e & e.dtype.type(mask)) == mask):
        raise ValueError("tied_restore: the embeddings hold a non-finite word")
    rest = np.array(rest)  # (a copy: in place, rest lies in out's memory)
    out[:, :n] = _restore(tied_predict(e, c, dtype), z)
    out[:, n:] = rest


def crc32_zlib(data, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


try:
    if os.environ.get("BBF_NO_C_KERNELS"):
        raise ImportError("disabled by BBF_NO_C_KERNELS")
    from . import _kernels

    COMPILED = True

    def triangle(out, offset, ld, k, lower, tri) -> None:
        _kernels.triangle(out, offset, ld, k, int(lower), tri)

    def decode(out, planes, offset, rows, cols, by_cols, classes, bases, shift, nibbles, streams, escapes,
               mantissa=None) -> None:
        _kernels.decode(out, planes, offset, rows, cols, int(by_cols), classes, bases, shift, int(nibbles), streams,
                        escapes, mantissa)

    crc32 = _kernels.crc32 if _kernels.CLMUL else crc32_zlib  # zlib's beats a byte table
    rans_table, rans_encode, pack_bits = _kernels.rans_table, _kernels.rans_encode, _kernels.pack_bits

    def rans_decode(out, ws, word0, cols, by_cols, pos0, n, classes, bases, tables, stream, escapes, raw, bit0,
                    width) -> None:
        _kernels.rans_decode(out, ws, word0, cols, bool(by_cols), pos0, n, classes, bases, tables, stream, escapes,
                             raw, bit0, width)

    def tied_restore(out, e, c, nibbles, escapes, rest, dtype: str) -> None:
        rows, n = e.shape
        if np.asarray(c).shape != (n,) or out.ndim != 2 or out.shape[0] != rows \
                or rest.shape != (rows, out.shape[1] - n) or not out.flags.c_contiguous or out.dtype != e.dtype:
            raise ValueError("tied_restore: inconsistent sizes")
        _kernels.tied_restore(out, np.ascontiguousarray(e), np.ascontiguousarray(c, np.float32), nibbles, escapes,
                              np.ascontiguousarray(rest), rows, n, TIED_KIND[dtype])
except ImportError:  # not built (no C compiler at install time): the reference is correct, only slower
    COMPILED = False
    decode, triangle, crc32, tied_restore = decode_numpy, triangle_numpy, crc32_zlib, tied_restore_numpy
    rans_table, rans_encode, pack_bits, rans_decode = rans_table_numpy, rans_encode_py, pack_bits_numpy, \
        rans_decode_py

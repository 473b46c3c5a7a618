"""Entropy method 2 ("words"): one rANS symbol per word, the rest of the word's bits stored as they are.

Normative layout: SPEC.md 13.8. How it models a section of float words:
- A word rotated left by one bit is [exponent | mantissa | sign]. Its *top value* is the exponent and the top
  `mbits` mantissa bits (bfloat16/float32: 8 + 2 bits, float16: 5 + 3 bits); the other `width` bits (the low
  mantissa and the sign, near-random) are bit-packed as they are.
- Pieces and lines as in method 1: a 2-D tensor's rows or columns, each line with its own base (its modal binade
  placed near the top of a 255-value window), so lines of very different scales share one distribution of
  symbols `top - base`. Lines are grouped into up to 16 classes (k-means on their symbol histograms, rows or
  columns alike); each class has its own 12-bit frequency table.
- Why the mantissa bits join the exponent: within a binade the density of a Gaussian-like line falls by up to
  e^-1.5 (at |w| ~ sigma), which byte planes throw away; 2 mantissa bits take most of it (measured on SmolLM2,
  bfloat16: 0.06-0.07 bits per word; a third bit adds < 0.005).
- Why rANS, not zstd's Huffman: on these ~4.6-bit symbols Huffman loses 0.04 bits per word (measured), rANS with
  12-bit tables < 0.01; and a rANS symbol can switch tables per word, so columns need no contiguous ranges.
- Chunks of 2^18 words (each with its own 4 rANS states) decode in parallel, straight into the output words
  (`bbformat/_kernels.c`; the Python reference in `bbformat/kernels.py` is for tests and small inputs only).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import zstandard as zstd

from .. import kernels
from ..errors import BBFError, FormatError
from . import entropy as planes
from .base import Segment

VERSION = 1
CHUNK_LOG2 = 18  # 256 Ki words per rANS chunk: several chunks per large tensor for 2+ cores
MIN_CHUNK_LOG2, MAX_CHUNK_LOG2 = 10, 24
STREAM_CHUNK = 1 << 19  # bytes per zstd chunk of the base, class, frequency and escape streams
ESCAPE = kernels.RANS_ESCAPE  # symbol: the word's top value is in the escape stream
SYMS, PROB_TOTAL = kernels.RANS_SYMS, kernels.RANS_M
MAX_CLASSES = 16
CLASS_CHOICES = (1, 4, 16)  # (2 and 8 as well: no gain on SmolLM2 bf16 at 0.01 %, ~30 % slower to plan)
MIN_LINES_PER_CLASS = 16
HEADROOM_BINADES = 7  # the window's top: binades above the line's modal one (weights rarely exceed 2^6 x mode)
EXP_BITS = {"float16": 5, "bfloat16": 8, "float32": 8}
MANTISSA_BITS = {"float16": 3, "bfloat16": 2, "float32": 2}  # mantissa bits in the top value
MAX_TABLE_BYTES = 2 + 2 + 2 * SYMS  # varints: first, count, 256 frequencies <= 4096
TABLE_SLACK = 4096  # the frequency stream is at most raw_len + this: a reader's allocation stays bounded
_SAMPLE = 2048  # elements per line the plan is estimated from
_TABLE_BITS_PER_SYMBOL = 10  # a frequency table's cost per used symbol (varint after zstd), for planning
_LINE_BITS = 12  # a line's base and class after zstd, for planning
_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def geometry(dtype: str, ws: int) -> tuple[int, int]:
    """(mbits, width): mantissa bits in the top value, raw low bits per word."""
    m = MANTISSA_BITS[dtype]
    return m, 8 * ws - EXP_BITS[dtype] - m


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def low_bits_structured(words: np.ndarray, dtype: str, sample: int = 1 << 16) -> bool:
    """Whether the bits method 2 stores raw (low mantissa + sign) look compressible: zstd shrinks an evenly spaced
    sample of them by 3 % or more (e.g. float32 words holding float16 values, 13 low bits zero). Only then can
    method 1's zstd planes beat method 2, so only then is it worth a writer's time to try it."""
    ws = words.dtype.itemsize
    _, width = geometry(dtype, ws)
    if width == 0 or words.size == 0:
        return False
    w = np.ascontiguousarray(words[::-(-words.size // sample)])
    low = kernels.pack_bits((w << w.dtype.type(1)) | (w >> w.dtype.type(8 * ws - 1)), ws, width)
    return len(zstd.ZstdCompressor(level=1).compress(low)) < 0.97 * len(low)


def _modes(lines: np.ndarray, m: int, exp_bits: int) -> np.ndarray:
    """Each line's modal exponent (from up to _SAMPLE evenly spaced elements)."""
    samp = lines[:, ::-(-lines.shape[1] // _SAMPLE)] >> m
    n, span = samp.shape[0], 1 << exp_bits
    counts = np.bincount((np.arange(n)[:, None] * span + samp).ravel(), minlength=n * span).reshape(n, span)
    return counts.argmax(1)


def _symbols(top: np.ndarray, bases: np.ndarray, tmask: int) -> np.ndarray:
    """(top - base) mod 2^T per element, residuals >= 255 as the escape symbol; `bases` broadcasts over `top`.
    (uint16 arithmetic wraps mod 2^16, a multiple of 2^T.)"""
    s = (top - bases) & np.uint16(tmask)
    return np.minimum(s, ESCAPE).astype(np.uint8)


def _entropy_bits(hist: np.ndarray) -> float:
    h = hist[hist > 0]
    return float(-(h * np.log2(h / h.sum())).sum())


def _cluster(hist: np.ndarray, k: int, iters: int = 10, max_lines: int = 4096) -> np.ndarray:
    """Group lines into k classes of similar symbol histograms: k-means under code length (as method 1's
    `_cluster`, from entropy quantiles, deterministic). Beyond `max_lines` lines the means are found on evenly
    spaced lines, then every line joins its cheapest class (the planning time stays bounded)."""
    sample = hist[::-(-hist.shape[0] // max_lines)]
    n = sample.shape[0]
    p = sample / np.maximum(sample.sum(1, keepdims=True), 1)
    ent = -(p * np.log2(np.where(p > 0, p, 1))).sum(1)
    labels = np.empty(n, np.int64)
    labels[np.argsort(ent, kind="stable")] = np.arange(n) * k // n
    onehot = np.zeros((k, n))
    for _ in range(iters + 1):
        onehot[:] = 0
        onehot[labels, np.arange(n)] = 1
        tables = (sample.T @ onehot.T).T + 0.5  # (this orientation: BLAS is ~50x faster than onehot @ sample)
        log_p = np.log2(tables / tables.sum(1, keepdims=True)).T
        new = (-sample @ log_p).argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels if n == hist.shape[0] else (-hist @ log_p).argmin(1)


def _plan(grid: np.ndarray, m: int, exp_bits: int, tmask: int) -> tuple[bool, np.ndarray, np.ndarray]:
    """(by_cols, bases, classes) of a piece's top values, by estimated code length."""
    best = None
    for by_cols in ((False, True) if grid.shape[0] > 1 else (False,)):
        lines = grid.T if by_cols else grid
        n = lines.shape[0]
        bases = ((((_modes(lines, m, exp_bits) + HEADROOM_BINADES) << m) - 1 - (ESCAPE - 1)) & tmask).astype(np.uint16)
        samp = lines[:, ::-(-lines.shape[1] // _SAMPLE)]
        sym = _symbols(samp, bases[:, None], tmask)
        hist = np.bincount((np.arange(n)[:, None] * SYMS + sym).ravel(), minlength=n * SYMS).reshape(n, SYMS)
        hist = hist.astype(np.float64) * (lines.shape[1] / samp.shape[1])
        esc_bits = float(hist[:, ESCAPE].sum()) * 16
        hist = hist[:, hist.any(0)]  # the symbols no line uses cost nothing: drop them from the search
        for k in CLASS_CHOICES:
            if k > 1 and n < MIN_LINES_PER_CLASS * k:
                break
            labels = _cluster(hist, k) if k > 1 else np.zeros(n, np.int64)
            bits = esc_bits + n * _LINE_BITS
            for c in range(k):
                h = hist[labels == c].sum(0)
                bits += _entropy_bits(h) + _TABLE_BITS_PER_SYMBOL * np.count_nonzero(h)
            if best is None or bits < best[0]:
                best = (bits, by_cols, bases, labels)
    _, by_cols, bases, labels = best
    used = np.unique(labels)  # k-means may leave a class empty: renumber densely
    return by_cols, bases.astype(np.uint16), np.searchsorted(used, labels).astype(np.uint8)


def _normalize(counts: np.ndarray) -> np.ndarray:
    """Counts of one class -> frequencies summing to 4096, every used symbol >= 1 (largest-remainder rounding,
    the excess or shortfall taken from the most frequent symbol)."""
    used = counts > 0
    f = np.zeros(SYMS, np.int64)
    if not used.any():  # a class with no elements keeps one nominal symbol
        f[0] = PROB_TOTAL
        return f
    scaled = counts * (PROB_TOTAL / counts.sum())
    f[used] = np.maximum(1, np.floor(scaled[used]))
    short = PROB_TOTAL - int(f.sum())
    if short > 0:
        order = np.argsort(-(scaled - f) * used, kind="stable")
        f[order[:short]] += 1
    while short < 0:  # too many symbols pushed up to 1: take from the largest (never below 1)
        j = int(np.argmax(f))
        take = min(-short, int(f[j]) - 1)
        f[j] -= take
        short += take
    return f


def _put_table(out: bytearray, f: np.ndarray) -> None:
    nz = np.flatnonzero(f)
    first, count = int(nz[0]), int(nz[-1] - nz[0] + 1)
    planes._put_varint(out, first)
    planes._put_varint(out, count)
    for v in f[first:first + count]:
        planes._put_varint(out, int(v))


def encode(words: np.ndarray, segments: Sequence[Segment], dtype: str, level: int = 3) -> bytes | None:
    """Method 2's stored bytes for a section of words (ws 2 or 4); None where its frequency tables would exceed
    the format's bound (raw_len + 4096 bytes: tiny pieces, many classes), which the writer never needs to meet."""
    ws = words.dtype.itemsize
    n = words.size
    m, width = geometry(dtype, ws)
    exp_bits, tbits = EXP_BITS[dtype], 8 * ws - width
    tmask = (1 << tbits) - 1
    one = words.dtype.type(1)
    rot = (words << one) | (words >> words.dtype.type(8 * ws - 1))
    top_all = (rot >> words.dtype.type(width)).astype(np.uint16)
    chunk = 1 << CHUNK_LOG2

    head = bytearray([VERSION, m, CHUNK_LOG2])
    pieces = planes._pieces(n, segments)
    planes._put_varint(head, len(pieces))
    bases_all, classes_all, tables, escapes, chunk_dir, rans = [], [], bytearray(), [], bytearray(), []
    for p in pieces:
        grid = top_all[p.offset:p.offset + p.size].reshape(p.rows, p.cols)
        by_cols, bases, classes = _plan(grid, m, exp_bits, tmask)
        k = int(classes.max()) + 1
        planes._put_varint(head, p.rows)
        planes._put_varint(head, p.cols)
        head += bytes([int(by_cols), k])
        sym = _symbols(grid, bases[None, :] if by_cols else bases[:, None], tmask).reshape(-1)
        cls = np.broadcast_to(classes[None, :] if by_cols else classes[:, None], grid.shape).reshape(-1)
        counts = np.bincount(cls.astype(np.int64) * SYMS + sym, minlength=k * SYMS).reshape(k, SYMS)
        freqs = np.stack([_normalize(c) for c in counts])
        for f in freqs:
            _put_table(tables, f)
        fb = freqs.astype("<u2").tobytes()
        esc_top = grid.reshape(-1)[sym == ESCAPE]
        escapes.append(esc_top)
        esc_pos = np.flatnonzero(sym == ESCAPE)
        for a in range(0, p.size, chunk):
            b = min(p.size, a + chunk)
            data = kernels.rans_encode(sym[a:b], np.ascontiguousarray(cls[a:b]), fb)
            planes._put_varint(chunk_dir, len(data))
            planes._put_varint(chunk_dir, int(np.searchsorted(esc_pos, b) - np.searchsorted(esc_pos, a)))
            rans.append(data)
        bases_all.append(bases)
        classes_all.append(classes)

    if len(tables) > n * ws + TABLE_SLACK:
        return None
    parts: list = []
    params = planes._symbol_params(level)
    planes._encode_stream(head, parts, np.concatenate(bases_all).astype("<u2").view(np.uint8), params, STREAM_CHUNK)
    planes._encode_stream(head, parts, np.concatenate(classes_all), params, STREAM_CHUNK)
    planes._encode_stream(head, parts, bytes(tables), params, STREAM_CHUNK)
    planes._encode_stream(head, parts, np.concatenate(escapes).astype("<u2").view(np.uint8), params, STREAM_CHUNK)
    head += chunk_dir
    low = kernels.pack_bits(rot, ws, width)
    return b"".join([bytes(head), *parts, *rans, low])


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def _read_tables(buf: np.ndarray, k_total: int) -> np.ndarray:
    """The frequency stream -> k_total x 256 frequencies (each table checked to sum to 4096)."""
    r = planes._Reader(memoryview(np.ascontiguousarray(buf)).cast("B"))
    out = np.zeros((k_total, SYMS), np.uint16)
    for c in range(k_total):
        first = r.varint(SYMS - 1, "frequency table start")
        count = r.varint(SYMS - first, "frequency table size")
        vals = [r.varint(PROB_TOTAL, "frequency") for _ in range(count)]
        if count == 0 or sum(vals) != PROB_TOTAL:
            raise FormatError(f"frequency table {c} sums to {sum(vals)}, expected {PROB_TOTAL}")
        out[c, first:first + count] = vals
    if r.pos != len(r.buf):
        raise FormatError("the frequency stream has bytes after its last table")
    return out


def decode(stored: memoryview, n: int, ws: int, dtype: str, dest: np.ndarray | None = None,
           threads: bool = True) -> np.ndarray:
    """Undo `encode` (into `dest` when given): FormatError on any inconsistency."""
    r = planes._Reader(stored)
    version, m, chunk_log2 = r.byte(), r.byte(), r.byte()
    if version != VERSION:
        raise FormatError(f"entropy method 2 layout version {version} is not supported (this reader knows {VERSION})")
    if m != MANTISSA_BITS[dtype]:
        raise FormatError(f"entropy method 2: {m} mantissa bits for {dtype}, expected {MANTISSA_BITS[dtype]}")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"entropy method 2: chunk size 2^{chunk_log2} is out of range")
    chunk = 1 << chunk_log2
    _, width = geometry(dtype, ws)
    tmask = (1 << (8 * ws - width)) - 1

    n_pieces = r.varint(n, "piece count")
    pieces, pos, n_lines, k_total, n_chunks = [], 0, 0, 0, 0
    for _ in range(n_pieces):
        p = planes.read_piece(r, n, pos)
        k = p.n_classes
        pieces.append(p)
        pos += p.size
        n_lines += p.n_lines
        k_total += k
        n_chunks += -(-p.size // chunk)
    if pos != n:
        raise FormatError(f"entropy header: pieces cover {pos} words, the section has {n}")

    dpos = [0]
    base_ref = planes._read_stream(r, 2 * n_lines, STREAM_CHUNK, dpos, "base stream")
    class_ref = planes._read_stream(r, n_lines, STREAM_CHUNK, dpos, "class stream")
    table_ref = planes._read_stream(r, min(k_total * MAX_TABLE_BYTES, n * ws + TABLE_SLACK), STREAM_CHUNK, dpos,
                                    "frequency stream")
    esc_ref = planes._read_stream(r, 2 * n, STREAM_CHUNK, dpos, "escape stream")
    for ref, want, what in ((base_ref, 2 * n_lines, "base stream"), (class_ref, n_lines, "class stream")):
        if ref.raw_len != want:
            raise FormatError(f"{what} holds {ref.raw_len} bytes, expected {want}")
    if esc_ref.raw_len % 2:
        raise FormatError("the escape stream has an odd length")
    chunks, rans_len, esc_total = [], 0, 0
    for p in pieces:
        for a in range(0, p.size, chunk):
            cnt = min(p.size, a + chunk) - a
            size, esc = r.varint(2 * cnt + 16, "rANS chunk size"), r.varint(cnt, "chunk escapes")
            chunks.append((p, a, cnt, rans_len, size, esc_total, esc))
            rans_len += size
            esc_total += esc
    if 2 * esc_total != esc_ref.raw_len:
        raise FormatError(f"chunks declare {esc_total} escapes, the escape stream holds {esc_ref.raw_len // 2}")
    low_len = -(-n * width // 8)
    data0 = r.pos
    if data0 + dpos[0] + rans_len + low_len != len(stored):
        raise FormatError(f"entropy section is {len(stored)} bytes, its tables account for "
                          f"{data0 + dpos[0] + rans_len + low_len}")
    rans0 = data0 + dpos[0]
    low = stored[rans0 + rans_len:]

    area = planes._SCRATCH.take(sum(ref.raw_len for ref in (base_ref, class_ref, table_ref, esc_ref)
                                    if not ref.stored))
    try:
        alloc = planes._Carve(area)
        tasks: list = []
        bases = planes._stream_array(stored, data0, base_ref, tasks, "base stream", alloc)
        classes = planes._stream_array(stored, data0, class_ref, tasks, "class stream", alloc)
        tables = planes._stream_array(stored, data0, table_ref, tasks, "frequency stream", alloc)
        escs = planes._stream_array(stored, data0, esc_ref, tasks, "escape stream", alloc)
        parallel = threads and n * ws >= planes._PARALLEL_BYTES
        planes._run(tasks, parallel)
        freqs = _read_tables(tables, k_total)
        bases16 = bases.view("<u2") if bases.size else np.zeros(0, "<u2")
        if (bases16 > tmask).any():
            raise FormatError(f"a line base exceeds the top value's {8 * ws - width} bits")

        out = np.empty(n, _WORD[ws]) if dest is None else dest.view(_WORD[ws])  # every word is written below
        line0, k0, first = 0, 0, {}
        for p in pieces:
            first[id(p)] = (line0, k0)
            line0 += p.n_lines
            k0 += p.n_classes

        def run_chunk(p, a, cnt, s0, size, e0, ne) -> None:
            # each chunk builds its piece's decode tables (16 KiB per class, microseconds): no table outlives it
            l0, k0 = first[id(p)]
            try:
                tables = kernels.rans_table(freqs[k0:k0 + p.n_classes].astype("<u2").tobytes())
                kernels.rans_decode(out, ws, p.offset, p.cols, p.by_cols, a, cnt, classes[l0:l0 + p.n_lines],
                                    bases[2 * l0:2 * (l0 + p.n_lines)], tables, stored[rans0 + s0:rans0 + s0 + size],
                                    escs[2 * e0:2 * (e0 + ne)], low, (p.offset + a) * width, width)
            except ValueError as e:
                raise FormatError(f"piece at word {p.offset}, chunk at element {a}: {e}") from None

        planes._run([lambda c=c: run_chunk(*c) for c in chunks], parallel)
        return out.view(np.uint8)
    finally:
        planes._SCRATCH.give(area)

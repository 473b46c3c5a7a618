"""The entropy stage: exponent-aware byte planes + zstd, below the symmetry codecs and above the container.

Every section goes through `compress` on write and `decompress` on read. Method 0 stores the payload as it is;
method 1 ("planes") is the format below (normative layout in SPEC.md, "Entropy stage"); method 2 ("words", one
rANS symbol per word) is in entropy_words.py. A writer codes words with method 2 (with the compiled kernels: its
Python reference is for tests), also tries method 1 where method 2's raw bits look compressible, and keeps the
smallest of 2, 1 and 0.

How method 1 models a section of float words:
- Each word is rotated left by one bit, so the top byte is the exponent (bfloat16, float32) or the exponent and
  3 mantissa bits (float16), and the sign joins the low mantissa byte. Byte k of the rotated words forms plane k.
- The top (exponent) bytes are coded per *piece* (a 2-D tensor of the section, or a run of other words) and per
  *line* (a row or a column of the piece, whichever codes smaller). Each line subtracts its own base exponent, so
  lines of very different scales (SliceGPT's PCA-ordered rows and columns) share one residual distribution; and
  lines are grouped into a few classes of similar distributions, each class its own zstd stream (so its own
  Huffman table): modelling the exponent per column this way saves ~3% of the exponent bits over one table.
- bfloat16/float32 residuals carry ~2.6 bits, where zstd's Huffman loses a lot and its match finder hurts. So they
  are packed two per byte as nibbles (15 = escape: the word's top byte is in the escape stream): the packed bytes
  carry ~5.2 bits, where Huffman is nearly exact. float16's top byte also holds 3 mantissa bits: its exponent is
  split off and coded the same way, the 3 bits stored as bit-planes (half the Huffman symbols of coding the top
  bytes, which a section falls back to when its exponents are too spread for nibbles).
- The other planes (sign and mantissa) are near-random: zstd keeps a chunk only where it is smaller.
- Every stream is cut into chunks, each its own zstd frame (or stored). A large section decodes on all cores.
- Rows are grouped into classes freely; columns only into contiguous ranges, whose symbols are stored row by row.
  So every piece decodes straight into its words, row by row in one pass, without a transpose.
- That inner loop (symbols + bases + escapes + low planes -> words) is compiled (`bbformat/_kernels.c`), with a
  numpy reference in `bbformat/kernels.py`.
Word size 1 (an opaque payload) is one byte stream, chunked the same way.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zstandard as zstd

from .. import kernels
from ..errors import BBFError, FormatError
from .base import Segment

METHOD_NONE = 0
METHOD_PLANES = 1
METHOD_WORDS = 2  # rANS over one symbol per word: entropy_words.py

VERSION = 3
FLAG_NIBBLES = 1  # the exponent residuals are packed two per byte, with an escape stream
FLAG_SPLIT = 2  # float16: the nibbles code the exponent alone, the top byte's 3 mantissa bits are a stream of their own
CHUNK_LOG2 = 19  # 512 KiB of stream bytes per chunk: enough chunks for 2+ cores on a large section
MIN_CHUNK_LOG2, MAX_CHUNK_LOG2 = 12, 26
ESCAPE = kernels.ESCAPE
NIBBLE_WINDOW = 15  # residuals 0..14 fit a nibble
MAX_CLASSES = 16  # line classes (symbol streams) per piece, a format limit
CLASS_CHOICES = (2, 4, 8)  # row class counts the encoder tries (besides 1)
MAX_RANGES = 8  # most column ranges the encoder tries
MIN_LINES_PER_CLASS = 16
ALIGNMENTS = (9, 10, 11, 12)  # base = modal exponent - alignment: exponents run far below the mode, not above
STREAM_OVERHEAD = 48  # bytes a symbol stream costs beyond its entropy (zstd frame, Huffman table), for planning
MIN_SEARCH_WORDS = 4096  # smaller 2-D segments are coded as runs of words
_BASE_SAMPLE = 2048  # words of a line its base and histogram are estimated from
MAX_ESCAPE_FRACTION = 1 / 16  # more escapes than this: nibbles lose, code the exponent bytes instead
_PARALLEL_BYTES = 1 << 24  # smaller sections decode on the calling thread (the reader runs groups in parallel)
MAX_PIECE_WORDS = 1 << 22  # method 1 codes larger 2-D segments as bands of rows (4M words, 8-16 MB): `_bands`
MIN_STREAM_GAIN = 100  # a stream whose chunks zstd shrinks by less than 1 % in all is stored whole (_encode_stream)
WAVE_WORDS = 1 << 23  # a section decodes this many words at a time (whole pieces): its scratch, ~16-32 MB

_DTYPE_WORD_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


# ---------------------------------------------------------------------------------------------------------------
# Public interface


def compress(payload: bytes, word_size: int, segments: Sequence[Segment], dtype: str, level: int = 3,
             method: int | None = None, small: bool = False) -> tuple[int, bytes]:
    """Entropy-code one section payload: (method, stored bytes), the smallest of method 0 and method 1, and with
    `small` also of method 2 (~1 % of a model smaller, but decoding ~4x slower: an archive's choice, not the
    default). `method`: only that one, or method 0 where it is smaller (for tests and benchmarks)."""
    _check_kind(word_size, dtype, BBFError)
    raw_len = len(payload)
    if raw_len % word_size:
        raise BBFError(f"payload of {raw_len} bytes is not a whole number of {word_size}-byte words")
    if raw_len == 0:
        return METHOD_NONE, b""
    if method not in (None, METHOD_PLANES, METHOD_WORDS) or (method == METHOD_WORDS and word_size == 1):
        raise BBFError(f"compress: method {method} cannot code a payload of word size {word_size}")
    if word_size == 1:
        stored = _encode_bytes(payload, level)
        return (METHOD_PLANES, stored) if len(stored) < raw_len else (METHOD_NONE, bytes(payload))
    from . import entropy_words
    words = np.frombuffer(payload, _WORD[word_size])
    best = (METHOD_NONE, payload)
    words_tried = method == METHOD_WORDS or (method is None and small and kernels.COMPILED)  # (Python: tests only)
    if words_tried:
        alt = entropy_words.encode(words, segments, dtype, level)
        best = best if alt is None else min(best, (METHOD_WORDS, alt), key=_size)
    # after method 2, method 1 can only win where the bits method 2 stores raw have structure: try it only then
    if method == METHOD_PLANES or (method is None and (not words_tried or best[0] == METHOD_NONE
                                                        or entropy_words.low_bits_structured(words, dtype))):
        best = min(best, (METHOD_PLANES, _encode_words(words, segments, dtype, level)), key=_size)
    return best if best[0] != METHOD_NONE else (METHOD_NONE, bytes(payload))


def _size(coded: tuple[int, bytes]) -> tuple[int, int]:
    return len(coded[1]), coded[0]  # ties go to the lower method: method 0 unless another is smaller


def decompress(method: int, stored: bytes, raw_len: int, word_size: int, dtype: str,
               out: np.ndarray | None = None, threads: bool = True, release=None) -> bytes | memoryview | np.ndarray:
    """Undo `compress`. Never allocates more than `raw_len` (plus bounded bookkeeping); FormatError on bad data.

    `out` (a writable uint8 array of raw_len bytes) receives a word payload coded with method 1 in place of a new
    array: a codec can then rebuild its tensors around the payload without copying it. `threads=False` keeps a
    large section on the calling thread (for a caller that already decodes sections in parallel). `release(start,
    end)`: called (method 1) once stored bytes [start, end) are no longer needed, so a store can drop them early."""
    _check_kind(word_size, dtype, FormatError)
    if raw_len < 0 or raw_len % word_size:
        raise FormatError(f"section raw length {raw_len} is not a whole number of {word_size}-byte words")
    if method == METHOD_NONE:
        if len(stored) != raw_len:
            raise FormatError(f"stored section is {len(stored)} bytes, expected {raw_len} (method none)")
        return bytes(stored)
    if method not in (METHOD_PLANES, METHOD_WORDS):
        raise FormatError(f"unknown entropy method {method} (this reader knows 0, 1 and 2)")
    if raw_len == 0:
        raise FormatError("an empty section must be stored with method 0")
    if word_size == 1:
        if method == METHOD_WORDS:
            raise FormatError("entropy method 2 codes words: a byte payload (word size 1) cannot use it")
        return _decode_bytes(memoryview(stored), raw_len, threads)
    if out is not None and (out.dtype != np.uint8 or out.size != raw_len or not out.flags.writeable):
        raise BBFError(f"decompress: `out` must be a writable uint8 array of {raw_len} bytes")
    if method == METHOD_WORDS:
        from . import entropy_words
        return entropy_words.decode(memoryview(stored), raw_len // word_size, word_size, dtype, out, threads)
    return _decode_words(memoryview(stored), raw_len // word_size, word_size, dtype, out, threads, release)


def _check_kind(word_size: int, dtype: str, error: type[BBFError]) -> None:
    if dtype not in _DTYPE_WORD_SIZE:
        raise error(f"unknown word dtype {dtype!r}; expected one of {sorted(_DTYPE_WORD_SIZE)}")
    if word_size != 1 and word_size != _DTYPE_WORD_SIZE[dtype]:
        raise error(f"word size {word_size} does not fit dtype {dtype} (expected 1 or {_DTYPE_WORD_SIZE[dtype]})")


# ---------------------------------------------------------------------------------------------------------------
# Byte-level helpers: varints, chunked streams


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


class _Reader:
    """Bounds-checked reader over the stored header."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise FormatError("entropy header is truncated")
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self, limit: int, what: str, detail: str = "") -> int:
        buf, pos, v, shift = self.buf, self.pos, 0, 0
        if pos < len(buf) and buf[pos] < 0x80 and buf[pos] <= limit:  # one byte: most of a header's varints
            self.pos = pos + 1
            return buf[pos]
        while True:
            if pos >= len(buf):
                raise FormatError("entropy header is truncated")
            b = buf[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 56:  # a 10th byte: varints have at most 9 (SPEC, conventions), as the correction codes' do
                raise FormatError(f"entropy header: varint for {what}{detail} is longer than 9 bytes")
        self.pos = pos
        if v > limit:
            raise FormatError(f"entropy header: {what}{detail} = {v} exceeds its limit {limit}")
        return v


_tls = threading.local()


def _cctx(params: zstd.ZstdCompressionParameters) -> zstd.ZstdCompressor:
    return zstd.ZstdCompressor(compression_params=params)


def _dctx() -> zstd.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstd.ZstdDecompressor()
    return d


def _byte_params(level: int) -> zstd.ZstdCompressionParameters:
    return zstd.ZstdCompressionParameters.from_level(level, write_content_size=1, write_checksum=0)


def _symbol_params(level: int) -> zstd.ZstdCompressionParameters:
    # Exponent symbols are noise with a skewed histogram: Huffman does the work, and short matches only cost bits
    # and decode speed, so the match finder looks for long matches only.
    return zstd.ZstdCompressionParameters.from_level(level, min_match=7, write_content_size=1, write_checksum=0)


def _encode_stream(out_dir: bytearray, data_parts: list, stream: np.ndarray | bytes,
                   params: zstd.ZstdCompressionParameters, chunk: int) -> None:
    """Append one stream: its raw length and chunk table to the header, its chunks to the data parts.

    A chunk is stored as is when zstd does not make it smaller, and so is every chunk when zstd saves less than
    1/MIN_STREAM_GAIN of the stream: a reader views a stream stored whole in place, but copies the stored chunks of
    a mixed one into its buffer (measured on SmolLM2 bf16 `raw`: 50.6 MB of mantissa planes copied for 1.0 MB
    that zstd coded)."""
    buf = memoryview(stream).cast("B") if isinstance(stream, np.ndarray) else memoryview(stream)
    _put_varint(out_dir, len(buf))
    cctx = _cctx(params)
    coded = []
    for start in range(0, len(buf), chunk):
        piece = buf[start:start + chunk]
        z = cctx.compress(piece)
        coded.append((piece, z if len(z) < len(piece) else None))
    if sum(len(p) - len(z) for p, z in coded if z is not None) * MIN_STREAM_GAIN < len(buf):
        coded = [(p, None) for p, _ in coded]
    for piece, z in coded:
        if z is not None:
            _put_varint(out_dir, len(z) << 1 | 1)
            data_parts.append(z)
        else:
            _put_varint(out_dir, len(piece) << 1)
            data_parts.append(piece)


@dataclass
class _StreamRef:
    raw_len: int
    chunks: list  # (raw_start, raw_len, stored_start, stored_len, is_zstd)
    stored: bool = False  # every chunk is stored as is: the stream is a view of the stored bytes


def _read_stream(r: _Reader, limit: int, chunk: int, data_pos: list, what: str) -> _StreamRef:
    raw_len = r.varint(limit, what, " length")
    chunks, start = [], 0
    while start < raw_len:
        n = min(chunk, raw_len - start)
        v = r.varint(2 * chunk + 1, what, " chunk size")
        size, is_zstd = v >> 1, bool(v & 1)
        if not is_zstd and size != n:
            raise FormatError(f"{what}: stored chunk of {size} bytes, expected {n}")
        chunks.append((start, n, data_pos[0], size, is_zstd))
        data_pos[0] += size
        start += n
    return _StreamRef(raw_len, chunks, bool(chunks) and not any(c[4] for c in chunks))


def _decode_chunk(data: memoryview, base: int, ref: tuple, out: np.ndarray, what: str) -> None:
    """One chunk's raw bytes into out[start:start + n]: zstd decodes straight into it (no temporary copy)."""
    start, n, s0, size, is_zstd = ref
    if not is_zstd:
        out[start:start + n] = np.frombuffer(data[base + s0: base + s0 + size], np.uint8)
        return
    src = data[base + s0: base + s0 + size]
    try:
        declared = zstd.frame_content_size(src)
    except zstd.ZstdError:
        declared = "no valid frame header"
    if declared != n:
        raise FormatError(f"{what}: zstd chunk declares {declared} bytes, expected {n}")
    try:
        with _dctx().stream_reader(src) as reader:
            got = reader.readinto(out[start:start + n])
            rest = reader.read(1)  # the frame must end here (this also runs zstd's end-of-frame checks)
    except zstd.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd chunk ({e})") from None
    if got != n or rest:
        raise FormatError(f"{what}: zstd chunk decoded to {'more than ' if rest else ''}{got} bytes, expected {n}")


def _stream_array(data: memoryview, base: int, ref: _StreamRef, tasks: list, what: str, alloc=None) -> np.ndarray:
    """The stream's bytes: a view into `data` when every chunk is stored, else a buffer (from `alloc`) filled by
    `tasks`."""
    if ref.stored:
        s0 = ref.chunks[0][2]
        return np.frombuffer(data[base + s0: base + s0 + ref.raw_len], np.uint8)
    out = alloc(ref.raw_len) if alloc else np.empty(ref.raw_len, np.uint8)
    tasks.extend((lambda c=c: _decode_chunk(data, base, c, out, what)) for c in ref.chunks)
    return out


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _run(tasks: list, parallel: bool) -> None:
    """Run independent tasks, on a shared pool of os.cpu_count() threads when worth it."""
    global _pool
    if not parallel or len(tasks) < 2:
        for t in tasks:
            t()
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bbf-entropy")
    for f in [_pool.submit(t) for t in tasks]:
        f.result()


# ---------------------------------------------------------------------------------------------------------------
# Word size 1: one chunked zstd stream


def _encode_bytes(payload: bytes, level: int) -> bytes:
    """With zstd's usual match finder and with long matches only (residual-like bytes, e.g. `exact`'s tied-head
    residuals, where short matches cost bits: 2.86 against 2.94 bits per residual), whichever is smaller."""
    best = None
    for params in (_byte_params(level), _symbol_params(level)):
        head, parts = bytearray([VERSION, 0, CHUNK_LOG2]), []
        _encode_stream(head, parts, payload, params, 1 << CHUNK_LOG2)
        out = b"".join([head, *parts])  # one copy of the output, not two
        best = out if best is None or len(out) < len(best) else best
    return best


def _decode_bytes(stored: memoryview, raw_len: int, threads: bool = True) -> memoryview:
    r, chunk = _read_prefix(stored, allowed_flags=0)
    pos = [0]
    ref = _read_stream(r, raw_len, chunk, pos, "byte stream")
    if ref.raw_len != raw_len:
        raise FormatError(f"byte stream holds {ref.raw_len} bytes, expected {raw_len}")
    _check_total(stored, r.pos, pos[0])
    tasks: list = []
    out = _stream_array(stored, r.pos, ref, tasks, "byte stream")
    _run(tasks, threads and raw_len >= _PARALLEL_BYTES)
    return memoryview(out)  # bytes-like without .tobytes(): a copy of the whole payload, made holding the GIL


def _read_prefix(stored: memoryview, allowed_flags: int) -> tuple[_Reader, int]:
    r = _Reader(stored)
    version, flags, chunk_log2 = r.byte(), r.byte(), r.byte()
    if version != VERSION:
        raise FormatError(f"entropy format version {version} is not supported (this reader knows {VERSION})")
    if flags & ~allowed_flags:
        raise FormatError(f"entropy header has unknown flags {flags:#x}")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"entropy chunk size 2^{chunk_log2} is out of range")
    return r, 1 << chunk_log2


def _check_total(stored: memoryview, header_len: int, data_len: int) -> None:
    if header_len + data_len != len(stored):
        raise FormatError(f"entropy section is {len(stored)} bytes, its tables account for {header_len + data_len}")


# ---------------------------------------------------------------------------------------------------------------
# Word payloads: planes


@dataclass
class _Piece:
    """A run of words coded as a rows x cols grid (row-major in the payload), cut into *lines* (its rows, or its
    columns when `by_cols`). Each line has a base exponent and a class; each class is one symbol stream."""

    offset: int  # in words
    rows: int
    cols: int
    by_cols: bool = False
    n_classes: int = 1
    escapes: tuple = (0,)  # escapes per class stream

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def n_lines(self) -> int:
        return self.cols if self.by_cols else self.rows

    @property
    def line_len(self) -> int:
        return self.rows if self.by_cols else self.cols


def _pieces(n: int, segments: Sequence[Segment]) -> list[_Piece]:
    """Tile [0, n) with the large 2-D segments and 1-row pieces for everything else (merged when adjacent)."""
    pieces, pos = [], 0

    def run(a: int, b: int) -> None:
        if b <= a:
            return
        if pieces and pieces[-1].rows == 1 and pieces[-1].offset + pieces[-1].cols == a:
            pieces[-1].cols += b - a
        else:
            pieces.append(_Piece(a, 1, b - a))

    for s in sorted((s for s in segments if s.rows and s.cols), key=lambda s: s.offset):
        if s.rows < 0 or s.cols < 0 or s.offset < pos or s.offset + s.rows * s.cols > n:
            raise BBFError(f"segment {s} overlaps another or lies outside the {n}-word payload")
        run(pos, s.offset)
        if s.rows > 1 and s.rows * s.cols >= MIN_SEARCH_WORDS:
            pieces.append(_Piece(s.offset, s.rows, s.cols))
        else:
            run(s.offset, s.offset + s.rows * s.cols)
        pos = s.offset + s.rows * s.cols
    run(pos, n)
    return pieces


def _bands(p: _Piece) -> list[tuple[int, int]]:
    """Row ranges cutting a piece into bands of at most MAX_PIECE_WORDS words (as few as that allows, of nearly
    equal height). A reader decodes a piece's streams whole, so the largest piece bounds its scratch memory (and
    the writer's), whatever the model's size."""
    step = -(-p.rows // -(-p.size // MAX_PIECE_WORDS))
    return [(r, min(p.rows, r + step)) for r in range(0, p.rows, step)]


def _exp_shift(dtype: str) -> int:
    """Bits of mantissa below the exponent in the top byte of a rotated word."""
    return 3 if dtype == "float16" else 0


def _symbol_hist(lines: np.ndarray, shift: int, nibbles: bool, align: int) -> tuple[np.ndarray, np.ndarray]:
    """Per line (sampled): (base exponent, histogram of its symbols: 16 nibbles, or 256 bytes).

    The base is the line's modal exponent minus `align`, so lines of different scales line up in one table."""
    samp = lines[:, ::-(-lines.shape[1] // _BASE_SAMPLE)]
    m = samp.shape[0]
    counts = np.empty((m, 256), np.int32)
    step = max(1, (1 << 22) // (256 + samp.shape[1]))
    for a in range(0, m, step):
        blk = samp[a:a + step]
        idx = (np.arange(blk.shape[0], dtype=np.int64)[:, None] * 256 + blk).ravel()
        counts[a:a + blk.shape[0]] = np.bincount(idx, minlength=blk.shape[0] * 256).reshape(-1, 256)
    exp_counts = counts.reshape(m, 256 >> shift, 1 << shift).sum(2) if shift else counts
    base = (exp_counts.argmax(1) - align) & (255 >> shift)
    width = NIBBLE_WINDOW if nibbles else 256
    idx = ((base << shift)[:, None] + np.arange(width)[None, :]) & 255
    hist = np.take_along_axis(counts, idx, 1).astype(np.float64)
    if nibbles:  # everything outside the window is an escape
        hist = np.concatenate([hist, (counts.sum(1) - hist.sum(1))[:, None]], 1)
    return base.astype(np.uint8), hist * (lines.shape[1] / samp.shape[1])


def _bits(hist: np.ndarray) -> float:
    """Order-0 code length (bits) of the symbols counted in `hist` (summed over its rows)."""
    h = hist.sum(0) if hist.ndim == 2 else hist
    h = h[h > 0]
    return float(-(h * np.log2(h / h.sum())).sum())


def _cluster(hist: np.ndarray, k: int, iters: int = 10) -> np.ndarray:
    """Group lines into k classes with similar symbol distributions (k-means under code length), deterministic."""
    n = hist.shape[0]
    p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    ent = -(p * np.log2(np.where(p > 0, p, 1))).sum(1)
    labels = np.empty(n, np.int64)
    labels[np.argsort(ent, kind="stable")] = np.arange(n) * k // n  # start from entropy quantiles
    for _ in range(iters):
        tables = np.stack([hist[labels == c].sum(0) for c in range(k)]) + 0.5
        cost = -hist @ np.log2(tables / tables.sum(1, keepdims=True)).T
        new = cost.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def _ranges(hist: np.ndarray, k_max: int, candidates: int = 128) -> list[np.ndarray]:
    """Best split of the lines into 1..k_max contiguous ranges (one class each) by code length: a dynamic program
    over up to `candidates` evenly spaced boundaries. Returns labels (non-decreasing) for k = 1 .. k_max."""
    n = hist.shape[0]
    pts = np.unique(np.linspace(0, n, min(n, candidates) + 1).round().astype(np.int64))
    m = pts.size
    cum = np.concatenate([np.zeros((1, hist.shape[1])), np.cumsum(hist, 0)])[pts]
    cost = np.full((m, m), np.inf)
    for i in range(m - 1):  # cost[i, j]: the code length of lines pts[i] .. pts[j] as one class
        h = cum[i + 1:] - cum[i]
        tot = h.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cost[i, i + 1:] = tot * np.log2(np.maximum(tot, 1)) - (h * np.log2(np.where(h > 0, h, 1))).sum(1)
    best, back, out = cost[0].copy(), [], []
    for k in range(1, k_max + 1):
        if k > 1:
            total = best[:, None] + cost
            back.append(total.argmin(0))
            best = total.min(0)
        labels, j = np.empty(n, np.int64), m - 1
        for c in range(k - 1, -1, -1):  # walk the boundaries back from the end
            i = back[c - 1][j] if c else 0
            labels[pts[i]:pts[j]] = c
            j = i
        out.append(labels)
    return out


def _plan(grid: np.ndarray, piece: _Piece, shift: int, nibbles: bool) -> tuple[np.ndarray, np.ndarray]:
    """Choose the piece's line direction, base alignment and line classes by estimated code length.

    Rows are grouped into classes by k-means; columns into contiguous ranges (so that a class's symbols can be
    stored row by row and decoded without a transpose). Sets piece.by_cols / n_classes; returns (bases, classes)."""
    best = None
    for by_cols in ((False, True) if piece.rows > 1 else (False,)):
        lines = grid.T if by_cols else grid
        n_lines = lines.shape[0]
        for align in (ALIGNMENTS if nibbles else (0,)):
            bases, hist = _symbol_hist(lines, shift, nibbles, align)
            escapes = float(hist[:, -1].sum()) if nibbles else 0.0
            k_max = max(1, min(MAX_RANGES, n_lines // MIN_LINES_PER_CLASS))
            if by_cols:
                options = list(enumerate(_ranges(hist, k_max), 1))
            else:
                options = [(k, _cluster(hist, k) if k > 1 else np.zeros(n_lines, np.int64))
                           for k in sorted({1} | {c for c in CLASS_CHOICES if c <= k_max})]
            for k, labels in options:
                bits = sum(_bits(hist[labels == c]) for c in range(k))
                bits += 8 * (escapes + k * STREAM_OVERHEAD + n_lines)
                if best is None or bits < best[0]:
                    best = (bits, by_cols, bases, labels, k)
    _, piece.by_cols, bases, labels, piece.n_classes = best
    return bases, labels.astype(np.uint8)


def _encode_words(words: np.ndarray, segments: Sequence[Segment], dtype: str, level: int,
                  split: bool | None = None) -> bytes:
    """Method 1. `split` (float16 only; default: yes) codes the exponents as nibbles and the top byte's 3 mantissa
    bits as bit-planes (SPEC 13.4), instead of the top bytes as byte symbols: half the Huffman symbols, ~0.4 % of
    the words' bits more (SmolLM2-135M 25 %: float16 `raw` 84.85 -> 85.21 %, decoding ~25 % faster)."""
    n, ws = words.size, words.dtype.itemsize
    rot = (words << words.dtype.type(1)) | (words >> words.dtype.type(8 * ws - 1))
    planes = rot.view(np.uint8).reshape(n, ws)
    top = planes[:, ws - 1]  # little-endian: the last byte is the top one

    def model(nibbles: bool, split: bool) -> tuple[list, list, int]:
        shift = 0 if split else _exp_shift(dtype)
        sym = top >> np.uint8(3) if split else top  # split: the float16 exponent alone
        plans, coded, n_esc = [], [], 0
        for whole in _pieces(n, segments):
            grid_all = sym[whole.offset:whole.offset + whole.size].reshape(whole.rows, whole.cols)
            bases_all, classes_all = _plan(grid_all, whole, shift, nibbles)  # one plan per tensor, for its bands
            for r0, r1 in _bands(whole):
                p = _Piece(whole.offset + r0 * whole.cols, r1 - r0, whole.cols, whole.by_cols, whole.n_classes)
                grid = grid_all[r0:r1]
                bases, classes = (bases_all, classes_all) if p.by_cols else (bases_all[r0:r1], classes_all[r0:r1])
                shifted = bases << np.uint8(shift)
                res = grid - (shifted[None, :] if p.by_cols else shifted[:, None])
                streams, escapes = [], []
                for c in range(p.n_classes):  # a class's rows; or, by_cols, its columns row by row
                    sel = classes == c
                    r, t = (res[:, sel], grid[:, sel]) if p.by_cols else (res[sel], grid[sel])
                    r, t = r.reshape(-1), t.reshape(-1)
                    if nibbles:
                        esc = r >= ESCAPE
                        escapes.append(t[esc])
                        r = np.where(esc, np.uint8(ESCAPE), r)
                        if r.size & 1:
                            r = np.append(r, np.uint8(0))
                        r = r[0::2] | (r[1::2] << np.uint8(4))
                    else:
                        escapes.append(np.zeros(0, np.uint8))
                    streams.append(r)
                del res
                p.escapes = tuple(e.size for e in escapes)
                n_esc += sum(p.escapes)
                plans.append(p)
                coded.append((bases, classes, streams, escapes))
        return plans, coded, n_esc

    split = dtype == "float16" and split is not False
    nibbles = split or dtype != "float16"  # (float16's top bytes hold 3 mantissa bits: nibbles only when split)
    pieces, coded, n_esc = model(nibbles, split)
    if nibbles and n_esc > n * MAX_ESCAPE_FRACTION:  # exponents too spread for a nibble window: code the top bytes
        nibbles = split = False
        pieces, coded, n_esc = model(False, False)

    head = bytearray([VERSION, (FLAG_NIBBLES if nibbles else 0) | (FLAG_SPLIT if split else 0), CHUNK_LOG2])
    _put_varint(head, len(pieces))
    for p in pieces:
        _put_varint(head, p.rows)
        _put_varint(head, p.cols)
        head += bytes([int(p.by_cols), p.n_classes])
        for e in p.escapes:
            _put_varint(head, e)
    parts: list = []
    chunk = 1 << CHUNK_LOG2
    sym_params = _symbol_params(level)
    _encode_stream(head, parts, np.concatenate([c[0] for c in coded]), sym_params, chunk)
    _encode_stream(head, parts, np.concatenate([c[1] for c in coded]), sym_params, chunk)
    for c in coded:
        for j, s in enumerate(c[2]):
            _encode_stream(head, parts, s, sym_params, chunk)
            c[2][j] = s = None  # coded: its raw symbols can go (at 70B the embeddings' are 0.8 GB)
    _encode_stream(head, parts, np.concatenate([e for c in coded for e in c[3]] or [np.zeros(0, np.uint8)]),
                   sym_params, chunk)
    byte_params = _byte_params(level)
    if split:  # bit-plane j: bit j of every word's 3 mantissa bits, 8 words a byte (low bit first)
        m = top & np.uint8(7)
        _encode_stream(head, parts, np.concatenate([np.packbits((m >> np.uint8(j)) & np.uint8(1), bitorder="little")
                                                    for j in range(3)]), byte_params, chunk)
    for k in range(ws - 1):
        _encode_stream(head, parts, np.ascontiguousarray(planes[:, k]), byte_params, chunk)
    return b"".join([head, *parts])  # one copy of the output, not two


def read_piece(r: "_Reader", n: int, pos: int) -> "_Piece":
    """One piece's header (rows, cols, line direction, class count), checked against the n - pos words left; shared
    by methods 1 and 2 (SPEC 13.4, 13.8)."""
    rows, cols = r.varint(n, "piece rows"), r.varint(n, "piece cols")
    by_cols, k = r.byte(), r.byte()
    if by_cols > 1 or not 1 <= k <= MAX_CLASSES or rows == 0 or cols == 0 or rows * cols > n - pos:
        raise FormatError(f"entropy header: bad piece {rows}x{cols} (lines {by_cols}, {k} classes) at word "
                          f"{pos} of {n}")
    return _Piece(pos, rows, cols, bool(by_cols), k)


def _decode_words(stored: memoryview, n: int, ws: int, dtype: str, dest: np.ndarray | None = None,
                  threads: bool = True, release=None) -> np.ndarray:
    r, chunk = _read_prefix(stored, allowed_flags=FLAG_NIBBLES | FLAG_SPLIT)
    nibbles, split = bool(stored[1] & FLAG_NIBBLES), bool(stored[1] & FLAG_SPLIT)
    if split and (dtype != "float16" or not nibbles):
        raise FormatError(f"entropy header: split exponents need float16 words and nibbles ({dtype}, flags "
                          f"{stored[1]:#x})")
    shift = 0 if split else _exp_shift(dtype)

    n_pieces = r.varint(n, "piece count")
    pieces, pos, n_lines, n_esc = [], 0, 0, 0
    for _ in range(n_pieces):
        p = read_piece(r, n, pos)
        p.escapes = tuple(r.varint(p.size, "escape count") for _ in range(p.n_classes))
        pieces.append(p)
        pos += p.size
        n_lines += p.n_lines
        n_esc += sum(p.escapes)
    if pos != n:
        raise FormatError(f"entropy header: pieces cover {pos} words, the section has {n}")
    if n_esc and not nibbles:
        raise FormatError("entropy header: escapes in a section without nibbles")

    dpos = [0]

    def stream(limit: int, what: str, exact: bool = True) -> _StreamRef:
        ref = _read_stream(r, limit, chunk, dpos, what)
        if exact and ref.raw_len != limit:
            raise FormatError(f"{what} holds {ref.raw_len} bytes, expected {limit}")
        return ref

    base_ref, class_ref = stream(n_lines, "base stream"), stream(n_lines, "class stream")
    sym_refs = []
    for p in pieces:  # each class stream's exact length is checked against its lines when it is unpacked
        limit = (p.size + 1) // 2 + p.n_classes if nibbles else p.size
        sym_refs.append([stream(limit, "symbol stream", exact=False) for _ in range(p.n_classes)])
        if sum(ref.raw_len for ref in sym_refs[-1]) > limit:  # bound the allocation before it is made
            raise FormatError(f"piece at word {p.offset}: its symbol streams hold more than {limit} bytes")
    esc_ref = stream(n_esc, "escape stream")
    mant_ref = stream(3 * -(-n // 8), "mantissa stream") if split else None
    plane_refs = [stream(n, f"plane {k}") for k in range(ws - 1)]
    _check_total(stored, r.pos, dpos[0])
    data0 = r.pos

    # Work memory (the decoded streams) comes from a pool: fresh memory costs a fault per page.
    return _assemble_words(stored, data0, n, ws, shift, nibbles, pieces, base_ref, class_ref, sym_refs, esc_ref,
                           plane_refs, mant_ref, chunk, dest, threads and n * ws >= _PARALLEL_BYTES, release)


def _assemble_words(stored, data0, n, ws, shift, nibbles, pieces, base_ref, class_ref, sym_refs, esc_ref, plane_refs,
                    mant_ref, chunk: int, dest: np.ndarray | None, parallel: bool, release) -> np.ndarray:
    """Decode in *waves* of consecutive pieces (at most WAVE_WORDS words, or one larger piece): each wave's symbol
    streams and its window of the low planes, then its words. Scratch is one wave's, not the section's, and the
    stored bytes a wave used are handed to `release(start, end)` (a store may drop them) as soon as it is done."""
    out = np.empty(n, _WORD[ws]) if dest is None else dest.view(_WORD[ws])  # every word is written below
    waves, cur, size = [], [], 0
    for i, p in enumerate(pieces):
        if cur and size + p.size > WAVE_WORDS:
            waves.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += p.size
    waves.append(cur)

    def window(wave: list[int]) -> tuple[int, int]:  # the chunk-aligned word range a wave's planes are decoded over
        a, b = pieces[wave[0]].offset, pieces[wave[-1]].offset + pieces[wave[-1]].size
        return a // chunk * chunk, min(n, -(-b // chunk) * chunk)

    def mant_ranges(a: int, b: int) -> list[tuple[int, int]]:  # bit-plane j's bytes for words [a, b) (a % 8 == 0)
        per = -(-n // 8)
        return [(j * per + a // 8, j * per + -(-b // 8)) for j in range(3)]

    def wave_scratch(wave: list[int]) -> int:
        a, b = window(wave)
        mant = sum(_window_scratch(mant_ref, x, y, chunk) for x, y in mant_ranges(a, b)) if mant_ref else 0
        return sum(r.raw_len for i in wave for r in sym_refs[i] if not r.stored) + \
            sum(_window_scratch(ref, a, b, chunk) for ref in plane_refs) + mant

    small = [r for r in (base_ref, class_ref, esc_ref) if not r.stored]
    area = _SCRATCH.take(sum(r.raw_len for r in small) + max(wave_scratch(w) for w in waves))
    try:
        alloc = _Carve(area)
        # the per-line and escape streams are small (a byte per line, a byte per escape): all of them up front
        tasks: list = []
        bases = _stream_array(stored, data0, base_ref, tasks, "base stream", alloc)
        classes = _stream_array(stored, data0, class_ref, tasks, "class stream", alloc)
        esc = _stream_array(stored, data0, esc_ref, tasks, "escape stream", alloc)
        _run(tasks, parallel)
        line0, esc0, fixed = 0, 0, alloc.used
        lines_at, escs_at = [], []
        for p in pieces:
            lines_at.append(line0)
            line0 += p.n_lines
            escs = []
            for c in range(p.n_classes):
                escs.append(esc[esc0:esc0 + p.escapes[c]])
                esc0 += p.escapes[c]
            escs_at.append(escs)
        released = [0] * len(plane_refs)  # per plane: how many of its chunks were handed back
        mant_released = [False] * len(mant_ref.chunks) if mant_ref is not None else []
        for w, wave in enumerate(waves):
            alloc.used = fixed  # the wave's streams reuse the previous wave's scratch
            a, b = window(wave)
            # 1. zstd: the wave's symbol streams and its window of every low plane (stored chunks are views)
            tasks = []
            syms = {i: [_stream_array(stored, data0, ref, tasks, "symbol stream", alloc) for ref in sym_refs[i]]
                    for i in wave}
            lo = [_stream_window(stored, data0, ref, a, b, chunk, tasks, f"plane {k}", alloc)
                  for k, ref in enumerate(plane_refs)]
            mant = None if mant_ref is None else \
                [_stream_window(stored, data0, mant_ref, x, y, chunk, tasks, "mantissa stream", alloc)
                 for x, y in mant_ranges(a, b)]
            _run(tasks, parallel)
            # 2. each piece's symbols + escapes + the low planes -> its words, row by row (one task per piece)
            ow = out[a:b]
            tasks = [lambda i=i: _decode_piece(ow, lo, pieces[i], pieces[i].offset - a,
                                               classes[lines_at[i]:lines_at[i] + pieces[i].n_lines],
                                               bases[lines_at[i]:lines_at[i] + pieces[i].n_lines], shift, nibbles,
                                               syms[i], escs_at[i], mant) for i in wave]
            _run(tasks, parallel)
            if release is not None:
                spans = [(c[2], c[2] + c[3]) for i in wave for r in sym_refs[i] for c in r.chunks]
                if spans:  # the wave's symbol streams are contiguous in the stored bytes
                    release(data0 + min(s for s, _ in spans), data0 + max(e for _, e in spans))
                nxt = window(waves[w + 1])[0] if w + 1 < len(waves) else n
                upto = -(-nxt // chunk)
                for k, ref in enumerate(plane_refs):  # the plane chunks no later wave reads
                    done = ref.chunks[released[k]:upto]
                    if done:
                        release(data0 + done[0][2], data0 + done[-1][2] + done[-1][3])
                    released[k] = max(released[k], upto)
                if mant_ref is not None:  # the mantissa chunks no later wave reads (of any of the 3 bit-planes)
                    ahead = mant_ranges(nxt, n) if nxt < n else []
                    done = [k for k, c in enumerate(mant_ref.chunks)
                            if not mant_released[k] and not any(y < c[0] + c[1] and c[0] < end for y, end in ahead)]
                    for k in done:
                        c = mant_ref.chunks[k]
                        release(data0 + c[2], data0 + c[2] + c[3])
                        mant_released[k] = True
    finally:
        _SCRATCH.give(area)
    return out.view(np.uint8)


def _stream_window(stored, data0: int, ref: _StreamRef, a: int, b: int, chunk: int, tasks: list, what: str,
                   alloc) -> np.ndarray:
    """Bytes [a, b) of a stream: a view when stored, else (part of) a buffer that `tasks` fill with the chunks
    covering them (`_window_scratch` bytes)."""
    if ref.stored or b <= a:
        s0 = ref.chunks[0][2] if ref.chunks else 0
        return np.frombuffer(stored[data0 + s0 + a: data0 + s0 + max(a, b)], np.uint8)
    c0, c1 = a // chunk, -(-b // chunk)
    start = c0 * chunk
    buf = alloc(_window_scratch(ref, a, b, chunk))
    for c in ref.chunks[c0:c1]:
        tasks.append(lambda c=c: _decode_chunk(stored, data0, (c[0] - start, *c[1:]), buf, what))
    return buf[a - start:b - start]


def _window_scratch(ref: _StreamRef, a: int, b: int, chunk: int) -> int:
    """Scratch bytes `_stream_window` takes for bytes [a, b) of the stream: its chunks covering them, or none."""
    return 0 if ref.stored or b <= a else min(ref.raw_len, -(-b // chunk) * chunk) - a // chunk * chunk


class _Carve:
    """Consecutive slices of one scratch buffer: `carve(k)` is its next k bytes; setting `used` back reuses them."""

    def __init__(self, area: np.ndarray):
        self.area, self.used = area, 0

    def __call__(self, k: int) -> np.ndarray:
        self.used += k
        return self.area[self.used - k:self.used]


class _ScratchPool:
    """Work buffers kept between sections (and between loads): a fresh buffer costs a page fault per 4 KiB, as
    much as decoding into it. Keeps at most KEEP buffers of at most MAX_BYTES each."""

    KEEP, MAX_BYTES = 2, 1 << 26

    def __init__(self):
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()

    def take(self, n: int) -> np.ndarray:
        with self.lock:
            for i, buf in enumerate(self.free):
                if buf.size >= n:
                    return self.free.pop(i)[:n]
        return np.empty(max(n, 1 << 20), np.uint8)[:n]

    def give(self, buf: np.ndarray) -> None:
        base = buf.base if isinstance(buf.base, np.ndarray) else buf
        if base.size <= self.MAX_BYTES:
            with self.lock:
                self.free = sorted(self.free + [base], key=lambda b: b.size)[-self.KEEP:]


_SCRATCH = _ScratchPool()


def _decode_piece(out, lo, p: _Piece, offset: int, classes, bases, shift: int, nibbles: bool, streams,
                  escapes, mantissa=None) -> None:
    """Piece p's words into `out` (a window of the section's words, as `lo` and `mantissa` are of its planes) from
    word `offset`."""
    try:
        kernels.decode(out, lo, offset, p.rows, p.cols, p.by_cols, classes, bases, shift, nibbles, streams, escapes,
                       mantissa)
    except ValueError as e:
        raise FormatError(f"piece at word {p.offset}: {e}") from None

"""The entropy stage: exponent-aware byte planes + zstd, below the symmetry codecs and above the container.

Every section goes through `compress` on write and `decompress` on read. Method 0 stores the payload as it is;
method 1 ("planes") is the format below (normative layout in SPEC.md, "Entropy stage").

How method 1 models a section of float words:
- Each word is rotated left by one bit, so the top byte is the exponent (bfloat16, float32) or the exponent and
  3 mantissa bits (float16), and the sign joins the low mantissa byte. Byte k of the rotated words forms plane k.
- The top (exponent) plane is coded per *piece*: a 2-D tensor of the section (its `Segment`) or a run of 1-D words
  between them. Each piece subtracts a base exponent per row, per column or one for all, whichever codes
  smallest, so rows or columns of very different scale (SliceGPT's PCA-ordered columns) share one residual
  distribution.
- bfloat16/float32 exponents carry ~2.6 bits, where zstd's Huffman loses a lot and its match finder hurts. So their
  residuals are packed two per byte as nibbles (15 = escape, full byte in an escape stream): the packed bytes
  carry ~5.2 bits, where Huffman is nearly exact. float16 top bytes (~5.5 bits) are coded as bytes.
- The other planes (sign and mantissa) are near-random: zstd keeps a chunk only where it is smaller.
- Every stream is cut into chunks, each its own zstd frame (or stored), so decoding runs on all cores: zstd and
  the large numpy operations release the GIL.
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

from ..errors import BBFError, FormatError
from .base import Segment

METHOD_NONE = 0
METHOD_PLANES = 1

VERSION = 1
FLAG_NIBBLES = 1  # the exponent residuals are packed two per byte, with an escape stream
CHUNK_LOG2 = 19  # 512 KiB of stream bytes per chunk: enough chunks for 2+ cores on a block-sized section
MIN_CHUNK_LOG2, MAX_CHUNK_LOG2 = 12, 26
ESCAPE = 15
NIBBLE_WINDOW = 15  # residuals 0..14 fit a nibble
MIN_SEARCH_WORDS = 4096  # smaller pieces are not worth trying per-row/per-column bases
_TRIAL_WORDS = 1 << 18  # words of a piece the base-mode trial compresses
_BASE_SAMPLE = 2048  # words of a row or column its base is estimated from
MAX_ESCAPE_FRACTION = 1 / 16  # more escapes than this: nibbles lose, code the exponent bytes instead
_PARALLEL_BYTES = 1 << 20  # below this a section decodes on the calling thread

_DTYPE_WORD_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


# ---------------------------------------------------------------------------------------------------------------
# Public interface


def compress(payload: bytes, word_size: int, segments: Sequence[Segment], dtype: str, level: int = 3
             ) -> tuple[int, bytes]:
    """Entropy-code one section payload: (method, stored bytes). Stores raw (method 0) unless that is larger."""
    _check_kind(word_size, dtype, BBFError)
    raw_len = len(payload)
    if raw_len % word_size:
        raise BBFError(f"payload of {raw_len} bytes is not a whole number of {word_size}-byte words")
    if raw_len == 0:
        return METHOD_NONE, b""
    if word_size == 1:
        stored = _encode_bytes(payload, level)
    else:
        stored = _encode_words(np.frombuffer(payload, _WORD[word_size]), segments, dtype, level)
    if len(stored) >= raw_len:
        return METHOD_NONE, bytes(payload)
    return METHOD_PLANES, stored


def decompress(method: int, stored: bytes, raw_len: int, word_size: int, dtype: str) -> bytes | bytearray:
    """Undo `compress`. Never allocates more than `raw_len` (plus bounded bookkeeping); FormatError on bad data."""
    _check_kind(word_size, dtype, FormatError)
    if raw_len < 0 or raw_len % word_size:
        raise FormatError(f"section raw length {raw_len} is not a whole number of {word_size}-byte words")
    if method == METHOD_NONE:
        if len(stored) != raw_len:
            raise FormatError(f"stored section is {len(stored)} bytes, expected {raw_len} (method none)")
        return bytes(stored)
    if method != METHOD_PLANES:
        raise FormatError(f"unknown entropy method {method} (this reader knows 0 and 1)")
    if raw_len == 0:
        raise FormatError("an empty section must be stored with method 0")
    if word_size == 1:
        return _decode_bytes(memoryview(stored), raw_len)
    return _decode_words(memoryview(stored), raw_len // word_size, word_size, dtype)


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

    def varint(self, limit: int, what: str) -> int:
        v, shift = 0, 0
        while True:
            b = self.byte()
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise FormatError(f"entropy header: varint for {what} is too long")
        if v > limit:
            raise FormatError(f"entropy header: {what} = {v} exceeds its limit {limit}")
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
    """Append one stream: its raw length and chunk table to the header, its chunks to the data parts."""
    buf = memoryview(stream).cast("B") if isinstance(stream, np.ndarray) else memoryview(stream)
    _put_varint(out_dir, len(buf))
    cctx = _cctx(params)
    for start in range(0, len(buf), chunk):
        piece = buf[start:start + chunk]
        z = cctx.compress(piece)
        if len(z) < len(piece):
            _put_varint(out_dir, len(z) << 1 | 1)
            data_parts.append(z)
        else:
            _put_varint(out_dir, len(piece) << 1)
            data_parts.append(piece)


@dataclass
class _StreamRef:
    raw_len: int
    chunks: list  # (raw_start, raw_len, stored_start, stored_len, is_zstd)


def _read_stream(r: _Reader, limit: int, chunk: int, data_pos: list, what: str) -> _StreamRef:
    raw_len = r.varint(limit, f"{what} length")
    chunks, start = [], 0
    while start < raw_len:
        n = min(chunk, raw_len - start)
        v = r.varint(2 * chunk + 1, f"{what} chunk size")
        size, is_zstd = v >> 1, bool(v & 1)
        if not is_zstd and size != n:
            raise FormatError(f"{what}: stored chunk of {size} bytes, expected {n}")
        chunks.append((start, n, data_pos[0], size, is_zstd))
        data_pos[0] += size
        start += n
    return _StreamRef(raw_len, chunks)


def _chunk_bytes(data: memoryview, base: int, ref: tuple, what: str) -> np.ndarray:
    """One chunk's raw bytes: a view of a stored chunk, or its zstd frame decoded (never more than its size)."""
    _, n, s0, size, is_zstd = ref
    src = data[base + s0: base + s0 + size]
    if not is_zstd:
        return np.frombuffer(src, np.uint8)
    try:
        declared = zstd.frame_content_size(src)
    except zstd.ZstdError:
        declared = "no valid frame header"
    if declared != n:
        raise FormatError(f"{what}: zstd chunk declares {declared} bytes, expected {n}")
    try:
        plain = _dctx().decompress(src, max_output_size=n)
    except zstd.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd chunk ({e})") from None
    if len(plain) != n:
        raise FormatError(f"{what}: zstd chunk decoded to {len(plain)} bytes, expected {n}")
    return np.frombuffer(plain, np.uint8)


def _decode_chunk(data: memoryview, base: int, ref: tuple, out: np.ndarray, what: str) -> None:
    out[ref[0]:ref[0] + ref[1]] = _chunk_bytes(data, base, ref, what)


def _stream_array(data: memoryview, base: int, ref: _StreamRef, tasks: list, what: str) -> np.ndarray:
    """The stream's bytes: a view into `data` when every chunk is stored, else a buffer filled by `tasks`."""
    if all(not c[4] for c in ref.chunks) and ref.chunks:
        s0 = ref.chunks[0][2]
        return np.frombuffer(data[base + s0: base + s0 + ref.raw_len], np.uint8)
    out = np.empty(ref.raw_len, np.uint8)
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
    head, parts = bytearray([VERSION, 0, CHUNK_LOG2]), []
    _encode_stream(head, parts, payload, _byte_params(level), 1 << CHUNK_LOG2)
    return bytes(head) + b"".join(parts)


def _decode_bytes(stored: memoryview, raw_len: int) -> bytes:
    r, chunk = _read_prefix(stored, allowed_flags=0)
    pos = [0]
    ref = _read_stream(r, raw_len, chunk, pos, "byte stream")
    if ref.raw_len != raw_len:
        raise FormatError(f"byte stream holds {ref.raw_len} bytes, expected {raw_len}")
    _check_total(stored, r.pos, pos[0])
    tasks: list = []
    out = _stream_array(stored, r.pos, ref, tasks, "byte stream")
    _run(tasks, raw_len >= _PARALLEL_BYTES)
    return out.tobytes()


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
    """A run of words coded as a rows x cols grid (row-major), with a base exponent per row or per column."""

    offset: int  # in words
    rows: int
    cols: int
    per_col: bool = False

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def n_bases(self) -> int:
        return self.cols if self.per_col else self.rows


def _pieces(n: int, segments: Sequence[Segment]) -> list[_Piece]:
    """Tile [0, n) with the 2-D segments and 1-row pieces for the words between them."""
    pieces, pos = [], 0
    for s in sorted((s for s in segments if s.rows and s.cols), key=lambda s: s.offset):
        if s.rows < 0 or s.cols < 0 or s.offset < pos or s.offset + s.rows * s.cols > n:
            raise BBFError(f"segment {s} overlaps another or lies outside the {n}-word payload")
        if s.offset > pos:
            pieces.append(_Piece(pos, 1, s.offset - pos))
        pieces.append(_Piece(s.offset, s.rows, s.cols))
        pos = s.offset + s.rows * s.cols
    if pos < n:
        pieces.append(_Piece(pos, 1, n - pos))
    return pieces


def _exp_shift(dtype: str) -> int:
    """Bits of mantissa below the exponent in the top byte of a rotated word."""
    return 3 if dtype == "float16" else 0


def _line_bases(top: np.ndarray, shift: int, nibbles: bool) -> np.ndarray:
    """Per row of `top`, the base exponent: start of the densest 15-wide window (nibbles), else the mode."""
    k = 256 >> shift
    bases = np.empty(top.shape[0], np.uint8)
    step = max(1, min((1 << 22) // k, (1 << 22) // max(1, top.shape[1])))
    for a in range(0, top.shape[0], step):
        blk = top[a:a + step] >> np.uint8(shift)
        m = blk.shape[0]
        counts = np.bincount((np.arange(m, dtype=np.int64)[:, None] * k + blk).ravel(), minlength=m * k)
        counts = counts.reshape(m, k)
        if nibbles:
            wrapped = np.cumsum(np.concatenate([counts, counts[:, :NIBBLE_WINDOW - 1]], axis=1), axis=1)
            c = np.concatenate([np.zeros((m, 1), np.int64), wrapped], axis=1)
            bases[a:a + m] = (c[:, NIBBLE_WINDOW:NIBBLE_WINDOW + k] - c[:, :k]).argmax(axis=1)
        else:
            bases[a:a + m] = counts.argmax(axis=1)
    return bases


def _residuals(grid: np.ndarray, bases: np.ndarray, per_col: bool, shift: int) -> np.ndarray:
    b = bases << np.uint8(shift)
    return grid - (b[None, :] if per_col else b[:, None])


def _pack(res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual bytes -> (nibble-packed bytes, escape stream: u32 LE position deltas then the escaped bytes)."""
    res = res.ravel()
    esc = res >= ESCAPE
    nib = np.where(esc, np.uint8(ESCAPE), res)
    if nib.size & 1:
        nib = np.append(nib, np.uint8(0))
    pos = np.flatnonzero(esc)
    deltas = np.diff(pos, prepend=0).astype("<u4")
    return nib[0::2] | (nib[1::2] << np.uint8(4)), np.concatenate([deltas.view(np.uint8), res[pos]])


def _coded_size(res: np.ndarray, bases: np.ndarray, nibbles: bool, cctx: zstd.ZstdCompressor) -> int:
    streams = _pack(res) if nibbles else (np.ascontiguousarray(res),)
    return sum(len(cctx.compress(s)) for s in streams) + len(cctx.compress(bases))


def _choose(grid: np.ndarray, piece: _Piece, shift: int, nibbles: bool, cctx: zstd.ZstdCompressor) -> np.ndarray:
    """Set the piece's base mode to whichever codes smallest: one base, a base per row, a base per column.

    The trial runs on a sample of rows (about _TRIAL_WORDS), the bases on up to _BASE_SAMPLE words per row or
    column. Returns the bases. (Column-major order, so that zstd's per-block tables follow the columns, saved
    another 0.1-0.4% on PCA-ordered tensors, but numpy's transposed copy made decoding ~3x slower: not used.)"""
    one = _line_bases(_sample(grid.reshape(1, -1), _TRIAL_WORDS), shift, nibbles)
    if piece.size < MIN_SEARCH_WORDS or piece.rows == 1:
        return np.repeat(one, piece.rows)
    rows = grid[::-(-piece.rows * piece.cols // _TRIAL_WORDS)]
    best = None
    for per_col in (None, False, True):
        if per_col is None:
            bases = np.repeat(one, rows.shape[0])
        else:
            bases = _line_bases(_col_sample(rows) if per_col else _sample(rows, _BASE_SAMPLE), shift, nibbles)
        size = _coded_size(_residuals(rows, bases, bool(per_col), shift), bases, nibbles, cctx)
        if best is None or size < best[0]:
            best = (size, per_col)
    piece.per_col = bool(best[1])
    if best[1] is None:
        return np.repeat(one, piece.rows)
    if piece.per_col:
        return _line_bases(_col_sample(grid), shift, nibbles)
    return _line_bases(_sample(grid, _BASE_SAMPLE), shift, nibbles)


def _sample(lines: np.ndarray, limit: int) -> np.ndarray:
    """At most about `limit` evenly spaced elements of each line."""
    return lines[:, ::-(-lines.shape[1] // limit)]


def _col_sample(grid: np.ndarray) -> np.ndarray:
    """The columns of `grid` as lines, each sampled to about _BASE_SAMPLE elements."""
    return np.ascontiguousarray(grid[::-(-grid.shape[0] // _BASE_SAMPLE)].T)


def _encode_words(words: np.ndarray, segments: Sequence[Segment], dtype: str, level: int) -> bytes:
    n, ws = words.size, words.dtype.itemsize
    shift = _exp_shift(dtype)
    bits = ws * 8
    rot = (words << words.dtype.type(1)) | (words >> words.dtype.type(bits - 1))
    top = rot.view(np.uint8).reshape(n, ws)[:, ws - 1]  # little-endian: the last byte is the top one
    pieces = _pieces(n, segments)
    sym_params = _symbol_params(level)
    cctx = _cctx(sym_params)

    def model(nibbles: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        res, bases = np.empty(n, np.uint8), []
        for p in pieces:
            g = top[p.offset:p.offset + p.size].reshape(p.rows, p.cols)
            b = _choose(g, p, shift, nibbles, cctx)
            res[p.offset:p.offset + p.size] = _residuals(g, b, p.per_col, shift).ravel()
            bases.append(b)
        return res, bases

    nibbles = shift == 0 and n < 1 << 32
    res, bases = model(nibbles)
    if nibbles and np.count_nonzero(res >= ESCAPE) > n * MAX_ESCAPE_FRACTION:
        nibbles = False
        res, bases = model(False)

    planes = rot.view(np.uint8).reshape(n, ws)

    head = bytearray([VERSION, FLAG_NIBBLES if nibbles else 0, CHUNK_LOG2])
    _put_varint(head, len(pieces))
    for p in pieces:
        _put_varint(head, p.rows)
        _put_varint(head, p.cols)
        head.append(int(p.per_col))
    parts: list = []
    chunk = 1 << CHUNK_LOG2
    _encode_stream(head, parts, np.concatenate(bases), sym_params, chunk)
    for s in (_pack(res) if nibbles else (res,)):
        _encode_stream(head, parts, s, sym_params, chunk)
    byte_params = _byte_params(level)
    for k in range(ws - 1):
        _encode_stream(head, parts, np.ascontiguousarray(planes[:, k]), byte_params, chunk)
    return bytes(head) + b"".join(parts)


_TILE = 1 << 18  # words per decode tile: its planes and words stay in L2


def _decode_words(stored: memoryview, n: int, ws: int, dtype: str) -> bytearray:
    r, chunk = _read_prefix(stored, allowed_flags=FLAG_NIBBLES)
    nibbles = bool(stored[1] & FLAG_NIBBLES)
    shift = _exp_shift(dtype)

    n_pieces = r.varint(n, "piece count")
    pieces, pos, n_bases = [], 0, 0
    for _ in range(n_pieces):
        rows, cols = r.varint(n, "piece rows"), r.varint(n, "piece cols")
        mode = r.byte()
        if mode > 1 or rows == 0 or cols == 0 or rows * cols > n - pos:
            raise FormatError(f"entropy header: bad piece {rows}x{cols} (mode {mode}) at word {pos} of {n}")
        pieces.append(_Piece(pos, rows, cols, bool(mode)))
        pos += rows * cols
        n_bases += pieces[-1].n_bases
    if pos != n:
        raise FormatError(f"entropy header: pieces cover {pos} words, the section has {n}")

    dpos = [0]

    def stream(limit: int, what: str, exact: bool = True) -> _StreamRef:
        ref = _read_stream(r, limit, chunk, dpos, what)
        if exact and ref.raw_len != limit:
            raise FormatError(f"{what} holds {ref.raw_len} bytes, expected {limit}")
        return ref

    base_ref = stream(n_bases, "base stream")
    sym_ref = stream((n + 1) // 2 if nibbles else n, "exponent stream")
    esc_ref = stream(5 * n, "escape stream", exact=False) if nibbles else None
    plane_refs = [stream(n, f"plane {k}") for k in range(ws - 1)]
    _check_total(stored, r.pos, dpos[0])
    data0 = r.pos
    parallel = n * ws >= _PARALLEL_BYTES

    # Phase 1 puts each word's top byte in place (unpacking the nibbles); phase 2 adds the bases, ORs the low
    # planes in and rotates back, tile by tile. Chunks and tiles run on all cores (zstd and numpy release the GIL).
    out_buf = bytearray(n * ws)
    out = np.frombuffer(out_buf, _WORD[ws])
    tasks: list = []
    bases = _stream_array(stored, data0, base_ref, tasks, "base stream")
    lo = [_stream_array(stored, data0, ref, tasks, f"plane {k}") for k, ref in enumerate(plane_refs)]
    if nibbles:
        esc = _stream_array(stored, data0, esc_ref, tasks, "escape stream")
        tasks.extend((lambda c=c: _unpack_chunk(stored, data0, c, out)) for c in sym_ref.chunks)
    else:
        tasks.extend((lambda c=c: _top_chunk(stored, data0, c, out)) for c in sym_ref.chunks)
    _run(tasks, parallel)
    if nibbles:
        _patch_escapes(out, esc)

    tasks, b0 = [], 0
    for p in pieces:
        tasks.extend((lambda p=p, t=t, b0=b0: _finish_tile(p, t, out, lo, bases[b0:b0 + p.n_bases], shift))
                     for t in _tiles(p))
        b0 += p.n_bases
    _run(tasks, parallel)
    return out_buf


def _tiles(p: _Piece) -> list[tuple[int, int, int, int]]:
    """Split a piece into (row0, row1, col0, col1) tiles of about _TILE words: whole rows unless rows are long."""
    nw = min(p.cols, _TILE)
    nl = max(1, _TILE // nw)
    return [(a, min(p.rows, a + nl), c, min(p.cols, c + nw))
            for a in range(0, p.rows, nl) for c in range(0, p.cols, nw)]


def _unpack_chunk(stored: memoryview, data0: int, c: tuple, out: np.ndarray) -> None:
    """Nibble-packed residuals -> the top byte of their two words (pairs handled as one double-width word)."""
    packed = _chunk_bytes(stored, data0, c, "exponent stream")
    ws, n = out.dtype.itemsize, len(out)
    top_shift = 8 * ws - 8
    pairs = min(c[1], n // 2 - c[0])  # the last byte of an odd section holds one word
    wide = np.dtype(f"<u{2 * ws}")
    dst = out[2 * c[0]: 2 * (c[0] + pairs)].view(wide)
    np.copyto(dst, packed[:pairs], casting="unsafe")
    # One multiply puts the byte at both words' top bytes (the copies do not overlap); the mask keeps the low
    # nibble in the first word and the high nibble in the second.
    dst *= wide.type((1 << top_shift) | (1 << (top_shift + 8 * ws - 4)))
    dst &= wide.type((15 << top_shift) | (15 << (top_shift + 8 * ws)))
    if pairs < c[1]:
        out[n - 1] = out.dtype.type(packed[pairs] & 15) << out.dtype.type(top_shift)


def _top_chunk(stored: memoryview, data0: int, c: tuple, out: np.ndarray) -> None:
    top = _chunk_bytes(stored, data0, c, "exponent stream")
    np.left_shift(top, 8 * out.dtype.itemsize - 8, out=out[c[0]:c[0] + c[1]], dtype=out.dtype, casting="unsafe")


def _patch_escapes(out: np.ndarray, esc: np.ndarray) -> None:
    """Write the escaped residuals at their positions (u32 LE deltas, then the bytes)."""
    if len(esc) % 5:
        raise FormatError(f"escape stream of {len(esc)} bytes is not a whole number of 5-byte escapes")
    k = len(esc) // 5
    if not k:
        return
    deltas = esc[:4 * k].view("<u4").astype(np.int64)
    if k > 1 and not deltas[1:].all():
        raise FormatError("escape positions are not strictly increasing")
    pos = np.cumsum(deltas)
    if pos[-1] >= len(out):
        raise FormatError(f"escape position {pos[-1]} lies outside the {len(out)}-word section")
    out[pos] = esc[4 * k:].astype(out.dtype) << out.dtype.type(8 * out.dtype.itemsize - 8)


def _finish_tile(p: _Piece, tile: tuple, out: np.ndarray, lo: list, bases: np.ndarray, shift: int) -> None:
    """Top part + base, OR the low planes, rotate right one bit (undoing the encoder's rotation)."""
    a, b, c, d = tile
    ws = out.dtype.itemsize
    word = out.dtype.type

    def grid(x: np.ndarray) -> np.ndarray:
        return x[p.offset:p.offset + p.size].reshape(p.rows, p.cols)[a:b, c:d]

    base = (bases[c:d][None, :] if p.per_col else bases[a:b, None]).astype(out.dtype)
    base <<= word(8 * ws - 8 + shift)
    w = grid(out)
    w += base
    for k, plane in enumerate(lo):
        low = grid(plane)
        w |= (low.astype(out.dtype) << word(8 * k)) if k else low
    t = _scratch(w.size, out.dtype).reshape(w.shape)  # reused: a fresh temporary costs page faults
    np.right_shift(w, word(1), out=t)
    w <<= word(8 * ws - 1)
    w |= t


def _scratch(size: int, dtype: np.dtype) -> np.ndarray:
    buf = getattr(_tls, "scratch", None)
    if buf is None or buf.nbytes < size * dtype.itemsize:
        buf = _tls.scratch = np.empty(max(size * dtype.itemsize, _TILE * 4), np.uint8)
    return buf[:size * dtype.itemsize].view(dtype)

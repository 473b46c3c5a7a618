"""The entropy stage: exponent-aware byte planes + zstd, below the symmetry codecs and above the container.

Every section goes through `compress` on write and `decompress` on read. Method 0 stores the payload as it is;
method 1 ("planes") is the format below (normative layout in SPEC.md, "Entropy stage").

How method 1 models a section of float words:
- Each word is rotated left by one bit, so the top byte is the exponent (bfloat16, float32) or the exponent and
  3 mantissa bits (float16), and the sign joins the low mantissa byte. Byte k of the rotated words forms plane k.
- The top (exponent) plane is coded per *piece*: a 2-D tensor of the section (its `Segment`) or a run of 1-D words
  between them. A piece is read row- or column-major, whichever codes smaller, and each *line* (row or column, in
  that order) has a base exponent subtracted, so lines of very different scale (SliceGPT's PCA-ordered columns)
  share one residual distribution; column-major order also lets zstd's per-block Huffman tables follow the
  columns.
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
MIN_SEARCH_WORDS = 4096  # smaller pieces are not worth trying both orders
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


def decompress(method: int, stored: bytes, raw_len: int, word_size: int, dtype: str) -> bytes:
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


def _decode_chunk(data: memoryview, base: int, ref: tuple, out: np.ndarray | None, what: str):
    """Decode one chunk into `out[raw_start:raw_start+n]`, or return a zero-copy view for a stored stream."""
    raw_start, n, s0, size, is_zstd = ref
    src = data[base + s0: base + s0 + size]
    if not is_zstd:
        out[raw_start:raw_start + n] = np.frombuffer(src, np.uint8)
        return
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
    out[raw_start:raw_start + n] = np.frombuffer(plain, np.uint8)


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
    offset: int  # in words
    rows: int
    cols: int
    col_major: bool = False

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def lines(self) -> int:
        return self.cols if self.col_major else self.rows


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


def _rotl(words: np.ndarray) -> np.ndarray:
    bits = words.dtype.itemsize * 8
    return (words << words.dtype.type(1)) | (words >> words.dtype.type(bits - 1))


def _line_bases(top: np.ndarray, shift: int, nibbles: bool) -> np.ndarray:
    """Per line (row of `top`) the base exponent: the start of the densest 15-wide window (nibbles) or the mode."""
    k = 256 >> shift
    bases = np.empty(top.shape[0], np.uint8)
    step = max(1, (1 << 22) // (k * max(1, top.shape[1])) or 1)
    for a in range(0, top.shape[0], step):
        blk = top[a:a + step] >> np.uint8(shift) if shift else top[a:a + step]
        m = blk.shape[0]
        counts = np.bincount((np.arange(m, dtype=np.int64)[:, None] * k + blk).ravel(), minlength=m * k)
        counts = counts.reshape(m, k)
        if nibbles:
            c = np.concatenate([np.zeros((m, 1), np.int64), np.cumsum(np.concatenate(
                [counts, counts[:, :NIBBLE_WINDOW - 1]], axis=1), axis=1)], axis=1)
            bases[a:a + m] = (c[:, NIBBLE_WINDOW:NIBBLE_WINDOW + k] - c[:, :k]).argmax(axis=1)
        else:
            bases[a:a + m] = counts.argmax(axis=1)
    return bases


def _residuals(top: np.ndarray, bases: np.ndarray, shift: int) -> np.ndarray:
    return top - (bases << np.uint8(shift))[:, None]


def _pack(res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual bytes -> (nibble-packed bytes, escape bytes)."""
    res = res.ravel()
    esc = res >= ESCAPE
    nib = np.where(esc, np.uint8(ESCAPE), res)
    if nib.size & 1:
        nib = np.append(nib, np.uint8(0))
    return nib[0::2] | (nib[1::2] << np.uint8(4)), res[esc]


def _coded_size(res: np.ndarray, bases: np.ndarray | None, nibbles: bool, cctx: zstd.ZstdCompressor) -> int:
    if nibbles:
        packed, esc = _pack(res)
        size = len(cctx.compress(packed)) + len(cctx.compress(esc))
    else:
        size = len(cctx.compress(np.ascontiguousarray(res)))
    return size + (len(cctx.compress(bases)) if bases is not None else 0)


def _choose_piece(top: np.ndarray, piece: _Piece, shift: int, nibbles: bool, cctx: zstd.ZstdCompressor
                  ) -> tuple[bool, np.ndarray]:
    """Best of row/column order x per-line/one base for a piece, by coded size: (col_major, line bases)."""
    grid = top.reshape(piece.rows, piece.cols)
    if piece.size < MIN_SEARCH_WORDS or piece.rows == 1:
        b = _line_bases(grid.reshape(1, -1), shift, nibbles)
        return False, np.repeat(b, piece.rows)
    best = None
    for col_major in (False, True):
        g = np.ascontiguousarray(grid.T) if col_major else grid
        per_line = _line_bases(g, shift, nibbles)
        one = np.repeat(_line_bases(g.reshape(1, -1), shift, nibbles), g.shape[0])
        for bases, side in ((per_line, per_line), (one, None)):
            size = _coded_size(_residuals(g, bases, shift), side, nibbles, cctx)
            if best is None or size < best[0]:
                best = (size, col_major, bases)
    return best[1], best[2]


def _encode_words(words: np.ndarray, segments: Sequence[Segment], dtype: str, level: int) -> bytes:
    n, ws = words.size, words.dtype.itemsize
    shift = _exp_shift(dtype)
    rot = _rotl(words)
    planes = rot.view(np.uint8).reshape(n, ws)  # little-endian: column ws-1 is the top byte
    top = np.ascontiguousarray(planes[:, ws - 1])
    pieces = _pieces(n, segments)
    sym_params = _symbol_params(level)
    cctx = _cctx(sym_params)

    def model(nibbles: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        res, bases = np.empty(n, np.uint8), []
        for p in pieces:
            p.col_major, b = _choose_piece(top[p.offset:p.offset + p.size], p, shift, nibbles, cctx)
            g = top[p.offset:p.offset + p.size].reshape(p.rows, p.cols)
            g = g.T if p.col_major else g
            res[p.offset:p.offset + p.size] = _residuals(g, b, shift).ravel()
            bases.append(b)
        return res, bases

    nibbles = shift == 0
    res, bases = model(nibbles)
    if nibbles and np.count_nonzero(res >= ESCAPE) > n * MAX_ESCAPE_FRACTION:
        nibbles = False
        res, bases = model(False)

    head = bytearray([VERSION, FLAG_NIBBLES if nibbles else 0, CHUNK_LOG2])
    _put_varint(head, len(pieces))
    for p in pieces:
        _put_varint(head, p.rows)
        _put_varint(head, p.cols)
        head.append(int(p.col_major))
    parts: list = []
    chunk = 1 << CHUNK_LOG2
    _encode_stream(head, parts, np.concatenate(bases), sym_params, chunk)
    if nibbles:
        packed, esc = _pack(res)
        _encode_stream(head, parts, packed, sym_params, chunk)
        _encode_stream(head, parts, esc, sym_params, chunk)
    else:
        _encode_stream(head, parts, res, sym_params, chunk)
    byte_params = _byte_params(level)
    for k in range(ws - 1):
        _encode_stream(head, parts, np.ascontiguousarray(planes[:, k]), byte_params, chunk)
    return bytes(head) + b"".join(parts)


def _decode_words(stored: memoryview, n: int, ws: int, dtype: str) -> bytes:
    r, chunk = _read_prefix(stored, allowed_flags=FLAG_NIBBLES)
    nibbles = bool(stored[1] & FLAG_NIBBLES)
    shift = _exp_shift(dtype)

    n_pieces = r.varint(n, "piece count")
    pieces, pos, lines = [], 0, 0
    for _ in range(n_pieces):
        rows, cols = r.varint(n, "piece rows"), r.varint(n, "piece cols")
        order = r.byte()
        if order > 1 or rows == 0 or cols == 0 or rows * cols > n - pos:
            raise FormatError(f"entropy header: bad piece {rows}x{cols} (order {order}) at word {pos} of {n}")
        pieces.append(_Piece(pos, rows, cols, bool(order)))
        pos += rows * cols
        lines += pieces[-1].lines
    if pos != n:
        raise FormatError(f"entropy header: pieces cover {pos} words, the section has {n}")

    dpos = [0]
    base_ref = _read_stream(r, lines, chunk, dpos, "base stream")
    if base_ref.raw_len != lines:
        raise FormatError(f"base stream holds {base_ref.raw_len} bytes, expected {lines}")
    sym_len = (n + 1) // 2 if nibbles else n
    sym_ref = _read_stream(r, sym_len, chunk, dpos, "exponent stream")
    if sym_ref.raw_len != sym_len:
        raise FormatError(f"exponent stream holds {sym_ref.raw_len} bytes, expected {sym_len}")
    esc_ref = _read_stream(r, n, chunk, dpos, "escape stream") if nibbles else None
    plane_refs = []
    for k in range(ws - 1):
        plane_refs.append(_read_stream(r, n, chunk, dpos, f"plane {k}"))
        if plane_refs[-1].raw_len != n:
            raise FormatError(f"plane {k} holds {plane_refs[-1].raw_len} bytes, expected {n}")
    _check_total(stored, r.pos, dpos[0])
    base0 = r.pos
    parallel = n * ws >= _PARALLEL_BYTES

    # Phase 1: every chunk of every stream, in parallel; nibbles unpack inside their chunk's task.
    tasks: list = []
    bases = _stream_array(stored, base0, base_ref, tasks, "base stream")
    esc = _stream_array(stored, base0, esc_ref, tasks, "escape stream") if nibbles else None
    lo = [_stream_array(stored, base0, ref, tasks, f"plane {k}") for k, ref in enumerate(plane_refs)]
    esc_pos: list = [None] * len(sym_ref.chunks)
    if nibbles:
        res = np.empty(2 * sym_len, np.uint8)
        for i, c in enumerate(sym_ref.chunks):
            tasks.append(lambda i=i, c=c: _unpack_chunk(stored, base0, c, res, esc_pos, i))
    else:
        res = _stream_array(stored, base0, sym_ref, tasks, "exponent stream")
    _run(tasks, parallel)
    if nibbles:
        _patch_escapes(res, esc, esc_pos, sym_ref)

    # Phase 2: top bytes (residual + line base, back to row-major), then the low planes and the rotation.
    out = np.empty(n, _WORD[ws])
    planes = out.view(np.uint8).reshape(n, ws)
    top = planes[:, ws - 1]
    tasks = []
    line0 = 0
    for p in pieces:
        step = max(1, (1 << 18) // p.cols if not p.col_major else (1 << 18) // p.rows)
        for a in range(0, p.lines, step):
            tasks.append(lambda p=p, a=a, b=min(p.lines, a + step), l0=line0:
                         _fill_top(p, a, b, res, bases[l0 + a:l0 + b], top, shift))
        line0 += p.lines
    _run(tasks, parallel)
    step = 1 << 18
    _run([lambda a=a: _fill_low(planes, out, lo, a, min(n, a + step)) for a in range(0, n, step)], parallel)
    return out.tobytes()


def _unpack_chunk(stored, base0, c, res, esc_pos, i) -> None:
    raw_start, m = c[0], c[1]
    packed = np.empty(m, np.uint8)
    _decode_chunk(stored, base0, c, packed, "exponent stream")
    dst = res[2 * raw_start: 2 * (raw_start + m)]
    np.bitwise_and(packed, np.uint8(15), out=dst[0::2])
    np.right_shift(packed, np.uint8(4), out=dst[1::2])
    esc_pos[i] = np.flatnonzero(dst == ESCAPE)


def _patch_escapes(res: np.ndarray, esc: np.ndarray, esc_pos: list, sym_ref: _StreamRef) -> None:
    """Put the escape stream's bytes where the nibbles said ESCAPE (escapes are rare: this is cheap)."""
    total = sum(len(p) for p in esc_pos)
    if total != len(esc):
        raise FormatError(f"exponent stream has {total} escapes, the escape stream {len(esc)} bytes")
    k = 0
    for p, c in zip(esc_pos, sym_ref.chunks):
        res[2 * c[0] + p] = esc[k:k + len(p)]
        k += len(p)
    if len(esc) and int(esc.min()) < ESCAPE:
        raise FormatError("escape stream holds a residual that fits a nibble")


def _fill_top(p: _Piece, a: int, b: int, res: np.ndarray, bases: np.ndarray, top: np.ndarray, shift: int) -> None:
    other = p.rows if p.col_major else p.cols
    src = res[p.offset + a * other: p.offset + b * other].reshape(b - a, other)
    grid = top[p.offset:p.offset + p.size].reshape(p.rows, p.cols)
    dst = grid.T[a:b] if p.col_major else grid[a:b]
    np.add(src, (bases << np.uint8(shift))[:, None], out=dst)


def _fill_low(planes: np.ndarray, out: np.ndarray, lo: list, a: int, b: int) -> None:
    for k, plane in enumerate(lo):
        planes[a:b, k] = plane[a:b]
    w = out[a:b]
    bits = w.dtype.itemsize * 8
    t = w >> w.dtype.type(1)
    np.left_shift(w, w.dtype.type(bits - 1), out=w)
    np.bitwise_or(w, t, out=w)

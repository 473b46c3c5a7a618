"""Inner loops with a compiled version (bbformat/_kernels.c, built by `pip install`) and a reference one here.

- `decode`: the entropy stage's inner loop, a piece's symbol streams + the low planes -> words (numpy reference below).
- `triangle`: an `exact` carrier's packed triangle -> its k x k block, zeros included.
- `crc32`: zlib.crc32, folded with carry-less multiplies where the CPU has them (~4x faster).

The compiled module is used when it is importable, else the numpy/zlib versions (same results, slower). Both raise
ValueError on inconsistent input; the tests check that they agree. Set BBF_NO_C_KERNELS=1 to force the reference.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

ESCAPE = 15  # nibble value: the word's top byte is in the escape stream


def decode_numpy(out, planes, offset: int, rows: int, cols: int, by_cols: bool, classes, bases, shift: int,
                 nibbles: bool, streams, escapes) -> None:
    """Write the words of one piece (rows x cols words from word `offset` of `out`): `streams[c]` holds the
    residuals of class c, `escapes[c]` its escaped top bytes. See `decode` in _kernels.c for the arguments."""
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
        w = t.astype(wd) << wd(8 * ws - 8)
        idx = (grid[:, lines] if by_cols else grid[lines]).reshape(-1) + offset
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


def crc32_zlib(data, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


try:
    if os.environ.get("BBF_NO_C_KERNELS"):
        raise ImportError("disabled by BBF_NO_C_KERNELS")
    from . import _kernels

    COMPILED = True

    def triangle(out, offset, ld, k, lower, tri) -> None:
        _kernels.triangle(out, offset, ld, k, int(lower), tri)

    def decode(out, planes, offset, rows, cols, by_cols, classes, bases, shift, nibbles, streams, escapes) -> None:
        _kernels.decode(out, planes, offset, rows, cols, int(by_cols), classes, bases, shift, int(nibbles), streams,
                        escapes)

    crc32 = _kernels.crc32 if _kernels.CLMUL else crc32_zlib  # zlib's beats a byte table
except ImportError:  # not built (no C compiler at install time): the reference is correct, only slower
    COMPILED = False
    decode, triangle, crc32 = decode_numpy, triangle_numpy, crc32_zlib

"""Inner loops with a compiled version (bbformat/_kernels.c, built by `pip install`) and a reference one here.

- `unpack`, `assemble`: the entropy stage's symbol decoding and word assembly (numpy reference below).
- `crc32`: zlib.crc32, folded with carry-less multiplies where the CPU has them (~4x faster).

The compiled module is used when it is importable, else the numpy/zlib versions (same results, slower). Both raise
ValueError on inconsistent input; the tests check that they agree. Set BBF_NO_C_KERNELS=1 to force the reference.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

ESCAPE = 15  # nibble value: the word's top byte is in the escape stream


def unpack_numpy(top, line_len: int, classes, bases, shift: int, nibbles: bool, k: int, stream, escapes) -> int:
    """Fill the lines of class `k` in `top` (line-major, n_lines x line_len bytes); return the escapes used."""
    top = np.frombuffer(top, np.uint8) if not isinstance(top, np.ndarray) else top.reshape(-1).view(np.uint8)
    cls, b = np.frombuffer(classes, np.uint8), np.frombuffer(bases, np.uint8)
    if line_len < 0 or b.size != cls.size or top.size != cls.size * line_len or not 0 <= shift <= 7:
        raise ValueError("unpack: inconsistent sizes")
    lines = np.flatnonzero(cls == k)
    m = lines.size * line_len
    s = np.frombuffer(stream, np.uint8)
    if s.size != ((m + 1) // 2 if nibbles else m):
        raise ValueError("a symbol stream's length does not match its lines")
    if nibbles:
        r = np.empty(2 * s.size, np.uint8)
        r[0::2], r[1::2] = s & 15, s >> 4
        r = r[:m]
    else:
        r = s
    r = r.reshape(lines.size, line_len)
    t = r + (b[lines] << np.uint8(shift))[:, None]
    used = 0
    if nibbles:
        where = np.flatnonzero(r.reshape(-1) == ESCAPE)
        esc = np.frombuffer(escapes, np.uint8)
        if where.size > esc.size:
            raise ValueError("the escape stream is too short")
        t.reshape(-1)[where] = esc[:where.size]
        used = where.size
    top.reshape(cls.size, line_len)[lines] = t
    return used


def assemble_numpy(out, top, planes, offset: int, rows: int, cols: int, by_cols: bool, ws: int,
                   r0: int, r1: int) -> None:
    """Words of rows r0..r1 of a piece: rotr1(top byte << (8 ws - 8) | the low planes), written into `out`."""
    wd = {2: np.uint16, 4: np.uint32}.get(ws)
    if wd is None or len(planes) != ws - 1:
        raise ValueError("word size must be 2 or 4, with word_size - 1 planes")
    o = out.reshape(-1).view(wd)
    t = np.frombuffer(top, np.uint8)
    if t.size != rows * cols or offset + rows * cols > o.size or not 0 <= r0 <= r1 <= rows:
        raise ValueError("assemble: inconsistent sizes")
    grid = t.reshape(cols, rows).T if by_cols else t.reshape(rows, cols)
    w = grid[r0:r1].astype(wd) << wd(8 * ws - 8)
    for k, p in enumerate(planes):
        p = np.frombuffer(p, np.uint8)
        if p.size != o.size:
            raise ValueError("a byte plane does not match the section length")
        w |= p[offset:offset + rows * cols].reshape(rows, cols)[r0:r1].astype(wd) << wd(8 * k)
    o[offset + r0 * cols: offset + r1 * cols] = ((w >> wd(1)) | (w << wd(8 * ws - 1))).reshape(-1)


def crc32_zlib(data, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


try:
    if os.environ.get("BBF_NO_C_KERNELS"):
        raise ImportError("disabled by BBF_NO_C_KERNELS")
    from . import _kernels

    COMPILED = True

    def unpack(top, line_len, classes, bases, shift, nibbles, k, stream, escapes) -> int:
        return _kernels.unpack(top, line_len, classes, bases, shift, int(nibbles), k, stream, escapes)

    def assemble(out, top, planes, offset, rows, cols, by_cols, ws, r0, r1) -> None:
        _kernels.assemble(out, top, planes, offset, rows, cols, int(by_cols), ws, r0, r1)

    crc32 = _kernels.crc32 if _kernels.CLMUL else crc32_zlib  # zlib's beats a byte table
except ImportError:  # not built (no C compiler at install time): the reference is correct, only slower
    COMPILED = False
    unpack, assemble, crc32 = unpack_numpy, assemble_numpy, crc32_zlib

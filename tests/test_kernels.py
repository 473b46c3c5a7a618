"""The compiled inner loops (bbformat/_kernels.c) against their reference versions in bbformat/kernels.py."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from bbformat import kernels
from bbformat.codecs import entropy

compiled = pytest.mark.skipif(not kernels.COMPILED, reason="bbformat._kernels was not built")


def unpack_case(rng, n_lines: int, line_len: int, k: int, nibbles: bool, escape_rate: float):
    classes = rng.integers(0, k, n_lines).astype(np.uint8)
    bases = rng.integers(0, 256, n_lines).astype(np.uint8)
    streams, escapes = [], []
    for c in range(k):
        m = int((classes == c).sum()) * line_len
        if nibbles:
            sym = rng.integers(0, 15, m).astype(np.uint8)
            sym[rng.random(m) < escape_rate] = kernels.ESCAPE
            escapes.append(rng.integers(0, 256, int((sym == kernels.ESCAPE).sum())).astype(np.uint8))
            if m & 1:
                sym = np.append(sym, np.uint8(rng.integers(0, 16)))  # the pad nibble is never read
            streams.append((sym[0::2] | (sym[1::2] << 4)).astype(np.uint8))
        else:
            streams.append(rng.integers(0, 256, m).astype(np.uint8))
            escapes.append(np.zeros(0, np.uint8))
    return classes, bases, streams, escapes


@compiled
@pytest.mark.parametrize("nibbles", [True, False])
@pytest.mark.parametrize("shape", [(7, 33), (40, 64), (3, 1), (1, 101), (16, 95)])
def test_unpack_matches_reference(nibbles, shape):
    rng = np.random.default_rng(sum(shape) + nibbles)
    n_lines, line_len = shape
    classes, bases, streams, escapes = unpack_case(rng, n_lines, line_len, 3, nibbles, 0.05)
    shift = 0 if nibbles else 3
    tops = []
    for fn in (kernels.unpack_numpy, kernels._kernels.unpack):
        top = np.full(n_lines * line_len, 0xAA, np.uint8)
        for c in range(3):
            used = fn(top, line_len, classes, bases, shift, int(nibbles), c, streams[c], escapes[c])
            assert used == len(escapes[c])
        tops.append(top)
    np.testing.assert_array_equal(tops[0], tops[1])


@compiled
def test_unpack_rejects_bad_input_like_the_reference():
    rng = np.random.default_rng(1)
    classes, bases, streams, escapes = unpack_case(rng, 9, 40, 2, True, 0.1)
    assert len(escapes[0]) > 0
    for fn in (kernels.unpack_numpy, kernels._kernels.unpack):
        top = np.zeros(9 * 40, np.uint8)
        with pytest.raises(ValueError, match="escape stream is too short"):
            fn(top, 40, classes, bases, 0, 1, 0, streams[0], escapes[0][:-1])
        with pytest.raises(ValueError, match="length does not match"):
            fn(top, 40, classes, bases, 0, 1, 0, streams[0][:-1], escapes[0])
        with pytest.raises(ValueError, match="inconsistent sizes"):
            fn(top[:-1], 40, classes, bases, 0, 1, 0, streams[0], escapes[0])


@compiled
@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.parametrize("by_cols", [False, True])
def test_assemble_matches_reference(ws, by_cols):
    rng = np.random.default_rng(ws + 2 * by_cols)
    n, offset, rows, cols = 5000, 123, 70, 65  # 70 x 65 spans two transpose tiles each way
    planes = [rng.integers(0, 256, n).astype(np.uint8) for _ in range(ws - 1)]
    top = rng.integers(0, 256, rows * cols).astype(np.uint8)
    outs = []
    for fn in (kernels.assemble_numpy, kernels._kernels.assemble):
        out = np.zeros(n, np.uint16 if ws == 2 else np.uint32)
        for r0, r1 in ((0, 17), (17, 64), (64, 70)):
            fn(out, top, planes, offset, rows, cols, int(by_cols), ws, r0, r1)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    # spot-check one word against the definition: rotr1(top << (8 ws - 8) | low planes)
    grid = top.reshape(cols, rows).T if by_cols else top.reshape(rows, cols)
    r, c = 31, 64
    word = int(grid[r, c]) << (8 * ws - 8)
    for k, p in enumerate(planes):
        word |= int(p[offset + r * cols + c]) << (8 * k)
    bits = 8 * ws
    assert int(outs[1][offset + r * cols + c]) == (word >> 1) | ((word & 1) << (bits - 1))
    with pytest.raises(ValueError):
        kernels._kernels.assemble(outs[1], top, planes, n - 10, rows, cols, int(by_cols), ws, 0, rows)


@compiled
def test_crc32_matches_zlib():
    if not kernels._kernels.CLMUL:
        pytest.skip("no carry-less multiply on this CPU: bbformat uses zlib")
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 1 << 16).astype(np.uint8).tobytes()
    for n in list(range(0, 200)) + [1000, 4097, len(data)]:
        for start in (0, 3):
            chunk = memoryview(data)[start:start + n]
            assert kernels._kernels.crc32(chunk) == zlib.crc32(chunk)
            assert kernels._kernels.crc32(chunk, 0xDEADBEEF) == zlib.crc32(chunk, 0xDEADBEEF)


def test_entropy_roundtrip_with_the_reference_kernels(monkeypatch):
    """The numpy path (used when the C module is not built) decodes what the encoder wrote."""
    monkeypatch.setattr(kernels, "unpack", kernels.unpack_numpy)
    monkeypatch.setattr(kernels, "assemble", kernels.assemble_numpy)
    rng = np.random.default_rng(4)
    scale = np.exp(rng.normal(0, 2, (1, 96)))
    w = (rng.standard_normal((256, 96)) * scale).astype(np.float32)
    w[5, 7] = 1e30  # far outside its column's window: an escape
    for dtype, arr in (("bfloat16", (w.view(np.uint32) >> 16).astype(np.uint16)), ("float32", w.view(np.uint32))):
        payload = arr.tobytes()
        method, stored = entropy.compress(payload, arr.itemsize, (entropy.Segment(0, 256, 96),), dtype)
        assert method == entropy.METHOD_PLANES
        assert bytes(entropy.decompress(method, stored, len(payload), arr.itemsize, dtype)) == payload


def test_reference_is_forced_by_environment():
    import subprocess
    import sys

    code = "from bbformat import kernels; print(kernels.COMPILED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "BBF_NO_C_KERNELS": "1"}).stdout.strip()
    assert out == "False"

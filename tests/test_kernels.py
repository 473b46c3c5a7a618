"""The compiled inner loops (bbformat/_kernels.c) against their reference versions in bbformat/kernels.py."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from bbformat import kernels
from bbformat.codecs import entropy

compiled = pytest.mark.skipif(not kernels.COMPILED, reason="bbformat._kernels was not built")


def piece_case(rng, rows: int, cols: int, by_cols: bool, k: int, nibbles: bool, escape_rate: float):
    """Random classes (non-decreasing for columns), bases, symbol streams and escapes for one piece."""
    n_lines = cols if by_cols else rows
    classes = rng.integers(0, k, n_lines).astype(np.uint8)
    if by_cols:
        classes.sort()
    bases = rng.integers(0, 256, n_lines).astype(np.uint8)
    streams, escapes = [], []
    for c in range(k):
        m = int((classes == c).sum()) * (rows if by_cols else cols)
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


def run_decode(fn, n, ws, offset, rows, cols, by_cols, case, planes, shift, nibbles):
    out = np.full(n, 0xAAAA, np.uint16 if ws == 2 else np.uint32)
    classes, bases, streams, escapes = case
    fn(out, planes, offset, rows, cols, int(by_cols), classes, bases, shift, int(nibbles), streams, escapes)
    return out


@compiled
@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.parametrize("by_cols", [False, True])
@pytest.mark.parametrize("nibbles", [True, False])
@pytest.mark.parametrize("shape", [(7, 33), (40, 64), (3, 1), (1, 101), (16, 95), (70, 130)])
def test_decode_matches_reference(ws, by_cols, nibbles, shape):
    rows, cols = shape
    rng = np.random.default_rng(rows * cols + 2 * by_cols + nibbles + ws)
    k = 1 if (cols if by_cols else rows) == 1 else 3
    case = piece_case(rng, rows, cols, by_cols, k, nibbles, 0.05)
    n, offset = rows * cols + 150, 77
    planes = [rng.integers(0, 256, n).astype(np.uint8) for _ in range(ws - 1)]
    shift = 0 if nibbles else 3
    ref, fast = (run_decode(fn, n, ws, offset, rows, cols, by_cols, case, planes, shift, nibbles)
                 for fn in (kernels.decode_numpy, kernels._kernels.decode))
    np.testing.assert_array_equal(ref, fast)
    assert (fast[:offset] == 0xAAAA).all() and (fast[offset + rows * cols:] == 0xAAAA).all()  # nothing outside
    # one word against the definition: rotr1(top << (8 ws - 8) | low planes), top = residual + (base << shift)
    classes, bases, streams, escapes = case
    y, x = rows - 1, cols - 1
    line, t = (x, y) if by_cols else (y, x)
    c = classes[line]
    mates = np.flatnonzero(classes == c)
    width = mates.size if by_cols else cols
    pos = y * width + (x - mates[0]) if by_cols else int(np.searchsorted(mates, y)) * cols + x
    sym = (streams[c][pos >> 1] >> (4 * (pos & 1))) & 15 if nibbles else streams[c][pos]
    if nibbles and sym == kernels.ESCAPE:
        top = escapes[c][-1]  # the last element of its stream in order, so its last escape
    else:
        top = (int(sym) + (int(bases[line]) << shift)) & 255
    word = top << (8 * ws - 8)
    for j, p in enumerate(planes):
        word |= int(p[offset + y * cols + x]) << (8 * j)
    assert int(fast[offset + y * cols + x]) == (word >> 1) | ((word & 1) << (8 * ws - 1))


@compiled
@pytest.mark.parametrize("by_cols", [False, True])
@pytest.mark.parametrize("shape", [(7, 33), (40, 64), (1, 101), (16, 95), (70, 130), (3, 600)])
@pytest.mark.parametrize("offset", [0, 77, 13])
def test_decode_split_mantissa_matches_reference(by_cols, shape, offset):
    """float16 with split exponents (SPEC 13.4): the top byte is (exponent << 3 | 3 mantissa bits from bit-planes),
    at any word offset (the SIMD path reads the planes 16 words at a time, the tail word by word)."""
    rows, cols = shape
    rng = np.random.default_rng(rows * cols + by_cols + offset)
    k = 1 if (cols if by_cols else rows) == 1 else 3
    case = piece_case(rng, rows, cols, by_cols, k, True, 0.05)
    n = offset + rows * cols + 40
    planes = [rng.integers(0, 256, n).astype(np.uint8)]
    mant = [rng.integers(0, 256, (n + 7) // 8).astype(np.uint8) for _ in range(3)]
    outs = []
    for fn in (kernels.decode_numpy, kernels._kernels.decode):
        out = np.full(n, 0xAAAA, np.uint16)
        classes, bases, streams, escapes = case
        fn(out, planes, offset, rows, cols, int(by_cols), classes, bases, 0, 1, streams, escapes, mant)
        outs.append(out)
    np.testing.assert_array_equal(*outs)
    assert (outs[1][:offset] == 0xAAAA).all() and (outs[1][offset + rows * cols:] == 0xAAAA).all()
    # the last word against the definition
    classes, bases, streams, escapes = case
    y, x = rows - 1, cols - 1
    line = x if by_cols else y
    c = classes[line]
    mates = np.flatnonzero(classes == c)
    pos = y * mates.size + (x - mates[0]) if by_cols else int(np.searchsorted(mates, y)) * cols + x
    sym = (streams[c][pos >> 1] >> (4 * (pos & 1))) & 15
    e = int(escapes[c][-1]) if sym == kernels.ESCAPE else (int(sym) + int(bases[line])) & 255
    i = offset + y * cols + x
    m = sum(((int(mant[j][i >> 3]) >> (i & 7)) & 1) << j for j in range(3))
    word = (((e << 3) | m) & 255) << 8 | int(planes[0][i])
    assert int(outs[1][i]) == (word >> 1) | ((word & 1) << 15)
    with pytest.raises(ValueError, match="bit-plane"):
        kernels._kernels.decode(np.zeros(n, np.uint16), planes, offset, rows, cols, int(by_cols), *case[:2], 0, 1,
                                case[2], case[3], [m[:-1] for m in mant])


@compiled
@pytest.mark.parametrize("fn", ["decode_numpy", "c"])
def test_decode_rejects_bad_input(fn):
    fn = kernels.decode_numpy if fn == "decode_numpy" else kernels._kernels.decode
    rng = np.random.default_rng(1)
    classes, bases, streams, escapes = piece_case(rng, 9, 40, False, 2, True, 0.1)
    assert len(escapes[0]) > 0
    planes, out = [np.zeros(360, np.uint8)], np.zeros(360, np.uint16)

    def call(**kw):
        a = dict(out=out, planes=planes, offset=0, rows=9, cols=40, by_cols=0, classes=classes, bases=bases, shift=0,
                 nibbles=1, streams=streams, escapes=escapes)
        a.update(kw)
        fn(*a.values())

    call()
    with pytest.raises(ValueError, match="escape stream is too short"):
        call(escapes=[escapes[0][:-1], escapes[1]])
    with pytest.raises(ValueError, match="used .* escapes, the header declares"):
        call(escapes=[np.append(escapes[0], np.uint8(1)), escapes[1]])
    with pytest.raises(ValueError, match="length does not match"):
        call(streams=[streams[0][:-1], streams[1]])
    with pytest.raises(ValueError, match="inconsistent sizes"):
        call(offset=1)
    with pytest.raises(ValueError, match="class count"):
        call(streams=streams[:1], escapes=escapes[:1])
    with pytest.raises(ValueError, match="decrease"):
        cols = np.array([1] * 20 + [0] * 20, np.uint8)
        call(rows=9, cols=40, by_cols=1, classes=cols, bases=np.zeros(40, np.uint8))


@compiled
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("ws", [2, 4])
def test_triangle_matches_reference(lower, ws):
    rng = np.random.default_rng(ws + lower)
    k, ld, offset = 37, 50, 3 * 50
    tri = rng.integers(1, 1 << 15, k * (k + 1) // 2).astype(np.uint16 if ws == 2 else np.uint32)
    outs = []
    for fn in (kernels.triangle_numpy, kernels._kernels.triangle):
        out = np.full(offset + k * ld, 7, tri.dtype)
        fn(out, offset, ld, k, int(lower), tri)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    block = outs[1][offset:].reshape(k, ld)[:, :k]
    expect = np.zeros((k, k), tri.dtype)
    expect[np.tril_indices(k) if lower else np.triu_indices(k)] = tri
    np.testing.assert_array_equal(block, expect)
    assert (outs[1].reshape(-1, ld)[3:, k:] == 7).all()  # the columns right of the block are untouched
    with pytest.raises(ValueError, match="inconsistent"):
        kernels._kernels.triangle(outs[1], offset + ld - k + 1, ld, k, int(lower), tri)  # one word too far


@compiled
def test_crc32_matches_zlib():
    if not kernels._kernels.CLMUL:
        pytest.skip("no carry-less multiply on this CPU: bbformat uses zlib")
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 1 << 16).astype(np.uint8).tobytes()
    for n in list(range(0, 200)) + [255, 256, 257, 271, 512, 1000, 4097, len(data)]:  # 128- and 512-bit folds
        for start in (0, 3):
            chunk = memoryview(data)[start:start + n]
            assert kernels._kernels.crc32(chunk) == zlib.crc32(chunk)
            assert kernels._kernels.crc32(chunk, 0xDEADBEEF) == zlib.crc32(chunk, 0xDEADBEEF)


def test_entropy_roundtrip_with_the_reference_kernels(monkeypatch):
    """The numpy path (used when the C module is not built) decodes what the encoder wrote."""
    monkeypatch.setattr(kernels, "decode", kernels.decode_numpy)
    rng = np.random.default_rng(4)
    scale = np.exp(rng.normal(0, 2, (1, 96)))
    w = (rng.standard_normal((256, 96)) * scale).astype(np.float32)
    w[5, 7] = 1e30  # far outside its column's window: an escape
    for dtype, arr in (("bfloat16", (w.view(np.uint32) >> 16).astype(np.uint16)), ("float32", w.view(np.uint32))):
        payload = arr.tobytes()
        method, stored = entropy.compress(payload, arr.itemsize, (entropy.Segment(0, 256, 96),), dtype,
                                          method=entropy.METHOD_PLANES)
        assert method == entropy.METHOD_PLANES
        assert bytes(entropy.decompress(method, stored, len(payload), arr.itemsize, dtype)) == payload


def test_reference_is_forced_by_environment():
    import subprocess
    import sys

    code = "from bbformat import kernels; print(kernels.COMPILED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "BBF_NO_C_KERNELS": "1"}).stdout.strip()
    assert out == "False"

"""Entropy method 2 (one rANS symbol per word): round trips, the compiled kernels against their Python reference,
hostile stored bytes, and the writer's choice between methods 2, 1 and 0."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bbformat import kernels
from bbformat.codecs import entropy, entropy_words
from bbformat.codecs.base import Segment
from bbformat.errors import FormatError
from bbformat.words import to_words

DTYPES = ("float16", "bfloat16", "float32")
compiled = pytest.mark.skipif(not kernels.COMPILED, reason="needs the compiled kernels")


def words_of(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_words(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dtype)


def scaled(rows: int, cols: int, laplace: bool = False, seed: int = 0) -> np.ndarray:
    """Lines of very different scales (per row and per column), Gaussian or Laplace: what per-line modelling is for."""
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=(rows, cols)) if laplace else rng.standard_normal((rows, cols))
    return x * np.exp(rng.standard_normal(rows))[:, None] * np.exp(-np.arange(cols) / cols)[None, :] * 0.02


def section(dtype: str, seed: int = 0) -> tuple[np.ndarray, list[Segment]]:
    """1-D words, a Gaussian and a Laplace matrix, a few zeros (escapes), an odd number of words in all."""
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal(7), scaled(130, 40, False, seed).ravel(), np.zeros(6),
             scaled(33, 150, True, seed).ravel()]
    words = np.concatenate([words_of(p, dtype) for p in parts])
    assert words.size % 2 == 1
    return words, [Segment(7, 130, 40), Segment(7 + 130 * 40 + 6, 33, 150)]


def roundtrip2(words: np.ndarray, segments, dtype: str) -> bytes:
    stored = entropy_words.encode(words, segments, dtype)
    out = entropy.decompress(entropy.METHOD_WORDS, stored, words.nbytes, words.dtype.itemsize, dtype)
    assert bytes(out) == words.tobytes()
    return stored


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_structured_sections(dtype):
    words, segs = section(dtype)
    roundtrip2(words, segs, dtype)
    roundtrip2(words, (), dtype)  # the same words as runs of 1-D words
    big = words_of(scaled(300, 200), dtype).reshape(-1)  # large enough to pay for its tables: smaller than method 1
    segs = [Segment(0, 300, 200)]
    assert len(roundtrip2(big, segs, dtype)) < len(entropy.compress(big.tobytes(), big.dtype.itemsize, segs, dtype,
                                                                    method=entropy.METHOD_PLANES)[1])


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 3), (3, 5), (2, 4097), (4097, 2)])
def test_roundtrip_small_and_odd_shapes(dtype, shape):
    words = words_of(scaled(*shape, seed=sum(shape)), dtype).reshape(-1)
    roundtrip2(words, [Segment(0, *shape)], dtype)


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_words_and_many_chunks(dtype):
    """Uniformly random words (every symbol, many escapes) over several rANS chunks, rows and columns."""
    rng = np.random.default_rng(1)
    n = (1 << entropy_words.CHUNK_LOG2) + 4099
    words = rng.integers(0, 1 << (16 if dtype != "float32" else 32), n, dtype=np.uint64).astype(
        np.uint32 if dtype == "float32" else np.uint16)
    roundtrip2(words, [Segment(0, 1, n)], dtype)
    big = words_of(scaled(700, 400, seed=2), dtype).reshape(-1)  # > 2^18 words: 2 chunks, lines of both kinds
    roundtrip2(big, [Segment(0, 700, 400)], dtype)
    roundtrip2(big, [Segment(0, 400, 700)], dtype)


@compiled
def test_small_prefers_method_2_and_keeps_method_1_where_it_wins():
    words, segs = section("bfloat16")
    assert entropy.compress(words.tobytes(), 2, segs, "bfloat16")[0] == entropy.METHOD_PLANES  # the default
    method, stored = entropy.compress(words.tobytes(), 2, segs, "bfloat16", small=True)
    assert method == entropy.METHOD_WORDS
    # float32 words holding float16 values: 13 zero mantissa bits, which method 2 stores raw and method 1 packs
    w32 = words_of(scaled(200, 300).astype(np.float16).astype(np.float32), "float32").reshape(-1)
    assert entropy_words.low_bits_structured(w32, "float32")
    method, stored = entropy.compress(w32.tobytes(), 4, [Segment(0, 200, 300)], "float32", small=True)
    assert method == entropy.METHOD_PLANES
    assert bytes(entropy.decompress(method, stored, w32.nbytes, 4, "float32")) == w32.tobytes()
    noise = np.random.default_rng(3).integers(0, 1 << 16, 5000, dtype=np.uint16)
    assert entropy.compress(noise.tobytes(), 2, (), "float16")[0] == entropy.METHOD_NONE


def test_method_1_streams_still_decode():
    words, segs = section("float16")
    method, stored = entropy.compress(words.tobytes(), 2, segs, "float16", method=entropy.METHOD_PLANES)
    assert method == entropy.METHOD_PLANES and stored[0] == entropy.VERSION
    assert bytes(entropy.decompress(method, stored, words.nbytes, 2, "float16")) == words.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# The compiled kernels against the Python reference


@compiled
def test_kernels_match_the_reference():
    from bbformat import _kernels

    rng = np.random.default_rng(4)
    freqs = np.zeros((3, 256), np.int64)
    freqs[0, :40] = np.diff(np.linspace(0, 4096, 41).astype(int))
    freqs[1, [0, 255]] = (4095, 1)
    freqs[2, 7] = 4096  # one symbol of probability 1: coded in 0 bits
    fb = freqs.astype("<u2").tobytes()
    assert _kernels.rans_table(fb) == kernels.rans_table_numpy(fb)
    cls = rng.integers(0, 3, 3001).astype(np.uint8)
    syms = np.select([cls == 0, cls == 1], [rng.integers(0, 40, cls.size), np.where(rng.random(cls.size) < .9, 0, 255)],
                     7).astype(np.uint8)
    data = _kernels.rans_encode(syms, cls, fb)
    assert data == kernels.rans_encode_py(syms, cls, fb)
    vals = rng.integers(0, 1 << 32, 999, dtype=np.uint64).astype("<u4")
    for ws, width in ((2, 6), (2, 8), (4, 22), (4, 0)):
        v = vals.astype("<u2") if ws == 2 else vals
        assert _kernels.pack_bits(v, ws, width) == kernels.pack_bits_numpy(v, ws, width)
    # decode one chunk of a 1-row piece by columns (a class per element), both ways: identical words
    n = cls.size
    esc = rng.integers(0, 1 << 10, int((syms == 255).sum())).astype("<u2")
    raw = kernels.pack_bits_numpy(rng.integers(0, 1 << 16, n).astype("<u2"), 2, 6)
    tables = kernels.rans_table_numpy(fb)
    args = (2, 0, n, True, 0, n, cls, rng.integers(0, 1024, n).astype("<u2"), tables, data, esc, raw, 0, 6)
    outs = [np.zeros(n, np.uint16), np.zeros(n, np.uint16)]
    _kernels.rans_decode(outs[0], *args)
    kernels.rans_decode_py(outs[1], *args)
    assert np.array_equal(*outs)


@compiled
def test_reference_decoder_reads_what_the_compiled_encoder_wrote(tmp_path):
    words, segs = section("bfloat16")
    stored = entropy_words.encode(words, segs, "bfloat16")
    (tmp_path / "s.bin").write_bytes(stored)
    (tmp_path / "w.bin").write_bytes(words.tobytes())
    code = ("import sys; from bbformat import kernels; from bbformat.codecs import entropy;"
            "assert not kernels.COMPILED;"
            "s = open(sys.argv[1], 'rb').read(); w = open(sys.argv[2], 'rb').read();"
            "assert bytes(entropy.decompress(2, s, len(w), 2, 'bfloat16')) == w")
    env = {**os.environ, "BBF_NO_C_KERNELS": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.bin"), str(tmp_path / "w.bin")], env=env,
                   check=True)


# ---------------------------------------------------------------------------------------------------------------
# Hostile stored bytes


def stored_section(dtype: str = "bfloat16") -> tuple[np.ndarray, bytes]:
    words, segs = section(dtype)
    return words, entropy_words.encode(words, segs, dtype) if kernels.COMPILED else b""


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_truncated_or_extended_stored_bytes_raise(dtype):
    words, stored = stored_section(dtype)
    for cut in sorted({0, 1, 2, 3, 5, 10, 40, len(stored) // 2, len(stored) - 1}):
        with pytest.raises(FormatError):
            entropy.decompress(entropy.METHOD_WORDS, stored[:cut], words.nbytes, words.dtype.itemsize, dtype)
    with pytest.raises(FormatError):
        entropy.decompress(entropy.METHOD_WORDS, stored + b"\0", words.nbytes, words.dtype.itemsize, dtype)


@compiled
def test_corrupt_bytes_raise_or_keep_the_size():
    """The raw low bits carry no redundancy (the container's checksum covers them), so a flip there decodes to
    other words; anywhere else it must be a FormatError, and nothing may crash or change the size."""
    words, stored = stored_section()
    low_start = len(stored) - (words.size * entropy_words.geometry("bfloat16", 2)[1] + 7) // 8
    rng = np.random.default_rng(0)
    failures = 0
    for i in range(300):
        bad = bytearray(stored)
        pos = int(rng.integers(0, low_start))
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = entropy.decompress(entropy.METHOD_WORDS, bytes(bad), words.nbytes, 2, "bfloat16")
        except FormatError:
            failures += 1
            continue
        assert len(out) == words.nbytes
    assert failures > 250  # the rANS final-state check catches nearly every flip of the coded data


@compiled
def test_bad_headers_raise():
    words, stored = stored_section()
    n = words.nbytes
    cases = {"version": bytes([9]) + stored[1:], "mantissa": stored[:1] + bytes([5]) + stored[2:],
             "chunk size": stored[:2] + bytes([40]) + stored[3:]}
    for what, bad in cases.items():
        with pytest.raises(FormatError):
            entropy.decompress(entropy.METHOD_WORDS, bad, n, 2, "bfloat16")
    with pytest.raises(FormatError, match="word size 1"):
        entropy.decompress(entropy.METHOD_WORDS, stored, n, 1, "bfloat16")
    head = bytearray([entropy_words.VERSION, 2, entropy_words.CHUNK_LOG2, 1])  # one piece of 2^40 x 2^40 words
    for v in (1 << 40, 1 << 40):
        entropy._put_varint(head, v)
    with pytest.raises(FormatError, match="exceeds its limit"):
        entropy.decompress(entropy.METHOD_WORDS, bytes(head) + b"\0\1", 8, 2, "bfloat16")


def test_reference_decoder_checks_its_input():
    tables = kernels.rans_table_numpy(np.r_[[4096], np.zeros(255)].astype("<u2").tobytes())
    out = np.zeros(4, np.uint16)
    good = (2, 0, 4, False, 0, 4, b"\0", b"\0\0", tables, np.full(4, 1 << 16, "<u4").tobytes(), b"", b"\0\0\0", 0, 6)
    kernels.rans_decode_py(out, *good)
    for i, bad in ((9, b"\0" * 15), (9, np.full(4, 5, "<u4").tobytes()), (11, b"\0"), (6, b"\1"), (8, b"\0" * 64)):
        with pytest.raises(ValueError):
            kernels.rans_decode_py(out, *good[:i], bad, *good[i + 1:])
    if kernels.COMPILED:
        from bbformat import _kernels
        _kernels.rans_decode(out, *good)
        for i, bad in ((9, b"\0" * 15), (9, np.full(4, 5, "<u4").tobytes()), (11, b"\0"), (6, b"\1"), (8, b"\0" * 64)):
            with pytest.raises(ValueError):
                _kernels.rans_decode(out, *good[:i], bad, *good[i + 1:])


@compiled
def test_compiled_decoder_matches_the_reference_on_random_chunks():
    """Rows and columns, chunks starting mid-row, word sizes 2 and 4, escapes: identical words both ways."""
    from bbformat import _kernels

    rng = np.random.default_rng(5)
    for trial in range(12):
        k, rows, cols = int(rng.integers(1, 5)), int(rng.integers(1, 30)), int(rng.integers(1, 700))
        by_cols, ws = bool(trial % 2), (2, 4)[trial // 2 % 2]
        width = (6, 8)[trial // 4 % 2] if ws == 2 else 22
        freqs = np.zeros((k, 256), np.int64)
        for c in range(k):
            used = rng.choice(256, int(rng.integers(1, 256)), replace=False)
            w = rng.random(used.size) + 0.01
            f = np.maximum(1, np.floor(w / w.sum() * (4096 - used.size))).astype(int)
            f[0] += 4096 - f.sum()  # >= 0: the floors sum to at most 4096 - used.size, the maxima add <= used.size
            freqs[c, used] = f
        fb = freqs.astype("<u2").tobytes()
        line_cls = rng.integers(0, k, cols if by_cols else rows).astype(np.uint8)
        cls = np.broadcast_to(line_cls[None, :] if by_cols else line_cls[:, None], (rows, cols)).reshape(-1)
        syms = np.array([rng.choice(256, p=freqs[c] / 4096) for c in cls], np.uint8)
        pos0 = int(rng.integers(0, cls.size))
        n = int(rng.integers(1, cls.size - pos0 + 1))
        data = kernels.rans_encode_py(syms[pos0:pos0 + n], np.ascontiguousarray(cls[pos0:pos0 + n]), fb)
        esc = rng.integers(0, 1 << (8 * ws - width), int((syms[pos0:pos0 + n] == 255).sum())).astype("<u2")
        word0, total = 3, 3 + cls.size + 2
        raw = kernels.pack_bits_numpy(rng.integers(0, 1 << 16, total).astype(f"<u{ws}"), ws, width)
        bases = rng.integers(0, 1 << (8 * ws - width), line_cls.size).astype("<u2")
        args = (ws, word0, cols, by_cols, pos0, n, line_cls, bases, kernels.rans_table_numpy(fb), data, esc, raw,
                (word0 + pos0) * width, width)
        outs = [np.zeros(total, np.uint16 if ws == 2 else np.uint32) for _ in range(2)]
        _kernels.rans_decode(outs[0], *args)
        kernels.rans_decode_py(outs[1], *args)
        assert np.array_equal(*outs), trial

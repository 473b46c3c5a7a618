"""The entropy stage's method 1 (method 2: test_entropy2.py): exact round trips, raw fallback, hostile input, and
the per-column modelling gain. Every payload here is coded with method 1 (`compress(..., method=1)`), which stays
readable in every file that has it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard as zstd

from bbformat.codecs import entropy
from bbformat.codecs.base import Segment
from bbformat.errors import BBFError, FormatError
from bbformat.words import to_words

DTYPES = ("float16", "bfloat16", "float32")


def compress1(payload, word_size, segments, dtype, level=3):
    return entropy.compress(payload, word_size, segments, dtype, level, method=entropy.METHOD_PLANES)


def words_of(x: np.ndarray, dtype: str) -> np.ndarray:
    return to_words(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dtype)


def pca_like(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian columns whose scale decays with the column index, like SliceGPT's PCA-ordered embeddings."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, cols)) * np.exp(-np.arange(cols) / (cols / 4)) * 0.05


def section(dtype: str, seed: int = 0) -> tuple[bytes, list[Segment]]:
    """1-D words, a 2-D tensor, more 1-D words, another 2-D tensor: an odd number of words in all."""
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal(7), pca_like(300, 48, seed).ravel(), rng.standard_normal(4) + 1,
             rng.standard_normal((64, 33)).ravel() * 0.01]
    words = np.concatenate([words_of(p, dtype) for p in parts])
    assert words.size % 2 == 1
    return words.tobytes(), [Segment(7, 300, 48), Segment(7 + 300 * 48 + 4, 64, 33)]


def word_size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def roundtrip(payload: bytes, ws: int, segments, dtype: str) -> tuple[int, bytes]:
    method, stored = compress1(payload, ws, segments, dtype)
    out = entropy.decompress(method, stored, len(payload), ws, dtype)
    assert bytes(out) == payload
    return method, stored


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_with_and_without_segments(dtype):
    payload, segs = section(dtype)
    method, stored = roundtrip(payload, word_size(dtype), segs, dtype)
    assert method == entropy.METHOD_PLANES and len(stored) < len(payload)
    roundtrip(payload, word_size(dtype), (), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 4097])
def test_roundtrip_small_and_odd_lengths(dtype, n):
    words = words_of(np.random.default_rng(n).standard_normal(n) * 0.02, dtype)
    roundtrip(words.tobytes(), word_size(dtype), (), dtype)
    if n > 2:
        roundtrip(words.tobytes(), word_size(dtype), (Segment(1, 1, n - 2),), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_section_decodes_in_parallel_chunks(dtype):
    x = pca_like(2048, 576, seed=3)
    payload = words_of(x, dtype).tobytes()
    method, stored = roundtrip(payload, word_size(dtype), (Segment(0, 2048, 576),), dtype)
    assert method == entropy.METHOD_PLANES
    assert len(payload) > 2 << entropy.CHUNK_LOG2  # several chunks per stream, decoded on the thread pool


def test_empty_payload():
    for ws, dtype in ((1, "float16"), (2, "bfloat16"), (4, "float32")):
        assert compress1(b"", ws, (), dtype) == (entropy.METHOD_NONE, b"")
        assert entropy.decompress(entropy.METHOD_NONE, b"", 0, ws, dtype) == b""


def test_word_size_one_is_plain_zstd():
    text = b"correction records " * 1000
    method, stored = roundtrip(text, 1, (), "float16")
    assert method == entropy.METHOD_PLANES and len(stored) < len(text) // 10
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert compress1(noise, 1, (), "float16") == (entropy.METHOD_NONE, noise)


@pytest.mark.parametrize("zeros, mixed", [(200, False), (2000, True)])
def test_a_stream_zstd_barely_shrinks_is_stored_whole(zeros, mixed):
    """Chunks that zstd shrinks are coded, unless all of them save < 1 % of the stream: then every chunk is stored
    (a reader views a stream stored whole; it copies the stored chunks of a mixed one)."""
    chunk, n_chunks = 4096, 8
    data = np.random.default_rng(2).integers(0, 256, chunk * n_chunks, dtype=np.uint8)
    data[chunk:chunk + zeros] = 0  # one chunk zstd can shrink: by < 1 % of the stream, or by far more
    head, parts = bytearray(), []
    entropy._encode_stream(head, parts, data, entropy._byte_params(3), chunk)
    ref = entropy._read_stream(entropy._Reader(memoryview(bytes(head))), len(data), chunk, [0], "test stream")
    assert [c[4] for c in ref.chunks] == [False, mixed] + [False] * (n_chunks - 2)
    assert ref.stored == (not mixed)
    stored = memoryview(b"".join(parts))
    tasks = []
    out = entropy._stream_array(stored, 0, ref, tasks, "test stream")
    for t in tasks:
        t()
    assert np.array_equal(out, data)
    assert (len(stored) < len(data) - 100) == mixed


@pytest.mark.parametrize("dtype", DTYPES)
def test_incompressible_words_are_stored_raw(dtype):
    np_word = np.uint32 if dtype == "float32" else np.uint16
    payload = np.random.default_rng(1).integers(0, np.iinfo(np_word).max, 20001, dtype=np_word).tobytes()
    method, stored = compress1(payload, word_size(dtype), (Segment(0, 101, 198),), dtype)
    assert method == entropy.METHOD_NONE and stored == payload
    assert entropy.decompress(method, stored, len(payload), word_size(dtype), dtype) == payload


@pytest.mark.parametrize("zero_fraction", [0.03, 0.5])
def test_escapes_and_byte_fallback(zero_fraction):
    """Zeros lie far outside the exponent window: a few become escapes, many switch to byte coding."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 100)) * 0.02
    x[rng.random(x.shape) < zero_fraction] = 0
    x[0, 0], x[1, 1] = 3e4, -1e-30  # outliers on both sides
    for dtype in ("bfloat16", "float32", "float16"):
        method, stored = roundtrip(words_of(x, dtype).tobytes(), word_size(dtype), (Segment(0, 200, 100),), dtype)
        assert method == entropy.METHOD_PLANES
        assert bool(stored[1] & entropy.FLAG_NIBBLES) == (zero_fraction < entropy.MAX_ESCAPE_FRACTION)
        # float16 splits its exponents off whenever it uses nibbles (SPEC 13.4), and only then
        assert bool(stored[1] & entropy.FLAG_SPLIT) == (dtype == "float16" and bool(stored[1] & entropy.FLAG_NIBBLES))


def test_float16_split_exponents_halve_the_symbols_at_a_small_cost():
    """SPEC 13.4: float16 nibbles code the exponent alone (one nibble a word, two a byte symbol, as bfloat16), its 3
    top mantissa bits are bit-planes; against coding the (exponent, 3 mantissa bits) bytes the symbols halve and the
    section grows by less than 0.3 bits a word."""
    x = pca_like(600, 192, seed=9)
    payload, segs = words_of(x, "float16").tobytes(), (Segment(0, 600, 192),)
    method, stored = roundtrip(payload, 2, segs, "float16")
    assert stored[1] == entropy.FLAG_NIBBLES | entropy.FLAG_SPLIT
    n = len(payload) // 2
    bytes_coded = entropy._encode_words(np.frombuffer(payload, np.uint16), segs, "float16", 3, split=False)
    assert bytes_coded[1] == 0 and bytes(entropy.decompress(1, bytes_coded, len(payload), 2, "float16")) == payload
    assert 0 < (len(stored) - len(bytes_coded)) * 8 / n < 0.3
    # the reader's checks: split needs float16 and nibbles, and a mantissa stream of exactly 3 ceil(N / 8) bytes
    with pytest.raises(FormatError, match="split exponents need float16"):
        entropy.decompress(1, stored, len(payload), 2, "bfloat16")
    with pytest.raises(FormatError, match="split exponents need float16"):
        entropy.decompress(1, stored[:1] + bytes([entropy.FLAG_SPLIT]) + stored[2:], len(payload), 2, "float16")
    with pytest.raises(FormatError, match="unknown flags"):
        entropy.decompress(1, stored[:1] + bytes([stored[1] | 4]) + stored[2:], len(payload), 2, "float16")


def test_decode_kernels_without_avx2_give_the_same_words():
    """The SSE2 path (BBF_NO_AVX2=1, what a CPU without AVX2 runs) decodes every dtype's sections, split float16
    included, to the same words as the default path."""
    import os
    import subprocess
    import sys

    from bbformat import kernels
    if not kernels.COMPILED:
        pytest.skip("the compiled kernels are not built")
    script = """
import hashlib, numpy as np, torch
from bbformat.codecs import entropy
from bbformat.codecs.base import Segment
from bbformat.words import to_words
rng = np.random.default_rng(4)
x = rng.standard_normal((310, 97)) * np.exp(-np.arange(97) / 25) * 0.05
x[rng.random(x.shape) < 0.02] = 0
h = hashlib.sha256()
for dtype in ("float16", "bfloat16", "float32"):
    w = to_words(torch.from_numpy(x.astype(np.float32)), dtype)
    segs = (Segment(5, 300, 97),)
    method, stored = entropy.compress(w.tobytes(), w.itemsize, segs, dtype, method=1)
    out = bytes(entropy.decompress(method, stored, w.nbytes, w.itemsize, dtype))
    assert out == w.tobytes(), dtype
    h.update(out)
print(h.hexdigest())
"""
    outs = []
    for env in ({}, {"BBF_NO_AVX2": "1"}):
        r = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1] and len(outs[0]) == 64


def test_float32_from_bfloat16_compresses_its_zero_mantissa_planes():
    x = torch.from_numpy(pca_like(256, 64)).to(torch.bfloat16).to(torch.float32).numpy()
    payload = words_of(x, "float32").tobytes()
    _, stored = roundtrip(payload, 4, (Segment(0, 256, 64),), "float32")
    assert len(stored) < 0.4 * len(payload)  # the two low bytes are all zero


def simple_planes_size(words: np.ndarray) -> int:
    """Order-0 baseline: rotate, zstd on the whole top-byte plane, the other planes stored as they are."""
    bits = words.dtype.itemsize * 8
    rot = (words << words.dtype.type(1)) | (words >> words.dtype.type(bits - 1))
    planes = rot.view(np.uint8).reshape(-1, words.dtype.itemsize)
    best_top = min(len(zstd.ZstdCompressor(level=lv).compress(np.ascontiguousarray(planes[:, -1])))
                   for lv in (1, 3, 9))
    return best_top + planes[:, :-1].size


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pca_like_matrix_beats_order0_planes(dtype):
    words = words_of(pca_like(2000, 128), dtype)
    _, stored = roundtrip(words.tobytes(), 2, (Segment(0, 2000, 128),), dtype)
    baseline = simple_planes_size(words.ravel())
    assert len(stored) < 0.97 * baseline
    # and the segment matters: without it the per-column bases are not available
    _, flat = compress1(words.tobytes(), 2, (), dtype)
    assert len(stored) < len(flat)


# --- hostile input ------------------------------------------------------------------------------------------


def stored_section(dtype: str = "bfloat16") -> tuple[bytes, bytes]:
    payload, segs = section(dtype)
    method, stored = compress1(payload, word_size(dtype), segs, dtype)
    assert method == entropy.METHOD_PLANES
    return payload, stored


@pytest.mark.parametrize("dtype", DTYPES)
def test_truncated_stored_bytes_raise(dtype):
    payload, stored = stored_section(dtype)
    for cut in sorted({0, 1, 2, 3, 5, 10, len(stored) // 2, len(stored) - 1}):
        with pytest.raises(FormatError):
            entropy.decompress(entropy.METHOD_PLANES, stored[:cut], len(payload), word_size(dtype), dtype)
    with pytest.raises(FormatError):
        entropy.decompress(entropy.METHOD_PLANES, stored + b"\0", len(payload), word_size(dtype), dtype)


def test_corrupt_bytes_raise_or_keep_the_size():
    """Without a checksum (the container has one) a flipped data byte may decode to other words, but the decoder
    never crashes, never returns another size, never allocates beyond raw_len."""
    payload, stored = stored_section()
    rng = np.random.default_rng(0)
    failures = 0
    for i in range(300):
        bad = bytearray(stored)
        pos = int(rng.integers(0, len(bad))) if i % 2 else int(rng.integers(0, min(60, len(bad))))
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = entropy.decompress(entropy.METHOD_PLANES, bytes(bad), len(payload), 2, "bfloat16")
        except FormatError:
            failures += 1
            continue
        assert len(out) == len(payload)
    assert failures > 50


def test_wrong_sizes_and_methods_raise():
    payload, stored = stored_section()
    for raw_len in (len(payload) - 2, len(payload) + 2, 0, 10 ** 12):
        with pytest.raises(FormatError):
            entropy.decompress(entropy.METHOD_PLANES, stored, raw_len, 2, "bfloat16")
    with pytest.raises(FormatError, match="raw length"):
        entropy.decompress(entropy.METHOD_PLANES, stored, len(payload) + 1, 2, "bfloat16")
    with pytest.raises(FormatError, match="unknown entropy method"):
        entropy.decompress(7, stored, len(payload), 2, "bfloat16")
    with pytest.raises(FormatError, match="method none"):
        entropy.decompress(entropy.METHOD_NONE, b"abc", 4, 2, "bfloat16")
    with pytest.raises(FormatError, match="word size"):
        entropy.decompress(entropy.METHOD_PLANES, stored, len(payload), 4, "bfloat16")


def test_huge_declared_sizes_are_refused_before_allocating():
    # a header claiming one piece of 2^40 x 2^40 words in a 4-word section
    head = bytearray([entropy.VERSION, 0, entropy.CHUNK_LOG2, 1])
    for v in (1 << 40, 1 << 40):
        entropy._put_varint(head, v)
    head.append(0)
    with pytest.raises(FormatError, match="exceeds its limit"):
        entropy.decompress(entropy.METHOD_PLANES, bytes(head), 8, 2, "float16")
    # a zstd chunk whose frame declares more than its chunk holds
    frame = zstd.ZstdCompressor().compress(b"\0" * 100_000)
    head = bytearray([entropy.VERSION, 0, entropy.CHUNK_LOG2])
    entropy._put_varint(head, 100)
    entropy._put_varint(head, len(frame) << 1 | 1)
    with pytest.raises(FormatError, match="declares 100000 bytes, expected 100"):
        entropy.decompress(entropy.METHOD_PLANES, bytes(head) + frame, 100, 1, "float16")


def test_bad_input_to_compress():
    with pytest.raises(BBFError, match="whole number"):
        compress1(b"\0" * 3, 2, (), "float16")
    with pytest.raises(BBFError, match="does not fit dtype"):
        compress1(b"\0" * 8, 4, (), "bfloat16")
    with pytest.raises(BBFError, match="overlaps"):
        compress1(b"\0" * 200, 2, (Segment(0, 5, 10), Segment(40, 5, 10)), "float16")
    with pytest.raises(BBFError, match="outside"):
        compress1(b"\0" * 200, 2, (Segment(90, 5, 10),), "float16")


def test_column_ranges_are_the_best_contiguous_split():
    """_ranges' dynamic program finds the cheapest split into k ranges of adjacent lines (brute force on 9 lines)."""
    import itertools

    rng = np.random.default_rng(7)
    hist = rng.integers(0, 50, (9, 16)).astype(np.float64)
    hist[4:] = np.roll(hist[4:], 5, axis=1) * 3  # two populations, so splitting pays
    for k, labels in enumerate(entropy._ranges(hist, 4), 1):
        assert (np.diff(labels) >= 0).all() and labels[0] == 0 and len(set(labels)) == k
        got = sum(entropy._bits(hist[labels == c]) for c in range(k))
        best = min(sum(entropy._bits(hist[a:b]) for a, b in zip((0,) + cut, cut + (9,)))
                   for cut in itertools.combinations(range(1, 9), k - 1))
        assert got == pytest.approx(best)


def test_other_layout_versions_are_refused():
    payload = np.arange(4096, dtype=np.uint16).tobytes()
    method, stored = compress1(payload, 2, (Segment(0, 64, 64),), "bfloat16")
    assert method == entropy.METHOD_PLANES and stored[0] == entropy.VERSION == 3
    for old in (1, 2, 4):
        with pytest.raises(FormatError, match=f"version {old}"):
            entropy.decompress(method, bytes([old]) + stored[1:], len(payload), 2, "bfloat16")


def test_large_tensors_are_cut_into_bands_of_rows(monkeypatch):
    monkeypatch.setattr(entropy, "MAX_PIECE_WORDS", 30_000)
    bands = entropy._bands(entropy._Piece(5, 1000, 100))
    assert len(bands) == 4 and all((b - a) * 100 <= 30_000 for a, b in bands)
    assert [a for a, _ in bands] == [0] + [b for _, b in bands[:-1]] and bands[-1][1] == 1000  # they tile it
    payload, segs = section("bfloat16")
    monkeypatch.setattr(entropy, "MAX_PIECE_WORDS", 4000)
    _, stored = roundtrip(payload, 2, segs, "bfloat16")
    # the piece count (a one-byte varint): two runs of words, and the 300 x 48 tensor in 4 bands of 75 rows
    assert len(entropy._pieces(len(payload) // 2, segs)) == 3 and stored[3] == 3 + 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zeros", [0.0, 0.3])  # 0.3: exponents too spread for nibbles (bytes + escapes off)
def test_waves_decode_the_same_words_with_bounded_scratch_and_never_reread_released_bytes(monkeypatch, dtype,
                                                                                         zeros):
    """A section decodes in waves of pieces: the result is the same, the scratch is one wave's, and every stored
    byte handed to `release` is never read again (the test overwrites it)."""
    monkeypatch.setattr(entropy, "CHUNK_LOG2", 12)  # several chunks per plane window
    monkeypatch.setattr(entropy, "MAX_PIECE_WORDS", 20_000)
    rng = np.random.default_rng(5)
    x = pca_like(600, 96, seed=5)
    x[rng.random(x.shape) < zeros] = 0.0
    head = rng.standard_normal(101) * 0.01
    payload = np.concatenate([words_of(head, dtype), words_of(x.ravel(), dtype), words_of(x[:50].ravel(), dtype)])
    segs = [Segment(101, 600, 96), Segment(101 + 600 * 96, 50, 96)]
    ws = word_size(dtype)
    method, stored = compress1(payload.tobytes(), ws, segs, dtype)
    assert method == entropy.METHOD_PLANES
    assert stored[3] >= 5  # the piece count (a one-byte varint here): bands of the two tensors, runs between
    take, taken, most = entropy._SCRATCH.take, [], {}
    monkeypatch.setattr(entropy._SCRATCH, "take", lambda k: taken.append(k) or take(k))
    for wave in (1, 25_000, 10 ** 9):  # a piece per wave, a few, the whole section in one
        monkeypatch.setattr(entropy, "WAVE_WORDS", wave)
        buf = np.frombuffer(bytearray(stored), np.uint8)
        released = np.zeros(len(stored), bool)
        taken.clear()

        def release(a, b):
            assert 0 <= a <= b <= len(stored)
            buf[a:b] = 0xA5  # poison: a later read of these bytes would decode garbage or fail
            released[a:b] = True

        out = entropy.decompress(method, memoryview(buf), payload.nbytes, ws, dtype, release=release)
        assert bytes(out) == payload.tobytes()
        assert released.mean() > 0.8  # nearly every byte was handed back before the end
        most[wave] = max(taken)
    assert most[1] < most[10 ** 9] / 2  # one piece's streams at a time: a fraction of the whole section's

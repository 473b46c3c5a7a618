"""Codec `bitsback`: the word stack, the paper's Algorithms 1-4, whole-model round trips with correction codes,
block independence, and numerics that survive arbitrary words."""

import numpy as np
import pytest
import torch

from bbformat.codecs import get_codec
from bbformat.codecs.base import split_group
from bbformat.codecs.bitsback import BlockPlan, BitsBackCodec
from bbformat.codecs.rotation import canonical_rotation, choose_signs, eig_from_words, eig_to_words, \
    n_rotation_words, recover_rotation, rotation_from_words, signs_from_words, signs_to_words, \
    words_from_rotation
from bbformat.codecs.wordstack import StackUnderflowError, WordStack
from bbformat.errors import BBFError, FormatError
from bbformat.models.sliced import SlicedLM
from bbformat.models.synthetic import random_slicegpt, tiny_desc
from bbformat.words import from_words, to_words, words_to_f64

TAU = 0.005


def encode_all(desc, weights, codec, dtype):
    enc = codec.encoder(desc, dtype)
    return {g: enc.encode(g, {t.name: weights[t.name] for t in desc.group_tensors(g)}) for g in desc.groups()}


def decode_all(desc, encoded, codec, dtype, sections=None):
    dec = codec.decoder(desc, dtype)
    return {g: dec.decode(g, (sections or {}).get(g) or {s.kind: s.payload for s in e.sections})
            for g, e in encoded.items()}


@pytest.fixture(scope="module")
def coded():
    """Tiny Llama and OPT models (block widths differ), encoded and decoded once per (family, dtype, tau)."""
    cache = {}

    def get(family, dtype="float16", tau=TAU, widths=(48, 40, 56)):
        key = (family, dtype, tau, widths)
        if key not in cache:
            desc = tiny_desc(family, widths=widths)
            weights = random_slicegpt(desc, seed=3)
            codec = BitsBackCodec(threshold=tau)
            enc = encode_all(desc, weights, codec, dtype)
            cache[key] = desc, weights, codec, enc, decode_all(desc, enc, codec, dtype)
        return cache[key]
    return get


# ---- the word stack ---------------------------------------------------------------------------------------
def test_wordstack_push_pop_round_trip():
    st = WordStack(np.uint16)
    a, b = np.arange(5, dtype=np.uint16), np.arange(3000, dtype=np.uint16)  # b forces the buffer to grow
    st.push(a)
    st.push(b)
    assert len(st) == 3005
    np.testing.assert_array_equal(st.pop(3000), b)
    np.testing.assert_array_equal(st.words(), a)
    np.testing.assert_array_equal(st.pop(2), a[3:])
    with pytest.raises(StackUnderflowError, match="popping 4 words from a stack of 3"):
        st.pop(4)
    assert len(st) == 3  # a failed pop leaves the message alone
    with pytest.raises(TypeError):
        st.push(np.zeros(2, np.uint32))
    assert issubclass(StackUnderflowError, FormatError)


# ---- Algorithms 1-4 ---------------------------------------------------------------------------------------
def _weight_words(n, dtype="float16", seed=0):
    return to_words(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.03, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rotation_words_round_trip(dtype):
    """Algorithm 3 then 4 (with float32 eigenvalues) gives back the popped words up to a few word steps."""
    D = 40
    words = _weight_words(n_rotation_words(D), dtype)
    Q, lam = rotation_from_words(words, D, dtype)
    assert np.abs(Q @ Q.T - np.eye(D)).max() < 1e-12
    bits = words.itemsize * 8
    lam32 = eig_from_words(eig_to_words(lam, bits), bits)
    back = words_from_rotation(Q, lam32, dtype)
    steps = np.abs(back.astype(np.int64) - words.astype(np.int64))
    assert steps.max() <= (2 if dtype != "float32" else 64) and steps.mean() < 1


@pytest.mark.parametrize("bits", [16, 32])
def test_side_information_round_trip(bits):
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], 37)
    sw = signs_to_words(signs, bits)
    assert sw.size == -(-37 // bits)
    np.testing.assert_array_equal(signs_from_words(sw, 37, bits), signs)
    lam = rng.standard_normal(37) * 10
    ew = eig_to_words(lam, bits)
    assert ew.size == 37 * 32 // bits
    np.testing.assert_array_equal(eig_from_words(ew, bits), lam.astype(np.float32))


def test_recover_rotation_exact_arithmetic():
    """Algorithm 2 on an unrounded carrier gives the rotation back, signs included."""
    rng = np.random.default_rng(1)
    M = rng.standard_normal((24, 40))
    U = canonical_rotation(M)
    M_c = U.T @ M
    assert np.abs(np.triu(M_c @ M_c.T, 1)).max() < 1e-10  # canonical: Gram matrix diagonal ...
    assert np.all(np.diff(np.diag(M_c @ M_c.T)) < 0)  # ... in descending order
    Q, _ = rotation_from_words(_weight_words(n_rotation_words(24)), 24, "float16")
    signs, _ = choose_signs(Q, Q.T @ M_c)
    np.testing.assert_allclose(recover_rotation(Q.T @ M_c, signs), Q, atol=1e-9)
    np.testing.assert_allclose(recover_rotation(Q.T @ M_c, signs) @ (Q.T @ M_c), M_c, atol=1e-9)


@pytest.mark.parametrize("pattern", ["random", "zeros", "ones", "nan", "inf"])
def test_arbitrary_words_stay_finite(pattern):
    D = 30
    n = n_rotation_words(D)
    words = {"random": np.random.default_rng(2).integers(0, 2**16, n).astype(np.uint16),
             "zeros": np.zeros(n, np.uint16), "ones": np.full(n, 0xFFFF, np.uint16),
             "nan": np.full(n, 0x7E00, np.uint16), "inf": np.full(n, 0x7C00, np.uint16)}[pattern]
    with np.errstate(all="raise"):
        Q, lam = rotation_from_words(words, D, "float16")
        assert np.isfinite(Q).all() and np.isfinite(lam).all()
        lam2 = eig_from_words(words[: 2 * D], 16)
        back = words_from_rotation(Q, lam2, "float16")
        assert np.isfinite(words_to_f64(back, "float16")).all()
        M = words_to_f64(np.resize(words, (D, 40)), "float16")
        Q2 = recover_rotation(M, signs_from_words(words[:2], D, 16))
        assert np.isfinite(Q2).all() and np.abs(Q2 @ Q2.T - np.eye(D)).max() < 1e-9


# ---- whole-model round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_weight_within_threshold(coded, family, dtype):
    desc, _, _, enc, dec = coded(family, dtype)
    n_checked = 0
    for g in desc.groups():
        got = split_group(desc, g, dec[g])
        for name, want in enc[g].canonical.items():
            err = np.abs(words_to_f64(got[name], dtype) - words_to_f64(want, dtype))
            assert err.max() <= TAU, (name, err.max())
            n_checked += want.size
        if g.startswith("layer"):
            st = enc[g].stats
            assert not st["skipped"]
            i = int(g.split(".")[1])
            kb, kc = desc.attn_output_dims[i], desc.mlp_output_dims[i]
            assert st["popped_words"] == kb * (kb + 1) // 2 + kc * (kc + 1) // 2
            # the block section is shorter than the raw words by the popped words less the side information
            raw = sum(t.numel for t in desc.group_tensors(g))
            side = st["eig_words"] + st["sign_words"]
            word_size = 4 if dtype == "float32" else 2
            assert len(enc[g].sections[0].payload) == (raw - st["popped_words"] + side) * word_size
    assert n_checked == desc.num_params()


def test_small_threshold_forces_corrections(coded):
    """With a tiny threshold most rotated values need a correction record, and the decoder replays them all."""
    desc, _, _, enc, dec = coded("llama", "float16", 1e-6)
    corrections = sum(sum(enc[g].stats["corrections"].values()) for g in desc.groups() if g.startswith("layer"))
    assert corrections > 1000
    for g in desc.groups():
        got = split_group(desc, g, dec[g])
        for name, want in enc[g].canonical.items():
            assert np.abs(words_to_f64(got[name], "float16") - words_to_f64(want, "float16")).max() <= 1e-6


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_logits_match(coded, family):
    """The decoded model computes what the canonical (and the original) model computes, within the effect of
    per-weight errors below the threshold (~1% of the logit scale for these tiny float16 models)."""
    desc, weights, _, enc, dec = coded(family)
    canon = {n: from_words(w, "float16").float() for e in enc.values() for n, w in e.canonical.items()}
    decoded = {n: from_words(w, "float16").float()
               for g in desc.groups() for n, w in split_group(desc, g, dec[g]).items()}
    ids = torch.randint(0, desc.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        orig, can, got = (SlicedLM(desc, w)(ids) for w in (weights, canon, decoded))
    scale = orig.abs().max()
    assert (orig - can).abs().max() < 2e-3 * scale  # canonicalisation is an exact symmetry (up to rounding)
    assert (can - got).abs().max() < 2e-2 * scale
    assert (orig - got).abs().max() < 2e-2 * scale


def test_flipped_bit_stays_in_its_block(coded):
    desc, _, codec, enc, dec = coded("llama")
    for at in (0, 14000, -3):  # bytes: in the attention part, in the rotated o_proj, in the rotated down_proj
        block = bytearray(enc["layer.1"].sections[0].payload)
        block[at] ^= 0x10
        sections = {"layer.1": {"block": bytes(block), "correction": enc["layer.1"].sections[1].payload}}
        redec = decode_all(desc, enc, codec, "float16", sections)
        for g in desc.groups():
            assert np.array_equal(redec[g], dec[g]) == (g != "layer.1"), g


def test_block_decodes_alone(coded):
    desc, _, codec, enc, dec = coded("opt")
    fresh = codec.decoder(desc, "float16")
    e = enc["layer.2"]
    np.testing.assert_array_equal(fresh.decode("layer.2", {s.kind: s.payload for s in e.sections}), dec["layer.2"])


def test_uncovered_pop_skips_bits_back(coded):
    """A block whose attention side is smaller than k_b(k_b+1)/2 stores that carrier canonical and still decodes."""
    desc, _, _, enc, dec = coded("llama", widths=(8, 16, 64))
    plan = BlockPlan(desc, 0, "float16")
    assert not plan.mid.bits_back and plan.out.bits_back
    assert enc["layer.0"].stats["skipped"] == ["mid.0"]
    for g in desc.groups():
        got = split_group(desc, g, dec[g])
        for name, want in enc[g].canonical.items():
            assert np.abs(words_to_f64(got[name], "float16") - words_to_f64(want, "float16")).max() <= TAU


def test_arbitrary_sections_decode_finite(coded):
    """Random, all-zero, all-ones and NaN words in a block section decode without errors or warnings, and the
    computed carriers are finite."""
    desc, _, codec, enc, _ = coded("llama")
    dec = codec.decoder(desc, "float16")
    n = len(enc["layer.0"].sections[0].payload) // 2
    empty = b"\x00" * 4  # four empty correction lists
    names = desc.layer_names(0)
    for words in (np.random.default_rng(0).integers(0, 2**16, n), np.zeros(n), np.full(n, 0xFFFF),
                  np.full(n, 0x7E00)):
        with np.errstate(all="raise"):
            got = split_group(desc, "layer.0", dec.decode("layer.0", {"block": words.astype("<u2").tobytes(),
                                                               "correction": empty}))
        for role in ("o", "down"):
            assert np.isfinite(words_to_f64(got[names[role]], "float16")).all()


def test_bad_sections_raise(coded):
    desc, _, codec, enc, _ = coded("llama", "float16", 1e-6)
    dec = codec.decoder(desc, "float16")
    block, corr = (s.payload for s in enc["layer.0"].sections)
    with pytest.raises(FormatError, match="block section has"):
        dec.decode("layer.0", {"block": block[:-2], "correction": corr})
    with pytest.raises(FormatError, match="truncated"):
        dec.decode("layer.0", {"block": block, "correction": corr[:-1]})
    with pytest.raises(FormatError, match="trailing"):
        dec.decode("layer.0", {"block": block, "correction": corr + b"\x00"})
    with pytest.raises(FormatError, match="out of range"):
        dec.decode("layer.0", {"block": block, "correction": b"\x01\xff\xff\x03\x00\x00" + b"\x00" * 3})
    with pytest.raises(FormatError, match="unknown group"):
        dec.decode("layer.9", {"block": block, "correction": corr})


def test_params_validated():
    assert get_codec("bitsback").params() == {"threshold": TAU}
    assert get_codec("bitsback", {"threshold": 0.01}).config() == {"id": "bitsback", "params": {"threshold": 0.01}}
    for bad in (0, -1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(BBFError, match="threshold"):
            BitsBackCodec(threshold=bad)
    with pytest.raises(BBFError, match="unknown parameter\\(s\\) \\['tau'\\]; it takes \\['threshold'\\]"):
        get_codec("bitsback", {"tau": 0.1})
    with pytest.raises(BBFError, match="unknown parameter\\(s\\) \\['x'\\]; it takes no parameters"):
        get_codec("raw", {"x": 1})

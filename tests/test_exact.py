"""Codec `exact`: triangular canonical form, structural zeros not stored, decoding is reading."""

import numpy as np
import pytest
import torch

from bbformat.codecs import get_codec
from bbformat.codecs.base import split_group
from bbformat.codecs.exact import carriers, triangular_rotation
from bbformat.errors import BBFError, FormatError, ModelError
from bbformat.models.arch import apply_rotation
from bbformat.models.sliced import SlicedLM
from bbformat.models.synthetic import example_desc, random_slicegpt, tiny_desc
from bbformat.words import from_words, to_words, torch_dtype

DTYPES = ("float16", "bfloat16", "float32")
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23}


def _desc(family):
    # widths differ between blocks and inside a block, so every carrier fallback is exercised
    return tiny_desc(family, num_layers=3, hidden_size=64, widths=(48, 40, 56))


def _encode(desc, tensors, dtype, codec="exact"):
    enc = get_codec(codec).encoder(desc, dtype)
    return {g: enc.encode(g, {t.name: tensors[t.name] for t in desc.group_tensors(g)}) for g in desc.groups()}


def _decode(desc, encoded, dtype):
    dec = get_codec("exact").decoder(desc, dtype)
    return {g: dec.decode(g, {s.kind: s.payload for s in e.sections}) for g, e in encoded.items()}


def _reference_canonical(desc, tensors):
    """The canonical form computed on the whole model at once (no streaming), for comparison."""
    x = {n: t.to(torch.float64) for n, t in tensors.items()}
    cs = carriers(desc)
    for sym in desc.symmetries():
        c = cs[sym.name]
        apply_rotation(x, sym, triangular_rotation(c, x[c.tensor]))
        w = x[c.tensor]
        if c.axis == 1:
            w[c.start:c.start + c.k] = torch.tril(w[c.start:c.start + c.k])
        else:
            w[:, :c.k] = torch.triu(w[:, :c.k])
    return x


def _logits(desc, tensors):
    ids = torch.randint(0, desc.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return SlicedLM(desc, tensors, dtype=torch.float64)(ids)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_bit_exact_and_logits(family, dtype):
    desc = _desc(family)
    orig = random_slicegpt(desc, seed=3, dtype=torch_dtype(dtype))
    encoded = _encode(desc, orig, dtype)
    decoded = {}
    for g, seq in _decode(desc, encoded, dtype).items():
        for name, w in split_group(desc, g, seq).items():
            assert np.array_equal(w, encoded[g].canonical[name]), name  # every word
            decoded[name] = w
    # the streaming encoder's canonical words equal the whole-model canonical form, rounded once
    ref = _reference_canonical(desc, orig)
    for name, w in decoded.items():
        assert np.array_equal(w, to_words(ref[name], dtype)), name
    dec_t = {n: from_words(w, dtype) for n, w in decoded.items()}
    canon_t = {n: t.to(torch_dtype(dtype)) for n, t in ref.items()}
    assert torch.equal(_logits(desc, dec_t), _logits(desc, canon_t))
    # against the original: only the single rounding of the rotated weights differs (float64 forward).
    # Tolerance 4 eps(dtype) max|logit|; measured <= 1.14 eps (5 seeds, both families, 3 dtypes).
    a, b = _logits(desc, orig), _logits(desc, dec_t)
    assert (a - b).abs().max() <= 4 * EPS[dtype] * a.abs().max()


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_saved_words_are_the_symmetries_free_parameters(family, dtype):
    desc = _desc(family)
    orig = random_slicegpt(desc, seed=1, dtype=torch_dtype(dtype))
    exact, raw = _encode(desc, orig, dtype), _encode(desc, orig, dtype, codec="raw")
    free = sum(s.free_params for s in desc.symmetries())
    word = 2 if dtype != "float32" else 4

    def size(enc):
        return sum(len(s.payload) for e in enc.values() for s in e.sections)

    assert size(raw) - size(exact) == free * word
    assert sum(e.stats["saved_words"] for e in exact.values()) == free
    assert sum(s.free_params for s in get_codec("exact").symmetries_removed(desc)) == free
    for g, e in exact.items():  # one empty correction section per block, as the container expects
        kinds = [s.kind for s in e.sections]
        assert kinds == list(get_codec("exact").sections_for(g))
        assert all(s.payload == b"" for s in e.sections if s.kind == "correction")
    # the omitted words really are zero words in the canonical form, and the diagonal is non-negative
    canon = {n: w for e in exact.values() for n, w in e.canonical.items()}
    for c in carriers(desc).values():
        block = from_words(canon[c.tensor], dtype).to(torch.float64)
        block = block[c.start:c.start + c.k] if c.axis == 1 else block[:, :c.k]
        zeros = to_words(block, dtype)[np.triu_indices(c.k, 1) if c.axis == 1 else np.tril_indices(c.k, -1)]
        assert (zeros == 0).all()
        assert (torch.diagonal(block) >= 0).all()


def test_segments_cover_rectangles_of_the_payload():
    desc = _desc("llama")
    e = _encode(desc, random_slicegpt(desc, seed=0), "float32")["layer.1"]
    sec = e.sections[0]
    n = len(sec.payload) // sec.word_size
    ends = [s.offset + s.rows * s.cols for s in sec.segments]
    assert all(a.offset + a.rows * a.cols <= b.offset for a, b in zip(sec.segments, sec.segments[1:]))
    assert max(ends) <= n
    tri = sum(c.k * (c.k + 1) // 2 for c in carriers(desc).values() if c.tensor.startswith("model.layers.1."))
    assert n - sum(s.rows * s.cols for s in sec.segments) == tri  # only the packed triangles are not 2-D here


def test_carriers_are_eligible_for_real_shapes():
    for desc in (_desc("llama"), _desc("opt"), example_desc("smollm2-135m", sparsity=0.25),
                 example_desc("opt-125m", sparsity=0.2)):
        syms = desc.symmetries()
        cs = carriers(desc)
        assert set(cs) == {s.name for s in syms}  # every symmetry has a carrier
        info = desc.tensor_map()
        for i, s in enumerate(syms):
            c = cs[s.name]
            assert info[c.tensor].group == s.group and s.action(c.tensor).axis == c.axis
            assert all(c.tensor not in {a.tensor for a in later.actions} for later in syms[i + 1:])
    smol = {k: c.tensor.rsplit(".", 2)[-2:] for k, c in carriers(example_desc("smollm2-135m", 0.25)).items()}
    assert smol["emb"] == ["embed_tokens", "weight"]
    assert carriers(example_desc("smollm2-135m", 0.25))["emb"].start == (49152 - 432) // 2  # middle of the vocabulary


def test_bit_flip_changes_only_its_block():
    desc, dtype = _desc("llama"), "bfloat16"
    encoded = _encode(desc, random_slicegpt(desc, seed=2, dtype=torch.bfloat16), dtype)
    clean = _decode(desc, encoded, dtype)
    sec = encoded["layer.1"].sections[0]
    bad = bytearray(sec.payload)
    bad[len(bad) // 3] ^= 0x10
    sec.payload = bytes(bad)
    dec = get_codec("exact").decoder(desc, dtype)
    for g in reversed(desc.groups()):  # any order: each group decodes on its own
        seq = dec.decode(g, {s.kind: s.payload for s in encoded[g].sections})
        assert (seq != clean[g]).sum() == (g == "layer.1")  # exactly one word, in the damaged block only


def test_bad_input_is_refused():
    desc, dtype = _desc("opt"), "float16"
    tensors = random_slicegpt(desc, seed=0)
    dec = get_codec("exact").decoder(desc, dtype)
    e = _encode(desc, tensors, dtype)["layer.0"]
    with pytest.raises(FormatError, match="block section has"):
        dec.decode("layer.0", {"block": e.sections[0].payload[:-2], "correction": b""})
    with pytest.raises(FormatError, match="correction section is not empty"):
        dec.decode("layer.0", {"block": e.sections[0].payload, "correction": b"x"})
    enc = get_codec("exact").encoder(desc, dtype)
    embed = {t.name: tensors[t.name].clone() for t in desc.group_tensors("embed")}
    embed[desc.prefix + "embed_tokens.weight"][5, 3] = float("nan")
    with pytest.raises(ModelError, match="inf/nan"):
        enc.encode("embed", embed)
    # a carrier whose triangle's diagonal (a column norm) exceeds float16's range is refused, not stored as inf
    embed = {t.name: tensors[t.name].clone() for t in desc.group_tensors("embed")}
    embed[desc.prefix + "embed_tokens.weight"][0] = 6e4  # representable; its row norm is not
    with pytest.raises(BBFError, match="overflows float16"):
        get_codec("exact").encoder(desc, dtype).encode("embed", embed)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_canonical_form_does_not_depend_on_the_symmetries(family):
    # the point of the codec: a model rotated by arbitrary symmetry rotations has the same canonical form
    desc = _desc(family)
    orig = {n: t.to(torch.float64) for n, t in random_slicegpt(desc, seed=4, dtype=torch.float64).items()}
    moved = dict(orig)
    gen = torch.Generator().manual_seed(5)
    for sym in desc.symmetries():
        q, r = torch.linalg.qr(torch.randn(sym.size, sym.size, generator=gen, dtype=torch.float64))
        apply_rotation(moved, sym, q)
    a, b = _encode(desc, orig, "float32"), _encode(desc, moved, "float32")
    for g in desc.groups():
        for name, w in a[g].canonical.items():
            x, y = from_words(w, "float32"), from_words(b[g].canonical[name], "float32")
            # measured: identical words; allow rare one-ulp flips
            assert (x - y).abs().max() <= 1e-5 * x.abs().max(), name
    assert not torch.allclose(orig[desc.layer_names(1)["down"]], moved[desc.layer_names(1)["down"]])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_reader_rebuilds_every_carrier_in_place(family, tmp_path):
    """The reader decodes each group's payload behind its structural zeros' worth of room and the decoder moves the
    tensors down and rebuilds the carriers there (no second buffer): the result must equal the codec's canonical
    words, word for word, and a group's tensors must tile one buffer of exactly the group's size."""
    import bbformat

    desc = _desc(family)
    dtype = "bfloat16"
    orig = random_slicegpt(desc, seed=5, dtype=torch_dtype(dtype))
    encoded = _encode(desc, orig, dtype)
    dec = get_codec("exact").decoder(desc, dtype)
    emb = carriers(desc)["emb"]
    assert dec.payload_room("embed", "initial") == emb.zeros > 0
    for g in desc.groups():
        if g.startswith("layer."):
            zeros = sum(c.zeros for c in carriers(desc).values() if c.tensor in {t.name for t in desc.group_tensors(g)})
            assert dec.payload_room(g, "block") == zeros > 0
    path = tmp_path / "m.bbf"
    bbformat.save(orig, str(path), model=desc, codec="exact", dtype=dtype)
    loaded = bbformat.load(str(path))
    for g, e in encoded.items():
        for name, words in e.canonical.items():
            assert np.array_equal(to_words(loaded[name], dtype), words), name
    with bbformat.open(str(path)) as f:
        for g in desc.groups():
            ts = [f.group(g)[t.name] for t in desc.group_tensors(g)]
            starts = [t.data_ptr() for t in ts]
            assert starts == sorted(starts), g
            for a, b in zip(ts, ts[1:]):  # back to back, in model order
                assert a.data_ptr() + a.numel() * a.element_size() == b.data_ptr(), g

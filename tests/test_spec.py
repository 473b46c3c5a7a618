"""SPEC.md stands alone: what it states is what the code does.

* Section 9's tensor tables, read from SPEC.md itself, give exactly `ModelDesc.tensors()` (names, shapes, groups,
  order) and the header's tensor table (offsets), for both families and every combination of bias flags.
* 11.3's float64 -> word conversion, implemented here in numpy from the spec's four steps, gives the very words
  the codec computes (`words_from_entries`, and `to_words` for canonical words), on values that include
  double-rounding cases; a correctly rounded conversion gives other words on some of them, and decoding a
  bitsback file with it gives other words than the writer's simulation.
* Varints have at most 9 bytes, in the entropy stage and in the correction codes alike.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bbformat.codecs import bitsback, entropy, rotation
from bbformat.codecs.bitsback import BitsBackCodec, _Replay
from bbformat.container.header import tensor_table
from bbformat.errors import FormatError
from bbformat.models.arch import ModelDesc
from bbformat.models.synthetic import example_desc, random_slicegpt, tiny_desc
from bbformat.words import to_words

SPEC = (Path(__file__).resolve().parent.parent / "SPEC.md").read_text()


# ---- section 9: the tensor list ------------------------------------------------------------------------------
def spec_table(header: str) -> list[list[str]]:
    """The rows of the SPEC.md table whose header line is `header`, as lists of cells (backticks removed)."""
    lines = SPEC.split("\n")
    at = lines.index(header) + 2  # skip the |---| line
    rows = []
    while at < len(lines) and lines[at].startswith("|"):
        rows.append([c.strip().strip("`") for c in lines[at].strip("|").split("|")])
        at += 1
    return rows


def spec_shape(expr: str, **env) -> tuple[int, ...]:
    v = eval(expr.replace("·", "*").replace("−", "-"), {"__builtins__": {}}, env)  # noqa: S307 - our own SPEC
    return v if isinstance(v, tuple) else (v,)


def present(cond: str, desc: ModelDesc) -> bool:
    if cond == "always":
        return True
    if cond in ("llama", "opt"):
        return desc.family == cond
    return getattr(desc, cond)  # a flag: attention_bias, mlp_bias, lm_head_bias


def tensors_from_spec(desc: ModelDesc) -> list[tuple[str, tuple[int, ...], str]]:
    outer = spec_table("| group | family | name | shape | present |")
    layer = spec_table("| # | role | llama | opt | shape | present |")
    assert len(outer) == 5 and len(layer) == 15 and [int(r[0]) for r in layer] == list(range(1, 16))
    env = dict(V=desc.vocab_size, n_h=desc.num_heads, n_kv=desc.num_kv_heads, h=desc.head_dim,
               F=desc.intermediate_size, L=desc.num_layers, max_position_embeddings=desc.max_position_embeddings,
               e_0=desc.embedding_dims[0], e_1=desc.embedding_dims[-1], k_c=list(desc.mlp_output_dims))

    def outer_rows(group):
        return [(name, spec_shape(shape, **env), group) for g, fam, name, shape, cond in outer
                if g == group and fam in (desc.family, "both") and present(cond, desc)]

    out = outer_rows("embed")
    prefix = "model.layers.{}." if desc.family == "llama" else "model.decoder.layers.{}."
    for i in range(desc.num_layers):
        ka, kb, kc = desc.attn_input_dims[i], desc.attn_output_dims[i], desc.mlp_output_dims[i]
        for _, _, llama, opt, shape, cond in layer:
            name = llama if desc.family == "llama" else opt
            if name != "—" and present(cond, desc):
                out.append((prefix.format(i) + name, spec_shape(shape, **{**env, "k_a": ka, "k_b": kb, "k_c": kc}),
                            f"layer.{i}"))
    return out + outer_rows("head")


def distinct_desc(family: str, attention_bias: bool, mlp_bias: bool, lm_head_bias: bool) -> ModelDesc:
    """A description in which every size differs from every other one, so a swapped symbol cannot pass."""
    e = (40,) if family == "llama" else (40, 40)
    return ModelDesc(family=family, hidden_size=64, num_layers=3, vocab_size=101, num_heads=6, num_kv_heads=3,
                     head_dim=7, intermediate_size=90, max_position_embeddings=33, embedding_dims=e,
                     attn_input_dims=(40, 52, 46), attn_output_dims=(36, 44, 50), mlp_input_dims=(36, 44, 50),
                     mlp_output_dims=(52, 46, 64), attention_bias=attention_bias, mlp_bias=mlp_bias,
                     lm_head_bias=lm_head_bias, activation="silu" if family == "llama" else "relu")


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "".join("AML"[i] if v else "-" for i, v in enumerate(f)))
def test_section_9_tensor_list_is_the_code(family, flags):
    desc = distinct_desc(family, *flags)
    want = [(t.name, t.shape, t.group) for t in desc.tensors()]
    assert tensors_from_spec(desc) == want
    # section 4: offset = the element counts of the tensors before it in its group
    offsets, table = {}, tensor_table(desc, "float16")
    for (name, shape, group), entry in zip(want, table):
        assert (entry["name"], tuple(entry["shape"]), entry["group"]) == (name, shape, group)
        assert entry["offset"] == offsets.get(group, 0)
        offsets[group] = offsets.get(group, 0) + int(np.prod(shape))


def test_section_9_counts():
    for name, sparsity, tensors, words in (("smollm2-135m", 0.25, 272, 140_652_288),
                                           ("opt-125m", 0.2, 172, 147_250_880)):
        desc = example_desc(name, sparsity)
        assert (len(tensors_from_spec(desc)), desc.num_params()) == (tensors, words)
        text = " ".join(SPEC.split())
        assert f"= {tensors} tensors" in text and f"{words:,} words" in text


def test_embedding_widths_must_agree():
    with pytest.raises(Exception, match="embedding_dims"):
        ModelDesc(**{**distinct_desc("opt", True, True, True).to_dict(), "embedding_dims": [40, 36]})


# ---- 11.3: float64 -> word, exactly ---------------------------------------------------------------------------
MAX = {"float16": 65504.0, "bfloat16": (2 - 2 ** -7) * 2.0 ** 127, "float32": (2 - 2 ** -23) * 2.0 ** 127}
FORMAT = {"float16": (10, -14), "bfloat16": (7, -126), "float32": (23, -126)}  # fraction bits, smallest exponent


def spec_words(x: np.ndarray, dtype: str) -> np.ndarray:
    """SPEC 11.3, entry -> word, written from its text: 1. NaN/Inf -> 0; 2. clamp to +-MAX; 3. round to float32
    (nearest, ties to even); 4. round that float32 to the word dtype (nearest, ties to even)."""
    x = np.where(np.isfinite(x), x, 0.0)
    x = np.clip(x, -MAX[dtype], MAX[dtype])
    y = x.astype(np.float32)  # IEEE 754 binary32, round to nearest even
    if dtype == "float32":
        return y.view(np.uint32)
    if dtype == "float16":
        return y.astype(np.float16).view(np.uint16)  # IEEE 754 binary16, round to nearest even, subnormals kept
    u = y.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def round_to(x: np.ndarray, fraction_bits: int, emin: int) -> np.ndarray:
    """x rounded ONCE to the binary format with that many fraction bits and smallest normal exponent: to nearest,
    ties to even (x / q is exact, np.rint rounds half to even)."""
    _, e = np.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1
    q = np.ldexp(1.0, np.maximum(e - 1, emin) - fraction_bits)
    return np.rint(x / q) * q


def correctly_rounded_words(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a correctly rounded float64 -> word conversion gives (after steps 1-2)."""
    x = np.clip(np.where(np.isfinite(x), x, 0.0), -MAX[dtype], MAX[dtype])
    r = round_to(x, *FORMAT[dtype])
    if dtype == "float16":
        return r.astype(np.float16).view(np.uint16)  # exact: r is a float16 value
    bits = r.astype(np.float32).view(np.uint32)  # exact: r is a float32 (bfloat16) value
    return bits if dtype == "float32" else (bits >> 16).astype(np.uint16)


def midpoints(words: np.ndarray, dtype: str) -> np.ndarray:
    """Values halfway between each word and the next one up (float64, exact)."""
    if dtype == "float16":
        a = words.view(np.float16).astype(np.float64)
        b = (words + np.uint16(1)).view(np.float16).astype(np.float64)
    else:
        a = (words.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        b = ((words.astype(np.uint32) + 1) << 16).view(np.float32).astype(np.float64)
    return (a + b) / 2


def sample_values(dtype: str) -> np.ndarray:
    """Ordinary values at several scales, ties and near-ties of the word dtype (normal and subnormal, both signs),
    the spec's examples, zeros, the clamp's edges, NaN and Inf."""
    rng = np.random.default_rng(12)
    parts = [rng.standard_normal(20000) * s for s in (1e-6, 1e-3, 0.03, 1.0, 300.0)]
    if dtype != "float32":
        top = 0x7BFF if dtype == "float16" else 0x7F7F  # the largest finite word
        w = np.concatenate([rng.integers(0, top, 20000), rng.integers(0, 0x400, 2000)]).astype(np.uint16)
        m = midpoints(w, dtype)
        m = m[np.isfinite(m) & (m != 0)]
        m = np.concatenate([m, -m])
        for rel in (2.0 ** -30, 2.0 ** -45):  # below half a float32 ulp: step 3 lands on the tie
            parts += [m, m * (1 + rel), m * (1 - rel)]
    parts.append(np.array([1 + 2 ** -11 + 2 ** -40, 1 + 2 ** -8 + 2 ** -40, 0.0, -0.0, -1e-300, 1e-300, 65504.0,
                           65519.99, 65520.0, -7e4, 1e6, 3.3895313892515355e38, 3.39e38, 1e39, -1e300,
                           np.inf, -np.inf, np.nan]))
    return np.concatenate(parts)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_bitsback_rounds_through_float32(dtype):
    x = sample_values(dtype)
    code = rotation.words_from_entries(x, dtype)  # what the encoder's simulation and the decoder compute
    np.testing.assert_array_equal(code, spec_words(x, dtype))
    ok = np.isfinite(x) & (np.abs(x) <= MAX[dtype])  # canonical words (11.1) and exact's rounding (12.2)
    np.testing.assert_array_equal(to_words(torch.from_numpy(x[ok]), dtype), spec_words(x[ok], dtype))
    correct = correctly_rounded_words(x, dtype)
    differ = code != correct
    if dtype == "float32":
        assert not differ.any()  # one rounding: steps 3-4 are the correctly rounded conversion
        return
    assert differ.sum() > 1000, "the values must include double-rounding cases"
    # where they differ, the double rounding is off by one word and only ever on a tie of step 3
    assert (np.abs(code[differ].astype(np.int64) - correct[differ].astype(np.int64)) == 1).all()
    y = np.clip(x[differ], -MAX[dtype], MAX[dtype]).astype(np.float32).astype(np.float64)
    assert (np.abs(y) == np.abs(midpoints(np.minimum(code[differ], correct[differ]), dtype))).all()
    # ordinary values: the two agree almost always (for random values about one in 2^14 / 2^17 differs)
    ordinary = slice(0, 100000)
    assert differ[ordinary].mean() < 1e-3


def test_the_spec_examples():
    one = np.array([1 + 2 ** -11 + 2 ** -40])
    assert rotation.words_from_entries(one, "float16")[0] == 0x3C00
    assert correctly_rounded_words(one, "float16")[0] == 0x3C01
    one = np.array([1 + 2 ** -8 + 2 ** -40])
    assert rotation.words_from_entries(one, "bfloat16")[0] == 0x3F80
    assert correctly_rounded_words(one, "bfloat16")[0] == 0x3F81
    for text in ("1 + 2⁻¹¹ + 2⁻⁴⁰", "`0x3C00`", "`0x3C01`", "1 + 2⁻⁸ + 2⁻⁴⁰", "`0x3F80`", "`0x3F81`"):
        assert text in SPEC


@pytest.fixture(scope="module")
def bitsback_file():
    """A float16 bitsback model large enough to meet double-rounding ties (~2^-14 of the decoder's values)."""
    desc = tiny_desc("llama", num_layers=3, hidden_size=128, vocab_size=64, widths=(112, 96, 120))
    weights = random_slicegpt(desc, seed=5)
    codec = BitsBackCodec()
    enc = codec.encoder(desc, "float16")
    groups = [g for g in desc.groups() if g.startswith("layer.")]
    encoded = {g: enc.encode(g, {t.name: weights[t.name] for t in desc.group_tensors(g)}) for g in desc.groups()}
    return desc, codec, {g: {s.kind: s.payload for s in encoded[g].sections} for g in groups}


def decode_layers(desc, codec, sections):
    dec = codec.decoder(desc, "float16")
    return np.concatenate([dec.decode(g, secs) for g, secs in sections.items()])


def decoder_rounding(m: pytest.MonkeyPatch, fn) -> None:
    """Make the bitsback decoder map entries to words with `fn` (carriers in bitsback, re-encoded words in
    rotation)."""
    m.setattr(bitsback, "words_from_entries", fn)
    m.setattr(rotation, "words_from_entries", fn)


def test_a_decoder_must_round_through_float32(bitsback_file, monkeypatch):
    desc, codec, sections = bitsback_file
    reference = decode_layers(desc, codec, sections)
    with monkeypatch.context() as m:  # the decoder with 11.3's conversion as written in the spec
        decoder_rounding(m, spec_words)
        np.testing.assert_array_equal(decode_layers(desc, codec, sections), reference)
    with monkeypatch.context() as m:  # ... and with a correctly rounded one: other words
        decoder_rounding(m, correctly_rounded_words)
        other = decode_layers(desc, codec, sections)
    differ = int((other != reference).sum())
    assert 0 < differ < reference.size // 1000, differ


# ---- varints: at most 9 bytes everywhere ---------------------------------------------------------------------
def long_varint(v: int, nbytes: int) -> bytes:
    """v (< 128) as a non-shortest LEB128 of nbytes bytes."""
    return bytes([v | 0x80] + [0x80] * (nbytes - 2) + [0])


def test_entropy_varints_have_at_most_9_bytes():
    data = b"hello"

    def stored(nbytes):  # method 1, word size 1: version 3, flags 0, chunk 2^12; stream length; one stored chunk
        return bytes([3, 0, 12]) + long_varint(len(data), nbytes) + bytes([len(data) << 1]) + data

    assert entropy.decompress(entropy.METHOD_PLANES, stored(9), len(data), 1, "float16") == data
    with pytest.raises(FormatError, match="longer than 9 bytes"):
        entropy.decompress(entropy.METHOD_PLANES, stored(10), len(data), 1, "float16")


def test_correction_varints_have_at_most_9_bytes():
    words = np.zeros(4, np.uint16)

    def payload(nbytes):  # one record: count 1, gap 2 (position 2), the true word 0xABCD
        return bytes([1]) + long_varint(2, nbytes) + (0xABCD).to_bytes(2, "little")

    fixed = _Replay(payload(9), "float16")("out.carrier", words)
    assert fixed.tolist() == [0, 0, 0xABCD, 0]
    with pytest.raises(FormatError, match="longer than 9 bytes"):
        _Replay(payload(10), "float16")("out.carrier", words)
    assert "at most 9 bytes" in SPEC and "10 bytes" not in SPEC
    assert re.search(r"varint.{0,40}longer than 9 bytes", SPEC)

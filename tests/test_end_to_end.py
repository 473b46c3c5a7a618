"""End to end: a Hugging Face model -> sliced -> .bbf (each codec) -> runnable model, locally, over HTTP and S3;
and the CLI on SliceGPT checkpoints (encode, decode, verify, inspect)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import bbformat
from bbformat.cli.inspect import summarize
from bbformat.models.slicegpt_io import save_slicegpt
from bbformat.models.sliced import SlicedLM
from bbformat.models.slicer import slice_model
from bbformat.models.synthetic import example_desc, random_slicegpt, tiny_desc

from test_slicer import calib, tiny_llama, tiny_opt

IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", params=["llama", "opt"])
def sliced(request):
    """A tiny random HF model of each family, sliced at 25% (float16 weights)."""
    model = tiny_llama() if request.param == "llama" else tiny_opt()
    desc, tensors = slice_model(model, calib(8), 0.25, dtype=torch.float16, progress=False)
    return desc, tensors


def logits(model_or_desc, tensors=None):
    m = model_or_desc if tensors is None else SlicedLM(model_or_desc, tensors)
    with torch.no_grad():
        return m.eval()(IDS)


# the slicer emits the exact codec's canonical form, so exact files reproduce its output bit for bit
@pytest.mark.parametrize("codec, rtol", [("raw", 0.0), ("exact", 0.0), ("bitsback", 5e-2)])
def test_load_model_matches_sliced_model(sliced, tmp_path, codec, rtol):
    desc, tensors = sliced
    path = tmp_path / "m.bbf"
    bbformat.save(tensors, str(path), model=desc, codec=codec)
    want, got = logits(desc, tensors), logits(bbformat.load_model(str(path)))
    scale = want.abs().max()
    if rtol == 0:
        assert torch.equal(got, want)
        back = bbformat.load(str(path))
        assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    else:  # bitsback: its own canonical form, within the threshold
        assert (got - want).abs().max() <= rtol * scale
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_exact_logits_equal_canonical_model(sliced, tmp_path):
    """The decoded model IS the canonicalised model, bit for bit."""
    desc, tensors = sliced
    codec = bbformat.codecs.get_codec("exact")
    enc = codec.encoder(desc, "float16")
    enc.ahead({n: tensors[n] for n in enc.wants_ahead()})  # as save() does (a tied head: SPEC 12.6)
    canon = {}
    for g in desc.groups():
        canon.update(enc.encode(g, {t.name: tensors[t.name] for t in desc.group_tensors(g)}).canonical)
    from bbformat.words import from_words

    canonical = {k: from_words(v, "float16").reshape(v.shape) for k, v in canon.items()}
    bbformat.save(tensors, str(tmp_path / "m.bbf"), model=desc, codec="exact")
    assert torch.equal(logits(bbformat.load_model(str(tmp_path / "m.bbf"))), logits(desc, canonical))


def test_url_and_s3_give_the_same_logits(sliced, tmp_path, served_dir, http_url, s3):
    desc, tensors = sliced
    name = f"e2e-{desc.family}.bbf"
    bbformat.save(tensors, str(served_dir / name), model=desc, codec="exact")
    local = logits(bbformat.load_model(str(served_dir / name)))
    assert torch.equal(logits(bbformat.load_model(f"{http_url}/{name}")), local)
    prefix, opts = s3
    bbformat.save(tensors, f"{prefix}/{name}", model=desc, codec="exact", storage_options=opts)
    assert torch.equal(logits(bbformat.load_model(f"{prefix}/{name}", storage_options=opts)), local)


def test_tokenizer_travels_in_the_file(tmp_path):
    from bbformat.models.hf import tokenizer_bytes
    from bbformat.models.loader import TOKENIZER_AUX
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    desc = tiny_desc("llama", num_layers=1, vocab_size=40)
    bbformat.save(random_slicegpt(desc, dtype=torch.float16), str(tmp_path / "t.bbf"), model=desc,
                  aux={TOKENIZER_AUX: tokenizer_bytes(tok)})
    model, tok2 = bbformat.load_pretrained(str(tmp_path / "t.bbf"))
    assert tok2("hello world there")["input_ids"] == tok("hello world there")["input_ids"] == [1, 2, 0]
    from bbformat.models.modeling import SlicedForCausalLM

    assert isinstance(model, SlicedForCausalLM) and isinstance(bbformat.load_model(str(tmp_path / "t.bbf")), SlicedLM)


# ---- generation: the .bbf model against the reference paths ----------------------------------------------------

def greedy_reference(model: SlicedLM, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding the slow way: the full prefix through the torch-only forward at every step, no cache."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


def test_generate_equals_the_reference_path(sliced, tmp_path):
    """SliceGPT's own (projecting) shortcuts: the .bbf model's generate() with its KV cache against greedy
    decoding through SlicedLM with no cache, token for token."""
    desc, tensors = sliced
    bbformat.save(tensors, str(tmp_path / "m.bbf"), model=desc, codec="exact")
    model, _ = bbformat.load_pretrained(str(tmp_path / "m.bbf"), dtype=torch.float64)
    prompt = IDS[:1, :6]
    got = model.generate(prompt, do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    ref = bbformat.load_model(str(tmp_path / "m.bbf"), dtype=torch.float64)
    assert got[0].tolist() == greedy_reference(ref, prompt, 24)


def test_unsliced_model_through_bbf_generates_what_hugging_face_does(tmp_path):
    """Sparsity 0 only rotates (shortcuts orthogonal): the .bbf of a tiny HF model, loaded back, generates
    exactly what the original HF model generates."""
    for make in (tiny_llama, tiny_opt):
        hf = make().double()
        with torch.no_grad():  # larger weights: livelier than HF's initialisation, which repeats one token
            for name, p in hf.named_parameters():
                if "norm" not in name and "embed_positions" not in name:
                    p.mul_(6)
        desc, tensors = slice_model(hf, calib(8), 0.0, dtype=torch.float64, progress=False)
        bbformat.save(tensors, str(tmp_path / "u.bbf"), model=desc, codec="exact", dtype="float32")
        model, _ = bbformat.load_pretrained(str(tmp_path / "u.bbf"), dtype=torch.float64)
        prompt = IDS[:1, :6]
        kw = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
        want, got = hf.generate(prompt, **kw), model.generate(prompt, **kw)
        assert got.sequences.tolist() == want.sequences.tolist()
        assert len(set(want.sequences[0, 6:].tolist())) > 1
        for a, b in zip(got.logits, want.logits):  # every step's logits, not only the argmax
            assert (a - b).abs().max() < 1e-5 * b.abs().max()


# ---- CLI on SliceGPT checkpoints --------------------------------------------------------------------------

def bbf(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "bbformat", *map(str, args)], capture_output=True, text=True)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A SliceGPT-layout .pt + .json of a tiny OPT model with widths that differ."""
    d = tmp_path_factory.mktemp("ckpt")
    desc = tiny_desc("opt")
    tensors = random_slicegpt(desc, seed=3, dtype=torch.float16)
    pt, js = save_slicegpt(desc, tensors, d / "tiny-opt_0.25.pt")
    return desc, tensors, pt


@pytest.mark.parametrize("codec", ["raw", "bitsback", "exact"])
def test_cli_encode_decode_verify(checkpoint, tmp_path, codec):
    desc, tensors, pt = checkpoint
    out = tmp_path / "m.bbf"
    bbf("encode", pt, "-o", out, "--codec", codec, "-q")
    rt = tmp_path / "rt.pt"
    bbf("decode", out, "-o", rt, "-q")
    sd = torch.load(rt, weights_only=True)
    assert list(sd) == [t.name for t in desc.tensors()]
    assert all(tuple(sd[t.name].shape) == t.shape for t in desc.tensors())
    assert json.loads(rt.with_suffix(".json").read_text())["attention_input_dimensions"] == \
        {str(i): k for i, k in enumerate(desc.attn_input_dims)}
    if codec == "raw":
        assert all(torch.equal(sd[k], tensors[k]) for k in tensors)
    v = json.loads(bbf("verify", out, "--against", pt, "--json").stdout)
    assert v["ok"] and v["values_over_threshold"] == 0 and len(v["tensors"]) == len(desc.tensors())


def test_cli_verify_fails_on_a_different_original(checkpoint, tmp_path):
    desc, tensors, pt = checkpoint
    out = tmp_path / "m.bbf"
    bbf("encode", pt, "-o", out, "--codec", "exact", "-q")
    other = dict(tensors)
    name = desc.layer_names(1)["up"]
    other[name] = other[name] + 0.5
    pt2, _ = save_slicegpt(desc, other, tmp_path / "other_0.25.pt")
    p = bbf("verify", out, "--against", pt2, ok=False)
    assert p.returncode == 1 and "FAILED" in p.stdout


def test_cli_bad_input_is_one_line(tmp_path):
    p = bbf("encode", tmp_path / "missing.pt", "-o", tmp_path / "x.bbf", ok=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    p = bbf("encode", tmp_path / "missing.pt", "-o", tmp_path / "x.bbf", "--codec", "raw", "--threshold", "0.1",
            ok=False)
    assert p.returncode == 2 and "threshold" in p.stderr


# ---- the savings bbf-inspect counts ---------------------------------------------------------------------

def test_inspect_counts_exact_saving_to_the_word(tmp_path):
    desc = tiny_desc("llama")
    bbformat.save(random_slicegpt(desc, dtype=torch.float16), str(tmp_path / "e.bbf"), model=desc, codec="exact")
    with bbformat.open(str(tmp_path / "e.bbf")) as f:
        t = summarize(f, check=False)["totals"]
    theory = sum(s.free_params for s in desc.symmetries())
    assert t["symmetry_saved_words"] == t["symmetry_theoretical_words"] == theory


def test_bitsback_net_saving_on_smollm2_shape(tmp_path):
    """Acceptance: at the default threshold the net saving (after eigenvalues, signs and corrections) is at least
    95% of the theoretical sum k(k-1)/2 over the symmetries the codec uses, counted by bbf-inspect."""
    desc = example_desc("smollm2-135m", 0.25, num_layers=2)
    bbformat.save(random_slicegpt(desc, dtype=torch.float16), str(tmp_path / "b.bbf"), model=desc,
                  codec="bitsback", compression="none")
    with bbformat.open(str(tmp_path / "b.bbf")) as f:
        t = summarize(f, check=False)["totals"]
    assert t["symmetry_theoretical_words"] == sum(s.free_params for s in desc.symmetries() if s.name != "emb")
    assert t["symmetry_saved_fraction"] >= 0.95

"""`exact`'s tied head (SPEC 12.6): a head that repeats the embeddings is stored as residuals against them."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bbformat
from bbformat import kernels
from bbformat.codecs import get_codec
from bbformat.container.reader import BBFReader
from bbformat.errors import BBFError, FormatError
from bbformat.models.stage import stage_plan
from bbformat.models.synthetic import random_slicegpt, tiny_desc
from bbformat.words import torch_dtype

from test_exact import EPS, _logits  # (float64 logits of a tiny model; the dtypes' epsilons)

DTYPES = ("float16", "bfloat16", "float32")


def _desc(family, tied=True):
    d = tiny_desc(family, num_layers=3, hidden_size=64, vocab_size=900, widths=(48, 40, 56))
    return dataclasses.replace(d, tie_word_embeddings=tied)


def _save(tmp_path, desc, tensors, dtype, name="m.bbf", **params):
    path = tmp_path / name
    canon = {}
    bbformat.save(tensors, str(path), model=desc, codec="exact", dtype=dtype, codec_params=params,
                  on_group=lambda g, enc: canon.update(enc.canonical))
    return path, canon


def _words(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_head_round_trip_is_bit_exact_and_keeps_the_logits(family, dtype, tmp_path):
    desc = _desc(family)
    orig = random_slicegpt(desc, seed=5, dtype=torch_dtype(dtype), tied=True)
    path, canon = _save(tmp_path, desc, orig, dtype)
    with BBFReader(str(path)) as f:
        assert f.header["codec"] == {"id": "exact", "params": {"tied_head": True}}
        assert [r.kind for r in f._by_group["head"].values()] == ["head", "correction"]
        got = f.load_all()
    for name, w in canon.items():
        assert np.array_equal(_words(got[name]), w.view(_words(got[name]).dtype)), name
    ref = _logits(desc, {k: v.to(torch.float64) for k, v in orig.items()})
    out = _logits(desc, {k: v.to(torch.float64) for k, v in got.items()})
    assert float((out - ref).abs().max()) <= 8 * EPS[dtype] * float(ref.abs().max())


def test_tied_head_is_much_smaller_than_the_untied_form(tmp_path):
    desc = _desc("llama")
    orig = random_slicegpt(desc, seed=1, dtype=torch.bfloat16, tied=True)
    tied, _ = _save(tmp_path, desc, orig, "bfloat16", "tied.bbf")
    plain, _ = _save(tmp_path, desc, orig, "bfloat16", "plain.bbf", tied_head=False)
    with BBFReader(str(tied)) as a, BBFReader(str(plain)) as b:
        assert b.header["codec"]["params"] == {}
        # the head's first e_0 = 48 of its 64 columns cost a few bits a word instead of ~10
        assert a.group_stored_bytes("head") < 0.6 * b.group_stored_bytes("head")
        assert a.store.size < b.store.size


def test_an_untied_source_keeps_the_plain_form_and_tied_head_true_refuses_it(tmp_path):
    desc = _desc("llama")
    orig = random_slicegpt(desc, seed=2, dtype=torch.float16)  # head independent of the embeddings
    path, _ = _save(tmp_path, desc, orig, "float16")
    with BBFReader(str(path)) as f:
        assert f.header["codec"]["params"] == {}
        assert f.header["stats"]["groups"]["embed"]["tie_error"] > 0.5
    with pytest.raises(BBFError, match="do not follow from the head"):
        _save(tmp_path, desc, orig, "float16", "forced.bbf", tied_head=True)
    # without the source's tie flag the writer does not even look (no head read ahead)
    path, _ = _save(tmp_path, _desc("llama", tied=False), random_slicegpt(desc, seed=2, tied=True), "float16", "nf.bbf")
    with BBFReader(str(path)) as f:
        assert f.header["codec"]["params"] == {}


def test_the_head_decodes_alone_fetching_the_embeddings(tmp_path):
    desc = _desc("llama")
    orig = random_slicegpt(desc, seed=3, dtype=torch.float16, tied=True)
    path, _ = _save(tmp_path, desc, orig, "float16")
    with BBFReader(str(path)) as f:
        want = f.load_all()
    with BBFReader(str(path)) as f:
        head = f.get_tensor("lm_head.weight")
        assert torch.equal(head, want["lm_head.weight"])
        assert f.codec.depends("head") == ("embed",) and f.codec.depends("embed") == ()
        order = f.stream_order()
        assert order.index("embed") < order.index("head")
        for groups in (["head"], ["head", "embed"], ["layer.1", "embed", "head"]):
            got = dict(f.stream(groups=groups, readahead=0))
            assert list(got) == groups
            for g in groups:
                for name, t in got[g].items():
                    assert torch.equal(t, want[name]), name
        plan = stage_plan(f, 2)
        assert plan[1]["also_fetches"] == ["embed"] and plan[0]["also_fetches"] == []
        assert plan[1]["stored_bytes"] == sum(f.group_stored_bytes(g) for g in plan[1]["groups"] + ["embed"])


def test_a_yielded_embedding_can_be_changed_once_the_head_is_decoded(tmp_path):
    desc = _desc("llama")
    orig = random_slicegpt(desc, seed=4, dtype=torch.bfloat16, tied=True)
    path, _ = _save(tmp_path, desc, orig, "bfloat16")
    with BBFReader(str(path)) as f:
        want = f.load_all()["lm_head.weight"].clone()
        for group, tensors in f.stream(groups=["embed", "head"], readahead=1):
            if group == "embed":  # the caller owns what it is given
                for t in tensors.values():
                    t.zero_()
            else:
                assert torch.equal(tensors["lm_head.weight"], want)


def _tied_file(tmp_path):
    desc = _desc("llama")
    path, _ = _save(tmp_path, desc, random_slicegpt(desc, seed=6, dtype=torch.float16, tied=True), "float16")
    return desc, path


def test_damaged_residuals_and_scales_are_format_errors(tmp_path):
    desc, path = _tied_file(tmp_path)
    with BBFReader(str(path)) as f:
        dec = get_codec("exact", {"tied_head": True}).decoder(desc, "float16")
        secs = {r.kind: bytes(f.read_section(r)) for r in f._by_group["head"].values()}
        embed = {n: _words(t).view(np.uint16) for n, t in f.group("embed").items()}
    ok = dec.decode_tensors("head", secs, deps=embed)["lm_head.weight"]
    nib = (desc.vocab_size * desc.embedding_dims[0] + 1) // 2
    for bad in (secs["correction"][:-2],                      # an escape missing
                secs["correction"] + b"\0\0",                  # an escape too many
                secs["correction"][:nib - 1]):                 # nibbles cut short
        with pytest.raises(FormatError):
            dec.decode_tensors("head", {**secs, "correction": bad}, deps=embed)
    c = bytearray(secs["head"])
    c[0:4] = np.float32(np.inf).tobytes()
    with pytest.raises(FormatError, match="scales"):
        dec.decode_tensors("head", {**secs, "head": bytes(c)}, deps=embed)
    with pytest.raises(FormatError, match="embeddings"):
        dec.decode_tensors("head", secs)
    inf = {n: w.copy() for n, w in embed.items()}
    next(iter(inf.values()))[0, 0] = 0x7C00
    with pytest.raises(FormatError, match="non-finite"):
        dec.decode_tensors("head", secs, deps=inf)
    assert ok.shape == (desc.vocab_size, desc.mlp_output_dims[-1])
    with pytest.raises(FormatError):  # a reader checks the parameter's type
        from bbformat.container.schema import _codec
        _codec({"id": "exact", "params": {"tied_head": 1}})


def _kernel_cases(seed=0):
    rng = np.random.default_rng(seed)
    for dtype, wd in (("bfloat16", np.uint16), ("float16", np.uint16), ("float32", np.uint32)):
        for rows, n, m in ((200, 37, 11), (7, 64, 0), (3, 1, 2), (61, 433, 5)):
            vals = rng.standard_normal((rows, n)) * np.exp(rng.uniform(-20, 12, (rows, n)))
            e = torch.from_numpy(vals).to(torch_dtype(dtype))
            e = _words(e).view(wd).copy()
            mask = {"bfloat16": 0x7F80, "float16": 0x7C00, "float32": 0x7F800000}[dtype]
            e[(e & mask) == mask] = 0
            c = rng.uniform(0.3, 3.0, n).astype(np.float32)
            c[0] = 1e4 if dtype == "float16" else 1e30  # products that overflow to inf
            p = kernels.tied_predict(e, c, dtype)
            bits = 8 * np.dtype(wd).itemsize
            w = ((p.astype(np.int64) + rng.integers(-6, 7, p.shape)) % (1 << bits)).astype(wd)
            far = rng.random(p.shape) < 0.05  # anywhere: escapes, sign changes, wrap-around
            w[far] = rng.integers(0, 1 << bits, far.sum(), dtype=np.uint64).astype(wd)
            yield dtype, e, c, w, rng.integers(0, 1 << 16, (rows, m)).astype(wd)


def test_kernel_matches_the_reference_and_inverts_the_residuals():
    for dtype, e, c, w, rest in _kernel_cases():
        nib, esc = kernels.tied_pack(kernels.tied_residuals(w, kernels.tied_predict(e, c, dtype)))
        a, b = np.zeros((e.shape[0], e.shape[1] + rest.shape[1]), e.dtype), None
        kernels.tied_restore_numpy(a, e, c, nib, esc, rest, dtype)
        assert np.array_equal(a[:, :e.shape[1]], w) and np.array_equal(a[:, e.shape[1]:], rest)
        if kernels.COMPILED:
            b = np.zeros_like(a)
            kernels.tied_restore(b, e, c, nib, esc, rest, dtype)
            assert np.array_equal(a, b), dtype


def test_prediction_rounds_like_ieee_for_every_16_bit_word():
    """Every finite float16 / bfloat16 word times a few scales: compiled (vector and scalar paths) = reference."""
    script = """
import numpy as np
from bbformat import kernels
for dtype, mask in (("float16", 0x7C00), ("bfloat16", 0x7F80)):
    e = np.arange(1 << 16, dtype=np.uint16)
    e = e[(e & mask) != mask].reshape(1, -1)
    for s in (1.0, 0.7, 1.3, 3.1e-5, 2.9e4, 3.3e30):
        c = np.full(e.shape[1], s, np.float32)
        out = np.empty_like(e)
        kernels.tied_restore(out, e, c, bytes((e.size + 1) // 2), b"", np.zeros((1, 0), np.uint16), dtype)
        assert np.array_equal(out, kernels.tied_predict(e, c, dtype)), (dtype, s)
print("ok")
"""
    if not kernels.COMPILED:
        pytest.skip("the compiled kernels are not built")
    for env in ({}, {"BBF_NO_AVX2": "1"}):
        r = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_a_decoded_tied_file_encodes_again_to_the_same_words(tmp_path):
    """Input already in the tied form is kept as it is (no second rounding): decode, encode, same file content."""
    desc = _desc("opt")
    path, canon = _save(tmp_path, desc, random_slicegpt(desc, seed=8, dtype=torch.bfloat16, tied=True), "bfloat16")
    with BBFReader(str(path)) as f:
        decoded = f.load_all()
    again, canon2 = _save(tmp_path, desc, decoded, "bfloat16", "again.bbf")
    with BBFReader(str(again)) as f:
        assert f.header["codec"]["params"] == {"tied_head": True}
        assert f.header["stats"]["groups"]["embed"]["tie_error"] < 2 ** -6
    for name, w in canon.items():
        assert np.array_equal(canon2[name], w), name


def test_bbf_encode_and_verify_a_tied_checkpoint(tmp_path, capsys):
    """`bbf encode` takes the tied form by default (--no-tied-head opts out), `bbf verify` checks it, `bbf-inspect`
    reports it and names the embeddings a last pipeline stage also reads."""
    from bbformat.cli import inspect as bbf_inspect
    from bbformat.cli import main as bbf_main
    from bbformat.models.slicegpt_io import save_slicegpt

    desc = _desc("llama")
    ck, _ = save_slicegpt(desc, random_slicegpt(desc, seed=9, dtype=torch.float16, tied=True), tmp_path / "m.pt")
    for flags, params in (([], {"tied_head": True}), (["--no-tied-head"], {})):
        out = tmp_path / f"m{len(flags)}.bbf"
        assert bbf_main.main(["encode", str(ck), "-o", str(out), "-q", *flags]) == 0
        with BBFReader(str(out)) as f:
            assert f.header["codec"]["params"] == params
        assert bbf_main.main(["verify", str(out), "--against", str(ck), "-q", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["values_over_threshold"] == 0
    assert bbf_inspect.main([str(tmp_path / "m0.bbf"), "--stages", "2"]) == 0
    text = capsys.readouterr().out
    assert "tied head (SPEC 12.6)" in text and "also reads embed" in text
    with pytest.raises(BBFError, match="only apply to --codec exact"):
        bbf_main._codec(bbf_main.build_parser().parse_args(["encode", str(ck), "-o", "x", "--codec", "raw",
                                                            "--tied-head"]))


def test_words_on_a_narrower_grid_keep_the_plain_form(tmp_path):
    """float16 values in float32 words (SPEC 12.5): predictions would be off the grid, so the writer stays plain."""
    desc = _desc("llama")
    orig = {k: v.to(torch.float32) for k, v in random_slicegpt(desc, seed=10, dtype=torch.float16, tied=True).items()}
    path, _ = _save(tmp_path, desc, orig, "float32")
    with BBFReader(str(path)) as f:
        assert f.header["codec"]["params"] == {}
    with pytest.raises(BBFError, match="narrower grid"):
        _save(tmp_path, desc, orig, "float32", "forced.bbf", tied_head=True)


def test_pipeline_stages_of_a_tied_file_over_http_give_the_whole_model(served_dir, http_url):
    """The last stage fetches the embeddings too (its head decodes from them), over HTTP, and the chain of stages
    gives the whole model's logits."""
    desc = dataclasses.replace(tiny_desc("llama", num_layers=4, vocab_size=900), tie_word_embeddings=True)
    bbformat.save(random_slicegpt(desc, seed=11, dtype=torch.float16, tied=True), str(served_dir / "tied.bbf"),
                  model=desc, codec="exact")
    url = f"{http_url}/tied.bbf"
    ids = torch.randint(0, desc.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    x = ids
    with torch.no_grad():
        want = bbformat.load_model(url)(ids)
        for rank in range(2):
            with BBFReader(url) as f:
                part = bbformat.load_model(f, stage=(rank, 2))
                fetched = f.stats["bytes"]
                plan = stage_plan(f, 2)[rank]
            assert fetched >= plan["stored_bytes"] and plan["also_fetches"] == (["embed"] if rank else [])
            x = part(x)
    assert torch.equal(x, want)


def test_stream_keeps_a_tied_head_next_to_the_embeddings(tmp_path):
    """stream()'s default order puts the head right after `embed` (which waits for it), so no other group is held
    in between; a whole load spreads them (more work between them for the second thread)."""
    desc = _desc("llama")
    path, _ = _save(tmp_path, desc, random_slicegpt(desc, seed=12, dtype=torch.float16, tied=True), "float16")
    with BBFReader(str(path)) as f:
        order = f.stream_order()
        assert order[order.index("embed") + 1] == "head"
        size = f._decoded_sizes()
        spread = f._deps_first(sorted(size, key=lambda g: -size[g]), spread=True)
        between = spread[spread.index("embed") + 1:spread.index("head")]
        assert between and sum(size[g] for g in between) >= size["embed"]


def test_the_writer_codes_residuals_in_slabs_that_join_exactly():
    """The encoder codes the residuals a slab of rows at a time (bounded memory): over several slabs and an odd
    column count the section is byte for byte the one-shot coding."""
    from bbformat.codecs import exact
    from bbformat.codecs.canonical import SLAB_ELEMENTS

    rng = np.random.default_rng(0)
    n = 37
    v = 2 * (SLAB_ELEMENTS // (16 * n)) + 3  # three slabs, the last one odd
    e = _words(torch.from_numpy(rng.standard_normal((v, n))).to(torch.float16)).view(np.uint16)
    w = _words(torch.from_numpy(rng.standard_normal((v, n + 5))).to(torch.float16)).view(np.uint16)
    enc = exact.ExactCodec(True).encoder(_desc("llama"), "float16")
    enc._tied_embed = e
    scales, rest = np.empty(2 * n, np.uint16), np.empty(v * 5, np.uint16)
    got = enc._put_tied_head(w, scales, rest, n)
    c = scales.view(np.float32)
    z = kernels.tied_residuals(np.ascontiguousarray(w[:, :n]), kernels.tied_predict(e, c, "float16"))
    assert got == b"".join(kernels.tied_pack(z))
    assert np.array_equal(rest.reshape(v, 5), w[:, n:])

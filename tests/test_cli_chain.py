"""The CLI chains as the README documents: slice -> serve -> eval over HTTP; slice -o x.pt -> encode (tokenizer
kept); SliceGPT output directories as encode input; decode output that SliceGPT's own loader accepts."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
from dataclasses import field
from pathlib import Path

import pytest
import torch

import bbformat
from bbformat.cli import main as bbf_main

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
V = 96


def cli(argv, capsys):
    """Run `bbf ARGV` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = bbf_main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama saved the Hugging Face way (config.json, safetensors, tokenizer files), and a 120-word text."""
    from test_slicer import tiny_llama

    d = tmp_path_factory.mktemp("hf")
    tiny_llama(tie=False).save_pretrained(d / "model")
    word_tokenizer().save_pretrained(d / "model")
    words = torch.randint(3, V, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    (d / "text.txt").write_text(" ".join(f"w{i}" for i in words))
    return d / "model", d / "text.txt"


SLICE = ["--sparsity", "0.25", "--calib-samples", "4", "--calib-len", "16", "-q"]


def test_readme_chain_slice_serve_eval(hf_dir, tmp_path, capsys, monkeypatch):
    """`bbf slice ... -o out/smol-25.bbf`, `bbf serve out/`, `bbf eval http://127.0.0.1:PORT/smol-25.bbf`, with the
    calibration text read from token 0 (a 120-token text: the old default offset 20480 refused it)."""
    model, text = hf_dir
    readme = (ROOT / "README.md").read_text()
    for piece in ("-o out/smol-25.bbf", "bbf serve out/", "bbf eval http://127.0.0.1:8000/smol-25.bbf"):
        assert piece in readme  # the commands below are the README's
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["slice", model, "--calib", text, *SLICE, "-o", "out/smol-25.bbf"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "smol-25.bbf").is_file()
    with socket.socket() as s:  # a free port for the server (8000 may be taken on a shared machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "bbformat", "serve", "out/", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line + server.stderr.read()
        code, out, err = cli(["eval", f"http://127.0.0.1:{port}/smol-25.bbf", "--text", text, "--ctx", "16",
                              "--json"], capsys)
        assert code == 0, err
        result = json.loads(out)  # stdout is nothing but the JSON object
        # busy port: one line, exit 2
        code, _, err = cli(["serve", "out/", "--port", str(port)], capsys)
        assert code == 2 and err.count("\n") == 1 and "already in use" in err, err
    finally:
        server.terminate()
        server.wait(timeout=30)
    from bbformat.evaluate import perplexity, tokenize_text

    local, tok = bbformat.load_pretrained(str(tmp_path / "out" / "smol-25.bbf"))
    want = perplexity(local, tokenize_text(tok, text), ctx=16, stride=16, progress=False)
    assert result["tokens"] == 120 and abs(result["perplexity"] - want) < 1e-6 * want
    # the offset is honoured, and a text too short for it is refused naming the flag
    code, _, err = cli(["slice", model, "--calib", text, *SLICE, "--calib-offset", "100", "-o", "x.bbf"], capsys)
    assert code == 2 and "--calib-offset 100" in err and "120 tokens" in err, err


def test_slice_to_pt_then_encode_keeps_the_tokenizer(hf_dir, tmp_path, capsys):
    model, text = hf_dir
    ck = tmp_path / "ck" / "tiny_0.25.pt"
    code, _, err = cli(["slice", model, "--calib", text, *SLICE, "-o", ck], capsys)
    assert code == 0, err
    names = {p.name for p in ck.parent.iterdir()}
    assert {"tiny_0.25.pt", "tiny_0.25.json", "tiny_0.25.bbformat.json", "config.json", "tokenizer.json"} <= names
    for src in (ck, ck.parent):  # the checkpoint, or the directory it is in
        out = tmp_path / f"from-{src.name}.bbf"
        code, _, err = cli(["encode", src, "-o", out, "-q"], capsys)
        assert code == 0, err
        _, tok = bbformat.load_pretrained(str(out))
        assert tok is not None and tok("w5 w7 w90")["input_ids"] == word_tokenizer()("w5 w7 w90")["input_ids"]
    a, b = bbformat.load(str(tmp_path / "from-tiny_0.25.pt.bbf")), bbformat.load(str(tmp_path / "from-ck.bbf"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = cli(["encode", ck, "-o", tmp_path / "n.bbf", "--no-tokenizer", "-q"], capsys)
    assert code == 0 and bbformat.load_pretrained(str(tmp_path / "n.bbf"))[1] is None
    code, _, err = cli(["encode", ck, "-o", tmp_path / "g.bbf", "--tokenizer", model, "-q"], capsys)
    assert code == 0, err


def slicegpt_dir(tmp_path, hf_model_dir, with_config=True):
    """What SliceGPT's run_slicegpt.py --save-dir leaves: <name>_<sparsity>.pt (views of larger storages), its
    slicing config .json, the HF config.json and the tokenizer files. No bbformat description anywhere."""
    from bbformat.models.slicer import slice_model
    from test_slicer import calib, tiny_llama

    desc, tensors = slice_model(tiny_llama(tie=False), calib(4), 0.25, dtype=torch.float16, progress=False,
                                canonical=False)
    d = tmp_path / "slicegpt"
    d.mkdir()
    views = {}
    for k, v in tensors.items():
        big = torch.zeros(v.shape[0] + 2, *v.shape[1:], dtype=v.dtype)
        big[1:1 + v.shape[0]] = v
        views[k] = big[1:1 + v.shape[0]]
    torch.save(views, d / "tiny-llama_0.25.pt")
    (d / "tiny-llama_0.25.json").write_text(json.dumps(desc.slicing_config()))
    if with_config:
        (d / "config.json").write_text((hf_model_dir / "config.json").read_text())
    word_tokenizer().save_pretrained(d)
    return d, desc, tensors


def test_encode_accepts_a_slicegpt_output_directory(hf_dir, tmp_path, capsys):
    d, desc, tensors = slicegpt_dir(tmp_path, hf_dir[0])
    code, out, err = cli(["encode", d, "-o", tmp_path / "s.bbf"], capsys)
    assert code == 0, err
    assert f"tokenizer from {d}" in out
    model, tok = bbformat.load_pretrained(str(tmp_path / "s.bbf"))
    assert model.desc.num_heads == 4 and model.desc.num_kv_heads == 2  # from config.json: the table does not know it
    assert tok("w5 w6")["input_ids"] == [5, 6]
    back = bbformat.load(str(tmp_path / "s.bbf"))
    with torch.no_grad():
        from bbformat.models.sliced import SlicedLM

        ids = torch.randint(3, V, (1, 12), generator=torch.Generator().manual_seed(3))
        want = SlicedLM(desc, tensors)(ids)
        assert (SlicedLM(desc, back)(ids) - want).abs().max() < 1e-2 * want.abs().max()  # exact codec, float16
    (tmp_path / "b").mkdir()
    d2, _, _ = slicegpt_dir(tmp_path / "b", hf_dir[0], with_config=False)
    code, _, err = cli(["encode", d2, "-o", tmp_path / "t.bbf"], capsys)
    assert code == 2 and "config" in err  # without config.json the heads of an unknown model cannot be told


@dataclasses.dataclass
class SlicingConfig:
    """SliceGPT's `slicegpt.model_adapter.SlicingConfig` (microsoft/TransformerCompression): its fields, their
    types and `from_dict` (numeric string keys become ints; any other key is a TypeError), reproduced here because
    SliceGPT cannot be installed in CI."""

    hidden_size: int = 0
    layers_num: int = 0
    do_slice_head: bool = False
    parallel_blocks: bool = False
    embedding_dimensions: dict = field(default_factory=dict)
    attention_input_dimensions: dict = field(default_factory=dict)
    attention_output_dimensions: dict = field(default_factory=dict)
    mlp_input_dimensions: dict = field(default_factory=dict)
    mlp_output_dimensions: dict = field(default_factory=dict)
    head_dimension: int | None = None
    const_dimension: int | None = None

    @staticmethod
    def from_dict(d: dict) -> "SlicingConfig":
        def convert(d):
            if not isinstance(d, dict):
                return d
            if all(isinstance(k, str) and k.isnumeric() for k in d):
                return {int(k): v for k, v in d.items()}
            return {k: convert(v) for k, v in d.items()}

        return SlicingConfig(**convert(d))


def check_slicegpt_types(cfg: SlicingConfig, L: int):
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    assert is_int(cfg.hidden_size) and cfg.layers_num == L and is_int(cfg.layers_num)
    assert isinstance(cfg.do_slice_head, bool) and isinstance(cfg.parallel_blocks, bool)
    for name in ("attention_input_dimensions", "attention_output_dimensions", "mlp_input_dimensions",
                 "mlp_output_dimensions"):
        dims = getattr(cfg, name)
        assert sorted(dims) == list(range(L)) and all(is_int(v) for v in dims.values()), name
    assert all(is_int(k) and is_int(v) for k, v in cfg.embedding_dimensions.items())
    assert cfg.head_dimension is None or is_int(cfg.head_dimension)
    assert cfg.const_dimension is None or is_int(cfg.const_dimension)


def test_decode_output_loads_with_slicegpts_config_semantics(hf_dir, tmp_path, capsys):
    model, text = hf_dir
    code, _, err = cli(["slice", model, "--calib", text, *SLICE, "-o", tmp_path / "m.bbf"], capsys)
    assert code == 0, err
    rt = tmp_path / "rt" / "tiny-llama_0.25.pt"
    code, out, err = cli(["decode", tmp_path / "m.bbf", "-o", rt], capsys)
    assert code == 0, err
    js = json.loads(rt.with_suffix(".json").read_text())
    cfg = SlicingConfig.from_dict(js)  # SliceGPT's own loader: a TypeError on any key it does not know
    with bbformat.open(str(tmp_path / "m.bbf")) as f:
        desc = f.model
    check_slicegpt_types(cfg, desc.num_layers)
    assert set(js) == {f.name for f in dataclasses.fields(SlicingConfig)}
    # the shapes SliceGPT builds from that config are the checkpoint's
    sd = torch.load(rt, weights_only=True)
    for i in range(desc.num_layers):
        n = desc.layer_names(i)
        assert tuple(sd[n["attn_sc"]].shape) == (cfg.attention_input_dimensions[i], cfg.attention_output_dimensions[i])
        assert tuple(sd[n["mlp_sc"]].shape) == (cfg.mlp_input_dimensions[i], cfg.mlp_output_dimensions[i])
    assert sd["model.embed_tokens.weight"].shape[1] == cfg.embedding_dimensions[0]
    # beside it: the HF config.json SliceGPT's loader reads (and transformers accepts), the tokenizer files
    hf_cfg = transformers.AutoConfig.from_pretrained(rt.parent)
    assert type(hf_cfg).__name__ == "LlamaConfig" and hf_cfg.num_key_value_heads == desc.num_kv_heads
    assert transformers.AutoTokenizer.from_pretrained(rt.parent)("w5 w6")["input_ids"] == [5, 6]
    from bbformat.models.slicegpt_io import hf_desc

    rebuilt = hf_desc(hf_cfg, js, lm_head_bias=desc.lm_head_bias)
    assert dataclasses.replace(rebuilt, extra={}) == dataclasses.replace(desc, extra={})
    # ... and it chains back: the decoded directory is a valid encode input, same tensors
    code, _, err = cli(["encode", rt.parent, "-o", tmp_path / "again.bbf", "--codec", "raw", "-q"], capsys)
    assert code == 0, err
    a, b = bbformat.load(str(tmp_path / "m.bbf")), bbformat.load(str(tmp_path / "again.bbf"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # negative control: the JSON bbformat used to write (with its own key) is what SliceGPT refused
    with pytest.raises(TypeError, match="bbformat_model"):
        SlicingConfig.from_dict({**js, "bbformat_model": desc.to_dict()})
    assert re.search(r"SliceGPT's slicing config", out)


def test_errors_name_the_missing_thing_before_any_work(hf_dir, tmp_path, capsys):
    model, text = hf_dir
    code, _, err = cli(["verify", tmp_path / "absent.bbf", "--against", tmp_path / "missing.pt"], capsys)
    assert code == 2 and "missing.pt does not exist" in err and err.count("\n") == 1, err
    code, _, err = cli(["serve", tmp_path / "nope"], capsys)
    assert code == 2 and "no such directory" in err, err
    # eval checks its arguments first: a missing text is reported even though the model does not exist either
    code, _, err = cli(["eval", "http://127.0.0.1:9/m.bbf", "--text", tmp_path / "no.txt"], capsys)
    assert code == 2 and "no.txt does not exist" in err, err
    code, _, err = cli(["eval", model, "--text", text, "--ctx", "8", "--stride", "9"], capsys)
    assert code == 2 and "stride" in err, err

"""The .bbf model as a transformers model: generate (greedy, sampling, beam), KV cache, padding, pipeline,
save_pretrained / from_pretrained.

The reference is Hugging Face's own, unsliced LlamaForCausalLM / OPTForCausalLM. A sliced model folds back into
that architecture exactly when every shortcut matrix has orthonormal rows (S S^T = I, widths that never shrink):
then there are bases P (orthonormal rows, k x d) with P_in = S P_out at every shortcut, the d-wide residual
r = x P has |r| = |x| (so HF's RMSNorm over d with gamma = 1 is SliceGPT's weightless norm over d), and every weight
maps to W P or P^T W. For OPT the P rows are also orthogonal to the all-ones vector, so LayerNorm (which
subtracts the mean) is that same norm: this needs a sliced head (k < d). SliceGPT's own shortcuts
(Q_a[:, :k_a]^T Q_b[:, :k_b]) project, and no unsliced model computes them; those are checked against the
cache-free reference path in test_end_to_end.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import bbformat
from bbformat.models.slicegpt_io import hf_desc, uniform_slicing
from bbformat.models.synthetic import random_orthogonal, random_slicegpt

transformers = pytest.importorskip("transformers")
from bbformat.models.modeling import SlicedConfig, SlicedForCausalLM  # noqa: E402
from bbformat.models.sliced import SlicedLM  # noqa: E402

D, V = 64, 300
# per layer (k_a, k_b, k_c): never shrinking, so that the shortcuts can be isometries
WIDTHS = {"llama": [(40, 48, 48), (48, 56, 56), (56, 56, 64)], "opt": [(40, 48, 48), (48, 56, 56), (56, 56, 56)]}


def isometric_desc(family):
    w = WIDTHS[family]
    L = len(w)
    cfg = dict(model_type=family, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, vocab_size=V,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg.update(num_key_value_heads=2, intermediate_size=96, rope_theta=10000.0)
    else:
        cfg.update(ffn_dim=96)
    s = uniform_slicing(D, L, 0.0, family)

    def per(j):
        return {str(i): w[i][j] for i in range(L)}

    s.update(embedding_dimensions={k: w[0][0] for k in s["embedding_dimensions"]}, attention_input_dimensions=per(0),
             attention_output_dimensions=per(1), mlp_input_dimensions=per(1), mlp_output_dimensions=per(2),
             do_slice_head=w[-1][2] < D)
    return hf_desc(cfg, s)


def isometric_weights(desc, seed=0):
    """SliceGPT-form weights whose shortcuts have orthonormal rows, and a head sharp enough that greedy choices
    are not near-ties (float32 vs float64 must agree)."""
    g = torch.Generator().manual_seed(seed)
    w = random_slicegpt(desc, seed=seed, dtype=torch.float64)
    for i in range(desc.num_layers):
        n = desc.layer_names(i)
        for role in ("attn_sc", "mlp_sc"):
            k_in, k_out = w[n[role]].shape
            w[n[role]] = random_orthogonal(k_out, g)[:k_in]
    w["lm_head.weight"] = w["lm_head.weight"] * 40
    if desc.lm_head_bias:  # a bias the final LayerNorm's beta can produce: lm_head.weight @ beta0
        w["lm_head.bias"] = w["lm_head.weight"] @ (0.1 * torch.randn(desc.mlp_output_dims[-1], generator=g,
                                                                     dtype=torch.float64))
    return w


def fold_to_hf(desc, w):
    """The unsliced HF model (float64) computing what SliceGPT's sliced forward computes on `w`."""
    g = torch.Generator().manual_seed(99)
    w = {k: v.detach().double() for k, v in w.items()}
    k_last = desc.mlp_output_dims[-1]
    basis = random_orthogonal(D, g)
    if desc.family == "opt":  # rows orthogonal to the all-ones vector: an orthonormal basis of its complement
        ones = torch.ones(D, 1, dtype=torch.float64) / D ** 0.5
        q, _ = torch.linalg.qr(torch.cat([ones, basis[:, : D - 1]], 1))
        basis = q[:, 1:].T
    P = basis[:k_last]  # (k_last, D)
    P_out, P_mid, P_in = [None] * desc.num_layers, [None] * desc.num_layers, [None] * desc.num_layers
    for i in reversed(range(desc.num_layers)):
        n = desc.layer_names(i)
        P_out[i] = P
        P_mid[i] = w[n["mlp_sc"]] @ P_out[i]
        P_in[i] = w[n["attn_sc"]] @ P_mid[i]
        P = P_in[i]
    p = desc.prefix
    sd = {p + "embed_tokens.weight": w[p + "embed_tokens.weight"] @ P_in[0]}
    for i in range(desc.num_layers):
        n, src = desc.layer_names(i), f"{p}layers.{i}."
        for r in ("q", "k", "v"):
            sd[n[r]] = w[n[r]] @ P_in[i]
        sd[n["o"]] = P_mid[i].T @ w[n["o"]]
        for r in ("gate", "up"):
            if r in n:
                sd[n[r]] = w[n[r]] @ P_mid[i]
        sd[n["down"]] = P_out[i].T @ w[n["down"]]
        for r in ("q_bias", "k_bias", "v_bias", "up_bias"):
            if r in n:
                sd[n[r]] = w[n[r]]
        if "o_bias" in n:
            sd[n["o_bias"]] = P_mid[i].T @ w[n["o_bias"]]
            sd[n["down_bias"]] = P_out[i].T @ w[n["down_bias"]]
        norms = ("self_attn_layer_norm", "final_layer_norm") if desc.family == "opt" else \
            ("input_layernorm", "post_attention_layernorm")
        for nm in norms:
            sd[src + nm + ".weight"] = torch.ones(D, dtype=torch.float64)
            if desc.family == "opt":
                sd[src + nm + ".bias"] = torch.zeros(D, dtype=torch.float64)
    sd["lm_head.weight"] = w["lm_head.weight"] @ P_out[-1]
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=desc.num_layers, num_attention_heads=desc.num_heads,
                  max_position_embeddings=desc.max_position_embeddings, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    if desc.family == "opt":
        sd[p + "embed_positions.weight"] = w[p + "embed_positions.weight"] @ P_in[0]
        sd[p + "final_layer_norm.weight"] = torch.ones(D, dtype=torch.float64)
        beta0 = torch.linalg.lstsq(w["lm_head.weight"], w["lm_head.bias"][:, None]).solution[:, 0]
        sd[p + "final_layer_norm.bias"] = beta0 @ P_out[-1]
        cfg = transformers.OPTConfig(ffn_dim=desc.intermediate_size, word_embed_proj_dim=D, **common)
        model = transformers.OPTForCausalLM(cfg)
    else:
        sd[p + "norm.weight"] = torch.ones(D, dtype=torch.float64)
        cfg = transformers.LlamaConfig(intermediate_size=desc.intermediate_size, num_key_value_heads=desc.num_kv_heads,
                                       head_dim=desc.head_dim, rms_norm_eps=desc.rms_eps,
                                       rope_parameters={"rope_type": "default", "rope_theta": desc.rope_theta},
                                       **common)
        model = transformers.LlamaForCausalLM(cfg)
    model = model.double().eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


FAMILIES = ("llama", "opt")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, the .bbf-loaded model (float32), the unsliced HF reference (float64), the .bbf path)."""
    desc = isometric_desc(request.param)
    w = isometric_weights(desc)
    path = tmp_path_factory.mktemp("gen") / f"iso-{request.param}.bbf"
    bbformat.save({k: v.float() for k, v in w.items()}, str(path), model=desc, codec="exact", dtype="float32")
    model, tok = bbformat.load_pretrained(str(path))
    assert tok is None
    ref = fold_to_hf(desc, model.sliced_state_dict())  # the file's (canonical) weights, folded back
    return request.param, model, ref, path


PROMPT = torch.tensor([[1, 17, 250, 33, 96, 4, 121]])
GEN = dict(max_new_tokens=20, min_new_tokens=20, pad_token_id=0)


def test_output_type_and_logits_match_the_unsliced_reference(pair):
    _, model, ref, _ = pair
    assert isinstance(model, transformers.PreTrainedModel) and isinstance(model.config, SlicedConfig)
    ids = torch.randint(3, V, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids)
        want = ref(ids).logits
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert out.logits.shape == (2, 30, V) and out.logits.dtype == torch.float32
    assert (out.logits.double() - want).abs().max() < 1e-4 * want.abs().max()
    with torch.no_grad():
        wrong = fold_to_hf(model.desc, {**model.sliced_state_dict(), "lm_head.weight":
                                        model.sliced_state_dict()["lm_head.weight"].flip(0)})(ids).logits
    assert (out.logits.double() - wrong).abs().max() > 1e-2 * want.abs().max()  # the comparison can fail


def test_greedy_equals_the_unsliced_reference_token_for_token(pair):
    _, model, ref, _ = pair
    got = model.generate(PROMPT, do_sample=False, **GEN)
    want = ref.generate(PROMPT, do_sample=False, **GEN)
    assert got.shape == (1, PROMPT.shape[1] + 20)
    assert got.tolist() == want.tolist()
    assert len(set(got[0, PROMPT.shape[1]:].tolist())) > 3  # not a degenerate repetition


def test_kv_cache_on_and_off_identical(pair):
    _, model, _, _ = pair
    on = model.generate(PROMPT, do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True,
                        **GEN)
    off = model.generate(PROMPT, do_sample=False, use_cache=False, return_dict_in_generate=True, output_logits=True,
                         **GEN)
    assert on.sequences.tolist() == off.sequences.tolist()
    for a, b in zip(on.logits, off.logits):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    cache = getattr(on, "cache", None) or getattr(on, "past_key_values", None)  # transformers 5 renamed it
    assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() == PROMPT.shape[1] + 19


def test_batched_left_padded_equals_unbatched(pair):
    _, model, ref, _ = pair
    prompts = [[1, 17, 250, 33, 96, 4, 121], [1, 55, 9], [1, 200, 201, 202, 7]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, do_sample=False, **GEN)
    assert batched.tolist() == ref.generate(ids, attention_mask=mask, do_sample=False, **GEN).tolist()
    for row, p in zip(batched, prompts):
        alone = model.generate(torch.tensor([p]), do_sample=False, **GEN)[0]
        assert row[T - len(p):].tolist() == alone.tolist()


def test_forward_with_left_padding_and_a_cache(pair):
    """A direct forward (no generate): a 2-D mask alone gives each row its own positions; a prompt fed in two
    pieces through the cache gives the logits of one piece."""
    _, model, _, _ = pair
    p = PROMPT[0].tolist()
    ids = torch.tensor([[0, 0, 0] + p, [9, 8, 7] + p])
    mask = torch.tensor([[0, 0, 0] + [1] * len(p), [1] * (3 + len(p))])
    with torch.no_grad():
        alone = model(PROMPT).logits[0]
        padded = model(ids, attention_mask=mask).logits[0, 3:]
        assert (padded - alone).abs().max() < 1e-5 * alone.abs().max()
        first = model(PROMPT[:, :4], use_cache=True)
        rest = model(PROMPT[:, 4:], cache=first.cache, use_cache=True).logits[0]
        assert (rest - alone[4:]).abs().max() < 1e-5 * alone.abs().max()
        assert first.cache.get_seq_length() == len(p)


def test_beam_search_matches_the_reference(pair):
    _, model, ref, _ = pair
    kw = dict(num_beams=4, num_return_sequences=2, do_sample=False, **GEN)
    got = model.generate(PROMPT, **kw)
    assert got.shape == (2, PROMPT.shape[1] + 20)
    assert got.tolist() == ref.generate(PROMPT, **kw).tolist()


def test_sampling_matches_the_reference_with_the_same_seed(pair):
    _, model, ref, _ = pair
    kw = dict(do_sample=True, top_k=50, temperature=1.5, **GEN)
    torch.manual_seed(3)
    got = model.generate(PROMPT, **kw)
    torch.manual_seed(3)
    want = ref.generate(PROMPT, **kw)
    torch.manual_seed(4)
    other = model.generate(PROMPT, **kw)
    assert got.tolist() == want.tolist() and got.tolist() != other.tolist()


def test_to_dtype_and_device(pair):
    _, model, ref, _ = pair
    m64 = SlicedForCausalLM.from_pretrained(str(pair[3]), dtype=torch.float64).to("cpu")
    assert m64.dtype == torch.float64 and m64.device.type == "cpu"
    ids = PROMPT
    with torch.no_grad():
        a, want = m64(ids).logits, ref(ids).logits
    assert a.dtype == torch.float64 and (a - want).abs().max() < 1e-5 * want.abs().max()  # HF's RoPE is float32
    m16 = m64.to(torch.bfloat16)
    with torch.no_grad():
        b = m16(ids).logits
    assert b.dtype == torch.bfloat16 and (b.double() - want).abs().max() < 0.1 * want.abs().max()


def test_one_forward_for_both_models(pair):
    """The torch-only SlicedLM and the transformers model run the same modules: identical logits."""
    _, model, _, path = pair
    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(bbformat.load_model(str(path))(ids), model(ids, use_cache=False).logits)
    # a SlicedLM's weights wrapped without a copy
    lm = SlicedLM(model.desc, model.sliced_state_dict())
    wrapped = SlicedForCausalLM.from_sliced(lm)
    assert wrapped.lm_head.weight.data_ptr() == lm.lm_head.weight.data_ptr()


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def test_pipeline_text_generation(pair):
    _, model, _, _ = pair
    tok = _word_tokenizer()
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    text = "w17 w250 w33 w96"
    out = pipe(text, max_new_tokens=8, min_new_tokens=8, do_sample=False, return_full_text=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out[0]["generated_text"] == tok.decode(want[0, ids.shape[1]:])
    assert len(out[0]["generated_text"].split()) == 8


def test_save_pretrained_from_pretrained_round_trip(pair, tmp_path, served_dir, http_url):
    family, model, _, _ = pair
    tok = _word_tokenizer()
    out = tmp_path / "saved"
    model.save_pretrained(out, tokenizer=tok, codec="raw")
    assert {"model.bbf", "config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bbformat_sliced" and cfg["architectures"] == ["SlicedForCausalLM"]
    assert cfg["sliced_model"]["attn_input_dims"] == list(model.desc.attn_input_dims) and cfg["bbf_dtype"] == "float32"
    ids = torch.randint(3, V, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
        auto = transformers.AutoModelForCausalLM.from_pretrained(out)  # through the Auto registry
        assert type(auto) is SlicedForCausalLM and torch.equal(auto(ids).logits, want)
        m2, tok2 = bbformat.load_pretrained(str(out))  # the tokenizer travels inside model.bbf too
        assert torch.equal(m2(ids).logits, want) and tok2("w5 w6")["input_ids"] == tok("w5 w6")["input_ids"]
    pipe = transformers.pipeline("text-generation", model=str(out))
    assert pipe("w17 w250", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("w17 w250")
    # a directory URL: <url>/model.bbf
    model.save_pretrained(served_dir / f"dir-{family}", codec="exact")
    remote = SlicedForCausalLM.from_pretrained(f"{http_url}/dir-{family}")
    with torch.no_grad():
        assert (remote(ids).logits - want).abs().max() < 1e-4 * want.abs().max()
    with pytest.raises(bbformat.BBFError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)

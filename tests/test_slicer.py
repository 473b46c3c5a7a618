"""The built-in SliceGPT slicer on tiny random Llama and OPT models (no download)."""

import pytest
import torch

from bbformat.errors import BBFError, ModelError
from bbformat.evaluate import _windows, perplexity
from bbformat.models.hf import model_desc, tokenizer_bytes, tokenizer_from_bytes
from bbformat.models.sliced import RMSNorm, SlicedLM
from bbformat.models.slicer import pca_basis, slice_model

transformers = pytest.importorskip("transformers")

V, D, L, T = 96, 64, 3, 24


def _randomise_norms(model):
    # HF initialises norms to gamma=1, beta=0, which would hide a wrong fusion
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = (1 + 0.3 * torch.randn(p.shape, generator=g)) if name.endswith("weight") \
                else 0.3 * torch.randn(p.shape, generator=g)
    return model


def tiny_llama(tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=L,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie)
    return _randomise_norms(transformers.LlamaForCausalLM(cfg)).eval()


def tiny_opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=96, num_hidden_layers=L,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=D)
    model = _randomise_norms(transformers.OPTForCausalLM(cfg)).eval()
    for name, p in model.named_parameters():  # non-zero biases everywhere, so their rotation is tested
        if name.endswith("bias") and "norm" not in name:
            p.data = 0.1 * torch.randn(p.shape)
    return model


def calib(n=6, t=T, seed=2):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_sparsity_zero_is_exact(make):
    model = make().double()
    desc, tensors = slice_model(model, calib(), 0.0, dtype=torch.float64, progress=False, canonical=False)
    assert desc.attn_input_dims == (D,) * L and desc.mlp_output_dims == (D,) * L
    ids = calib(2, 32, seed=5)
    want = model(ids).logits
    got = SlicedLM(desc, tensors, dtype=torch.float64)(ids)
    # HF computes norms and RoPE frequencies in float32 even in a float64 model: ~1e-7 relative
    assert (got - want).abs().max() < 1e-6 * want.abs().max()
    # the rotations really happened: the shortcut matrices are not identities
    assert not torch.allclose(tensors[desc.layer_names(0)["attn_sc"]], torch.eye(D, dtype=torch.float64))


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_sliced_shapes_and_logits(make):
    model = make()
    desc, tensors = slice_model(model, calib(), 0.25, progress=False)
    k = 48  # int(0.75 * 64) is already a multiple of 8
    assert desc.embedding_dims[0] == k and desc.attn_input_dims == (k,) * L
    assert desc.mlp_output_dims == (k,) * (L - 1) + (D,)  # the last layer's output stays d wide
    assert [(t.name, t.shape) for t in desc.tensors()] == [(n, tuple(v.shape)) for n, v in tensors.items()]
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert tensors["lm_head.weight"].shape == (V, D)
    assert ("lm_head.bias" in tensors) == (desc.family == "opt")
    logits = SlicedLM(desc, tensors)(calib(2, 16, seed=7))
    assert logits.shape == (2, 16, V) and torch.isfinite(logits).all()


def test_widths_round_down_to_multiple_of_8():
    desc, tensors = slice_model(tiny_llama(), calib(2), 0.3, progress=False)
    assert desc.attn_output_dims == (40,) * L  # int(0.7 * 64) = 44 -> 40


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_pca_signals_flow_through_the_sliced_layers(make):
    """Every basis is the PCA of the signal the SLICED model computes on the calibration set, so each norm
    input of the sliced model has a diagonal Gram matrix with descending diagonal (a wrong propagation breaks
    this even though it keeps the rotations orthogonal)."""
    ids = calib(8)
    desc, tensors = slice_model(make(), ids, 0.25, dtype=torch.float32, progress=False, canonical=False)
    sliced = SlicedLM(desc, tensors)
    seen = []
    for m in sliced.modules():  # every weightless norm's input, in forward order
        if isinstance(m, RMSNorm):
            m.register_forward_pre_hook(lambda _, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    sliced(ids)
    assert len(seen) == 2 * L + 1
    for x in seen:
        G = x.T @ x
        diag = G.diagonal()
        assert (G - torch.diag(diag)).abs().max() < 1e-4 * diag.max()
        assert (diag[:-1] >= diag[1:] * (1 - 1e-4)).all()


def test_pca_basis_orders_by_variance():
    x = torch.randn(4000, 3) * torch.tensor([1.0, 5.0, 2.0])
    Q = pca_basis(x)
    assert torch.allclose(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert Q[:, 0].abs().argmax() == 1 and Q[:, 1].abs().argmax() == 2


def test_untied_llama_and_bad_input():
    model = tiny_llama(tie=False)
    desc, tensors = slice_model(model, calib(2), 0.0, dtype=torch.float64, progress=False)
    assert not desc.tie_word_embeddings
    with pytest.raises(ModelError):
        slice_model(model, calib(2).float(), 0.25, progress=False)
    with pytest.raises(ModelError):
        slice_model(model, torch.full((2, 4), V), 0.25, progress=False)
    with pytest.raises(ModelError):
        slice_model(model, calib(2), 1.0, progress=False)
    with pytest.raises(ModelError):
        model_desc({"model_type": "gpt2", "hidden_size": 8, "num_hidden_layers": 1})


def test_perplexity_windows():
    # non-overlapping windows score every token but each window's first
    assert list(_windows(10, 4, 4)) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # a sliding window scores each token once, with context
    assert list(_windows(10, 4, 2)) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(BBFError):
        perplexity(lambda ids: None, torch.arange(10), ctx=4, stride=5)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    ppl = perplexity(lambda ids: torch.zeros(1, ids.shape[1], V), torch.randint(0, V, (50,)), ctx=8,
                     stride=8, progress=False)
    assert ppl == pytest.approx(V)


def test_perplexity_matches_hf_loss():
    model = tiny_llama()
    ids = calib(1, 40)[0]
    want = torch.exp(model(ids[None], labels=ids[None]).loss).item()
    assert perplexity(model, ids, ctx=40, stride=40, progress=False) == pytest.approx(want, rel=1e-5)


def test_tokenizer_round_trip():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "hello": 2, "world": 3},
                                                    unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    back = tokenizer_from_bytes(tokenizer_bytes(tok))
    assert back("hello world there")["input_ids"] == tok("hello world there")["input_ids"] == [2, 3, 0]
    assert back.bos_token_id == 1 and back.unk_token == "<unk>"
    with pytest.raises(BBFError):
        tokenizer_from_bytes(b"not json")


def test_load_hf_from_a_local_directory(tmp_path):
    from bbformat.models.hf import load_hf

    tiny_opt().save_pretrained(tmp_path)
    model, tokenizer, desc = load_hf(tmp_path)
    assert type(model).__name__ == "OPTForCausalLM" and tokenizer is None
    assert (desc.family, desc.hidden_size, desc.num_layers, desc.lm_head_bias) == ("opt", D, L, True)
    with pytest.raises(BBFError):
        load_hf(tmp_path / "missing")
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(BBFError):
        load_hf(tmp_path / "model.gguf")


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_canonical_form_is_the_same_model(make):
    """The default output (the exact codec's canonical rotation) computes what the PCA-oriented one does."""
    model = make().double()
    ids = calib(2, 32, seed=5)
    pca = SlicedLM(*slice_model(model, calib(), 0.25, dtype=torch.float64, progress=False, canonical=False),
                   dtype=torch.float64)(ids)
    desc, tensors = slice_model(model, calib(), 0.25, dtype=torch.float64, progress=False)
    canon = SlicedLM(desc, tensors, dtype=torch.float64)(ids)
    assert (canon - pca).abs().max() < 1e-9 * pca.abs().max()
    assert not torch.equal(tensors[desc.layer_names(0)["attn_sc"]],
                           slice_model(model, calib(), 0.25, dtype=torch.float64, progress=False,
                                       canonical=False)[1][desc.layer_names(0)["attn_sc"]])

"""Norm fusion: a Hugging Face Llama/OPT state dict -> the SliceGPT form at sparsity 0, without rotation.

This is SliceGPT's first step (shared/reference/slicegpt-layout.md, "The math"): the head is untied, every norm's
scale (and OPT's LayerNorm bias) is folded into the linear layers that read its output, and every norm becomes
the weightless RMS norm over d of `SlicedLM`. For OPT the residual stream is kept mean-free (embeddings centred,
out_proj/fc2 outputs mean-subtracted), which makes LayerNorm equal that RMS norm. Shortcut matrices are identities.
Unlike SliceGPT, Llama embeddings are not centred: that is not an invariance for RMSNorm models.
All arithmetic is float64; the outputs are float64.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .arch import ModelDesc
from .slicegpt_io import hf_desc, read_hf_config


def fuse_norms(state_dict: dict[str, torch.Tensor], config) -> tuple[ModelDesc, dict[str, torch.Tensor]]:
    """(desc, tensors) of the unsliced SliceGPT form of an HF model, from its state dict and config."""
    c = read_hf_config(config)
    sd = {k: v.detach().to(torch.float64) for k, v in state_dict.items()}
    if c.get("model_type") == "opt":
        desc = hf_desc(c)
        return desc, _fuse_opt(desc, sd)
    desc = hf_desc(c, rms_eps=float(c.get("rms_norm_eps", 1e-6)))  # keep the model's own eps: exact
    return desc, _fuse_llama(desc, sd)


def _get(sd, name):
    try:
        return sd[name]
    except KeyError:
        raise ModelError(f"HF state dict has no tensor {name!r}") from None


def _head(desc, sd):
    # tied models have no lm_head.weight; the head is the original (uncentred) embedding, cloned
    return sd.get("lm_head.weight", _get(sd, desc.prefix + "embed_tokens.weight")).clone()


def _fuse_llama(desc: ModelDesc, sd) -> dict[str, torch.Tensor]:
    p, eye = desc.prefix, torch.eye(desc.hidden_size, dtype=torch.float64)
    out = {p + "embed_tokens.weight": _get(sd, p + "embed_tokens.weight")}
    for i in range(desc.num_layers):
        n, src = desc.layer_names(i), f"{p}layers.{i}."
        g_attn, g_mlp = _get(sd, src + "input_layernorm.weight"), _get(sd, src + "post_attention_layernorm.weight")
        for role, name in n.items():
            if role in ("attn_sc", "mlp_sc"):
                out[name] = eye
            elif role in ("q", "k", "v"):
                out[name] = _get(sd, name) * g_attn
            elif role in ("gate", "up"):
                out[name] = _get(sd, name) * g_mlp
            else:
                out[name] = _get(sd, name)
    out["lm_head.weight"] = _head(desc, sd) * _get(sd, p + "norm.weight")
    return {t.name: out[t.name] for t in desc.tensors()}


def _fuse_opt(desc: ModelDesc, sd) -> dict[str, torch.Tensor]:
    p, eye = desc.prefix, torch.eye(desc.hidden_size, dtype=torch.float64)
    if not desc.attention_bias:
        raise ModelError("OPT without biases (enable_bias=False) has nowhere to fold LayerNorm biases into")

    def centre(x, dim):  # (I - 11^T/d) applied along `dim`
        return x - x.mean(dim, keepdim=True)

    out = {name: centre(_get(sd, name), -1) for name in desc.embed_names()}
    for i in range(desc.num_layers):
        n, src = desc.layer_names(i), f"{p}layers.{i}."
        ln = {r: (_get(sd, src + ln_name + ".weight"), _get(sd, src + ln_name + ".bias"))
              for r, ln_name in (("attn", "self_attn_layer_norm"), ("mlp", "final_layer_norm"))}
        out[n["attn_sc"]] = out[n["mlp_sc"]] = eye
        for role, norm in (("q", "attn"), ("k", "attn"), ("v", "attn"), ("up", "mlp")):
            W, b = _get(sd, n[role]), _get(sd, n[role + "_bias"])
            gamma, beta = ln[norm]
            out[n[role]], out[n[role + "_bias"]] = W * gamma, b + W @ beta
        for role in ("o", "down"):  # their outputs join the residual stream: keep it mean-free
            out[n[role]], out[n[role + "_bias"]] = centre(_get(sd, n[role]), 0), centre(_get(sd, n[role + "_bias"]), 0)
    W = _head(desc, sd)
    gamma, beta = _get(sd, p + "final_layer_norm.weight"), _get(sd, p + "final_layer_norm.bias")
    out["lm_head.weight"], out["lm_head.bias"] = W * gamma, W @ beta
    return {t.name: out[t.name] for t in desc.tensors()}

"""Import and export of SliceGPT checkpoints: `<name>_<sparsity>.pt` (or .safetensors) plus its sibling `.json`.

SliceGPT does not store the Hugging Face config next to its files, so the `ModelDesc` is put together from
(in order of preference): our own description stored in the JSON under "bbformat_model" (files we wrote), an
HF config given by the caller, or the JSON slicing config + the tensor shapes + a small table of known models.
Every tensor is checked against the description; a wrong name or shape raises `ModelError` naming the tensor.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .arch import SLICEGPT_RMS_EPS, ModelDesc

DESC_KEY = "bbformat_model"  # our extra key in the SliceGPT .json
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some SliceGPT/transformers versions save

# What cannot be read from the shapes (heads, rope_theta) for models SliceGPT users slice, keyed by
# (family, d, q rows, kv rows, vocab). Anything else needs its HF config.json.
KNOWN_MODELS: dict[tuple, dict[str, Any]] = {
    ("opt", 768, 768, 768, 50272): {"num_attention_heads": 12},  # opt-125m
    ("opt", 2048, 2048, 2048, 50272): {"num_attention_heads": 32},  # opt-1.3b
    ("opt", 2560, 2560, 2560, 50272): {"num_attention_heads": 32},  # opt-2.7b
    ("opt", 4096, 4096, 4096, 50272): {"num_attention_heads": 32},  # opt-6.7b
    ("opt", 5120, 5120, 5120, 50272): {"num_attention_heads": 40},  # opt-13b
    ("opt", 7168, 7168, 7168, 50272): {"num_attention_heads": 56},  # opt-30b
    ("opt", 9216, 9216, 9216, 50272): {"num_attention_heads": 72},  # opt-66b
    ("llama", 4096, 4096, 4096, 32000): {"num_attention_heads": 32, "rope_theta": 10000.0},  # Llama-2-7b
    ("llama", 5120, 5120, 5120, 32000): {"num_attention_heads": 40, "rope_theta": 10000.0},  # Llama-2-13b
    ("llama", 8192, 8192, 1024, 32000): {"num_attention_heads": 64, "rope_theta": 10000.0},  # Llama-2-70b
    ("llama", 576, 576, 192, 49152): {"num_attention_heads": 9, "rope_theta": 100000.0},  # SmolLM2-135M
    ("llama", 960, 960, 320, 49152): {"num_attention_heads": 15, "rope_theta": 100000.0},  # SmolLM2-360M
    ("llama", 2048, 2048, 2048, 49152): {"num_attention_heads": 32, "rope_theta": 130000.0},  # SmolLM2-1.7B
}


# ---- descriptions ---------------------------------------------------------------------------------------
def uniform_slicing(hidden_size: int, num_layers: int, sparsity: float, family: str = "llama",
                    round_to: int = 8, slice_head: bool = False) -> dict[str, Any]:
    """SliceGPT's slicing config for a constant sparsity: k = int((1 - s) d) rounded down to a multiple of 8;
    the last layer's MLP output stays d unless the head is sliced."""
    if not 0.0 <= sparsity < 1.0:
        raise ModelError(f"sparsity must be in [0, 1), got {sparsity}")
    k = int((1 - sparsity) * hidden_size)
    k -= k % round_to
    if k <= 0:
        raise ModelError(f"sparsity {sparsity} leaves no width of {hidden_size}")
    L = num_layers

    def per(last=k):
        return {str(i): (last if i == L - 1 else k) for i in range(L)}

    return {
        "hidden_size": hidden_size, "layers_num": L, "do_slice_head": slice_head, "parallel_blocks": False,
        "embedding_dimensions": {str(i): k for i in range(2 if family == "opt" else 1)},
        "attention_input_dimensions": per(), "attention_output_dimensions": per(),
        "mlp_input_dimensions": per(), "mlp_output_dimensions": per(k if slice_head else hidden_size),
        "head_dimension": k if slice_head else hidden_size, "const_dimension": None,
    }


def read_hf_config(config) -> dict[str, Any]:
    """An HF config as a dict, from a dict, a transformers config object, a config.json path or its directory."""
    if config is None or isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read HF config {p}: {e}") from None


def hf_desc(config, slicing: dict[str, Any] | None = None, **overrides) -> ModelDesc:
    """`ModelDesc` from an HF config (dict/object/path) and a SliceGPT slicing config (None: unsliced)."""
    c = read_hf_config(config)
    family = {"llama": "llama", "opt": "opt"}.get(c.get("model_type"))
    if family is None:
        raise ModelError(f"unsupported model_type {c.get('model_type')!r}; bbformat handles llama and opt")
    d, L = int(c["hidden_size"]), int(c["num_hidden_layers"])
    if slicing is None:
        slicing = uniform_slicing(d, L, 0.0, family)
    if int(slicing["hidden_size"]) != d or int(slicing["layers_num"]) != L:
        raise ModelError(f"slicing config is for hidden_size {slicing['hidden_size']}, {slicing['layers_num']} "
                         f"layers; the HF config has {d}, {L}")
    if slicing.get("parallel_blocks"):
        raise ModelError("parallel-block models (phi-2) are not supported")
    heads = int(c["num_attention_heads"])
    rope = c.get("rope_parameters") or {}
    kw: dict[str, Any] = dict(
        family=family, hidden_size=d, num_layers=L, vocab_size=int(c["vocab_size"]), num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or d // heads),
        max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
        do_slice_head=bool(slicing.get("do_slice_head", False)), rms_eps=SLICEGPT_RMS_EPS,
        **_widths(slicing, L),
    )
    if family == "opt":
        if not c.get("do_layer_norm_before", True) or int(c.get("word_embed_proj_dim") or d) != d:
            raise ModelError("OPT variants with post-norm or projected embeddings (opt-350m) are not supported")
        bias = bool(c.get("enable_bias", True))
        kw.update(intermediate_size=int(c["ffn_dim"]), activation=c.get("activation_function", "relu"),
                  attention_bias=bias, mlp_bias=bias, lm_head_bias=True)
    else:
        scaling = c.get("rope_scaling")
        if rope.get("rope_type", "default") != "default":
            scaling = rope
        kw.update(intermediate_size=int(c["intermediate_size"]), activation=c.get("hidden_act", "silu"),
                  attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)),
                  rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), rope_scaling=scaling)
    kw.update(overrides)
    return ModelDesc(**kw)


def _widths(slicing: dict[str, Any], L: int) -> dict[str, tuple[int, ...]]:
    def per(key):
        v = slicing[key]
        try:
            return tuple(int(v[str(i)]) for i in range(len(v) if key == "embedding_dimensions" else L))
        except KeyError as e:
            raise ModelError(f"slicing config {key} has no entry {e}") from None

    try:
        return dict(embedding_dims=per("embedding_dimensions"), attn_input_dims=per("attention_input_dimensions"),
                    attn_output_dims=per("attention_output_dimensions"), mlp_input_dims=per("mlp_input_dimensions"),
                    mlp_output_dims=per("mlp_output_dimensions"))
    except (KeyError, TypeError) as e:
        raise ModelError(f"slicing config is missing {e}") from None

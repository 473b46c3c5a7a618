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


# ---- reading ----------------------------------------------------------------------------------------------
def load_slicegpt(path, json_path=None, config=None) -> tuple[ModelDesc, dict[str, torch.Tensor]]:
    """Read a SliceGPT checkpoint (`.pt` or `.safetensors`) and its slicing `.json` (default: same stem).

    `config` (HF config dict, object, config.json path or its directory) supplies what the shapes cannot tell
    (heads, rope_theta); it is not needed for files we wrote, nor for the models in KNOWN_MODELS. Otherwise
    the number of heads is guessed (head_dim 64, or 128 from d = 4096 up) with a warning: the guess only
    matters for running the model, not for storing it. Returns (desc, tensors in `desc.tensors()` order),
    each tensor a compact copy in the file's dtype.
    """
    path = Path(path)
    json_path = Path(json_path) if json_path is not None else path.with_suffix(".json")
    try:
        slicing = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.name} needs its SliceGPT slicing config; {json_path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read slicing config {json_path}: {e}") from None
    tensors = {k: v for k, v in _read_tensors(path).items() if not k.endswith(_IGNORED_SUFFIXES)}
    if DESC_KEY in slicing:
        desc = ModelDesc.from_dict(slicing[DESC_KEY])
    elif config is not None:
        desc = hf_desc(config, slicing, lm_head_bias="lm_head.bias" in tensors)
    else:
        desc = hf_desc(_config_from_shapes(slicing, tensors), slicing, lm_head_bias="lm_head.bias" in tensors)
    check_tensors(desc, tensors)
    return desc, {t.name: tensors[t.name] for t in desc.tensors()}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"cannot read {path}: {e}") from None
    try:
        try:  # mmap: the copies below are all that is held in memory, not the (possibly larger) storages
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors
        raise ModelError(f"cannot read {path} as a state dict of tensors: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path} is not a flat state dict of tensors")
    # SliceGPT tensors can be views of larger storages: keep compact copies only
    return {k: v.contiguous().clone() for k, v in sd.items()}


def _config_from_shapes(slicing: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A minimal HF config for a SliceGPT state dict, from its shapes + KNOWN_MODELS (or a guess)."""
    family = "opt" if any(k.startswith("model.decoder.") for k in tensors) else "llama"
    p = "model.decoder." if family == "opt" else "model."
    d = int(slicing["hidden_size"])

    def shape(name):
        if name not in tensors:
            raise ModelError(f"missing tensor {name!r}")
        return tuple(tensors[name].shape)

    V = shape(p + "embed_tokens.weight")[0]
    nq, nkv = shape(p + "layers.0.self_attn.q_proj.weight")[0], shape(p + "layers.0.self_attn.k_proj.weight")[0]
    up = p + ("layers.0.fc1.weight" if family == "opt" else "layers.0.mlp.up_proj.weight")
    cfg: dict[str, Any] = dict(model_type=family, hidden_size=d, num_hidden_layers=int(slicing["layers_num"]),
                               vocab_size=V, intermediate_size=shape(up)[0], ffn_dim=shape(up)[0])
    if family == "opt":
        cfg["max_position_embeddings"] = shape(p + "embed_positions.weight")[0] - 2
        cfg["enable_bias"] = p + "layers.0.fc1.bias" in tensors
    else:
        cfg["attention_bias"] = p + "layers.0.self_attn.q_proj.bias" in tensors
        cfg["mlp_bias"] = p + "layers.0.mlp.up_proj.bias" in tensors
    known = KNOWN_MODELS.get((family, d, nq, nkv, V))
    if known is None:
        hd = 128 if d >= 4096 else 64
        if nq % hd or nkv % hd:
            raise ModelError(f"cannot tell the attention heads of this {family} model (q rows {nq}, kv rows {nkv});"
                             " pass its HF config.json as config=")
        known = {"num_attention_heads": nq // hd, "rope_theta": 10000.0}
        warnings.warn(f"unknown {family} model (d={d}, vocab={V}): guessing head_dim {hd}, rope_theta 10000; "
                      "pass its HF config.json as config= to run it correctly", stacklevel=3)
    cfg.update(known)
    cfg["head_dim"] = nq // cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = nkv // cfg["head_dim"]
    return cfg


def check_tensors(desc: ModelDesc, tensors: dict[str, torch.Tensor], extra: str = "warn") -> None:
    """Check every tensor of `desc` is present with its shape; `extra` ("warn" / "raise") for unknown keys."""
    want = desc.tensor_map()
    for name, info in want.items():
        if name not in tensors:
            raise ModelError(f"missing tensor {name!r} (expected shape {info.shape})")
        t = tensors[name]
        if tuple(t.shape) != info.shape:
            raise ModelError(f"tensor {name!r} has shape {tuple(t.shape)}, the model description says {info.shape}")
        if not t.is_floating_point():
            raise ModelError(f"tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
    unknown = sorted(set(tensors) - set(want))
    if unknown:
        msg = f"{len(unknown)} tensors are not part of the SliceGPT layout, e.g. {unknown[:3]}"
        if extra == "raise":
            raise ModelError(msg)
        warnings.warn(msg + "; ignoring them", stacklevel=3)


# ---- writing ----------------------------------------------------------------------------------------------
def save_slicegpt(desc: ModelDesc, tensors: dict[str, torch.Tensor], out_path) -> tuple[Path, Path]:
    """Write `tensors` as a SliceGPT checkpoint: `.pt` (plain dict, loadable with torch.load(weights_only=True))
    or `.safetensors` when out_path ends so, plus the sibling `.json` (slicing config + our description).
    Returns (checkpoint path, json path)."""
    out_path = Path(out_path)
    check_tensors(desc, tensors, extra="raise")
    # own compact storage per tensor: torch.save of a view would write its whole storage
    sd = {t.name: tensors[t.name].detach().cpu().contiguous().clone() for t in desc.tensors()}
    json_path = out_path.with_suffix(".json")
    tmp = out_path.with_name(out_path.name + ".tmp")
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(sd, tmp)
    cfg = desc.slicing_config()
    cfg[DESC_KEY] = desc.to_dict()
    json_path.write_text(json.dumps(cfg, indent=1))
    tmp.replace(out_path)
    return out_path, json_path

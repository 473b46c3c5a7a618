"""Import and export of SliceGPT checkpoints: `<name>_<sparsity>.pt` (or .safetensors) plus its sibling `.json`.

SliceGPT does not store the Hugging Face config next to its files, so the `ModelDesc` is put together from
(in order of preference): our own description (files we wrote: `<stem>.bbformat.json` beside the checkpoint, or,
from older versions, the "bbformat_model" key of the JSON), an HF config given by the caller, or the JSON slicing
config + the tensor shapes + a small table of known models. The `.json` we write is exactly SliceGPT's.
Every tensor is checked against the description; a wrong name or shape raises `ModelError` naming the tensor.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import BBFError, ModelError, WriteError
from .arch import MAX_FFN, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, SLICEGPT_RMS_EPS, ModelDesc

DESC_KEY = "bbformat_model"  # our extra key in the .json of files written by bbformat before 0.1 (still read)
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
    """`ModelDesc` from an HF config (dict/object/path) and a SliceGPT slicing config (None: unsliced). A missing or
    malformed key of either is a ModelError naming it."""
    c = read_hf_config(config)
    if not isinstance(c, dict):
        raise ModelError(f"the HF config must be a JSON object, got {type(c).__name__}")
    family = {"llama": "llama", "opt": "opt"}.get(c.get("model_type") if isinstance(c.get("model_type"), str) else None)
    if family is None:
        raise ModelError(f"unsupported model_type {str(c.get('model_type'))[:40]!r}; bbformat handles llama and opt")
    d, L = _cfg_int(c, "hidden_size", MAX_WIDTH), _cfg_int(c, "num_hidden_layers", MAX_LAYERS)
    if slicing is None:
        slicing = uniform_slicing(d, L, 0.0, family)
    check_slicing(slicing)
    if slicing["hidden_size"] != d or slicing["layers_num"] != L:
        raise ModelError(f"slicing config is for hidden_size {slicing['hidden_size']}, {slicing['layers_num']} "
                         f"layers; the HF config has {d}, {L}")
    heads = _cfg_int(c, "num_attention_heads", MAX_WIDTH)
    rope = c.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"HF config rope_parameters must be a map, got {type(rope).__name__}")
    kw: dict[str, Any] = dict(
        family=family, hidden_size=d, num_layers=L, vocab_size=_cfg_int(c, "vocab_size", MAX_VOCAB), num_heads=heads,
        num_kv_heads=_cfg_int(c, "num_key_value_heads", MAX_WIDTH, heads),
        head_dim=_cfg_int(c, "head_dim", MAX_WIDTH, d // heads),
        max_position_embeddings=_cfg_int(c, "max_position_embeddings", MAX_VOCAB, 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
        do_slice_head=bool(slicing.get("do_slice_head", False)), rms_eps=SLICEGPT_RMS_EPS,
        **_widths(slicing, L),
    )
    if family == "opt":
        if not c.get("do_layer_norm_before", True) or _cfg_int(c, "word_embed_proj_dim", MAX_WIDTH, d) != d:
            raise ModelError("OPT variants with post-norm or projected embeddings (opt-350m) are not supported")
        bias = bool(c.get("enable_bias", True))
        kw.update(intermediate_size=_cfg_int(c, "ffn_dim", MAX_FFN), activation=c.get("activation_function", "relu"),
                  attention_bias=bias, mlp_bias=bias, lm_head_bias=True)
    else:
        scaling = c.get("rope_scaling")
        if rope.get("rope_type", "default") != "default":
            scaling = rope
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta) or theta <= 0:
            raise ModelError(f"HF config rope_theta must be a finite positive number, got {str(theta)[:40]!r}")
        kw.update(intermediate_size=_cfg_int(c, "intermediate_size", MAX_FFN), activation=c.get("hidden_act", "silu"),
                  attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)),
                  rope_theta=float(theta), rope_scaling=scaling)
    kw.update(overrides)
    return ModelDesc(**kw)


def _cfg_int(c: dict, key: str, hi: int, default: Any = None) -> int:
    """An integer key of an HF config (null or absent: `default`; no default: required)."""
    v = c.get(key)
    if v is None:
        if default is None:
            raise ModelError(f"HF config has no {key!r}")
        v = default
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= hi:
        raise ModelError(f"HF config {key} must be an integer in 1..{hi}, got {str(v)[:40]!r}")
    return int(v)


_SLICING_WIDTHS = ("embedding_dimensions", "attention_input_dimensions", "attention_output_dimensions",
                   "mlp_input_dimensions", "mlp_output_dimensions")


def check_slicing(slicing: Any, where: str = "slicing config") -> dict[str, Any]:
    """A SliceGPT slicing config (the `.json` next to a checkpoint) must be an object whose sizes are integers in
    range and whose width maps have one entry per layer ("0" .. "L-1"; embeddings: 1 or 2). ModelError otherwise,
    naming the key; nothing is read or allocated before this passes."""
    if not isinstance(slicing, dict):
        raise ModelError(f"{where} must be a JSON object, got a {type(slicing).__name__}")

    def integer(key, v, lo, hi):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ModelError(f"{where}: {key} must be an integer in {lo}..{hi}, got {str(v)[:40]!r} "
                             f"({type(v).__name__})")
        return v

    d = integer("hidden_size", slicing.get("hidden_size"), 1, MAX_WIDTH)
    L = integer("layers_num", slicing.get("layers_num"), 1, MAX_LAYERS)
    for key in ("do_slice_head", "parallel_blocks"):
        if slicing.get(key) is not None and not isinstance(slicing[key], bool):
            raise ModelError(f"{where}: {key} must be true or false, got {str(slicing[key])[:40]!r}")
    if slicing.get("parallel_blocks"):
        raise ModelError("parallel-block models (phi-2) are not supported")
    for key in _SLICING_WIDTHS:
        v = slicing.get(key)
        if not isinstance(v, dict):
            raise ModelError(f"{where}: {key} must be a map from layer index to width, got "
                             f"{type(v).__name__ if key in slicing else 'nothing'}")
        n = len(v) if key == "embedding_dimensions" else L
        if key == "embedding_dimensions" and n not in (1, 2):
            raise ModelError(f"{where}: embedding_dimensions has {n} entries, expected 1 (llama) or 2 (opt)")
        if len(v) != n or any(str(i) not in v for i in range(n)):
            raise ModelError(f"{where}: {key} must have the entries \"0\"..\"{n - 1}\", got {len(v)} entries")
        for i in range(n):
            integer(f"{key}[{i}]", v[str(i)], 1, d)
    return slicing


def _widths(slicing: dict[str, Any], L: int) -> dict[str, tuple[int, ...]]:
    def per(key):
        v = slicing[key]
        return tuple(v[str(i)] for i in range(len(v) if key == "embedding_dimensions" else L))

    return dict(embedding_dims=per("embedding_dimensions"), attn_input_dims=per("attention_input_dimensions"),
                attn_output_dims=per("attention_output_dimensions"), mlp_input_dims=per("mlp_input_dimensions"),
                mlp_output_dims=per("mlp_output_dimensions"))


# ---- reading ----------------------------------------------------------------------------------------------
INDEX_SUFFIX = ".safetensors.index.json"  # a sharded Hugging Face checkpoint: its weight map names the shards


def load_slicegpt(path, json_path=None, config=None) -> tuple[ModelDesc, dict[str, torch.Tensor]]:
    """Read a SliceGPT checkpoint (`.pt`, `.safetensors` or a sharded `<stem>.safetensors.index.json`) and its
    slicing `.json` (default: `<stem>.json`), all of it at once; `open_slicegpt` reads it group by group.

    `config` (HF config dict, object, config.json path or its directory) supplies what the shapes cannot tell
    (heads, rope_theta); it is not needed for files we wrote, nor for the models in KNOWN_MODELS. Otherwise
    the number of heads is guessed (head_dim 64, or 128 from d = 4096 up) with a warning: the guess only
    matters for running the model, not for storing it. Returns (desc, tensors in `desc.tensors()` order),
    each tensor a compact copy in the file's dtype.
    """
    desc, lazy = open_slicegpt(path, json_path, config)
    return desc, lazy.read([t.name for t in desc.tensors()])


def open_slicegpt(path, json_path=None, config=None) -> tuple[ModelDesc, "LazyTensors"]:
    """`load_slicegpt` without reading the weights: (desc, LazyTensors). Only the shapes and dtypes are read now
    (the safetensors headers, the .pt's pickle); every check `load_slicegpt` makes is made here."""
    path = Path(path)
    json_path = Path(json_path) if json_path is not None else slicing_json_path(path)
    try:
        if json_path.stat().st_size > _MAX_JSON:
            raise ModelError(f"slicing config {json_path} is larger than {_MAX_JSON} bytes")
        slicing = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.name} needs its SliceGPT slicing config; {json_path} does not exist") from None
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"cannot read slicing config {json_path}: {e}") from None
    # Everything the JSON says is checked before the checkpoint is read
    check_slicing(slicing, f"slicing config {json_path}")
    desc = None
    if DESC_KEY in slicing:
        try:
            desc = ModelDesc.from_dict(slicing[DESC_KEY])
        except ModelError as e:
            raise ModelError(f"slicing config {json_path}: {DESC_KEY}: {e}") from None
    elif description_path(path).is_file():  # bbformat >= 0.1 writes its description beside the checkpoint
        desc = read_description(description_path(path))
    lazy = LazyTensors(path)
    meta = {k: v for k, v in lazy.meta().items() if not k.endswith(_IGNORED_SUFFIXES)}
    if desc is None:
        cfg = config if config is not None else _config_from_shapes(slicing, meta)
        desc = hf_desc(cfg, slicing, lm_head_bias="lm_head.bias" in meta)
    check_tensors(desc, meta)
    lazy.only = [t.name for t in desc.tensors()]
    return desc, lazy


_MAX_JSON = 64 << 20  # a slicing config is a few KB


def slicing_json_path(checkpoint) -> Path:
    """`<stem>.json` beside `<stem>.pt`, `<stem>.safetensors` or `<stem>.safetensors.index.json`."""
    p = Path(checkpoint)
    return p.with_name(_stem(p) + ".json")


def _stem(path: Path) -> str:
    return path.name[:-len(INDEX_SUFFIX)] if path.name.endswith(INDEX_SUFFIX) else path.stem


class LazyTensors:
    """A checkpoint's tensors, read when asked for: `read(names)` opens the file (a .pt memory-mapped, a
    safetensors file or the shards holding `names`), copies those tensors out and closes it again, so the
    mapped pages of one group at most are resident, never the whole model. `meta()`: shapes and dtypes only."""

    def __init__(self, path: Path):
        if not path.exists():
            raise ModelError(f"checkpoint {path} does not exist")
        self.path = path
        self._resident: dict[str, torch.Tensor] | None = None  # a legacy .pt cannot be mapped: read once, kept
        self._shards: dict[str, Path] | None = None
        self.only: list[str] | None = None  # open_slicegpt: the description's tensors (meta() lists only those)
        if path.name.endswith(INDEX_SUFFIX):
            self._shards = _weight_map(path)

    def meta(self) -> dict[str, torch.Tensor]:
        """name -> a tensor on the meta device (shape and dtype, no data), in `only`'s order when it is set."""
        out = self._meta()
        return out if self.only is None else {n: out[n] for n in self.only}

    def _meta(self) -> dict[str, torch.Tensor]:
        if self._shards is not None:
            out = {}
            for shard in dict.fromkeys(self._shards.values()):
                out.update(_safetensors_meta(shard))
            missing = sorted(set(self._shards) - set(out))
            if missing:
                raise ModelError(f"{self.path}: tensor {missing[0]!r} is not in its shard {self._shards[missing[0]]}")
            return {n: out[n] for n in self._shards}
        if self.path.suffix == ".safetensors":
            return _safetensors_meta(self.path)
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._pt().items()}

    def read(self, names) -> dict[str, torch.Tensor]:
        """{name: compact copy} for `names`, in that order."""
        names = list(names)
        if self._shards is not None:
            by_shard: dict[Path, list[str]] = {}
            for n in names:
                by_shard.setdefault(self._shards[n], []).append(n)
            got = {}
            for shard, part in by_shard.items():
                got.update(_safetensors_read(shard, part))
            return {n: got[n] for n in names}
        if self.path.suffix == ".safetensors":
            return _safetensors_read(self.path, names)
        sd = self._pt()
        # SliceGPT tensors can be views of larger storages (and are memory-mapped): compact copies only; the
        # mapping goes when `sd` does
        return {n: sd[n].contiguous().clone() for n in names}

    def _pt(self) -> dict[str, torch.Tensor]:
        return self._resident if self._resident is not None else _read_pt(self.path, self)


def _read_pt(path: Path, owner: LazyTensors) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise for a one-line error
            warnings.simplefilter("ignore")
            try:  # mmap: nothing is read until a tensor is copied
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped: read once and kept
                sd = owner._resident = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors
        raise ModelError(f"cannot read {path}: it is not a plain state dict of tensors ({_pickle_reason(e)}); "
                         f"bbformat never runs code a checkpoint names") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        owner._resident = None
        raise ModelError(f"{path} is not a flat state dict of tensors")
    return sd


_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}


def _safetensors_meta(path: Path) -> dict[str, torch.Tensor]:
    """Shapes and dtypes from a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_JSON:
                raise ModelError(f"cannot read {path}: its header claims {n} bytes")
            header = json.loads(f.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ModelError(f"{path}: tensor {name!r} has dtype {info['dtype']}, expected a floating-point one")
            out[name] = torch.empty([int(x) for x in info["shape"]], dtype=dtype, device="meta")
        return out
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"cannot read {path}: not a safetensors file ({e})") from None


def _safetensors_read(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"cannot read {path}: {e}") from None


def _weight_map(index: Path) -> dict[str, Path]:
    """A sharded checkpoint's tensor -> shard file (beside the index; a shard elsewhere is refused)."""
    try:
        if index.stat().st_size > _MAX_JSON:
            raise ModelError(f"{index} is larger than {_MAX_JSON} bytes")
        wm = json.loads(index.read_text())["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError("weight_map is not a map")
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ModelError(f"cannot read sharded checkpoint index {index}: {e}") from None
    out = {}
    for name, shard in wm.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ModelError(f"{index}: shard {str(shard)[:80]!r} of {name!r} is not a file beside the index")
        out[name] = index.parent / shard
    return out


def _pickle_reason(e: BaseException) -> str:
    """What torch.load(weights_only=True) objected to, without its advice to retry with weights_only=False (which
    would run the pickle's code: unsafe for a file from elsewhere)."""
    parts = [" ".join(p.split()) for p in str(e).split("\n\n")]
    keep = [p for p in parts if p and "weights_only" not in p and not p.startswith("Check the documentation")]
    text = " ".join(keep) or type(e).__name__
    return text[:300] + ("..." if len(text) > 300 else "")


def _config_from_shapes(slicing: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A minimal HF config for a SliceGPT state dict, from its shapes + KNOWN_MODELS (or a guess)."""
    family = "opt" if any(k.startswith("model.decoder.") for k in tensors) else "llama"
    p = "model.decoder." if family == "opt" else "model."
    d = slicing["hidden_size"]

    def shape(name):
        if name not in tensors:
            raise ModelError(f"missing tensor {name!r}")
        if tensors[name].dim() < 1:
            raise ModelError(f"tensor {name!r} is a scalar")
        return tuple(tensors[name].shape)

    V = shape(p + "embed_tokens.weight")[0]
    nq, nkv = shape(p + "layers.0.self_attn.q_proj.weight")[0], shape(p + "layers.0.self_attn.k_proj.weight")[0]
    up = p + ("layers.0.fc1.weight" if family == "opt" else "layers.0.mlp.up_proj.weight")
    cfg: dict[str, Any] = dict(model_type=family, hidden_size=d, num_hidden_layers=slicing["layers_num"],
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
    or `.safetensors` when out_path ends so, plus the sibling `.json`, which is exactly SliceGPT's slicing config
    (what `SlicingConfig.from_dict` accepts), and bbformat's own description in `<stem>.bbformat.json` (see
    `description_path`). Returns (checkpoint path, json path)."""
    from ..io.store import AtomicSink

    out_path = Path(out_path)
    check_tensors(desc, tensors, extra="raise")
    # own compact storage per tensor: torch.save of a view would write its whole storage
    sd = {t.name: tensors[t.name].detach().cpu().contiguous().clone() for t in desc.tensors()}
    json_path = out_path.with_suffix(".json")
    text = json.dumps(desc.slicing_config(), indent=1, allow_nan=False).encode()
    desc_text = description_json(desc)
    # The files go to hidden temporaries (AtomicSink) and appear only when all are complete: any failure leaves
    # no temporary and the existing targets untouched.
    ckpt = AtomicSink(str(out_path))
    try:
        js = AtomicSink(str(json_path))
    except BaseException:
        ckpt.abort()
        raise
    try:
        ds = AtomicSink(str(description_path(out_path)))
    except BaseException:
        ckpt.abort()
        js.abort()
        raise
    try:
        try:
            if out_path.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(sd, ckpt.tmp, metadata={"format": "pt"})
            else:
                torch.save(sd, ckpt)
        except BBFError:
            raise
        except Exception as e:  # torch and safetensors wrap the OSError of a full disk in their own errors
            raise ckpt.error or WriteError(f"cannot write {out_path}: {' '.join(str(e).split())[:300]}") from None
        js.write(text)
        ds.write(desc_text)
        ckpt.commit()
        js.commit()
        ds.commit()
    except BaseException:
        ckpt.abort()
        js.abort()
        ds.abort()
        raise
    return out_path, json_path


def save_sharded(desc: ModelDesc, groups, index_path) -> Path:
    """Write (group, tensors) pairs in push order as a sharded safetensors checkpoint, one shard per group,
    holding one group in memory: `<stem>-00001-of-000NN.safetensors`..., the index `<stem>.safetensors.index.json`
    (Hugging Face's weight map), SliceGPT's `<stem>.json` and bbformat's description. The index is written last:
    a checkpoint whose index exists is complete."""
    from safetensors.torch import save_file

    index_path = Path(index_path)
    if not index_path.name.endswith(INDEX_SUFFIX):
        raise BBFError(f"a sharded checkpoint's index must end in {INDEX_SUFFIX}: {index_path}")
    stem, n = _stem(index_path), len(desc.groups())
    weight_map: dict[str, str] = {}
    for i, (group, tensors) in enumerate(groups):
        shard = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(index_path.with_name(shard)),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    if set(weight_map) != {t.name for t in desc.tensors()}:
        raise ModelError(f"save_sharded: got {len(weight_map)} tensors, the description has {len(desc.tensors())}")
    slicing_json_path(index_path).write_text(json.dumps(desc.slicing_config(), indent=1, allow_nan=False))
    description_path(index_path).write_bytes(description_json(desc))
    index_path.write_text(json.dumps({"metadata": {"format": "pt"}, "weight_map": weight_map}, indent=1))
    return index_path


# ---- bbformat's own description beside a SliceGPT checkpoint ------------------------------------------------
DESCRIPTION_FORMAT = "bbformat.model/1"
DESCRIPTION_SUFFIX = ".bbformat.json"


def description_path(checkpoint) -> Path:
    """`<dir>/<stem>.bbformat.json` for `<dir>/<stem>.pt` (or .safetensors): where bbformat keeps the full model
    description (SPEC section 9) of a checkpoint it wrote, so that the `.json` can stay SliceGPT's own."""
    p = Path(checkpoint)
    return p.with_name(_stem(p) + DESCRIPTION_SUFFIX)


def description_json(desc: ModelDesc) -> bytes:
    return json.dumps({"format": DESCRIPTION_FORMAT, "model": desc.to_dict()}, indent=1, allow_nan=False).encode()


def read_description(path) -> ModelDesc:
    """The `ModelDesc` stored by `description_json` (every field checked by `ModelDesc.from_dict`)."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_JSON:
            raise ModelError(f"model description {path} is larger than {_MAX_JSON} bytes")
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(f"cannot read model description {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != DESCRIPTION_FORMAT or not isinstance(doc.get("model"), dict):
        raise ModelError(f"{path} is not a bbformat model description (format {DESCRIPTION_FORMAT!r})")
    try:
        return ModelDesc.from_dict(doc["model"])
    except ModelError as e:
        raise ModelError(f"model description {path}: {e}") from None

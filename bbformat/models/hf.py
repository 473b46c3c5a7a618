"""Loading a Hugging Face causal LM (a local directory or a .gguf file) and carrying its tokenizer in a .bbf file.

Never touches the hub: every `from_pretrained` call is `local_files_only`. Only Llama and OPT causal LMs are
supported, the two families the SliceGPT layout (`ModelDesc`) describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import BBFError, ModelError
from .arch import ModelDesc
from .gguf_check import check_gguf
from .slicegpt_io import hf_desc, read_hf_config

TOKENIZER_FORMAT = "bbformat.tokenizer/1"
# Tokenizer settings that are not in tokenizer.json but change how text is encoded or decoded
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_FLAG_KEYS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "padding_side")


def _source(path) -> tuple[str, dict[str, Any]]:
    """(directory, extra from_pretrained kwargs) for a local HF directory or a .gguf file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        check_gguf(p)  # bounded checks first: transformers trusts every count and fills missing keys with defaults
        return str(p.parent), {"gguf_file": p.name, "local_files_only": True}
    if p.is_dir() and (p / "config.json").is_file():
        return str(p), {"local_files_only": True}
    raise BBFError(f"{p} is neither a .gguf file nor a Hugging Face model directory with a config.json")


def model_desc(config) -> ModelDesc:
    """The UNSLICED `ModelDesc` (every width = d) of an HF config (object, dict or path): family, d, L, V, heads,
    kv heads, head_dim, F, max positions, rope, bos/eos ids, tie_word_embeddings. Replace the widths to slice."""
    c = read_hf_config(config)
    if c.get("model_type") == "llama":
        if c.get("mlp_bias") or c.get("attention_bias"):
            raise ModelError("Llama models with attention or MLP biases are not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ModelError(f"Llama hidden_act {c.get('hidden_act')!r} is not supported (expected silu)")
    if c.get("model_type") == "opt" and not c.get("enable_bias", True):
        raise ModelError("OPT models without biases are not supported (the fused LayerNorm shift needs them)")
    desc = hf_desc(c)  # raises ModelError for other families and unsupported OPT variants
    if desc.rope_scaling:
        raise ModelError(f"rope scaling {desc.rope_scaling!r} is not supported")
    return desc


def load_hf(path) -> tuple[torch.nn.Module, Any, ModelDesc]:
    """(float32 HF model in eval mode, fast tokenizer or None, unsliced ModelDesc) from a local directory or a
    .gguf file (transformers de-quantises GGUF weights to float32; needs the gguf package)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, kw = _source(path)
    try:
        config = AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise BBFError(f"cannot read the model config of {path}: {e}") from None
    desc = model_desc(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        raise BBFError(f"cannot load the model weights of {path}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a weights-only directory: the caller tokenises elsewhere
    if tokenizer is not None and (not hasattr(tokenizer, "backend_tokenizer") or tokenizer.vocab_size == 0):
        # slow (Python) tokenizers cannot be serialised to tokenizer.json; with no tokenizer files transformers
        # invents an empty one
        tokenizer = None
    return model.eval(), tokenizer, desc


def tokenizer_bytes(tokenizer) -> bytes:
    """A fast tokenizer as self-contained bytes: UTF-8 JSON holding its tokenizer.json and special-token config."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise BBFError("only fast (tokenizers-backed) tokenizers can be stored")
    config: dict[str, Any] = {}
    for k in _SPECIAL_KEYS:
        v = getattr(tokenizer, k, None)
        if v is not None:
            config[k] = str(v)
    for k in _FLAG_KEYS:
        v = getattr(tokenizer, k, None)
        if isinstance(v, (bool, str)):
            config[k] = v
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    if isinstance(getattr(tokenizer, "model_max_length", None), int) and tokenizer.model_max_length < 2**31:
        config["model_max_length"] = tokenizer.model_max_length
    doc = {"format": TOKENIZER_FORMAT, "tokenizer": tokenizer.backend_tokenizer.to_str(), "config": config}
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def tokenizer_from_bytes(data: bytes):
    """Rebuild the `PreTrainedTokenizerFast` stored by `tokenizer_bytes` (no hub access)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        doc = json.loads(data.decode("utf-8"))
        if doc.get("format") != TOKENIZER_FORMAT:
            raise ValueError(f"unknown tokenizer format {doc.get('format')!r}")
        backend = Tokenizer.from_str(doc["tokenizer"])
        config = dict(doc["config"])
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise BBFError(f"stored tokenizer is unreadable: {e}") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)

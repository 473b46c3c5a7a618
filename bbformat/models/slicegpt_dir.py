"""SliceGPT output directories: what `bbf encode` accepts and what `bbf slice -o x.pt` / `bbf decode` write.

SliceGPT's `run_slicegpt.py --save-dir DIR` leaves `<name>_<sparsity>.pt` and `<name>_<sparsity>.json` (its slicing
config), and its loader (`hf_utils.load_sliced_model(name, DIR, sparsity=...)`) reads the Hugging Face `config.json`
and the tokenizer files from that same directory. bbformat writes the same layout, plus its own model description
in `<name>_<sparsity>.bbformat.json` (the `.json` stays exactly SliceGPT's), and reads it back: a checkpoint given as
a file or as its directory, the HF `config.json` beside it (heads, rope) and the tokenizer beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BBFError
from .arch import ModelDesc

CHECKPOINT_SUFFIXES = (".pt", ".safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Checkpoint:
    path: Path  # the .pt / .safetensors file
    json_path: Path  # its slicing config
    config: Path | None  # the HF config.json beside it, if any
    tokenizer: Path | None  # a directory holding tokenizer files beside it, if any


def resolve_checkpoint(path, json_path=None, config=None) -> Checkpoint:
    """A SliceGPT checkpoint given as a file or as the directory holding exactly one (`<name>.pt` or
    `.safetensors` with its `<name>.json`), with the HF config.json and tokenizer files found beside it."""
    from .slicegpt_io import INDEX_SUFFIX, slicing_json_path

    p = Path(path)
    if p.is_dir():
        found = sorted(c for c in p.iterdir() if (c.suffix in CHECKPOINT_SUFFIXES or c.name.endswith(INDEX_SUFFIX))
                       and slicing_json_path(c).is_file())
        if not found:
            raise BBFError(f"{p} holds no SliceGPT checkpoint (a .pt or .safetensors file with its .json)")
        if len(found) > 1:
            raise BBFError(f"{p} holds {len(found)} SliceGPT checkpoints ({', '.join(c.name for c in found)}); "
                           "name the one to use")
        p = found[0]
    elif not p.exists():
        raise BBFError(f"checkpoint {p} does not exist")
    elif p.suffix not in CHECKPOINT_SUFFIXES and not p.name.endswith(INDEX_SUFFIX):
        raise BBFError(f"{p} is not a SliceGPT checkpoint (.pt, .safetensors or a sharded {INDEX_SUFFIX}, or the "
                       "directory holding one)")
    beside = p.parent
    if config is None and (beside / "config.json").is_file():
        config = beside / "config.json"
    tok = beside if any((beside / f).is_file() for f in TOKENIZER_FILES) else None
    return Checkpoint(p, Path(json_path) if json_path else slicing_json_path(p),
                      Path(config) if config else None, tok)


def hf_config_dict(desc: ModelDesc, dtype: str | None = None) -> dict[str, Any]:
    """The Hugging Face config.json of the UNSLICED source model (SliceGPT keeps it unchanged; its loader reads it)."""
    c: dict[str, Any] = {
        "model_type": desc.family, "vocab_size": desc.vocab_size, "hidden_size": desc.hidden_size,
        "num_hidden_layers": desc.num_layers, "num_attention_heads": desc.num_heads,
        "max_position_embeddings": desc.max_position_embeddings, "tie_word_embeddings": desc.tie_word_embeddings,
        "bos_token_id": desc.bos_token_id, "eos_token_id": desc.eos_token_id,
    }
    if desc.family == "opt":
        c.update(architectures=["OPTForCausalLM"], ffn_dim=desc.intermediate_size, word_embed_proj_dim=desc.hidden_size,
                 do_layer_norm_before=True, enable_bias=desc.attention_bias, activation_function=desc.activation,
                 layer_norm_elementwise_affine=True)
    else:
        c.update(architectures=["LlamaForCausalLM"], intermediate_size=desc.intermediate_size,
                 num_key_value_heads=desc.num_kv_heads, head_dim=desc.head_dim, hidden_act=desc.activation,
                 rms_norm_eps=desc.rms_eps, rope_theta=desc.rope_theta, attention_bias=desc.attention_bias,
                 mlp_bias=desc.mlp_bias)
        if desc.rope_scaling:
            c["rope_scaling"] = dict(desc.rope_scaling)
    if dtype:
        c["torch_dtype"] = dtype
    return c


def write_beside(checkpoint, desc: ModelDesc, tokenizer=None, dtype: str | None = None) -> list[Path]:
    """Complete a SliceGPT directory around `checkpoint`: the HF config.json and the tokenizer's files, each only
    where the directory has none yet (never overwritten). Returns the files written."""
    import json

    d = Path(checkpoint).parent
    written = []
    cfg = d / "config.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(hf_config_dict(desc, dtype), indent=1))
        written.append(cfg)
    if tokenizer is not None and not any((d / f).exists() for f in TOKENIZER_FILES):
        before = set(d.iterdir())
        tokenizer.save_pretrained(str(d))
        written += sorted(set(d.iterdir()) - before)
    return written


def load_tokenizer(path):
    """A fast tokenizer from a directory holding tokenizer files (a HF model dir or a SliceGPT dir) or a .gguf."""
    from .hf import _source

    p = Path(path)
    if not p.exists():
        raise BBFError(f"tokenizer source {p} does not exist")
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise BBFError(f"{p} holds no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    if p.is_dir() and not (p / "config.json").is_file():
        src, kw = str(p), {"local_files_only": True}
    else:
        src, kw = _source(p)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise BBFError(f"cannot read a tokenizer from {p}: {e}") from None
    if not hasattr(tok, "backend_tokenizer"):
        raise BBFError(f"the tokenizer of {p} is not a fast (tokenizers) tokenizer; bbformat stores only those")
    return tok

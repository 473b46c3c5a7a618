"""A runnable model straight from a .bbf file (local path or URL): no hub, no outside config, no model name.

The header's model description builds an empty `SlicedLM`; the blocks stream in (last to first, decoded on
background threads) and are installed as they arrive.
"""

from __future__ import annotations

from typing import Any

import torch

from ..container.reader import BBFReader
from .sliced import SlicedLM

TOKENIZER_AUX = "tokenizer"
TOKENIZER_MEDIA_TYPE = "application/vnd.bbformat.tokenizer+json"


def load_model(url: str, storage_options: dict | None = None, dtype: torch.dtype = torch.float32,
               progress: bool = False) -> SlicedLM:
    """Build the SliceGPT-form model stored in `url` (any fsspec URL) as a torch module in eval mode."""
    model, _ = _load(url, storage_options, dtype, progress, want_tokenizer=False)
    return model


def load_pretrained(url: str, storage_options: dict | None = None, dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> tuple[SlicedLM, Any]:
    """(model, tokenizer or None): the tokenizer comes from the file when it carries one."""
    return _load(url, storage_options, dtype, progress, want_tokenizer=True)


def _load(url, storage_options, dtype, progress, want_tokenizer):
    from tqdm.auto import tqdm

    with BBFReader(url, storage_options) as f:
        model = SlicedLM.empty(f.model, dtype=dtype)
        groups = f.model.groups()
        with tqdm(total=len(groups), desc="load", unit="group", disable=not progress, leave=False) as bar:
            for _, tensors in f.stream():
                model.load_group(tensors)
                bar.update(1)
        tokenizer = None
        if want_tokenizer and TOKENIZER_AUX in f.aux_names():
            from .hf import tokenizer_from_bytes

            tokenizer = tokenizer_from_bytes(f.aux(TOKENIZER_AUX))
    return model.eval(), tokenizer

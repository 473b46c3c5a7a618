"""A runnable model straight from a .bbf file (local path or URL): no hub, no outside config, no model name.

The header's model description builds an empty `SlicedLM`; the blocks stream in (last to first, fetched by the
I/O engine and decoded on background threads while the next ones arrive) and are installed, on `device`, as they
arrive.
"""

from __future__ import annotations

from typing import Any

import torch

from ..container.reader import BBFReader
from ..io.fetch import FetchOptions
from .sliced import SlicedLM

TOKENIZER_AUX = "tokenizer"
TOKENIZER_MEDIA_TYPE = "application/vnd.bbformat.tokenizer+json"


def load_model(url: str, storage_options: dict | None = None, dtype: torch.dtype = torch.float32,
               progress: bool = False, device: torch.device | str | None = None,
               fetch: FetchOptions | dict | None = None) -> SlicedLM:
    """Build the SliceGPT-form model stored in `url` (any fsspec URL) as a torch module in eval mode. Each group is
    placed on `device` as it arrives; `progress` shows a bar in bytes and MB/s."""
    model, _ = _load(url, storage_options, dtype, progress, device, fetch, want_tokenizer=False)
    return model


def load_pretrained(url: str, storage_options: dict | None = None, dtype: torch.dtype = torch.float32,
                    progress: bool = False, device: torch.device | str | None = None,
                    fetch: FetchOptions | dict | None = None) -> tuple[SlicedLM, Any]:
    """(model, tokenizer or None): the tokenizer comes from the file when it carries one."""
    return _load(url, storage_options, dtype, progress, device, fetch, want_tokenizer=True)


def _load(url, storage_options, dtype, progress, device, fetch, want_tokenizer):
    from tqdm.auto import tqdm

    with BBFReader(url, storage_options, fetch=fetch) as f:
        model = SlicedLM.empty(f.model, dtype=dtype, device=device)
        total = sum(f.group_stored_bytes(g) for g in f.model.groups())
        with tqdm(total=total, desc="load", unit="B", unit_scale=True, unit_divisor=1000, disable=not progress,
                  leave=False) as bar:
            for group, tensors in f.stream():
                model.load_group(tensors)
                bar.update(f.group_stored_bytes(group))
        tokenizer = None
        if want_tokenizer and TOKENIZER_AUX in f.aux_names():
            from .hf import tokenizer_from_bytes

            tokenizer = tokenizer_from_bytes(f.aux(TOKENIZER_AUX))
    return model.eval(), tokenizer

"""A runnable model straight from a .bbf file (local path or URL): no hub, no outside config, no model name.

The header's model description builds an empty model (nothing allocated); the blocks stream in (last to first,
fetched by the I/O engine and decoded on background threads while the next ones arrive) and are installed, on
`device`, as they arrive.

- `load_model(url)`: the torch-only `SlicedLM` (`model(input_ids) -> logits`); needs no transformers.
  `load_model(url, stage=(rank, world_size))`: one pipeline stage (`SlicedStage`, bbformat.models.stage), built
  from its groups only, which are all that is fetched.
- `load_pretrained(url)`: (`SlicedForCausalLM`, tokenizer): the transformers model over the same modules, with a KV
  cache, `generate()` and pipelines; the tokenizer is the one stored in the file (or beside it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ..container.reader import BBFReader
from ..errors import BBFError
from ..io.fetch import FetchOptions
from .sliced import SlicedLM
from .stage import SlicedStage, Stage, resolve_stage

TOKENIZER_AUX = "tokenizer"
TOKENIZER_MEDIA_TYPE = "application/vnd.bbformat.tokenizer+json"


def load_model(url: str | BBFReader, storage_options: dict | None = None, dtype: torch.dtype = torch.float32,
               progress: bool = False, device: torch.device | str | None = None,
               fetch: FetchOptions | dict | None = None, stage: Stage | tuple[int, int] | None = None
               ) -> SlicedLM | SlicedStage:
    """Build the SliceGPT-form model stored in `url` (any fsspec URL, or an open BBFReader, which stays open) as a
    torch module in eval mode (`model(input_ids) -> logits`). Each group is placed on `device` as it arrives;
    `progress` shows a bar in bytes and MB/s. For `generate()`, use `load_pretrained`.

    `stage`: build one pipeline stage only, a `SlicedStage`; (rank, world_size) splits the blocks as
    `pipeline_stage` does, a `Stage` names its blocks. Only that stage's groups are fetched."""
    model, _ = read_model(url, storage_options, dtype, progress, device, fetch,
                          cls=SlicedLM if stage is None else SlicedStage, want_tokenizer=False, stage=stage)
    return model


def load_pretrained(url: str, storage_options: dict | None = None, dtype: torch.dtype | str = torch.float32,
                    progress: bool = False, device: torch.device | str | None = None,
                    fetch: FetchOptions | dict | None = None):
    """(`SlicedForCausalLM`, tokenizer or None) from a .bbf (path or URL) or a directory written by
    `save_pretrained`. The model is a transformers `PreTrainedModel` in eval mode; the tokenizer is the one the file
    carries, else the tokenizer files of the directory. `dtype="auto"`: compute in the file's word dtype."""
    try:
        from .modeling import SlicedForCausalLM, bbf_location
    except ImportError as e:
        raise BBFError(f"load_pretrained needs transformers (pip install 'bbformat[models]'): {e}") from None
    src = bbf_location(str(url))
    if src is None:
        raise BBFError(f"{url} is neither a .bbf file nor a directory holding model.bbf")
    model, tokenizer = read_model(src, storage_options, dtype, progress, device, fetch, cls=SlicedForCausalLM)
    local = Path(str(url))
    if local.is_dir():
        from transformers import GenerationConfig

        if (local / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(local)
        if tokenizer is None and (local / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
    _fill_generation_config(model, tokenizer)
    return model, tokenizer


def read_model(url, storage_options=None, dtype=torch.float32, progress=False, device=None, fetch=None, *, cls,
               want_tokenizer: bool = True, stage: Stage | tuple[int, int] | None = None) -> tuple[Any, Any]:
    """(model of class `cls` with the weights of `url` (a URL or an open BBFReader) streamed in, tokenizer or None).
    `cls` is `SlicedLM`, `SlicedStage` (with `stage`) or `SlicedForCausalLM` (anything with
    `empty(desc, dtype, device[, word_dtype])` and `load_group`)."""
    from tqdm.auto import tqdm

    with _reader(url, storage_options, fetch) as f:
        if dtype == "auto":
            dtype = getattr(torch, f.dtype)
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        groups = None  # every group, in the stream's own order
        if cls is SlicedStage:
            stage = resolve_stage(stage, f.model.num_layers)
            model = SlicedStage.empty(f.model, dtype=dtype or torch.float32, device=device, stage=stage)
            groups = stage.groups()
        elif cls is SlicedLM:
            model = SlicedLM.empty(f.model, dtype=dtype or torch.float32, device=device)
        else:
            model = cls.empty(f.model, dtype=dtype or torch.float32, device=device, word_dtype=f.dtype)
        total = sum(f.group_stored_bytes(g) for g in groups or f.model.groups())
        with tqdm(total=total, desc="load", unit="B", unit_scale=True, unit_divisor=1000, disable=not progress,
                  leave=False) as bar:
            for group, tensors in f.stream(dtype=dtype or torch.float32, groups=groups):  # cast on decode threads
                model.load_group(tensors)
                bar.update(f.group_stored_bytes(group))
        tokenizer = None
        if want_tokenizer and TOKENIZER_AUX in f.aux_names():
            from .hf import tokenizer_from_bytes

            raw = f.aux(TOKENIZER_AUX)
            tokenizer = tokenizer_from_bytes(raw)
            if hasattr(model, "_bbf_tokenizer"):
                model._bbf_tokenizer = raw
    return model.eval(), tokenizer


def _reader(url, storage_options, fetch):
    """A reader for `url`, closed on exit; a caller's open BBFReader is used as it is and left open."""
    if isinstance(url, BBFReader):
        return contextlib.nullcontext(url)
    return BBFReader(url, storage_options, fetch=fetch)


def _fill_generation_config(model, tokenizer) -> None:
    """Special token ids generate() needs, from the tokenizer when the file's description has none."""
    gc = model.generation_config
    if tokenizer is None or gc is None:
        return
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(gc, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(gc, name, getattr(tokenizer, name))
    if gc.pad_token_id is None and gc.eos_token_id is not None:  # open-ended generation: pad with EOS
        eos = gc.eos_token_id
        gc.pad_token_id = eos[0] if isinstance(eos, list) else eos

"""Pipeline stages: a rank of a distributed job holds, fetches and runs only its contiguous range of blocks.

    stage = bbformat.pipeline_stage(dist.get_rank(), dist.get_world_size(), num_layers)   # or Stage(range(a, b), L)
    part = bbformat.load_model(url, stage=(rank, world))    # fetches only stage.groups(); a SlicedStage
    h = part(x)   # first stage: token ids in; last stage: logits out; between: the boundary's sliced width

A stage's groups are `embed` (first stage only), `layer.i` for its blocks, `head` (last stage only); every group of
a .bbf decodes from its own sections alone (SPEC 6), so a stage's reader fetches only their byte ranges, plus
the suffix read that opens the file. Between stages the hidden state has the width SliceGPT sliced that boundary
to (`SlicedStage.input_width` / `output_width`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BBFError, ModelError
from .arch import ModelDesc
from .sliced import SlicedWeights, build_modules, forward_blocks, logits_of, stack_of


class StageError(BBFError):
    """A pipeline-stage assignment that does not fit the model (rank or block range out of range)."""


@dataclass(frozen=True)
class Stage:
    """Blocks `layers` (a contiguous, non-empty range) of a model of `num_layers` blocks. The first stage also
    embeds the token ids, the last one also applies the final norm and the head."""

    layers: range
    num_layers: int

    def __post_init__(self):
        r, L = self.layers, self.num_layers
        if not isinstance(r, range) or r.step != 1:
            raise StageError(f"a stage's layers must be a contiguous range, got {r!r}")
        if not 0 <= r.start < r.stop <= L:
            raise StageError(f"layers {r.start}..{r.stop - 1} are not a non-empty range of the model's blocks "
                             f"0..{L - 1}")

    @property
    def first(self) -> bool:
        return self.layers.start == 0

    @property
    def last(self) -> bool:
        return self.layers.stop == self.num_layers

    def groups(self) -> list[str]:
        """The file groups this stage needs, in model order."""
        return (["embed"] if self.first else []) + [f"layer.{i}" for i in self.layers] + (["head"] if self.last else [])


def pipeline_stage(rank: int, world_size: int, num_layers: int) -> Stage:
    """Stage `rank` of `world_size` contiguous stages over `num_layers` blocks, balanced by block count (the first
    `num_layers % world_size` stages hold one block more)."""
    if not 1 <= world_size <= num_layers:
        raise StageError(f"{world_size} stages cannot split {num_layers} blocks (each stage holds at least one)")
    if not 0 <= rank < world_size:
        raise StageError(f"rank {rank} is outside 0..{world_size - 1}")
    size, extra = divmod(num_layers, world_size)
    start = rank * size + min(rank, extra)
    return Stage(range(start, start + size + (rank < extra)), num_layers)


def resolve_stage(stage: Stage | tuple[int, int], num_layers: int) -> Stage:
    """A `Stage`, or (rank, world_size) for `pipeline_stage`, checked against the model's block count."""
    if isinstance(stage, Stage):
        if stage.num_layers != num_layers:
            raise StageError(f"the stage is for a model of {stage.num_layers} blocks, this one has {num_layers}")
        return stage
    if isinstance(stage, tuple) and len(stage) == 2 and all(isinstance(v, int) for v in stage):
        return pipeline_stage(stage[0], stage[1], num_layers)
    raise StageError(f"stage must be a Stage or (rank, world_size), got {stage!r}")


class SlicedStage(SlicedWeights, nn.Module):
    """One pipeline stage of the SliceGPT-form model: the modules of its groups only, under their SliceGPT names,
    running `sliced.forward_blocks` (the one forward) over its blocks.

    forward(x): x is token ids [B, T] on the first stage, else the hidden state [B, T, input_width] the previous
    stage returned; the result is logits [B, T, V] on the last stage, else the hidden state [B, T, output_width]."""

    def __init__(self, desc: ModelDesc, stage: Stage, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        nn.Module.__init__(self)
        self.desc, self.stage, self.dtype, self.device = desc, resolve_stage(stage, desc.num_layers), dtype, device
        with torch.device("meta"):  # allocate nothing: the weights are installed as they come
            build_modules(self, desc, self.stage.layers, embed=self.stage.first, head=self.stage.last)
        self._init_weights_state(desc, dtype, device, self.stage.groups())

    @classmethod
    def empty(cls, desc: ModelDesc, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              *, stage: Stage) -> "SlicedStage":
        return cls(desc, stage, dtype, device)

    @property
    def input_width(self) -> int | None:
        """Width of the hidden state this stage receives (None for the first stage: it takes token ids)."""
        return None if self.stage.first else self.desc.attn_input_dims[self.stage.layers.start]

    @property
    def output_width(self) -> int:
        """Width of what it returns: the sliced width k_c of its last block, or the vocabulary for the last stage."""
        return self.desc.vocab_size if self.stage.last else self.desc.mlp_output_dims[self.stage.layers.stop - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_complete()
        s = self.stage
        if s.first:
            x = stack_of(self).embed_tokens(x)
        elif x.shape[-1] != self.input_width:  # SliceGPT: each boundary has its own width; name it, not a matmul
            raise ModelError(f"blocks {s.layers.start}..{s.layers.stop - 1} take hidden states of width "
                             f"{self.input_width} (block {s.layers.start}'s sliced input), got {x.shape[-1]}")
        h = forward_blocks(self, x, s.layers, first=s.first, last=s.last)
        return logits_of(self, h) if s.last else h


def stage_plan(reader, world_size: int) -> list[dict]:
    """For each rank of `world_size`: its blocks, groups and their stored bytes in `reader`'s file (a BBFReader)."""
    out = []
    for rank in range(world_size):
        s = pipeline_stage(rank, world_size, reader.model.num_layers)
        groups = s.groups()
        deps = [d for g in groups for d in reader.codec.depends(g) if d not in groups]  # SPEC 6 (a tied head)
        out.append({"rank": rank, "layers": [s.layers.start, s.layers.stop], "groups": groups,
                    "also_fetches": deps, "stored_bytes": sum(reader.group_stored_bytes(g) for g in groups + deps)})
    return out


def stage_bytes(source, world_size: int, storage_options: dict | None = None) -> list[int]:
    """Stored bytes each of `world_size` ranks fetches for its stage (`pipeline_stage`), the suffix read at open
    not included. `source`: an open BBFReader, or a path / URL (opened for its index only: one suffix read)."""
    from ..container.reader import BBFReader

    if isinstance(source, BBFReader):
        return [r["stored_bytes"] for r in stage_plan(source, world_size)]
    with BBFReader(source, storage_options) as f:
        return [r["stored_bytes"] for r in stage_plan(f, world_size)]

"""Streaming canonicalisation: one orthogonal rotation per symmetry, applied group by group.

Both symmetry codecs put the model into a canonical form before storing it: `bitsback` with the paper's
Algorithm 1 (eigenvectors of the carrier's Gram matrix), `exact` with a QR factorisation that makes a block of
the carrier triangular. Either way the mechanics are the same and live here:

* groups arrive in push order (embed, layer.0 .. layer.L-1, head);
* when a symmetry's own group arrives, `choose(sym, tensors)` picks its rotation R from the (already partly
  rotated) tensors of that group, and R is applied to every tensor of the group it acts on;
* R is kept until the later groups it also acts on (the next block's q/k/v and attn_shortcut_Q, or the head)
  have arrived and been rotated, then dropped. Memory: one group plus a few k x k matrices.

All arithmetic is float64; callers round to the word dtype once a group is complete.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.arch import ModelDesc, Symmetry, apply_rotation

Chooser = Callable[[Symmetry, dict[str, torch.Tensor]], torch.Tensor]


class StreamingRotator:
    def __init__(self, desc: ModelDesc, choose: Chooser):
        self.desc, self.choose = desc, choose
        self._by_group: dict[str, list[Symmetry]] = {}
        for s in desc.symmetries():
            self._by_group.setdefault(s.group, []).append(s)
        self._pending: list[tuple[Symmetry, torch.Tensor]] = []
        self._rank = {g: i for i, g in enumerate(desc.groups())}
        self._group_of = {t.name: t.group for t in desc.tensors()}
        self.rotations: dict[str, torch.Tensor] = {}  # last rotations chosen (for stats / tests), by symmetry

    def process(self, group: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rotate one group's tensors (name -> tensor) to canonical form; returns float64 tensors."""
        out = {n: t.detach().to(torch.float64) for n, t in tensors.items()}
        names = set(out)
        keep = []
        for sym, R in self._pending:  # rotations chosen in earlier groups that reach this one
            apply_rotation(out, sym, R, only=names)
            if any(a.tensor not in names and self._later(a.tensor, group) for a in sym.actions):
                keep.append((sym, R))
        self._pending = keep
        for sym in self._by_group.get(group, []):
            R = self.choose(sym, out)
            if R is None:
                continue
            apply_rotation(out, sym, R, only=names)
            self.rotations[sym.name] = R
            if any(a.tensor not in names for a in sym.actions):
                self._pending.append((sym, R))
        return out

    def _later(self, tensor: str, group: str) -> bool:
        return self._rank[self._group_of[tensor]] > self._rank[group]

"""Streaming canonicalisation: one orthogonal rotation per symmetry, applied group by group.

Both symmetry codecs put the model into a canonical form before storing it: `bitsback` with the paper's
Algorithm 1 (eigenvectors of the carrier's Gram matrix), `exact` with a QR factorisation that makes a block of
the carrier triangular. Either way the mechanics are the same and live here:

* groups arrive in push order (embed, layer.0 .. layer.L-1, head);
* when a symmetry's own group arrives, `choose(sym, tensors)` picks its rotation R from the (already partly
  rotated) tensors of that group, and R is applied to every tensor of the group it acts on;
* R is kept until the later groups it also acts on (the next block's q/k/v and attn_shortcut_Q, or the head)
  have arrived and been rotated, then dropped.

All arithmetic is float64; callers round to the word dtype once a group is complete.

Memory. `plan(group, tensors)` chooses the group's rotations while converting to float64 only the tensors the
choosers read (the carriers); every other tensor keeps its input dtype and its list of rotations, and `chunks()`
rotates it a slab of rows (or columns) at a time, so a caller that rounds each slab at once holds one slab of
float64, not the group. `process()` (everything in float64 at once) is `plan` + `materialize` of every tensor.
A slab's product is the same float64 product as the whole tensor's, row by row (or column by column).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..models.arch import ModelDesc, Symmetry, apply_rotation

Chooser = Callable[[Symmetry, "GroupRotations"], "torch.Tensor | None"]

SLAB_ELEMENTS = 1 << 23  # float64 elements per slab of `chunks` (64 MB): GEMMs this large run at full speed


class GroupRotations:
    """One group's tensors (name -> input tensor) and the rotations each still has to receive, in order.

    `tensors[name]` (a chooser's read) converts that tensor to float64 with its rotations so far and keeps it;
    later rotations then apply to it at once. Other tensors are rotated only when `chunks()` or `materialize()`
    asks for them."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.inputs = dict(tensors)
        self.ops: dict[str, list[tuple[Symmetry, torch.Tensor]]] = {n: [] for n in tensors}
        self._f64: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.inputs

    def __iter__(self):
        return iter(self.inputs)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._f64:
            self._f64[name] = self.materialize(name)
        return self._f64[name]

    def rotate(self, sym: Symmetry, R: torch.Tensor) -> None:
        """R reaches every tensor of this group that `sym` acts on."""
        for a in sym.actions:
            if a.tensor not in self.inputs:
                continue
            if a.tensor in self._f64:
                apply_rotation(self._f64, sym, R, only={a.tensor})
            else:
                self.ops[a.tensor].append((sym, R))

    def materialize(self, name: str) -> torch.Tensor:
        """The whole tensor in float64 with every rotation so far (what `process` returns)."""
        if name in self._f64:
            return self._f64[name]
        out = {name: self.inputs[name].detach().to(torch.float64)}
        for sym, R in self.ops[name]:
            apply_rotation(out, sym, R, only={name})
        return out[name]

    def chunks(self, name: str) -> Iterator[tuple[slice, int, torch.Tensor]]:
        """(index, axis, float64 slab) covering the rotated tensor: rows (axis 0) or columns (axis 1) `index`.

        A 2-D tensor with a single rotation is cut across the axis the rotation does not mix; anything else
        (a chooser's carrier, several rotations, 1-D) comes whole."""
        x = self.inputs[name]
        ops = self.ops[name]
        if name in self._f64 or x.dim() != 2 or len(ops) > 1 or x.numel() <= SLAB_ELEMENTS:
            yield slice(None), 0, self.materialize(name)
            return
        mixed = ops[0][0].action(name).axis if ops else None
        axis = 1 if mixed == 0 else 0  # W <- R^T W mixes rows: cut columns; W <- W R (or nothing): cut rows
        step = max(1, SLAB_ELEMENTS // x.shape[1 - axis])
        for a in range(0, x.shape[axis], step):
            idx = slice(a, min(a + step, x.shape[axis]))
            part = {name: (x[idx] if axis == 0 else x[:, idx]).detach().to(torch.float64)}
            for sym, R in ops:
                apply_rotation(part, sym, R, only={name})
            yield idx, axis, part[name]


class StreamingRotator:
    def __init__(self, desc: ModelDesc, choose: Chooser):
        self.desc, self.choose = desc, choose
        self._by_group: dict[str, list[Symmetry]] = {}
        for s in desc.symmetries():
            self._by_group.setdefault(s.group, []).append(s)
        self._pending: list[tuple[Symmetry, torch.Tensor]] = []
        self._rank = {g: i for i, g in enumerate(desc.groups())}
        self._group_of = {t.name: t.group for t in desc.tensors()}
        # the rotations chosen in the last group, by symmetry (stats / tests); only that group's: a 7B model's 64
        # rotations would be 4.8 GB
        self.rotations: dict[str, torch.Tensor] = {}

    def process(self, group: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rotate one group's tensors (name -> tensor) to canonical form; returns float64 tensors."""
        plan = self.plan(group, tensors)
        return {n: plan.materialize(n) for n in tensors}

    def plan(self, group: str, tensors: dict[str, torch.Tensor]) -> GroupRotations:
        """Choose this group's rotations; the tensors are rotated when the returned plan is read."""
        plan = GroupRotations(tensors)
        self.rotations = {}
        keep = []
        for sym, R in self._pending:  # rotations chosen in earlier groups that reach this one
            plan.rotate(sym, R)
            if any(a.tensor not in plan and self._later(a.tensor, group) for a in sym.actions):
                keep.append((sym, R))
        self._pending = keep
        for sym in self._by_group.get(group, []):
            R = self.choose(sym, plan)
            if R is None:
                continue
            plan.rotate(sym, R)
            self.rotations[sym.name] = R
            if any(a.tensor not in plan for a in sym.actions):
                self._pending.append((sym, R))
        return plan

    def _later(self, tensor: str, group: str) -> bool:
        return self._rank[self._group_of[tensor]] > self._rank[group]

"""Codec `exact`: remove each rotational symmetry's k(k-1)/2 degrees of freedom with no numerical error.

For every symmetry (size k) one tensor it acts on, its *carrier*, is put into a canonical form: the rotation
R = Q of a QR factorisation (positive diagonal) makes a k x k block of the carrier triangular, and R is applied
to every tensor of the symmetry (StreamingRotator). The block's k(k-1)/2 structural zeros are not stored.
Decoding is reading: the zeros are put back, nothing is computed, and every group decodes on its own.

Carrier blocks (normative text: SPEC.md section 12, "Codec exact"):
  * axis 1 (W <- W R, W has shape (n, k)): k rows B = W[s:s+k, :] become LOWER triangular (s = 0, except the
    embeddings: the middle of the vocabulary); QR of B^T: B^T = Q T  =>  B Q = T^T.
  * axis 0 (W <- R^T W, W has shape (k, n)): the first k columns W[:, :k] become UPPER triangular;
    QR of A = W[:, :k]: A = Q T  =>  Q^T A = T.
Stored form of a carrier: the triangle's non-zero part row by row (row r: L[r, :r+1] or T[r, r:]), then the rest
of the tensor row-major (W[:s] and W[s+k:] for axis 1, W[:, k:] for axis 0). Every other tensor is stored row-major.

Everything is rotated in float64 and rounded to the word dtype once, after every rotation that reaches it; the
structural zeros are +0.0, so they are exactly the zero word. The encoder converts to float64 only the carriers'
blocks up front and every other tensor one slab at a time, rounding each slab at once (canonical.GroupRotations):
its memory is the group's input and words plus a few 64 MB slabs, not the group in float64. Input words whose low
mantissa bits are all zero (float16 values in float32 words) keep them: the rounding is to that grid (SPEC 12.5).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import kernels
from ..errors import BBFError, FormatError, ModelError
from ..grid import MANTISSA_BITS, round_to_grid, zero_mantissa_bits
from ..models.arch import ModelDesc, Symmetry
from ..words import to_words, torch_dtype, word_bits, word_np_dtype
from .base import (Codec, EncodedGroup, GroupDecoder, GroupEncoder, SectionData, Segment, new_bytes,
                   register_codec)
from .canonical import GroupRotations, StreamingRotator

# Carrier candidates per kind of symmetry, by role, best first; the first eligible one (see `carriers`) is the
# carrier. Shortcuts first: their rows have norm <= 1 (slices of products of orthonormal bases), so the triangle
# cannot overflow any dtype, and their blocks are well conditioned (SmolLM2 25%: median cond 3 / 15 against
# ~4e3 for o_proj / down_proj), which keeps the canonical form reproducible (it does not depend on rounding noise).
# Sizes after the entropy stage differ by < 0.1% between choices (SPEC.md, 12.4).
PREFERENCE = {
    "emb": ("embed_tokens", "embed_positions"),
    "mid": ("attn_sc", "o", "gate", "up"),
    "out": ("mlp_sc", "down"),
}


@dataclass(frozen=True)
class Carrier:
    symmetry: str
    tensor: str
    axis: int  # the symmetry's axis on the carrier: 1 -> k rows lower triangular, 0 -> first k cols upper
    k: int
    shape: tuple[int, int]
    start: int = 0  # axis 1: first row of the block (the embeddings use a middle window, see `carriers`)

    @property
    def zeros(self) -> int:
        return self.k * (self.k - 1) // 2

    @property
    def rest_shape(self) -> tuple[int, int]:
        n0, n1 = self.shape
        return (n0 - self.k, n1) if self.axis == 1 else (n0, n1 - self.k)

    def triangle_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) of the stored triangle entries inside the k x k block, in storage (row-major) order."""
        return np.tril_indices(self.k) if self.axis == 1 else np.triu_indices(self.k)

    def block(self, w):
        """The k x k block of a carrier-shaped array (a view)."""
        return w[self.start:self.start + self.k, :] if self.axis == 1 else w[:, :self.k]

    def rest(self, w) -> list:
        """The parts of the tensor outside the block, in storage order (views)."""
        if self.axis == 1:
            return [w[:self.start, :], w[self.start + self.k:, :]]
        return [w[:, self.k:]]


def _candidates(desc: ModelDesc, sym: Symmetry) -> list[str]:
    kind, _, idx = sym.name.partition(".")
    if kind == "emb":
        names = {n.rsplit(".", 2)[-2]: n for n in desc.embed_names()}
    else:
        names = desc.layer_names(int(idx))
    return [names[r] for r in PREFERENCE[kind] if r in names]


def carriers(desc: ModelDesc) -> dict[str, Carrier]:
    """Symmetry name -> its carrier: the first candidate that is 2-D, in the symmetry's own group, long enough
    (>= k rows for axis 1, >= k columns for axis 0) and not acted on by any later symmetry (which would undo the
    triangle). A symmetry with no eligible candidate has no carrier and is left as it is.

    The embeddings' block is the k rows in the middle of the vocabulary: vocabularies put special, reserved and
    padding tokens first or last, and untrained ones often share one row (SmolLM2's first 432 rows have rank 425),
    which would make the canonical form depend on rounding noise (it changes with the BLAS thread count)."""
    syms = desc.symmetries()
    info = desc.tensor_map()
    out: dict[str, Carrier] = {}
    last = {a.tensor: i for i, s in enumerate(syms) for a in s.actions}  # the last symmetry acting on each tensor
    for i, sym in enumerate(syms):
        for name in _candidates(desc, sym):
            t, axis = info[name], sym.action(name).axis
            if len(t.shape) != 2 or t.group != sym.group or last[name] > i:
                continue
            if t.shape[axis] != sym.size or t.shape[1 - axis] < sym.size:
                continue
            start = (t.shape[0] - sym.size) // 2 if sym.name == "emb" else 0
            out[sym.name] = Carrier(sym.name, name, axis, sym.size, t.shape, start)
            break
    return out


def triangular_rotation(carrier: Carrier, w: torch.Tensor) -> torch.Tensor:
    """The orthogonal R (float64) that makes the carrier's block triangular with a non-negative diagonal."""
    return block_rotation(carrier, carrier.block(w))


def block_rotation(carrier: Carrier, block: torch.Tensor) -> torch.Tensor:
    """`triangular_rotation` from the carrier's k x k block alone."""
    a = block if carrier.axis == 0 else block.T
    with _one_thread():
        q, t = torch.linalg.qr(a.to(torch.float64))
    sign = torch.where(torch.diagonal(t) < 0, -1.0, 1.0).to(torch.float64)
    return q * sign


def _input_grid(dtype: str, inputs: list[torch.Tensor]) -> int:
    """Low mantissa bits zero in every input word of a group (SPEC 12.5): the canonical words are rounded to the
    same grid, else the rotations fill those bits with noise the entropy stage cannot compress. 0 when no word
    has a mantissa bit set (a group of zeros and powers of two says nothing about a grid)."""
    bits = min((zero_mantissa_bits(to_words(x, dtype), dtype) for x in inputs), default=0)
    return 0 if bits >= MANTISSA_BITS[dtype] else bits


@contextlib.contextmanager
def _one_thread():
    """Householder QR on one thread: its panel steps synchronise the threads thousands of times, so on busy cores
    two threads are 4-5x SLOWER than one (k = 3072: 21-26 s against 4.5-5 s, load 6 on 2 cores); one thread
    also makes the factorisation independent of the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _zero_structural(carrier: Carrier, w: torch.Tensor) -> None:
    """Set the block's strictly upper (axis 1) / lower (axis 0) part to exactly +0.0 (rotation leaves ~1e-17)."""
    b = carrier.block(w)
    b.copy_(torch.tril(b) if carrier.axis == 1 else torch.triu(b))


def _zero_structural_words(carrier: Carrier, w: np.ndarray) -> None:
    """`_zero_structural` on words: +0.0 is the zero word in every dtype (row by row: no k^2 index arrays)."""
    b = carrier.block(w)
    for r in range(carrier.k):
        if carrier.axis == 1:
            b[r, r + 1:] = 0
        else:
            b[r, :r] = 0


def _put_carrier(carrier: Carrier, words: np.ndarray, out: np.ndarray) -> None:
    """A carrier's stored form (packed triangle, then the rest, SPEC 12.3) into `out` (1-D, its exact size)."""
    b, pos = carrier.block(words), 0
    for r in range(carrier.k):
        row = b[r, :r + 1] if carrier.axis == 1 else b[r, r:]
        out[pos:pos + row.size] = row
        pos += row.size
    for part in carrier.rest(words):
        out[pos:pos + part.size].reshape(part.shape)[...] = part
        pos += part.size
    assert pos == out.size


_EXP_MASK = {np.dtype("float16"): 0x7C00, np.dtype("float32"): 0x7F800000, np.dtype("float64"): 0x7FF << 52}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _all_finite(x: torch.Tensor) -> bool:
    """No inf/nan: an exponent-field test on the bits (one cheap pass; torch.isfinite on half is 10x slower)."""
    if x.dtype == torch.bfloat16:
        bits, mask = x.detach().contiguous().view(torch.int16).numpy().view(np.uint16), 0x7F80
    elif x.dtype in (torch.float16, torch.float32, torch.float64):
        a = x.detach().contiguous().numpy()
        bits, mask = a.view(_UINT[a.itemsize]), _EXP_MASK[a.dtype]
    else:
        return bool(torch.isfinite(x).all())
    return not np.any((bits & bits.dtype.type(mask)) == mask)


def _finite_words(words: np.ndarray, dtype: str) -> bool:
    mask = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000}[dtype]
    return not np.any((words & words.dtype.type(mask)) == mask)


def _fill_block(carrier: Carrier, w: np.ndarray, tri: np.ndarray) -> None:
    """Write a carrier's k x k block into `w` (its words, contiguous) from the stored triangle, zeros included."""
    n1 = carrier.shape[1]
    kernels.triangle(w, carrier.start * n1 if carrier.axis == 1 else 0, n1, carrier.k, carrier.axis == 1, tri)


def canonical_form(desc: ModelDesc, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole model in this codec's canonical form, in float64, before any rounding.

    The slicer applies it before its one cast to the output dtype. The structural zeros then survive any rounding
    and the diagonals stay non-negative, so the encoder's QR factorisations are identities and an `exact` file
    holds the sliced model's words bit for bit (no second rounding)."""
    by_name = carriers(desc)
    rot = StreamingRotator(desc, lambda sym, t: None if sym.name not in by_name
                           else triangular_rotation(by_name[sym.name], t[by_name[sym.name].tensor]))
    out: dict[str, torch.Tensor] = {}
    for group in desc.groups():
        canon = rot.process(group, {t.name: tensors[t.name] for t in desc.group_tensors(group)})
        for c in by_name.values():
            if c.tensor in canon:
                _zero_structural(c, canon[c.tensor])
        out.update(canon)
    return out


class _Layout:
    """Where each tensor of a group sits in the payload (words saved = the carriers' zeros)."""

    def __init__(self, desc: ModelDesc, group: str, by_tensor: dict[str, Carrier]):
        self.tensors = desc.group_tensors(group)
        self.carriers = {t.name: by_tensor[t.name] for t in self.tensors if t.name in by_tensor}
        self.numel = sum(t.numel for t in self.tensors)
        self.saved = sum(c.zeros for c in self.carriers.values())
        self.payload_words = self.numel - self.saved

    def segments(self) -> tuple[Segment, ...]:
        segs, off = [], 0
        for t in self.tensors:
            c = self.carriers.get(t.name)
            if c is not None:
                off += c.k * (c.k + 1) // 2  # the packed triangle is not a rectangle: left to 1-D modelling
                rows, cols = c.rest_shape
                if rows and cols:
                    segs.append(Segment(off, rows, cols))
                off += rows * cols
                continue
            if len(t.shape) == 2:
                segs.append(Segment(off, t.shape[0], t.shape[1]))
            off += t.numel
        return tuple(segs)


class _ExactEncoder(GroupEncoder):
    def __init__(self, codec: "ExactCodec", desc: ModelDesc, dtype: str):
        self.codec, self.desc, self.dtype = codec, desc, dtype
        self.carriers = carriers(desc)
        self.by_tensor = {c.tensor: c for c in self.carriers.values()}
        self.rotator = StreamingRotator(desc, self._choose)
        self.saved = 0  # words not stored, over the groups encoded so far

    def _choose(self, sym: Symmetry, plan: GroupRotations) -> torch.Tensor | None:
        c = self.carriers.get(sym.name)
        if c is None:
            return None
        if c.axis == 1 and not plan.ops[c.tensor]:  # unrotated so far (the embeddings): read its block only
            return block_rotation(c, plan.inputs[c.tensor][c.start:c.start + c.k].to(torch.float64))
        return triangular_rotation(c, plan[c.tensor])

    def encode(self, group: str, tensors: dict[str, torch.Tensor]) -> EncodedGroup:
        layout = _Layout(self.desc, group, self.by_tensor)
        for t in layout.tensors:
            x = tensors.get(t.name)
            if x is None:
                raise ModelError(f"group {group}: tensor {t.name!r} is missing")
            if tuple(x.shape) != t.shape:
                raise ModelError(f"tensor {t.name!r} has shape {tuple(x.shape)}, expected {t.shape}")
            if not _all_finite(x):
                raise ModelError(f"tensor {t.name!r} has inf/nan weights; codec 'exact' needs finite ones (use raw)")
        grid = _input_grid(self.dtype, [tensors[t.name] for t in layout.tensors])
        plan = self.rotator.plan(group, {t.name: tensors[t.name] for t in layout.tensors})
        wd = word_np_dtype(self.dtype)
        payload = np.empty(layout.payload_words, wd)
        words, off = {}, 0
        for t in layout.tensors:
            c = layout.carriers.get(t.name)
            stored = t.numel - (c.zeros if c is not None else 0)
            # a plain tensor's words are its part of the payload; a carrier's are rearranged into it afterwards
            w = np.empty(t.shape, wd) if c is not None else payload[off:off + stored].reshape(t.shape)
            for idx, axis, slab in plan.chunks(t.name):
                rounded = to_words(slab, self.dtype)  # the one rounding of these weights
                if not _finite_words(rounded, self.dtype):
                    raise BBFError(f"tensor {t.name!r} overflows {self.dtype} after canonical rotation; "
                                   f"use a wider dtype or codec raw")
                (w[idx] if axis == 0 else w[:, idx])[...] = round_to_grid(rounded, self.dtype, grid)
                del slab, rounded
            if c is not None:
                _zero_structural_words(c, w)
                _put_carrier(c, w, payload[off:off + stored])
            words[t.name] = w
            off += stored
        assert off == layout.payload_words
        self.saved += layout.saved
        kinds = self.codec.sections_for(group)
        # the payload's own memory as bytes (no copy: at 70B the embeddings' payload alone is 1.6 GB)
        sections = [SectionData(kinds[0], payload.view(np.uint8).data, payload.dtype.itemsize, layout.segments())]
        sections += [SectionData(k, b"", 1) for k in kinds[1:]]  # empty correction section: nothing to correct
        stats = {"saved_words": layout.saved, "carriers": {c.symmetry: c.tensor for c in layout.carriers.values()}}
        if grid:
            stats["grid_zero_bits"] = grid
        return EncodedGroup(sections, words, stats)

    def finish(self) -> dict:
        return {"saved_words": self.saved}


class _ExactDecoder(GroupDecoder):
    def __init__(self, codec: "ExactCodec", desc: ModelDesc, dtype: str):
        self.codec, self.desc, self.dtype = codec, desc, dtype
        self.by_tensor = {c.tensor: c for c in carriers(desc).values()}
        self._layouts: dict[str, _Layout] = {}

    def _layout(self, group: str) -> _Layout:
        """The group's layout, computed once."""
        if group not in self._layouts:
            self._layouts[group] = _Layout(self.desc, group, self.by_tensor)
        return self._layouts[group]

    def decode(self, group: str, sections: dict[str, bytes]) -> np.ndarray:
        tensors = self.decode_tensors(group, sections)
        parts = [tensors[t.name].reshape(-1) for t in self._layout(group).tensors]
        return np.concatenate(parts) if parts else np.zeros(0, word_np_dtype(self.dtype))

    def payload_room(self, group: str, kind: str) -> int:
        """Words of room before the payload: the group's structural zeros. Every tensor then moves down (or stays)
        into its final place in the same buffer, so a group decodes into exactly its own size (a copy per
        carrier would leave its stored part unused: 0.6 GB over a whole 7B model)."""
        return self._layout(group).saved if kind == self.codec.sections_for(group)[0] else 0

    def decode_tensors(self, group: str, sections: dict[str, bytes], rooms: dict[str, np.ndarray] | None = None,
                       alloc=None) -> dict[str, np.ndarray]:
        """Every tensor but a carrier is a view of the payload; a carrier gets its structural zeros back."""
        layout = self._layout(group)
        kind = self.codec.sections_for(group)[0]
        wd = word_np_dtype(self.dtype)
        data = sections.get(kind)
        if data is None:
            raise FormatError(f"group {group}: codec 'exact' needs its {kind!r} section")
        if len(data) != layout.payload_words * wd.itemsize:
            raise FormatError(f"group {group}: {kind} section has {len(data)} bytes, expected "
                              f"{layout.payload_words * wd.itemsize}")
        if any(len(sections.get(k) or b"") for k in self.codec.sections_for(group)[1:]):
            raise FormatError(f"group {group}: codec 'exact' has no corrections, but the correction section "
                              f"is not empty")
        payload = np.frombuffer(data, dtype=wd)
        room = (rooms or {}).get(kind)
        if room is not None and room.size == layout.numel and room.dtype == wd:
            return _rebuild_in_place(layout, room)
        out, src = {}, 0
        for t in layout.tensors:
            c = layout.carriers.get(t.name)
            if c is None:
                out[t.name] = payload[src:src + t.numel].reshape(t.shape)
                src += t.numel
                continue
            w = out[t.name] = (alloc or new_bytes)(t.numel * wd.itemsize).view(wd).reshape(t.shape)
            ntri = c.k * (c.k + 1) // 2
            _fill_block(c, w, payload[src:src + ntri])  # structural zeros are the zero word
            src += ntri
            for part in c.rest(w):
                part[...] = payload[src:src + part.size].reshape(part.shape)
                src += part.size
        return out


def _move_down(buf: np.ndarray, src: int, dst: int, n: int) -> None:
    """buf[dst:dst + n] = buf[src:src + n] for dst <= src, front to back in chunks of at least 2^20 words (numpy
    buffers a chunk that overlaps its source, so a short distance costs neither a word-by-word loop nor a
    tensor-sized temporary)."""
    assert src >= dst, "a tensor never moves up"
    if src == dst or n == 0:
        return
    step = max(src - dst, 1 << 20)
    for a in range(0, n, step):
        b = min(n, a + step)
        buf[dst + a:dst + b] = buf[src + a:src + b]


def _rebuild_in_place(layout: _Layout, buf: np.ndarray) -> dict[str, np.ndarray]:
    """buf = [Z words of room | the payload] (Z = the group's structural zeros) -> the group's words, in place.

    Tensor t is stored at S_t = F_t + Z - (zeros of the carriers before t) >= F_t, its final offset, so the tensors
    move down in order and no move overwrites bytes not yet moved. A carrier's triangle is copied out first (it is
    small: k(k+1)/2 words), its other rows move down, then its block is filled (SPEC 12.3)."""
    out, final, src = {}, 0, layout.saved
    for t in layout.tensors:
        c = layout.carriers.get(t.name)
        if c is None:
            _move_down(buf, src, final, t.numel)
            src += t.numel
        else:
            k, n1 = c.k, c.shape[1]
            ntri = k * (k + 1) // 2
            tri = buf[src:src + ntri].copy()
            src += ntri
            if c.axis == 1:  # rows outside the block: W[:s], then W[s + k:]
                head, tail = c.start * n1, (c.shape[0] - c.start - k) * n1
                _move_down(buf, src, final, head)
                _move_down(buf, src + head, final + head + k * n1, tail)
                src += head + tail
            else:  # row r: the block's row r (filled below), then W[r, k:]
                rest = n1 - k
                for r in range(c.shape[0]):
                    _move_down(buf, src + r * rest, final + r * n1 + k, rest)
                src += c.shape[0] * rest
            _fill_block(c, buf[final:final + t.numel], tri)
        out[t.name] = buf[final:final + t.numel].reshape(t.shape)
        final += t.numel
    assert src == layout.numel and final == layout.numel
    return out


@register_codec
class ExactCodec(Codec):
    id = "exact"

    def symmetries_removed(self, desc):
        with_carrier = carriers(desc)
        return [s for s in desc.symmetries() if s.name in with_carrier]

    def section_specs(self, desc, dtype):
        """Every group's first section holds its payload: the group's words less its carriers' structural zeros."""
        by_tensor = {c.tensor: c for c in carriers(desc).values()}
        return {g: self._specs(g, _Layout(desc, g, by_tensor).payload_words, word_bits(dtype) // 8)
                for g in desc.groups()}

    def encoder(self, desc, dtype):
        return _ExactEncoder(self, desc, dtype)

    def decoder(self, desc, dtype):
        return _ExactDecoder(self, desc, dtype)

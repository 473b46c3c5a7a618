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

Tied head (parameter `tied_head`, SPEC.md 12.6). When the source model tied its head to its embeddings, SliceGPT's
untied copy repeats them: embed = E C Q_emb[:, :n] and head = E diag(g) Q_L are two linear views of one matrix E, so
embed = head M for a d x n matrix M. The two symmetries at the ends (`emb`, `out.L-1`) are then spent on making M
diagonal instead of on triangles: with M = U S V^T, R_emb = V and R_L = [U | U_perp] give embed'[:, j] =
s_j head'[:, j], and the head's first n columns are stored as small residuals against embed'[:, j] * c_j
(c_j ~ 1/s_j): ~3.5 bits per word after the entropy stage instead of ~10.5 (bfloat16) or ~13.5 (float16). The
head then decodes from its own section and the embeddings (the one group dependency of this version, SPEC 6).

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
from ..words import to_words, torch_dtype, word_bits, word_np_dtype, words_to_f64
from .base import (Codec, EncodedGroup, GroupDecoder, GroupEncoder, SectionData, SectionSpec, Segment, new_bytes,
                   register_codec)
from .canonical import SLAB_ELEMENTS, GroupRotations, StreamingRotator

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


def carriers(desc: ModelDesc, tied: bool = False) -> dict[str, Carrier]:
    """Symmetry name -> its carrier: the first candidate that is 2-D, in the symmetry's own group, long enough
    (>= k rows for axis 1, >= k columns for axis 0) and not acted on by any later symmetry (which would undo the
    triangle). A symmetry with no eligible candidate has no carrier and is left as it is.

    The embeddings' block is the k rows in the middle of the vocabulary: vocabularies put special, reserved and
    padding tokens first or last, and untrained ones often share one row (SmolLM2's first 432 rows have rank 425),
    which would make the canonical form depend on rounding noise (it changes with the BLAS thread count).
    `tied`: the tied-head form (SPEC 12.6), where `emb` and `out.L-1` have no carrier (their rotations align the
    head with the embeddings)."""
    return dict(desc.memo(f"carriers.{bool(tied)}", lambda: _find_carriers(desc, tied)))


def _find_carriers(desc: ModelDesc, tied: bool) -> dict[str, Carrier]:
    syms = desc.symmetries()
    if tied:
        syms = [s for s in syms if s.name not in tied_symmetries(desc)]
    info = desc.tensor_map()
    out: dict[str, Carrier] = {}
    last = {a.tensor: i for i, s in enumerate(desc.symmetries()) for a in s.actions}  # last symmetry on each tensor
    rank = {s.name: i for i, s in enumerate(desc.symmetries())}
    for sym in syms:
        i = rank[sym.name]
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

# ---------------------------------------------------------------------------------------------------------------
# Tied head (SPEC 12.6)

EMBED_TOKENS = {"llama": "model.embed_tokens.weight", "opt": "model.decoder.embed_tokens.weight"}
HEAD = "lm_head.weight"
# The tied form is used when the embeddings follow from the head within this relative RMS error. A tied source
# gives the rounding noise of its dtype (SmolLM2 25 %: 0.0023 in bfloat16, 0.0003 in float16); an untied one ~1.
TIE_TOLERANCE = 1 / 32


def tied_symmetries(desc: ModelDesc) -> tuple[str, str]:
    return "emb", f"out.{desc.num_layers - 1}"


def tie_possible(desc: ModelDesc) -> bool:
    """Whether the shapes allow the tied form: the head has at least as many columns as the token embeddings."""
    return desc.embedding_dims[0] <= desc.mlp_output_dims[-1]


def tied_columns(desc: ModelDesc) -> int:
    """n: the head's columns predicted from the embeddings (all of the token embeddings' columns)."""
    return desc.embedding_dims[0]


def _sign_fix(m: torch.Tensor) -> torch.Tensor:
    """+1/-1 per column of m: its entry of largest magnitude becomes positive (a deterministic sign)."""
    idx = m.abs().argmax(0)
    return torch.where(m[idx, torch.arange(m.shape[1])] < 0, -1.0, 1.0).to(m.dtype)


def _row_slabs(rows: int, cols: int):
    """Row ranges of about SLAB_ELEMENTS elements: the tied form's sums hold one slab in float64, not a tensor
    (a 3B model's head is 3 GB of float64)."""
    step = max(1, SLAB_ELEMENTS // max(cols, 1))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def fit_tie(embed: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(R_emb, R_L, relative RMS error of embed ~ head M): the rotations of the tied form (float64).

    M by least squares (normal equations, summed over row slabs: one V x d x d product, no V x d x n one);
    M = U S V^T; R_emb = V and R_L = [U | U_perp], signs fixed so that each column of V has its largest entry
    positive. U_perp (the head's d - n directions the embeddings do not see) is made canonical too: the principal
    axes of head U_perp, in descending order, each with its largest entry positive."""
    n, d = embed.shape[1], head.shape[1]
    G = torch.zeros(d, d, dtype=torch.float64)
    B = torch.zeros(d, n, dtype=torch.float64)
    e2 = 0.0
    for rows in _row_slabs(head.shape[0], d + n):
        E, H = embed[rows].detach().to(torch.float64), head[rows].detach().to(torch.float64)
        G += H.T @ H
        B += H.T @ E
        e2 += float((E * E).sum())
    with _one_thread():  # (the factorisations: independent of the thread count; the products above use them all)
        try:
            M = torch.linalg.solve(G, B)
        except RuntimeError:  # a singular head (e.g. all zeros): not a tie this form can use
            return None, None, float("inf")
        U, _, Vh = torch.linalg.svd(M, full_matrices=True)
    resid = e2 - 2 * float((M * B).sum()) + float((M * (G @ M)).sum())
    rel = (max(resid, 0.0) / e2) ** 0.5 if e2 > 0 else float("inf")
    V = Vh.T
    sign = _sign_fix(V)
    V, U = V * sign, torch.cat([U[:, :n] * sign, U[:, n:]], 1)
    if d > n:
        P = U[:, n:]
        with _one_thread():
            ev, W = torch.linalg.eigh(P.T @ G @ P)
        W = W.flip(1)
        U = torch.cat([U[:, :n], P @ (W * _sign_fix(W))], 1)
    return V, U, rel


def tie_rotations(desc: ModelDesc, embed: torch.Tensor, head: torch.Tensor) -> tuple[dict | None, float]:
    """({symmetry: rotation} of the tied form, or None when the embeddings do not follow from the head within
    TIE_TOLERANCE; the fit's relative error)."""
    r_emb, r_out, err = fit_tie(embed, head)
    return (dict(zip(tied_symmetries(desc), (r_emb, r_out))) if err <= TIE_TOLERANCE else None), err


def _column_sums(e, h, to_f64) -> tuple:
    """Per column: sum e^2, sum e h, sum h^2 (float64, over row slabs)."""
    sums = None
    for rows in _row_slabs(e.shape[0], 2 * e.shape[1]):
        a, b = to_f64(e[rows]), to_f64(h[rows])
        part = ((a * a).sum(0), (a * b).sum(0), (b * b).sum(0))
        sums = part if sums is None else tuple(x + y for x, y in zip(sums, part))
    return sums


def aligned(embed: torch.Tensor, head: torch.Tensor) -> float:
    """Relative RMS error of head[:, :n] ~ embed * c (c per column, least squares): small when the input already
    is in the tied form (the slicer's output, or a file decoded and encoded again)."""
    ee, eh, hh = _column_sums(embed, head[:, :embed.shape[1]], lambda x: x.detach().to(torch.float64))
    resid = float((hh - torch.where(ee > 0, eh * eh / torch.where(ee > 0, ee, 1), 0)).sum())
    total = float(hh.sum())
    return (max(resid, 0.0) / total) ** 0.5 if total > 0 else float("inf")


def tied_scales(e: np.ndarray, h: np.ndarray, dtype: str) -> np.ndarray:
    """c (float32): per column, the least-squares factor of h ~ c e, for words e and h."""
    ee, eh, _ = _column_sums(e, h, lambda w: words_to_f64(np.ascontiguousarray(w), dtype))
    return np.where(ee > 0, eh / np.where(ee > 0, ee, 1), 0).astype(np.float32)


def tied_prediction(e: np.ndarray, c: np.ndarray, dtype: str) -> np.ndarray:
    """The predicted words of SPEC 12.6 (with the decoder's kernel where compiled: same words as the reference)."""
    if not kernels.COMPILED:
        return kernels.tied_predict(e, c, dtype)
    out = np.empty(e.shape, e.dtype)
    kernels.tied_restore(out, e, c, bytes((e.size + 1) // 2), b"", np.zeros((e.shape[0], 0), e.dtype), dtype)
    return out


def c_words(n: int, ws: int) -> int:
    """Words the n float32 scales take at the front of the head's payload."""
    return n * 4 // ws


def residual_bytes(v: int, n: int, ws: int) -> tuple[int, int]:
    """(least, most) raw bytes of the tied head's correction section: V x n nibbles, then 0 .. V x n escapes."""
    nib = (v * n + 1) // 2
    return nib, nib + v * n * ws


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
    holds the sliced model's words bit for bit (no second rounding). A tied source (`tie_word_embeddings`) gets
    the tied form (SPEC 12.6), which the encoder then keeps as it is (`aligned`)."""
    tie = {}
    if desc.tie_word_embeddings and tie_possible(desc):
        tie = tie_rotations(desc, tensors[EMBED_TOKENS[desc.family]], tensors[HEAD])[0] or {}
    by_name = carriers(desc, bool(tie))
    rot = StreamingRotator(desc, lambda sym, t: tie[sym.name] if sym.name in tie else None if sym.name not in by_name
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
    """Where each tensor of a group sits in the payload (words saved = the carriers' zeros). `tied_n` > 0: the
    tied head's group (SPEC 12.6): its payload is the scales, then the head's columns n.., then the bias; the
    residuals of its first n columns are the correction section."""

    def __init__(self, desc: ModelDesc, group: str, by_tensor: dict[str, Carrier], tied_n: int = 0, ws: int = 2):
        self.tensors = desc.group_tensors(group)
        self.carriers = {t.name: by_tensor[t.name] for t in self.tensors if t.name in by_tensor}
        self.numel = sum(t.numel for t in self.tensors)
        self.saved = sum(c.zeros for c in self.carriers.values())
        self.tied_n = tied_n if group == "head" else 0
        self.scale_words = c_words(self.tied_n, ws)
        self.residuals = self.tensors[0].shape[0] * self.tied_n  # V x n (the head is the group's first tensor)
        self.payload_words = self.numel - self.saved + self.scale_words - self.residuals

    def segments(self) -> tuple[Segment, ...]:
        if self.tied_n:  # scales (a run), the head's columns n.. (V x (d - n)), the bias (a run)
            (v, d), n = self.tensors[0].shape, self.tied_n
            return (Segment(self.scale_words, v, d - n),) if d > n else ()
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
        self._set_form(bool(codec.tied_head))
        self.rotator = StreamingRotator(desc, self._choose)
        self.saved = 0  # words not stored, over the groups encoded so far
        self._head_input = None  # the head, given ahead of the embeddings (tied form: `ahead`)
        self._tie: dict[str, torch.Tensor] = {}  # the tied form's two rotations, by symmetry
        self._tied_embed = None  # the canonical token embeddings' words, kept for the head
        self.tie_error = None

    def _set_form(self, tied: bool) -> None:
        self.tied = tied
        self.carriers = carriers(self.desc, tied)
        self.by_tensor = {c.tensor: c for c in self.carriers.values()}

    def wants_ahead(self) -> tuple[str, ...]:
        """The head, with the embeddings, when the tied form may apply: `tied_head` True, or unset (auto) and the
        source model tied its head (`tie_word_embeddings`)."""
        t = self.codec.tied_head
        if t is False or not tie_possible(self.desc) or (t is None and not self.desc.tie_word_embeddings):
            return ()
        return (HEAD,)

    def ahead(self, tensors: dict[str, torch.Tensor]) -> None:
        self._head_input = tensors.get(HEAD)

    def codec_params(self) -> dict:
        return {"tied_head": True} if self.tied else {}

    def _decide_tie(self, tensors: dict[str, torch.Tensor]) -> None:
        """At the embeddings: the tied form (SPEC 12.6) if the embeddings follow from the head given ahead, else
        the plain one (or an error, with `tied_head=True`)."""
        head, self._head_input = self._head_input, None
        tie, why = (None, "needs the head before the embeddings: write with bbformat.save, or call "
                          "BBFWriter.write_ahead first") if head is None \
            else self._tie_for(tensors[EMBED_TOKENS[self.desc.family]], head)
        if tie is None and self.codec.tied_head:
            raise BBFError(f"codec 'exact' with tied_head=True: {why}")
        self._set_form(tie is not None)
        self._tie = tie or {}

    def _tie_for(self, emb: torch.Tensor, head: torch.Tensor) -> tuple[dict | None, str]:
        """(the tied form's rotations by symmetry, or None; why not)."""
        if tuple(head.shape) != (emb.shape[0], self.desc.mlp_output_dims[-1]) or not _all_finite(head):
            raise ModelError(f"tensor {HEAD!r} given ahead has shape {tuple(head.shape)} or non-finite weights")
        if _input_grid(self.dtype, [emb, head]):
            # words on a narrower grid (SPEC 12.5, e.g. --keep-dtype float32 of float16 values): the predictions
            # are full-precision words, so every residual would span the grid's step (measured: 46.3 % against the
            # plain form's 43.8 % of the float32 layout); such inputs keep the plain form
            return None, (f"the weights lie on a narrower grid than {self.dtype} (SPEC 12.5); store them in that "
                          f"dtype for the tied head")
        self.tie_error = aligned(emb, head)
        if self.tie_error <= TIE_TOLERANCE:  # already in the tied form: keep it (no second rounding)
            return dict.fromkeys(tied_symmetries(self.desc)), ""
        tie, self.tie_error = tie_rotations(self.desc, emb, head)
        return tie, (f"the embeddings do not follow from the head (relative error {self.tie_error:.3g} > "
                     f"{TIE_TOLERANCE:.3g}); the source model's head is not tied")

    def _choose(self, sym: Symmetry, plan: GroupRotations) -> torch.Tensor | None:
        if sym.name in self._tie:
            return self._tie.pop(sym.name)
        c = self.carriers.get(sym.name)
        if c is None:
            return None
        if c.axis == 1 and not plan.ops[c.tensor]:  # unrotated so far (the embeddings): read its block only
            return block_rotation(c, plan.inputs[c.tensor][c.start:c.start + c.k].to(torch.float64))
        return triangular_rotation(c, plan[c.tensor])

    def encode(self, group: str, tensors: dict[str, torch.Tensor]) -> EncodedGroup:
        if group == "embed":
            self._decide_tie(tensors)
        ws = word_bits(self.dtype) // 8
        layout = _Layout(self.desc, group, self.by_tensor, tied_columns(self.desc) if self.tied else 0, ws)
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
        words, off = {}, layout.scale_words
        residuals = None
        for t in layout.tensors:
            c = layout.carriers.get(t.name)
            stored = t.numel - (c.zeros if c is not None else 0) - (layout.residuals if t.name == HEAD else 0)
            # a plain tensor's words are its part of the payload; a carrier's (and the tied head's) are rearranged
            # into it afterwards
            w = np.empty(t.shape, wd) if c is not None or (layout.tied_n and t.name == HEAD) \
                else payload[off:off + stored].reshape(t.shape)
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
            elif layout.tied_n and t.name == HEAD:
                residuals = self._put_tied_head(w, payload[:layout.scale_words], payload[off:off + stored],
                                                layout.tied_n)
            if group == "embed" and self.tied and t.name == EMBED_TOKENS[self.desc.family]:
                self._tied_embed = w
            words[t.name] = w
            off += stored
        assert off == layout.payload_words
        self.saved += layout.saved
        kinds = self.codec.sections_for(group)
        # the payload's own memory as bytes (no copy: at 70B the embeddings' payload alone is 1.6 GB)
        sections = [SectionData(kinds[0], payload.view(np.uint8).data, payload.dtype.itemsize, layout.segments())]
        if residuals is not None:  # the tied head's correction section: its residuals (SPEC 12.6)
            sections.append(SectionData("correction", residuals, 1))
        else:
            sections += [SectionData(k, b"", 1) for k in kinds[1:]]  # empty correction section: nothing to correct
        stats = {"saved_words": layout.saved, "carriers": {c.symmetry: c.tensor for c in layout.carriers.values()}}
        if group == "embed" and self.tie_error is not None:
            stats["tie_error"] = self.tie_error
        if layout.tied_n:
            stats["tied_columns"] = layout.tied_n
        if grid:
            stats["grid_zero_bits"] = grid
        return EncodedGroup(sections, words, stats)

    def _put_tied_head(self, w: np.ndarray, scales: np.ndarray, out: np.ndarray, n: int) -> bytes:
        """The tied head's stored form (SPEC 12.6): the scales c and its columns n.. into the payload; returns the
        correction section, the residuals of its first n columns against the prediction from the embeddings."""
        e = self._tied_embed
        self._tied_embed = None
        if e is None:
            raise BBFError("codec 'exact': the tied head needs the embeddings encoded by this encoder first")
        c = tied_scales(e, w[:, :n], self.dtype)
        scales[...] = c.view(scales.dtype)
        v, d = w.shape
        out.reshape(v, d - n)[...] = w[:, n:]
        nibbles, escapes = [], []
        step = max(2, SLAB_ELEMENTS // (16 * n) // 2 * 2)  # even: only the last slab may end in a padding nibble
        for a in range(0, v, step):  # a slab at a time: numpy's temporaries are each as large as the slab
            rows = slice(a, min(v, a + step))
            z = kernels.tied_residuals(np.ascontiguousarray(w[rows, :n]), tied_prediction(e[rows], c, self.dtype))
            nib, esc = kernels.tied_pack(z)
            nibbles.append(nib)
            escapes.append(esc)
        return b"".join(nibbles + escapes)

    def finish(self) -> dict:
        return {"saved_words": self.saved}


class _ExactDecoder(GroupDecoder):
    def __init__(self, codec: "ExactCodec", desc: ModelDesc, dtype: str):
        self.codec, self.desc, self.dtype = codec, desc, dtype
        self.tied = bool(codec.tied_head)
        self.by_tensor = {c.tensor: c for c in carriers(desc, self.tied).values()}
        self._layouts: dict[str, _Layout] = {}

    def _layout(self, group: str) -> _Layout:
        """The group's layout, computed once."""
        if group not in self._layouts:
            self._layouts[group] = _Layout(self.desc, group, self.by_tensor,
                                           tied_columns(self.desc) if self.tied else 0, word_bits(self.dtype) // 8)
        return self._layouts[group]

    def decode(self, group: str, sections: dict[str, bytes], deps: dict[str, np.ndarray] | None = None) -> np.ndarray:
        tensors = self.decode_tensors(group, sections, deps=deps)
        parts = [tensors[t.name].reshape(-1) for t in self._layout(group).tensors]
        return np.concatenate(parts) if parts else np.zeros(0, word_np_dtype(self.dtype))

    def payload_room(self, group: str, kind: str) -> int:
        """Words of room before the payload: the group's structural zeros. Every tensor then moves down (or stays)
        into its final place in the same buffer, so a group decodes into exactly its own size (a copy per
        carrier would leave its stored part unused: 0.6 GB over a whole 7B model)."""
        layout = self._layout(group)
        if kind != self.codec.sections_for(group)[0]:
            return 0
        if layout.tied_n:  # the payload [scales | H[:, n:] | bias] ends where the head's words do: restore in place
            return max(0, layout.residuals - layout.scale_words)
        return layout.saved

    def decode_tensors(self, group: str, sections: dict[str, bytes], rooms: dict[str, np.ndarray] | None = None,
                       alloc=None, deps: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every tensor but a carrier is a view of the payload; a carrier gets its structural zeros back; a tied
        head is rebuilt from its residuals and `deps`, the token embeddings' words (SPEC 12.6)."""
        layout = self._layout(group)
        kind = self.codec.sections_for(group)[0]
        wd = word_np_dtype(self.dtype)
        data = sections.get(kind)
        if data is None:
            raise FormatError(f"group {group}: codec 'exact' needs its {kind!r} section")
        if len(data) != layout.payload_words * wd.itemsize:
            raise FormatError(f"group {group}: {kind} section has {len(data)} bytes, expected "
                              f"{layout.payload_words * wd.itemsize}")
        payload = np.frombuffer(data, dtype=wd)
        if layout.tied_n:
            room = (rooms or {}).get(kind)
            in_place = room is not None and room.size == layout.numel and room.dtype == wd
            return self._tied_head(layout, payload, sections.get("correction"),
                                   (deps or {}).get(EMBED_TOKENS[self.desc.family]), alloc, room if in_place else None)
        if any(len(sections.get(k) or b"") for k in self.codec.sections_for(group)[1:]):
            raise FormatError(f"group {group}: codec 'exact' has no corrections, but the correction section "
                              f"is not empty")
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


    def _tied_head(self, layout: _Layout, payload: np.ndarray, residuals, embed: np.ndarray | None, alloc,
                   room: np.ndarray | None = None) -> dict:
        """`room`: the group's words, whose last words are the payload (`payload_room`): the head is restored in
        place (its rows are written in order, each below the rest of the payload still to be read)."""
        n, wd = layout.tied_n, payload.dtype
        head = layout.tensors[0]
        v, d = head.shape
        if embed is None or embed.shape != (v, n) or embed.dtype != wd:
            raise FormatError("the tied head needs the token embeddings' words (group embed) to decode")
        if residuals is None:
            raise FormatError("the tied head needs its correction section (the residuals)")
        c = payload[:layout.scale_words].view(np.float32).copy()  # (in place, the head's rows overwrite them)
        if not np.all(np.isfinite(c)):
            raise FormatError("the tied head's scales are not all finite")
        src = layout.scale_words
        rest = payload[src:src + v * (d - n)].reshape(v, d - n)
        nb = (v * n + 1) // 2
        res = memoryview(residuals).cast("B")
        buf = room if room is not None else (alloc or new_bytes)(v * d * wd.itemsize).view(wd)
        out = {head.name: buf[:v * d].reshape(v, d)}
        try:
            kernels.tied_restore(out[head.name], embed, c, res[:nb], res[nb:], rest, self.dtype)
        except ValueError as e:
            raise FormatError(str(e)) from None
        src += v * (d - n)
        for t in layout.tensors[1:]:  # lm_head.bias
            out[t.name] = payload[src:src + t.numel].reshape(t.shape)
            src += t.numel
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

    def __init__(self, tied_head: bool | None = None):
        """`tied_head`: the tied-head form (SPEC 12.6). None (writers: the default) decides from the model: tied
        when its source tied the head and the embeddings follow from the head; a file records True or nothing."""
        if tied_head is not None and not isinstance(tied_head, bool):
            raise BBFError(f"codec 'exact': tied_head must be a boolean, got {tied_head!r}")
        self.tied_head = tied_head

    def params(self):
        return {"tied_head": True} if self.tied_head else {}

    def as_read(self):
        return self if self.tied_head is not None else ExactCodec(False)

    def depends(self, group: str) -> tuple[str, ...]:
        return ("embed",) if self.tied_head and group == "head" else ()

    def sections_for(self, group: str) -> tuple[str, ...]:
        """The tied head has a correction section (its residuals) after its head section."""
        return ("head", "correction") if self.tied_head and group == "head" else super().sections_for(group)

    def symmetries_removed(self, desc):
        with_carrier = carriers(desc, bool(self.tied_head))
        return [s for s in desc.symmetries() if s.name in with_carrier]

    def section_specs(self, desc, dtype):
        """Every group's first section holds its payload: the group's words less its carriers' structural zeros
        (the tied head: plus its scales)."""
        tied = bool(self.tied_head)
        if tied and not tie_possible(desc):
            raise FormatError(f"codec 'exact' tied_head: the head has {desc.mlp_output_dims[-1]} columns, fewer than "
                              f"the token embeddings' {desc.embedding_dims[0]}")
        by_tensor = {c.tensor: c for c in carriers(desc, tied).values()}
        ws = word_bits(dtype) // 8
        n = tied_columns(desc) if tied else 0
        specs = {g: self._specs(g, _Layout(desc, g, by_tensor, n, ws).payload_words, ws) for g in desc.groups()}
        if tied:
            head = specs["head"][0]
            specs["head"] = (head, SectionSpec("correction", 1, *residual_bytes(desc.vocab_size, n, ws)))
        return specs

    def encoder(self, desc, dtype):
        return _ExactEncoder(self, desc, dtype)

    def decoder(self, desc, dtype):
        return _ExactDecoder(self, desc, dtype)

"""Codec `bitsback`: the paper's bits-back coding over the two rotational symmetries of every block.

Encoding follows Algorithm 5, one block at a time, on a stack of fixed-width words (wordstack.py):

    canonicalise (Algorithm 1; StreamingRotator, carrier of mid.i = o/out_proj, of out.i = down/fc2)
    push A = [attn_sc, q, k, v, q/k/v biases]
    pop D(D+1)/2 words (D = k_b), decode a rotation Q_b (Algorithm 3); carrier o' = Q_b^T o
    push Q_b's eigenvalues, push the sign bits (Algorithm 2's side information)
    push B = [o', o_bias, mlp_sc, gate, up, up_bias]
    pop D(D+1)/2 words (D = k_c), rotation Q_c; down' = Q_c^T down; push eigenvalues, signs
    push C = [down', down_bias]

The block's section is the final stack. Every block starts from an empty stack, so every block decodes alone.
A symmetry skips bits-back (its carrier is stored canonical, with no side information) when its pop would reach
below the plain tensor words pushed since the last side information, or when its carrier has fewer columns than
rows (its Gram matrix is then singular and cannot identify the rotation). Both depend only on the shapes, so the
decoder makes the same choice. Real models never skip: attention and MLP inputs are far larger than k(k+1)/2.

Decoding (Algorithm 6) runs the steps backwards: pop C, read signs and eigenvalues, recover Q_c from down'
(Algorithm 2), rotate down back, re-encode Q_c (Algorithm 4) and push the words back; the same for the middle
symmetry; pop A. Float arithmetic is not exact, so both recovered carriers and re-encoded words can differ from
the truth. The correction codes of section 3.3 fix that: `_decode_block` takes a *fixer* called at each of the four
correction points; the encoder runs the very same function with an oracle that knows the truth and records
(position, true word) wherever the decoded value is further than `threshold` from the truth (or not finite), the
decoder replays those records from the correction section.

Correction section payload (opaque bytes): one list per correction point, in decoding order
(out.carrier, out.words, mid.carrier, mid.words; a skipped symmetry has none). A list is
    uvarint n; n uvarint gaps (position p_0, then p_j - p_{j-1} - 1); n true words (little-endian, word size)
where positions index the row-major carrier or the D(D+1)/2 re-encoded words. uvarint is unsigned LEB128 of at
most 9 bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BBFError, FormatError, ModelError
from ..models.arch import LAYER_ORDER, ModelDesc, Symmetry
from ..words import to_words, word_bits, word_np_dtype, words_to_f64
from .base import Codec, EncodedGroup, GroupDecoder, GroupEncoder, SectionData, SectionSpec, Segment, \
    group_segments, group_words, register_codec
from .canonical import StreamingRotator
from .rotation import canonical_rotation, choose_signs, eig_from_words, eig_to_words, finite, n_eig_words, \
    n_rotation_words, n_sign_words, recover_rotation, rotation_from_words, serial_blas, signs_from_words, \
    signs_to_words, words_from_entries, words_from_rotation
from .wordstack import WordStack

# The paper uses 0.005 for Llama and 0.01 for OPT. On SmolLM2-shaped float16 blocks 0.005 corrects 0.04% of the
# values it could touch and keeps 99.2-99.4% of the theoretical saving; 0.001 corrects 1.1% and keeps only 90%.
DEFAULT_THRESHOLD = 0.005


def carrier_name(desc: ModelDesc, sym: str) -> str:
    """The tensor whose Gram matrix defines a symmetry's canonical direction (and carries its bits-back)."""
    if sym == "emb":
        return desc.prefix + "embed_tokens.weight"
    kind, i = sym.split(".")
    return desc.layer_names(int(i))["o" if kind == "mid" else "down"]


def _choose(desc: ModelDesc):
    def choose(sym: Symmetry, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        name = carrier_name(desc, sym.name)
        M = tensors[name].numpy()
        return torch.from_numpy(canonical_rotation(M if sym.action(name).axis == 0 else M.T))
    return choose


# ---- the plan of one block: sizes only, the same for encoder and decoder ---------------------------------
@dataclass(frozen=True)
class SymPlan:
    name: str  # "mid.i" / "out.i"
    carrier: str
    D: int  # k: the rotation is D x D, the carrier D x m
    m: int
    bits_back: bool
    n_pop: int  # D(D+1)/2 when bits_back, else 0
    n_eig: int
    n_sign: int


class BlockPlan:
    def __init__(self, desc: ModelDesc, i: int, dtype: str):
        self.dtype, self.bits = dtype, word_bits(dtype)
        names, shapes = desc.layer_names(i), desc.layer_shapes(i)
        roles = [r for r in LAYER_ORDER if r in names]
        cut_b, cut_c = roles.index("o"), roles.index("down")
        self.shapes = {names[r]: shapes[r] for r in roles}
        self.parts = [[names[r] for r in rs] for rs in (roles[:cut_b], roles[cut_b:cut_c], roles[cut_c:])]
        size = [sum(math.prod(self.shapes[n]) for n in p) for p in self.parts]
        self.mid = self._sym(f"mid.{i}", names["o"], plain=size[0])
        o_words = math.prod(self.shapes[names["o"]])
        self.out = self._sym(f"out.{i}", names["down"], plain=size[1] - o_words if self.mid.bits_back
                             else size[0] + size[1])
        self.section_words = sum(size) + sum(s.n_eig + s.n_sign - s.n_pop for s in (self.mid, self.out))
        self.segments = self._segments()

    def _sym(self, name: str, carrier: str, plain: int) -> SymPlan:
        D, m = self.shapes[carrier]
        ok = m >= D and n_rotation_words(D) <= plain
        return SymPlan(name, carrier, D, m, ok, n_rotation_words(D) if ok else 0,
                       n_eig_words(D, self.bits) if ok else 0, n_sign_words(D, self.bits) if ok else 0)

    def _segments(self) -> tuple[Segment, ...]:
        """2-D runs of whole rows in the section (for the entropy stage), found by replaying pushes and pops."""
        runs: list[list] = []  # [tensor name or None for side information, words left]

        def pop(n):
            while n:
                take = min(n, runs[-1][1])
                runs[-1][1] -= take
                n -= take
                if not runs[-1][1]:
                    runs.pop()

        for part, sym in zip(self.parts, (self.mid, self.out, None)):
            runs += [[n, math.prod(self.shapes[n])] for n in part]
            if sym is not None and sym.bits_back:
                pop(sym.n_pop)
                runs.append([None, sym.n_eig + sym.n_sign])
        segs, off = [], 0
        for name, n in runs:
            shape = self.shapes.get(name, ())
            if len(shape) == 2 and n >= shape[1]:
                segs.append(Segment(off, n // shape[1], shape[1]))
            off += n
        return tuple(segs)


# ---- the block decoder, shared by encoder (with an oracle) and decoder (with a replay) -------------------
def _pop_part(st, plan: BlockPlan, part: list[str], out: dict) -> None:
    words = st.pop(sum(math.prod(plan.shapes[n]) for n in part))
    off = 0
    for n in part:
        k = math.prod(plan.shapes[n])
        out[n] = words[off: off + k].reshape(plan.shapes[n])
        off += k


def _undo(st, plan: BlockPlan, sym: SymPlan, out: dict, fix) -> None:
    """Algorithm 6's two steps for one symmetry: carrier back to canonical, rotation words back on the stack."""
    signs = signs_from_words(st.pop(sym.n_sign), sym.D, plan.bits)
    lam = eig_from_words(st.pop(sym.n_eig), plan.bits)
    M_rot = finite(words_to_f64(out[sym.carrier], plan.dtype))
    Q = recover_rotation(M_rot, signs)
    out[sym.carrier] = fix(sym.name + ".carrier", words_from_entries(Q @ M_rot, plan.dtype))
    st.push(fix(sym.name + ".words", words_from_rotation(Q, lam, plan.dtype)))


def _decode_block(plan: BlockPlan, words: np.ndarray, fix) -> dict[str, np.ndarray]:
    if words.size != plan.section_words:
        raise FormatError(f"block section has {words.size} words, expected {plan.section_words}")
    st = WordStack(words.dtype, words)
    out: dict[str, np.ndarray] = {}
    _pop_part(st, plan, plan.parts[2], out)
    if plan.out.bits_back:
        _undo(st, plan, plan.out, out, fix)
    _pop_part(st, plan, plan.parts[1], out)
    if plan.mid.bits_back:
        _undo(st, plan, plan.mid, out, fix)
    _pop_part(st, plan, plan.parts[0], out)
    return out


class _Oracle:
    """The encoder's fixer: knows the true words, records and applies a correction wherever needed."""

    def __init__(self, truth: dict[str, np.ndarray], tau: float, dtype: str):
        self.truth, self.tau, self.dtype = truth, tau, dtype
        self.records: list[tuple[str, np.ndarray, np.ndarray]] = []

    def __call__(self, point: str, words: np.ndarray) -> np.ndarray:
        true = self.truth[point].reshape(words.shape)
        with np.errstate(invalid="ignore"):
            close = np.abs(words_to_f64(words, self.dtype) - words_to_f64(true, self.dtype)) <= self.tau
        pos = np.flatnonzero(((words != true) & ~close).reshape(-1))  # NaN/Inf are never close
        vals = true.reshape(-1)[pos]
        self.records.append((point, pos, vals))
        fixed = words.copy().reshape(-1)
        fixed[pos] = vals
        return fixed.reshape(words.shape)

    def payload(self) -> bytes:
        out = bytearray()
        for _, pos, vals in self.records:
            out += _uvarint(pos.size)
            for g in np.diff(pos, prepend=-1) - 1:
                out += _uvarint(int(g))
            out += _le_bytes(vals)
        return bytes(out)


class _Replay:
    """The decoder's fixer: applies the correction section's records in order, checking every size read."""

    def __init__(self, payload: bytes, dtype: str):
        self.buf, self.at, self.wdtype = memoryview(payload), 0, word_np_dtype(dtype).newbyteorder("<")

    def _uvarint(self) -> int:
        """An unsigned LEB128 of at most 9 bytes (SPEC, conventions): a 10th byte is refused."""
        v, shift = 0, 0
        while True:
            if shift > 56:
                raise FormatError("correction section has a varint longer than 9 bytes")
            if self.at >= len(self.buf):
                raise FormatError("correction section is truncated (in a varint)")
            b = self.buf[self.at]
            self.at += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v

    def __call__(self, point: str, words: np.ndarray) -> np.ndarray:
        n = self._uvarint()
        if n > words.size:
            raise FormatError(f"correction list for {point} has {n} records for {words.size} values")
        gaps = [self._uvarint() for _ in range(n)]
        pos = np.cumsum(np.array(gaps, dtype=np.uint64) + 1, dtype=np.uint64).astype(np.int64) - 1
        if n and (max(gaps) >= words.size or pos[-1] >= words.size):  # small gaps: the sum cannot wrap
            raise FormatError(f"correction position {int(pos[-1])} out of range for {point} ({words.size} values)")
        nb = n * self.wdtype.itemsize
        if self.at + nb > len(self.buf):
            raise FormatError("correction section is truncated")
        vals = np.frombuffer(self.buf[self.at: self.at + nb], dtype=self.wdtype)
        self.at += nb
        fixed = words.copy().reshape(-1)
        fixed[pos] = vals
        return fixed.reshape(words.shape)

    def finish(self) -> None:
        if self.at != len(self.buf):
            raise FormatError(f"correction section has {len(self.buf) - self.at} trailing bytes")


def _uvarint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _le_bytes(words: np.ndarray) -> bytes:
    return words.astype(words.dtype.newbyteorder("<"), copy=False).tobytes()


def _layer_index(desc: ModelDesc, group: str) -> int:
    kind, _, idx = group.partition(".")
    if kind != "layer" or not idx.isdigit() or int(idx) >= desc.num_layers:
        raise FormatError(f"unknown group {group!r}")
    return int(idx)


# ---- encoder / decoder ------------------------------------------------------------------------------------
class _Encoder(GroupEncoder):
    def __init__(self, codec: "BitsBackCodec", desc: ModelDesc, dtype: str):
        self.codec, self.desc, self.dtype = codec, desc, dtype
        self.rotator = StreamingRotator(desc, _choose(desc))

    def encode(self, group: str, tensors: dict[str, torch.Tensor]) -> EncodedGroup:
        t0 = time.perf_counter()
        self._check(group, tensors)
        with serial_blas():
            words = {n: to_words(t, self.dtype) for n, t in self.rotator.process(group, tensors).items()}
            if group not in ("embed", "head"):
                return self._encode_block(group, words, t0)
        seq = group_words(self.desc, group, words)
        kind = self.codec.sections_for(group)[0]
        sec = SectionData(kind, _le_bytes(seq), seq.itemsize, group_segments(self.desc, group))
        return EncodedGroup([sec], words, {"seconds": time.perf_counter() - t0})

    def _check(self, group: str, tensors: dict[str, torch.Tensor]) -> None:
        want = {t.name: t.shape for t in self.desc.group_tensors(group)}
        if not want:
            raise ModelError(f"unknown group {group!r}")
        if set(tensors) != set(want):
            raise ModelError(f"group {group!r} expects tensors {sorted(want)}, got {sorted(tensors)}")
        for n, t in tensors.items():
            if tuple(t.shape) != want[n]:
                raise ModelError(f"tensor {n!r} has shape {tuple(t.shape)}, expected {want[n]}")
            if not torch.isfinite(t).all():
                raise ModelError(f"tensor {n!r} has NaN or Inf values; bitsback needs finite weights")

    def _encode_block(self, group: str, words: dict[str, np.ndarray], t0: float) -> EncodedGroup:
        plan = BlockPlan(self.desc, _layer_index(self.desc, group), self.dtype)
        st = WordStack(word_np_dtype(self.dtype))
        stored = dict(words)  # what goes on the stack: canonical words, rotated carriers
        truth: dict[str, np.ndarray] = {}
        stats = {"popped_words": 0, "eig_words": 0, "sign_words": 0, "sign_flips": 0, "skipped": []}
        for part, sym in zip(plan.parts, (plan.mid, plan.out, None)):
            for n in part:
                st.push(stored[n])
            if sym is None:
                continue
            if not sym.bits_back:
                stats["skipped"].append(sym.name)
                continue
            popped = st.pop(sym.n_pop)
            Q, lam = rotation_from_words(popped, sym.D, self.dtype)
            M_c = words[sym.carrier]
            M_rot = words_from_entries(Q.T @ words_to_f64(M_c, self.dtype), self.dtype)
            signs, flips = choose_signs(Q, words_to_f64(M_rot, self.dtype))
            st.push(eig_to_words(lam, plan.bits).astype(st.dtype))
            st.push(signs_to_words(signs, plan.bits).astype(st.dtype))
            stored[sym.carrier] = M_rot
            truth[sym.name + ".carrier"], truth[sym.name + ".words"] = M_c, popped
            stats["popped_words"] += sym.n_pop
            stats["eig_words"] += sym.n_eig
            stats["sign_words"] += sym.n_sign
            stats["sign_flips"] += flips
        section = st.words()
        t1 = time.perf_counter()
        oracle = _Oracle(truth, self.codec.threshold, self.dtype)
        decoded = _decode_block(plan, section, oracle)
        self._verify(decoded, words)
        payload = oracle.payload()
        stats.update(corrections={p: int(pos.size) for p, pos, _ in oracle.records},
                     correction_bytes=len(payload), encode_seconds=t1 - t0,
                     simulate_seconds=time.perf_counter() - t1)
        n_corr = sum(stats["corrections"].values())
        sections = [SectionData("block", _le_bytes(section), section.itemsize, plan.segments),
                    SectionData("correction", payload, 1, corrections=n_corr)]
        return EncodedGroup(sections, words, stats)

    def _verify(self, decoded: dict[str, np.ndarray], words: dict[str, np.ndarray]) -> None:
        """The oracle guarantees every decoded value is within threshold; a failure here is a bug."""
        for n, w in words.items():
            d = decoded[n]
            with np.errstate(invalid="ignore"):
                ok = (d == w) | (np.abs(words_to_f64(d, self.dtype) - words_to_f64(w, self.dtype))
                                 <= self.codec.threshold)
            if not ok.all():
                raise RuntimeError(f"bitsback: simulated decode of {n!r} is off by more than the threshold")


class _Decoder(GroupDecoder):
    def __init__(self, codec: "BitsBackCodec", desc: ModelDesc, dtype: str):
        self.codec, self.desc, self.dtype = codec, desc, dtype
        self.wdtype = word_np_dtype(dtype).newbyteorder("<")

    def _words(self, payload: bytes, kind: str) -> np.ndarray:
        if len(payload) % self.wdtype.itemsize:
            raise FormatError(f"{kind} section is not a whole number of {self.wdtype.itemsize}-byte words")
        return np.frombuffer(payload, dtype=self.wdtype).astype(word_np_dtype(self.dtype))

    def decode(self, group: str, sections: dict[str, bytes]) -> np.ndarray:
        if group in ("embed", "head"):
            kind = self.codec.sections_for(group)[0]
            words = self._words(sections[kind], kind)
            want = sum(t.numel for t in self.desc.group_tensors(group))
            if words.size != want:
                raise FormatError(f"{kind} section has {words.size} words, expected {want}")
            return words
        plan = BlockPlan(self.desc, _layer_index(self.desc, group), self.dtype)
        replay = _Replay(sections["correction"], self.dtype)
        with serial_blas():
            out = _decode_block(plan, self._words(sections["block"], "block"), replay)
        replay.finish()
        return group_words(self.desc, group, out)


@register_codec
class BitsBackCodec(Codec):
    id = "bitsback"

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold) or threshold <= 0:
            raise BBFError(f"bitsback threshold must be a positive finite number, got {threshold!r}")
        self.threshold = float(threshold)

    def params(self):
        return {"threshold": self.threshold}

    def symmetries_removed(self, desc):
        used = set()
        for i in range(desc.num_layers):
            plan = BlockPlan(desc, i, "float16")  # the skip rule depends on shapes only, not on the dtype
            used |= {p.name for p in (plan.mid, plan.out) if p.bits_back}
        return [s for s in desc.symmetries() if s.name in used]

    def section_specs(self, desc, dtype):
        """embed/head: their words. A block: the stack's final length (11.4); its correction section: one list per
        correction point (11.7), each at least its count byte and at most a 9-byte count plus, per position of the
        target, a 9-byte gap and a word."""
        out = super().section_specs(desc, dtype)
        ws = word_bits(dtype) // 8
        for i in range(desc.num_layers):
            plan = BlockPlan(desc, i, dtype)
            sizes = [n for p in (plan.mid, plan.out) if p.bits_back for n in (p.D * p.m, p.n_pop)]
            n = plan.section_words * ws
            out[f"layer.{i}"] = (SectionSpec("block", ws, n, n),
                                 SectionSpec("correction", 1, len(sizes), sum(9 + k * (9 + ws) for k in sizes),
                                             sum(sizes)))
        return out

    def encoder(self, desc, dtype):
        return _Encoder(self, desc, dtype)

    def decoder(self, desc, dtype):
        return _Decoder(self, desc, dtype)

"""The contract between the container and a symmetry codec.

A codec turns one *group* of tensors (the embeddings, one transformer block, or the head) into one or more
sections of words, and back. The container never looks inside: it stores each section's bytes (through the
entropy stage), checksums them, and hands them back to the codec's decoder.

Decoding a group yields its *decoded word sequence*: the words of the group's tensors, in `ModelDesc.tensors()`
order, concatenated. The header's tensor table gives each tensor's offset in that sequence, so the container can
slice tensors out of any codec's output.

Encoders are streaming and stateful: groups arrive in push order (embed, layer.0 .. layer.L-1, head) and an
encoder may carry a small state from one group to the next (e.g. the rotation a symmetry applies to the next
block). Memory stays bounded by one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import BBFError, FormatError, UnknownCodecError
from ..models.arch import ModelDesc
from ..words import word_bits

SECTION_KINDS = ("initial", "block", "correction", "head", "aux")


@dataclass(frozen=True)
class Segment:
    """A 2-D run of words inside a section payload, for the entropy stage's row/column modelling."""

    offset: int  # in words
    rows: int
    cols: int


@dataclass
class SectionData:
    """One section a codec produced: its kind and its raw payload (before the entropy stage)."""

    kind: str
    payload: bytes  # raw bytes: words (little-endian) or an opaque byte payload
    word_size: int  # 2 or 4 for word payloads; 1 for opaque bytes (the entropy stage then uses plain zstd)
    segments: tuple[Segment, ...] = ()
    corrections: int = 0  # number of correction records (correction sections only)


@dataclass(frozen=True)
class SectionSpec:
    """What the index record of one of a group's sections must say, from the model description alone (SPEC sections
    5 and 10-12). The reader checks every record against it before it fetches, allocates or decompresses anything:
    no section can make it allocate more than the tensor table implies for its group plus the codec's side data."""

    kind: str
    word_size: int  # the dtype's word size for a word payload, 1 for opaque bytes
    min_raw: int  # raw length (bytes) allowed, inclusive
    max_raw: int
    max_records: int = 0  # correction records the section may hold (the index's count is bounded by it)


@dataclass
class EncodedGroup:
    sections: list[SectionData]
    # The words the decoder will reproduce (within the codec's tolerance), name -> word array of the tensor's
    # shape. `bbf verify` and the tests compare the decoded file against these.
    canonical: dict[str, np.ndarray]
    stats: dict[str, Any] = field(default_factory=dict)


class GroupEncoder:
    def encode(self, group: str, tensors: dict[str, torch.Tensor]) -> EncodedGroup:  # pragma: no cover
        raise NotImplementedError

    def wants_ahead(self) -> tuple[str, ...]:
        """Tensors of later groups this encoder would like before the first group (`ahead`); () for most codecs.
        (`exact`'s tied head fits the head to the embeddings before it rotates them, SPEC 12.6.)"""
        return ()

    def ahead(self, tensors: dict[str, torch.Tensor]) -> None:
        """Receive the `wants_ahead` tensors, before the first group."""

    def codec_params(self) -> dict[str, Any] | None:
        """The parameters the header records, when the encoder decided them from the data; None: the codec's own."""
        return None

    def finish(self) -> dict[str, Any]:
        """Encoder statistics, stored (informative only) in the header under stats.codec."""
        return {}


class GroupDecoder:
    desc: ModelDesc

    def decode(self, group: str, sections: dict[str, bytes]) -> np.ndarray:  # pragma: no cover
        """Raw section payloads by kind -> the group's decoded word sequence."""
        raise NotImplementedError

    def decode_tensors(self, group: str, sections: dict[str, bytes], rooms: dict[str, np.ndarray] | None = None,
                       alloc=None, deps: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Raw section payloads by kind -> name -> the tensor's words, in its shape (the reader's entry point).

        The default splits `decode`'s sequence; a codec may override it to hand out views of the payload instead
        of copying it into one sequence first. `rooms[kind]`, when present, is a word array whose last words are
        that section's payload, preceded by the `payload_room` words the decoder asked for. `alloc(nbytes)`, when
        given, supplies the memory (a writable uint8 array) of any new tensor. `deps`: name -> words of the tensors
        of the groups `Codec.depends(group)` names (read only)."""
        return split_group(self.desc, group, self.decode(group, sections))

    def payload_room(self, group: str, kind: str) -> int:
        """Words of free space wanted in front of a section's payload (to rebuild tensors in place); 0: none."""
        return 0


class Codec:
    """A codec: small, validated on construction, serialised as {"id": ..., "params": {...}}."""

    id: ClassVar[str]

    def __init__(self, **params: Any) -> None:
        if params:
            raise BBFError(f"codec {self.id!r} takes no parameters, got {sorted(params)}")

    def params(self) -> dict[str, Any]:
        return {}

    def as_read(self) -> "Codec":
        """This codec as a file's header states it: any parameter a writer would decide from the data (None) takes
        the value that absence means in a file (`exact`: no tied head)."""
        return self

    def config(self) -> dict[str, Any]:
        return {"id": self.id, "params": self.params()}

    def encoder(self, desc: ModelDesc, dtype: str) -> GroupEncoder:  # pragma: no cover
        raise NotImplementedError

    def decoder(self, desc: ModelDesc, dtype: str) -> GroupDecoder:  # pragma: no cover
        raise NotImplementedError

    def depends(self, group: str) -> tuple[str, ...]:
        """Groups whose decoded words decoding `group` needs besides its own sections (SPEC 6): () but for `exact`'s
        tied head, which needs `embed`."""
        return ()

    def symmetries_removed(self, desc: ModelDesc) -> list:
        """The symmetries whose k(k-1)/2 free parameters this codec does not store (bbf-inspect's accounting)."""
        return []

    def sections_for(self, group: str) -> tuple[str, ...]:
        """Section kinds this group has, in push order."""
        if group == "embed":
            return ("initial",)
        if group == "head":
            return ("head",)
        return ("block", "correction")

    def section_specs(self, desc: ModelDesc, dtype: str) -> dict[str, tuple[SectionSpec, ...]]:
        """Group -> its sections in push order, with the word size and raw length each must have. Default (codec
        raw): the first section holds the group's decoded word sequence, any other one (the correction) is empty."""
        return {g: self._specs(g, sum(t.numel for t in desc.group_tensors(g)), word_bits(dtype) // 8)
                for g in desc.groups()}

    def _specs(self, group: str, payload_words: int, ws: int) -> tuple[SectionSpec, ...]:
        """A word payload of exactly `payload_words` words, then empty sections."""
        kinds = self.sections_for(group)
        n = payload_words * ws
        return (SectionSpec(kinds[0], ws, n, n),) + tuple(SectionSpec(k, 1, 0, 0) for k in kinds[1:])


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    if cls.id in _REGISTRY and _REGISTRY[cls.id] is not cls:
        raise ValueError(f"codec id {cls.id!r} is already registered")
    _REGISTRY[cls.id] = cls
    return cls


def get_codec(codec_id: str, params: dict[str, Any] | None = None) -> Codec:
    try:
        cls = _REGISTRY[codec_id]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {codec_id!r} (this reader knows {sorted(_REGISTRY)}); a newer bbformat may read it"
        ) from None
    if not isinstance(params or {}, dict):
        raise BBFError(f"codec {codec_id!r}: parameters must be a map, got {type(params).__name__}")
    import inspect

    named = [p.name for p in inspect.signature(cls).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(str(k) for k in (params or {}) if k not in named)
    if unknown:
        raise BBFError(f"codec {codec_id!r}: unknown parameter(s) {unknown}; it takes "
                       f"{named if named else 'no parameters'}")
    try:
        return cls(**(params or {}))
    except TypeError as e:  # a missing keyword or a bad type
        raise BBFError(f"codec {codec_id!r}: bad parameters {sorted(map(str, params or {}))}: {e}") from None


def codec_ids() -> list[str]:
    return sorted(_REGISTRY)


def new_bytes(nbytes: int) -> np.ndarray:
    """A new uint8 array: the default `alloc` of decode_tensors."""
    return np.empty(nbytes, np.uint8)


def group_words(desc: ModelDesc, group: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenate a group's tensors (word arrays) in file order: the decoded word sequence."""
    parts = [np.ascontiguousarray(tensors[t.name]).reshape(-1) for t in desc.group_tensors(group)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def split_group(desc: ModelDesc, group: str, seq: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of `group_words`: a group's decoded word sequence -> name -> word array of the tensor's shape."""
    out, off = {}, 0
    for t in desc.group_tensors(group):
        out[t.name] = seq[off: off + t.numel].reshape(t.shape)
        off += t.numel
    if off != seq.size:
        raise FormatError(f"{group}: decoded {seq.size} words, its tensors need {off}")
    return out


def group_segments(desc: ModelDesc, group: str, start: int = 0) -> tuple[Segment, ...]:
    """2-D segments of a group's decoded word sequence (1-D tensors are left out)."""
    segs, off = [], start
    for t in desc.group_tensors(group):
        if len(t.shape) == 2:
            segs.append(Segment(off, t.shape[0], t.shape[1]))
        off += t.numel
    return tuple(segs)

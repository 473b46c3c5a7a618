"""Codec `raw`: words stored as they are, no symmetry coding. The baseline every other codec is measured against."""

from __future__ import annotations

import numpy as np
import torch

from ..models.arch import ModelDesc
from ..words import to_words, word_np_dtype
from .base import Codec, EncodedGroup, GroupDecoder, GroupEncoder, SectionData, group_segments, group_words, \
    register_codec


class _RawEncoder(GroupEncoder):
    def __init__(self, codec: "RawCodec", desc: ModelDesc, dtype: str):
        self.codec, self.desc, self.dtype = codec, desc, dtype

    def encode(self, group: str, tensors: dict[str, torch.Tensor]) -> EncodedGroup:
        words = {name: to_words(t, self.dtype) for name, t in tensors.items()}
        seq = group_words(self.desc, group, words)
        kinds = self.codec.sections_for(group)
        size = seq.dtype.itemsize
        sections = [SectionData(kinds[0], seq.tobytes(), size, group_segments(self.desc, group))]
        sections += [SectionData(k, b"", 1) for k in kinds[1:]]  # empty correction section
        return EncodedGroup(sections, words)


class _RawDecoder(GroupDecoder):
    def __init__(self, codec: "RawCodec", desc: ModelDesc, dtype: str):
        self.codec, self.desc, self.dtype = codec, desc, dtype

    def decode(self, group: str, sections: dict[str, bytes]) -> np.ndarray:
        return np.frombuffer(sections[self.codec.sections_for(group)[0]], dtype=word_np_dtype(self.dtype))


@register_codec
class RawCodec(Codec):
    id = "raw"

    def encoder(self, desc, dtype):
        return _RawEncoder(self, desc, dtype)

    def decoder(self, desc, dtype):
        return _RawDecoder(self, desc, dtype)

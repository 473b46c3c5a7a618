"""Byte layout of a .bbf file (SPEC.md, "File layout"): preamble, sections, header, index, footer.

Everything fixed-width is little-endian and packed with `struct`; the header is msgpack. Readers trust nothing:
every offset, length and count read from a file is checked against the file size and the hard limits below
before it is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import kernels
from ..errors import FormatError, TruncatedError, VersionError

MAGIC = b"\x89BBF\r\n\x1a\n"  # PNG-style: catches text-mode and truncation accidents
END_MAGIC = b"BBF-END\n"
MAJOR, MINOR = 1, 0
ALIGN = 64  # every section starts at a multiple of this

PREAMBLE = struct.Struct("<8sHHI")  # magic, major, minor, flags                      (16 bytes)
FOOTER = struct.Struct("<QQQIIIHHI4x8s")  # header off/len, index off, n sections, index crc, header crc,
#                                           major, minor, flags, reserved, end magic (56 bytes)
RECORD = struct.Struct("<BBBBiQQQIII4x")  # kind, compression, word size, flags, block, offset, stored len,
#                                            raw len, crc32, corrections, aux id    (48 bytes)

# Hard limits (SPEC.md, "Limits"). A file beyond any of them is refused before anything is allocated.
MAX_HEADER = 64 << 20
MAX_SECTIONS = 1 << 20
MAX_TENSORS = 1 << 20
MAX_NAME = 512
MAX_DIMS = 8
MAX_DIM = 1 << 40
MAX_SECTION_RAW = 1 << 40
SUFFIX_GUESS = 256 << 10  # a reader's first (and usually only) read before any section

KINDS = ("initial", "block", "correction", "head", "aux")
COMPRESSIONS = ("none", "zstd-planes", "words-rans")  # ids 0, 1, 2 (the entropy stage may add ids; see SPEC)


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    return kernels.crc32(data, value)


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_preamble(flags: int = 0) -> bytes:
    return PREAMBLE.pack(MAGIC, MAJOR, MINOR, flags)


def check_preamble(data: bytes) -> tuple[int, int]:
    if len(data) < PREAMBLE.size:
        raise TruncatedError(f"file is {len(data)} bytes, shorter than the {PREAMBLE.size}-byte preamble")
    magic, major, minor, _flags = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"not a .bbf file (bad magic {magic!r})")
    _check_version(major, minor, "preamble")
    return major, minor


def _check_version(major: int, minor: int, where: str) -> None:
    if major != MAJOR:
        raise VersionError(f"format version {major}.{minor} in the {where} is not supported by this reader "
                           f"(it reads {MAJOR}.x); upgrade bbformat")


@dataclass(frozen=True)
class Footer:
    header_offset: int
    header_length: int
    index_offset: int
    n_sections: int
    index_crc: int
    header_crc: int
    major: int = MAJOR
    minor: int = MINOR
    flags: int = 0

    def pack(self) -> bytes:
        return FOOTER.pack(self.header_offset, self.header_length, self.index_offset, self.n_sections,
                           self.index_crc, self.header_crc, self.major, self.minor, self.flags, END_MAGIC)

    @classmethod
    def parse(cls, tail: bytes, file_size: int) -> "Footer":
        if file_size < PREAMBLE.size + FOOTER.size:
            raise TruncatedError(f"file is {file_size} bytes: too short to hold a preamble and a footer")
        (hoff, hlen, ioff, n, icrc, hcrc, major, minor, flags, end) = FOOTER.unpack_from(tail, len(tail) - FOOTER.size)
        if end != END_MAGIC:
            raise TruncatedError("footer end magic missing: the file is truncated or not a .bbf file")
        _check_version(major, minor, "footer")
        if n > MAX_SECTIONS:
            raise FormatError(f"index lists {n} sections, over the limit of {MAX_SECTIONS}")
        if hlen > MAX_HEADER:
            raise FormatError(f"header is {hlen} bytes, over the limit of {MAX_HEADER}")
        index_end = ioff + n * RECORD.size
        footer_start = file_size - FOOTER.size
        if not (PREAMBLE.size <= hoff and hoff + hlen <= ioff and index_end == footer_start):
            raise FormatError(f"footer points outside the file (header {hoff}+{hlen}, index {ioff} with {n} "
                              f"records, footer at {footer_start})")
        if hoff % ALIGN:
            raise FormatError(f"footer: header offset {hoff} is not a multiple of {ALIGN}")
        return cls(hoff, hlen, ioff, n, icrc, hcrc, major, minor, flags)


@dataclass(frozen=True)
class SectionRecord:
    kind: str
    compression: int
    word_size: int
    block: int  # layer index, or -1
    offset: int
    stored_len: int
    raw_len: int
    crc: int
    corrections: int = 0
    aux_id: int = 0
    index: int = -1  # position in the index (not stored)

    def pack(self) -> bytes:
        return RECORD.pack(KINDS.index(self.kind), self.compression, self.word_size, 0, self.block, self.offset,
                           self.stored_len, self.raw_len, self.crc, self.corrections, self.aux_id)

    @property
    def label(self) -> str:
        """How messages name this section, e.g. 'section 5 (block 3)'."""
        what = {"block": f"block {self.block}", "correction": f"corrections of block {self.block}",
                "initial": "embeddings", "head": "head", "aux": f"aux {self.aux_id}"}[self.kind]
        return f"section {self.index} ({what})"


def parse_index(data: bytes, n: int, data_end: int) -> list[SectionRecord]:
    """Parse and validate n index records; sections must lie in [preamble, data_end), in order, without overlap."""
    records, prev_end = [], PREAMBLE.size
    for i in range(n):
        kind, comp, ws, _flags, block, off, slen, rlen, crc, ncorr, aux = RECORD.unpack_from(data, i * RECORD.size)
        where = f"section {i}"
        if kind >= len(KINDS):
            raise FormatError(f"{where}: unknown section kind {kind}")
        if comp >= len(COMPRESSIONS):
            raise FormatError(f"{where}: unknown compression id {comp} (this reader knows 0..{len(COMPRESSIONS) - 1})")
        if ws not in (1, 2, 4):
            raise FormatError(f"{where}: bad word size {ws}")
        if rlen > MAX_SECTION_RAW or rlen % ws:
            raise FormatError(f"{where}: raw length {rlen} is over {MAX_SECTION_RAW} or not a multiple of the word "
                              f"size {ws}")
        if off < prev_end or off + slen > data_end:
            raise FormatError(f"{where}: index points outside the data area or overlaps the previous section "
                              f"(offset {off}, length {slen}, data ends at {data_end})")
        if off % ALIGN:
            raise FormatError(f"{where}: offset {off} is not a multiple of {ALIGN}")
        prev_end = off + slen
        records.append(SectionRecord(KINDS[kind], comp, ws, block, off, slen, rlen, crc, ncorr, aux, i))
    return records

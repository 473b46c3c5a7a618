"""The one schema a .bbf reader checks (SPEC.md section 7): the header's types, ranges and cross-field consistency,
then the index against the header and the codec, all before any section is fetched, allocated or decompressed.

`BBFReader` runs it on open, so `load`, `stream`, `bbf-inspect` and `bbf decode` see the same checks and the same
messages: every failure is a FormatError (VersionError, UnknownCodecError for those two cases) that names the key,
the tensor or the section. What passes is a `Header` whose every field is of its documented type, and an index in
which every record says exactly what the codec needs for its group.

    header = parse_header(header_bytes)                  # msgpack -> validated Header
    by_group, aux = check_index(records, header)         # records from layout.parse_index
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack

from ..codecs import get_codec
from ..codecs.base import Codec, SectionSpec
from ..errors import BBFError, FormatError, ModelError, UnknownCodecError, VersionError
from ..models.arch import ModelDesc
from ..words import WORD_DTYPES
from .header import tensor_table
from .layout import MAJOR, MAX_DIM, MAX_DIMS, MAX_NAME, MAX_SECTIONS, MAX_TENSORS, SectionRecord

# What decoding the header may build: msgpack turns one byte into an object of up to ~80 bytes (an empty map), so
# the header's length alone (<= 64 MiB) does not bound the memory its objects take. Real headers hold a few
# thousand maps and arrays (SmolLM2-135M: ~1,100).
MAX_CONTAINERS = 1 << 18  # maps and arrays, in all
MAX_ELEMENTS = 1 << 22  # array elements and map entries, in all
MAX_AUX = 1 << 16  # aux entries
MAX_AUX_RAW = 1 << 30  # raw length of an aux section (a tokenizer is ~2-35 MB)
MAX_TEXT = 1 << 20  # producer, media types, metadata values: characters each
_VERSION = re.compile(r"(\d{1,5})\.(\d{1,5})")


@dataclass
class Header:
    """A header that passed every check. `raw` is the decoded map (defaults filled in, unknown keys kept)."""

    raw: dict[str, Any]
    version: tuple[int, int]
    desc: ModelDesc
    dtype: str
    codec: Codec
    tensors: dict[str, dict[str, Any]]  # name -> table entry, in table order
    aux: list[dict[str, str]]
    metadata: dict[str, str]


def parse_header(data: bytes | memoryview) -> Header:
    """Header bytes (CRC already checked) -> a validated Header."""
    return validate_header(unpack(data))


def unpack(data: bytes | memoryview) -> Any:
    """msgpack -> Python objects, refusing a header that would build more than MAX_CONTAINERS maps and arrays or
    MAX_ELEMENTS entries before it is all built (so garbage cannot cost more memory than a real header)."""
    budget = [MAX_CONTAINERS, MAX_ELEMENTS]

    def count(obj):
        budget[0] -= 1
        budget[1] -= len(obj)
        if budget[0] < 0 or budget[1] < 0:
            raise _TooBig
        return obj

    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, object_hook=count,
                               list_hook=count)
    except _TooBig:
        raise FormatError(f"header holds more than {MAX_CONTAINERS} maps and arrays or {MAX_ELEMENTS} entries "
                          f"(the limits of SPEC section 7)") from None
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise FormatError(f"header is not valid msgpack: {e}") from None


class _TooBig(Exception):
    pass


def validate_header(h: Any) -> Header:
    """Check every key a reader uses, in the order SPEC section 7 lists them."""
    if not isinstance(h, dict):
        raise FormatError(f"header is a {type(h).__name__}, not a map")
    version = _version(h.get("format_version"))
    for key, typ in (("producer", str), ("dtype", str), ("model", dict), ("codec", dict), ("tensors", list),
                     ("aux", list), ("metadata", dict), ("stats", dict)):
        if key not in h and key in ("producer", "aux", "metadata", "stats"):  # optional: absent is fine, nil is not
            continue
        v = h.get(key)
        if not isinstance(v, typ):
            what = "missing" if key not in h else f"a {type(v).__name__}"
            raise FormatError(f"header: {key!r} is {what}, expected a {_TYPES[typ]}")
    h = dict(h)
    h.setdefault("aux", [])
    h.setdefault("metadata", {})
    h.setdefault("stats", {})
    if len(h.get("producer", "")) > MAX_TEXT:
        raise FormatError(f"header: producer is longer than {MAX_TEXT} characters")
    dtype = h["dtype"]
    if dtype not in WORD_DTYPES:
        raise FormatError(f"header: dtype {dtype!r} is not one of {sorted(WORD_DTYPES)}")
    codec = _codec(h["codec"])
    try:
        desc = ModelDesc.from_dict(h["model"])
    except ModelError as e:
        raise FormatError(f"header: model: {e}") from None
    tensors = _tensor_table(h["tensors"], desc, dtype)
    aux = _aux(h["aux"])
    metadata = h["metadata"]
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(v) > MAX_TEXT:
            raise FormatError(f"header: metadata entry {str(k)[:40]!r} is not a string of at most {MAX_TEXT} "
                              f"characters")
    return Header(h, version, desc, dtype, codec, tensors, aux, metadata)


_TYPES = {str: "string", dict: "map", list: "array"}


def _version(v: Any) -> tuple[int, int]:
    m = _VERSION.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise FormatError(f"header: format_version {str(v)[:40]!r} is not 'major.minor'")
    major, minor = int(m[1]), int(m[2])
    if major != MAJOR:
        raise VersionError(f"format version {v} is not supported by this reader (it reads {MAJOR}.x); "
                           f"upgrade bbformat")
    return major, minor


def _codec(c: dict) -> Codec:
    cid, params = c.get("id"), c.get("params", {})
    if not isinstance(cid, str):
        raise FormatError(f"header: codec.id is {type(cid).__name__}, expected a string")
    if not isinstance(params, dict):
        raise FormatError(f"header: codec.params is {type(params).__name__}, expected a map")
    try:
        return get_codec(cid, params).as_read()
    except UnknownCodecError:
        raise
    except BBFError as e:
        raise FormatError(f"header: codec.params: {e}") from None


def _tensor_table(table: list, desc: ModelDesc, dtype: str) -> dict[str, dict[str, Any]]:
    """The table must be exactly the one the model description implies: same order, names, shapes, dtype, groups,
    offsets. Its length is checked first, so a huge description costs nothing before it is refused."""
    n = desc.num_tensors()
    if len(table) > MAX_TENSORS or len(table) != n:
        raise FormatError(f"header: the tensor table lists {len(table)} tensors, the model description implies {n}")
    out: dict[str, dict[str, Any]] = {}
    for i, (entry, want) in enumerate(zip(table, tensor_table(desc, dtype))):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise FormatError(f"header: tensors[{i}] is not a map with a string name")
        name = entry["name"]
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
            raise FormatError(f"header: tensors[{i}] has a name longer than {MAX_NAME} bytes: {name[:40]!r}...")
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
                any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_DIM for s in shape):
            raise FormatError(f"header: tensor {name!r}: bad shape {str(shape)[:60]}")
        if name != want["name"]:
            raise FormatError(f"header: tensors[{i}] is {name!r}; the model description's tensor {i} is "
                              f"{want['name']!r}")
        for key in ("shape", "group", "offset", "dtype"):
            if entry.get(key) != want[key] or type(entry.get(key)) is not type(want[key]):
                raise FormatError(f"header: tensor {name!r}: {key} {str(entry.get(key))[:60]} does not match the "
                                  f"model description ({want[key]!r})")
        out[name] = entry
    return out


def _aux(aux: list) -> list[dict[str, str]]:
    if len(aux) > MAX_AUX:
        raise FormatError(f"header: aux lists {len(aux)} entries, over the limit of {MAX_AUX}")
    names = set()
    for i, a in enumerate(aux):
        if not isinstance(a, dict):
            raise FormatError(f"header: aux[{i}] is a {type(a).__name__}, expected a map")
        name, media = a.get("name"), a.get("media_type", "application/octet-stream")
        if not isinstance(name, str) or not 0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME:
            raise FormatError(f"header: aux[{i}].name must be a string of 1..{MAX_NAME} bytes, got "
                              f"{str(name)[:40]!r}")
        if not isinstance(media, str) or len(media) > MAX_TEXT:
            raise FormatError(f"header: aux[{i}].media_type must be a string")
        if name in names:
            raise FormatError(f"header: aux name {name!r} appears twice")
        names.add(name)
    return aux


# ---- the index against the header ---------------------------------------------------------------------------
def expected_sections(header: Header) -> list[tuple[str, SectionSpec]]:
    """(group, spec) of every model section, in file order (SPEC section 3)."""
    specs = header.codec.section_specs(header.desc, header.dtype)
    return [(g, spec) for g in header.desc.groups() for spec in specs[g]]


def check_index(records: list[SectionRecord], header: Header
                ) -> tuple[dict[str, dict[str, SectionRecord]], list[SectionRecord]]:
    """Every record must be the section the codec writes at that place, with the word size and raw length it
    needs for that group (so no section can make the reader allocate more than the tensor table implies, plus the
    codec's side data); then one aux section per header aux entry, in order. Returns (group -> kind -> record,
    aux records by aux id)."""
    want = expected_sections(header)
    n_model, n_aux = len(want), len(header.aux)
    if len(records) != n_model + n_aux:
        raise FormatError(f"the index lists {len(records)} sections; the header (codec {header.codec.id!r}, "
                          f"{header.desc.num_layers} layers, {n_aux} aux) implies {n_model + n_aux}")
    if n_model + n_aux > MAX_SECTIONS:
        raise FormatError(f"the header implies {n_model + n_aux} sections, over the limit of {MAX_SECTIONS}")
    by_group: dict[str, dict[str, SectionRecord]] = {}
    cid = header.codec.id
    for rec, (group, spec) in zip(records, want):
        block = int(group.split(".")[1]) if group.startswith("layer.") else -1
        if rec.kind != spec.kind or rec.block != block:
            raise FormatError(f"{rec.label}: a {rec.kind} section (block {rec.block}) where codec {cid!r} writes the "
                              f"{spec.kind} section of {group}")
        if rec.word_size != spec.word_size:
            raise FormatError(f"{rec.label}: word size {rec.word_size}, codec {cid!r} writes {spec.word_size} for "
                              f"the {spec.kind} section of {group}")
        if not spec.min_raw <= rec.raw_len <= spec.max_raw:
            need = f"{spec.min_raw}" if spec.min_raw == spec.max_raw else f"{spec.min_raw}..{spec.max_raw}"
            raise FormatError(f"{rec.label}: raw length {rec.raw_len} bytes; codec {cid!r} needs {need} for the "
                              f"{spec.kind} section of {group} (from the tensor table)")
        if rec.corrections > spec.max_records:
            raise FormatError(f"{rec.label}: {rec.corrections} correction records, more than the {spec.max_records} "
                              f"values they can correct")
        if rec.aux_id:
            raise FormatError(f"{rec.label}: aux id {rec.aux_id} on a {rec.kind} section (must be 0)")
        _check_stored(rec)
        by_group.setdefault(group, {})[rec.kind] = rec
    aux_recs = records[n_model:]
    for i, rec in enumerate(aux_recs):
        if rec.kind != "aux" or rec.aux_id != i or rec.block != -1:
            raise FormatError(f"{rec.label}: expected the section of aux {i} ({header.aux[i]['name']!r}) here")
        if rec.word_size != 1:
            raise FormatError(f"{rec.label}: word size {rec.word_size}, aux sections are bytes (1)")
        if rec.raw_len > MAX_AUX_RAW:
            raise FormatError(f"{rec.label}: raw length {rec.raw_len} bytes, over the limit of {MAX_AUX_RAW} for "
                              f"an aux section")
        if rec.corrections:
            raise FormatError(f"{rec.label}: correction records on an aux section")
        _check_stored(rec)
    return by_group, aux_recs


def _check_stored(rec: SectionRecord) -> None:
    """Stored and raw lengths must agree with the compression id (SPEC 13: method 0 stores the payload as it is,
    an empty payload is stored with method 0)."""
    if rec.compression == 0 and rec.stored_len != rec.raw_len:
        raise FormatError(f"{rec.label}: stored length {rec.stored_len} != raw length {rec.raw_len} with "
                          f"compression none")
    if rec.compression != 0 and (rec.raw_len == 0 or rec.stored_len == 0):
        raise FormatError(f"{rec.label}: an empty payload must be stored with compression none")

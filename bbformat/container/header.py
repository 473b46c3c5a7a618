"""The msgpack header: build it (writer) and validate it (reader).

The header says what the file holds: format version, producer, the model description, the word dtype, the codec
(id, parameters, state) and the tensor table (name, shape, dtype, group, offset of its words in the group's
decoded word sequence). Unknown keys are ignored (SPEC.md, "Versioning"); everything a reader uses is checked.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .. import __version__
from ..errors import FormatError, ModelError
from ..models.arch import ModelDesc
from ..words import WORD_DTYPES
from .layout import MAJOR, MAX_DIM, MAX_DIMS, MAX_NAME, MAX_TENSORS, MINOR


def tensor_table(desc: ModelDesc, dtype: str) -> list[dict[str, Any]]:
    table, offsets = [], {}
    for t in desc.tensors():
        off = offsets.get(t.group, 0)
        table.append({"name": t.name, "shape": list(t.shape), "dtype": dtype, "group": t.group, "offset": off})
        offsets[t.group] = off + t.numel
    return table


def build_header(desc: ModelDesc, dtype: str, codec_config: dict, aux: list[dict], metadata: dict | None,
                 stats: dict | None) -> bytes:
    header = {
        "format_version": f"{MAJOR}.{MINOR}",
        "producer": f"bbformat {__version__}",
        "model": desc.to_dict(),
        "dtype": dtype,
        "codec": codec_config,
        "tensors": tensor_table(desc, dtype),
        "aux": aux,
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
        "stats": stats or {},
    }
    return msgpack.packb(header, use_bin_type=True)


def parse_header(data: bytes) -> dict[str, Any]:
    try:
        h = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise FormatError(f"header is not valid msgpack: {e}") from None
    if not isinstance(h, dict):
        raise FormatError("header is not a map")
    for key, typ in (("format_version", str), ("model", dict), ("dtype", str), ("codec", dict),
                     ("tensors", list)):
        if not isinstance(h.get(key), typ):
            raise FormatError(f"header key {key!r} is missing or not a {typ.__name__}")
    if h["dtype"] not in WORD_DTYPES:
        raise FormatError(f"header: unknown word dtype {h['dtype']!r}")
    if not isinstance(h["codec"].get("id"), str) or not isinstance(h["codec"].get("params", {}), dict):
        raise FormatError("header: codec must have a string id and a params map")
    if len(h["tensors"]) > MAX_TENSORS:
        raise FormatError(f"header lists {len(h['tensors'])} tensors, over the limit of {MAX_TENSORS}")
    h.setdefault("aux", [])
    h.setdefault("metadata", {})
    h.setdefault("stats", {})
    return h


def check_tensor_table(h: dict[str, Any], desc: ModelDesc) -> dict[str, dict[str, Any]]:
    """The table must be exactly the one the model description implies (names, shapes, groups, offsets)."""
    want = {t["name"]: t for t in tensor_table(desc, h["dtype"])}
    table: dict[str, dict[str, Any]] = {}
    for entry in h["tensors"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise FormatError("tensor table entry without a name")
        name = entry["name"]
        if len(name.encode()) > MAX_NAME:
            raise FormatError(f"tensor name longer than {MAX_NAME} bytes: {name[:40]!r}...")
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
                any(not isinstance(s, int) or not 0 <= s <= MAX_DIM for s in shape):
            raise FormatError(f"tensor {name!r}: bad shape {shape!r}")
        if name not in want:
            raise ModelError(f"tensor {name!r} is not part of the model the header describes")
        if name in table:
            raise FormatError(f"tensor {name!r} appears twice in the tensor table")
        w = want[name]
        for key in ("shape", "group", "offset", "dtype"):
            if entry.get(key) != w[key]:
                raise FormatError(f"tensor {name!r}: {key} {entry.get(key)!r} does not match the model "
                                  f"description ({w[key]!r})")
        table[name] = entry
    missing = set(want) - set(table)
    if missing:
        raise FormatError(f"tensor table is missing {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")
    return table

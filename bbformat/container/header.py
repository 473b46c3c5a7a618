"""The msgpack header: build it (writer). A reader validates it with `schema.parse_header` (SPEC.md section 7).

The header says what the file holds: format version, producer, the model description, the word dtype, the codec
(id, parameters, state) and the tensor table (name, shape, dtype, group, offset of its words in the group's
decoded word sequence). Unknown keys are ignored (SPEC.md, "Versioning"); everything a reader uses is checked.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .. import __version__
from ..models.arch import ModelDesc
from .layout import MAJOR, MINOR


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

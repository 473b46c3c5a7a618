"""bbformat: SliceGPT-pruned LLM weights in fewer bits, loaded lazily from disk, HTTP or S3.

    bbformat.save(tensors, "model.bbf", model=desc, codec="exact")
    with bbformat.open("s3://bucket/model.bbf") as f:
        w = f.get_tensor("lm_head.weight")

`import bbformat` is cheap: it imports only the error classes. Every other public name (and every subpackage,
`bbformat.codecs`, `bbformat.models`, ...) is imported on first use, so `bbf --help` needs neither torch nor numpy;
`from bbformat import save` works as before.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import (  # noqa: F401,E402
    BBFError, ChecksumError, FormatError, ModelError, ObjectChangedError, RangeNotSupportedError, TransportError,
    TruncatedError, UnknownCodecError, VersionError, WriteError,
)

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "ModelDesc": ".models.arch",
    "FetchOptions": ".io.fetch",
    "BBFReader": ".container.reader",
    "load": ".container.reader",
    "loads": ".container.reader",
    "open": ".container.reader",
    "BBFWriter": ".container.writer",
    "save": ".container.writer",
    "load_model": ".models.loader",
    "load_pretrained": ".models.loader",
    "Stage": ".models.stage",
    "StageError": ".models.stage",
    "pipeline_stage": ".models.stage",
    "stage_bytes": ".models.stage",
    # the transformers model: imported, and registered with the Auto classes, on first use
    "SlicedForCausalLM": ".models.modeling",
    "SlicedConfig": ".models.modeling",
}
_SUBPACKAGES = ("cli", "codecs", "container", "io", "models", "errors", "evaluate", "fuzz", "kernels", "serve",
                "words")

# `from bbformat import *`: everything but the transformers model (transformers is an optional dependency)
__all__ = ["__version__", "BBFError", "ChecksumError", "FormatError", "ModelError", "ObjectChangedError",
           "RangeNotSupportedError", "TransportError", "TruncatedError", "UnknownCodecError", "VersionError",
           "WriteError", *(n for n in _LAZY if not n.startswith("Sliced"))]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module("." + name, __name__)
    else:
        raise AttributeError(f"module 'bbformat' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))

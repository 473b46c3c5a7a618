"""bbformat: SliceGPT-pruned LLM weights in fewer bits, loaded lazily from disk, HTTP or S3.

    bbformat.save(tensors, "model.bbf", model=desc, codec="exact")
    with bbformat.open("s3://bucket/model.bbf") as f:
        w = f.get_tensor("lm_head.weight")
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    BBFError, ChecksumError, FormatError, ModelError, ObjectChangedError, RangeNotSupportedError, TransportError,
    TruncatedError, UnknownCodecError, VersionError, WriteError,
)
from .models.arch import ModelDesc  # noqa: F401,E402
from .io.fetch import FetchOptions  # noqa: F401,E402
from .container.reader import BBFReader, load, loads, open  # noqa: F401,E402,A004
from .container.writer import BBFWriter, save  # noqa: F401,E402
from .models.loader import load_model, load_pretrained  # noqa: F401,E402


def __getattr__(name):  # the transformers model: imported, and registered with the Auto classes, on first use
    if name in ("SlicedForCausalLM", "SlicedConfig"):
        from .models import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'bbformat' has no attribute {name!r}")

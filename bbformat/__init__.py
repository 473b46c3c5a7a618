"""bbformat: SliceGPT-pruned LLM weights in fewer bits, loaded lazily from disk, HTTP or S3."""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    BBFError, ChecksumError, FormatError, ModelError, RangeNotSupportedError, TruncatedError,
    UnknownCodecError, VersionError, VerifyError,
)

"""One error hierarchy for everything a .bbf reader or writer can refuse.

Every message names the problem and, where there is one, the section, so that the CLI can print a single line.
"""

from __future__ import annotations


class BBFError(ValueError):
    """Base class of every error bbformat raises on bad input or a bad file."""


class FormatError(BBFError):
    """The bytes are not a valid .bbf file (bad magic, bad layout, limits exceeded)."""


class TruncatedError(FormatError):
    """The file is shorter than its footer or index says."""


class VersionError(FormatError):
    """The file needs a newer reader (unknown major version)."""


class UnknownCodecError(BBFError):
    """The file, or the caller, names a codec id this reader does not know."""


class ChecksumError(BBFError):
    """A section's bytes do not match the checksum recorded in the index."""


class TransportError(BBFError):
    """Reading from storage failed (after retries, where the failure was transient); names the URL, the byte range
    and the cause."""


class RangeNotSupportedError(TransportError):
    """An HTTP server ignored a Range request (answered 200 with the whole body)."""


class ObjectChangedError(TransportError):
    """The remote object was replaced while it was being read (its ETag, Last-Modified or size changed)."""


class ModelError(BBFError):
    """A checkpoint, slicing config, HF config or GGUF file is malformed or does not match the SliceGPT layout the
    header or its JSON describes."""


class WriteError(BBFError):
    """Writing an output failed (disk full, permission denied, a directory or a read-only file in the way); names
    the path and the cause. Nothing is left under the target name, and an existing target is untouched."""


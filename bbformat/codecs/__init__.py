"""Symmetry codecs (raw, bitsback, exact) and the entropy stage. Importing this package registers them."""

from .base import Codec, codec_ids, get_codec, register_codec  # noqa: F401
from . import raw  # noqa: F401,E402  (registers "raw")
from . import exact  # noqa: F401,E402  (registers "exact")
from . import bitsback  # noqa: F401,E402  (registers "bitsback")

"""What every command shares: one-line errors with documented exit codes, storage options for remote URLs.

Parsing the arguments (and `--help`) imports neither torch nor the codecs: each command imports what it needs
when it runs (tests/test_cli_help.py checks this).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from ..errors import BBFError, TransportError, WriteError
from ..io.fetch import FetchOptions

# What the parser offers, without importing the codec registry or bbformat.words (both import torch);
# tests/test_cli_help.py checks them against codecs.codec_ids() and words.WORD_DTYPES.
CODEC_IDS = ("bitsback", "exact", "raw")
WORD_DTYPE_NAMES = ("float16", "bfloat16", "float32")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_REFUSED, EXIT_IO, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

EXIT_CODES = """exit status:
  0    success
  1    a check failed: bbf verify found values over the threshold, bbf-inspect a checksum mismatch
  2    bad usage, or the input was refused: not a valid .bbf file, a corrupt section, a bad slicing config,
       checkpoint, HF config or GGUF file (one line on stderr names the file, field, section or URL)
  3    reading or writing failed: a network error, an object changed while reading, a full disk, permission
       denied, a directory or a read-only file in the way, out of memory (nothing is left under the output name)
  4    internal error: a bug, please report it
  130  interrupted
Errors are one line on stderr; set BBF_DEBUG=1 to get the Python traceback instead."""


def run_cli(fn: Callable[[], int], prog: str) -> int:
    """Run a command; any failure becomes one line on stderr and an exit code from EXIT_CODES, never a traceback
    (unless BBF_DEBUG=1)."""
    debug = os.environ.get("BBF_DEBUG", "") not in ("", "0")
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every failure ends here, as one line
        if debug:
            raise
        code, msg = describe(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return code


def describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ends a command."""
    text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    if isinstance(e, (TransportError, WriteError)):
        return EXIT_IO, text
    if isinstance(e, (BBFError, KeyError)):
        return EXIT_REFUSED, text
    if isinstance(e, OSError):
        return EXIT_IO, text or type(e).__name__
    if isinstance(e, MemoryError):
        return EXIT_IO, "out of memory" + (f" ({text})" if text else "")
    return EXIT_INTERNAL, (f"internal error, {type(e).__name__}: {text} (a bug: please report it; BBF_DEBUG=1 "
                           f"shows the traceback)")


def add_storage_args(p: argparse.ArgumentParser, reads: bool = True) -> None:
    p.add_argument("--storage-options", metavar="JSON", default=None,
                   help='fsspec options for remote URLs, e.g. \'{"anon": true}\' or '
                        '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\' (default: none)')
    if not reads:
        return
    d = FetchOptions()
    g = p.add_argument_group("remote reads (http, s3)")
    g.add_argument("--concurrency", type=int, default=d.concurrency, help=f"requests in flight (default {d.concurrency})")
    g.add_argument("--chunk-mb", type=float, default=d.chunk_size / 2**20,
                   help=f"MiB per ranged request (default {d.chunk_size >> 20})")
    g.add_argument("--retries", type=int, default=d.retries,
                   help=f"failed attempts allowed per chunk (default {d.retries})")
    g.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help=f"seconds without data before an attempt fails (default {d.read_timeout:g})")


def fetch_options(args: argparse.Namespace) -> FetchOptions:
    return FetchOptions.coerce({"concurrency": args.concurrency, "chunk_size": max(1, int(args.chunk_mb * 2**20)),
                                "retries": args.retries, "read_timeout": args.read_timeout})


def storage_options(args: argparse.Namespace) -> dict | None:
    raw = getattr(args, "storage_options", None)
    if not raw:
        return None
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BBFError(f"--storage-options is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise BBFError("--storage-options must be a JSON object")
    return opts

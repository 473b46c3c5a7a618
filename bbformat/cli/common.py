"""What every command shares: one-line errors, storage options for remote URLs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from ..errors import BBFError
from ..io.fetch import FetchOptions


def run_cli(fn: Callable[[], int], prog: str) -> int:
    """Run a command; bad input becomes one line on stderr and a non-zero exit, never a traceback."""
    try:
        return fn()
    except BBFError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"{prog}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def add_storage_args(p: argparse.ArgumentParser, reads: bool = True) -> None:
    p.add_argument("--storage-options", metavar="JSON", default=None,
                   help='fsspec options for remote URLs, e.g. \'{"anon": true}\' or '
                        '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
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

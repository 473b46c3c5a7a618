"""What every command shares: one-line errors, storage options for remote URLs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from ..errors import BBFError


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


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", metavar="JSON", default=None,
                   help='fsspec options for remote URLs, e.g. \'{"anon": true}\' or '
                        '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')


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

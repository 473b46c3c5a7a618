"""A small static HTTP server with Range support (`bbf serve DIR`), for local demos and tests.

Python's http.server ignores Range headers; remote .bbf reads need them. This adds single-range support
(`bytes=a-b`, `bytes=a-`, `bytes=-n`) with 206 / Content-Range answers and 416 for unsatisfiable ranges.
Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import os
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeRequestHandler(SimpleHTTPRequestHandler):
    honour_range = True

    def log_message(self, fmt, *args):  # quiet: tests and demos print their own progress
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        rng = self.headers.get("Range") if self.honour_range else None
        if rng is None or not os.path.isfile(path):
            return super().send_head()
        m = _RANGE.match(rng.strip())
        size = os.path.getsize(path)
        if not m or (not m.group(1) and not m.group(2)):
            self.send_error(416, "bad range")
            return None
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # suffix range: the last n bytes
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0:
            chunk = source.read(min(1 << 20, remaining))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


class NoRangeHandler(RangeRequestHandler):
    """Behaves like Python's http.server: answers 200 with the whole body whatever the Range header says."""

    honour_range = False


def start_server(directory: str, host: str = "127.0.0.1", port: int = 0, honour_range: bool = True):
    """Start a threaded server in the background; returns (server, base_url). Stop with server.shutdown()."""
    handler = RangeRequestHandler if honour_range else NoRangeHandler
    server = ThreadingHTTPServer((host, port), partial(handler, directory=str(directory)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="bbf-http", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"

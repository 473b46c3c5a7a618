"""A small loopback HTTP server for .bbf files: `bbf serve`, network faults for the tests, caps for benchmarks.

    server, url = start_server(directory, rate=1000e6, conn_rate=25e6, latency=0.02, faults=FaultPlan())
    ...
    server.shutdown(); server.server_close()

    python -m bbformat.serve DIR --port 0 --rate 1000e6 --conn-rate 25e6 --latency 0.02   # prints "serving <url>"

GET and HEAD on the files under DIR over HTTP/1.1 keep-alive, with single byte ranges (`bytes=a-b`, `bytes=a-`,
`bytes=-n` -> 206, unsatisfiable -> 416), a strong ETag, If-Match (412) and If-Range (200 when it does not match).
`honour_range=False` answers like Python's http.server: 200 and the whole body whatever the Range header says.
`rate` caps the bandwidth of all connections together, `conn_rate` that of each response (bytes/s); `latency` is
slept before every status line. A `FaultPlan` makes chosen requests fail (resets, error statuses, short bodies,
stalls, ignored ranges, missing Content-Length) and logs every request served. Stdlib only, so the file also runs
as a plain script (`python bbformat/serve.py DIR`) without importing the bbformat package.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque, namedtuple
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

READ_SLICE = 256 << 10  # file reads: a range body is never loaded whole
SEND_SLICE = 64 << 10  # throttled sends: small slices keep capped rates smooth across 16+ connections; the
# slice grows to ~1 ms of the tightest cap (up to READ_SLICE), so 1000 MB/s does not cost 15k sleeps a second
SENDFILE_SLICE = 4 << 20  # uncapped sends: zero-copy, in slices so the log knows how far a broken transfer got
IDLE_TIMEOUT = 15.0  # an idle keep-alive connection is dropped after this; it never holds up shutdown
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")  # one range; multipart answers are out of scope
_CUTS = ("reset", "short", "stall")  # the actions that act `after` some body bytes

Served = namedtuple("Served", "method path range status sent fault")
Served.__doc__ = "One request: method, URL path, Range header, status (None if none was sent), body bytes, fault."


class TokenBucket:
    """A thread-safe bandwidth cap. take(n) books n bytes and sleeps off the debt, so concurrent senders share `rate`
    and the time a sleep overshoots is credited back (the bucket refills by wall time), instead of being lost. The
    bucket holds at most ~2 ms of credit, so an idle spell does not turn into a burst above the cap."""

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.burst = max(2 * SEND_SLICE, self.rate * 0.002)
        self.tokens, self.t = 0.0, time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate) - n
            self.t = now
            debt = -self.tokens / self.rate
        if debt > 0:
            time.sleep(debt)  # outside the lock: the others book their own slices meanwhile


class RequestLog:
    """Thread-safe record of the requests served (the latest 100k), each added as its response ends."""

    def __init__(self, maxlen: int = 100_000):
        self._items: deque[Served] = deque(maxlen=maxlen)
        self._cond = threading.Condition()

    def add(self, item: Served) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def entries(self, path: str | None = None, method: str | None = None) -> list[Served]:
        """The requests whose path ends with `path` and whose method is `method` (both optional)."""
        with self._cond:
            items = list(self._items)
        return [s for s in items if (path is None or s.path.endswith(path)) and (method is None or s.method == method)]

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until n requests are logged. The client can read a body's last byte before the server logs it."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._items) >= n, timeout)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def __iter__(self):
        return iter(self.entries())


@dataclass
class Rule:
    """One fault. It matches requests by path suffix, method and "the requested bytes contain `offset`" (a request
    without Range asks for the whole file); it fires from the `nth` match on, `times` times (None: for ever)."""

    action: str
    path: str | None = None
    method: str | None = None
    offset: int | None = None
    nth: int = 1
    times: int | None = 1
    after: int | None = 0  # reset/short/stall: after this many body bytes; None: before the status line
    code: int = 503  # status
    retry_after: float | None = None  # status: Retry-After seconds
    seconds: float = 0.0  # stall
    close: bool = False  # stall: close the connection cleanly after the stall instead of going on
    seen: int = 0  # requests that matched the filters while the rule was live
    fired: int = 0

    def _matches(self, method: str, path: str, span: tuple[int, int] | None) -> bool:
        return ((self.times is None or self.fired < self.times)
                and (self.path is None or path.endswith(self.path))
                and (self.method is None or method == self.method)
                and (self.offset is None or (span is not None and span[0] <= self.offset <= span[1])))


class FaultPlan:
    """The faults a server injects, first live matching rule first, at most one per request; and its request log.

        plan = FaultPlan()
        plan.reset(after=4096, path=".bbf", offset=1 << 20)   # RST mid-body, once, on a request covering byte 1 MiB
        plan.status(503, retry_after=1, times=2)              # the next two requests get 503 + Retry-After: 1
        plan.short(after=100, method="GET", nth=3)            # the 3rd GET ends cleanly after 100 body bytes
        plan.stall(5.0, after=0)                              # headers, then 5 s of silence, then the body
        plan.ignore_range(path="m.bbf")                       # 200 with the whole body
        plan.no_content_length(method="HEAD")                 # no Content-Length; the connection closes
        server, url = start_server(d, faults=plan); ...; plan.log.entries(method="GET"); plan.clear()
    """

    ACTIONS = (*_CUTS, "status", "ignore_range", "no_content_length")

    def __init__(self):
        self.rules: list[Rule] = []
        self.log = RequestLog()
        self._lock = threading.Lock()

    def add(self, action: str, **kw) -> Rule:
        if action not in self.ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; one of {self.ACTIONS}")
        rule = Rule(action, **kw)
        with self._lock:
            self.rules.append(rule)
        return rule

    def reset(self, after: int | None = 0, **match) -> Rule:
        """Abort the TCP connection (RST) after `after` body bytes."""
        return self.add("reset", after=after, **match)

    def status(self, code: int, retry_after: float | None = None, **match) -> Rule:
        """Answer `code` with a small body (keep-alive), and a Retry-After header if given."""
        return self.add("status", code=code, retry_after=retry_after, **match)

    def short(self, after: int, **match) -> Rule:
        """Declare the full Content-Length but close cleanly (FIN) after `after` body bytes."""
        return self.add("short", after=after, **match)

    def stall(self, seconds: float, after: int | None = 0, close: bool = False, **match) -> Rule:
        """Go silent for `seconds` after `after` body bytes, then go on (or close cleanly, with close=True)."""
        return self.add("stall", seconds=seconds, after=after, close=close, **match)

    def ignore_range(self, **match) -> Rule:
        """Answer 200 with the whole body, as a server without Range support does."""
        return self.add("ignore_range", **match)

    def no_content_length(self, **match) -> Rule:
        """Omit Content-Length (HEAD or GET); the connection then closes after the response."""
        return self.add("no_content_length", **match)

    def clear(self) -> None:
        """Drop every rule and empty the log."""
        with self._lock:
            self.rules.clear()
        self.log.clear()

    def pick(self, method: str, path: str, span: tuple[int, int] | None) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule._matches(method, path, span):
                    rule.seen += 1
                    if rule.seen >= rule.nth:
                        rule.fired += 1
                        return rule
        return None


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range clipped to the file, or None if unsatisfiable or malformed."""
    m = _RANGE.match(header.strip())
    if not m or not (m.group(1) or m.group(2)) or size == 0:
        return None
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        return (start, end) if start <= end else None  # start beyond the end, or b < a
    n = int(m.group(2))  # suffix range: the last n bytes
    return (max(0, size - n), size - 1) if n else None


class RangeRequestHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: so every reply below carries a Content-Length
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True  # headers and body are separate writes; Nagle + delayed ACKs would add 40 ms
    server_version = "bbf-serve"
    honour_range = True

    def log_message(self, fmt, *args):  # quiet: the request log is in server.log
        pass

    def setup(self):
        super().setup()
        self.server._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server._track(self.connection, False)

    def send_response(self, code, message=None):
        if self.server.latency:
            time.sleep(self.server.latency)  # first-byte latency, error replies included
        self._status = code
        super().send_response(code, message)

    def do_GET(self):
        self._status, self._sent, self._fault = None, 0, None
        try:
            path = self.translate_path(self.path)
            if os.path.isdir(path):  # listing, index.html or redirect, as http.server does
                f = self.send_head()
                if f:
                    with f:
                        if self.command == "GET":
                            self.copyfile(f, self.wfile)
                return
            try:
                f = open(path, "rb")
            except OSError:
                return self._respond(None)
            with f:
                self._respond(f)
        finally:
            self.server.log.add(Served(self.command, urlsplit(self.path).path, self.headers.get("Range"),
                                       self._status, self._sent, self._fault))

    do_HEAD = do_GET

    def _respond(self, f):
        st = os.fstat(f.fileno()) if f else None  # of the open file: a concurrent replace cannot mix versions
        size = st.st_size if st else 0
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"' if st else None
        modified = email.utils.formatdate(st.st_mtime, usegmt=True) if st else None
        rng = self.headers.get("Range") if self.honour_range else None
        ranged = rng is not None and rng.strip().startswith("bytes=")  # other units are ignored (RFC 9110 14.2)
        if ranged and "If-Range" in self.headers:
            ranged = self._if_range(self.headers["If-Range"], etag, st)
        span = _parse_range(rng, size) if ranged else (0, size - 1)

        faults = self.server.faults
        rule = faults.pick(self.command, urlsplit(self.path).path, span if st and size else None) if faults else None
        act = rule.action if rule else None
        self._fault = act
        if act in _CUTS and rule.after is None:  # before the status line
            if act == "stall":
                time.sleep(rule.seconds)
                if rule.close:
                    self.close_connection = True
                    return
                act = None
            elif act == "reset":
                return self._abort()
            else:
                self.close_connection = True
                return
        if act == "status":
            extra = [("Retry-After", f"{rule.retry_after:g}")] if rule.retry_after is not None else []
            return self._reply(rule.code, "injected fault", extra)
        if f is None:
            return self._reply(404, "not found")
        if not self._if_match(self.headers.get("If-Match"), etag):
            return self._reply(412, "precondition failed: If-Match")
        if act == "ignore_range":
            ranged, span = False, (0, size - 1)
        if span is None:
            return self._reply(416, "range not satisfiable", [("Content-Range", f"bytes */{size}")])

        start, end = span
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Type", self.guess_type(f.name))
        self.send_header("Last-Modified", modified)
        self.send_header("ETag", etag)
        if self.honour_range:
            self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if act == "no_content_length":
            self.send_header("Connection", "close")  # the body then ends where the connection does
        else:
            self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._body(f, start, end - start + 1 if self.command == "GET" else 0, rule if act in _CUTS else None)

    def _body(self, f, start: int, length: int, cut: Rule | None):
        first = length if cut is None else min(cut.after, length)
        buckets = [b for b in (TokenBucket(self.server.conn_rate) if self.server.conn_rate else None,
                               self.server.bucket) if b]
        piece = max(SEND_SLICE, min(READ_SLICE, int(min((b.rate for b in buckets), default=0) * 1e-3)))
        self._copy(f, start, first, buckets, piece)
        if cut is not None and cut.action == "stall":
            time.sleep(cut.seconds)
            if not cut.close:
                self._copy(f, start + first, length - first, buckets, piece)
                cut = None
        if cut is not None and cut.action == "reset":
            return self._abort()
        if cut is not None or self._sent < length:  # a short body (or the file shrank): end with a clean FIN
            self.close_connection = True

    def _copy(self, f, offset: int, count: int, buckets: list[TokenBucket], piece: int):
        end = offset + count
        if not buckets:
            while offset < end:
                n = self.connection.sendfile(f, offset, min(SENDFILE_SLICE, end - offset))
                if not n:
                    return
                offset += n
                self._sent += n
            return
        buf = memoryview(bytearray(min(READ_SLICE, count) or 1))
        f.seek(offset)
        while offset < end:
            n = f.readinto(buf[:min(len(buf), end - offset)])
            if not n:
                return
            for i in range(0, n, piece):
                chunk = buf[i:min(n, i + piece)]
                for b in buckets:
                    b.take(len(chunk))
                self.connection.sendall(chunk)
                self._sent += len(chunk)
            offset += n

    def _reply(self, code: int, text: str, headers=()):
        """A small text reply that keeps the connection alive (http.server's send_error closes it)."""
        body = f"{code} {text}\n".encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    def _abort(self):
        # SO_LINGER 0 then close: the kernel sends RST, so the client sees a reset rather than a clean end of
        # stream. The descriptor really closes in finish(), when the handler's reader lets go of it.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    @staticmethod
    def _if_match(header: str | None, etag: str) -> bool:
        if header is None:
            return True
        tags = [t.strip() for t in header.split(",")]
        return "*" in tags or etag in tags  # strong comparison: a W/ tag never equals ours

    @staticmethod
    def _if_range(header: str, etag: str | None, st) -> bool:
        header = header.strip()
        if header.startswith(('"', "W/")):
            return header == etag
        try:  # a date: the range holds only if it is exactly the file's Last-Modified
            return st is not None and email.utils.parsedate_to_datetime(header).timestamp() == int(st.st_mtime)
        except (TypeError, ValueError):
            return False


class NoRangeHandler(RangeRequestHandler):
    """Behaves like Python's http.server: answers 200 with the whole body whatever the Range header says."""

    honour_range = False


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled or idle connection never keeps the process (or server_close) waiting
    request_queue_size = 128  # clients open 16+ connections at once; a backlog of 5 would drop SYNs

    def __init__(self, address, handler, *, rate=None, conn_rate=None, latency=None, faults=None):
        self._live: set[socket.socket] = set()  # before binding: a failed bind calls server_close()
        self._live_lock = threading.Lock()
        super().__init__(address, handler)
        self.bucket = TokenBucket(rate) if rate else None  # shared by every connection
        self.conn_rate = conn_rate or None
        self.latency = latency or 0.0
        self.faults = faults
        self.log = faults.log if faults is not None else RequestLog()
        self.connections = 0  # accepted so far: lets tests check that keep-alive reused one

    def _track(self, sock, alive: bool):
        with self._live_lock:
            if alive:
                self._live.add(sock)
                self.connections += 1
            else:
                self._live.discard(sock)

    def server_close(self):
        """Close the listener and every open connection, so idle keep-alive clients see EOF at once."""
        super().server_close()
        with self._live_lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up mid-body is routine, not news
            super().handle_error(request, client_address)


def start_server(directory, host: str = "127.0.0.1", port: int = 0, honour_range: bool = True, *,
                 rate: float | None = None, conn_rate: float | None = None, latency: float | None = None,
                 faults: FaultPlan | None = None):
    """Serve `directory` from a background thread; returns (server, base_url). Stop with server.shutdown() then
    server.server_close(). rate / conn_rate: bytes/s for all connections / each response; latency: seconds before
    each status line; None or 0: none. faults: a FaultPlan; server.log is its log (or a fresh RequestLog)."""
    handler = RangeRequestHandler if honour_range else NoRangeHandler
    server = Server((host, port), partial(handler, directory=str(directory)),
                    rate=rate, conn_rate=conn_rate, latency=latency, faults=faults)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},  # shutdown() waits one poll
                     name="bbf-http", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bbformat.serve", description="Serve DIR over HTTP with Range "
                                "support until SIGTERM/SIGINT; prints one line, `serving <base_url>`.")
    p.add_argument("directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    p.add_argument("--rate", type=float, default=None, help="total bandwidth cap, bytes/s (e.g. 1000e6)")
    p.add_argument("--conn-rate", type=float, default=None, help="per-response bandwidth cap, bytes/s")
    p.add_argument("--latency", type=float, default=None, help="seconds before each status line")
    p.add_argument("--no-range", action="store_true", help="ignore Range headers, like Python's http.server")
    a = p.parse_args(argv)
    server, url = start_server(a.directory, a.host, a.port, not a.no_range,
                               rate=a.rate, conn_rate=a.conn_rate, latency=a.latency)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

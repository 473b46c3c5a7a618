"""Storage: byte ranges for the reader, atomic writes for the writer.

A reader needs `size`, `read(start, end)` and `fetch(ranges)`, a future of buffers. Three stores provide them:
LocalStore (a memory-mapped local file: views, no copies), BufferStore (a .bbf already in memory) and RemoteStore
(http(s)://, s3:// or any other fsspec URL, through the fetch engine in fetch.py: concurrent ranged requests,
retries, the object pinned at open). `open_store` picks one from the URL.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import mmap
import os
import uuid

import fsspec

from ..errors import BBFError, TruncatedError
from .fetch import Fetcher, FetchOptions, FetchStats, done


class Store:
    """Read-only random access to one file: `size`, `read(start, end)`, `view(start, end)` and `fetch(ranges)` (a
    future of buffers: the reader's path for sections). `stats` counts what was read."""

    url: str
    size: int

    def __init__(self):
        self.stats = FetchStats()

    @property
    def bytes_read(self) -> int:
        return self.stats.bytes

    @property
    def requests(self) -> int:
        return self.stats.requests

    @property
    def budget(self) -> int:
        """How many bytes a reader may keep fetched ahead of decoding."""
        return 1 << 62

    def view(self, start: int, end: int) -> bytes | memoryview:
        return self.fetch([(start, end)]).result()[0]

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file; exactly that many or an error."""
        return bytes(self.view(start, end))

    def fetch(self, ranges: list[tuple[int, int]]) -> concurrent.futures.Future:  # pragma: no cover
        raise NotImplementedError

    def _check(self, ranges) -> None:
        for start, end in ranges:
            if not 0 <= start <= end <= self.size:
                raise TruncatedError(f"read of bytes {start}..{end} is outside the file ({self.size} bytes)")

    def close(self) -> None:
        pass


class LocalStore(Store):
    """A local file, memory-mapped: sections are read-only views of the page cache (no copy, no fresh memory to
    fault in)."""

    def __init__(self, url: str, path: str):
        super().__init__()
        self.url, self.path = url, path
        try:
            with builtins.open(path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        except FileNotFoundError:
            raise BBFError(f"no such file: {url}") from None
        except (OSError, ValueError) as e:
            raise BBFError(f"cannot open {url}: {e}") from None
        self._buf = memoryview(self._map) if self._map is not None else memoryview(b"")

    def fetch(self, ranges):
        self._check(ranges)
        self.stats.requests += len(ranges)
        self.stats.bytes += sum(b - a for a, b in ranges)
        return done([self._buf[a:b] for a, b in ranges])

    def close(self) -> None:
        if self._map is not None:
            try:
                self._buf.release()
                self._map.close()
            except BufferError:  # a view is still in use: the map goes when it does
                pass


class BufferStore(Store):
    """A whole .bbf file already in memory (bytes, bytearray, memoryview, mmap): reads are views, never copies."""

    def __init__(self, data, name: str = "<bytes>"):
        super().__init__()
        self.url = name
        try:
            self._buf = memoryview(data).cast("B")
        except TypeError as e:
            raise BBFError(f"cannot read a .bbf from a {type(data).__name__}: {e}") from None
        self.size = len(self._buf)

    def fetch(self, ranges):
        self._check(ranges)
        self.stats.requests += len(ranges)
        self.stats.bytes += sum(b - a for a, b in ranges)
        return done([self._buf[a:b] for a, b in ranges])


class RemoteStore(Store):
    """An object behind http(s)://, s3:// or another fsspec filesystem, read by the fetch engine (fetch.py). Opening
    it is one request: the suffix read that pins the object and holds the footer, index and header."""

    def __init__(self, url: str, transport, options: FetchOptions, suffix: int):
        self.url = url
        self.options = options
        self.fetcher = Fetcher(transport, options)
        self.stats = self.fetcher.stats
        self.size, self._tail_start, tail = self.fetcher.suffix(suffix)
        self._tail = memoryview(tail)

    @property
    def budget(self) -> int:
        return self.options.concurrency * self.options.chunk_size

    def fetch(self, ranges):
        self._check(ranges)
        t0 = self._tail_start
        if all(a >= t0 for a, _ in ranges):  # inside the pinned suffix: no request
            return done([self._tail[a - t0:b - t0] for a, b in ranges])
        return self.fetcher.submit(ranges)


def open_store(url: str, storage_options: dict | None = None, fetch: FetchOptions | dict | None = None,
               suffix: int = 256 << 10) -> Store:
    """The store for a local path or any fsspec URL. Remote stores read the last `suffix` bytes on open."""
    options = FetchOptions.coerce(fetch)
    url = str(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **_remote_defaults(url, storage_options, options))
    except ImportError as e:
        raise BBFError(f"cannot open {url}: {e} (install bbformat[remote])") from None
    except (OSError, ValueError, TypeError) as e:
        raise BBFError(f"cannot open {url}: {e}") from None
    protocols = _protocols(fs)
    if _is_local(fs):
        return LocalStore(url, path)
    from .transport import FsspecTransport, HTTPTransport, S3Transport

    if any(p.startswith("http") for p in protocols):
        transport = HTTPTransport(fs, path, options.connect_timeout, options.read_timeout)
    elif any(p in ("s3", "s3a") for p in protocols):
        transport = S3Transport(fs, path)
    else:
        transport = FsspecTransport(fs, path, url)
    return RemoteStore(url, transport, options, suffix)


def _remote_defaults(url: str, storage_options: dict | None, options: FetchOptions) -> dict:
    """S3 clients pool 10 connections by default: raise that to the concurrency, and give botocore the timeouts."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", max(10, options.concurrency))
        config.setdefault("connect_timeout", options.connect_timeout)
        config.setdefault("read_timeout", options.read_timeout)
        opts["config_kwargs"] = config
    return opts


class AtomicSink:
    """A writable file that appears under its final name only when `commit()` is called.

    Local files: a hidden temporary in the same directory, then os.replace. Other fsspec targets: a temporary
    key, then fs.mv. An exception (or a kill) leaves no partial file under the final name.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.fs, self.path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        head, tail = os.path.split(self.path.rstrip("/"))
        self.tmp = os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}") if head else \
            f".{tail}.tmp-{uuid.uuid4().hex[:12]}"
        if _is_local(self.fs) and head:
            os.makedirs(head, exist_ok=True)
        self.f = self.fs.open(self.tmp, "wb")
        self.pos = 0

    def write(self, data: bytes | memoryview) -> int:
        self.f.write(data)
        self.pos += len(data)
        return self.pos

    def commit(self) -> None:
        self.f.close()
        if _is_local(self.fs):
            os.replace(self.tmp, self.path)
        else:
            self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            try:
                self.fs.rm(self.tmp)
            except (OSError, FileNotFoundError):
                pass


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _is_local(fs) -> bool:
    return _protocols(fs)[0] in ("file", "local")

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
import re
import stat
import time
import uuid

import fsspec

try:
    import fcntl
except ImportError:  # Windows: no flock, so no automatic removal of a dead writer's temporary
    fcntl = None

from ..errors import BBFError, TruncatedError, WriteError
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

    def fetch(self, ranges: list[tuple[int, int]], urgent: bool = False) -> concurrent.futures.Future:
        """A future of one buffer per range. `urgent`: the caller waits for these bytes now (spread them wider)."""
        raise NotImplementedError  # pragma: no cover

    def done_with(self, start: int, end: int) -> None:
        """The reader has decoded bytes [start, end) and holds no view of them: a store may drop them from memory."""

    def _check(self, ranges) -> None:
        for start, end in ranges:
            if not 0 <= start <= end <= self.size:
                raise TruncatedError(f"read of bytes {start}..{end} is outside the file ({self.size} bytes)")

    def close(self) -> None:
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

    def fetch(self, ranges, urgent: bool = False):
        self._check(ranges)
        self.stats.requests += len(ranges)
        self.stats.bytes += sum(b - a for a, b in ranges)
        return done([self._buf[a:b] for a, b in ranges])


class LocalStore(BufferStore):
    """A local file, memory-mapped: sections are read-only views of the page cache (no copy, no fresh memory to
    fault in)."""

    def __init__(self, url: str, path: str):
        self.path = path
        try:
            with builtins.open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except FileNotFoundError:
            raise BBFError(f"no such file: {url}") from None
        except (OSError, ValueError) as e:
            raise BBFError(f"cannot open {url}: {e}") from None
        super().__init__(self._map if self._map is not None else b"", url)

    def done_with(self, start: int, end: int) -> None:
        """Unmap the decoded section's pages from this process (they stay in the page cache): without it every page
        of the file ever read counts in the reader's RSS, a whole 7B model's worth after a stream()."""
        page = mmap.PAGESIZE
        a, b = -(-start // page) * page, end // page * page
        if self._map is not None and b > a and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, a, b - a)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._buf.release()
                self._map.close()
            except BufferError:  # a view is still in use: the map goes when it does
                pass


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

    def fetch(self, ranges, urgent: bool = False):
        self._check(ranges)
        t0 = self._tail_start
        if all(a >= t0 for a, _ in ranges):  # inside the pinned suffix: no request
            return done([self._tail[a - t0:b - t0] for a, b in ranges])
        return self.fetcher.submit(ranges, urgent)


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


TEMP_INFIX = ".tmp-"  # a target's hidden temporary: "." + its name + ".tmp-" + 12 hex digits, in its directory
STALE_AFTER = 2.0  # seconds an unlocked temporary must be unchanged before another writer removes it


class AtomicSink:
    """A writable file that appears under its final name only when `commit()` succeeds; any failure removes what was
    written and leaves an existing target untouched. Every failure is a WriteError naming the target and the cause.

    Local files: the bytes go to a hidden temporary `.NAME.tmp-XXXXXXXXXXXX` (12 hex digits) in the target's
    directory, held under an exclusive `flock` while it is written, then `os.replace`d onto the target. Missing
    parent directories are created (and removed again if the write fails). A killed writer (SIGKILL, power loss)
    cannot clean up; its temporary stays, and the next AtomicSink for the same target removes every temporary of
    that target that no live writer holds locked and that has not changed for STALE_AFTER seconds. Other fsspec
    targets: a temporary key of the same name, then fs.mv (S3 shows no object for an interrupted upload; a kill
    between upload and rename leaves the temporary key, which is not removed automatically).

    Also a context manager: commit on success, abort on an exception.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.pos, self.f = str(url), 0, None
        self.error: WriteError | None = None  # the failure that aborted a write()
        self._made: list[str] = []  # directories this sink created, deepest last
        self._done = False
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, OSError, ValueError, TypeError) as e:
            raise WriteError(f"cannot write {self.url}: {e}") from None
        self.local = _is_local(self.fs)
        head, tail = os.path.split(self.path.rstrip("/"))
        if not tail:
            raise WriteError(f"cannot write {self.url}: it names no file")
        name = f".{tail}{TEMP_INFIX}{uuid.uuid4().hex[:12]}"
        self.tmp = os.path.join(head, name) if head else name
        try:
            if self.local:
                self._open_local(head or ".", tail)
            else:
                self.f = self.fs.open(self.tmp, "wb")
        except WriteError:
            self.abort()
            raise
        except Exception as e:  # OSError, and whatever an fsspec backend raises
            self.abort()
            raise WriteError(f"cannot write {self.url}: {_reason(e)}") from None

    def _open_local(self, head: str, tail: str) -> None:
        path = self.path
        if self.path.endswith(os.sep) or os.path.isdir(path):
            raise WriteError(f"cannot write {self.url}: it is a directory")
        if os.path.isfile(path):
            st = os.stat(path)
            if not st.st_mode & 0o222 or not os.access(path, os.W_OK):
                raise WriteError(f"cannot write {self.url}: it exists and is read-only")
        self._makedirs(head)
        remove_stale_temps(head, tail)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        self.f = builtins.open(fd, "wb")
        if fcntl is not None:  # held until the file is closed, by the kernel: a dead writer's lock is gone
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _makedirs(self, head: str) -> None:
        missing, d = [], os.path.abspath(head)
        while not os.path.isdir(d):
            if os.path.lexists(d):
                raise WriteError(f"cannot write {self.url}: {d} is not a directory")
            missing.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for d in reversed(missing):
            os.mkdir(d)
            self._made.append(d)

    def write(self, data: bytes | memoryview) -> int:
        if self._done or self.f is None:
            raise WriteError(f"cannot write {self.url}: the output was already closed or aborted")
        try:
            self.f.write(data)
        except Exception as e:  # ENOSPC, EIO, EFBIG, a remote failure: nothing may stay behind
            self.abort()
            self.error = WriteError(f"cannot write {self.url}: {_reason(e)}")
            raise self.error from None
        self.pos += len(data)
        return self.pos

    def flush(self) -> None:
        """(For writers that expect a file object, e.g. torch.save.)"""

    def commit(self) -> None:
        """Close the temporary and move it onto the target; on any failure remove it (WriteError)."""
        if self._done or self.f is None:
            raise WriteError(f"cannot write {self.url}: the output was already closed or aborted")
        try:
            f, self.f = self.f, None
            f.close()  # flushes: a full disk can surface here
            if self.local:
                os.replace(self.tmp, self.path)
            else:
                self.fs.mv(self.tmp, self.path)
        except Exception as e:
            self.abort()
            raise WriteError(f"cannot write {self.url}: {_reason(e)}") from None
        self._done = True

    def abort(self) -> None:
        """Remove the temporary (and the directories this sink created). Never raises; safe to call twice."""
        if self._done:
            return
        self._done = True
        if self.f is not None:
            try:
                self.f.close()
            except Exception:  # the flush fails again on a full disk; the file is closed all the same
                pass
            self.f = None
        try:
            if self.local:
                os.unlink(self.tmp)
            else:
                self.fs.rm(self.tmp)
        except Exception:  # never created, or already gone
            pass
        for d in reversed(self._made):
            try:
                os.rmdir(d)
            except OSError:
                break

    def __enter__(self) -> "AtomicSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def remove_stale_temps(directory: str, name: str) -> list[str]:
    """Remove the temporaries of target `name` in `directory` that their writer left behind when it died: those no
    process holds locked (a live AtomicSink always does) and unchanged for STALE_AFTER seconds. Returns their paths."""
    if fcntl is None:
        return []
    pattern = re.compile(re.escape(f".{name}{TEMP_INFIX}") + r"[0-9a-f]{12}")
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for n in names:
        p = os.path.join(directory, n)
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime >= STALE_AFTER:
                os.unlink(p)
                removed.append(p)
        except OSError:  # locked by a live writer, or gone meanwhile
            pass
        finally:
            os.close(fd)
    return removed


def _reason(e: BaseException) -> str:
    """An exception as the one-line cause of a WriteError."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _is_local(fs) -> bool:
    return _protocols(fs)[0] in ("file", "local")

"""Storage behind fsspec: byte-range reads for the reader, atomic writes for the writer.

The reader needs exactly two things from storage: the file size and `read(start, end)`. Local paths, file://,
memory://, s3:// and http(s):// all go through fsspec. HTTP gets one extra guard: fsspec silently returns the
whole body when a server ignores the Range header (Python's http.server does), so ranges are fetched through
fsspec's HTTPFile, which checks for a 206/Content-Range answer before reading the body, and the failure is
reported as RangeNotSupportedError instead of downloading the file.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid

import fsspec

from ..errors import BBFError, RangeNotSupportedError, TruncatedError


class Store:
    """Read-only random access to one file at an fsspec URL."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
            self.size = int(self.fs.size(self.path))
        except FileNotFoundError:
            raise BBFError(f"no such file: {self.url}") from None
        except ImportError as e:
            raise BBFError(f"cannot open {self.url}: {e} (install bbformat[remote])") from None
        except (OSError, ValueError) as e:
            raise BBFError(f"cannot open {self.url}: {e}") from None
        self._http = any(p.startswith("http") for p in _protocols(self.fs))
        self._local = threading.local()
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()
        self.bytes_read = 0
        self.requests = 0

    def view(self, start: int, end: int) -> bytes | memoryview:
        """Like `read`, but a local file is memory-mapped and the bytes are a read-only view of the page cache
        (no copy, no fresh memory to fault in): the reader's path for sections."""
        if not _is_local(self.fs):
            return self.read(start, end)
        if not 0 <= start <= end <= self.size:
            raise TruncatedError(f"read of bytes {start}..{end} is outside the file ({self.size} bytes)")
        with self._map_lock:
            if self._map is None:
                try:
                    with open(self.path, "rb") as f:
                        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as e:
                    raise BBFError(f"cannot map {self.url}: {e}") from None
                if len(self._map) != self.size:
                    raise TruncatedError(f"{self.url} changed size while open")
        self.bytes_read += end - start
        self.requests += 1
        return memoryview(self._map)[start:end]

    def close(self) -> None:
        with self._map_lock:
            if self._map is not None:
                try:
                    self._map.close()
                except BufferError:  # a view is still in use: the map goes when it does
                    pass
                self._map = None

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file; exactly that many or an error."""
        if not 0 <= start <= end <= self.size:
            raise TruncatedError(f"read of bytes {start}..{end} is outside the file ({self.size} bytes)")
        if start == end:
            return b""
        try:
            data = self._read_http(start, end) if self._http else self.fs.cat_file(self.path, start=start, end=end)
        except RangeNotSupportedError:
            raise
        except (OSError, ValueError) as e:
            raise BBFError(f"reading bytes {start}..{end} of {self.url} failed: {e}") from None
        if len(data) != end - start:
            if self._http and len(data) > end - start:
                raise RangeNotSupportedError(f"{self.url}: the server ignored an HTTP Range request")
            raise TruncatedError(f"{self.url}: asked for {end - start} bytes at {start}, got {len(data)}")
        self.bytes_read += len(data)
        self.requests += 1
        return data

    def _read_http(self, start: int, end: int) -> bytes:
        f = getattr(self._local, "file", None)
        if f is None:  # one HTTPFile per thread: they are not thread-safe
            f = self._local.file = self.fs.open(self.path, "rb", cache_type="none", size=self.size)
        try:
            f.seek(start)
            return f.read(end - start)
        except ValueError as e:
            if "range" in str(e).lower():
                raise RangeNotSupportedError(
                    f"{self.url}: the server ignored an HTTP Range request (it answered with the whole body); "
                    "serve the file with a server that supports Range, or download it first") from None
            raise


class BufferStore:
    """A whole .bbf file already in memory (bytes, bytearray, memoryview, mmap): reads are views, never copies."""

    def __init__(self, data, name: str = "<bytes>"):
        self.url = name
        try:
            self._buf = memoryview(data).cast("B")
        except TypeError as e:
            raise BBFError(f"cannot read a .bbf from a {type(data).__name__}: {e}") from None
        self.size = len(self._buf)
        self.bytes_read = 0
        self.requests = 0

    def view(self, start: int, end: int) -> memoryview:
        if not 0 <= start <= end <= self.size:
            raise TruncatedError(f"read of bytes {start}..{end} is outside the buffer ({self.size} bytes)")
        self.bytes_read += end - start
        self.requests += 1
        return self._buf[start:end]

    def read(self, start: int, end: int) -> bytes:
        return bytes(self.view(start, end))

    def close(self) -> None:
        pass


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

"""One ranged GET against one remote object, with the object pinned: the only code that speaks HTTP or S3.

A transport does two things for the fetch engine (fetch.py):

    await t.suffix(n)           -> (size, start, bytes): the last n bytes, in the request that also pins the object
    async for piece in t.get(a, b): ...   the bytes [a, b) in pieces, checked against the pin

and classifies every failure as `Transient` (retry it: resets, short bodies, stalls, 408/429/5xx), `Permanent`
(do not: 404, 403, auth, a server that ignores Range) or a changed object (ObjectChangedError). What to do about a
transient failure (back off, resume, give up) is the engine's business, not the transport's.

Pinning: the suffix read records the object's size and validator (ETag, else Last-Modified). Every later answer must
carry the same size in Content-Range and the same validator; a strong ETag is also sent as If-Match, so a server that
knows the object changed answers 412 instead of sending the new bytes.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from typing import AsyncIterator

from ..errors import ObjectChangedError, RangeNotSupportedError

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
PIECE = 1 << 20


class Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested delay in seconds, if it gave one.
    `connect`: no connection was made (refused, DNS): retried mid-read, where a server may be restarting, but not
    when opening, where it almost always means a wrong URL."""

    def __init__(self, cause: str, retry_after: float | None = None, connect: bool = False):
        super().__init__(cause)
        self.retry_after = retry_after
        self.connect = connect


class Permanent(Exception):
    """A failure that retrying will not fix; `missing` marks a 404."""

    def __init__(self, cause: str, missing: bool = False):
        super().__init__(cause)
        self.missing = missing


def _retry_after(value: str | None) -> float | None:
    """Retry-After is either seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)) + 1, None if m.group(3) == "*" else int(m.group(3))


class HTTPTransport:
    """http(s):// through the aiohttp session of fsspec's HTTPFileSystem (its client_kwargs and request options,
    e.g. headers or auth, apply)."""

    def __init__(self, fs, url: str, connect_timeout: float, read_timeout: float):
        import aiohttp

        self.fs, self.url, self.loop = fs, url, fs.loop
        kw = dict(fs.kwargs)
        self.headers = dict(kw.pop("headers", None) or {})
        self.kw = kw
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.size: int | None = None
        self.etag: str | None = None
        self.last_modified: str | None = None
        self._errors = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)

    async def suffix(self, n: int) -> tuple[int, int, bytes]:
        try:
            return await self._suffix(n)
        except Transient as e:
            if e.connect:
                raise Permanent(str(e)) from None
            raise

    async def _suffix(self, n: int) -> tuple[int, int, bytes]:
        async with self._get(f"bytes=-{n}") as r:
            if r.status == 416:  # only an empty object has no satisfiable suffix
                return 0, 0, b""
            start, end = self._check(r, None, None)
            try:
                data = await r.read()
            except self._errors as e:
                raise Transient(_describe(e)) from None
        if len(data) != end - start:
            raise Transient(f"short body: {len(data)} of {end - start} bytes")
        return self.size, start, data

    async def get(self, start: int, end: int) -> AsyncIterator[bytes]:
        async with self._get(f"bytes={start}-{end - 1}") as r:
            self._check(r, start, end)
            try:
                async for piece in r.content.iter_chunked(PIECE):
                    yield piece
            except self._errors as e:
                raise Transient(_describe(e)) from None

    def _get(self, rng: str):
        headers = {**self.headers, "Range": rng}
        if self.etag and not self.etag.startswith("W/"):  # If-Match needs a strong validator
            headers["If-Match"] = self.etag
        return _Request(self, headers)

    def _check(self, r, start: int | None, end: int | None) -> tuple[int, int]:
        """Status and validators of an answer; returns the byte range it carries."""
        if r.status == 200:
            raise RangeNotSupportedError(
                f"{self.url}: the server ignored an HTTP Range request (it answered with the whole body); serve "
                "the file with a server that supports Range, or download it first")
        if r.status == 412 or (r.status == 416 and self.size is not None):
            raise ObjectChangedError(f"{self.url} changed while reading (HTTP {r.status})")
        if r.status in _TRANSIENT_STATUS or 500 <= r.status < 600:
            raise Transient(f"HTTP {r.status} {r.reason or ''}".strip(), _retry_after(r.headers.get("Retry-After")))
        if r.status != 206:
            what = {401: "authentication required", 403: "access denied", 404: "no such file",
                    410: "no such file"}.get(r.status, "refused")
            raise Permanent(f"HTTP {r.status} {r.reason or ''}: {what}".strip(), missing=r.status in (404, 410))
        cr = _parse_content_range(r.headers.get("Content-Range"))
        if cr is None or cr[2] is None:
            raise Permanent(f"a 206 answer without a usable Content-Range ({r.headers.get('Content-Range')!r})")
        a, b, total = cr
        etag, modified = r.headers.get("ETag"), r.headers.get("Last-Modified")
        if self.size is None:  # the pinning read
            self.size, self.etag, self.last_modified = total, etag, modified
        elif (total != self.size or (self.etag and etag and etag != self.etag)
              or (not self.etag and self.last_modified and modified and modified != self.last_modified)):
            raise ObjectChangedError(f"{self.url} changed while reading (size {self.size} -> {total}, "
                                     f"ETag {self.etag} -> {etag}, Last-Modified {self.last_modified} -> {modified})")
        if start is not None and (a, b) != (start, end):
            raise Permanent(f"asked for bytes {start}-{end - 1}, the server sent {a}-{b - 1}")
        return a, b


class _Request:
    """`async with` one GET; connection errors before the answer are transient."""

    def __init__(self, t: HTTPTransport, headers: dict):
        self.t, self.headers, self.r = t, headers, None

    async def __aenter__(self):
        import aiohttp

        session = await self.t.fs.set_session()
        try:
            self.r = await session.get(self.t.fs.encode_url(self.t.url), headers=self.headers,
                                       timeout=self.t.timeout, **self.t.kw)
        except (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError) as e:
            raise Permanent(f"TLS failed ({_describe(e)}); is the server plain http://?") from None
        except aiohttp.ClientConnectorDNSError as e:
            raise Transient(f"cannot resolve host {e.host!r} (DNS: {e.os_error})", connect=True) from None
        except aiohttp.ClientConnectorError as e:
            why = "refused" if isinstance(e.os_error, ConnectionRefusedError) else f"failed: {e.os_error}"
            raise Transient(f"connection to {e.host}:{e.port} {why}; is the server running?", connect=True) from None
        except self.t._errors as e:
            raise Transient(_describe(e)) from None
        return self.r

    async def __aexit__(self, exc_type, *exc):
        if exc_type is None:
            self.r.release()  # body read to the end: the connection goes back to the pool
        else:
            self.r.close()  # a half-read body: drop the connection rather than drain it


class S3Transport:
    """s3:// through s3fs's aiobotocore client (its credentials, endpoint and config apply). The ETag is pinned and
    sent as IfMatch; a version id in the URL (?versionId=) is honoured."""

    def __init__(self, fs, path: str):
        self.fs, self.url, self.loop = fs, f"s3://{path}", fs.loop
        self.bucket, self.key, version = fs.split_path(path)
        self.version = {"VersionId": version} if version else {}
        self.size: int | None = None
        self.etag: str | None = None

    async def suffix(self, n: int) -> tuple[int, int, bytes]:
        try:
            resp = await self._call(f"bytes=-{n}")
        except Permanent as e:
            if "InvalidRange" in str(e):
                return 0, 0, b""
            raise
        cr = _parse_content_range(resp.get("ContentRange"))
        if cr is None or cr[2] is None:
            raise Permanent(f"an answer without a usable Content-Range ({resp.get('ContentRange')!r})")
        self.size, self.etag = cr[2], resp.get("ETag")
        data = await self._read_all(resp)
        if len(data) != cr[1] - cr[0]:
            raise Transient(f"short body: {len(data)} of {cr[1] - cr[0]} bytes")
        return self.size, cr[0], data

    async def get(self, start: int, end: int) -> AsyncIterator[bytes]:
        resp = await self._call(f"bytes={start}-{end - 1}")
        cr = _parse_content_range(resp.get("ContentRange"))
        etag = resp.get("ETag")
        if cr is None or cr[2] != self.size or (self.etag and etag and etag != self.etag):
            resp["Body"].close()
            raise ObjectChangedError(f"{self.url} changed while reading (ETag {self.etag} -> {etag}, "
                                     f"Content-Range {resp.get('ContentRange')})")
        body = resp["Body"]
        try:
            while True:
                piece = await body.read(PIECE)
                if not piece:
                    return
                yield piece
        except Exception as e:  # aiohttp / botocore streaming errors: resets, short bodies, read timeouts
            raise Transient(_describe(e)) from None
        finally:
            body.close()

    async def _call(self, rng: str) -> dict:
        kw = {"Range": rng, **self.version}
        if self.etag:
            kw["IfMatch"] = self.etag
        try:
            return await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key, **kw)
        except FileNotFoundError as e:
            raise Permanent(f"no such file ({e})", missing=True) from None
        except PermissionError as e:
            raise Permanent(f"access denied ({e})") from None
        except OSError as e:
            status = _s3_status(e)
            if status == 412:
                raise ObjectChangedError(f"{self.url} changed while reading (S3 412 PreconditionFailed)") from None
            if status is None or status in _TRANSIENT_STATUS or status >= 500:
                raise Transient(_describe(e)) from None
            raise Permanent(_describe(e)) from None
        except Exception as e:  # connection-level errors that s3fs gave up on
            raise Transient(_describe(e)) from None

    async def _read_all(self, resp) -> bytes:
        try:
            return await resp["Body"].read()
        except Exception as e:
            raise Transient(_describe(e)) from None
        finally:
            resp["Body"].close()


def _s3_status(e: BaseException) -> int | None:
    """The HTTP status behind s3fs's translated OSError, if botocore gave one."""
    for err in (e, e.__cause__, e.__context__):
        meta = getattr(err, "response", None)
        if isinstance(meta, dict):
            return meta.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


class FsspecTransport:
    """Any other fsspec filesystem (memory://, gcs, abfs, ...) through its synchronous cat_file, on worker threads.
    Pinned by size and whatever validator its info() reports (etag, mtime)."""

    def __init__(self, fs, path: str, url: str):
        import fsspec.asyn

        self.fs, self.path, self.url = fs, path, url
        self.loop = fsspec.asyn.get_loop()
        self.size: int | None = None
        self.validator = None

    def _info(self) -> tuple[int, object]:
        info = self.fs.info(self.path)
        size = info.get("size")
        if not isinstance(size, int):
            raise Permanent(f"the store reports no size ({size!r})")
        return size, next((info[k] for k in ("etag", "ETag", "mtime", "LastModified", "created") if k in info), None)

    async def _run(self, fn, *args):
        try:
            return await self.loop.run_in_executor(None, fn, *args)
        except FileNotFoundError as e:
            raise Permanent(f"no such file ({e})", missing=True) from None
        except PermissionError as e:
            raise Permanent(f"access denied ({e})") from None
        except (OSError, TimeoutError) as e:
            raise Transient(_describe(e)) from None

    async def suffix(self, n: int) -> tuple[int, int, bytes]:
        self.size, self.validator = await self._run(self._info)
        start = max(0, self.size - n)
        return self.size, start, await self._run(self._cat, start, self.size)

    async def get(self, start: int, end: int) -> AsyncIterator[bytes]:
        size, validator = await self._run(self._info)
        if (size, validator) != (self.size, self.validator):
            raise ObjectChangedError(f"{self.url} changed while reading")
        yield await self._run(self._cat, start, end)

    def _cat(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end)


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    name = type(e).__name__
    if isinstance(e, asyncio.TimeoutError) and not text:
        text = "no data within the read timeout (stalled)"
    return f"{name}: {text}" if text else name

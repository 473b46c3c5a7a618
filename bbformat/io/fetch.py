"""The fetch engine: byte ranges in, buffers out, over many concurrent ranged requests, retried and resumed.

    fetcher = Fetcher(transport, FetchOptions(chunk_size=8 << 20, concurrency=16))
    future = fetcher.submit([(a, b), (c, d)])        # a concurrent.futures.Future of [view of a..b, view of c..d]

Ranges that touch are coalesced, then split into chunks of at most `chunk_size` (a large run into `concurrency`
chunks of at least `min_chunk_size`); every chunk is one request, and at most `concurrency` run at once. They run on fsspec's event-loop thread, so the caller's threads are free to decode
while bytes arrive. The semaphore wakes waiters first come first served: chunks go out in the order they were
submitted, which is the order the stream consumes them.

A failed attempt is classified by the transport. Transient ones are retried with exponential backoff and full jitter
(or the server's Retry-After), at most `retries` times and `retry_time` seconds per chunk, resuming at the first
byte not yet received; everything else ends the fetch with a TransportError naming the URL, the range and the cause.

`Prefetcher` sits on top: it walks a list of items (one group's ranges each) in order and keeps at most `budget`
bytes fetched or in flight that the consumer has not released, so memory stays bounded however far ahead the wire
could run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..errors import BBFError, TransportError
from .transport import Permanent, Transient


@dataclass(frozen=True)
class FetchOptions:
    """How remote bytes are fetched. Local files ignore these (they are memory-mapped)."""

    chunk_size: int = 8 << 20  # bytes per ranged request, at most
    min_chunk_size: int = 4 << 20  # a large group is spread over up to `concurrency` requests, in chunks >= this
    concurrency: int = 16  # requests in flight, independent of the core count
    retries: int = 8  # failed attempts allowed per chunk before giving up
    retry_time: float = 120.0  # seconds per chunk, waiting included, before giving up
    backoff: float = 0.1  # first retry delay in seconds; doubles per attempt, full jitter
    backoff_max: float = 10.0  # longest delay between attempts (a Retry-After is honoured up to retry_time)
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # a stall longer than this fails the attempt (and is retried)

    @classmethod
    def coerce(cls, value: "FetchOptions | dict | None") -> "FetchOptions":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise BBFError(f"fetch options must be a FetchOptions or a dict, not {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise BBFError(f"unknown fetch option(s) {unknown}; known: {sorted(known)}")
        opts = cls(**value)
        if min(opts.chunk_size, opts.min_chunk_size, opts.concurrency) < 1 or opts.retries < 0:
            raise BBFError("fetch options: chunk_size, min_chunk_size and concurrency must be >= 1, retries >= 0")
        return opts


@dataclass
class FetchStats:
    """What the wire did: requests sent (retries included), retries, payload bytes received, and seconds during
    which at least one request was in flight."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0
    _active: int = field(default=0, repr=False)
    _since: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        busy = self.seconds + (time.perf_counter() - self._since if self._active else 0.0)
        d["seconds"] = round(busy, 4)
        d["mb_per_s"] = round(self.bytes / busy / 1e6, 1) if busy > 0 else None
        return d

    def begin(self) -> None:
        if self._active == 0:
            self._since = time.perf_counter()
        self._active += 1

    def end(self) -> None:
        self._active -= 1
        if self._active == 0:
            self.seconds += time.perf_counter() - self._since


URGENT_CHUNK = 1 << 20


def split(start: int, end: int, options: FetchOptions, urgent: bool = False) -> list[tuple[int, int]]:
    """Chunks of [start, end): at most chunk_size each, and as many as `concurrency` allows when they can be at
    least min_chunk_size (1 MiB when `urgent`: the caller is waiting for these bytes, as for a stream's first
    group). A large group then arrives at the speed of all connections, not of the few its 8 MiB chunks would
    take; small chunks are kept for that case since each request costs a round trip (and CPU on the server)."""
    if end <= start:
        return []  # an empty section costs no request
    least = min(options.min_chunk_size, URGENT_CHUNK) if urgent else options.min_chunk_size
    n = max(-(-(end - start) // options.chunk_size), min(options.concurrency, (end - start) // least))
    if n <= 1:
        return [(start, end)]
    step = -(-(end - start) // n)
    return [(a, min(end, a + step)) for a in range(start, end, step)]


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """Sorted runs of ranges that touch or overlap: (start, end, indices of the ranges inside)."""
    runs: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i]):
        a, b = ranges[i]
        if runs and a <= runs[-1][1]:
            s, e, idx = runs[-1]
            runs[-1] = (s, max(e, b), idx + [i])
        else:
            runs.append((a, b, [i]))
    return runs


class Fetcher:
    def __init__(self, transport, options: FetchOptions):
        self.t, self.o, self.loop = transport, options, transport.loop
        self.url = transport.url
        self.stats = FetchStats()
        self._sem: asyncio.Semaphore | None = None

    # ---- the caller's side (any thread but the loop's) ------------------------------------------------
    def submit(self, ranges: list[tuple[int, int]], urgent: bool = False) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._fetch(ranges, urgent), self.loop)

    def suffix(self, n: int) -> tuple[int, int, bytes]:
        """(size, start, the last min(n, size) bytes), pinning the object; retried like any chunk."""
        size, start, data = asyncio.run_coroutine_threadsafe(
            self._attempts(f"the last {n} bytes", self.t.suffix, n), self.loop).result()
        self.stats.bytes += len(data)
        return size, start, data

    # ---- the loop's side -------------------------------------------------------------------------------
    async def _fetch(self, ranges: list[tuple[int, int]], urgent: bool = False) -> list[memoryview]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.o.concurrency)
        out: list[memoryview | None] = [None] * len(ranges)
        jobs = []
        for start, end, idx in coalesce(ranges):
            buf = memoryview(np.empty(end - start, np.uint8)).cast("B")  # not zero-filled: every byte is written
            for i in idx:
                a, b = ranges[i]
                out[i] = buf[a - start:b - start]
            for a, b in split(start, end, self.o, urgent):
                jobs.append(self._chunk(buf[a - start:b - start], a))
        tasks = [asyncio.ensure_future(j) for j in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return out

    async def _chunk(self, buf: memoryview, start: int) -> None:
        end = start + len(buf)
        async with self._sem:
            pos = start

            async def attempt():
                nonlocal pos
                async for piece in self.t.get(pos, end):
                    n = len(piece)
                    if pos + n > end:
                        raise Permanent(f"the server sent more than the {end - start} bytes asked for")
                    buf[pos - start:pos - start + n] = piece
                    pos += n
                    self.stats.bytes += n
                if pos < end:
                    raise Transient(f"short body: the answer ended {end - pos} bytes early")

            # each retry resumes at `pos`: the bytes already in `buf` are not fetched again
            await self._attempts(lambda: f"bytes {pos}-{end - 1}", attempt)

    async def _attempts(self, what, fn, *args):
        """Run fn until it succeeds, retrying transient failures within the retry budget."""
        first_failure, tries = None, 0
        while True:
            self.stats.requests += 1
            self.stats.begin()
            try:
                return await fn(*args)
            except Transient as e:
                now = time.monotonic()
                first_failure = first_failure or now
                tries += 1
                delay = min(self.o.backoff_max, self.o.backoff * 2 ** (tries - 1)) * random.random()
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                label = what() if callable(what) else what
                if tries > self.o.retries or now - first_failure + delay > self.o.retry_time:
                    raise TransportError(f"{self.url}: reading {label} failed after {tries} attempt(s): {e}") \
                        from None
                self.stats.retries += 1
            except Permanent as e:
                label = what() if callable(what) else what
                raise (BBFError(f"no such file: {self.url}") if e.missing else
                       TransportError(f"{self.url}: reading {label} failed: {e}")) from None
            finally:  # a changed object or an ignored Range propagates as it is: neither is worth a retry
                self.stats.end()
            await asyncio.sleep(delay)


class Prefetcher:
    """Fetch items (lists of byte ranges) in order, at most `budget` bytes ahead of what the consumer released.
    The next item is always fetched when nothing is outstanding, so an item larger than the budget still goes."""

    def __init__(self, fetch, items: list[list[tuple[int, int]]], budget: int):
        self._fetch, self.items, self.budget = fetch, items, budget
        self.sizes = [sum(b - a for a, b in rs) for rs in items]
        self.futures: list[concurrent.futures.Future | None] = [None] * len(items)
        self.next, self.outstanding = 0, 0
        self.cond = threading.Condition()
        self.closed = False
        self._first_in = False
        self._pump()

    def _pump(self) -> None:
        first = None
        with self.cond:
            while (not self.closed and self.next < len(self.items) and (self.next == 0 or self._first_in)
                   and (self.outstanding == 0 or self.outstanding + self.sizes[self.next] <= self.budget)):
                # the first item is what the consumer waits for now: spread it over every connection, and issue
                # nothing else until it is in (measured at 50 MB/s: sharing the wire with the next items' chunks,
                # a 4.6 MB first group took 0.38 s; alone, 0.14 s)
                self.futures[self.next] = self._fetch(self.items[self.next], self.next == 0)
                first = self.futures[0] if self.next == 0 else first
                self.outstanding += self.sizes[self.next]
                self.next += 1
            self.cond.notify_all()
        if first is not None:  # outside the lock: a future already done runs the callback at once
            first.add_done_callback(self._first_done)

    def _first_done(self, _fut) -> None:
        with self.cond:
            self._first_in = True
        self._pump()

    def get(self, i: int) -> list:
        """Item i's buffers, waiting for them to be issued and to arrive."""
        with self.cond:
            while self.futures[i] is None and not self.closed:
                self.cond.wait()
            fut = self.futures[i]
        if fut is None:
            raise BBFError("the reader was closed")
        return fut.result()

    def release(self, i: int) -> None:
        """The consumer is done with item i's bytes: fetch further ahead."""
        with self.cond:
            if self.futures[i] is not None:
                self.futures[i] = None
                self.outstanding -= self.sizes[i]
        self._pump()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for f in self.futures:
                if f is not None:
                    f.cancel()
            self.cond.notify_all()


def done(value) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(value)
    return f

"""Lazy .bbf reader over fsspec: one suffix read for footer + index + header, then sections on demand.

    with bbformat.open("https://host/model.bbf") as f:
        f.keys(); f.get_tensor("lm_head.weight")          # random access: fetches only that group's sections
        for group, tensors in f.stream():                 # every group, smallest first, then largest first
            ...

Every section's checksum is verified before its bytes are used; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from ..codecs import entropy
from ..codecs.base import new_bytes
from ..errors import ChecksumError, FormatError, TruncatedError
from ..words import from_words, to_words, word_np_dtype
from .layout import FOOTER, PREAMBLE, RECORD, SUFFIX_GUESS, Footer, SectionRecord, check_preamble, crc32, parse_index
from .schema import check_index, parse_header
from ..io.fetch import FetchOptions, Prefetcher
from ..io.store import BufferStore, Store, open_store


_CRC_SLAB = 1 << 23  # checksums are computed this many bytes at a time, each slab dropped once read (`_crc`)


class BBFReader:
    def __init__(self, url: str, storage_options: dict | None = None, cache_groups: int = 1, *,
                 fetch: FetchOptions | dict | None = None, store: Store | None = None):
        self.store = store or open_store(str(url), storage_options, fetch, SUFFIX_GUESS)
        self.url = self.store.url
        size = self.store.size
        if size < PREAMBLE.size + FOOTER.size:
            raise TruncatedError(f"{self.url}: {size} bytes is too short for a .bbf file")
        tail_start = max(0, size - SUFFIX_GUESS)
        tail = self.store.read(tail_start, size)
        if tail_start == 0:
            check_preamble(tail)
        self.footer = Footer.parse(tail, size)
        f = self.footer
        if f.header_offset < tail_start:  # a big header: one more read for the part the suffix missed
            tail = self.store.read(f.header_offset, tail_start) + tail
            tail_start = f.header_offset
        index = tail[f.index_offset - tail_start: f.index_offset - tail_start + f.n_sections * RECORD.size]
        if crc32(index) != f.index_crc:
            raise ChecksumError("the index is corrupt (checksum mismatch)")
        hbytes = memoryview(tail)[f.header_offset - tail_start: f.header_offset - tail_start + f.header_length]
        if crc32(hbytes) != f.header_crc:
            raise ChecksumError("the header is corrupt (checksum mismatch)")
        # SPEC section 7, in one place (schema.py): the header, then the index against it and the codec. Nothing
        # below allocates for a section before its record has been checked against the tensor table.
        h = parse_header(hbytes)
        self.header: dict[str, Any] = h.raw
        self.model, self.dtype, self.codec, self.tensors = h.desc, h.dtype, h.codec, h.tensors
        self.sections: list[SectionRecord] = parse_index(index, f.n_sections, f.header_offset)
        self._by_group, self._aux = check_index(self.sections, h)
        self._decoder = self.codec.decoder(self.model, self.dtype)
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_groups
        self._lock = threading.Lock()

    # ---- metadata ------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def stats(self) -> dict[str, Any]:
        """What reading cost so far: requests (retries included), retries, bytes, seconds with a request in flight."""
        return self.store.stats.as_dict()

    def group_stored_bytes(self, group: str) -> int:
        return sum(r.stored_len for r in self._by_group[group].values())

    def metadata(self) -> dict[str, str]:
        return dict(self.header["metadata"])

    def aux_names(self) -> list[str]:
        return [a["name"] for a in self.header["aux"]]

    # ---- data ----------------------------------------------------------------------------------------
    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.url}")
        return self.group(self.tensors[name]["group"])[name]

    def group(self, group: str) -> dict[str, torch.Tensor]:
        """Decode one group (fetching only its sections); the last `cache_groups` groups are kept."""
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
        out = self._decode_group(group)
        with self._lock:
            self._cache[group] = out
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def stream(self, readahead: int = 2, workers: int | None = None, dtype: torch.dtype | None = None,
               groups: list[str] | None = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Yield (group, tensors) for `groups`, in that order; only their sections are fetched. Every group decodes
        alone (SPEC 6), so any order and any subset are fine: model order is `f.model.groups()`. The one exception,
        a tied head (`exact`, SPEC 12.6), decodes from the embeddings too: from `embed`'s decode when `embed` comes
        earlier in `groups` (which is then yielded once the head is decoded), else fetched and decoded for it.

        Default: every group, in `stream_order()`: the smallest group first (it arrives after one chunk), then the
        others largest first (what is left when the wire is done is small, as in `load_all`).
        At most `readahead` decoded groups wait beyond the one the caller holds; their bytes are fetched (remote:
        up to concurrency x chunk_size ahead) and decoded on background threads while the caller works. `dtype`:
        the tensors are cast on those threads too, instead of one by one on the caller's."""
        order = self.stream_order() if groups is None else list(groups)
        unknown = [g for g in order if g not in self._by_group]
        if unknown:
            raise KeyError(f"no group {unknown[0]!r} in {self.url} (groups: {', '.join(self.model.groups())})")
        yield from self._pipeline(order, readahead, workers, cast=dtype)

    def stream_order(self) -> list[str]:
        """stream()'s default order: the smallest group, then the rest largest first (ties: model order); a group that
        depends on another (SPEC 6: `exact`'s tied head needs `embed`) comes after it (`_deps_first`)."""
        size = self._decoded_sizes()
        first = min(size, key=size.__getitem__)
        return self._deps_first([first] + sorted((g for g in size if g != first), key=lambda g: -size[g]))

    def _deps_first(self, order: list[str], spread: bool = False) -> list[str]:
        """`order` with every group that depends on another (a tied head) moved to just after it, or, with
        `spread` (a whole load, where memory holds everything anyway), after it and as many bytes of other groups
        as it has: a second decode thread busy with those does not sit waiting for its words (SmolLM2: 12 ms of
        40). (A stream keeps it adjacent: the dependency is yielded once its dependent is decoded, so a gap would
        hold the groups in between too.)"""
        size = self._decoded_sizes()
        for g in [g for g in order if self.codec.depends(g)]:
            deps = [d for d in self.codec.depends(g) if d in order]
            if not deps:
                continue
            order.remove(g)
            i = max(order.index(d) for d in deps) + 1
            work, need = 0, max(size[d] for d in deps) if spread else 0
            while i < len(order) and work < need:
                work += size[order[i]]
                i += 1
            order.insert(i, g)
        return order

    def _decoded_sizes(self) -> dict[str, int]:
        """Raw bytes per group, in model order."""
        return {g: sum(r.raw_len for r in self._by_group[g].values()) for g in self.model.groups()}

    def load_all(self, workers: int | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, decoded: largest group first, one group per core (nesting a section's own parallel decode
        inside costs more than it gains: measured 15% more CPU). Remote: each group is decoded as soon as its bytes
        are in, while the next ones arrive; largest first, so that what is left when the wire is done is small."""
        size = self._decoded_sizes()
        groups = self._deps_first(sorted(size, key=lambda g: -size[g]), spread=True)
        arena, out = _Arena(), {}
        with _gc_paused():
            # twice the stream's byte budget: a big group decoding slowly must not leave the wire idle, and a whole
            # load holds the model anyway (measured: with 128 MiB the wire stood still for 0.2 s of a 1.3 s load)
            for _, tensors in self._pipeline(groups, len(groups), workers, arena, 2 * self.store.budget):
                out.update(tensors)
        return {t.name: out[t.name] for t in self.model.tensors()}

    def _pipeline(self, order: list[str], readahead: int, workers: int | None, alloc=None, budget: int | None = None,
                  cast: torch.dtype | None = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Groups in `order`: bytes fetched by the store's engine within its budget, decoded on `workers` threads,
        at most `readahead` decoded groups ahead of the caller."""
        recs = [list(self._by_group[g].values()) for g in order]
        fetch = Prefetcher(self.store.fetch, [[(r.offset, r.offset + r.stored_len) for r in rs] for rs in recs],
                           budget or self.store.budget)
        # SPEC 6: a group that depends on an earlier one in `order` takes its words from that group's decode; the
        # earlier one is yielded only once its dependents are decoded (the caller may then change its tensors)
        pos = {g: i for i, g in enumerate(order)}
        dep_of = {i: [pos[d] for d in self.codec.depends(g) if pos.get(d, i) < i] for i, g in enumerate(order)}
        dependents = {j: [i for i in dep_of if j in dep_of[i]] for j in range(len(order))}

        def decode(i: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
            """(the tensors as decoded, for the groups that depend on this one, or None; the tensors, cast)"""
            try:
                stored = dict(zip((r.kind for r in recs[i]), fetch.get(i)))
                deps = None  # (waited for after this group's own entropy stage: the two overlap)
                if self.codec.depends(order[i]):
                    deps = lambda: self._dep_words(order[i], {order[j]: futures[j].result()[0] for j in dep_of[i]})
                tensors = self._decode_group(order[i], alloc, stored, deps)
            finally:
                fetch.release(i)
            return (tensors if dependents[i] else None,
                    tensors if cast is None else {k: t.to(cast) for k, t in tensors.items()})

        workers = workers or min(2, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bbf-decode")
        # the caller holds group i (it asked for i, so it is done with i - 1) while groups i + 1 .. i + readahead
        # are decoded or decoding: readahead + 1 groups of decoded words at most
        futures: list = []
        try:
            for i, g in enumerate(order):
                last = max([i + max(0, readahead)] + dependents[i])
                while len(futures) <= min(len(order) - 1, last):
                    futures.append(pool.submit(decode, len(futures)))
                tensors = futures[i].result()[1]
                for j in dependents[i]:
                    futures[j].exception()  # wait for it (its error, if any, is raised when the caller reaches it)
                futures[i] = None  # drop the reference so memory stays bounded
                yield g, tensors
                del tensors
        finally:  # also when the caller stops early: cancel what is pending, free what was fetched
            fetch.close()
            for f in futures:
                if f is not None:
                    f.cancel()
            pool.shutdown(wait=True)

    def aux(self, name: str) -> bytes:
        for i, a in enumerate(self.header["aux"]):
            if a["name"] == name:
                return bytes(self.read_section(self._aux[i]))
        raise KeyError(f"no aux entry {name!r} in {self.url}")

    def read_section(self, rec: SectionRecord, out: np.ndarray | None = None, threads: bool = True,
                     stored=None) -> bytes | np.ndarray:
        """Fetch one section (unless its `stored` bytes are given), verify its checksum, undo the entropy stage: its
        raw payload (written into `out`, a uint8 array of raw_len bytes, when given; on all cores unless
        threads=False)."""
        if stored is None:
            stored = self.store.view(rec.offset, rec.offset + rec.stored_len)
        if self._crc(rec, stored) != rec.crc:
            raise ChecksumError(f"{rec.label}: checksum mismatch (the file is corrupt)")
        if rec.compression == 0:
            raw = stored
            if out is not None and len(stored) == out.size:
                out[:] = np.frombuffer(stored, np.uint8)
                raw = out
        else:
            try:
                raw = entropy.decompress(rec.compression, stored, rec.raw_len, rec.word_size, self.dtype, out,
                                         threads, lambda a, b: self.store.done_with(rec.offset + a, rec.offset + b))
            except FormatError as e:
                raise FormatError(f"{rec.label}: {e}") from None
            self.store.done_with(rec.offset, rec.offset + rec.stored_len)  # decoded: nothing refers to `stored`
        if len(raw) != rec.raw_len:
            raise FormatError(f"{rec.label}: decompressed to {len(raw)} bytes, index says {rec.raw_len}")
        return raw

    def _crc(self, rec: SectionRecord, stored) -> int:
        """The section's checksum, read in slabs that the store may drop once read (a local file's pages would
        otherwise all stay mapped until the section is decoded: a whole group's stored bytes)."""
        if len(stored) <= _CRC_SLAB:
            return crc32(stored)
        view, value = memoryview(stored), 0
        for a in range(0, len(view), _CRC_SLAB):
            value = crc32(view[a:a + _CRC_SLAB], value)
            self.store.done_with(rec.offset + a, rec.offset + min(len(view), a + _CRC_SLAB))
        return value

    def verify_checksums(self) -> list[tuple[SectionRecord, bool]]:
        """Check the preamble and every section's checksum (reads the whole file)."""
        check_preamble(self.store.read(0, PREAMBLE.size))
        fetch = Prefetcher(self.store.fetch, [[(r.offset, r.offset + r.stored_len)] for r in self.sections],
                           self.store.budget)
        out = []
        try:
            for i, rec in enumerate(self.sections):
                out.append((rec, crc32(fetch.get(i)[0]) == rec.crc))
                fetch.release(i)
        finally:
            fetch.close()
        return out

    def close(self) -> None:
        self._cache.clear()
        self.store.close()

    def __enter__(self) -> "BBFReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------------
    def _dep_words(self, group: str, decoded: dict[str, dict[str, torch.Tensor]] | None = None
                   ) -> dict[str, np.ndarray]:
        """The words of the groups `group` depends on (SPEC 6): from `decoded` (group -> tensors) where given,
        else decoded now (fetching their sections; `group()` keeps the last ones)."""
        out = {}
        for d in self.codec.depends(group):
            tensors = (decoded or {}).get(d)
            if tensors is None:
                tensors = self.group(d)
            out.update({name: to_words(t, self.dtype) for name, t in tensors.items()})  # (views: same dtype)
        return out

    def _decode_group(self, group: str, alloc=None, stored: dict | None = None, deps: dict | None = None
                      ) -> dict[str, torch.Tensor]:
        """alloc(nbytes) -> a writable uint8 array for the decoded words (default: a new array per section). With
        an alloc (a whole-model load, whose groups run in parallel) each section decodes on the calling thread.
        `stored`: the sections' bytes by kind, already fetched (default: fetch them now, in one go). `deps`: a
        callable giving the words of the groups this one depends on, called once its own sections are decoded
        (default: `_dep_words`)."""
        threads = alloc is None
        recs = self._by_group[group]
        if stored is None:
            stored = dict(zip(recs, self.store.fetch([(r.offset, r.offset + r.stored_len)
                                                       for r in recs.values()], urgent=True).result()))
        raw, rooms = {}, {}
        for kind, rec in recs.items():
            room = self._decoder.payload_room(group, kind) if rec.word_size > 1 else 0
            if room > 0:  # decode behind the room the codec asked for, so it can rebuild its tensors in place
                nbytes = (room + rec.raw_len // rec.word_size) * rec.word_size
                buf = rooms[kind] = (alloc or new_bytes)(nbytes).view(word_np_dtype(self.dtype))
                raw[kind] = self.read_section(rec, buf.view(np.uint8)[room * rec.word_size:], threads, stored[kind])
            elif alloc is not None and rec.word_size > 1 and rec.raw_len:
                raw[kind] = self.read_section(rec, alloc(rec.raw_len), threads, stored[kind])
            else:
                raw[kind] = self.read_section(rec, None, threads, stored[kind])
        try:
            kw = {}
            if self.codec.depends(group):
                kw["deps"] = deps() if deps is not None else self._dep_words(group)
            parts = self._decoder.decode_tensors(group, raw, rooms, alloc, **kw)  # shapes == the checked table's
        except FormatError as e:
            rec = next(iter(self._by_group[group].values()))
            raise FormatError(f"{rec.label}: {e}") from None
        return {name: from_words(w, self.dtype) for name, w in parts.items()}


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while a whole model decodes: it creates no cycles, and a full collection with
    torch imported takes ~100 ms, which otherwise lands on a random load (measured: worst of 24 loads 299 -> 166 ms)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Arena:
    """Memory for a whole model's words: large blocks carved into 64-byte aligned slices. Fresh memory costs a page
    fault per page touched, and section-sized arrays (a few MB each) cost twice as much per byte as one large block
    (measured: 46 ms against 24 ms for 260 MB). A block is freed with the last tensor that uses it."""

    BLOCK = 1 << 28

    def __init__(self):
        self.block, self.pos, self.lock = np.empty(0, np.uint8), 0, threading.Lock()

    def __call__(self, nbytes: int) -> np.ndarray:
        if nbytes > self.BLOCK // 2:
            return np.empty(nbytes, np.uint8)
        with self.lock:
            if self.pos + nbytes > self.block.size:  # the rest of the old block was never touched: it costs nothing
                self.block, self.pos = np.empty(self.BLOCK, np.uint8), 0
            a = self.block[self.pos:self.pos + nbytes]
            self.pos = (self.pos + nbytes + 63) & ~63
        return a


def open(url: str, storage_options: dict | None = None, **kwargs: Any) -> BBFReader:  # noqa: A001
    """Open a .bbf file at a local path or any fsspec URL (file://, memory://, http(s)://, s3://).
    `fetch=FetchOptions(...)` (or a dict) sets chunk size, concurrency, retries and timeouts for remote URLs."""
    return BBFReader(url, storage_options, **kwargs)


def load(url: str, storage_options: dict | None = None, *, fetch: FetchOptions | dict | None = None
         ) -> dict[str, torch.Tensor]:
    """Read every tensor (decoded) into a dict, like safetensors' load_file."""
    with BBFReader(url, storage_options, fetch=fetch) as f:
        return f.load_all()


def loads(data) -> dict[str, torch.Tensor]:
    """Every tensor (decoded) of a .bbf file held in memory (bytes, bytearray, memoryview, mmap), like safetensors'
    load(bytes). The tensors own their memory: `data` can be dropped afterwards."""
    with BBFReader("<bytes>", store=BufferStore(data)) as f:
        return f.load_all()


__all__ = ["BBFReader", "open", "load", "loads"]

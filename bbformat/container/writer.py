"""Streaming, atomic .bbf writer.

    with BBFWriter("model.bbf", desc, codec="bitsback", dtype="float16") as w:
        for group in desc.groups():          # embed, layer.0 .. layer.L-1, head
            w.write_group(group, tensors_of(group))

Memory is bounded by one group: each group is encoded, passed through the entropy stage, checksummed and written
before the next one is accepted. With `workers=N > 1` the entropy stage runs in N worker processes while the
caller's process rotates the next groups (the codec's chain stays in order); at most N groups are in flight and
sections are written in group order, so the file is byte-identical to a 1-worker one. The workers are spawned
(not forked), so a script that passes workers > 1 needs the usual `if __name__ == "__main__":` guard.

The header, index and footer go at the end; the file appears under its name only when `close()` succeeds. Until
then the bytes are in a hidden temporary next to the target, `.NAME.tmp-XXXXXXXXXXXX` (AtomicSink, io/store.py):
any failure (a full disk, a directory in the way, an exception in the caller's `with` block) removes it and leaves
an existing target untouched; a killed writer's temporary is removed by the next write to the same target.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from ..codecs import entropy, get_codec
from ..codecs.base import Codec, EncodedGroup, SectionData
from ..errors import BBFError, ModelError
from ..models.arch import ModelDesc
from ..words import check_dtype, dtype_name
from .header import build_header
from .layout import Footer, SectionRecord, align, crc32, pack_preamble
from ..io.store import AtomicSink

COMPRESSION = ("auto", "small", "none")  # auto: entropy methods 1/0; small: also method 2 (smaller, ~4x slower
#                                          to decode: SPEC 13.10); none: sections stored as they are


class BBFWriter:
    def __init__(self, url: str, desc: ModelDesc, *, codec: str | Codec = "raw", codec_params: dict | None = None,
                 dtype: str = "float16", compression: str = "auto", metadata: dict | None = None,
                 storage_options: dict | None = None, on_group: Callable[[str, EncodedGroup], None] | None = None,
                 workers: int = 1):
        self.desc, self.dtype = desc, check_dtype(dtype)
        self.codec = codec if isinstance(codec, Codec) else get_codec(codec, codec_params)
        if compression not in COMPRESSION:
            raise BBFError(f"compression must be one of {COMPRESSION}, got {compression!r}")
        self.compression, self.metadata, self.on_group = compression, metadata, on_group
        self._encoder = self.codec.encoder(desc, self.dtype)
        self._groups = desc.groups()
        self._next = 0
        self._records: list[SectionRecord] = []
        self._aux: list[dict[str, Any]] = []
        self._pending_aux: list[bytes] = []
        self._stats: dict[str, Any] = {"groups": {}}
        if not isinstance(workers, int) or workers < 1:
            raise BBFError(f"workers must be a positive integer, got {workers!r}")
        # the entropy stage of one section (a module-level function and its arguments: picklable for the workers)
        self._compress = None if compression == "none" else \
            partial(entropy.compress, dtype=self.dtype, small=compression == "small")
        self._pool = _entropy_pool(workers) if workers > 1 and self._compress is not None else None
        self._workers = workers
        self._inflight: deque = deque()  # (block, [(SectionData, raw length, future)]) whose entropy stage runs
        self._sink = AtomicSink(url, storage_options)
        self._sink.write(pack_preamble())
        self.url = url

    # ---- public -----------------------------------------------------------------------------------------
    @property
    def wants_ahead(self) -> tuple[str, ...]:
        """Tensors of later groups the codec would like before the first group: pass them to `write_ahead` (`save`
        does). Without them a codec writes its form that needs none (`exact`: no tied head, SPEC 12.6)."""
        return self._encoder.wants_ahead() if self._next == 0 else ()

    def write_ahead(self, tensors: dict[str, torch.Tensor]) -> None:
        """Give the codec the `wants_ahead` tensors (before the first group; they are written with their group)."""
        if self._next:
            raise BBFError("write_ahead comes before the first group")
        self._encoder.ahead(tensors)

    def write_group(self, group: str, tensors: dict[str, torch.Tensor]) -> EncodedGroup:
        """Encode and write the next group (they must come in push order: embed, layer.0, ..., head)."""
        if self._next >= len(self._groups):
            raise BBFError(f"all groups are written; got an extra group {group!r}")
        want = self._groups[self._next]
        if group != want:
            raise BBFError(f"groups must be written in order: expected {want!r}, got {group!r}")
        self._check_tensors(group, tensors)
        enc = self._encoder.encode(group, tensors)
        block = int(group.split(".")[1]) if group.startswith("layer.") else -1
        if self._pool is None:
            for sd in enc.sections:
                self._write_section(sd, block)
        else:
            # the payload goes to a worker; only its length stays here (its memory goes with `enc`)
            self._inflight.append((block, [(replace(sd, payload=b""), len(sd.payload), self._submit(sd))
                                           for sd in enc.sections]))
            while len(self._inflight) > self._workers:
                self._drain_one()
        if enc.stats:
            self._stats["groups"][group] = enc.stats
        if self.on_group:
            self.on_group(group, enc)
        self._next += 1
        return enc

    def add_aux(self, name: str, data: bytes, media_type: str = "application/octet-stream") -> None:
        """Attach an auxiliary blob (e.g. the tokenizer) as its own section; written at close."""
        if not isinstance(data, (bytes, bytearray)):
            raise BBFError("aux data must be bytes")
        self._aux.append({"name": str(name), "media_type": media_type})
        self._pending_aux.append(bytes(data))

    def close(self) -> None:
        """Write the aux sections, header, index and footer, then move the file onto its name. An incomplete file
        raises (the writer can still be completed or aborted); any other failure aborts: nothing is left behind."""
        if self._next != len(self._groups):
            raise BBFError(f"file incomplete: {self._next} of {len(self._groups)} groups written "
                           f"(next expected {self._groups[self._next]!r})")
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> None:
        while self._inflight:
            self._drain_one()
        self._shutdown()
        for i, data in enumerate(self._pending_aux):
            self._write_section(SectionData("aux", data, 1), -1, aux_id=i)
        self._stats["codec"] = self._encoder.finish()
        params = self._encoder.codec_params()
        config = self.codec.config() if params is None else {"id": self.codec.id, "params": params}
        header = build_header(self.desc, self.dtype, config, self._aux, self.metadata, self._stats)
        self._pad()
        header_offset = self._sink.pos
        self._sink.write(header)
        index = b"".join(r.pack() for r in self._records)
        index_offset = self._sink.pos
        self._sink.write(index)
        self._sink.write(Footer(header_offset, len(header), index_offset, len(self._records),
                                crc32(index), crc32(header)).pack())
        self._sink.commit()

    def abort(self) -> None:
        self._inflight.clear()
        self._shutdown()
        self._sink.abort()

    def __enter__(self) -> "BBFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    # ---- internals --------------------------------------------------------------------------------------
    def _check_tensors(self, group: str, tensors: dict[str, torch.Tensor]) -> None:
        want = {t.name: t.shape for t in self.desc.group_tensors(group)}
        missing, extra = set(want) - set(tensors), set(tensors) - set(want)
        if missing:
            raise ModelError(f"group {group}: missing tensor {sorted(missing)[0]!r}")
        if extra:
            raise ModelError(f"group {group}: unexpected tensor {sorted(extra)[0]!r}")
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise ModelError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, the model description "
                                 f"says {shape}")
            if not torch.is_floating_point(tensors[name]):
                raise ModelError(f"tensor {name!r} is not floating point ({tensors[name].dtype})")

    def _pad(self) -> None:
        gap = align(self._sink.pos) - self._sink.pos
        if gap:
            self._sink.write(b"\0" * gap)

    def _submit(self, sd: SectionData):
        if not sd.payload:
            return None
        payload = sd.payload if isinstance(sd.payload, bytes) else np.frombuffer(sd.payload, np.uint8)  # picklable
        return self._pool.submit(self._compress, payload, sd.word_size, sd.segments)

    def _drain_one(self) -> None:
        """Write the oldest in-flight group's sections once their entropy stage is done (in file order)."""
        block, pending = self._inflight.popleft()
        for sd, raw_len, fut in pending:
            self._write_section(sd, block, coded=fut.result() if fut is not None else (0, b""), raw_len=raw_len)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _write_section(self, sd: SectionData, block: int, aux_id: int = 0, coded: tuple | None = None,
                       raw_len: int | None = None) -> None:
        method, stored = coded if coded is not None else (0, sd.payload)
        if coded is None and self._compress is not None and sd.payload:
            method, stored = self._compress(sd.payload, sd.word_size, sd.segments)
        self._pad()
        offset = self._sink.pos
        self._sink.write(stored)
        self._records.append(SectionRecord(sd.kind, method, sd.word_size, block, offset, len(stored),
                                           len(sd.payload) if raw_len is None else raw_len, crc32(stored),
                                           sd.corrections, aux_id,
                                           len(self._records)))


def _entropy_pool(workers: int):
    """Worker processes for the entropy stage. Spawned, not forked: a child then holds none of the caller's
    memory (the model being encoded) and no copy of torch's thread pools."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def save(tensors: dict[str, torch.Tensor], url: str, model: ModelDesc, *, codec: str | Codec = "raw",
         dtype: str | None = None, aux: dict[str, bytes | tuple[bytes, str]] | None = None,
         progress: bool = False, **writer_kwargs: Any) -> None:
    """Write a whole SliceGPT-form state dict to `url` (any fsspec URL) in one call.

    `tensors` may be a `slicegpt_io.LazyTensors` (a checkpoint read group by group: memory holds one group).
    `dtype` defaults to the tensors' own dtype (float16, bfloat16 or float32); `aux` maps names to bytes or to
    (bytes, media type); `writer_kwargs` go to BBFWriter (codec_params, metadata, storage_options, workers, ...).
    """
    read = getattr(tensors, "read", None)
    if read is not None:  # lazy: only shapes and dtypes now, each group's weights when it is written
        tensors = _LazyGroups(tensors)
    if dtype is None:
        dtype = dtype_name(next(iter(tensors.values())).dtype)
    extra = set(tensors) - {t.name for t in model.tensors()}
    if extra:
        raise ModelError(f"tensor {sorted(extra)[0]!r} is not part of the model description")
    groups = model.groups()
    bar = _progress(len(groups), progress, f"encode ({codec if isinstance(codec, str) else codec.id})")
    with BBFWriter(url, model, codec=codec, dtype=dtype, **writer_kwargs) as w:
        ahead = [n for n in w.wants_ahead if n in tensors]
        if ahead:
            w.write_ahead(tensors.group(ahead) if read is not None else {n: tensors[n] for n in ahead})
        for group in groups:
            names = [t.name for t in model.group_tensors(group)]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ModelError(f"tensor {missing[0]!r} is missing from the state dict")
            w.write_group(group, tensors.group(names) if read is not None else {n: tensors[n] for n in names})
            bar.update(1)
        for name, data in (aux or {}).items():
            w.add_aux(name, *(data if isinstance(data, tuple) else (data,)))
    bar.close()


class _LazyGroups(dict):
    """A LazyTensors seen as save() needs it: name -> meta tensor (shape, dtype) and `group(names)`, the data."""

    def __init__(self, lazy):
        super().__init__(lazy.meta())
        self.group = lazy.read


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="group", disable=not enabled, leave=False)

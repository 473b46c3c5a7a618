"""Structured fuzzing of the .bbf reader: the engine behind tests/test_fuzz.py and tools/fuzz.py.

A mutant is a valid base file changed in exactly one way, described by a small value (a `Mutation`) so that a
failure is a reproducer that can be printed and replayed:

  bytes         flip, overwrite, insert or delete bytes anywhere; truncate; append (no checksum is fixed)
  preamble      one field of the preamble set to an extreme value
  footer        one field of the footer (reserved bytes included) set to an extreme value
  index         one field of one index record set to an extreme value, with the index CRC recomputed (or not)
  header        one value of the header (any path: model, codec, tensor table, aux, metadata, stats) replaced by
                a hostile value, deleted, or a key added; re-encoded, with its CRC and the footer recomputed
  header-bytes  the msgpack bytes of the header damaged, its CRC recomputed
  section       the bytes of one section damaged (and its CRC recomputed; the file re-laid out)
  swap          two sections' contents exchanged, records and CRCs consistent
  dtype-swap    float16 <-> bfloat16 in the header and tensor table, CRC recomputed (SPEC 7.1)

Each mutant is read the way every command reads a file: `bbf-inspect`'s summary (with every section's checksum),
the JSON `bbf decode` writes next to its checkpoint, every tensor (`load_all`) and every aux blob. The outcome:

  identical     read, and every tensor (dtype, shape, bits) and aux blob equals the original's
  rewritten     read with other data, where the mutation rewrote the data together with its checksum (section,
                swap, dtype-swap): undetectable by design, allowed
  <error name>  refused with that BBFError subclass (FormatError, ChecksumError, ...)
  FAIL-silent   read with other data although no checksum was rewritten: silent corruption
  FAIL-<name>   any other exception: a bug

A run passes when no outcome starts with "FAIL".
"""

from __future__ import annotations

import copy
import json
import random
import struct
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .container.layout import ALIGN, FOOTER, PREAMBLE, RECORD, align, crc32
from .errors import BBFError

# (name, offset, size, signed) of every fixed-width field, reserved bytes included
PREAMBLE_FIELDS = (("magic", 0, 8, False), ("major", 8, 2, False), ("minor", 10, 2, False), ("flags", 12, 4, False))
FOOTER_FIELDS = (("header_offset", 0, 8, False), ("header_length", 8, 8, False), ("index_offset", 16, 8, False),
                 ("n_sections", 24, 4, False), ("index_crc", 28, 4, False), ("header_crc", 32, 4, False),
                 ("major", 36, 2, False), ("minor", 38, 2, False), ("flags", 40, 4, False), ("reserved", 44, 4, False),
                 ("end_magic", 48, 8, False))
RECORD_FIELDS = (("kind", 0, 1, False), ("compression", 1, 1, False), ("word_size", 2, 1, False),
                 ("flags", 3, 1, False), ("block", 4, 4, True), ("offset", 8, 8, False), ("stored_len", 16, 8, False),
                 ("raw_len", 24, 8, False), ("crc", 32, 4, False), ("corrections", 36, 4, False),
                 ("aux_id", 40, 4, False), ("reserved", 44, 4, False))
KINDS = ("bytes", "preamble", "footer", "index", "header", "header-bytes", "section", "swap", "dtype-swap")
REWRITES = ("section", "swap", "dtype-swap")  # mutations that rewrite data and checksums together

# Hostile header values: wrong types, extremes, things JSON cannot hold, near-misses of valid values
HOSTILE = (None, True, False, 0, -1, 1, 2, 3, 7, 64, 2**31, 2**32, 2**40, 2**63 - 1, -2**63, 2**64 - 1, 0.0, -0.0,
           0.5, 1e15, 1e308, float("nan"), float("inf"), float("-inf"), "", "x", "0", "1.0", "2.0", "float16",
           "bfloat16", "float32", "raw", "exact", "bitsback", "llama", "opt", "silu", "relu", "evil", "embed",
           "layer.0", "head", b"", b"\0", b"x" * 40, [], [0], [1, 2], [0] * 9, [None], [[]], ["x"], {}, {"a": 1},
           {"name": 5}, {"name": "x", "media_type": 1}, {"id": "raw"}, "x" * 600, msgpack.ExtType(1, b"x"))


@dataclass
class Base:
    """A valid file, parsed: what mutations start from and what outcomes are compared with."""

    name: str
    data: bytes
    tensors: dict[str, torch.Tensor]
    aux: list[bytes]
    header: dict
    header_bytes: bytes
    footer: tuple
    records: list[list]
    sections: list[bytes]
    paths: list[tuple] = field(default_factory=list)  # every path into the header

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> "Base":
        from .container.reader import BBFReader
        from .io.store import BufferStore

        with BBFReader(name, store=BufferStore(data)) as f:
            tensors = f.load_all()
            aux = [f.aux(n) for n in f.aux_names()]
        foot = FOOTER.unpack_from(data, len(data) - FOOTER.size)
        hoff, hlen, ioff, n = foot[:4]
        records = [list(RECORD.unpack_from(data, ioff + i * RECORD.size)) for i in range(n)]
        sections = [data[r[5]:r[5] + r[6]] for r in records]
        hb = data[hoff:hoff + hlen]
        header = msgpack.unpackb(hb, raw=False)
        return cls(name, data, tensors, aux, header, hb, foot, records, sections, list(_paths(header)))

    @property
    def boundaries(self) -> list[int]:
        """Every section, header, index and footer boundary (and the preamble's)."""
        hoff, hlen, ioff = self.footer[:3]
        pts = {0, 8, PREAMBLE.size, hoff, hoff + hlen, ioff, len(self.data) - FOOTER.size, len(self.data)}
        for r in self.records:
            pts |= {r[5], r[5] + r[6]}
        pts |= {ioff + i * RECORD.size for i in range(len(self.records))}
        return sorted(pts)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def assemble(preamble: bytes, sections: list[bytes], records: list[list], header: bytes, *,
             fix: set[int] = frozenset()) -> bytes:
    """A file from its parts, laid out like the writer does (64-byte aligned, in order): every record gets the
    offset and stored length of its bytes; records in `fix` also get their CRC, the others keep theirs."""
    out = bytearray(preamble)
    recs = [list(r) for r in records]
    for i, sec in enumerate(sections):
        out += bytes(align(len(out)) - len(out))
        recs[i][5], recs[i][6] = len(out), len(sec)
        if i in fix:
            recs[i][8] = crc32(sec)
        out += sec
    out += bytes(align(len(out)) - len(out))
    hoff = len(out)
    out += header
    index = b"".join(RECORD.pack(*r) for r in recs)
    ioff = len(out)
    out += index
    out += FOOTER.pack(hoff, len(header), ioff, len(recs), crc32(index), crc32(header), 1, 0, 0, b"BBF-END\n")
    return bytes(out)


# ---- mutations ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    """One change to a base file. `kind` is one of KINDS; the other fields are its parameters (see `apply`)."""

    kind: str
    where: Any = None  # bytes: position; field mutations: (record, field name); header: path; section: index
    op: str = ""
    value: Any = None
    fix_crc: bool = True

    def __str__(self) -> str:
        v = self.value if not isinstance(self.value, (bytes, bytearray)) or len(self.value) <= 16 else \
            bytes(self.value[:16]) + b"..."
        return f"{self.kind}({self.where!r}, {self.op!r}, {v!r}{'' if self.fix_crc else ', no crc fix'})"


def apply(m: Mutation, base: Base) -> bytes:
    data = base.data
    if m.kind == "bytes":
        pos, n = m.where, len(data)
        pos = max(0, min(pos, n))
        if m.op == "flip":
            d = bytearray(data)
            for i, b in enumerate(m.value):
                if pos + i < n:
                    d[pos + i] ^= b or 1
            return bytes(d)
        if m.op == "overwrite":
            return data[:pos] + m.value + data[pos + len(m.value):]
        if m.op == "insert":
            return data[:pos] + m.value + data[pos:]
        if m.op == "delete":
            return data[:pos] + data[pos + m.value:]
        if m.op == "truncate":
            return data[:pos]
        if m.op == "append":
            return data + m.value
        raise ValueError(m.op)
    if m.kind in ("preamble", "footer", "index"):
        rec, name = m.where
        table = {"preamble": PREAMBLE_FIELDS, "footer": FOOTER_FIELDS, "index": RECORD_FIELDS}[m.kind]
        _, off, size, signed = next(f for f in table if f[0] == name)
        start = {"preamble": 0, "footer": len(data) - FOOTER.size, "index": base.footer[2] + rec * RECORD.size}[m.kind]
        d = bytearray(data)
        v = m.value if isinstance(m.value, bytes) else \
            (m.value % (1 << 8 * size)).to_bytes(size, "little")
        d[start + off:start + off + size] = v[:size].ljust(size, b"\0")
        if m.kind == "index" and m.fix_crc:
            ioff, n = base.footer[2], base.footer[3]
            struct.pack_into("<I", d, len(d) - FOOTER.size + 28, crc32(bytes(d[ioff:ioff + n * RECORD.size])))
        return bytes(d)
    if m.kind == "header":
        h = copy.deepcopy(base.header)
        _edit(h, m.where, m.op, m.value)
        return _with_header(base, msgpack.packb(h, use_bin_type=True))
    if m.kind == "header-bytes":
        hb = bytearray(base.header_bytes)
        pos = m.where % max(1, len(hb))
        if m.op == "flip":
            hb[pos] ^= m.value or 1
        elif m.op == "truncate":
            del hb[pos:]
        elif m.op == "insert":
            hb[pos:pos] = bytes([m.value & 255])
        return _with_header(base, bytes(hb))
    if m.kind == "section":
        i = m.where
        sec = bytearray(base.sections[i])
        pos = m.value[0] % (len(sec) + 1)
        payload = m.value[1]
        if m.op == "flip" and sec:
            for k, b in enumerate(payload):
                sec[(pos + k) % len(sec)] ^= b or 1
        elif m.op == "overwrite":
            sec[pos:pos + len(payload)] = payload
        elif m.op == "truncate":
            del sec[pos:]
        elif m.op == "insert":
            sec[pos:pos] = payload
        elif m.op == "zeros":
            sec[:] = bytes(len(sec))
        sections = list(base.sections)
        sections[i] = bytes(sec)
        return assemble(data[:PREAMBLE.size], sections, base.records, base.header_bytes, fix={i})
    if m.kind == "swap":
        i, j = m.where
        sections, recs = list(base.sections), [list(r) for r in base.records]
        sections[i], sections[j] = sections[j], sections[i]
        for k in (1, 2, 7, 9):  # compression, word size, raw length, corrections travel with the bytes
            recs[i][k], recs[j][k] = recs[j][k], recs[i][k]
        return assemble(data[:PREAMBLE.size], sections, recs, base.header_bytes, fix={i, j})
    if m.kind == "dtype-swap":
        h = copy.deepcopy(base.header)
        new = m.value
        h["dtype"] = new
        for t in h["tensors"]:
            t["dtype"] = new
        return _with_header(base, msgpack.packb(h, use_bin_type=True))
    raise ValueError(m.kind)


def _edit(h, path: tuple, op: str, value) -> None:
    if not path:
        return
    node = h
    for k in path[:-1]:
        node = node[k]
    last = path[-1]
    if op == "delete":
        del node[last]
    elif op == "insert":
        target = node[last]
        if isinstance(target, dict):  # an unknown key: readers ignore it
            target[value if isinstance(value, str) else "zz_unknown"] = 1
        elif isinstance(target, list):
            target.append(copy.deepcopy(target[-1]) if target else value)
        else:
            node[last] = [target, value]
    else:
        node[last] = value


def _with_header(base: Base, hb: bytes) -> bytes:
    """The base file with another header: same sections and index, the footer recomputed."""
    hoff = base.footer[0]
    index = base.data[base.footer[2]:len(base.data) - FOOTER.size]
    foot = list(base.footer)
    foot[1], foot[2], foot[5] = len(hb), hoff + len(hb), crc32(hb)
    return base.data[:hoff] + hb + index + FOOTER.pack(*foot)


def field_values(size: int, signed: bool, orig: int, rng: random.Random | None = None) -> list[int]:
    """Extreme and near-miss values for an integer field of `size` bytes."""
    bits = 8 * size
    vals = {0, 1, 2, orig - 1, orig + 1, orig ^ 1, orig * 2, orig // 2, (1 << bits) - 1, 1 << (bits - 1),
            (1 << (bits - 1)) - 1, ALIGN, orig + ALIGN, orig - ALIGN}
    if bits > 32:
        vals |= {1 << 32, 1 << 40, (1 << 40) + 2, 1 << 62}
    if signed:
        vals |= {-1, -2, -(1 << (bits - 1))}
    if rng is not None:
        vals.add(rng.getrandbits(bits))
    return sorted(v % (1 << bits) for v in vals)


def sweep(base: Base) -> list[Mutation]:
    """The structured mutations: every field of the preamble, footer, every index record and every header value,
    and every boundary of the file, each with a few extreme values."""
    out: list[Mutation] = []
    for area, fields_, starts in (("preamble", PREAMBLE_FIELDS, [0]),
                                  ("footer", FOOTER_FIELDS, [len(base.data) - FOOTER.size]),
                                  ("index", RECORD_FIELDS, [base.footer[2] + i * RECORD.size
                                                            for i in range(len(base.records))])):
        for rec, start in enumerate(starts):
            for name, off, size, signed in fields_:
                if name in ("magic", "end_magic"):
                    vals = [bytes(8), b"\x89BBF\r\n\x1a\x0b", b"BBF-END\r", b"\xff" * 8]
                else:
                    orig = int.from_bytes(base.data[start + off:start + off + size], "little", signed=signed)
                    vals = field_values(size, signed, orig)
                out += [Mutation(area, (rec, name), "set", v, fix_crc=True) for v in vals]
                if area == "index":
                    out.append(Mutation(area, (rec, name), "set", vals[-1], fix_crc=False))
    for path in base.paths:
        out.append(Mutation("header", path, "delete") if path else Mutation("header", path, "set", None))
        for v in (None, -1, 2**64 - 1, "x", [], {}, 1.5, b"\0"):
            out.append(Mutation("header", path, "set", v))
        node = _get(base.header, path)
        if isinstance(node, (dict, list)):
            out.append(Mutation("header", path, "insert", "zz_unknown"))
        if isinstance(node, int) and not isinstance(node, bool):
            out += [Mutation("header", path, "set", node + d) for d in (-1, 1)] + \
                   [Mutation("header", path, "set", 0), Mutation("header", path, "set", float(node))]
    for pos in base.boundaries:
        for p in {max(0, pos - 1), pos, min(len(base.data), pos + 1)}:
            out += [Mutation("bytes", p, "truncate"), Mutation("bytes", p, "insert", b"\0"),
                    Mutation("bytes", p, "insert", bytes(ALIGN)), Mutation("bytes", p, "flip", b"\x01"),
                    Mutation("bytes", p, "delete", 1)]
    out += [Mutation("bytes", 0, "append", b"\0"), Mutation("bytes", 0, "append", base.data[-FOOTER.size:])]
    for i in range(len(base.sections)):
        out += [Mutation("section", i, "zeros", (0, b"")), Mutation("section", i, "truncate", (1, b"")),
                Mutation("section", i, "insert", (0, b"\0")), Mutation("section", i, "flip", (2, b"\x10"))]
    if base.header["dtype"] in ("float16", "bfloat16"):
        out.append(Mutation("dtype-swap", None, "set",
                            "bfloat16" if base.header["dtype"] == "float16" else "float16"))
    return out


def _get(node, path):
    for k in path:
        node = node[k]
    return node


def random_mutation(rng: random.Random, base: Base) -> Mutation:
    """One mutation drawn at random (the larger budget of tools/fuzz.py)."""
    kind = rng.choices(KINDS, weights=(30, 3, 8, 20, 20, 6, 10, 2, 1))[0]
    n = len(base.data)
    if kind == "bytes":
        op = rng.choice(("flip", "overwrite", "insert", "delete", "truncate", "append"))
        pos = rng.choice(base.boundaries) + rng.randint(-2, 2) if rng.random() < 0.4 else rng.randrange(n)
        if op in ("delete",):
            return Mutation(kind, pos, op, rng.choice((1, 2, 7, 48, 56, 64, rng.randrange(1, n))))
        if op == "truncate":
            return Mutation(kind, pos, op)
        payload = _rand_bytes(rng)
        return Mutation(kind, pos, op, payload)
    if kind in ("preamble", "footer", "index"):
        table = {"preamble": PREAMBLE_FIELDS, "footer": FOOTER_FIELDS, "index": RECORD_FIELDS}[kind]
        name, off, size, signed = rng.choice(table)
        rec = rng.randrange(len(base.records)) if kind == "index" else 0
        if name in ("magic", "end_magic"):
            return Mutation(kind, (rec, name), "set", rng.randbytes(8))
        start = {"preamble": 0, "footer": n - FOOTER.size, "index": base.footer[2] + rec * RECORD.size}[kind]
        orig = int.from_bytes(base.data[start + off:start + off + size], "little", signed=signed)
        return Mutation(kind, (rec, name), "set", rng.choice(field_values(size, signed, orig, rng)),
                        fix_crc=rng.random() < 0.9)
    if kind == "header":
        path = rng.choice(base.paths)
        op = rng.choices(("set", "delete", "insert"), weights=(8, 1, 1))[0]
        if op == "delete" and not path:
            op = "set"
        node = _get(base.header, path)
        if op == "set" and isinstance(node, (int, float)) and not isinstance(node, bool) and rng.random() < 0.4:
            value = rng.choice((node + 1, node - 1, node * 2, -node, node + 0.5, 0, type(node)(rng.getrandbits(20))))
        else:
            value = rng.choice(HOSTILE)
        return Mutation(kind, path, op, value)
    if kind == "header-bytes":
        return Mutation(kind, rng.randrange(len(base.header_bytes)), rng.choice(("flip", "truncate", "insert")),
                        rng.randrange(256))
    if kind == "section":
        i = rng.randrange(len(base.sections))
        op = rng.choice(("flip", "overwrite", "truncate", "insert", "zeros"))
        return Mutation(kind, i, op, (rng.getrandbits(24), _rand_bytes(rng)))
    if kind == "swap":
        i, j = rng.sample(range(len(base.sections)), 2)
        return Mutation(kind, (i, j), "swap")
    new = {"float16": "bfloat16", "bfloat16": "float16", "float32": "float16"}[base.header["dtype"]]
    return Mutation(kind, None, "set", new)


def _rand_bytes(rng: random.Random) -> bytes:
    n = rng.choice((1, 1, 2, 4, 8, 16, 64))
    style = rng.random()
    if style < 0.3:
        return bytes([rng.choice((0, 1, 0x7F, 0x80, 0xFF))]) * n
    if style < 0.4:
        return struct.pack("<Q", rng.choice((2**32, 2**40, 2**63, 2**64 - 1)))[:n]
    return rng.randbytes(n)


# ---- running a mutant -----------------------------------------------------------------------------------
@dataclass
class Result:
    outcome: str
    detail: str = ""
    seconds: float = 0.0


def read_everything(data: bytes, name: str = "<mutant>") -> tuple[dict[str, torch.Tensor], list[bytes]]:
    """What the commands do with a file: bbf-inspect's summary (every checksum), bbf decode's JSON, every tensor,
    every aux blob."""
    from .cli.inspect import render, summarize
    from .container.reader import BBFReader
    from .io.store import BufferStore

    with BBFReader(name, store=BufferStore(data)) as f:
        s = summarize(f)
        render(s)
        json.dumps(s)
        cfg = f.model.slicing_config()
        cfg["bbformat_model"] = f.model.to_dict()
        json.dumps(cfg, allow_nan=False)
        tensors = f.load_all()
        aux = [f.aux(n) for n in f.aux_names()]
    return tensors, aux


def run(m: Mutation, base: Base) -> Result:
    t0 = time.perf_counter()
    data = apply(m, base)
    try:
        tensors, aux = read_everything(data)
    except BBFError as e:
        return Result(type(e).__name__, str(e), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - anything else is a bug, reported with its traceback
        tb = traceback.format_exc(limit=-4)
        return Result(f"FAIL-{type(e).__name__}", f"{e}\n{tb}", time.perf_counter() - t0)
    same = aux == base.aux and same_tensors(tensors, base.tensors)
    if same:
        return Result("identical", "", time.perf_counter() - t0)
    return Result("rewritten" if m.kind in REWRITES else "FAIL-silent", "data differs", time.perf_counter() - t0)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        ix = {2: torch.int16, 4: torch.int32}[x.element_size()]
        if not torch.equal(x.contiguous().view(ix), y.contiguous().view(ix)):
            return False
    return True


def base_files() -> dict[str, bytes]:
    """Small files for every codec, both families, every word dtype, both compression methods, with aux sections,
    (bitsback) correction records and an `exact` tied head (SPEC 12.6): a load takes a few milliseconds."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from . import save
    from .models.synthetic import random_slicegpt, tiny_desc

    out = {}
    aux = {"note": b"hello world " * 40, "bytes": bytes(range(256))}
    with tempfile.TemporaryDirectory() as d:
        for name, fam, codec, dtype, params, compression in (
                ("raw-opt-f16", "opt", "raw", torch.float16, None, "auto"),
                ("exact-llama-bf16", "llama", "exact", torch.bfloat16, None, "auto"),
                ("bitsback-llama-f16", "llama", "bitsback", torch.float16, {"threshold": 0.0003}, "auto"),
                ("exact-opt-f32", "opt", "exact", torch.float32, None, "auto"),
                ("small-llama-bf16", "llama", "exact", torch.bfloat16, None, "small"),  # entropy method 2
                ("tied-llama-f16", "llama", "exact", torch.float16, None, "auto")):
            desc = tiny_desc(fam, num_layers=2, hidden_size=32, vocab_size=128, widths=(24, 16, 28))
            tied = name.startswith("tied")
            if tied:  # the source tied its head: the head is stored as residuals against the embeddings
                desc = dataclasses.replace(desc, tie_word_embeddings=True)
            tensors = random_slicegpt(desc, seed=1, dtype=dtype, tied=tied)
            p = Path(d) / f"{name}.bbf"
            save(tensors, str(p), model=desc, codec=codec, codec_params=params, aux=aux, compression=compression)
            out[name] = p.read_bytes()
    return out


def summary(counts: dict[str, int]) -> str:
    width = max(map(len, counts), default=7)
    total = sum(counts.values())
    lines = [f"{'outcome':<{width}}  {'mutants':>8}  {'share':>7}"]
    for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{k:<{width}}  {v:>8,}  {100 * v / total:6.2f}%")
    lines.append(f"{'total':<{width}}  {total:>8,}")
    return "\n".join(lines)


__all__ = ["Base", "Mutation", "Result", "apply", "assemble", "base_files", "random_mutation", "read_everything",
           "run", "same_tensors", "summary", "sweep", "KINDS", "REWRITES"]

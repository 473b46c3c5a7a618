"""A bounded first look at a GGUF file, before transformers reads it.

transformers (through the gguf package) trusts a GGUF file's counts and lengths: a truncated count or a huge key
length ends in a struct.error or OverflowError, and a valid file that holds only `general.architecture=llama`
gets LlamaConfig's defaults, a 7B-parameter model that runs out of memory before anything notices that the file
has no weights. `check_gguf` reads the header with every count and length checked against the bytes that remain,
requires the keys that size the model, and requires that every tensor those keys imply is in the file, inside
it. What it refuses is a one-line ModelError; what it passes cannot make transformers build a model larger than
the tensors the file holds.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .arch import MAX_FFN, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what the gguf package reads (version 1 used 32-bit counts)
MAX_KEY = 1 << 16  # a key is a short dotted name
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2
ARCHITECTURES = ("llama",)  # the GGUF architectures transformers maps to a family bbformat handles

# GGUFValueType -> struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)


class _Bytes:
    """Bounds-checked little-endian reads over the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise ModelError(f"{self.path}: not a readable GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file has {len(self.buf) - self.pos} left")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"the length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long, over the limit of {limit}")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """A metadata value; arrays are skipped over, not built (an Array holding their length)."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        etype, n = self.u32(f"the element type of {what}"), self.u64(f"the length of {what}")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            self.need(n * size, f"the {n} elements of {what}")
            self.pos += n * size
            return Array(n)
        if etype not in (_STRING, _ARRAY):
            self.fail(f"{what} has unknown element type {etype}")
        self.need(n * 8, f"the {n} elements of {what}")  # every string or array starts with an 8-byte length
        for _ in range(n):
            self.value(etype, what, depth + 1)
        return Array(n)


class Array:
    """A metadata array, not built: its length."""

    def __init__(self, n: int):
        self.n = n

    def __repr__(self) -> str:
        return f"<array of {self.n}>"


def check_gguf(path) -> dict[str, Any]:
    """Refuse (ModelError) a GGUF file transformers would crash on, or build a model from that the file does not
    hold. Returns the metadata values it read (arrays as their lengths) and `tensors`: name -> (dims, type)."""
    path = Path(path)
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ModelError(f"reading {path} needs the gguf package (pip install 'bbformat[models]')") from None
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelError(f"{path}: not a GGUF file ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _check(_Bytes(m, path), size, GGML_QUANT_SIZES, GGMLQuantizationType)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None


def _check(r: _Bytes, size: int, quant_sizes, quant_type) -> dict[str, Any]:
    path = r.path
    if bytes(r.buf[:4]) != MAGIC:
        raise ModelError(f"{path}: not a GGUF file (bad magic {bytes(r.buf[:4])!r})")
    r.pos = 4
    version = r.u32("the version")
    if version not in VERSIONS:
        r.fail(f"version {version} (this reader knows {VERSIONS})")
    n_tensors, n_kv = r.u64("the tensor count"), r.u64("the metadata count")
    left = size - r.pos
    if n_kv > left // 13 or n_tensors > left // 33:  # smallest entry: 8+1+4+0 (kv), 8+1+4+8+4+8 (tensor)
        r.fail(f"it declares {n_kv} metadata entries and {n_tensors} tensors, more than its {left} bytes can hold")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}", MAX_KEY).decode("utf-8", "replace")
        v = r.value(r.u32(f"the type of {key!r}"), repr(key))
        meta[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for i in range(n_tensors):
        name = r.string(f"the name of tensor {i}", MAX_KEY).decode("utf-8", "replace")
        nd = r.u32(f"the dimension count of {name!r}")
        if not 1 <= nd <= MAX_DIMS:
            r.fail(f"tensor {name!r} has {nd} dimensions (1..{MAX_DIMS})")
        dims = tuple(r.u64(f"the dimensions of {name!r}") for _ in range(nd))
        ttype, offset = r.u32(f"the type of {name!r}"), r.u64(f"the offset of {name!r}")
        tensors[name] = (dims, ttype, offset)
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or not 1 <= align <= 1 << 16 or align & (align - 1):
        r.fail(f"general.alignment {align!r} is not a power of two up to 65536")
    data = (r.pos + align - 1) // align * align
    for name, (dims, ttype, offset) in tensors.items():
        try:
            block, nbytes = quant_sizes[quant_type(ttype)]
        except (ValueError, KeyError):
            r.fail(f"tensor {name!r} has unknown type {ttype}")
        n = 1
        for d in dims:
            n *= d
        if dims[0] % block or offset % align or data + offset + n // block * nbytes > size:
            r.fail(f"tensor {name!r} ({'x'.join(map(str, dims))}, type {ttype}) at offset {offset} does not lie "
                   f"inside the {size}-byte file")
    _check_model(r, meta, tensors)
    meta["tensors"] = {k: (v[0], v[1]) for k, v in tensors.items()}
    return meta


def _check_model(r: _Bytes, meta: dict[str, Any], tensors: dict) -> None:
    """The keys that size the model must be there, and every tensor they imply must be in the file."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        r.fail("it has no general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{r.path}: GGUF architecture {arch!r} is not supported (bbformat handles {ARCHITECTURES})")

    def integer(key: str, hi: int) -> int:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            raise ModelError(f"{r.path}: GGUF file has no {arch}.{key}: it does not describe a model (transformers "
                             f"would make one up from defaults)")
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise ModelError(f"{r.path}: GGUF {arch}.{key} = {v!r} is not an integer in 1..{hi}")
        return v

    L, d = integer("block_count", MAX_LAYERS), integer("embedding_length", MAX_WIDTH)
    F, heads = integer("feed_forward_length", MAX_FFN), integer("attention.head_count", MAX_WIDTH)
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, bool) or not isinstance(kv, int) or not 1 <= kv <= heads or heads % kv:
        raise ModelError(f"{r.path}: GGUF {arch}.attention.head_count_kv = {kv!r} does not divide head_count {heads}")

    def tensor(name: str, dims: tuple[int, ...] | None = None) -> tuple[int, ...]:
        if name not in tensors:
            raise ModelError(f"{r.path}: GGUF file has no tensor {name!r}, which its {arch}.* keys imply "
                             f"({L} blocks, width {d})")
        got = tensors[name][0]
        if dims is not None and got != dims:
            raise ModelError(f"{r.path}: GGUF tensor {name!r} has dimensions {list(got)}, its {arch}.* keys imply "
                             f"{list(dims)}")
        return got

    emb = tensor("token_embd.weight")
    if len(emb) != 2 or emb[0] != d or not 1 <= emb[1] <= MAX_VOCAB:
        raise ModelError(f"{r.path}: GGUF tensor 'token_embd.weight' has dimensions {list(emb)}, expected "
                         f"[{d}, vocab]")
    V = emb[1]
    tensor("output_norm.weight", (d,))
    if "output.weight" in tensors:
        tensor("output.weight", (d, V))
    head_dim = d // heads
    for i in range(L):
        p = f"blk.{i}."
        q = tensor(p + "attn_q.weight")
        if len(q) != 2 or q[0] != d:
            raise ModelError(f"{r.path}: GGUF tensor {p + 'attn_q.weight'!r} has dimensions {list(q)}, expected "
                             f"[{d}, heads x head_dim]")
        head_dim = q[1] // heads
        for name, dims in (("attn_k", (d, kv * head_dim)), ("attn_v", (d, kv * head_dim)), ("attn_output", (q[1], d)),
                           ("ffn_gate", (d, F)), ("ffn_up", (d, F)), ("ffn_down", (F, d)), ("attn_norm", (d,)),
                           ("ffn_norm", (d,))):
            tensor(p + name + ".weight", dims)
    if f"blk.{L}.attn_q.weight" in tensors:
        raise ModelError(f"{r.path}: GGUF file has more blocks than {arch}.block_count = {L}")

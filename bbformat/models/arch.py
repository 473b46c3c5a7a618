"""One description of a SliceGPT-form model, for both families, used by every codec.

`ModelDesc` is what the .bbf header stores under "model": enough to rebuild a runnable model with no outside
config. From it come the exact SliceGPT tensor names and shapes (`tensors()`), how they group into file sections
(`groups()`: embeddings, one group per transformer block, head) and the rotational symmetries (`symmetries()`):
for each, its size k and every tensor it acts on with the axis it acts along.

Convention for a symmetry with orthogonal R (k x k): along the acting axis every tensor is contracted with R^T,
i.e. axis 0: W <- R^T W (and b <- R^T b), axis 1: W <- W R. That is exactly Remark 3.1 of the paper in PyTorch's
(out, in) layout; outputs are unchanged for any orthogonal R. SPEC.md section 9 lists the tensors this produces.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..errors import ModelError

FAMILIES = ("llama", "opt")
ACTIVATIONS = ("silu", "relu", "gelu")  # what SlicedLM runs (llama: gated silu; opt: relu)
SLICEGPT_RMS_EPS = 1e-5  # SliceGPT's weightless RMS norm uses 1e-5 whatever the config says

# Limits on a model description (SPEC.md section 7). Far above any real model, low enough that nothing derived from
# them (tensor counts, shapes, the symmetries) costs a reader more than the header that declares them.
MAX_WIDTH = 1 << 20  # hidden_size, every width, num_heads, num_kv_heads, head_dim
MAX_FFN = 1 << 24  # intermediate_size
MAX_LAYERS = 1 << 13  # 60x the deepest released LLM; keeps a header within the object limits of schema.py
MAX_VOCAB = 1 << 32  # vocab_size, max_position_embeddings, token ids
_MAX_DEPTH = 16  # nesting of the free-form maps (rope_scaling, extra)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    group: str  # "embed", "layer.<i>" or "head"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Action:
    tensor: str
    axis: int  # 0: W <- R^T W (rows, or a vector); 1: W <- W R (columns)


@dataclass(frozen=True)
class Symmetry:
    name: str  # "emb", "mid.<i>", "out.<i>"
    size: int  # k
    group: str  # earliest group it touches: a streaming encoder meets its carrier there first
    actions: tuple[Action, ...]

    @property
    def free_params(self) -> int:
        return self.size * (self.size - 1) // 2

    def action(self, tensor: str) -> Action:
        for a in self.actions:
            if a.tensor == tensor:
                return a
        raise KeyError(tensor)


@dataclass(frozen=True)
class ModelDesc:
    family: str
    hidden_size: int  # the ORIGINAL width d (RMS norms divide by it)
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    embedding_dims: tuple[int, ...]  # (tokens,) for llama, (tokens, positions) for OPT
    attn_input_dims: tuple[int, ...]  # k_a per layer
    attn_output_dims: tuple[int, ...]  # k_b per layer (= mlp input)
    mlp_input_dims: tuple[int, ...]
    mlp_output_dims: tuple[int, ...]  # k_c per layer (= k_a of the next layer)
    lm_head_bias: bool = False
    attention_bias: bool = False  # q/k/v/o biases (OPT: True)
    mlp_bias: bool = False  # fc1/fc2 biases (OPT: True)
    activation: str = "silu"  # llama: silu (gated), opt: relu
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_eps: float = SLICEGPT_RMS_EPS
    tie_word_embeddings: bool = False  # of the SOURCE model; the sliced form always has its own lm_head
    do_slice_head: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    # ---- construction and validation -------------------------------------------------------------------
    def __post_init__(self):
        """Every field is checked for type and range, then across fields; a bad one is a ModelError naming it. The
        reader (SPEC section 7), the importers and the writer all build descriptions through here."""
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise ModelError(f"family {_show(self.family)} is not one of {FAMILIES}")
        put("hidden_size", _int("hidden_size", self.hidden_size, 1, MAX_WIDTH))
        put("num_layers", _int("num_layers", self.num_layers, 1, MAX_LAYERS))
        put("vocab_size", _int("vocab_size", self.vocab_size, 1, MAX_VOCAB))
        put("num_heads", _int("num_heads", self.num_heads, 1, MAX_WIDTH))
        put("num_kv_heads", _int("num_kv_heads", self.num_kv_heads, 1, self.num_heads))
        put("head_dim", _int("head_dim", self.head_dim, 1, MAX_WIDTH))
        put("intermediate_size", _int("intermediate_size", self.intermediate_size, 1, MAX_FFN))
        put("max_position_embeddings", _int("max_position_embeddings", self.max_position_embeddings, 1, MAX_VOCAB))
        d, L = self.hidden_size, self.num_layers
        for name in ("attn_input_dims", "attn_output_dims", "mlp_input_dims", "mlp_output_dims"):
            put(name, _ints(name, getattr(self, name), L, d))
        want_emb = 2 if self.family == "opt" else 1
        put("embedding_dims", _ints("embedding_dims", self.embedding_dims, want_emb, d))
        for name in ("lm_head_bias", "attention_bias", "mlp_bias", "tie_word_embeddings", "do_slice_head"):
            if not isinstance(getattr(self, name), bool):
                raise ModelError(f"{name} must be true or false, got {_show(getattr(self, name))}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ModelError(f"activation {_show(self.activation)} is not one of {ACTIVATIONS}")
        put("rope_theta", _positive("rope_theta", self.rope_theta))
        put("rms_eps", _positive("rms_eps", self.rms_eps))
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ModelError(f"rope_scaling must be a map or null, got {_show(self.rope_scaling)}")
            _check_plain("rope_scaling", self.rope_scaling)
        for name in ("bos_token_id", "eos_token_id"):
            put(name, _token_ids(name, getattr(self, name)))
        if not isinstance(self.extra, dict):
            raise ModelError(f"extra must be a map, got {_show(self.extra)}")
        _check_plain("extra", self.extra)
        # across fields: the widths chain from block to block (SliceGPT's slicing config)
        if len(set(self.embedding_dims)) != 1 or self.embedding_dims[0] != self.attn_input_dims[0]:
            raise ModelError(f"embedding_dims {list(self.embedding_dims)} must equal layer 0's attention input width "
                             f"{self.attn_input_dims[0]}")
        for i in range(L):
            if self.attn_output_dims[i] != self.mlp_input_dims[i]:
                raise ModelError(f"layer {i}: attn_output_dims ({self.attn_output_dims[i]}) != mlp_input_dims "
                                 f"({self.mlp_input_dims[i]})")
            if i + 1 < L and self.mlp_output_dims[i] != self.attn_input_dims[i + 1]:
                raise ModelError(f"layer {i}: mlp_output_dims ({self.mlp_output_dims[i]}) != layer {i + 1}'s "
                                 f"attn_input_dims ({self.attn_input_dims[i + 1]})")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelDesc":
        """A description from its map (the header's `model`, or the JSON's `bbformat_model`); unknown keys are
        ignored (SPEC section 8), a missing or bad field is a ModelError naming it."""
        if not isinstance(d, dict):
            raise ModelError(f"the model description must be a map, got {_show(d)}")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ModelError(f"the model description has no {missing[0]!r}")
        return cls(**{k: v for k, v in d.items() if isinstance(k, str) and k in known})

    def num_tensors(self) -> int:
        """len(tensors()), without building the tensor list."""
        return len(self.embed_names()) + self.num_layers * len(self.layer_names(0)) + len(self.head_names())

    # ---- SliceGPT config (the sibling .json) ----------------------------------------------------------
    def slicing_config(self) -> dict[str, Any]:
        """The SliceGPT `<name>_<sparsity>.json` dict for this model (keys are stringified ints)."""
        L = self.num_layers

        def per(v):
            return {str(i): int(v[i]) for i in range(L)}

        return {
            "hidden_size": self.hidden_size,
            "layers_num": L,
            "do_slice_head": self.do_slice_head,
            "parallel_blocks": False,
            "embedding_dimensions": {str(i): int(k) for i, k in enumerate(self.embedding_dims)},
            "attention_input_dimensions": per(self.attn_input_dims),
            "attention_output_dimensions": per(self.attn_output_dims),
            "mlp_input_dimensions": per(self.mlp_input_dims),
            "mlp_output_dimensions": per(self.mlp_output_dims),
            "head_dimension": self.mlp_output_dims[-1],
            "const_dimension": None,
        }

    # ---- tensors -----------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return "model.decoder." if self.family == "opt" else "model."

    def layer_names(self, i: int) -> dict[str, str]:
        """Role -> SliceGPT key for layer i. Roles: q k v o up gate down attn_sc mlp_sc and *_bias."""
        p = f"{self.prefix}layers.{i}."
        if self.family == "opt":
            n = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"}
        else:
            n = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
        out = {r: p + s + ".weight" for r, s in n.items()}
        if self.attention_bias:
            for r in ("q", "k", "v", "o"):
                out[r + "_bias"] = p + n[r] + ".bias"
        if self.mlp_bias:
            for r in ("up", "down"):
                out[r + "_bias"] = p + n[r] + ".bias"
        out["attn_sc"] = p + "attn_shortcut_Q"
        out["mlp_sc"] = p + "mlp_shortcut_Q"
        return out

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Role -> shape for layer i."""
        ka, kb, kc = self.attn_input_dims[i], self.attn_output_dims[i], self.mlp_output_dims[i]
        d, F = self.hidden_size, self.intermediate_size
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        s: dict[str, tuple[int, ...]] = {
            "q": (nq, ka), "k": (nkv, ka), "v": (nkv, ka), "o": (kb, nq),
            "up": (F, kb), "down": (kc, F), "attn_sc": (ka, kb), "mlp_sc": (kb, kc),
        }
        if self.family == "llama":
            s["gate"] = (F, kb)
        if self.attention_bias:
            s.update(q_bias=(nq,), k_bias=(nkv,), v_bias=(nkv,), o_bias=(kb,))
        if self.mlp_bias:
            s.update(up_bias=(F,), down_bias=(kc,))
        del d
        return s

    def embed_names(self) -> list[str]:
        names = [self.prefix + "embed_tokens.weight"]
        if self.family == "opt":
            names.append(self.prefix + "embed_positions.weight")
        return names

    def head_names(self) -> list[str]:
        return ["lm_head.weight"] + (["lm_head.bias"] if self.lm_head_bias else [])

    def tensors(self) -> list[TensorInfo]:
        """Every tensor of the SliceGPT layout, in file (push) order."""
        return list(self._layout()[0])

    def memo(self, key: str, build):
        """build(), computed once per description and kept on it (frozen: the fields never change, so neither do
        the values derived from them). For what a reader asks for many times per open: layout, symmetries,
        carriers."""
        cache = self.__dict__.setdefault("_memo", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _layout(self) -> tuple[tuple[TensorInfo, ...], dict[str, list[TensorInfo]]]:
        """(tensors, group -> its tensors): a reader asks for them once per group."""
        def build():
            ts = tuple(self._build_tensors())
            by_group: dict[str, list[TensorInfo]] = {g: [] for g in self.groups()}
            for t in ts:
                by_group[t.group].append(t)
            return ts, by_group
        return self.memo("layout", build)

    def _build_tensors(self) -> list[TensorInfo]:
        out = [TensorInfo(self.prefix + "embed_tokens.weight", (self.vocab_size, self.embedding_dims[0]), "embed")]
        if self.family == "opt":
            # OPT's learned positions carry an offset of 2 rows
            out.append(TensorInfo(self.prefix + "embed_positions.weight",
                                  (self.max_position_embeddings + 2, self.embedding_dims[1]), "embed"))
        for i in range(self.num_layers):
            names, shapes = self.layer_names(i), self.layer_shapes(i)
            for role in LAYER_ORDER:
                if role in names:
                    out.append(TensorInfo(names[role], shapes[role], f"layer.{i}"))
        out.append(TensorInfo("lm_head.weight", (self.vocab_size, self.mlp_output_dims[-1]), "head"))
        if self.lm_head_bias:
            out.append(TensorInfo("lm_head.bias", (self.vocab_size,), "head"))
        return out

    def tensor_map(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors()}

    def groups(self) -> list[str]:
        """Section groups in push order: embeddings, one per block, head."""
        return ["embed"] + [f"layer.{i}" for i in range(self.num_layers)] + ["head"]

    def group_tensors(self, group: str) -> list[TensorInfo]:
        return list(self._layout()[1].get(group, ()))

    # ---- symmetries ---------------------------------------------------------------------------------
    def symmetries(self) -> list[Symmetry]:
        """All 2L+1 rotational symmetries, in the order a streaming encoder meets them."""
        return list(self.memo("symmetries", lambda: tuple(self._build_symmetries())))

    def _build_symmetries(self) -> list[Symmetry]:
        L = self.num_layers
        syms: list[Symmetry] = []
        n0 = self.layer_names(0)
        acts = [Action(n, 1) for n in self.embed_names()]
        acts += [Action(n0["attn_sc"], 0)] + [Action(n0[r], 1) for r in ("q", "k", "v")]
        syms.append(Symmetry("emb", self.embedding_dims[0], "embed", tuple(acts)))
        for i in range(L):
            n = self.layer_names(i)
            acts = [Action(n["o"], 0)] + ([Action(n["o_bias"], 0)] if "o_bias" in n else [])
            acts += [Action(n["attn_sc"], 1)] + [Action(n[r], 1) for r in ("gate", "up") if r in n]
            acts += [Action(n["mlp_sc"], 0)]
            syms.append(Symmetry(f"mid.{i}", self.attn_output_dims[i], f"layer.{i}", tuple(acts)))
            acts = [Action(n["down"], 0)] + ([Action(n["down_bias"], 0)] if "down_bias" in n else [])
            acts += [Action(n["mlp_sc"], 1)]
            if i + 1 < L:
                nn = self.layer_names(i + 1)
                acts += [Action(nn["attn_sc"], 0)] + [Action(nn[r], 1) for r in ("q", "k", "v")]
            else:
                acts += [Action("lm_head.weight", 1)]
            syms.append(Symmetry(f"out.{i}", self.mlp_output_dims[i], f"layer.{i}", tuple(acts)))
        return syms

    # ---- sizes ----------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors())


# Order of a layer's tensors inside its section. It is the paper's push order (Algorithm 5): what the middle
# symmetry's rotation pops comes from the tail of the attention input side, what the output symmetry's pops
# comes from the tail of the MLP input side, and each rotated carrier (o, then down) follows its pop.
LAYER_ORDER = ("attn_sc", "q", "k", "v", "q_bias", "k_bias", "v_bias",
               "o", "o_bias", "mlp_sc", "gate", "up", "up_bias",
               "down", "down_bias")


def apply_rotation(tensors: dict, sym: Symmetry, R, only: set[str] | None = None) -> None:
    """Apply orthogonal R (torch, float64) to every tensor of `sym` present in `tensors` (in place, same dtype).

    `only` restricts the tensors touched (a streaming encoder applies a rotation to one group at a time).
    """
    for a in sym.actions:
        if a.tensor not in tensors or (only is not None and a.tensor not in only):
            continue
        t = tensors[a.tensor]
        x = t.to(R.dtype)
        if x.dim() == 1:
            y = R.T @ x
        elif a.axis == 0:
            y = R.T @ x
        else:
            y = x @ R
        tensors[a.tensor] = y.to(t.dtype)


# ---- field checks (ModelDesc.__post_init__) ------------------------------------------------------------------
def _show(v: Any) -> str:
    """A value as messages quote it: short, with its type."""
    r = repr(v)
    return f"{r[:40] + '...' if len(r) > 40 else r} ({type(v).__name__})"


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ModelError(f"{name} must be an integer, got {_show(v)}")
    if not lo <= int(v) <= hi:
        raise ModelError(f"{name} = {int(v)} is outside {lo}..{hi}")
    return int(v)


def _ints(name: str, v: Any, n: int, hi: int) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise ModelError(f"{name} must be a list of {n} widths, got {_show(v)}")
    if len(v) != n:
        raise ModelError(f"{name} has {len(v)} entries, expected {n}")
    return tuple(_int(f"{name}[{i}]", x, 1, hi) for i, x in enumerate(v))


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ModelError(f"{name} must be a finite positive number, got {_show(v)}")
    return float(v)


def _token_ids(name: str, v: Any):
    """None, a token id, or a list of them (HF configs may list several eos tokens); lists become tuples."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        if len(v) > 1024:
            raise ModelError(f"{name} lists {len(v)} token ids, more than 1024")
        return tuple(_int(f"{name}[{i}]", x, 0, MAX_VOCAB) for i, x in enumerate(v))
    return _int(name, v, 0, MAX_VOCAB)


def _check_plain(name: str, v: Any, depth: int = 0) -> None:
    """`v` holds only what JSON and msgpack both store: null, bools, integers, finite floats, strings, lists and maps
    with string keys, nested at most _MAX_DEPTH deep (bbf decode writes it to a JSON file)."""
    if depth > _MAX_DEPTH:
        raise ModelError(f"{name} is nested more than {_MAX_DEPTH} deep")
    if v is None or isinstance(v, (bool, str)):
        return
    if isinstance(v, int):
        if not -(1 << 63) <= v < 1 << 64:
            raise ModelError(f"{name} = {v} is outside the 64-bit range")
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ModelError(f"{name} = {v} is not finite")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_plain(f"{name}[{i}]", x, depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ModelError(f"{name} has a key {_show(k)} that is not a string")
            _check_plain(f"{name}.{k}", x, depth + 1)
        return
    raise ModelError(f"{name} holds {_show(v)}: only null, booleans, numbers, strings, lists and maps are allowed")

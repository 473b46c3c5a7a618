"""A runnable SliceGPT-form model (Llama or OPT) built from a `ModelDesc` and tensors keyed by SliceGPT names.

The forward is SliceGPT's sliced forward (shared/reference/slicegpt-layout.md):

    h1 = x @ attn_shortcut_Q + Attn(RMSN(x));   h2 = h1 @ mlp_shortcut_Q + MLP(RMSN(h1))
    logits = lm_head(RMSN(h_L)) (+ lm_head.bias)

where RMSN is weightless and divides by the ORIGINAL width d, whatever the sliced width is. Parameters are
registered under their exact SliceGPT names, so `state_dict()` is a SliceGPT state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .arch import ModelDesc

_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class SlicedLM(nn.Module):
    def __init__(self, desc: ModelDesc, tensors: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if desc.activation not in _ACT:
            raise ModelError(f"unsupported activation {desc.activation!r}; expected one of {sorted(_ACT)}")
        if _rope_type(desc.rope_scaling) not in ("default", "linear", "llama3"):
            raise ModelError(f"unsupported rope_scaling {desc.rope_scaling!r}")
        self.desc, self.dtype, self.device = desc, dtype, device
        self._shapes = {t.name: t.shape for t in desc.tensors()}
        if tensors is not None:
            self.set_tensors(tensors)
            missing = self.missing()
            if missing:
                raise ModelError(f"missing tensor {missing[0]!r} (and {len(missing) - 1} more)")

    @classmethod
    def empty(cls, desc: ModelDesc, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> "SlicedLM":
        """A model with no weights yet: fill it with `set_tensors` / `load_group` as groups stream in (each
        placed on `device` as it arrives)."""
        return cls(desc, None, dtype, device)

    # ---- weights -----------------------------------------------------------------------------------
    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Register (or replace) weights by SliceGPT name; each is checked against the desc and cast to dtype."""
        for name, t in tensors.items():
            if name not in self._shapes:
                raise ModelError(f"tensor {name!r} is not part of this {self.desc.family} model")
            if tuple(t.shape) != self._shapes[name]:
                raise ModelError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {self._shapes[name]}")
            *path, leaf = name.split(".")
            mod = self
            for p in path:  # nested plain containers so that state_dict() keys are the SliceGPT names
                if not hasattr(mod, p):
                    mod.add_module(p, nn.Module())
                mod = getattr(mod, p)
            mod.register_parameter(leaf, nn.Parameter(t.detach().to(device=self.device, dtype=self.dtype),
                                                      requires_grad=False))

    load_group = set_tensors  # a loader hands over one group (embed / layer.i / head) at a time

    def missing(self) -> list[str]:
        return [n for n in self._shapes if not self._has(n)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _has(self, name: str) -> bool:
        try:
            self.get_parameter(name)
            return True
        except AttributeError:
            return False

    def _w(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        try:
            return self.get_parameter(name)
        except AttributeError:
            raise ModelError(f"tensor {name!r} has not been loaded") from None

    # ---- forward -----------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Weightless RMS norm over the original width d, in float32 or better."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / self.desc.hidden_size + self.desc.rms_eps)
        return y.to(x.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids LongTensor[B, T] -> logits[B, T, V] in the compute dtype (no padding, causal)."""
        d = self.desc
        T = input_ids.shape[-1]
        x = F.embedding(input_ids, self._w(d.prefix + "embed_tokens.weight"))
        rope = None
        if d.family == "opt":
            if T > d.max_position_embeddings:
                raise ModelError(f"sequence of {T} tokens is longer than the {d.max_position_embeddings} positions")
            x = x + self._w(d.prefix + "embed_positions.weight")[torch.arange(T, device=x.device) + 2]
        else:
            rope = self._rope(T, x.device)
        for i in range(d.num_layers):
            n = d.layer_names(i)
            x = x @ self._w(n["attn_sc"]) + self._attention(self.rms_norm(x), n, rope)
            x = x @ self._w(n["mlp_sc"]) + self._mlp(self.rms_norm(x), n)
        bias = self._w("lm_head.bias") if d.lm_head_bias else None
        return F.linear(self.rms_norm(x), self._w("lm_head.weight"), bias)

    def _weights(self, n: dict[str, str]):
        """role -> weight (or None) of one layer, for `attention` / `mlp`."""
        return lambda role: self._w(n.get(role))

    def _attention(self, x, n, rope):
        return attention(x, self._weights(n), self.desc, rope)

    def _mlp(self, x, n):
        return mlp(x, self._weights(n), self.desc)

    def _rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.desc, T, self.dtype, device)


def attention(x: torch.Tensor, w, desc: ModelDesc, rope) -> torch.Tensor:
    """Causal self-attention of (already normalised) x [B, T, k_a]; w(role) gives a layer's weights by role
    (q, k, v, o and their biases, or None). Shared by SlicedLM and the slicer."""
    B, T, _ = x.shape

    def proj(role, heads):
        return F.linear(x, w(role), w(role + "_bias")).view(B, T, heads, desc.head_dim).transpose(1, 2)

    q, k, v = proj("q", desc.num_heads), proj("k", desc.num_kv_heads), proj("v", desc.num_kv_heads)
    if rope is not None:
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(desc.head_dim),
                                       enable_gqa=desc.num_kv_heads != desc.num_heads)
    return F.linear(o.transpose(1, 2).reshape(B, T, -1), w("o"), w("o_bias"))


def mlp(x: torch.Tensor, w, desc: ModelDesc) -> torch.Tensor:
    """The MLP of (already normalised) x: SiLU-gated for llama (a `gate` weight), plain for OPT."""
    act = _ACT[desc.activation]
    if w("gate") is not None:
        h = act(F.linear(x, w("gate"))) * F.linear(x, w("up"))
    else:
        h = act(F.linear(x, w("up"), w("up_bias")))
    return F.linear(h, w("down"), w("down_bias"))


def rope_tables(desc: ModelDesc, T: int, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin for positions 0..T-1: frequencies and angles in float64 (with the model's rope scaling),
    rounded once to `dtype` (SliceGPT keeps them in fp16)."""
    h = desc.head_dim
    inv_freq = 1.0 / desc.rope_theta ** (torch.arange(0, h, 2, dtype=torch.float64, device=device) / h)
    inv_freq = _scale_rope(inv_freq, desc.rope_scaling)
    ang = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply_rope(x, cos, sin):
    h = x.shape[-1] // 2
    rotated = torch.cat([-x[..., h:], x[..., :h]], dim=-1)  # Hugging Face's rotate_half convention
    return x * cos + rotated * sin


def _rope_type(scaling: dict | None) -> str:
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))


def _scale_rope(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Hugging Face's "linear" and "llama3" (Llama 3.1+) frequency scalings."""
    kind = _rope_type(scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        return inv_freq
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelengths (scaled), 1: short (kept)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq

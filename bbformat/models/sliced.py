"""SliceGPT's sliced forward (Llama or OPT), as torch modules built from a `ModelDesc`: the one forward of bbformat.

    h1 = x @ attn_shortcut_Q + Attn(RMSN(x));   h2 = h1 @ mlp_shortcut_Q + MLP(RMSN(h1))
    logits = lm_head(RMSN(h_L)) (+ lm_head.bias)

where RMSN is weightless and divides by the ORIGINAL width d, whatever the sliced width is
(shared/reference/slicegpt-layout.md). Parameters live in `nn.Embedding` / `nn.Linear` modules registered under
their exact SliceGPT names, so `state_dict()` is a SliceGPT state dict.

Two models share these modules and `forward_hidden`:

- `SlicedLM` (here, torch only): `model(input_ids) -> logits`, no cache; what the slicer, the codec tests and
  the perplexity tools run, and what `load_model` returns when transformers is not installed.
- `bbformat.models.modeling.SlicedForCausalLM`: a transformers `PreTrainedModel` around the same modules (KV cache,
  attention masks, `generate`, pipelines).

A pipeline stage (`bbformat.models.stage.SlicedStage`) holds only some blocks of the same modules and runs
`forward_blocks`, the part of `forward_hidden` after the embedding, over them.

The attention takes an optional mask (boolean or additive, broadcastable to [B, heads, T, T_kv]) and an optional
cache object with transformers' `Cache.update(k, v, layer_idx) -> (k, v)` contract; this module never imports
transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .arch import ModelDesc

_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


# ---- the math: functions shared by the modules and the slicer ----------------------------------------------
def rms_norm(x: torch.Tensor, d: int, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the ORIGINAL width d (x may be narrower), in float32 or better."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / d + eps)
    return y.to(x.dtype)


def attention(x: torch.Tensor, w, desc: ModelDesc, rope, mask: torch.Tensor | None = None, cache=None,
              layer_idx: int = 0) -> torch.Tensor:
    """Causal self-attention of (already normalised) x [B, T, k_a]; w(role) gives a layer's weights by role
    (q, k, v, o and their biases, or None). `rope`: (cos, sin) broadcastable to [B, heads, T, head_dim], or None
    (OPT). `mask`: None (plain causal) or a boolean (True = attend) / additive mask over [B, 1, T, T_kv].
    `cache`: None or a transformers-style cache; its `update` returns the keys and values of every position."""
    B, T, _ = x.shape
    hd = desc.head_dim

    def proj(role):
        return F.linear(x, w(role), w(role + "_bias")).view(B, T, -1, hd).transpose(1, 2)

    q, k, v = proj("q"), proj("k"), proj("v")
    if rope is not None:
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)
    causal = False
    if mask is None and T > 1:
        if k.shape[2] == T:
            causal = True
        else:  # new tokens after cached ones: query t sees every cached key and the new keys up to itself
            past = k.shape[2] - T
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
    groups = desc.num_heads // desc.num_kv_heads
    # grouped-query attention without SDPA's enable_gqa (its CPU kernel is up to 500x slower on small shapes)
    if groups > 1 and T == 1 and (mask is None or mask.shape[1] == 1):
        # one query token: its `groups` query heads per KV head play the part of a query sequence
        o = F.scaled_dot_product_attention(q.reshape(B, desc.num_kv_heads, groups, hd), k, v, attn_mask=mask,
                                           scale=1.0 / math.sqrt(hd))
        o = o.reshape(B, desc.num_heads, 1, hd)
    else:
        if groups > 1:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0 / math.sqrt(hd))
    return F.linear(o.transpose(1, 2).reshape(B, T, -1), w("o"), w("o_bias"))


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, kv_heads, S, h] -> [B, kv_heads * n, S, h], each KV head repeated for its n query heads."""
    B, H, S, h = x.shape
    return x[:, :, None].expand(B, H, n, S, h).reshape(B, H * n, S, h)


def mlp(x: torch.Tensor, w, desc: ModelDesc) -> torch.Tensor:
    """The MLP of (already normalised) x: SiLU-gated for llama (a `gate` weight), plain for OPT."""
    act = _ACT[desc.activation]
    if w("gate") is not None:
        h = act(F.linear(x, w("gate"))) * F.linear(x, w("up"), w("up_bias"))  # mlp_bias: up and down only
    else:
        h = act(F.linear(x, w("up"), w("up_bias")))
    return F.linear(h, w("down"), w("down_bias"))


def rope_tables(desc: ModelDesc, positions, dtype: torch.dtype, device=None,
                inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) for `positions`: an int T (positions 0..T-1, tables [T, head_dim]) or a LongTensor [B, T]
    (tables [B, 1, T, head_dim]). Frequencies and angles in float64 (float32 where the device has no float64),
    with the model's rope scaling, rounded once to `dtype`."""
    if isinstance(positions, int):
        pos = torch.arange(positions, device=device)
    else:
        pos = positions
        device = pos.device
    work = _work_dtype(device)
    if inv_freq is None:
        inv_freq = rope_inv_freq(desc, device, work)
    ang = pos.to(work)[..., None] * inv_freq
    if pos.dim() == 2:
        ang = ang[:, None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_inv_freq(desc: ModelDesc, device=None, work: torch.dtype | None = None) -> torch.Tensor:
    work = work or _work_dtype(device)
    h = desc.head_dim
    inv_freq = 1.0 / desc.rope_theta ** (torch.arange(0, h, 2, dtype=torch.float64) / h)
    return _scale_rope(inv_freq, desc.rope_scaling).to(device=device, dtype=work)


def _work_dtype(device) -> torch.dtype:
    return torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64


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


def check_desc(desc: ModelDesc) -> None:
    """What the forward supports, checked before any weight is read."""
    if desc.activation not in _ACT:
        raise ModelError(f"unsupported activation {desc.activation!r}; expected one of {sorted(_ACT)}")
    if _rope_type(desc.rope_scaling) not in ("default", "linear", "llama3"):
        raise ModelError(f"unsupported rope_scaling {desc.rope_scaling!r}")


# ---- the modules --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """SliceGPT's weightless RMS norm over the original width d (no parameters)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.d, self.eps = d, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.d, self.eps)

    def extra_repr(self) -> str:
        return f"d={self.d}, eps={self.eps}"


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _child(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted `path` under root, created as plain containers where missing."""
    mod = root
    for part in path.split(".") if path else ():
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod


class SlicedDecoderLayer(nn.Module):
    """One SliceGPT block: q/k/v/o (out) and gate/up/down (fc1/fc2) as `nn.Linear` under their SliceGPT names,
    `attn_shortcut_Q` and `mlp_shortcut_Q` as parameters, two weightless norms."""

    def __init__(self, desc: ModelDesc, i: int):
        super().__init__()
        self.desc, self.layer_idx = desc, i
        names, shapes = desc.layer_names(i), desc.layer_shapes(i)
        prefix = f"{desc.prefix}layers.{i}."
        self._linear: dict[str, nn.Linear] = {}  # role -> module (a plain dict: the modules register below)
        for role, name in names.items():
            if role.endswith("_bias"):
                continue
            if role in ("attn_sc", "mlp_sc"):
                self.register_parameter(name[len(prefix):], _param(*shapes[role]))
                continue
            path = name[len(prefix):-len(".weight")]  # "self_attn.q_proj", "mlp.up_proj", "fc1"
            parent, _, leaf = path.rpartition(".")
            out_f, in_f = shapes[role]
            lin = nn.Linear(in_f, out_f, bias=role + "_bias" in names)
            lin.weight.requires_grad_(False)
            if lin.bias is not None:
                lin.bias.requires_grad_(False)
            _child(self, parent).add_module(leaf, lin)
            self._linear[role] = lin
        self.attn_norm = RMSNorm(desc.hidden_size, desc.rms_eps)
        self.mlp_norm = RMSNorm(desc.hidden_size, desc.rms_eps)

    def w(self, role: str) -> torch.Tensor | None:
        """A weight by role ("q", "o_bias", ...), or None if the layer has none."""
        if role.endswith("_bias"):
            lin = self._linear.get(role[:-5])
            return None if lin is None else lin.bias
        lin = self._linear.get(role)
        return None if lin is None else lin.weight

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        d = self.desc
        x = x @ self.attn_shortcut_Q + attention(self.attn_norm(x), self.w, d, rope, mask, cache, self.layer_idx)
        return x @ self.mlp_shortcut_Q + mlp(self.mlp_norm(x), self.w, d)


class SlicedStack(nn.Module):
    """Embeddings (token, and OPT's learned positions), the blocks and the final weightless norm.

    A pipeline stage (bbformat.models.stage) builds only its blocks `layers` (and the embeddings only when `embed`):
    the other entries of `self.layers` are None, so every block it holds keeps its SliceGPT name."""

    def __init__(self, desc: ModelDesc, layers: range | None = None, embed: bool = True):
        super().__init__()
        self.desc = desc
        if embed:
            V, k = desc.vocab_size, desc.embedding_dims[0]
            # `_weight`: no random init. On the meta device nn.Embedding's normal_ goes through torch._refs, whose
            # first use imports torch._prims and friends: 1.5 s of a 1.9 s load_model (measured).
            self.embed_tokens = nn.Embedding(V, k, _weight=torch.empty(V, k))
            if desc.family == "opt":
                P, kp = desc.max_position_embeddings + 2, desc.embedding_dims[1]
                self.embed_positions = nn.Embedding(P, kp, _weight=torch.empty(P, kp))
            for p in self.parameters():
                p.requires_grad_(False)
        held = range(desc.num_layers) if layers is None else layers
        self.layers = nn.ModuleList(SlicedDecoderLayer(desc, i) if i in held else None
                                    for i in range(desc.num_layers))
        self.norm = RMSNorm(desc.hidden_size, desc.rms_eps)
        self._inv_freq: dict = {}  # (device, dtype) -> RoPE inverse frequencies (not a buffer: .to(dtype) would round it)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        key = (position_ids.device, _work_dtype(position_ids.device))
        inv = self._inv_freq.get(key)
        if inv is None:
            inv = self._inv_freq[key] = rope_inv_freq(self.desc, *key)
        return rope_tables(self.desc, position_ids, dtype, inv_freq=inv)


def build_modules(root: nn.Module, desc: ModelDesc, layers: range | None = None, embed: bool = True,
                  head: bool = True) -> None:
    """Give `root` the SliceGPT module tree: `model` (llama) or `model.decoder` (opt) and `lm_head`. Build it under
    `torch.device("meta")` to allocate nothing until the weights arrive. A pipeline stage passes the blocks it
    holds and whether it holds the embeddings and the head (default: the whole model)."""
    check_desc(desc)
    stack = SlicedStack(desc, layers, embed)
    if desc.family == "opt":
        root.model = nn.Module()
        root.model.decoder = stack
    else:
        root.model = stack
    if head:
        root.lm_head = nn.Linear(desc.mlp_output_dims[-1], desc.vocab_size, bias=desc.lm_head_bias)
        for p in root.lm_head.parameters():
            p.requires_grad_(False)


def stack_of(root: nn.Module) -> SlicedStack:
    return root.model.decoder if root.desc.family == "opt" else root.model


def positions_from_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
    """Position ids [B, T] of the new tokens: counted over the unpadded tokens when a 2-D mask is given (left
    padding), else past..past+T-1."""
    if attention_mask is not None and attention_mask.dim() == 2:
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, -T:]
    return torch.arange(past, past + T, device=device).unsqueeze(0)  # [1, T]: broadcasts over the batch


def forward_hidden(root: nn.Module, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The final normalised hidden states [B, T, k_c(L-1)] of the SliceGPT model whose modules `root` holds."""
    x = stack_of(root).embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    return forward_blocks(root, x, range(root.desc.num_layers), position_ids, mask, cache)


def forward_blocks(root: nn.Module, x: torch.Tensor, layers: range, position_ids: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, cache=None, first: bool = True, last: bool = True
                   ) -> torch.Tensor:
    """Blocks `layers` of the model whose modules `root` holds, on x [B, T, k_a(layers[0])]: the token embeddings
    when `first` (OPT's learned positions are added here), else the hidden state a previous pipeline stage handed
    over. The hidden state leaving the last of them [B, T, k_c], normalised by the final norm when `last`."""
    desc = root.desc
    stack = stack_of(root)
    B, T = x.shape[:2]
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = positions_from_mask(None, B, T, past, x.device)
    rope = None
    if desc.family == "opt":
        if first:
            if int(position_ids.max()) >= desc.max_position_embeddings:
                raise ModelError(f"position {int(position_ids.max())} is beyond the model's "
                                 f"{desc.max_position_embeddings} positions")
            x = x + stack.embed_positions(position_ids + 2)  # OPT's learned positions carry an offset of 2
    else:
        rope = stack.rope(position_ids, x.dtype)
    for i in layers:
        x = stack.layers[i](x, rope, mask, cache)
    return stack.norm(x) if last else x


def logits_of(root: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return root.lm_head(hidden)


class SlicedWeights:
    """Weight handling shared by `SlicedLM` and `SlicedForCausalLM`: tensors installed by SliceGPT name (checked
    against the description, cast, placed on the target device) as they stream in."""

    desc: ModelDesc

    def _init_weights_state(self, desc: ModelDesc, dtype: torch.dtype | None, device,
                            groups: list[str] | None = None) -> None:
        """`groups`: the groups whose tensors this module holds (a pipeline stage's); default: every group."""
        tensors = desc.tensors() if groups is None else [t for g in groups for t in desc.group_tensors(g)]
        self._shapes = {t.name: t.shape for t in tensors}
        self._loaded: set[str] = set()
        self._load_dtype, self._load_device = dtype, device

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install (or replace) weights by SliceGPT name; each is checked against the desc, cast to the model's
        dtype and placed on its device."""
        for name, t in tensors.items():
            if name not in self._shapes:
                raise ModelError(f"tensor {name!r} is not part of this {self.desc.family} model")
            if tuple(t.shape) != self._shapes[name]:
                raise ModelError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {self._shapes[name]}")
            path, _, leaf = name.rpartition(".")
            mod = self.get_submodule(path)
            old = getattr(mod, leaf)
            dtype, device = self._load_dtype, self._load_device
            if dtype is None and not old.is_meta:  # a model built with real weights keeps their dtype and device
                dtype, device = old.dtype, old.device
            value = t.detach().to(device=device, dtype=dtype)
            mod.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
            self._loaded.add(name)

    load_group = set_tensors  # a loader hands over one group (embed / layer.i / head) at a time

    def missing(self) -> list[str]:
        """SliceGPT names of the weights not installed yet."""
        return [n for n in self._shapes if n not in self._loaded]

    def _check_complete(self) -> None:
        if len(self._loaded) != len(self._shapes):
            missing = self.missing()
            raise ModelError(f"tensor {missing[0]!r} has not been loaded (and {len(missing) - 1} more)")

    def sliced_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their SliceGPT names, in `desc.tensors()` (file) order."""
        self._check_complete()
        return {n: self.get_parameter(n).detach() for n in self._shapes}


class SlicedLM(SlicedWeights, nn.Module):
    """The SliceGPT-form model in plain torch: `model(input_ids) -> logits [B, T, V]` (causal, no padding, no
    cache). For generation, `bbformat.load_pretrained` gives the transformers model built on the same modules."""

    def __init__(self, desc: ModelDesc, tensors: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        nn.Module.__init__(self)
        self.desc, self.dtype, self.device = desc, dtype, device
        with torch.device("meta"):  # allocate nothing: the weights are installed as they come
            build_modules(self, desc)
        self._init_weights_state(desc, dtype, device)
        if tensors is not None:
            self.set_tensors(tensors)
            self._check_complete_at_init()

    def _check_complete_at_init(self):
        missing = self.missing()
        if missing:
            raise ModelError(f"missing tensor {missing[0]!r} (and {len(missing) - 1} more)")

    @classmethod
    def empty(cls, desc: ModelDesc, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> "SlicedLM":
        """A model with no weights yet: fill it with `set_tensors` / `load_group` as groups stream in (each
        placed on `device` as it arrives)."""
        return cls(desc, None, dtype, device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids LongTensor[B, T] -> logits[B, T, V] in the compute dtype (no padding, causal)."""
        self._check_complete()
        return logits_of(self, forward_hidden(self, input_ids))

"""Symmetries of the sliced forward that no codec removes yet (issue 13's optional point): what each one is, a
function that applies it (tests check the logits do not move), and how many words an `exact`-style canonical form
could drop for it. `tools/symmetry_budget.py` prints the counts for real shapes.

The rotations `arch.py` declares act on the residual stream (widths k_a, k_b, k_c): that is what SliceGPT creates
and what `exact` and `bitsback` remove. These act inside a block instead:

- `vo`, per KV head j: V_j -> A V_j (its rows, and v_bias), O_h -> O_h A^-1 for every query head h that reads
  KV head j (O's columns h*hd..). The attention weights do not see V, so any invertible A (hd x hd) works:
  hd^2 degrees of freedom; its orthogonal part, hd(hd - 1)/2, is what a triangle (as `exact` stores) removes.
- `qk`, per KV head: Q_h -> M Q_h for its query heads, K -> M^-T K (rows, and their biases). Without position
  rotations (OPT) any invertible M: hd^2 per head. With RoPE, M must commute with every rotation angle: a
  rotation-scaling of each (i, i + hd/2) pair (Hugging Face's rotate_half pairs), hd per KV head.
- `mlp`, per channel c: SwiGLU's up row c x s and down column c / s (any s != 0; gate cannot scale, SiLU is not
  homogeneous); OPT's ReLU allows s > 0 on fc1's row (and bias) against fc2's column. One word per channel.
- permutations of the MLP channels (F!) and of the heads (n_kv! (g!)^n_kv): discrete, so no word can be dropped;
  bits-back coding could give back log2 of their count in bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .arch import ModelDesc


# ---- applying them (float64 tensors, in place on a dict of SliceGPT tensors) --------------------------------
def _heads_of(desc: ModelDesc, kv: int) -> range:
    g = desc.num_heads // desc.num_kv_heads
    return range(kv * g, (kv + 1) * g)


def apply_vo(tensors: dict, desc: ModelDesc, layer: int, kv: int, A: torch.Tensor) -> None:
    """V_kv -> A V_kv (and its bias), O's columns of each query head reading kv -> O_h A^-1."""
    n, hd = desc.layer_names(layer), desc.head_dim
    rows = slice(kv * hd, (kv + 1) * hd)
    v = tensors[n["v"]].clone()
    v[rows] = A @ v[rows]
    tensors[n["v"]] = v
    if "v_bias" in n:
        b = tensors[n["v_bias"]].clone()
        b[rows] = A @ b[rows]
        tensors[n["v_bias"]] = b
    o, inv = tensors[n["o"]].clone(), torch.linalg.inv(A)
    for h in _heads_of(desc, kv):
        o[:, h * hd:(h + 1) * hd] = o[:, h * hd:(h + 1) * hd] @ inv
    tensors[n["o"]] = o


def rope_commuting(desc: ModelDesc, gen: torch.Generator) -> torch.Tensor:
    """A random hd x hd matrix that commutes with every RoPE rotation: a rotation-scaling per (i, i + hd/2)."""
    h = desc.head_dim // 2
    a, b = torch.randn(h, generator=gen, dtype=torch.float64), torch.randn(h, generator=gen, dtype=torch.float64)
    M = torch.zeros(2 * h, 2 * h, dtype=torch.float64)
    i = torch.arange(h)
    M[i, i], M[i + h, i + h], M[i, i + h], M[i + h, i] = a, a, -b, b
    return M


def apply_qk(tensors: dict, desc: ModelDesc, layer: int, kv: int, M: torch.Tensor) -> None:
    """Q_h -> M Q_h for the query heads reading kv, K_kv -> M^-T K_kv (and their biases). With RoPE, M must
    commute with the position rotations (`rope_commuting`)."""
    n, hd = desc.layer_names(layer), desc.head_dim
    inv_t = torch.linalg.inv(M).T
    for role, mat, heads in (("q", M, _heads_of(desc, kv)), ("k", inv_t, [kv])):
        for key in (role, role + "_bias"):
            if key not in n:
                continue
            t = tensors[n[key]].clone()
            for h in heads:
                t[h * hd:(h + 1) * hd] = mat @ t[h * hd:(h + 1) * hd]
            tensors[n[key]] = t


def apply_mlp_scale(tensors: dict, desc: ModelDesc, layer: int, s: torch.Tensor) -> None:
    """up's rows (and bias) x s, down's columns / s: SwiGLU (any s != 0) or ReLU (s > 0)."""
    n = desc.layer_names(layer)
    tensors[n["up"]] = tensors[n["up"]] * s[:, None]
    if "up_bias" in n:
        tensors[n["up_bias"]] = tensors[n["up_bias"]] * s
    tensors[n["down"]] = tensors[n["down"]] / s[None, :]


# ---- counting them ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    name: str
    words_orthogonal: int  # words a triangle-style canonical form drops (the orthogonal part)
    words_full: int  # degrees of freedom of the whole continuous group (invertible matrices, scales)
    bits: float  # discrete symmetries: log2 of their count (what bits-back could give back)
    note: str


def _log2_factorial(n: int) -> float:
    return math.lgamma(n + 1) / math.log(2)


def budget(desc: ModelDesc) -> list[Budget]:
    """Per further symmetry, summed over the layers: what removing it could save."""
    L, hd, nkv, nh, F = desc.num_layers, desc.head_dim, desc.num_kv_heads, desc.num_heads, desc.intermediate_size
    g = nh // nkv
    rope = desc.family == "llama"
    tri = hd * (hd - 1) // 2
    scale_ok = desc.activation in ("silu", "relu")
    out = [Budget("vo", L * nkv * tri, L * nkv * hd * hd, 0.0, f"per KV head, GL({hd}) on V's rows and O's columns")]
    if rope:
        out.append(Budget("qk", L * nkv * hd // 2, L * nkv * hd, 0.0,
                          f"per KV head, a rotation-scaling per RoPE pair ({hd // 2} pairs)"))
    else:
        out.append(Budget("qk", L * nh * tri, L * nh * hd * hd, 0.0, f"per head, GL({hd}) on Q's and K's rows"))
    if scale_ok:
        what = "SwiGLU up/down" if desc.activation == "silu" else "ReLU fc1/fc2 (s > 0)"
        out.append(Budget("mlp", 0, L * F, 0.0, f"per channel, {what}"))
    out.append(Budget("perm", 0, 0, L * (_log2_factorial(F) + _log2_factorial(nkv) + nkv * _log2_factorial(g)),
                      "MLP channels and heads, permuted"))
    return out

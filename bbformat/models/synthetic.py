"""Model descriptions and random SliceGPT-form weights for tests and benchmarks (no download needed).

`random_slicegpt` mimics what SliceGPT produces: every shortcut matrix is a slice of a product of two random
orthogonal bases, Q_a[:, :k_a]^T Q_b[:, :k_b]; embeddings and head have per-column scales that decay like a PCA
ordering; other weights are Gaussian with a trained-like std. `iter_random_slicegpt` yields the same weights
group by group (memory: one group), for the 7B/70B-shaped models of the scale benchmark.
"""

from __future__ import annotations

import torch

from collections.abc import Iterator

from ..errors import ModelError
from .arch import ModelDesc
from .slicegpt_io import hf_desc, uniform_slicing

_CONFIGS = {
    "opt-125m": dict(model_type="opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     ffn_dim=3072, vocab_size=50272, max_position_embeddings=2048, bos_token_id=2, eos_token_id=2),
    "opt-1.3b": dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     ffn_dim=8192, vocab_size=50272, max_position_embeddings=2048, bos_token_id=2, eos_token_id=2),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    # the shapes of the scale benchmark (tools/bench_scale.py)
    "llama2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                      max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_id=2),
    "llama3.2-3b": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, head_dim=128, intermediate_size=8192, vocab_size=128256,
                        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                        bos_token_id=128000, eos_token_id=128009),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
                       eos_token_id=128001),
}
EXAMPLES = tuple(_CONFIGS)


def example_desc(name: str, sparsity: float = 0.2, num_layers: int | None = None) -> ModelDesc:
    """A real model's description ("opt-125m", "opt-1.3b", "smollm2-135m") sliced the SliceGPT way.

    `num_layers` keeps only the first few blocks (the last kept one then has the unsliced MLP output)."""
    if name not in _CONFIGS:
        raise ModelError(f"unknown example model {name!r}; expected one of {EXAMPLES}")
    cfg = dict(_CONFIGS[name])
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    fam = cfg["model_type"]
    return hf_desc(cfg, uniform_slicing(cfg["hidden_size"], cfg["num_hidden_layers"], sparsity, fam))


def tiny_desc(family: str = "llama", num_layers: int = 3, hidden_size: int = 64, vocab_size: int = 300,
              widths: tuple[int, ...] = (48, 40, 56)) -> ModelDesc:
    """A tiny model whose widths differ from block to block and inside a block (k_a != k_b != k_c).

    Layer i has k_a = widths[i % n], k_b = widths[(i + 2) % n]; k_c is the next layer's k_a, and d for the last."""
    n, L = len(widths), num_layers
    ka = [widths[i % n] for i in range(L)]
    kb = [widths[(i + 2) % n] for i in range(L)]
    kc = ka[1:] + [hidden_size]
    cfg = dict(model_type=family, hidden_size=hidden_size, num_hidden_layers=L, num_attention_heads=4,
               vocab_size=vocab_size, max_position_embeddings=64)
    if family == "llama":
        cfg.update(num_key_value_heads=2, intermediate_size=2 * hidden_size, rope_theta=10000.0)
    else:
        cfg.update(ffn_dim=2 * hidden_size)
    slicing = uniform_slicing(hidden_size, L, 0.0, family)
    slicing.update(embedding_dimensions={str(i): ka[0] for i in range(len(slicing["embedding_dimensions"]))},
                   attention_input_dimensions=_per(ka), attention_output_dimensions=_per(kb),
                   mlp_input_dimensions=_per(kb), mlp_output_dimensions=_per(kc))
    return hf_desc(cfg, slicing)


def _per(v):
    return {str(i): x for i, x in enumerate(v)}


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (float64)."""
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Householder QR is several times faster on one thread of busy cores (codecs/exact.py)
    try:
        q, r = torch.linalg.qr(a)
    finally:
        torch.set_num_threads(threads)
    return q * torch.sign(torch.diagonal(r))


def pca_scales(k: int, std: float) -> torch.Tensor:
    """Per-column scales decaying like sqrt of a PCA spectrum (power law), with mean square std^2."""
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    return s * (std / s.pow(2).mean().sqrt())


def random_slicegpt(desc: ModelDesc, seed: int = 0, dtype: torch.dtype = torch.float32,
                    scale: float = 0.03, tied: bool = False) -> dict[str, torch.Tensor]:
    """Random SliceGPT-form weights for `desc`, keyed by SliceGPT name, in `desc.tensors()` order. `tied`: as
    SliceGPT slices a model whose head was tied to its embeddings E (V x d): embed = (E Q_emb)[:, :e_0] and
    head = E diag(g) Q_L (g: the final norm's weights), each rounded to `dtype` on its own."""
    out: dict[str, torch.Tensor] = {}
    for _, tensors in iter_random_slicegpt(desc, seed, dtype, scale, tied):
        out.update(tensors)
    return out


def iter_random_slicegpt(desc: ModelDesc, seed: int = 0, dtype: torch.dtype = torch.float32,
                         scale: float = 0.03, tied: bool = False) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """`random_slicegpt`'s weights (the same values) as (group, {name: tensor}) in push order."""
    gen = torch.Generator().manual_seed(seed)
    d = desc.hidden_size
    work = torch.float64 if dtype == torch.float64 else torch.float32  # big Gaussians need no float64

    def randn(*shape, std=scale):  # in place: a 70B head is 4 GB of float32 already
        return torch.randn(*shape, generator=gen, dtype=work).mul_(std).to(dtype)

    shapes = {t.name: t.shape for t in desc.tensors()}
    q_in = random_orthogonal(d, gen)  # basis of the residual stream entering each block (Q_a)
    out: dict[str, torch.Tensor] = {}
    for name in desc.embed_names():
        V, k = shapes[name]
        if tied and name == desc.embed_names()[0]:  # the token embeddings and (below) the head: views of one E
            E = torch.randn(V, d, generator=gen, dtype=torch.float64) * pca_scales(d, scale)
            out[name] = (E @ q_in[:, :k]).to(dtype)
        else:
            out[name] = randn(V, k, std=1.0) * pca_scales(k, scale).to(dtype)
    yield "embed", out
    for i in range(desc.num_layers):
        names, lshapes = desc.layer_names(i), desc.layer_shapes(i)
        q_mid, q_out = random_orthogonal(d, gen), random_orthogonal(d, gen)
        ka, kb, kc = desc.attn_input_dims[i], desc.attn_output_dims[i], desc.mlp_output_dims[i]
        out = {}
        for role, name in names.items():
            if role == "attn_sc":
                out[name] = (q_in[:, :ka].T @ q_mid[:, :kb]).to(dtype)
            elif role == "mlp_sc":
                out[name] = (q_mid[:, :kb].T @ q_out[:, :kc]).to(dtype)
            else:
                out[name] = randn(*lshapes[role], std=scale / 4 if role.endswith("_bias") else scale)
        q_in = q_out
        yield f"layer.{i}", {t.name: out[t.name] for t in desc.group_tensors(f"layer.{i}")}
    V, k = shapes["lm_head.weight"]
    if tied:
        g = torch.rand(d, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        out = {"lm_head.weight": ((E * g) @ q_in[:, :k]).to(dtype)}
    else:
        out = {"lm_head.weight": randn(V, k, std=1.0) * pca_scales(k, scale).to(dtype)}
    if desc.lm_head_bias:
        out["lm_head.bias"] = randn(V, std=scale / 4)
    yield "head", out

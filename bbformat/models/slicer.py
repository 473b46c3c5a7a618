"""SliceGPT, built in: turn a Hugging Face Llama or OPT model into the sliced SliceGPT layout.

The procedure is SliceGPT's `rotate_and_slice_sequential` (shared/reference/slicegpt-layout.md):

1. Norm fusion. Each norm's scale (and OPT's bias) moves into the linear layers that read the norm, and the norm
   becomes a weightless RMS norm over the original width d. OPT's LayerNorm subtracts the mean, so its residual
   stream is kept mean-free instead: embeddings centred, out_proj/fc2 outputs centred. Llama's embeddings are NOT
   centred (SliceGPT does, but for RMSNorm that changes the model).
2. Layer by layer, on calibration activations that flow through the layers ALREADY sliced: PCA bases Q_a (layer
   input), Q_b (between attention and MLP), Q_c (layer output) from float64 X^T X, each layer's weights rotated
   into them and cut to the kept widths, and the shortcut matrices that move the residual between bases.

Only one layer's activations are held at a time; the attention and MLP run in float32 and every rotation in
float64, cast to the output dtype at the end.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ModelError
from .arch import SLICEGPT_RMS_EPS, ModelDesc
from .hf import model_desc
from .sliced import attention, mlp, rope_tables
from .slicegpt_io import hf_desc, uniform_slicing

_BATCH = 8  # calibration samples per forward chunk: bounds the attention's working memory


def slice_model(hf_model, calib_ids: torch.Tensor, sparsity: float, *, progress: bool = True, round_to: int = 8,
                dtype: torch.dtype = torch.float16, slice_head: bool = False, canonical: bool = True
                ) -> tuple[ModelDesc, dict[str, torch.Tensor]]:
    """Slice `hf_model` (LlamaForCausalLM / OPTForCausalLM) to `sparsity` with PCA on `calib_ids` [N, T].

    Returns the sliced `ModelDesc` and its tensors under their SliceGPT names, in `dtype`. Widths are
    k = int((1 - sparsity) * d) rounded down to a multiple of `round_to`; the last layer's output (and the
    head) stay d wide unless `slice_head`. Sparsity 0 only rotates: the model computes the same function.
    With `canonical` (default) the rotations left free by SliceGPT's symmetries are fixed to the `exact` codec's
    canonical form before the one rounding to `dtype`, so `exact` files reproduce the sliced model bit for bit.
    """
    base = model_desc(hf_model.config)
    calib_ids = torch.as_tensor(calib_ids)
    if calib_ids.dim() != 2 or calib_ids.dtype not in (torch.int32, torch.int64) or calib_ids.numel() == 0:
        raise ModelError(f"calibration ids must be a non-empty integer tensor [N, T], got "
                         f"{calib_ids.dtype} {tuple(calib_ids.shape)}")
    if int(calib_ids.min()) < 0 or int(calib_ids.max()) >= base.vocab_size:
        raise ModelError(f"calibration ids must lie in 0..{base.vocab_size - 1}")
    if calib_ids.shape[1] > base.max_position_embeddings:
        raise ModelError(f"calibration sequences of {calib_ids.shape[1]} tokens exceed the model's "
                         f"{base.max_position_embeddings} positions")
    slicing = uniform_slicing(base.hidden_size, base.num_layers, sparsity, base.family, round_to, slice_head)
    calib = {"sparsity": float(sparsity), "calibration_samples": int(calib_ids.shape[0]),
             "calibration_seq_len": int(calib_ids.shape[1])}
    desc = hf_desc(hf_model.config, slicing, extra={"slicing": calib})
    with torch.inference_mode():
        tensors = _Slicer(hf_model, desc, torch.float64).run(calib_ids.long(), progress)
        if canonical:  # pick, among the equivalent rotations, the exact codec's canonical one (see canonical_form)
            from ..codecs.exact import canonical_form

            tensors = canonical_form(desc, tensors)
        return desc, {n: t.to(dtype).contiguous() for n, t in tensors.items()}


def pca_basis(x: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (columns, descending eigenvalue) of sum X^T X over all rows of x [..., d], in float64, damped
    by 1% of the mean diagonal as SliceGPT does."""
    x = x.reshape(-1, x.shape[-1])
    H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.double()
        H.addmm_(c.T, c)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a threaded eigh of a d x d matrix is slower, up to 50x on a busy machine
    try:
        vecs = torch.linalg.eigh(H).eigenvectors
    finally:
        torch.set_num_threads(threads)
    return vecs.flip(-1)  # eigh sorts ascending


def _rms_norm(x: torch.Tensor, d: int) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / d + SLICEGPT_RMS_EPS)


class _Slicer:
    """Holds the source weights and the growing output dict; `run` walks the layers once."""

    def __init__(self, hf_model, desc: ModelDesc, dtype: torch.dtype):
        self.desc, self.dtype = desc, dtype
        self.opt = desc.family == "opt"
        self.src = hf_model.model.decoder if self.opt else hf_model.model
        self.head = hf_model.lm_head
        self.out: dict[str, torch.Tensor] = {}

    def _emit(self, name: str, t: torch.Tensor) -> None:
        self.out[name] = t.to(self.dtype).contiguous()

    # ---- embeddings ---------------------------------------------------------------------------------
    def _embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Layer 0's input [N, T, d] (float32) after fusion; stores the fused float64 embedding tables."""
        tok = self.src.embed_tokens.weight.double()
        tables = [tok]
        if self.opt:
            pos = self.src.embed_positions.weight.double()
            tables = [tok - tok.mean(1, keepdim=True), pos - pos.mean(1, keepdim=True)]  # mean-free residual
        self.tables = tables
        x = F.embedding(ids, tables[0].float())
        if self.opt:
            x = x + tables[1].float()[torch.arange(ids.shape[1]) + 2]  # OPT positions are offset by 2
        return x

    # ---- one transformer block ----------------------------------------------------------------------
    def _layer_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights (float64, fused) by role; o/down outputs still in the original d basis."""
        layer = self.src.layers[i]
        at = layer.self_attn
        if self.opt:
            n1, n2 = layer.self_attn_layer_norm, layer.final_layer_norm
            mods = {"q": at.q_proj, "k": at.k_proj, "v": at.v_proj, "o": at.out_proj, "up": layer.fc1,
                    "down": layer.fc2}
        else:
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            mods = {"q": at.q_proj, "k": at.k_proj, "v": at.v_proj, "o": at.o_proj, "gate": layer.mlp.gate_proj,
                    "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}
        w = {r: m.weight.double() for r, m in mods.items()}
        w.update({r + "_bias": m.bias.double() for r, m in mods.items() if getattr(m, "bias", None) is not None})
        for roles, norm in ((("q", "k", "v"), n1), (("gate", "up"), n2)):
            for r in roles:
                if r in w:
                    self._fuse_norm(w, r, norm)
        if self.opt:  # keep the residual stream mean-free so that LayerNorm == RMS norm
            for r in ("o", "down"):
                w[r] = w[r] - w[r].mean(0, keepdim=True)
                if r + "_bias" in w:
                    w[r + "_bias"] = w[r + "_bias"] - w[r + "_bias"].mean()
        return w

    def _fuse_norm(self, w: dict[str, torch.Tensor], role: str, norm) -> None:
        """W <- W diag(gamma), b <- b + W beta (beta only for LayerNorm)."""
        beta = getattr(norm, "bias", None)
        if beta is not None:
            shift = w[role] @ beta.double()
            w[role + "_bias"] = w[role + "_bias"] + shift if role + "_bias" in w else shift
        w[role] = w[role] * norm.weight.double()

    def _attention(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attention of RMSN(x) for x [B, T, k_a], with float32 copies of the (sliced) weights in w."""
        return attention(_rms_norm(x, self.desc.hidden_size), w.get, self.desc, self.rope)

    def _mlp(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return mlp(_rms_norm(x, self.desc.hidden_size), w.get, self.desc)

    def _slice_layer(self, i: int, x: torch.Tensor, Qa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate and slice layer i whose input x [N, T, k_a] is in basis Qa[:, :k_a]; returns (the sliced output
        [N, T, k_c], Q_c)."""
        d = self.desc
        ka, kb, kc = d.attn_input_dims[i], d.attn_output_dims[i], d.mlp_output_dims[i]
        names = d.layer_names(i)
        w = self._layer_weights(i)
        for r in ("q", "k", "v"):
            w[r] = (w[r] @ Qa)[:, :ka]
        f32 = {r: t.float() for r, t in w.items()}
        Qa_t = Qa[:, :ka].T.float()

        # residual between attention and MLP, in the original basis (o not rotated yet)
        h1 = torch.cat([xb @ Qa_t + self._attention(xb, f32) for xb in x.split(_BATCH)])
        Qb = pca_basis(h1)
        h1 = h1 @ Qb[:, :kb].float()  # = the sliced model's h1 once o is rotated and cut
        w["o"] = (Qb.T @ w["o"])[:kb]
        if "o_bias" in w:
            w["o_bias"] = (Qb.T @ w["o_bias"])[:kb]
        for r in ("gate", "up"):
            if r in w:
                w[r] = (w[r] @ Qb)[:, :kb]
                f32[r] = w[r].float()
        Qb_t = Qb[:, :kb].T.float()

        # layer output in the original basis (down not rotated yet)
        h2 = torch.cat([hb @ Qb_t + self._mlp(hb, f32) for hb in h1.split(_BATCH)])
        del h1
        Qc = pca_basis(h2)
        x_next = h2 @ Qc[:, :kc].float()
        del h2
        w["down"] = (Qc.T @ w["down"])[:kc]
        if "down_bias" in w:
            w["down_bias"] = (Qc.T @ w["down_bias"])[:kc]
        w["attn_sc"] = Qa[:, :ka].T @ Qb[:, :kb]
        w["mlp_sc"] = Qb[:, :kb].T @ Qc[:, :kc]
        for r, t in w.items():
            self._emit(names[r], t)
        return x_next, Qc

    # ---- the whole model ----------------------------------------------------------------------------
    def run(self, ids: torch.Tensor, progress: bool) -> dict[str, torch.Tensor]:
        d = self.desc
        self.rope = None if self.opt else rope_tables(d, ids.shape[1], torch.float32)
        x = self._embeddings(ids)
        Q = pca_basis(x)
        k0 = d.embedding_dims[0]
        for name, table in zip(d.embed_names(), self.tables):
            self._emit(name, (table @ Q)[:, :k0])
        del self.tables
        x = x @ Q[:, :k0].float()
        for i in tqdm(range(d.num_layers), desc="slicing", unit="layer", disable=not progress):
            x, Q = self._slice_layer(i, x, Q)

        final = self.src.final_layer_norm if self.opt else self.src.norm
        W = self.head.weight.double()  # a copy: the head is untied from the embeddings
        if self.opt:
            self._emit("lm_head.bias", W @ final.bias.double())
        self._emit("lm_head.weight", ((W * final.weight.double()) @ Q)[:, :d.mlp_output_dims[-1]])
        wrong = set(t.name for t in d.tensors()) ^ set(self.out)
        if wrong:
            raise ModelError(f"slicer produced the wrong tensor set: {sorted(wrong)[:3]}")
        return {t.name: self.out[t.name] for t in d.tensors()}

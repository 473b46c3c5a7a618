"""The model layer: sliced forward, synthetic models, rotational invariance, HF consistency, SliceGPT I/O."""

import pytest
import torch

from bbformat.errors import ModelError
from bbformat.models.arch import apply_rotation
from bbformat.models.sliced import SlicedLM
from bbformat.models.synthetic import example_desc, random_orthogonal, random_slicegpt, tiny_desc

FAMILIES = ("llama", "opt")


def _ids(desc, B=2, T=12, seed=0):
    return torch.randint(0, desc.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_opt125m_parameter_count():
    desc = example_desc("opt-125m", 0.2)
    assert desc.attn_input_dims[0] == 608 and desc.mlp_output_dims[-1] == 768
    assert desc.num_params() == 147_250_880


def test_example_widths_follow_slicegpt():
    desc = example_desc("smollm2-135m", 0.25)
    assert len(desc.tensors()) == 272
    assert set(desc.attn_input_dims) == {432} and desc.mlp_output_dims[-1] == 576
    assert example_desc("opt-1.3b", 0.3, num_layers=2).num_layers == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shape_and_widths_differ(family):
    desc = tiny_desc(family)
    assert len({desc.attn_input_dims[0], desc.attn_output_dims[0], desc.mlp_output_dims[0]}) == 3
    w = random_slicegpt(desc, seed=1)
    model = SlicedLM(desc, w)
    assert model.num_parameters() == desc.num_params()
    assert set(model.state_dict()) == {t.name for t in desc.tensors()}  # SliceGPT names
    logits = model(_ids(desc))
    assert logits.shape == (2, 12, desc.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_load_matches(family):
    desc = tiny_desc(family)
    w = random_slicegpt(desc, seed=2, dtype=torch.float16)
    full = SlicedLM(desc, w)
    inc = SlicedLM.empty(desc)
    for g in desc.groups():
        assert inc.missing()
        inc.load_group({t.name: w[t.name] for t in desc.group_tensors(g)})
    assert inc.missing() == []
    ids = _ids(desc)
    assert torch.equal(full(ids), inc(ids))


def test_forward_is_causal():
    desc = tiny_desc("llama")
    model = SlicedLM(desc, random_slicegpt(desc, seed=3))
    ids = _ids(desc, B=1, T=10)
    ids2 = ids.clone()
    ids2[0, 7] = (ids2[0, 7] + 1) % desc.vocab_size
    a, b = model(ids), model(ids2)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_bad_tensor_raises():
    desc = tiny_desc("opt")
    w = random_slicegpt(desc, seed=0)
    name = desc.layer_names(1)["down"]
    w[name] = w[name][:-1]
    with pytest.raises(ModelError, match="layers.1.fc2.weight"):
        SlicedLM(desc, w)
    del w[name]
    with pytest.raises(ModelError, match="missing"):
        SlicedLM(desc, w)


# ---- invariance: the symmetries arch.py declares really are symmetries of this forward ------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_symmetry_leaves_logits_unchanged(family):
    desc = tiny_desc(family)
    w = random_slicegpt(desc, seed=4, dtype=torch.float64)
    ids = _ids(desc)
    ref = SlicedLM(desc, w, dtype=torch.float64)(ids)
    gen = torch.Generator().manual_seed(5)
    syms = desc.symmetries()
    assert len(syms) == 2 * desc.num_layers + 1
    for sym in syms:
        R = random_orthogonal(sym.size, gen)
        rotated = dict(w)
        apply_rotation(rotated, sym, R)
        out = SlicedLM(desc, rotated, dtype=torch.float64)(ids)
        err = (out - ref).abs().max() / ref.abs().max()
        assert err < 1e-9, (sym.name, err.item())
        # negative control: rotating only one of the tensors it acts on must change the logits
        for a in sym.actions:
            broken = dict(w)
            apply_rotation(broken, sym, R, only={a.tensor})
            out = SlicedLM(desc, broken, dtype=torch.float64)(ids)
            assert (out - ref).abs().max() / ref.abs().max() > 1e-4, (sym.name, a.tensor)


# ---- consistency with Hugging Face: norm fusion + our forward == the original model ----------------------
def _hf_model(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                  max_position_embeddings=64, attn_implementation="eager")
    if family.startswith("llama"):
        rope = {"rope_type": "default", "rope_theta": 5000.0}
        if family == "llama-rope3":  # Llama 3.1's frequency scaling, with a context short enough to matter
            rope.update(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16)
        cfg = transformers.LlamaConfig(intermediate_size=96, num_key_value_heads=2, rope_parameters=rope,
                                       rms_norm_eps=1e-5, tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.OPTConfig(ffn_dim=96, word_embed_proj_dim=64, tie_word_embeddings=True, **common)
        model = transformers.OPTForCausalLM(cfg)
    model = model.to(torch.float64).eval()
    with torch.no_grad():  # norms start at gamma=1, beta=0: randomise them so that fusion is really tested
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.add_(0.2 * torch.randn_like(prm))
    return model


@pytest.mark.parametrize("family", FAMILIES + ("llama-rope3",))
def test_fused_forward_matches_hugging_face(family):
    from bbformat.models.fusion import fuse_norms

    hf = _hf_model(family)
    desc, w = fuse_norms(hf.state_dict(), hf.config)
    assert set(w) == {t.name for t in desc.tensors()}
    ids = _ids(desc, T=20)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = SlicedLM(desc, w, dtype=torch.float64)(ids)
    # not 1e-12: HF computes softmax, RMSNorm and RoPE frequencies in float32 even for a float64 model
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-6
    # in float32 (the default compute dtype) from fp32 weights
    ours32 = SlicedLM(desc, {k: v.float() for k, v in w.items()})(ids)
    assert (ours32.double() - ref).abs().max() / ref.abs().max() < 1e-4


# ---- SliceGPT checkpoint import / export --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_slicegpt_round_trip(tmp_path, family, ext):
    from bbformat.models.slicegpt_io import load_slicegpt, save_slicegpt

    desc = tiny_desc(family)
    w = random_slicegpt(desc, seed=6, dtype=torch.float16)
    pt, js = save_slicegpt(desc, w, tmp_path / f"tiny_0.2{ext}")
    assert js == tmp_path / "tiny_0.2.json"
    if ext == ".pt":  # plain SliceGPT layout: a flat dict loadable without unpickling code
        sd = torch.load(pt, weights_only=True)
        assert list(sd) == [t.name for t in desc.tensors()]
    desc2, w2 = load_slicegpt(pt)
    assert desc2 == desc
    assert list(w2) == list(w) and all(torch.equal(w[k], w2[k]) and w2[k].dtype == torch.float16 for k in w)


def _slicegpt_like_file(tmp_path, desc, w):
    """A file the way SliceGPT writes it: sliced tensors are views of larger storages, no description key."""
    import json

    views = {}
    for k, v in w.items():
        big = torch.zeros(v.shape[0] + 3, *v.shape[1:], dtype=v.dtype)  # discarded rows stay in the storage
        big[1:1 + v.shape[0]] = v
        views[k] = big[1:1 + v.shape[0]]
    views["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(views, tmp_path / "m_0.25.pt")
    (tmp_path / "m_0.25.json").write_text(json.dumps(desc.slicing_config()))
    return tmp_path / "m_0.25.pt"


def test_import_slicegpt_views_and_config(tmp_path):
    from bbformat.models.slicegpt_io import load_slicegpt

    desc = example_desc("smollm2-135m", 0.25, num_layers=2)
    w = {t.name: torch.randn(t.shape).half() for t in desc.tensors()}
    path = _slicegpt_like_file(tmp_path, desc, w)
    desc2, w2 = load_slicegpt(path)  # heads and rope_theta from the table of known models
    assert desc2.num_heads == 9 and desc2.num_kv_heads == 3 and desc2.rope_theta == 100000.0
    assert desc2.tensors() == desc.tensors()
    for k, v in w2.items():
        assert torch.equal(v, w[k])
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()  # compact copy, not the view
    # an HF config overrides the table
    cfg = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 2, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 5e5}
    assert load_slicegpt(path, config=cfg)[0].rope_theta == 5e5


def test_import_rejects_wrong_shape_naming_the_tensor(tmp_path):
    from bbformat.models.slicegpt_io import load_slicegpt, save_slicegpt

    desc = tiny_desc("opt")
    w = random_slicegpt(desc, seed=7)
    name = desc.layer_names(2)["attn_sc"]
    with pytest.raises(ModelError, match="layers.2.attn_shortcut_Q"):
        save_slicegpt(desc, {**w, name: w[name][:, :-8]}, tmp_path / "bad.pt")
    pt, _ = save_slicegpt(desc, w, tmp_path / "good.pt")
    sd = torch.load(pt, weights_only=True)
    sd[name] = sd[name][:, :-8].clone()
    torch.save(sd, pt)
    with pytest.raises(ModelError, match="layers.2.attn_shortcut_Q"):
        load_slicegpt(pt)
    with pytest.raises(ModelError, match="slicing config"):
        load_slicegpt(pt, json_path=tmp_path / "absent.json")


def test_import_unknown_model_needs_config(tmp_path):
    from bbformat.models.slicegpt_io import load_slicegpt

    desc = tiny_desc("llama")  # 4 heads of 16, 2 KV heads: not in the table, and no head_dim 64 fits
    path = _slicegpt_like_file(tmp_path, desc, random_slicegpt(desc, seed=8))
    with pytest.raises(ModelError, match="config"):
        load_slicegpt(path)
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300, "max_position_embeddings": 64}
    desc2, _ = load_slicegpt(path, config=cfg)
    assert desc2 == desc


class _ListCache:
    """The cache contract the forward relies on (transformers' Cache.update / get_seq_length), in ten lines."""

    def __init__(self):
        self.kv = {}

    def update(self, k, v, layer_idx):
        if layer_idx in self.kv:
            k0, v0 = self.kv[layer_idx]
            k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def get_seq_length(self):
        return self.kv[0][0].shape[2] if self.kv else 0


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_in_pieces_equals_one_forward(family):
    """Tokens fed in pieces through a cache (one token, then several: the causal mask over cached keys, then one)
    give the logits of one full forward."""
    from bbformat.models.sliced import forward_hidden, logits_of

    desc = tiny_desc(family)
    model = SlicedLM(desc, random_slicegpt(desc, seed=9), dtype=torch.float64)
    ids = _ids(desc, B=2, T=11)
    full = model(ids)
    cache, parts = _ListCache(), []
    for a, b in ((0, 1), (1, 6), (6, 7), (7, 11)):
        parts.append(logits_of(model, forward_hidden(model, ids[:, a:b], cache=cache)))
    got = torch.cat(parts, 1)
    assert cache.get_seq_length() == 11
    assert (got - full).abs().max() < 1e-12 * full.abs().max()


# ---- further symmetries (not removed by any codec): each really leaves the logits unchanged ------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_further_symmetries_leave_logits_unchanged(family):
    from bbformat.models import further_symmetries as fs

    desc = tiny_desc(family)
    w = random_slicegpt(desc, seed=6, dtype=torch.float64)
    ids = _ids(desc)
    model = lambda t: SlicedLM(desc, t, dtype=torch.float64)(ids)  # noqa: E731
    ref = model(w)
    gen = torch.Generator().manual_seed(7)
    hd, F = desc.head_dim, desc.intermediate_size
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    invertible = lambda: rand(hd, hd) + 3 * torch.eye(hd, dtype=torch.float64)  # noqa: E731 (well conditioned)
    qk = fs.rope_commuting(desc, gen) if family == "llama" else invertible()
    scale = rand(F).abs() + 0.5
    if family == "llama":  # SwiGLU takes any s != 0, ReLU only s > 0
        scale = scale * torch.sign(rand(F))
    moves = {"vo": lambda t: fs.apply_vo(t, desc, 1, desc.num_kv_heads - 1, invertible()),
             "qk": lambda t: fs.apply_qk(t, desc, 0, 0, qk),
             "mlp": lambda t: fs.apply_mlp_scale(t, desc, 2, scale)}
    for name, move in moves.items():
        moved = dict(w)
        move(moved)
        assert any(not torch.equal(moved[k], w[k]) for k in w), name
        err = (model(moved) - ref).abs().max() / ref.abs().max()
        assert err < 1e-9, (name, err.item())
    # negative controls, which must change the logits: V moved without O; with RoPE, a matrix that does not
    # commute with the position rotations; through ReLU, negative scales
    n = desc.layer_names(1)
    broken = dict(w)
    fs.apply_vo(broken, desc, 1, 0, invertible())
    broken[n["o"]] = w[n["o"]]
    assert (model(broken) - ref).abs().max() / ref.abs().max() > 1e-4
    if family == "llama":
        broken = dict(w)
        fs.apply_qk(broken, desc, 0, 0, invertible())
        assert (model(broken) - ref).abs().max() / ref.abs().max() > 1e-4
    else:
        broken = dict(w)
        fs.apply_mlp_scale(broken, desc, 2, -scale)
        assert (model(broken) - ref).abs().max() / ref.abs().max() > 1e-4


def test_further_symmetry_budget_on_smollm2_and_opt_shapes():
    from bbformat.models import further_symmetries as fs

    smol = {b.name: b for b in fs.budget(example_desc("smollm2-135m", 0.25))}
    assert smol["vo"].words_orthogonal == 30 * 3 * 64 * 63 // 2 and smol["vo"].words_full == 30 * 3 * 64 * 64
    assert smol["qk"].words_full == 30 * 3 * 64 and smol["mlp"].words_full == 30 * 1536
    assert 30 * 14_000 < smol["perm"].bits < 30 * 14_100  # log2(1536!) = 14,043 bits per layer, + heads
    opt = {b.name: b for b in fs.budget(example_desc("opt-125m", 0.25))}
    assert opt["qk"].words_full == 12 * 12 * 64 * 64 and opt["mlp"].words_full == 12 * 3072

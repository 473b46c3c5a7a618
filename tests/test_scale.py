"""Encoding at scale, on tiny models: lazy checkpoint readers, slab-wise rotation, parallel entropy workers.

The same code paths run on 7B/70B shapes in tools/bench_scale.py; here only that they give the same bytes."""

import numpy as np
import pytest
import torch

from bbformat.cli.main import main as bbf
from bbformat.codecs import canonical, get_codec
from bbformat.container.layout import FOOTER, Footer
from bbformat.container.reader import BBFReader
from bbformat.container.writer import save
from bbformat.errors import BBFError, ModelError
from bbformat.models.slicegpt_io import INDEX_SUFFIX, load_slicegpt, open_slicegpt, save_sharded, save_slicegpt
from bbformat.models.synthetic import iter_random_slicegpt, random_slicegpt, tiny_desc
from bbformat.words import to_words


def _desc(family="llama"):
    return tiny_desc(family, num_layers=3, hidden_size=64, widths=(48, 40, 56))


def _checkpoint(tmp_path, kind, desc, tensors):
    if kind == "sharded":
        groups = ((g, {t.name: tensors[t.name] for t in desc.group_tensors(g)}) for g in desc.groups())
        return save_sharded(desc, groups, tmp_path / f"m{INDEX_SUFFIX}")
    return save_slicegpt(desc, tensors, tmp_path / f"m.{kind}")[0]


@pytest.mark.parametrize("kind", ["pt", "safetensors", "sharded"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lazy_checkpoint_gives_the_eager_file(tmp_path, kind, family):
    desc = _desc(family)
    tensors = random_slicegpt(desc, seed=1, dtype=torch.float16)
    ck = _checkpoint(tmp_path, kind, desc, tensors)
    d_lazy, lazy = open_slicegpt(ck)
    assert d_lazy == desc
    assert all(t.device.type == "meta" for t in lazy.meta().values())  # nothing read yet
    d_eager, eager = load_slicegpt(ck)
    assert all(torch.equal(eager[n], tensors[n]) for n in tensors)
    save(eager, str(tmp_path / "eager.bbf"), model=d_eager, codec="exact")
    save(lazy, str(tmp_path / "lazy.bbf"), model=d_lazy, codec="exact")
    assert (tmp_path / "lazy.bbf").read_bytes() == (tmp_path / "eager.bbf").read_bytes()


def test_sharded_checkpoint_refuses_a_shard_outside_its_directory(tmp_path):
    desc = _desc()
    ck = _checkpoint(tmp_path, "sharded", desc, random_slicegpt(desc, seed=2, dtype=torch.float16))
    text = ck.read_text()
    ck.write_text(text.replace('"m-00001', '"../m-00001', 1))
    with pytest.raises(ModelError, match="not a file beside the index"):
        open_slicegpt(ck)


def test_iter_random_slicegpt_is_random_slicegpt_by_group():
    desc = _desc("opt")
    whole = random_slicegpt(desc, seed=4, dtype=torch.bfloat16)
    for group, tensors in iter_random_slicegpt(desc, seed=4, dtype=torch.bfloat16):
        assert list(tensors) == [t.name for t in desc.group_tensors(group)]
        assert all(torch.equal(tensors[n], whole[n]) for n in tensors)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_slab_wise_rotation_gives_the_whole_tensor_words(monkeypatch, dtype):
    """Slabs of a few rows/columns (every tensor cut) against the whole-group float64 form of `process`."""
    desc = _desc("opt")
    tensors = random_slicegpt(desc, seed=5, dtype=torch.float32)
    whole = {}
    enc = get_codec("exact").encoder(desc, dtype)
    for g in desc.groups():
        whole[g] = enc.encode(g, {t.name: tensors[t.name] for t in desc.group_tensors(g)})
    monkeypatch.setattr(canonical, "SLAB_ELEMENTS", 100)
    enc = get_codec("exact").encoder(desc, dtype)
    for g in desc.groups():
        e = enc.encode(g, {t.name: tensors[t.name] for t in desc.group_tensors(g)})
        assert e.sections[0].payload == whole[g].sections[0].payload, g
        assert all(np.array_equal(e.canonical[n], whole[g].canonical[n]) for n in e.canonical)


def test_rotator_process_is_the_plan_materialized():
    """`process` (bitsback's path) and the plan's slabs round to the same words."""
    desc = _desc()
    tensors = random_slicegpt(desc, seed=6, dtype=torch.float16)
    enc_a, enc_b = get_codec("exact").encoder(desc, "float16"), get_codec("exact").encoder(desc, "float16")
    for g in desc.groups():
        part = {t.name: tensors[t.name] for t in desc.group_tensors(g)}
        full = enc_a.rotator.process(g, part)
        plan = enc_b.rotator.plan(g, part)
        for n in part:
            w = np.concatenate([to_words(s, "float16").reshape(-1) for _, _, s in plan.chunks(n)])
            assert np.array_equal(w, to_words(full[n], "float16").reshape(-1)), n


def _sections_and_index(path):
    """A file without its header (bitsback's header stats hold encode timings, which differ run to run)."""
    data = path.read_bytes()
    foot = Footer.parse(data[-FOOTER.size:], len(data))
    return data[:foot.header_offset] + data[foot.index_offset:-FOOTER.size]


@pytest.mark.parametrize("codec", ["exact", "bitsback", "raw"])
def test_parallel_entropy_workers_write_the_same_bytes(tmp_path, codec):
    """The entropy stage is a pure function of each section: N workers write a 1-worker file's bytes."""
    desc = _desc()
    tensors = random_slicegpt(desc, seed=7, dtype=torch.float16)
    aux = {"note": b"x" * 100}
    save(tensors, str(tmp_path / "w1.bbf"), model=desc, codec=codec, aux=aux)
    save(tensors, str(tmp_path / "w2.bbf"), model=desc, codec=codec, aux=aux, workers=2)
    if codec == "bitsback":
        assert _sections_and_index(tmp_path / "w2.bbf") == _sections_and_index(tmp_path / "w1.bbf")
    else:
        assert (tmp_path / "w2.bbf").read_bytes() == (tmp_path / "w1.bbf").read_bytes()
    with BBFReader(str(tmp_path / "w2.bbf")) as f, BBFReader(str(tmp_path / "w1.bbf")) as g:
        a, b = f.load_all(), g.load_all()
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_workers_must_be_positive(tmp_path):
    desc = _desc()
    with pytest.raises(BBFError, match="workers"):
        save(random_slicegpt(desc, seed=8), str(tmp_path / "x.bbf"), model=desc, workers=0)
    assert not (tmp_path / "x.bbf").exists()


def test_cli_encodes_a_sharded_directory_with_workers(tmp_path):
    desc = _desc()
    tensors = random_slicegpt(desc, seed=9, dtype=torch.float16)
    (tmp_path / "ck").mkdir()
    _checkpoint(tmp_path / "ck", "sharded", desc, tensors)
    assert bbf(["encode", str(tmp_path / "ck"), "-o", str(tmp_path / "a.bbf"), "--workers", "2", "-q"]) == 0
    assert bbf(["encode", str(tmp_path / "ck" / f"m{INDEX_SUFFIX}"), "-o", str(tmp_path / "b.bbf"), "-q"]) == 0
    with BBFReader(str(tmp_path / "a.bbf")) as f, BBFReader(str(tmp_path / "b.bbf")) as g:
        a, b = f.load_all(), g.load_all()
        assert all(torch.equal(a[n], b[n]) for n in a)

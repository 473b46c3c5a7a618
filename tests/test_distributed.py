"""Ranks of a real torch.distributed job (torchrun, gloo, CPU) load only their pipeline stage over HTTP.

One torchrun launch of 4 ranks (tests/_dist_worker.py) over an 8-block model in two codecs, exact and bitsback,
served from a loopback server: the ranks' tensors together are the whole model, each rank fetches no more than its
groups' stored bytes and the suffix read that opens the file (the server's log agrees), and the logits of the
forward pipelined across the ranks equal those of the whole model in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import bbformat
from bbformat.container.layout import SUFFIX_GUESS
from bbformat.models.synthetic import random_slicegpt, tiny_desc
from bbformat.serve import start_server

WORLD = 4
CODECS = ("exact", "bitsback")
WORKER = Path(__file__).with_name("_dist_worker.py")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(served dir, the server's log, the results dir): the model saved in each codec, served over HTTP, and read by
    one torchrun launch of WORLD ranks. The file is ~2 MB, so most groups lie outside the 256 KiB suffix."""
    desc = tiny_desc("llama", num_layers=8, hidden_size=128, vocab_size=2000, widths=(96, 80, 112, 88))
    tensors = random_slicegpt(desc, seed=5, dtype=torch.float16)
    d, out = tmp_path_factory.mktemp("dist-served"), tmp_path_factory.mktemp("dist-out")
    for codec in CODECS:
        bbformat.save(tensors, str(d / f"{codec}.bbf"), model=desc, codec=codec)
    ids = torch.randint(0, desc.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    server, url = start_server(d)
    try:
        spec = out / "spec.json"
        spec.write_text(json.dumps({"files": {c: f"{url}/{c}.bbf" for c in CODECS}, "ids": ids.tolist(),
                                    "out": str(out)}))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(bbformat.__file__).parents[1]))
        cmd = [*torchrun(), "--standalone", "--nnodes", "1", "--nproc-per-node", str(WORLD), str(WORKER), str(spec)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        yield d, server.log, out, ids
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(out, ignore_errors=True)


def reports(out: Path, codec: str) -> list[dict]:
    return [json.loads((out / f"{codec}.rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("codec", CODECS)
def test_union_of_ranks_is_the_whole_model(run, codec):
    d, _, out, _ = run
    whole = {n: tensor_hash(t.to(torch.float32)) for n, t in bbformat.load(str(d / f"{codec}.bbf")).items()}
    ranks = reports(out, codec)
    assert sum(len(r["tensors"]) for r in ranks) == len(whole)  # no tensor is held twice
    assert {n: h for r in ranks for n, h in r["tensors"].items()} == whole
    assert [len(r["groups"]) for r in ranks] == [3, 2, 2, 3]  # embed + 2 blocks, 2 blocks, 2 blocks, 2 blocks + head
    assert ranks[0]["groups"][0] == "embed" and ranks[-1]["groups"][-1] == "head"


@pytest.mark.parametrize("codec", CODECS)
def test_each_rank_fetches_only_its_groups(run, codec):
    d, log, out, _ = run
    with bbformat.open(str(d / f"{codec}.bbf")) as f:
        size = f.store.size
        assert bbformat.stage_bytes(f, WORLD) == [r["groups_stored"] for r in reports(out, codec)]
    assert size > 2 * SUFFIX_GUESS  # the suffix read at open does not hold the whole file: the bound is not trivial
    ranks = reports(out, codec)
    for r in ranks:
        assert r["fetched"] <= r["groups_stored"] + SUFFIX_GUESS
    # the server saw what the ranks counted: every request they made, and no byte more
    requests = sum(r["requests"] for r in ranks)
    # the ranks have exited, but the server logs a response just after its last byte
    assert log.wait(sum(r["requests"] for c in CODECS for r in reports(out, c)))
    served = log.entries(f"/{codec}.bbf", "GET")
    assert len(served) == requests
    assert sum(s.sent for s in served) == sum(r["fetched"] for r in ranks)


@pytest.mark.parametrize("codec", CODECS)
def test_pipelined_logits_equal_the_single_process_logits(run, codec):
    d, _, out, ids = run
    whole = bbformat.load_model(str(d / f"{codec}.bbf"))
    with torch.no_grad():
        want = whole(ids)
    got = torch.load(out / f"{codec}.logits.pt")
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()


# ---- the stage API in one process ------------------------------------------------------------------------------
def test_pipeline_stage_splits_blocks_contiguously_and_balanced():
    stages = [bbformat.pipeline_stage(r, 4, 10) for r in range(4)]
    assert [(s.layers.start, s.layers.stop) for s in stages] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [s.first for s in stages] == [True, False, False, False]
    assert [s.last for s in stages] == [False, False, False, True]
    assert stages[0].groups() == ["embed", "layer.0", "layer.1", "layer.2"]
    assert stages[3].groups() == ["layer.8", "layer.9", "head"]
    assert bbformat.pipeline_stage(0, 1, 3).groups() == ["embed", "layer.0", "layer.1", "layer.2", "head"]


@pytest.mark.parametrize("bad, match", [
    (lambda: bbformat.pipeline_stage(4, 4, 8), "rank 4 is outside 0..3"),
    (lambda: bbformat.pipeline_stage(0, 9, 8), "9 stages cannot split 8 blocks"),
    (lambda: bbformat.Stage(range(3, 3), 8), "not a non-empty range"),
    (lambda: bbformat.Stage(range(6, 9), 8), "not a non-empty range"),
    (lambda: bbformat.Stage(range(0, 4, 2), 8), "contiguous"),
])
def test_bad_stage_assignments_are_refused(bad, match):
    with pytest.raises(bbformat.StageError, match=match):
        bad()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_stages_chained_in_one_process_give_the_whole_model(tmp_path, family):
    """Uneven explicit stages (OPT: learned positions on the first stage only); a Stage for another depth is refused."""
    desc = tiny_desc(family, num_layers=5)
    path = str(tmp_path / "m.bbf")
    bbformat.save(random_slicegpt(desc, seed=2), path, model=desc, codec="raw")
    ids = torch.randint(0, desc.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    x = ids
    with torch.no_grad():
        want = bbformat.load_model(path)(ids)
        for layers in (range(0, 1), range(1, 4), range(4, 5)):
            part = bbformat.load_model(path, stage=bbformat.Stage(layers, 5))
            assert part.input_width == (None if layers.start == 0 else x.shape[-1])
            x = part(x)
            assert x.shape[-1] == part.output_width
    assert torch.equal(x, want)
    with pytest.raises(bbformat.ModelError, match="blocks 4..4 take hidden states of width"):
        part(torch.zeros(1, 3, part.input_width + 1))
    with pytest.raises(bbformat.StageError, match="model of 4 blocks, this one has 5"):
        bbformat.load_model(path, stage=bbformat.Stage(range(0, 2), 4))


def test_inspect_prints_each_stage_and_its_bytes(tmp_path, capsys):
    from bbformat.cli import inspect

    desc = tiny_desc("llama", num_layers=5)
    path = str(tmp_path / "m.bbf")
    bbformat.save(random_slicegpt(desc, seed=2), path, model=desc, codec="exact")
    assert inspect.main([path, "--no-check", "--stages", "2", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [(s["rank"], s["layers"], s["groups"]) for s in stages] == [
        (0, [0, 3], ["embed", "layer.0", "layer.1", "layer.2"]), (1, [3, 5], ["layer.3", "layer.4", "head"])]
    assert [s["stored_bytes"] for s in stages] == bbformat.stage_bytes(path, 2)
    assert inspect.main([path, "--no-check", "--stages", "2"]) == 0
    assert "rank   1: blocks 3..4 + head: " in capsys.readouterr().out
    assert inspect.main([path, "--no-check", "--stages", "6"]) == 2
    assert "6 stages cannot split 5 blocks" in capsys.readouterr().err

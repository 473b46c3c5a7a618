"""One rank of tests/test_distributed.py, started by torchrun: `_dist_worker.py SPEC.json`.

For each file in the spec the rank loads only its pipeline stage over HTTP, reports what it holds and what it
fetched (OUT/<name>.rank<r>.json), and runs its part of a pipelined forward: it receives the hidden state from
rank r-1, runs its blocks, and sends the result on; the last rank writes the logits (OUT/<name>.logits.pt).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import bbformat


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def run_file(name: str, url: str, ids: torch.Tensor, out: Path, rank: int, world: int) -> None:
    with bbformat.open(url) as f:
        part = bbformat.load_model(f, stage=(rank, world))
        groups = part.stage.groups()
        report = {"groups": groups, "fetched": f.stats["bytes"], "requests": f.stats["requests"],
                  "groups_stored": sum(f.group_stored_bytes(g) for g in groups),
                  "tensors": {n: tensor_hash(t) for n, t in part.sliced_state_dict().items()}}
    with torch.no_grad():
        if part.stage.first:
            x = ids
        else:
            x = torch.empty(*ids.shape, part.input_width, dtype=part.dtype)
            dist.recv(x, src=rank - 1)
        y = part(x)
        if part.stage.last:
            torch.save(y, out / f"{name}.logits.pt")
        else:
            dist.send(y.contiguous(), dst=rank + 1)
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.tensor(spec["ids"])
    try:
        for name, url in spec["files"].items():
            run_file(name, url, ids, Path(spec["out"]), rank, world)
        dist.barrier()  # every send has been received before any rank leaves
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

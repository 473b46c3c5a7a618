"""Encode and decode at real sizes: Llama-2-7B / Llama-3-70B-shaped synthetic SliceGPT models (issue 14).

    python tools/bench_scale.py --shape llama2-7b --blocks 2          # quick: 2 blocks (~1.3 GB), a few minutes
    python tools/bench_scale.py --shape llama2-7b --blocks 32         # the whole 7B (~10 GB input, ~35 min)
    python tools/bench_scale.py --shape llama3-70b --blocks 1 --phases encode,stream_disk,load
    python tools/bench_scale.py --shape llama3.2-3b --blocks 2 --phases encode,stream_disk,load   # a tied head

The synthetic model (`bbformat.models.synthetic.iter_random_slicegpt`, float16, 25 % sliced) is written once, as a
sharded safetensors checkpoint (one shard per group), to cache/scale/<shape>-L<blocks>/ and reused. Every phase
runs in a fresh subprocess, so its peak RSS (VmHWM; entropy workers: RUSAGE_CHILDREN) is its own; the budgets
are checked against the peak above the process's RSS at the phase's start, with torch and bbformat imported
(~220 MB: the issue's own figures, "+589 MB", are increases too). Phases:

  gemm         torch float64 GEMM (4096 x 3072 @ 3072 x 3072) in the same run: the load-dependent baseline the
               encode figures are judged against (the exact codec's rotations are float64 GEMMs)
  encode       `bbf encode`'s path: open_slicegpt (lazy, group by group) + save(codec exact, workers=N), for
               every N of --workers; time, fp16 MB/s, per-block time, peak RSS against the issue's budget
  bitsback     bitsback's encoder on the embeddings and one block (time of the block alone)
  stream_disk  BBFReader.stream() of the exact file from disk; peak RSS against (readahead + 1) x largest group
  stream_http  the same from a loopback HTTP server (python -m bbformat.serve, its own process)
  load         load_all(); peak RSS against the model's decoded size
  ranks        stored bytes each of 4 pipeline ranks fetches (bbformat.stage_bytes, when present)

Prints a markdown table and (--json) writes every figure as JSON, with /proc/loadavg at each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.common import CACHE, ROOT, markdown_table, write_json  # noqa: E402

SCALE = CACHE / "scale"
PHASES = ("gemm", "encode", "bitsback", "stream_disk", "stream_http", "load", "ranks")
SPARSITY = 0.25
MB = 1e6


# ---- measuring -------------------------------------------------------------------------------------------
def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def children_peak_rss() -> int:
    """The largest peak RSS among finished child processes (the entropy workers), bytes."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- the model -------------------------------------------------------------------------------------------
def model_dir(shape: str, blocks: int) -> Path:
    return SCALE / f"{shape}-L{blocks}"


def index_path(shape: str, blocks: int) -> Path:
    return model_dir(shape, blocks) / "model.safetensors.index.json"


def scale_desc(shape: str, blocks: int):
    from bbformat.models.synthetic import example_desc

    return example_desc(shape, SPARSITY, num_layers=blocks)


def ensure_model(shape: str, blocks: int, log) -> dict:
    """Write the synthetic checkpoint once; later runs reuse it."""
    idx = index_path(shape, blocks)
    if idx.exists():
        return {"phase": "gen", "reused": True}
    import torch
    from tqdm.auto import tqdm

    from bbformat.models.slicegpt_io import save_sharded
    from bbformat.models.synthetic import iter_random_slicegpt

    desc = scale_desc(shape, blocks)
    idx.parent.mkdir(parents=True, exist_ok=True)
    log(f"generating {shape} with {blocks} blocks ({desc.num_params() * 2 / 1e9:.1f} GB of float16) in {idx.parent}")
    t0 = time.perf_counter()
    groups = tqdm(iter_random_slicegpt(desc, seed=0, dtype=torch.float16, tied=desc.tie_word_embeddings),
                  total=len(desc.groups()),
                  desc="generate", unit="group", leave=False)
    save_sharded(desc, groups, idx)
    return {"phase": "gen", "reused": False, "seconds": time.perf_counter() - t0}


# ---- phases (each in its own process) ---------------------------------------------------------------------
def group_bytes(desc) -> dict[str, int]:
    """Decoded float16 bytes per group."""
    return {g: 2 * sum(t.numel for t in desc.group_tensors(g)) for g in desc.groups()}


def phase_gemm(args) -> dict:
    import torch

    x, R = torch.randn(4096, 3072, dtype=torch.float64), torch.randn(3072, 3072, dtype=torch.float64)
    x @ R
    t0 = time.perf_counter()
    for _ in range(3):
        x @ R
    dt = (time.perf_counter() - t0) / 3
    return {"gflops_f64": 2 * 4096 * 3072 * 3072 / dt / 1e9, "threads": torch.get_num_threads()}


def bbf_path(args, codec: str, workers: int = 1) -> Path:
    return model_dir(args.shape, args.blocks) / f"{codec}-w{workers}.bbf"


def phase_encode(args) -> dict:
    from bbformat.container.writer import save
    from bbformat.models.slicegpt_io import open_slicegpt

    desc, lazy = open_slicegpt(index_path(args.shape, args.blocks))
    stamps: dict[str, float] = {}
    t0 = time.perf_counter()

    group_of = {t.name: t.group for t in desc.tensors()}

    def read(names, _read=lazy.read):  # save() reads each group once: the time between reads is the previous group's
        names = list(names)
        if len(stamps) or group_of[names[0]] == "embed":  # (not the head read ahead for a tied head, SPEC 12.6)
            stamps[len(stamps)] = time.perf_counter()
        return _read(names)

    lazy.read = read
    out = bbf_path(args, "exact", args.workers)
    save(lazy, str(out), model=desc, codec="exact", dtype="float16", progress=not args.quiet, workers=args.workers)
    total = time.perf_counter() - t0
    marks = [stamps[i] for i in range(len(stamps))] + [time.perf_counter()]
    per_group = dict(zip(desc.groups(), (b - a for a, b in zip(marks, marks[1:]))))
    block_times = [per_group[f"layer.{i}"] for i in range(desc.num_layers)]
    gb = group_bytes(desc)
    f64_block = 4 * max(gb[f"layer.{i}"] for i in range(desc.num_layers))  # float64 = 4 x float16 bytes
    in_block = max(gb.values())
    same = None
    if args.workers > 1 and bbf_path(args, "exact", 1).exists():  # then drop it: disk holds one 7B output
        import filecmp

        same = filecmp.cmp(out, bbf_path(args, "exact", 1), shallow=False)
    size = out.stat().st_size
    if same is not None:  # the 1-worker file stays for the decode phases
        out.unlink()
    return {"identical_to_1_worker": same,"seconds": total, "input_bytes": sum(gb.values()), "MB_per_s": sum(gb.values()) / total / MB,
            "block_seconds": sorted(block_times)[len(block_times) // 2], "embed_seconds": per_group["embed"],
            "head_seconds": per_group["head"], "file_bytes": size,
            "budget_bytes": in_block + 3 * f64_block + (512 << 20), "largest_group_bytes": in_block}


def phase_bitsback(args) -> dict:
    from bbformat.codecs import entropy, get_codec

    desc, lazy = _open(args)
    enc = get_codec("bitsback").encoder(desc, "float16")
    out = {}
    for g in ("embed", "layer.0"):
        tensors = lazy.read([t.name for t in desc.group_tensors(g)])
        t0 = time.perf_counter()
        e = enc.encode(g, tensors)
        t1 = time.perf_counter()
        for s in e.sections:
            if s.payload:
                entropy.compress(s.payload, s.word_size, s.segments, "float16")
        out[g] = (t1 - t0, time.perf_counter() - t1)
        del tensors, e
    gb = group_bytes(desc)["layer.0"]
    return {"block_seconds": sum(out["layer.0"]), "block_codec_seconds": out["layer.0"][0],
            "block_entropy_seconds": out["layer.0"][1], "MB_per_s": gb / sum(out["layer.0"]) / MB}


def _open(args):
    from bbformat.models.slicegpt_io import open_slicegpt

    return open_slicegpt(index_path(args.shape, args.blocks))


def _stream(url: str, readahead: int) -> dict:
    from bbformat.container.reader import BBFReader

    t0 = time.perf_counter()
    n = 0
    with BBFReader(url) as f:
        gb = group_bytes(f.model)
        for _, tensors in f.stream(readahead=readahead):
            n += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
    dt = time.perf_counter() - t0
    return {"seconds": dt, "decoded_bytes": n, "MB_per_s": n / dt / MB, "readahead": readahead,
            "largest_group_bytes": max(gb.values()),
            "budget_bytes": (readahead + 1) * max(gb.values()) + (256 << 20)}


def encoded_file(args) -> Path:
    """The exact file the decode phases read: the 1-worker one, or any other (the bytes are the same)."""
    found = sorted(model_dir(args.shape, args.blocks).glob("exact-w*.bbf"))
    if not found:
        raise SystemExit("no encoded file: run the encode phase first")
    return bbf_path(args, "exact", 1) if bbf_path(args, "exact", 1) in found else found[0]


def phase_stream_disk(args) -> dict:
    return _stream(str(encoded_file(args)), args.readahead)


def phase_stream_http(args) -> dict:
    import threading

    path = encoded_file(args)
    proc = subprocess.Popen([sys.executable, "-m", "bbformat.serve", str(path.parent), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT))
    try:
        line = proc.stdout.readline()
        if not line.startswith("serving "):
            raise RuntimeError(f"bbformat.serve printed {line!r}")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # a full pipe would stall the server
        return _stream(line.split(None, 1)[1].strip().rstrip("/") + "/" + path.name, args.readahead)
    finally:
        proc.terminate()
        proc.wait(10)


def phase_load(args) -> dict:
    from bbformat.container.reader import BBFReader

    t0 = time.perf_counter()
    with BBFReader(str(encoded_file(args))) as f:
        tensors = f.load_all()
        n = sum(t.numel() * t.element_size() for t in tensors.values())
    dt = time.perf_counter() - t0
    return {"seconds": dt, "decoded_bytes": n, "MB_per_s": n / dt / MB, "budget_bytes": n + (256 << 20)}


def phase_ranks(args) -> dict:
    """Bytes per rank: the distributed-loading helper's `bbformat.stage_bytes` (issue 14 item 4), if present."""
    import bbformat

    try:
        stage_bytes = bbformat.stage_bytes
    except AttributeError:
        return {"note": "bbformat.stage_bytes not available: per-rank bytes not measured"}
    world = min(4, args.blocks)
    per_rank = stage_bytes(str(encoded_file(args)), world)
    return {"world_size": world, "bytes_per_rank": per_rank}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_phase(args) -> dict:
    import torch  # noqa: F401  the interpreter's own memory (torch alone is ~200 MB) is measured as the start

    import bbformat.container.reader  # noqa: F401
    import bbformat.container.writer  # noqa: F401

    fn = globals()[f"phase_{args.phase}"]
    load0, start = loadavg(), current_rss()
    out = fn(args)
    out.update(phase=args.phase, peak_rss=peak_rss(), start_rss=start, children_peak_rss=children_peak_rss(),
               load_before=load0, load_after=loadavg())
    if "budget_bytes" in out:  # the bounds are on the work's memory: the peak above the process's start
        out["within_budget"] = out["peak_rss"] - start <= out["budget_bytes"]
    return out


# ---- driver ---------------------------------------------------------------------------------------------
def subprocess_phase(args, phase: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--shape", args.shape, "--blocks", str(args.blocks),
           "--readahead", str(args.readahead), "--quiet"]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if r.returncode:
        return {"phase": phase, **extra, "error": r.stderr.strip().splitlines()[-1][:300] if r.stderr else "?"}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), **extra}


def table(rows: list[dict], shape: str, blocks: int, total_blocks: int) -> str:
    out = []
    for r in rows:
        name = r["phase"] + (f" (workers {r['workers']})" if "workers" in r and r["phase"] == "encode" else "")
        row = {"phase": name, "load": r.get("load_before")}
        if "error" in r:
            row["note"] = "error: " + r["error"]
        elif r["phase"] == "gemm":
            row["note"] = f"{r['gflops_f64']:.1f} GFLOPS float64 ({r['threads']} threads)"
        elif r["phase"] == "ranks":
            row["note"] = r.get("note") or f"{r['world_size']} ranks: " + ", ".join(
                f"{b / MB:.1f} MB" for b in r["bytes_per_rank"])
        elif r["phase"] != "gen":
            row.update(seconds=r.get("seconds"), mbs=r.get("MB_per_s"), peak=r["peak_rss"] / 2**20,
                       above=(r["peak_rss"] - r["start_rss"]) / 2**20 if "start_rss" in r else None,
                       budget=r["budget_bytes"] / 2**20 if "budget_bytes" in r else None,
                       met={True: "yes", False: "NO"}.get(r.get("within_budget"), ""))
            if "block_seconds" in r:
                row["block"] = r["block_seconds"]
                if r["phase"] == "encode":
                    est = r["embed_seconds"] + r["head_seconds"] + total_blocks * r["block_seconds"]
                    row["note"] = f"{total_blocks} blocks ~ {est / 60:.0f} min; workers' peak " \
                                  f"{r['children_peak_rss'] / 2**20:.0f} MiB" + \
                                  ("" if r.get("identical_to_1_worker") is None else
                                   f"; file identical to 1 worker's: {r['identical_to_1_worker']}")
        else:
            row["note"] = "reused" if r.get("reused") else f"generated in {r['seconds']:.0f} s"
        out.append(row)
    cols = [("phase", "phase", ""), ("seconds", "s", ".1f"), ("mbs", "MB/s (fp16)", ".1f"), ("block", "s / block", ".1f"),
            ("peak", "peak RSS MiB", ".0f"), ("above", "above start MiB", ".0f"), ("budget", "budget MiB", ".0f"),
            ("met", "within", ""), ("load", "loadavg", ""),
            ("note", "note", "")]
    return f"{shape}, {blocks} of {total_blocks} blocks, float16, exact codec\n\n" + markdown_table(out, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=("llama2-7b", "llama3-70b", "llama3.2-3b"))
    ap.add_argument("--blocks", type=int, default=2, help="blocks of the model (default 2; 32 = the whole 7B)")
    ap.add_argument("--phases", default="gemm,encode,bitsback,stream_disk,stream_http,load,ranks",
                    help=f"comma-separated, from {','.join(PHASES)}")
    ap.add_argument("--workers", default="1,2", help="encode worker counts to measure (default 1,2)")
    ap.add_argument("--readahead", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # run one phase here, print its JSON
    args = ap.parse_args(argv)
    if args.phase:
        args.workers = int(args.workers.split(",")[0])
        print(json.dumps(run_phase(args)))
        return 0
    phases = [p for p in args.phases.split(",") if p]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        ap.error(f"unknown phase {bad[0]!r}")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows = [ensure_model(args.shape, args.blocks, log)]
    for p in phases:
        for w in ([int(x) for x in args.workers.split(",")] if p == "encode" else [None]):
            log(f"phase {p}" + (f" workers {w}" if w else "") + f" (load {loadavg()})")
            rows.append(subprocess_phase(args, p, **({"workers": w} if w else {})))
            log(json.dumps(rows[-1]))
    total = {"llama2-7b": 32, "llama3-70b": 80, "llama3.2-3b": 28}[args.shape]
    print(table(rows, args.shape, args.blocks, total))
    write_json(args.json, {"shape": args.shape, "blocks": args.blocks, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Size and speed on SliceGPT's own SmolLM2-135M checkpoints, against the peers, in one run (issue 13's goals).

Input: SmolLM2-135M sliced with SliceGPT's procedure in its PCA orientation (what a SliceGPT checkpoint holds), in
bfloat16, float16, and float32 made from the float16 weights (float32 words whose low 13 mantissa bits are zero,
as `bbf encode --dtype float32` of a float16 checkpoint sees them).
Rows, as % of the safetensors file of the same tensors in that dtype (the baseline, 100 %):
- peers, each skipped with a note when it is not installed (`pip install zipnn lmzip openzl`, benchmark only):
  zstd -3 of the file, ZipNN, lmzip (file -> file), OpenZL (its generic graph, one numeric input per tensor);
- `.bbf raw` and `.bbf exact` as `bbf encode` writes them: float32 words that are all float16 values are stored as
  float16 (SPEC 12.5); the `--keep-dtype` rows store the float32 words anyway;
- reference rows: the order-0 entropy of each tensor's words, and a per-line parametric bound: each row or column
  a Gaussian or a Laplace of its own scale (the better family per line, the better axis per tensor, the scales not
  counted), code length -log2(pdf(w) * ulp(w)) per word, clipped to [0, word bits]; both on the grid the words
  live on.
Columns: size, bits per weight, decode throughput (GB/s of the baseline's bytes: compressed bytes in memory ->
weights in memory; bbformat.loads gives torch tensors with every checksum verified, the peers their own decompress
call), the ratio to ZipNN's throughput (best time against best time, and the median over rounds of the ratio within
a round), encode seconds, the entropy methods the file uses.

Timing is made robust against a busy machine: every round times every format once (odd rounds in reverse order),
best of --repeat rounds after a warm-up round; torch's intra-op pool and the BLAS pools are pinned to one thread
while decoding (bbformat's decode pool already has one thread per core; ZipNN and lmzip get THREADS threads); the
load average is printed before and after each table, and the build measured (editable tree or installed wheel,
C kernels compiled or not) heads the output. `--installed` builds a wheel of this tree, installs it into a
temporary directory and runs the benchmark against it (not against the editable tree). `--busy N` keeps N
processes spinning beside the timed rounds (the figures on a loaded machine; the paired median is the one to read
there).

    .venv/bin/python tools/bench_size.py [--quick] [--sparsity 0.2 0.25 0.3] [--dtype bfloat16 float16 float32]
                                         [--repeat 5] [--busy N] [--installed] [--json out/size.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, sliced_smollm2, write_json  # noqa: E402

import bbformat  # noqa: E402
from bbformat import kernels  # noqa: E402
from bbformat.grid import MANTISSA_BITS, survey  # noqa: E402
from bbformat.words import to_words, torch_dtype, word_bits, words_to_f64  # noqa: E402

THREADS = os.cpu_count() or 2
GOALS = {"bfloat16": 62.0, "float16": 80.0}  # .bbf exact, % of the baseline; float32: the best peer
RAW_GOAL = {"bfloat16": 65.0}
DECODE_GOAL = 1.2  # x ZipNN
_EMIN = {"float16": -14, "bfloat16": -126, "float32": -126}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def build_info() -> dict:
    where = Path(bbformat.__file__).resolve().parent
    return {"bbformat": str(where), "build": "editable tree" if where == ROOT / "bbformat" else "installed",
            "c_kernels": bool(kernels.COMPILED), "cpu_count": THREADS, "torch": torch.__version__}


# ---- timing -------------------------------------------------------------------------------------------------
def interleaved_times(fns: dict, repeat: int) -> dict:
    """name -> the times of fn() in `repeat` rounds that each run every fn once, after one warm-up round.

    Odd rounds run in reverse order (no format always follows the same one); garbage is collected between calls;
    torch and BLAS threads are pinned to 1 so that nothing oversubscribes the cores beside the decoders' pools."""
    times = {k: [] for k in fns}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            for r in range(repeat + 1):
                for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    gc.collect()
                    t0 = time.perf_counter()
                    out = fns[k]()
                    if r:
                        times[k].append(time.perf_counter() - t0)
                    del out
    finally:
        torch.set_num_threads(threads)
    return times


class Busy:
    """`n` processes that spin on a core each while the decoders are timed (--busy: the numbers under load)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def paired_median(peer: list, ours: list) -> float:
    """The median over rounds of peer time / our time in the same round: robust where a busy machine slows whole
    rounds (the ratio of best times pairs two different rounds)."""
    return float(np.median(np.array(peer) / np.array(ours)))


# ---- reference bounds ---------------------------------------------------------------------------------------
def order0_bits(tensors: dict, dtype: str) -> float:
    """Sum over tensors of numel x the order-0 entropy of the tensor's words (bits)."""
    total = 0.0
    for t in tensors.values():
        w = to_words(t, dtype).reshape(-1)
        counts = np.bincount(w.astype(np.int64)) if w.itemsize == 2 else np.unique(w, return_counts=True)[1]
        p = counts[counts > 0] / w.size
        total += float(-(p * np.log2(p)).sum()) * w.size
    return total


def parametric_bits(tensors: dict, dtype: str) -> float:
    """Per-line Gaussian/Laplace bound (module docstring), summed over tensors (bits). Works in blocks of rows, so
    its float64 temporaries stay small beside the benchmark's buffers."""
    m, emin, cap = MANTISSA_BITS[dtype], _EMIN[dtype], word_bits(dtype)
    total = 0.0
    for t in tensors.values():
        w = words_to_f64(to_words(t, dtype), dtype)
        w = w.reshape(1, -1) if w.ndim == 1 else w.reshape(w.shape[0], -1)
        step = max(1, (1 << 20) // w.shape[1])
        blocks = [w[i:i + step] for i in range(0, w.shape[0], step)]
        col_sq = sum((x * x).sum(0) for x in blocks) / w.shape[0]  # each column's scale needs every row first
        col_abs = sum(np.abs(x).sum(0) for x in blocks) / w.shape[0]

        def line_bits(x, sq_mean, abs_mean, axis):  # (gauss, laplace) code lengths of each line's words in x
            e = np.frexp(x)[1]
            log_ulp = np.maximum(np.where(x == 0, emin + 1, e) - 1, emin) - m  # log2 of the spacing at x
            var, b = np.maximum(sq_mean, 1e-300), np.maximum(abs_mean, 1e-300)
            gauss = 0.5 * np.log2(2 * np.pi * var) + x * x / (2 * var * np.log(2)) - log_ulp
            laplace = np.log2(2 * b) + np.abs(x) / (b * np.log(2)) - log_ulp
            return [np.clip(nl, 0, cap).sum(axis) for nl in (gauss, laplace)]

        by_col = np.zeros((2, w.shape[1]))
        by_row = 0.0
        for x in blocks:
            g, lp = line_bits(x, (x * x).mean(1, keepdims=True), np.abs(x).mean(1, keepdims=True), 1)
            by_row += float(np.minimum(g, lp).sum())  # each row its better family
            by_col += line_bits(x, col_sq[None, :], col_abs[None, :], 0)
        best = by_row if w.shape[0] == 1 else min(by_row, float(by_col.min(0).sum()))  # the better axis
        total += best
    return total


# ---- peers --------------------------------------------------------------------------------------------------
def peer_rows(base: bytes, tensors: dict, dtype: str, workdir: Path) -> list[tuple]:
    """(name, size, encode s, note, decode fn or None) for each peer; a peer that fails to import is a note."""
    rows = []
    t0 = time.perf_counter()
    z = zstandard.ZstdCompressor(level=3, threads=THREADS).compress(base)
    rows.append(("zstd -3", len(z), time.perf_counter() - t0, "", lambda: zstandard.ZstdDecompressor().decompress(z)))

    try:
        from zipnn import ZipNN

        zpn = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=THREADS)
        t0 = time.perf_counter()
        zc = zpn.compress(bytearray(base))  # ZipNN reorders its input buffer in place: give it a copy
        enc = time.perf_counter() - t0
        assert bytes(zpn.decompress(zc)) == base, "ZipNN round trip failed"
        rows.append(("ZipNN", len(zc), enc, "", lambda: zpn.decompress(zc)))
    except ImportError as e:
        rows.append(("ZipNN", None, None, f"not available ({e})", None))

    try:
        import lmz

        src, dst, back = workdir / f"l.{dtype}.safetensors", workdir / f"l.{dtype}.lmz", workdir / "l.out"
        src.write_bytes(base)
        t0 = time.perf_counter()
        lmz.compress(str(src), str(dst), workers=THREADS)
        enc = time.perf_counter() - t0
        lmz.decompress(str(dst), str(back), workers=THREADS, overwrite=True)
        assert back.read_bytes() == base, "lmzip round trip failed"
        rows.append(("lmzip", dst.stat().st_size, enc, "decode: file -> file",
                     lambda: lmz.decompress(str(dst), str(back), workers=THREADS, overwrite=True)))
    except ImportError as e:
        rows.append(("lmzip", None, None, f"not available ({e})", None))

    try:
        import openzl.ext as zl

        def ozl(a: np.ndarray) -> bytes:  # one frame per tensor: a frame of many large inputs hits a limit
            comp = zl.Compressor()
            comp.select_starting_graph(zl.graphs.Compress()(comp))
            cctx = zl.CCtx()
            cctx.ref_compressor(comp)
            cctx.set_parameter(zl.CParam.FormatVersion, zl.MAX_FORMAT_VERSION)
            return cctx.compress([zl.Input(zl.Type.Numeric, a)])

        arrays = [to_words(t, dtype).reshape(-1) for t in tensors.values()]
        t0 = time.perf_counter()
        frames = [ozl(a) for a in arrays]
        enc = time.perf_counter() - t0
        dctx = zl.DCtx()
        assert all(np.array_equal(dctx.decompress(f)[0].content.as_nparray().view(a.dtype), a)
                   for f, a in zip(frames, arrays)), "OpenZL round trip failed"
        rows.append(("OpenZL", sum(map(len, frames)), enc, "one frame per tensor, one thread (its Python API)",
                     lambda: [dctx.decompress(f) for f in frames]))
    except ImportError as e:
        rows.append(("OpenZL", None, None, f"not available ({e})", None))
    except RuntimeError as e:  # OpenZL's own errors
        rows.append(("OpenZL", None, None, f"failed: {str(e).splitlines()[0]}", None))
    return rows


# ---- one dtype ----------------------------------------------------------------------------------------------
def _methods(data: bytes) -> str:
    from bbformat.container.reader import BufferStore

    with bbformat.BBFReader("<bytes>", store=BufferStore(data)) as f:
        return ",".join(str(m) for m in sorted({r.compression for r in f.sections if r.kind != "aux"}))


def bench_one(desc, tensors32: dict, dtype: str, workdir: Path, repeat: int, busy: int = 0) -> list[dict]:
    from safetensors.torch import save as st_save

    origin = "float16" if dtype == "float32" else dtype  # float32 rows: the float16 checkpoint widened
    tensors = {k: v.to(torch_dtype(origin)).to(torch_dtype(dtype)).contiguous() for k, v in tensors32.items()}
    n_weights = sum(v.numel() for v in tensors.values())
    narrow, _ = survey(tensors.values(), dtype)  # what `bbf encode` decides (SPEC 12.5)
    grid = narrow or dtype  # the bounds first, while few buffers are alive (memory)
    on_grid = f"on the {grid} grid" if narrow else ""
    bounds = [("order-0 bound (per tensor)", order0_bits(tensors, grid) / 8, None, on_grid, None),
              ("per-line Gaussian/Laplace bound", parametric_bits(tensors, grid) / 8, None, on_grid, None)]
    base = st_save(tensors)
    B = len(base)
    rows = [("safetensors (baseline)", B, None, "", None)]
    rows += peer_rows(base, tensors, dtype, workdir)
    del base
    variants = [("", dtype, "")] if narrow is None else \
        [("", narrow, f"stored as {narrow} (bbf encode's choice); "), (" --keep-dtype", dtype, "")]
    runs = [(codec, suffix, file_dtype, note, {}, "auto") for codec in ("raw", "exact")
            for suffix, file_dtype, note in variants]
    if desc.tie_word_embeddings:  # the tied head's share (SPEC 12.6), and entropy method 2 on top (an archive)
        runs += [("exact", " (no tied head)", variants[0][1], variants[0][2], {"tied_head": False}, "auto"),
                 ("exact", " --compression small", variants[0][1], variants[0][2], {}, "small")]
    for codec, suffix, file_dtype, note, params, compression in runs:
        path = workdir / f"m.{codec}.{file_dtype}.bbf"
        t0 = time.perf_counter()
        bbformat.save(tensors, str(path), model=desc, codec=codec, dtype=file_dtype, codec_params=params,
                      compression=compression)
        enc = time.perf_counter() - t0
        data = path.read_bytes()
        path.unlink()
        rows.append((f".bbf {codec}{suffix}", len(data), enc, f"{note}entropy methods {_methods(data)}",
                     lambda d=data: bbformat.loads(d)))
    rows += bounds
    del tensors  # the timed calls hold only their compressed bytes (memory: float32 tensors are 563 MB)
    gc.collect()
    with Busy(busy):
        before = loadavg()
        times = interleaved_times({name: fn for name, _, _, _, fn in rows if fn is not None}, repeat)
        after = loadavg()
    timed = {k: min(v) for k, v in times.items()}
    zipnn_s = timed.get("ZipNN")
    out = []
    for name, size, enc, note, _ in rows:
        s = timed.get(name)
        out.append({"format": name, "dtype": dtype, "bytes": size, "percent": size and 100 * size / B,
                    "bits_per_weight": size and 8 * size / n_weights,
                    "decode_GBps": B / s / 1e9 if s else None,
                    "vs_zipnn": zipnn_s / s if s and zipnn_s else None,
                    "vs_zipnn_median": paired_median(times["ZipNN"], times[name]) if s and zipnn_s else None,
                    "encode_s": enc, "note": note, "loadavg": f"{before} -> {after}"})
    return out


def goal_lines(rows: list[dict], dtype: str) -> list[str]:
    by = {r["format"]: r for r in rows}
    peers = [r["percent"] for r in rows if r["format"] in ("ZipNN", "lmzip", "OpenZL") and r["percent"]]
    best_peer = min(peers) if peers else None
    lines = []

    def check(name, goal, what):
        r = by.get(name)
        if r and r["percent"] and goal:
            lines.append(f"- {name}: {r['percent']:.2f} % (goal <= {goal:.2f} %, {what}): "
                         f"{'met' if r['percent'] <= goal else 'NOT met'}")

    check(".bbf exact", GOALS.get(dtype, best_peer), "issue 13" if dtype in GOALS else "the best peer")
    check(".bbf raw", RAW_GOAL.get(dtype, best_peer if dtype == "float32" else None),
          "issue 13" if dtype in RAW_GOAL else "the best peer")
    ex = by.get(".bbf exact")
    if ex and ex["vs_zipnn"]:
        worse = min(ex["vs_zipnn"], ex["vs_zipnn_median"])
        lines.append(f"- .bbf exact decodes at {ex['vs_zipnn']:.2f} x ZipNN (best times), "
                     f"{ex['vs_zipnn_median']:.2f} x (median of the rounds' ratios) (goal >= {DECODE_GOAL}): "
                     f"{'met' if worse >= DECODE_GOAL else 'NOT met'} (the lower of the two)")
    raw, keep = by.get(".bbf raw"), by.get(".bbf exact --keep-dtype")
    if raw and keep and keep["percent"]:
        lines.append(f"- never larger than raw: .bbf exact --keep-dtype {keep['percent']:.2f} % vs .bbf raw "
                     f"--keep-dtype {by['.bbf raw --keep-dtype']['percent']:.2f} %")
    return lines


COLUMNS = [("format", "format", ""), ("percent", "size %", ".2f"), ("bits_per_weight", "bits/weight", ".3f"),
           ("decode_GBps", "decode GB/s", ".2f"), ("vs_zipnn", "x ZipNN", ".2f"),
           ("vs_zipnn_median", "x ZipNN (median)", ".2f"), ("encode_s", "encode s", ".1f"),
           ("note", "note", "")]


def run_installed(argv: list[str]) -> int:
    """Build a wheel of this tree, install it into a temporary directory and run this benchmark against it."""
    with tempfile.TemporaryDirectory(prefix="bbf-wheel-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                        "-w", tmp], check=True)
        site = Path(tmp) / "site"
        wheel = next(Path(tmp).glob("bbformat-*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        str(wheel)], check=True)
        env = dict(os.environ, PYTHONPATH=str(site))
        args = [a for a in argv if a != "--installed"]
        # it runs in the temporary directory (so the tree is not importable): a relative --json is the caller's
        args = [str(Path(a).resolve()) if i and args[i - 1] == "--json" else a for i, a in enumerate(args)]
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, cwd=tmp).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.25, 0.3])
    p.add_argument("--quick", action="store_true", help="the 25 %% checkpoint only")
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="N processes spinning on a core each while the decoders are timed (a loaded machine)")
    p.add_argument("--installed", action="store_true", help="measure a wheel built from this tree, not the tree")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.installed:
        sys.exit(run_installed(sys.argv[1:]))
    torch.set_num_threads(THREADS)
    info = build_info()
    print(f"bbformat from {info['bbformat']} ({info['build']}), C kernels "
          f"{'compiled' if info['c_kernels'] else 'NOT compiled (numpy reference)'}, {THREADS} cores, "
          f"torch {info['torch']}; load average {loadavg()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in ([0.25] if args.quick else args.sparsity):
            desc, tensors, _ = sliced_smollm2(s, log=lambda m: print(m, file=sys.stderr), canonical=False)
            for dtype in args.dtype:
                rows = bench_one(desc, tensors, dtype, Path(tmp), args.repeat, args.busy)
                for r in rows:
                    r.update(sparsity=s, **info)
                results += rows
                origin = " (the float16 weights widened)" if dtype == "float32" else ""
                busy = f", {args.busy} busy process(es) beside the timing" if args.busy else ""
                print(f"\n### SmolLM2-135M sliced {s:.0%}, {dtype}{origin}; load average {rows[0]['loadavg']}{busy}\n")
                print(markdown_table(rows, COLUMNS))
                print("\n" + "\n".join(goal_lines(rows, dtype)), flush=True)
                gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\npeak resident memory {peak:.2f} GB; load average {loadavg()}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()

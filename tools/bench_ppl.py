"""Perplexity and size table (issue 5): the original SmolLM2-135M, sliced at 20/25/30%, and each sliced model
after a .bbf round trip with each codec, on the first 20,480 tokens of Hamlet (ctx 512, stride 512).

Calibration uses 32 x 512 tokens of Hamlet AFTER the evaluated part (tokens 20,480..36,864). Weights are stored in
float16; the forward runs in float32.

    .venv/bin/python tools/bench_ppl.py [--sparsity 0.2 0.25 0.3] [--codecs raw bitsback exact] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_TOKENS, GGUF, hamlet_ids, markdown_table, sliced_smollm2, write_json  # noqa: E402

import bbformat  # noqa: E402
from bbformat.evaluate import perplexity  # noqa: E402
from bbformat.models.sliced import SlicedLM  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.25, 0.3])
    p.add_argument("--codecs", nargs="+", default=["raw", "bitsback", "exact"])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--json", default=None)
    p.add_argument("--cache", default=None, help="JSON file of finished evaluations: a rerun skips them")
    args = p.parse_args()
    done = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}

    def ppl_of(key, model_fn):
        if key not in done:
            done[key] = perplexity(model_fn(), ids, progress=False)
            if args.cache:
                Path(args.cache).write_text(json.dumps(done, indent=1))
        return done[key]

    from bbformat.models.hf import load_hf

    model, tokenizer, _ = load_hf(GGUF)
    ids = hamlet_ids(tokenizer)[:EVAL_TOKENS]
    rows = []
    t0 = time.perf_counter()
    ppl = ppl_of("original", lambda: model)
    fp16_bytes = sum(p.numel() for p in model.state_dict().values()) * 2
    rows.append({"model": "SmolLM2-135M (original)", "ppl": ppl, "bytes": None, "note": f"{fp16_bytes / 1e6:.1f} "
                 "MB of fp16 arrays"})
    print(f"original: {ppl:.2f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    td = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.sparsity:
            desc, tensors32, _ = sliced_smollm2(s, log=lambda m: print(m, file=sys.stderr))
            tensors = {k: v.to(td) for k, v in tensors32.items()}
            plain = sum(v.numel() for v in tensors.values()) * td.itemsize
            base = ppl_of(f"sliced {s}", lambda: SlicedLM(desc, tensors).eval())
            rows.append({"model": f"sliced {s:.0%}", "ppl": base, "bytes": plain, "percent": 100.0,
                         "note": f"{args.dtype} arrays (plain layout)"})
            print(f"sliced {s:.0%}: {base:.2f}", file=sys.stderr)
            for codec in args.codecs:
                path = Path(tmp) / f"m.{codec}.bbf"
                bbformat.save(tensors, str(path), model=desc, codec=codec, dtype=args.dtype)
                back = bbformat.load(str(path))
                if all(torch.equal(back[k], tensors[k]) for k in tensors):  # bit-identical: the same model
                    ppl = base
                else:
                    ppl = ppl_of(f"{codec} {s}", lambda: bbformat.load_model(str(path)))
                size = path.stat().st_size
                rows.append({"model": f"sliced {s:.0%} -> .bbf {codec}", "ppl": ppl, "bytes": size,
                             "bit_identical": ppl is base,
                             "percent": 100 * size / plain, "delta_ppl": ppl - base,
                             "rel_change_percent": 100 * (ppl - base) / base})
                print(f"  {codec}: {ppl:.3f} ({size / 1e6:.1f} MB)", file=sys.stderr)
    print(markdown_table(rows, [("model", "model", ""), ("ppl", "perplexity", ".2f"),
                                ("delta_ppl", "Δ vs sliced", "+.3f"), ("rel_change_percent", "Δ %", "+.2f"),
                                ("bytes", "bytes", ",.0f"), ("percent", "% of sliced arrays", ".2f")]))
    print("\nPaper's worst relative change (Table 1, Llama-2-7B 20%: 6.86 -> 6.98): +1.75%")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()

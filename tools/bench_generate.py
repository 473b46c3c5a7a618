"""Generation speed: the .bbf-loaded sliced SmolLM2-135M (`bbformat.load_pretrained`, transformers `generate`) against
Hugging Face `generate` of the unsliced SmolLM2-135M from the GGUF, in the same run.

Both models compute in float32 on the CPU, decode greedily from the same chat-template prompt and are made to
produce exactly `--new-tokens` tokens (min_new_tokens), with the KV cache (DynamicCache). Rounds alternate the
order of the two models; tokens/s = new tokens / wall time of one `generate` call (prefill included), best and
median over the rounds.

    .venv/bin/python tools/bench_generate.py [--sparsity 0.25] [--new-tokens 32] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, GGUF, markdown_table, sliced_smollm2, write_json  # noqa: E402

import bbformat  # noqa: E402
from bbformat.models.hf import load_hf, tokenizer_bytes  # noqa: E402
from bbformat.models.loader import TOKENIZER_AUX, TOKENIZER_MEDIA_TYPE  # noqa: E402

PROMPT = "Write two sentences about the sea."


def bbf_file(sparsity: float, codec: str, log) -> Path:
    """The sliced model as a .bbf (float16 words, tokenizer inside), written once under cache/sliced/."""
    path = CACHE / "sliced" / f"smollm2-135m-{round(sparsity * 100)}.{codec}.bbf"
    if not path.exists():
        desc, tensors, tokenizer = sliced_smollm2(sparsity, log=log)
        tmp = path.with_name(path.name + ".tmp")
        bbformat.save(tensors, str(tmp), model=desc, codec=codec, dtype="float16",
                      aux={TOKENIZER_AUX: (tokenizer_bytes(tokenizer), TOKENIZER_MEDIA_TYPE)})
        tmp.replace(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.25, help="SliceGPT sparsity of the sliced model (default 0.25)")
    p.add_argument("--codec", default="exact", help="codec of the .bbf (default exact)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (default 32)")
    p.add_argument("--repeat", type=int, default=5, help="rounds; each runs both models once (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--prompt", default=PROMPT, help=f"user message of the chat prompt (default {PROMPT!r})")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"loading {GGUF.name} (unsliced, float32)")
    hf, tokenizer, _ = load_hf(GGUF)
    path = bbf_file(args.sparsity, args.codec, log)
    log(f"loading {path.name} with bbformat.load_pretrained")
    t0 = time.perf_counter()
    sliced, tok2 = bbformat.load_pretrained(str(path))
    load_s = time.perf_counter() - t0
    prompt = tok2.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    assert torch.equal(ids, tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                          add_generation_prompt=True, return_tensors="pt",
                                                          return_dict=True)["input_ids"])
    n = args.new_tokens
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    models = {"unsliced": hf, "sliced": sliced}
    times: dict[str, list[float]] = {k: [] for k in models}
    texts = {}
    with torch.inference_mode():
        for m in models.values():  # warm-up: first-call allocations and lazy initialisation
            m.generate(ids, **dict(kw, max_new_tokens=2, min_new_tokens=2))
        for r in range(args.repeat):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                t0 = time.perf_counter()
                out = models[name].generate(ids, **kw)
                times[name].append(time.perf_counter() - t0)
                texts[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            log(f"round {r + 1}/{args.repeat}: " + ", ".join(f"{k} {n / times[k][-1]:.1f} tok/s" for k in order))
    params = {"unsliced": sum(p.numel() for p in hf.parameters()), "sliced": sum(p.numel() for p in sliced.parameters())}
    rows = []
    for name in models:
        best, med = n / min(times[name]), n / statistics.median(times[name])
        rows.append({"model": "SmolLM2-135M unsliced (HF LlamaForCausalLM, GGUF)" if name == "unsliced" else
                     f"SmolLM2-135M sliced {args.sparsity:.0%} (.bbf {args.codec}, SlicedForCausalLM)",
                     "params": params[name], "best_tok_s": best, "median_tok_s": med, "ms_per_token": 1e3 / best,
                     "text": texts[name]})
    base = rows[0]["best_tok_s"]
    for r in rows:
        r["speedup"] = r["best_tok_s"] / base
    print(f"{n} new tokens per generate() from a {ids.shape[1]}-token chat prompt, greedy, float32, "
          f"{torch.get_num_threads()} threads, best/median of {args.repeat} interleaved rounds; .bbf loaded in "
          f"{load_s:.1f} s\n")
    print(markdown_table(rows, [("model", "model", ""), ("params", "parameters", ",d"),
                                ("best_tok_s", "tokens/s (best)", ".2f"), ("median_tok_s", "tokens/s (median)", ".2f"),
                                ("ms_per_token", "ms/token (best)", ".1f"), ("speedup", "vs unsliced", ".2f")]))
    for r in rows:
        print(f"\n{r['model']}:\n  {r['text']!r}")
    write_json(args.json, {"new_tokens": n, "prompt_tokens": int(ids.shape[1]), "threads": torch.get_num_threads(),
                           "rounds": args.repeat, "load_s": load_s, "rows": rows,
                           "times": {k: v for k, v in times.items()}})


if __name__ == "__main__":
    main()

"""The README's main job, end to end on a real model (run through tools/demo.sh, which fetches the assets).

SmolLM2-135M (GGUF from PyPI) -> slice at 25% calibrating on Hamlet -> .bbf -> served over HTTP on 127.0.0.1 ->
loaded back from the URL with `bbformat.load_pretrained` (a transformers model) -> perplexity -> a chat-template
prompt answered with `generate()` -> bbf-inspect. Prints where the bytes went, the perplexity before and after, and
the answers of the original and of the sliced model. Evaluation uses the first 20,480 tokens of Hamlet;
calibration uses tokens after them.

The sliced model's greedy answer is checked token for token against the reference path: the same weights in the
torch-only `SlicedLM`, the whole prefix recomputed at every step (no KV cache, no transformers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import bbformat
from bbformat.cli.inspect import render, summarize
from bbformat.evaluate import perplexity, tokenize_text
from bbformat.models.hf import load_hf, tokenizer_bytes
from bbformat.models.loader import TOKENIZER_AUX, TOKENIZER_MEDIA_TYPE
from bbformat.models.slicer import slice_model
from bbformat.models.sliced import SlicedLM
from bbformat.serve import start_server

PROMPT = "Write two lines of verse about the sea."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="cache/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--text", default="cache/hamlet_gut.txt")
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--codec", default="exact")
    p.add_argument("--eval-tokens", type=int, default=20480)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--out", default="out")
    p.add_argument("--prompt", default=PROMPT, help=f"the user message of the chat prompt (default {PROMPT!r})")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens of each answer (default 32)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    t_all = time.perf_counter()

    print(f"[1/6] loading {args.model}")
    model, tokenizer, _ = load_hf(args.model)
    ids = tokenize_text(tokenizer, args.text)
    eval_ids = ids[: args.eval_tokens]
    n_cal = args.calib_samples * args.calib_len
    calib = ids[args.eval_tokens: args.eval_tokens + n_cal].reshape(args.calib_samples, args.calib_len)
    print(f"      {ids.numel():,} tokens in {Path(args.text).name}: evaluating on tokens 0..{args.eval_tokens}, "
          f"calibrating on tokens {args.eval_tokens}..{args.eval_tokens + n_cal}")
    t0 = time.perf_counter()
    ppl_orig = perplexity(model, eval_ids)
    print(f"      original perplexity {ppl_orig:.2f} ({time.perf_counter() - t0:.0f} s)")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
    gen = dict(do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tokenizer.eos_token_id)
    answer_orig = tokenizer.decode(model.generate(**chat, **gen)[0, chat["input_ids"].shape[1]:],
                                   skip_special_tokens=True)

    print(f"[2/6] slicing at {args.sparsity:.0%} (SliceGPT procedure, {n_cal:,} calibration tokens)")
    t0 = time.perf_counter()
    desc, tensors = slice_model(model, calib, args.sparsity, dtype=torch.float16)
    t_slice = time.perf_counter() - t0
    del model
    window = eval_ids[:512].unsqueeze(0)
    reference = SlicedLM(desc, tensors).eval()  # the torch-only model: the reference path
    with torch.no_grad():
        sliced_logits = reference(window)
    print(f"      sliced in {t_slice:.0f} s: {desc.num_params():,} parameters")

    path = out / f"smollm2-135m-{int(args.sparsity * 100)}.{args.codec}.bbf"
    print(f"[3/6] writing {path} (codec {args.codec}, float16, tokenizer inside)")
    t0 = time.perf_counter()
    bbformat.save(tensors, str(path), model=desc, codec=args.codec, dtype="float16", progress=True,
                  aux={TOKENIZER_AUX: (tokenizer_bytes(tokenizer), TOKENIZER_MEDIA_TYPE)},
                  metadata={"source": Path(args.model).name, "sparsity": str(args.sparsity)})
    t_write = time.perf_counter() - t0

    print("[4/6] serving it over HTTP on 127.0.0.1 and loading it back from the URL")
    server, base = start_server(str(out))
    try:
        url = f"{base}/{path.name}"
        t0 = time.perf_counter()
        loaded, tok2 = bbformat.load_pretrained(url)
        t_load = time.perf_counter() - t0
        ids2 = tokenize_text(tok2, args.text)[: args.eval_tokens]
        assert torch.equal(ids2, eval_ids), "the tokenizer stored in the file tokenises differently"
        with torch.no_grad():
            diff = (loaded(window).logits - sliced_logits).abs().max().item()
        print(f"      loaded from {url} in {t_load:.1f} s as {type(loaded).__name__} (transformers); max |logit "
              f"difference| to the sliced model {diff:.2e}")
        t0 = time.perf_counter()
        ppl_loaded = perplexity(lambda x: loaded(x, use_cache=False), ids2)
        print(f"      perplexity {ppl_loaded:.2f} ({time.perf_counter() - t0:.0f} s)")
        print(f"[5/6] chat: {args.prompt!r} (chat template, greedy, {args.new_tokens} tokens)")
        t0 = time.perf_counter()
        out = loaded.generate(**tok2.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                         add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True), **gen)
        t_gen = time.perf_counter() - t0
        n_prompt = chat["input_ids"].shape[1]
        answer = tok2.decode(out[0, n_prompt:], skip_special_tokens=True)
        ref_ids = chat["input_ids"]
        with torch.no_grad():  # the reference path: no cache, the whole prefix at every step
            for _ in range(out.shape[1] - n_prompt):
                ref_ids = torch.cat([ref_ids, reference(ref_ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        same = torch.equal(ref_ids, out)
        print(f"      original model:       {answer_orig!r}")
        print(f"      sliced, from the URL: {answer!r}")
        print(f"      {out.shape[1] - n_prompt} tokens in {t_gen:.1f} s with generate() and its KV cache; token for "
              f"token {'equal to' if same else 'DIFFERENT FROM'} the reference path (SlicedLM, no cache)")
        assert same, "generate() and the reference path disagree"
        print("[6/6] bbf-inspect " + url)
        with bbformat.open(url) as f:
            summary = summarize(f)
        print(render(summary))
    finally:
        server.shutdown()

    t = summary["totals"]
    fp16_plain = t["plain_bytes"]
    print("\n== summary ==")
    print(f"perplexity (first {args.eval_tokens:,} tokens of Hamlet, ctx 512, stride 512): original {ppl_orig:.2f}, "
          f"sliced at {args.sparsity:.0%} and loaded from the .bbf over HTTP {ppl_loaded:.2f}")
    print(f"sizes: sliced fp16 arrays {fp16_plain / 1e6:.1f} MB -> {path.name} {t['file_bytes'] / 1e6:.1f} MB "
          f"({100 * t['file_bytes'] / fp16_plain:.1f}%, {t['bits_per_weight']:.2f} bits/weight); write {t_write:.1f} s,"
          f" load over HTTP {t_load:.1f} s; total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ppl_original": ppl_orig, "ppl_loaded": ppl_loaded, "max_logit_diff": diff, "file": str(path),
            "file_bytes": t["file_bytes"], "plain_bytes": fp16_plain, "slice_s": t_slice, "write_s": t_write,
            "load_s": t_load, "prompt": args.prompt, "answer": answer, "answer_original": answer_orig,
            "generate_s": t_gen, "generate_equals_reference": same}, indent=1))


if __name__ == "__main__":
    main()

"""`bbf`: encode, decode, verify, inspect, slice, eval, serve."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..codecs import codec_ids, get_codec
from ..container.reader import BBFReader
from ..container.writer import save
from ..errors import BBFError
from ..words import WORD_DTYPES, dtype_name, words_to_f64
from . import inspect as inspect_cmd
from .common import add_storage_args, fetch_options, run_cli, storage_options


def _codec(args) -> tuple[str, dict]:
    params = {}
    if getattr(args, "threshold", None) is not None:
        if args.codec != "bitsback":
            raise BBFError("--threshold only applies to --codec bitsback")
        params["threshold"] = args.threshold
    get_codec(args.codec, params)  # validate early, before any work
    return args.codec, params


# ---- encode ----------------------------------------------------------------------------------------------
def cmd_encode(args) -> int:
    from ..models.slicegpt_io import load_slicegpt

    codec, params = _codec(args)
    desc, tensors = load_slicegpt(args.input, args.slicing_json, args.config)
    dtype = args.dtype or dtype_name(next(iter(tensors.values())).dtype)
    t0 = time.perf_counter()
    save(tensors, args.output, model=desc, codec=codec, codec_params=params, dtype=dtype,
         metadata={"source": Path(args.input).name}, storage_options=storage_options(args), progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.output} ({codec}, {dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


# ---- decode ----------------------------------------------------------------------------------------------
def cmd_decode(args) -> int:
    from ..models.slicegpt_io import save_slicegpt

    if not args.output.endswith((".pt", ".safetensors")):
        raise BBFError("-o must end in .pt (SliceGPT layout) or .safetensors")
    with BBFReader(args.input, storage_options(args), fetch=fetch_options(args)) as f:
        tensors = f.load_all()
        desc = f.model
    ckpt, js = save_slicegpt(desc, tensors, args.output)
    if not args.quiet:
        print(f"wrote {ckpt} and {js}")
    return 0


# ---- verify ----------------------------------------------------------------------------------------------
def canonical_words(desc, tensors, codec, dtype):
    """Run the file's codec encoder over the original: the canonical words the decoder must reproduce."""
    enc = codec.encoder(desc, dtype)
    for group in desc.groups():
        yield group, enc.encode(group, {t.name: tensors[t.name] for t in desc.group_tensors(group)}).canonical


def cmd_verify(args) -> int:
    from ..models.slicegpt_io import load_slicegpt

    with BBFReader(args.input, storage_options(args), fetch=fetch_options(args)) as f:
        desc, tensors = load_slicegpt(args.against, args.slicing_json, args.config)
        if desc.tensors() != f.model.tensors():
            raise BBFError(f"{args.against} does not have the layout of {args.input}")
        tau = float(f.codec.params().get("threshold", 0.0))
        rows, worst = [], 0.0
        decoded_groups = dict(f.stream())
        for group, canon in canonical_words(desc, tensors, f.codec, f.dtype):
            for name, words in canon.items():
                want = words_to_f64(words, f.dtype)
                got = decoded_groups[group][name].to(torch.float64).numpy()
                err = np.abs(got - want)
                bad = int(np.count_nonzero(~(err <= tau)))  # NaN counts as bad
                mx = float(np.nanmax(err)) if err.size else 0.0
                worst = max(worst, mx)
                rows.append({"tensor": name, "max_abs_error": mx, "over_threshold": bad})
        corrections = sum(r.corrections for r in f.sections)
    over = sum(r["over_threshold"] for r in rows)
    result = {"file": args.input, "codec": f.codec.id, "threshold": tau, "max_abs_error": worst,
              "values_over_threshold": over, "corrections": corrections, "tensors": rows, "ok": over == 0}
    if args.json:
        print(json.dumps(result))
    else:
        for r in rows if args.verbose else [r for r in rows if r["over_threshold"] or r["max_abs_error"] > 0][:20]:
            print(f"{r['tensor']:<55} max |err| {r['max_abs_error']:.3e}  over tau: {r['over_threshold']}")
        print(f"{len(rows)} tensors, max |error| {worst:.3e} against the canonicalised original (tau {tau}), "
              f"{corrections} corrections, {over} values over tau: {'OK' if over == 0 else 'FAILED'}")
    return 0 if over == 0 else 1


# ---- slice -----------------------------------------------------------------------------------------------
def cmd_slice(args) -> int:
    from ..evaluate import tokenize_text
    from ..models.hf import load_hf, tokenizer_bytes
    from ..models.loader import TOKENIZER_AUX, TOKENIZER_MEDIA_TYPE
    from ..models.slicegpt_io import save_slicegpt
    from ..models.slicer import slice_model

    if not 0 <= args.sparsity < 1:
        raise BBFError("--sparsity must be in [0, 1)")
    model, tokenizer, _ = load_hf(args.model)
    if tokenizer is None:
        raise BBFError(f"{args.model} has no tokenizer to read the calibration text with")
    ids = tokenize_text(tokenizer, args.calib)
    start = args.calib_offset
    n = args.calib_samples * args.calib_len
    if ids.numel() < start + n:
        raise BBFError(f"{args.calib} has {ids.numel()} tokens; calibration needs {start + n} "
                       f"(offset {start} + {args.calib_samples} x {args.calib_len})")
    calib = ids[start: start + n].reshape(args.calib_samples, args.calib_len)
    dtype = args.dtype
    desc, tensors = slice_model(model, calib, args.sparsity, dtype=WORD_DTYPES[dtype][0], progress=not args.quiet)
    del model
    if args.output.endswith((".pt", ".safetensors")):
        save_slicegpt(desc, tensors, args.output)
    else:
        codec, params = _codec(args)
        meta = {"source": str(args.model), "sparsity": str(args.sparsity), "calibration":
                f"{Path(args.calib).name} tokens {start}..{start + n}"}
        save(tensors, args.output, model=desc, codec=codec, codec_params=params, dtype=dtype, metadata=meta,
             aux={TOKENIZER_AUX: (tokenizer_bytes(tokenizer), TOKENIZER_MEDIA_TYPE)},
             storage_options=storage_options(args), progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.output}: {desc.num_params():,} parameters after slicing at {args.sparsity:.0%}")
    return 0


# ---- eval ------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from ..evaluate import perplexity, tokenize_text

    t0 = time.perf_counter()
    model, tokenizer = _load_any(args.model, args)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    if tokenizer is None:
        raise BBFError(f"{args.model} carries no tokenizer; pass --tokenizer DIR")
    ids = tokenize_text(tokenizer, args.text, max_tokens=args.max_tokens)
    load_s = time.perf_counter() - t0
    ppl = perplexity(model, ids, ctx=args.ctx, stride=args.stride or args.ctx, progress=not args.json)
    result = {"model": args.model, "text": args.text, "tokens": int(ids.numel()), "ctx": args.ctx,
              "stride": args.stride or args.ctx, "perplexity": ppl, "load_seconds": round(load_s, 2),
              "eval_seconds": round(time.perf_counter() - t0 - load_s, 2)}
    print(json.dumps(result) if args.json else
          f"perplexity {ppl:.2f} on {result['tokens']:,} tokens of {Path(args.text).name} "
          f"(ctx {args.ctx}, stride {result['stride']}); load {load_s:.1f} s")
    return 0


def _load_any(model: str, args):
    """A .bbf (path or URL) -> our SlicedLM; a HF dir / .gguf -> the HF model."""
    if model.endswith(".gguf") or Path(model).is_dir():
        from ..models.hf import load_hf

        m, tok, _ = load_hf(model)
        return m, tok
    from ..models.loader import load_pretrained

    return load_pretrained(model, storage_options(args), progress=not getattr(args, "json", False),
                           fetch=fetch_options(args))


# ---- serve -----------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from ..serve import start_server

    rate = args.rate * 1e6 if args.rate else None  # MB/s -> bytes/s
    conn_rate = args.conn_rate * 1e6 if args.conn_rate else None
    latency = args.latency / 1e3 if args.latency else None  # ms -> s
    server, url = start_server(args.directory, args.host, args.port, rate=rate, conn_rate=conn_rate, latency=latency)
    caps = [f"{args.rate:g} MB/s in all" if rate else "", f"{args.conn_rate:g} MB/s per response" if conn_rate else "",
            f"{args.latency:g} ms first-byte latency" if latency else ""]
    caps = "; " + ", ".join(c for c in caps if c) if any(caps) else ""
    print(f"serving {args.directory} at {url} (Range supported{caps}); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
        server.server_close()
    return 0


# ---- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bbf", description="Store SliceGPT-pruned LLMs in fewer bits (.bbf files).")
    p.add_argument("--version", action="version", version=f"bbformat {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def codec_args(q, default="exact"):
        q.add_argument("--codec", choices=codec_ids(), default=default, help=f"symmetry codec (default {default})")
        q.add_argument("--threshold", type=float, default=None,
                       help="bitsback: correct every decoded value further than this from the original")
        q.add_argument("--dtype", choices=list(WORD_DTYPES), default=None, help="word dtype stored in the file")

    def source_args(q):
        q.add_argument("--slicing-json", default=None, help="SliceGPT slicing config (default: INPUT with .json)")
        q.add_argument("--config", default=None, help="HF config.json of the source model (heads, rope), if the "
                                                      "slicing JSON does not carry a bbformat description")

    q = sub.add_parser("encode", help="SliceGPT checkpoint (.pt or .safetensors + .json) -> .bbf")
    q.add_argument("input")
    q.add_argument("-o", "--output", required=True)
    codec_args(q)
    source_args(q)
    q.add_argument("-q", "--quiet", action="store_true")
    add_storage_args(q, reads=False)
    q.set_defaults(fn=cmd_encode)

    q = sub.add_parser("decode", help=".bbf -> SliceGPT layout .pt (+ .json) or .safetensors (+ .json)")
    q.add_argument("input")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("-q", "--quiet", action="store_true")
    add_storage_args(q)
    q.set_defaults(fn=cmd_decode)

    q = sub.add_parser("verify", help="compare a .bbf with the checkpoint it was made from")
    q.add_argument("input")
    q.add_argument("--against", required=True, help="the original SliceGPT checkpoint")
    source_args(q)
    q.add_argument("--json", action="store_true")
    q.add_argument("-v", "--verbose", action="store_true", help="one line per tensor")
    add_storage_args(q)
    q.set_defaults(fn=cmd_verify)

    q = sub.add_parser("inspect", help="same as bbf-inspect")
    inspect_cmd.add_args(q)
    q.set_defaults(fn=inspect_cmd.run)

    q = sub.add_parser("slice", help="slice a Hugging Face model (dir or .gguf) with SliceGPT's procedure")
    q.add_argument("model")
    q.add_argument("--sparsity", type=float, required=True)
    q.add_argument("--calib", required=True, help="plain-text calibration file")
    q.add_argument("--calib-samples", type=int, default=32)
    q.add_argument("--calib-len", type=int, default=512)
    q.add_argument("--calib-offset", type=int, default=20480,
                   help="first calibration token (default 20480: after the first 20,480 tokens used for eval)")
    q.add_argument("-o", "--output", required=True, help=".bbf (any codec) or SliceGPT .pt / .safetensors")
    codec_args(q)
    q.set_defaults(dtype="float16")
    q.add_argument("-q", "--quiet", action="store_true")
    add_storage_args(q, reads=False)
    q.set_defaults(fn=cmd_slice)

    q = sub.add_parser("eval", help="perplexity of a .bbf (path or URL) or a HF model on a text file")
    q.add_argument("model")
    q.add_argument("--text", required=True)
    q.add_argument("--ctx", type=int, default=512)
    q.add_argument("--stride", type=int, default=None)
    q.add_argument("--max-tokens", type=int, default=None)
    q.add_argument("--tokenizer", default=None, help="HF directory to take the tokenizer from")
    q.add_argument("--json", action="store_true")
    add_storage_args(q)
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("serve", help="serve a directory over HTTP with Range support (127.0.0.1)")
    q.add_argument("directory")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8000)
    q.add_argument("--rate", type=float, default=None, metavar="MB/s", help="total bandwidth cap (1 MB = 10^6 bytes)")
    q.add_argument("--conn-rate", type=float, default=None, metavar="MB/s", help="bandwidth cap of each response")
    q.add_argument("--latency", type=float, default=None, metavar="MS", help="milliseconds before each response")
    q.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.fn(args), "bbf")


if __name__ == "__main__":
    sys.exit(main())

"""`bbf`: encode, decode, verify, inspect, slice, eval, serve.

Building the parser imports nothing heavy (no torch, no codecs, no reader): `bbf --help` answers at once, and each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import BBFError
from . import inspect as inspect_cmd
from .common import CODEC_IDS, EXIT_CODES, WORD_DTYPE_NAMES, add_storage_args, fetch_options, run_cli, \
    storage_options


def _codec(args) -> tuple[str, dict]:
    from ..codecs import get_codec

    params = {}
    if getattr(args, "threshold", None) is not None:
        if args.codec != "bitsback":
            raise BBFError("--threshold only applies to --codec bitsback")
        params["threshold"] = args.threshold
    if getattr(args, "tied_head", None) is not None:
        if args.codec != "exact":
            raise BBFError("--tied-head / --no-tied-head only apply to --codec exact")
        params["tied_head"] = args.tied_head
    get_codec(args.codec, params)  # validate early, before any work
    return args.codec, params


# ---- encode ----------------------------------------------------------------------------------------------
def _checkpoint(args):
    """The SliceGPT checkpoint an encode/verify input names (a file or its directory) and what lies beside it."""
    from ..models.slicegpt_dir import resolve_checkpoint

    return resolve_checkpoint(args.input if args.cmd == "encode" else args.against, args.slicing_json, args.config)


def _tokenizer_aux(tokenizer) -> dict:
    from ..models.hf import tokenizer_bytes
    from ..models.loader import TOKENIZER_AUX, TOKENIZER_MEDIA_TYPE

    return {TOKENIZER_AUX: (tokenizer_bytes(tokenizer), TOKENIZER_MEDIA_TYPE)}


def _grid_decision(desc, tensors, dtype: str, codec: str, keep: bool, metadata: dict) -> str:
    """The dtype to store (SPEC 12.5): a narrower one when it holds every weight exactly, unless `keep`. Says so
    on stderr, even with -q (the file's dtype is not the one asked for), and in the header's metadata."""
    from ..grid import MANTISSA_BITS, survey

    groups = (tensors.read([t.name for t in desc.group_tensors(g)]).values() for g in desc.groups())
    narrow, bits = survey((x for group in groups for x in group), dtype)  # one more read, group by group
    if narrow is not None and not keep:
        print(f"note: every weight is a {narrow} value: storing {narrow} words, not {dtype} (the same values "
              f"without {MANTISSA_BITS[dtype] - MANTISSA_BITS[narrow]} empty mantissa bits; --keep-dtype stores "
              f"{dtype})", file=sys.stderr)
        metadata["requested_dtype"] = dtype
        return narrow
    if 0 < bits < MANTISSA_BITS[dtype]:
        what = {"exact": "exact rounds its canonical form to that grid, so the zeros stay",
                "raw": "raw stores them as they are",
                "bitsback": "warning: bitsback's rotations fill them with rounding noise, so this file may be larger "
                            "than --codec raw's"}[codec]
        print(f"note: the low {bits} mantissa bits of every {dtype} word are zero; {what}", file=sys.stderr)
    return dtype


def cmd_encode(args) -> int:
    from ..container.writer import save
    from ..models.slicegpt_dir import load_tokenizer
    from ..models.slicegpt_io import open_slicegpt
    from ..words import dtype_name

    codec, params = _codec(args)
    ck = _checkpoint(args)
    tok_src = args.tokenizer or ck.tokenizer
    tokenizer = load_tokenizer(tok_src) if tok_src is not None and not args.no_tokenizer else None
    desc, tensors = open_slicegpt(ck.path, ck.json_path, ck.config)  # read group by group while encoding
    dtype = args.dtype or dtype_name(next(iter(tensors.meta().values())).dtype)
    metadata = {"source": ck.path.name}
    dtype = _grid_decision(desc, tensors, dtype, codec, args.keep_dtype, metadata)
    t0 = time.perf_counter()
    save(tensors, args.output, model=desc, codec=codec, codec_params=params, dtype=dtype,
         metadata=metadata, aux=_tokenizer_aux(tokenizer) if tokenizer is not None else None,
         storage_options=storage_options(args), progress=not args.quiet, workers=args.workers,
             compression=args.compression)
    if not args.quiet:
        tok = f"tokenizer from {tok_src}" if tokenizer is not None else "no tokenizer (none beside the input; " \
            "--tokenizer DIR_OR_GGUF adds one)"
        print(f"wrote {args.output} ({codec}, {dtype}, {tok}) in {time.perf_counter() - t0:.1f} s")
    return 0


# ---- decode ----------------------------------------------------------------------------------------------
def cmd_decode(args) -> int:
    from ..container.reader import BBFReader
    from ..models.loader import TOKENIZER_AUX
    from ..models.slicegpt_dir import write_beside
    from ..models.slicegpt_io import description_path, save_slicegpt

    if not args.output.endswith((".pt", ".safetensors")):
        raise BBFError("-o must end in .pt (SliceGPT layout) or .safetensors")
    with BBFReader(args.input, storage_options(args), fetch=fetch_options(args)) as f:
        tensors = f.load_all()
        desc, dtype = f.model, f.dtype
        wanted = (f.header.get("metadata") or {}).get("requested_dtype")
        if wanted in WORD_DTYPE_NAMES and wanted != dtype:  # bbf encode narrowed it (SPEC 12.5): the same values
            from ..words import torch_dtype

            tensors, dtype = {k: v.to(torch_dtype(wanted)) for k, v in tensors.items()}, wanted
        tokenizer = None
        if TOKENIZER_AUX in f.aux_names():
            from ..models.hf import tokenizer_from_bytes

            tokenizer = tokenizer_from_bytes(f.aux(TOKENIZER_AUX))
    ckpt, js = save_slicegpt(desc, tensors, args.output)
    extra = write_beside(ckpt, desc, tokenizer, dtype)
    if not args.quiet:
        names = ", ".join(p.name for p in extra)
        print(f"wrote {ckpt}, {js} (SliceGPT's slicing config), {description_path(ckpt).name} (bbformat's "
              f"description)" + (f" and {names}" if names else ""))
    return 0


# ---- verify ----------------------------------------------------------------------------------------------
def canonical_words(desc, tensors, codec, dtype):
    """Run the file's codec encoder over the original: the canonical words the decoder must reproduce."""
    enc = codec.encoder(desc, dtype)
    enc.ahead({n: tensors[n] for n in enc.wants_ahead()})
    for group in desc.groups():
        yield group, enc.encode(group, {t.name: tensors[t.name] for t in desc.group_tensors(group)}).canonical


def cmd_verify(args) -> int:
    import numpy as np
    import torch

    from ..container.reader import BBFReader
    from ..models.slicegpt_io import load_slicegpt
    from ..words import words_to_f64

    ck = _checkpoint(args)  # a missing --against is named before the .bbf is opened
    with BBFReader(args.input, storage_options(args), fetch=fetch_options(args)) as f:
        desc, tensors = load_slicegpt(ck.path, ck.json_path, ck.config)
        if desc.tensors() != f.model.tensors():
            raise BBFError(f"{args.against} does not have the layout of {args.input}")
        tau = float(f.codec.params().get("threshold", 0.0))
        rows, worst = [], 0.0
        from tqdm.auto import tqdm

        n = len(desc.groups())
        bar = dict(total=n, unit="group", file=sys.stderr, leave=False, disable=args.quiet)  # stdout: the result
        decoded_groups = dict(tqdm(f.stream(), desc="decode", **bar))
        for group, canon in tqdm(canonical_words(desc, tensors, f.codec, f.dtype), desc="compare", **bar):
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
    from ..container.writer import save
    from ..evaluate import tokenize_text
    from ..models.hf import load_hf, tokenizer_bytes
    from ..models.loader import TOKENIZER_AUX, TOKENIZER_MEDIA_TYPE
    from ..models.slicegpt_io import save_slicegpt
    from ..models.slicer import slice_model
    from ..words import WORD_DTYPES

    if not 0 <= args.sparsity < 1:
        raise BBFError("--sparsity must be in [0, 1)")
    if args.calib_offset < 0 or args.calib_samples < 1 or args.calib_len < 2:
        raise BBFError("need --calib-offset >= 0, --calib-samples >= 1 and --calib-len >= 2")
    if not Path(args.calib).is_file():
        raise BBFError(f"calibration text {args.calib} does not exist")
    pt_out = args.output.endswith((".pt", ".safetensors"))
    if not pt_out:
        _codec(args)  # a bad codec is refused before the model is loaded
    model, tokenizer, _ = load_hf(args.model)
    if tokenizer is None:
        raise BBFError(f"{args.model} has no tokenizer to read the calibration text with")
    ids = tokenize_text(tokenizer, args.calib)
    start = args.calib_offset
    n = args.calib_samples * args.calib_len
    if ids.numel() < start + n:
        raise BBFError(f"{args.calib} has {ids.numel():,} tokens; calibration needs {start + n:,} (--calib-offset "
                       f"{start} + --calib-samples {args.calib_samples} x --calib-len {args.calib_len})")
    calib = ids[start: start + n].reshape(args.calib_samples, args.calib_len)
    dtype = args.dtype
    desc, tensors = slice_model(model, calib, args.sparsity, dtype=WORD_DTYPES[dtype][0], progress=not args.quiet)
    del model
    if "://" not in args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if pt_out:  # a SliceGPT directory: checkpoint, slicing config, HF config.json, tokenizer files
        from ..models.slicegpt_dir import write_beside

        ckpt, _ = save_slicegpt(desc, tensors, args.output)
        write_beside(ckpt, desc, tokenizer, dtype)
    else:
        codec, params = _codec(args)
        meta = {"source": str(args.model), "sparsity": str(args.sparsity), "calibration":
                f"{Path(args.calib).name} tokens {start}..{start + n}"}
        save(tensors, args.output, model=desc, codec=codec, codec_params=params, dtype=dtype, metadata=meta,
             aux={TOKENIZER_AUX: (tokenizer_bytes(tokenizer), TOKENIZER_MEDIA_TYPE)},
             storage_options=storage_options(args), progress=not args.quiet, workers=args.workers,
             compression=args.compression)
    if not args.quiet:
        print(f"wrote {args.output}: {desc.num_params():,} parameters after slicing at {args.sparsity:.0%}")
    return 0


# ---- eval ------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from ..evaluate import perplexity, tokenize_text

    # the arguments are checked before the model is loaded
    stride = args.stride or args.ctx
    if args.ctx < 2 or not 0 < stride <= args.ctx:
        raise BBFError(f"need --ctx >= 2 and 0 < --stride <= --ctx, got ctx {args.ctx}, stride {stride}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise BBFError("--max-tokens must be at least 2")
    if not Path(args.text).is_file():
        raise BBFError(f"text file {args.text} does not exist")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise BBFError(f"tokenizer source {args.tokenizer} does not exist")
    if not ("://" in args.model or Path(args.model).exists()):
        raise BBFError(f"model {args.model} does not exist")
    t0 = time.perf_counter()
    model, tokenizer = _load_any(args.model, args)
    if args.tokenizer:
        from ..models.slicegpt_dir import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise BBFError(f"{args.model} carries no tokenizer; pass --tokenizer DIR_OR_GGUF")
    ids = tokenize_text(tokenizer, args.text, max_tokens=args.max_tokens)
    load_s = time.perf_counter() - t0
    if hasattr(model, "generation_config"):  # a transformers model: windows need no KV cache
        model.config.use_cache = False
    ppl = perplexity(model, ids, ctx=args.ctx, stride=stride, progress=not args.quiet)  # progress: on stderr
    result = {"model": args.model, "text": args.text, "tokens": int(ids.numel()), "ctx": args.ctx,
              "stride": stride, "perplexity": ppl, "load_seconds": round(load_s, 2),
              "eval_seconds": round(time.perf_counter() - t0 - load_s, 2)}
    print(json.dumps(result) if args.json else
          f"perplexity {ppl:.2f} on {result['tokens']:,} tokens of {Path(args.text).name} "
          f"(ctx {args.ctx}, stride {result['stride']}); load {load_s:.1f} s")
    return 0


def _load_any(model: str, args):
    """A .bbf (path or URL) or a save_pretrained directory -> SlicedForCausalLM; a HF dir / .gguf -> the HF model."""
    if model.endswith(".gguf") or (Path(model).is_dir() and not (Path(model) / "model.bbf").is_file()):
        from ..models.hf import load_hf

        m, tok, _ = load_hf(model)
        return m, tok
    from ..models.loader import load_pretrained

    return load_pretrained(model, storage_options(args), progress=not getattr(args, "quiet", False),
                           fetch=fetch_options(args))


# ---- serve -----------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from ..serve import start_server

    rate = args.rate * 1e6 if args.rate else None  # MB/s -> bytes/s
    conn_rate = args.conn_rate * 1e6 if args.conn_rate else None
    latency = args.latency / 1e3 if args.latency else None  # ms -> s
    if not Path(args.directory).is_dir():
        raise BBFError(f"cannot serve {args.directory}: no such directory")
    try:
        server, url = start_server(args.directory, args.host, args.port, rate=rate, conn_rate=conn_rate,
                                   latency=latency)
    except OSError as e:
        raise _listen_error(args.host, args.port, e) from None
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


def _listen_error(host: str, port: int, e: OSError) -> BBFError:
    import errno

    if e.errno == errno.EADDRINUSE:
        return BBFError(f"port {port} on {host} is already in use (another server?); pick another with --port, "
                        "or --port 0 for any free port")
    return BBFError(f"cannot listen on {host}:{port}: {e.strerror or e}")


# ---- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bbf", description="Store SliceGPT-pruned LLMs in fewer bits (.bbf files).",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"bbformat {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def codec_args(q, default="exact", dtype_default=None):
        q.add_argument("--codec", choices=CODEC_IDS, default=default, help=f"symmetry codec (default {default})")
        q.add_argument("--threshold", type=float, default=None,
                       help="bitsback: correct every decoded value further than this from the original "
                            "(default: the codec's, 0.005)")
        q.add_argument("--tied-head", action=argparse.BooleanOptionalAction, default=None,
                       help="exact: store the head as residuals against the embeddings (SPEC 12.6; default: when "
                            "the source model tied them and they still follow from each other)")
        q.add_argument("--dtype", choices=WORD_DTYPE_NAMES, default=dtype_default,
                       help="word dtype stored in the file (default " +
                            (dtype_default or "the checkpoint's dtype") + ")")
        q.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes for the entropy stage, which then overlaps the next groups' rotations "
                            "(default 1: all in this process; the file is the same for any N)")
        q.add_argument("--compression", choices=("auto", "small", "none"), default="auto",
                       help="entropy stage: auto (method 1, fast to decode), small (also tries method 2: ~0.5 %% of "
                            "the model smaller, ~4x slower to decode; for archives), none (default auto)")

    def source_args(q):
        q.add_argument("--slicing-json", default=None,
                       help="SliceGPT slicing config (default: the checkpoint's name with .json)")
        q.add_argument("--config", default=None,
                       help="HF config.json of the source model, for heads and rope when no bbformat description "
                            "is beside the checkpoint (default: the config.json beside it, if any)")

    def quiet(q, what="the progress bars and the summary line"):
        q.add_argument("-q", "--quiet", action="store_true", help=f"suppress {what} (default: shown)")

    checkpoint_help = ("SliceGPT checkpoint: <name>_<sparsity>.pt or .safetensors (or a sharded "
                       "<name>.safetensors.index.json) with its <name>.json, or the directory SliceGPT saved it in "
                       "(with its config.json and tokenizer files); read one group at a time")
    q = sub.add_parser("encode", help="SliceGPT checkpoint (.pt or .safetensors + .json, or its directory) -> .bbf")
    q.add_argument("input", help=checkpoint_help)
    q.add_argument("-o", "--output", required=True, help="the .bbf to write, a path or URL (required)")
    codec_args(q)
    source_args(q)
    q.add_argument("--tokenizer", default=None, metavar="DIR_OR_GGUF",
                   help="store this tokenizer in the file: a directory with tokenizer files or a .gguf (default: "
                        "the tokenizer files beside the checkpoint, if any)")
    q.add_argument("--no-tokenizer", action="store_true", help="store no tokenizer (default: store one if found)")
    q.add_argument("--keep-dtype", action="store_true",
                   help="store --dtype words even when every weight fits a narrower dtype exactly, e.g. float16 "
                        "values in float32 words (default: store the narrower dtype, and say so)")
    quiet(q)
    add_storage_args(q, reads=False)
    q.set_defaults(fn=cmd_encode)

    q = sub.add_parser("decode", help=".bbf -> SliceGPT layout: .pt or .safetensors, its .json, config.json and "
                                      "tokenizer files")
    q.add_argument("input", help=".bbf path or URL")
    q.add_argument("-o", "--output", required=True,
                   help="<name>_<sparsity>.pt (SliceGPT layout) or .safetensors; beside it go SliceGPT's slicing "
                        "config (.json), bbformat's description (.bbformat.json) and, where absent, the HF "
                        "config.json and the tokenizer files (required)")
    quiet(q, "the summary line")
    add_storage_args(q)
    q.set_defaults(fn=cmd_decode)

    q = sub.add_parser("verify", help="compare a .bbf with the checkpoint it was made from")
    q.add_argument("input", help=".bbf path or URL")
    q.add_argument("--against", required=True, help="the original " + checkpoint_help + " (required)")
    source_args(q)
    q.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    q.add_argument("-v", "--verbose", action="store_true",
                   help="one line per tensor (default: only tensors with errors, at most 20)")
    quiet(q, "the progress bars (on stderr)")
    add_storage_args(q)
    q.set_defaults(fn=cmd_verify)

    q = sub.add_parser("inspect", help="same as bbf-inspect")
    inspect_cmd.add_args(q)
    q.set_defaults(fn=inspect_cmd.run)

    q = sub.add_parser("slice", help="slice a Hugging Face model (dir or .gguf) with SliceGPT's procedure")
    q.add_argument("model", help="Hugging Face model directory (with config.json) or .gguf file")
    q.add_argument("--sparsity", type=float, required=True,
                   help="fraction of the hidden width removed, in [0, 1) (required)")
    q.add_argument("--calib", required=True, help="plain-text calibration file, UTF-8 (required)")
    q.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    q.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    q.add_argument("--calib-offset", type=int, default=0,
                   help="first calibration token of the text (default 0; e.g. 20480 keeps the first 20,480 tokens "
                        "out of calibration, to evaluate on them)")
    q.add_argument("-o", "--output", required=True,
                   help="the output (required): a .bbf (any codec; the tokenizer goes inside) or a SliceGPT .pt / "
                        ".safetensors (its .json, config.json and tokenizer files go beside it)")
    codec_args(q, dtype_default="float16")
    quiet(q)
    add_storage_args(q, reads=False)
    q.set_defaults(fn=cmd_slice)

    q = sub.add_parser("eval", help="perplexity of a .bbf (path or URL) or a HF model on a text file")
    q.add_argument("model", help=".bbf path or URL, a save_pretrained directory, a HF model directory or a .gguf")
    q.add_argument("--text", required=True, help="plain-text file, UTF-8 (required)")
    q.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    q.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --ctx)")
    q.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens (default: all)")
    q.add_argument("--tokenizer", default=None, metavar="DIR_OR_GGUF",
                   help="take the tokenizer from here (default: the one the model carries)")
    q.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (progress stays on stderr; default: one line)")
    quiet(q, "the progress bars (on stderr)")
    add_storage_args(q)
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("serve", help="serve a directory over HTTP with Range support (127.0.0.1)")
    q.add_argument("directory", help="directory to serve")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    q.add_argument("--rate", type=float, default=None, metavar="MB/s",
                   help="total bandwidth cap, 1 MB = 10^6 bytes (default: none)")
    q.add_argument("--conn-rate", type=float, default=None, metavar="MB/s",
                   help="bandwidth cap of each response (default: none)")
    q.add_argument("--latency", type=float, default=None, metavar="MS",
                   help="milliseconds before each response (default: none)")
    q.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.fn(args), "bbf")


if __name__ == "__main__":
    sys.exit(main())

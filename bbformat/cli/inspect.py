"""`bbf-inspect FILE_OR_URL [--json] [--stages N]`: what a .bbf holds, where its bytes went, and what each of N
pipeline stages would fetch."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from .common import EXIT_CODES, add_storage_args, fetch_options, run_cli, storage_options

if TYPE_CHECKING:  # the reader (numpy, torch) is imported when a file is read, not to parse the arguments
    from ..container.reader import BBFReader


def summarize(f: BBFReader, check: bool = True) -> dict[str, Any]:
    """Everything bbf-inspect prints, as one JSON-able dict."""
    from ..container.layout import COMPRESSIONS
    from ..words import word_bits

    m, h = f.model, f.header
    ws = word_bits(f.dtype) // 8
    plain = sum(t.numel for t in m.tensors()) * ws
    ok = dict((r.index, good) for r, good in f.verify_checksums()) if check else {}
    rows, model_raw, model_stored, corrections = [], 0, 0, 0
    tied = bool(f.codec.params().get("tied_head"))
    head_raw = head_stored = 0  # the tied head's sections (SPEC 12.6): not symmetry coding, reported apart
    for r in f.sections:
        rows.append({"index": r.index, "kind": r.kind, "block": r.block if r.block >= 0 else None,
                     "offset": r.offset, "stored": r.stored_len, "raw": r.raw_len,
                     "ratio": round(r.stored_len / r.raw_len, 4) if r.raw_len else None,
                     "compression": COMPRESSIONS[r.compression],
                     "corrections": r.corrections, "checksum_ok": ok.get(r.index)})
        if r.kind != "aux":
            model_raw += r.raw_len
            model_stored += r.stored_len
            corrections += r.corrections
        if tied and r.kind in ("head", "correction") and r.block < 0:
            head_raw, head_stored = head_raw + r.raw_len, head_stored + r.stored_len
    theoretical = sum(s.free_params for s in f.codec.symmetries_removed(m))
    head_plain = sum(t.numel for t in m.group_tensors("head")) * ws if tied else 0
    # whole words (plain and the raw lengths are multiples of ws, the tied head's aside)
    saved_words = (plain - head_plain - (model_raw - head_raw)) // ws
    return {
        "file": f.url,
        "format_version": h["format_version"],
        "producer": h.get("producer"),
        "model": {"family": m.family, "hidden_size": m.hidden_size, "layers": m.num_layers,
                  "vocab_size": m.vocab_size, "heads": m.num_heads, "kv_heads": m.num_kv_heads,
                  "intermediate_size": m.intermediate_size, "params": m.num_params(),
                  "widths": {"attn_input": list(m.attn_input_dims), "attn_output": list(m.attn_output_dims),
                             "mlp_output": list(m.mlp_output_dims)}},
        "dtype": f.dtype,
        "codec": {"id": h["codec"]["id"], "params": h["codec"].get("params", {})},
        "aux": f.aux_names(),
        "sections": rows,
        "totals": {
            "file_bytes": f.store.size,
            "plain_bytes": plain,
            "model_raw_bytes": model_raw,
            "model_stored_bytes": model_stored,
            "corrections": corrections,
            "saved_bytes": plain - f.store.size,
            "saved_percent": round(100 * (plain - f.store.size) / plain, 3) if plain else 0.0,
            "symmetry_saved_words": saved_words,
            "symmetry_theoretical_words": theoretical,
            "symmetry_saved_fraction": round(saved_words / theoretical, 5) if theoretical else None,
            "bits_per_weight": round(8 * f.store.size / (plain / ws), 4) if plain else None,
            "checksums_ok": all(ok.values()) if check else None,
        },
        "tied_head": {"columns": m.embedding_dims[0], "plain_bytes": head_plain, "raw_bytes": head_raw,
                      "stored_bytes": head_stored} if tied else None,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return str(n)


def render(s: dict[str, Any]) -> str:
    m, t = s["model"], s["totals"]
    out = [f"{s['file']}: bbf {s['format_version']} ({s['producer']}), codec {s['codec']['id']} "
           f"{s['codec']['params'] or ''}, words {s['dtype']}",
           f"model: {m['family']}, {m['layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, "
           f"heads {m['heads']}/{m['kv_heads']}, vocab {m['vocab_size']}, {m['params']:,} parameters"]
    if s["aux"]:
        out.append(f"aux: {', '.join(s['aux'])}")
    out.append("")
    out.append(f"{'#':>4} {'kind':<10} {'block':>5} {'offset':>12} {'stored':>12} {'raw':>12} {'ratio':>6} "
               f"{'corr':>6} {'crc':>4}")
    for r in s["sections"]:
        crc = {True: "ok", False: "BAD", None: "-"}[r["checksum_ok"]]
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        blk = "" if r["block"] is None else r["block"]
        out.append(f"{r['index']:>4} {r['kind']:<10} {blk:>5} {r['offset']:>12,} {r['stored']:>12,} "
                   f"{r['raw']:>12,} {ratio:>6} {r['corrections']:>6} {crc:>4}")
    out.append("")
    out.append(f"file {_fmt_bytes(t['file_bytes'])} vs plain array layout {_fmt_bytes(t['plain_bytes'])} "
               f"(sum of numel x word size): saved {_fmt_bytes(t['saved_bytes'])} = {t['saved_percent']:.2f}%, "
               f"{t['bits_per_weight']:.3f} bits per weight")
    if t["symmetry_theoretical_words"]:
        out.append(f"symmetry coding: {t['symmetry_saved_words']:,.0f} words saved before entropy coding, "
                   f"{100 * t['symmetry_saved_fraction']:.2f}% of the theoretical sum k(k-1)/2 = "
                   f"{t['symmetry_theoretical_words']:,} words; {t['corrections']:,} corrections")
    if s.get("tied_head"):
        th = s["tied_head"]
        out.append(f"tied head (SPEC 12.6): its first {th['columns']} columns are residuals against the embeddings; "
                   f"the head takes {_fmt_bytes(th['stored_bytes'])} of its {_fmt_bytes(th['plain_bytes'])}")
    if t["checksums_ok"] is not None:
        out.append("checksums: " + ("all ok" if t["checksums_ok"] else "MISMATCH"))
    if "stages" in s:
        out.append("")
        out.append(f"{len(s['stages'])} pipeline stages (bbformat.pipeline_stage; each also reads the suffix at open):")
        for r in s["stages"]:
            a, b = r["layers"]
            parts = (["embed"] if "embed" in r["groups"] else []) + [f"blocks {a}..{b - 1}"] + \
                (["head"] if "head" in r["groups"] else [])
            also = f" (also reads {', '.join(r['also_fetches'])}: the tied head needs it)" if r.get("also_fetches") else ""
            out.append(f"  rank {r['rank']:>3}: {' + '.join(parts)}: {_fmt_bytes(r['stored_bytes'])}{also}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bbf-inspect", description="Show what a .bbf file holds and where its bytes went.",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="path or URL (file://, http(s)://, s3://, memory://)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (default: the table)")
    p.add_argument("--no-check", action="store_true",
                   help="do not read every section to verify checksums (default: every section is read and checked)")
    p.add_argument("--stats", action="store_true",
                   help="also print what reading cost: requests (retries included), retries, bytes, seconds "
                        "(default: not printed)")
    p.add_argument("--stages", type=int, metavar="N",
                   help="also show how N pipeline stages (ranks) split the blocks, and the stored bytes each fetches "
                        "(default: not shown)")
    add_storage_args(p)


def run(args: argparse.Namespace) -> int:
    from ..container.reader import BBFReader

    with BBFReader(args.file, storage_options(args), fetch=fetch_options(args)) as f:
        s = summarize(f, check=not args.no_check)
        if args.stages is not None:
            from ..models.stage import stage_plan

            s["stages"] = stage_plan(f, args.stages)
        if args.stats:
            s["io"] = f.stats
    text = render(s)
    if args.stats:
        io = s["io"]
        rate = f" ({io['mb_per_s']:,.1f} MB/s)" if io["mb_per_s"] else ""
        text += (f"\nio: {io['requests']} requests, {io['retries']} retries, {_fmt_bytes(io['bytes'])} in "
                 f"{io['seconds']:.3f} s with a request in flight{rate}")
    print(json.dumps(s) if args.json else text)
    return 0 if s["totals"]["checksums_ok"] in (True, None) else 1


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(build_parser().parse_args(argv)), "bbf-inspect")


if __name__ == "__main__":
    sys.exit(main())

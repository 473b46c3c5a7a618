#!/usr/bin/env python
"""The fuzz suite of tests/test_fuzz.py with a larger budget: counts per outcome class.

    .venv/bin/python tools/fuzz.py -n 50000                # structured sweep + 50,000 random mutants
    .venv/bin/python tools/fuzz.py -n 200000 --jobs 2 --json counts.json --save failures/

Each mutant is a small valid .bbf (every codec, both families, every word dtype, both compression methods, aux
sections, bitsback corrections) changed in one way (bbformat/fuzz.py: bytes, preamble, footer, index and header
fields, header bytes, sections, swaps, the dtype swap), then read the way every command reads it: bbf-inspect's
summary with every checksum, bbf decode's JSON, every tensor, every aux blob. Outcome classes: `identical`,
`rewritten` (the mutation rewrote data and checksum together), a BBFError subclass, or FAIL-* (a bug: a Python
exception that is not a BBFError, or different data with no checksum rewritten). Exit status 1 if any FAIL.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bbformat import fuzz  # noqa: E402

_BASES: dict[str, fuzz.Base] = {}


def _init() -> None:
    if not _BASES:
        _BASES.update({n: fuzz.Base.from_bytes(n, d) for n, d in fuzz.base_files().items()})


def _work(job: tuple[str, int, int, int]) -> tuple[collections.Counter, collections.Counter, list, list]:
    """(phase, seed, start, count) -> (outcomes, (kind, outcome) counts, failures, slowest)."""
    _init()
    phase, seed, start, count = job
    names = sorted(_BASES)
    outcomes, by_kind, failures, slow = collections.Counter(), collections.Counter(), [], []
    if phase == "sweep":
        base = _BASES[names[start]]
        muts = [(base, m) for m in fuzz.sweep(base)]
    else:
        rng = random.Random(seed * 1_000_003 + start)
        muts = []
        for i in range(count):
            base = _BASES[names[(start + i) % len(names)]]
            muts.append((base, fuzz.random_mutation(rng, base)))
    for base, m in muts:
        r = fuzz.run(m, base)
        outcomes[r.outcome] += 1
        by_kind[(m.kind, r.outcome)] += 1
        slow.append((r.seconds, base.name, str(m)))
        if r.outcome.startswith("FAIL"):
            failures.append({"base": base.name, "mutation": str(m), "outcome": r.outcome, "detail": r.detail,
                             "data": fuzz.apply(m, base).hex() if len(base.data) < 1 << 20 else None})
    slow = sorted(slow, reverse=True)[:5]
    return outcomes, by_kind, failures, slow


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--mutants", type=int, default=50_000, help="random mutants (default 50,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sweep", action="store_true", help="skip the structured sweep (~19,000 mutants)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the counts as JSON ('-': to stdout)")
    p.add_argument("--save", metavar="DIR", help="write every failing mutant (reproducer) into DIR")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    _init()
    jobs = [] if args.no_sweep else [("sweep", args.seed, i, 0) for i in range(len(_BASES))]
    step = 2000
    jobs += [("random", args.seed, a, min(step, args.mutants - a)) for a in range(0, args.mutants, step)]
    totals = {"sweep": collections.Counter(), "random": collections.Counter()}
    by_kind, failures, slow = collections.Counter(), [], []
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = pool.imap(_work, jobs)
            results = list(zip(jobs, results))
    else:
        results = [(j, _work(j)) for j in jobs]
    for (phase, *_), (o, k, f, s) in results:
        totals[phase].update(o)
        by_kind.update(k)
        failures += f
        slow += s
    seconds = time.perf_counter() - t0
    all_counts = totals["sweep"] + totals["random"]
    n = sum(all_counts.values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kinds = sorted({k for k, _ in by_kind})
    classes = sorted({c for _, c in by_kind}, key=lambda c: -all_counts[c])

    print(f"{n:,} mutants of {len(_BASES)} base files ({', '.join(sorted(_BASES))}) in {seconds:.0f} s "
          f"({1e3 * seconds / max(n, 1):.2f} ms each), peak RSS of the main process {rss:.0f} MB\n")
    print(fuzz.summary(all_counts))
    for phase in ("sweep", "random"):
        if totals[phase]:
            print(f"\n{phase}: " + ", ".join(f"{c} {v:,}" for c, v in totals[phase].most_common()))
    print("\nby mutation kind:")
    w = max(map(len, classes))
    print(f"{'kind':<13}" + "".join(f"{c:>{max(w, 9) + 1}}" for c in classes))
    for k in kinds:
        print(f"{k:<13}" + "".join(f"{by_kind[(k, c)]:>{max(w, 9) + 1},}" for c in classes))
    print("\nslowest: " + "; ".join(f"{s * 1e3:.0f} ms {b} {m[:70]}" for s, b, m in sorted(slow, reverse=True)[:3]))
    if failures:
        print(f"\n{len(failures)} FAILURES, e.g.:")
        for f in failures[:10]:
            print(f"  {f['base']} {f['mutation']}: {f['outcome']} {f['detail'].splitlines()[0][:200]}")
    if args.save and failures:
        d = Path(args.save)
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(failures):
            if f["data"]:
                (d / f"fail-{i:04d}.bbf").write_bytes(bytes.fromhex(f["data"]))
            (d / f"fail-{i:04d}.txt").write_text(f"{f['base']}\n{f['mutation']}\n{f['outcome']}\n{f['detail']}\n")
    if args.json:
        doc = {"mutants": n, "seconds": round(seconds, 1), "seed": args.seed, "bases": sorted(_BASES),
               "outcomes": dict(all_counts.most_common()), "sweep": dict(totals["sweep"]),
               "random": dict(totals["random"]),
               "by_kind": {k: {c: by_kind[(k, c)] for c in classes if by_kind[(k, c)]} for k in kinds},
               "failures": [{k: v for k, v in f.items() if k != "data"} for f in failures]}
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

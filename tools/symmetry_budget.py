"""What the symmetries no codec removes yet could save (issue 13's optional point), next to what `exact` removes.

For each model shape (SliceGPT-sliced at --sparsity): the model's words; the words `exact` drops today (a
triangle of k(k-1)/2 per residual-stream symmetry with a carrier, SPEC 12); and per further symmetry
(`bbformat/models/further_symmetries.py`, where each is applied and tested to leave the logits unchanged) the
words an `exact`-style triangle would drop (its orthogonal part), the degrees of freedom of the whole continuous
group, and for the permutations the bits bits-back coding could give back. Percentages are of the model's words.
Counts only: no codec removes these, so no file was written to measure them.

    .venv/bin/python tools/symmetry_budget.py [--models smollm2-135m opt-125m llama2-7b] [--sparsity 0.25]
                                              [--json out/symmetry_budget.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from bbformat.codecs import get_codec  # noqa: E402
from bbformat.models.further_symmetries import budget  # noqa: E402
from bbformat.models.synthetic import example_desc  # noqa: E402


def rows_for(name: str, sparsity: float) -> list[dict]:
    desc = example_desc(name, sparsity)
    total = desc.num_params()
    codec = get_codec("exact", {"tied_head": False})
    removed = codec.symmetries_removed(desc)
    today = sum(s.free_params for s in removed)
    rows = [{"model": name, "symmetry": "exact today (residual stream)", "orth": today, "full": today,
             "orth_pct": 100 * today / total, "full_pct": 100 * today / total, "bits_kb": None,
             "note": f"{len(removed)} symmetries, {total:,} words"}]
    for b in budget(desc):
        rows.append({"model": name, "symmetry": b.name, "orth": b.words_orthogonal, "full": b.words_full,
                     "orth_pct": 100 * b.words_orthogonal / total, "full_pct": 100 * b.words_full / total,
                     "bits_kb": b.bits / 8 / 1024 if b.bits else None, "note": b.note})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "opt-125m", "llama2-7b"])
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = [r for m in a.models for r in rows_for(m, a.sparsity)]
    print(f"Further symmetries at {a.sparsity:.0%} slicing (words; % of the model's words)\n")
    print(markdown_table(rows, [("model", "model", ""), ("symmetry", "symmetry", ""),
                                ("orth", "triangle words", ","), ("orth_pct", "%", ".3f"),
                                ("full", "group dof", ","), ("full_pct", "%", ".3f"),
                                ("bits_kb", "bits-back KiB", ".1f"), ("note", "note", "")]))
    write_json(a.json, rows)


if __name__ == "__main__":
    main()

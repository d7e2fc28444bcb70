"""Two models of a finished `satori run`, compared seed by seed on the same test problems.

Not a speed benchmark: whether a difference in greedy pass@1 is larger than the evaluation's own
noise. For each seed it reads both models' greedy answers (``RUN/eval_MODEL-sS/test_samples.jsonl``)
and prints the difference with its standard error over problems
(:func:`satori.report.paired_accuracy_difference`) and how many problems only one of the two got
right; then the mean and std of the differences over seeds (the spread between seeds, which the
per-problem error does not contain).

    .venv/bin/python benchmarks/paired_answers.py runs/full rl_round1 sft_coat
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from satori.data import read_jsonl
from satori.report import mean_std, paired_accuracy_difference


def greedy_correct(path: Path) -> dict[str, bool]:
    """``{problem id: greedy answer right}`` of one evaluation."""
    return {r["id"]: bool(r["greedy"]["correct"]) for r in read_jsonl(path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished `satori run` folder")
    ap.add_argument("a", help="model A (a stage name: rl_round1, sft_coat, distilled, ...)")
    ap.add_argument("b", help="model B")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    print(f"| seed | problems | {args.a} (%) | {args.b} (%) | A − B (points, ± SE over problems) "
          f"| right only in A / only in B |\n|---|---|---|---|---|---|")
    diffs = []
    for seed in args.seeds.split(","):
        paths = [args.run / f"eval_{m}-s{seed}" / "test_samples.jsonl" for m in (args.a, args.b)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            sys.exit(f"{', '.join(missing)}: not found; give a run folder whose evaluations of both models finished")
        a, b = (greedy_correct(p) for p in paths)
        ids = [i for i in a if i in b]
        d = paired_accuracy_difference([a[i] for i in ids], [b[i] for i in ids])
        diffs.append(d["diff"])
        print(f"| {seed} | {d['n']} | {100 * sum(a[i] for i in ids) / d['n']:.2f} "
              f"| {100 * sum(b[i] for i in ids) / d['n']:.2f} | {100 * d['diff']:+.2f} ± {100 * d['se']:.2f} "
              f"| {d['a_only']} / {d['b_only']} |")
    mean, std = mean_std(diffs)
    print(f"\nover {len(diffs)} seed(s): {100 * mean:+.2f} ± {100 * std:.2f} points (mean ± std of the differences)")


if __name__ == "__main__":
    main()

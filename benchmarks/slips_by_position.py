"""Do the steps after a check slip more, and why? Slip rates of the models of a finished `satori run`
by where a step starts in the response, with and without a check earlier in it.

Not a speed benchmark: a diagnostic for issue 4. A reflection that lets a right line stand counts as
right → wrong (T→F) when a later step slips, so the F→T share of reflected answers depends on how
well a model goes on after its checks. For every step that adds the next step to a right line of
reasoning (:func:`satori.testbed.checker.new_step_outcomes`; a redone step does not count), over the
sampled test answers (``--greedy``: the greedy ones) of ``RUN/eval_MODEL-sS/test_samples.jsonl``,
it counts the steps and the wrong ones per bucket of ``--bucket`` characters of the response before
the step, apart for steps with and without a ``<|reflect|>`` earlier in the response. If the two
agree within a bucket, a check costs the steps after it what the length it adds costs and no more.
Then the reasons of the wrong steps per bucket (all steps): arithmetic, or the step's operation or
operand not the question's next one, or an extra step past its last (the model lost its place).

    .venv/bin/python benchmarks/slips_by_position.py runs/full sft_coat rl_round1 --seeds 0,1,2
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from _common import run_models_parser, test_problems, test_samples
from satori.data import read_jsonl
from satori.testbed.checker import new_step_outcomes

REASONS = ("wrong arithmetic", "wrong operation", "wrong operand", "wrong previous value", "extra step")


def count(path: Path, bucket: int, greedy: bool) -> Counter:
    """``(bucket, checked?, "n" | "slip")`` and ``(bucket, reason)`` counts over one evaluation file."""
    records = list(read_jsonl(path))
    problems = test_problems(records)
    c: Counter = Counter()
    for record in records:
        problem = problems[record["id"]]
        if problem.question != record["question"]:
            sys.exit(f"{path}: problem {record['id']} is not the test split's (another seed or generator?)")
        for sample in [record["greedy"]] if greedy else record.get("samples", []):
            for start, checked, why in new_step_outcomes(problem, sample["text"]):
                b = start // bucket
                c[b, checked, "n"] += 1
                c[b, checked, "slip"] += bool(why)
                if why:
                    c[b, next(r for r in REASONS if why.startswith(r))] += 1
    return c


def pct(num: int, den: int) -> str:
    return f"{100 * num / den:.1f}" if den else "–"


def main() -> None:
    ap = run_models_parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bucket", type=int, default=150, help="characters of response per position bucket")
    ap.add_argument("--greedy", action="store_true", help="the greedy answers instead of the sampled ones")
    args = ap.parse_args()
    print("| model | characters before the step | new steps, no check before: n / wrong (%) "
          "| with a check before: n / wrong (%) | wrong steps (all) by reason, % of new steps: "
          + " / ".join(REASONS) + " |\n|---|---|---|---|---|")
    for model in args.models:
        total: Counter = Counter()
        for seed in args.seeds.split(","):
            total += count(test_samples(args.run, model, seed), args.bucket, args.greedy)
        if not any(key[-1] == "n" for key in total):
            sys.exit(f"{model}: no answers to count (evaluated with k = 0? try --greedy)")
        for b in range(1 + max(key[0] for key in total)):
            plain, checked = (total[b, f, "n"] for f in (False, True))
            if not plain + checked:
                continue
            slips = [total[b, f, "slip"] for f in (False, True)]
            print(f"| {model} | {b * args.bucket}–{(b + 1) * args.bucket - 1} | {plain:,} / {pct(slips[0], plain)} "
                  f"| {checked:,} / {pct(slips[1], checked)} | "
                  + " / ".join(pct(total[b, r], plain + checked) for r in REASONS) + " |")


if __name__ == "__main__":
    main()

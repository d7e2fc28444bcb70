"""Does a run's outcome reward model score an answer lower for reflecting, right or wrong?

Not a speed benchmark: a diagnostic for issue 4's F→T claim. RL's reward is rule + σ(ORM) + bonus;
among right answers only σ(ORM) differs, so an ORM that scores a right answer with a check below a
right one without teaches RL to stop checking, whether the check helped or not. This scores the
sampled test answers of ``RUN/eval_MODEL-sS/test_samples.jsonl`` (held out from the ORM's own
pairs, which come from train problems) with ``RUN/orm-sS`` and reports, for right and for wrong
answers, the mean σ(score) of those that reflect and those that do not, and within the problems
that have a right answer of each kind, how often the ORM puts a right plain answer above a right
reflected one (pairs of the same problem, so the problem's difficulty drops out).

    .venv/bin/python benchmarks/orm_reflections.py runs/full sft_coat --seeds 0 --n 500
"""

from __future__ import annotations

import math
import statistics
from itertools import product

from _common import run_models_parser, test_samples
from satori.data import Problem, build_prompt, read_jsonl
from satori.train.orm import load_orm, score_sequences
from satori.utils import set_threads


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pair_order(right_plain: list[float], right_reflected: list[float]) -> tuple[int, int, int]:
    """(plain above, reflected above, ties) over every pair of one problem's right plain and right
    reflected answers' scores."""
    above = sum(p > r for p, r in product(right_plain, right_reflected))
    below = sum(p < r for p, r in product(right_plain, right_reflected))
    return above, below, len(right_plain) * len(right_reflected) - above - below


def main() -> None:
    ap = run_models_parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n", type=int, default=500, help="test problems read (the first N)")
    ap.add_argument("--orm", default="", help="an ORM folder to use instead of RUN/orm-sSEED (one seed)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    print("| model | seed | answers | σ(ORM) right, reflects / not (n) | σ(ORM) wrong, reflects / not (n) "
          "| right pairs of a problem: plain above / reflected above / tie |\n|---|---|---|---|---|---|")
    for seed in args.seeds.split(","):
        orm, tokenizer = load_orm(args.orm or args.run / f"orm-s{seed}")
        for model in args.models:
            records = read_jsonl(test_samples(args.run, model, seed))[: args.n]
            rows = [(i, r["question"], s) for i, r in enumerate(records) for s in r.get("samples", [])]
            prompts = [build_prompt(Problem(id="", question=q, answer=""), tokenizer) for _, q, _ in rows]
            scores = [sigmoid(x) for x in score_sequences(orm, tokenizer, prompts, [s["text"] for _, _, s in rows],
                                                          batch_size=64).tolist()]
            groups: dict[tuple[bool, bool], list[float]] = {(c, f): [] for c in (True, False) for f in (True, False)}
            per_problem: dict[int, dict[bool, list[float]]] = {}
            for (i, _, s), score in zip(rows, scores):
                groups[(bool(s["correct"]), bool(s["reflects"]))].append(score)
                if s["correct"]:
                    per_problem.setdefault(i, {True: [], False: []})[bool(s["reflects"])].append(score)
            order = [pair_order(g[False], g[True]) for g in per_problem.values()]
            above, below, ties = (sum(o[j] for o in order) for j in range(3))

            def cell(correct: bool) -> str:
                yes, no = groups[(correct, True)], groups[(correct, False)]
                mean = lambda xs: f"{statistics.fmean(xs):.3f}" if xs else "–"  # noqa: E731
                return f"{mean(yes)} / {mean(no)} ({len(yes):,} / {len(no):,})"

            print(f"| {model} | {seed} | {len(rows):,} | {cell(True)} | {cell(False)} | {above:,} / {below:,} / {ties:,} |")


if __name__ == "__main__":
    main()

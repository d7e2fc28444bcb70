"""Does a run's outcome reward model score an answer lower for reflecting, right or wrong?

Not a speed benchmark: a diagnostic for issue 4's F→T claim. RL's reward is rule + σ(ORM) + bonus;
among right answers only σ(ORM) differs, so an ORM that scores a right answer with a check below a
right one without teaches RL to stop checking, whether the check helped or not. This scores the
sampled test answers of ``RUN/eval_MODEL-sS/test_samples.jsonl`` (held out from the ORM's own
pairs, which come from train problems) with ``RUN/orm-sS`` and reports, for right and for wrong
answers, the mean σ(score) of those that reflect and those that do not, and over the pairs of a
problem's right answers of which one reflects, how often the ORM puts the plain one above (ties
half; pairs of the same problem, so the problem's difficulty drops out). That share, and the
held-out table printed first (the ORM's own validation samples, ``RUN/orm-sS/samples.jsonl``,
scored as ``satori orm`` scores them), come from ``satori.train.orm.ranking_metrics``: the
figures ``satori orm`` writes to ``orm_result.json`` (``best.by_reflection``) since 2422bbf, here
for ORMs trained before it too.

    .venv/bin/python benchmarks/orm_reflections.py runs/full sft_coat --seeds 0 --n 500
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from _common import run_models_parser, test_samples
from satori.config import from_dict
from satori.data import Problem, build_prompt, read_jsonl
from satori.train.orm import ORMConfig, evaluate_orm, load_orm, ranking_metrics, score_sequences
from satori.utils import set_threads


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def share(cell: dict) -> str:
    """A ``by_reflection`` cell as "value (pairs)"."""
    value = cell.get("accuracy", cell.get("share"))
    return f"{'–' if value is None else f'{value:.2f}'} ({cell['pairs']:,})"


def held_out_row(orm_dir: Path, orm, tokenizer, seed: str) -> str:
    """The ORM's pairwise accuracy on its own validation samples, split by reflection."""
    cfg = from_dict(ORMConfig, json.loads((orm_dir / "orm_result.json").read_text())["config"], str(orm_dir))
    valid = [r for r in read_jsonl(orm_dir / "samples.jsonl") if r["split"] == "valid"]
    m = evaluate_orm(orm, tokenizer, valid, cfg)
    by = m["by_reflection"]
    cells = [by[f"right_{a}/wrong_{b}"] for a, b in (("reflects", "plain"), ("plain", "plain"), ("reflects", "reflects"))]
    return (f"| {seed} | {m['n_problems']} | {m['pairwise_accuracy']:.2f} | {m['best_of_k']:.2f} "
            f"({m['sample_accuracy']:.2f}) | " + " | ".join(share(c) for c in cells)
            + f" | {share(by['right_plain_above_reflected'])} |")


def main() -> None:
    ap = run_models_parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n", type=int, default=500, help="test problems read (the first N)")
    ap.add_argument("--orm", default="", help="an ORM folder to use instead of RUN/orm-sSEED (one seed)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    seeds = args.seeds.split(",")
    orms = {seed: load_orm(args.orm or args.run / f"orm-s{seed}") for seed in seeds}
    print("The ORM's own held-out samples: pairwise accuracy (pairs) by whether the right / the wrong answer "
          "reflects\n\n| seed | problems | pairwise | best-of-k (sample acc.) | right reflects, wrong plain "
          "| both plain | both reflect | right pairs: plain above reflected |\n|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        if not args.orm:  # a substitute ORM (--orm) keeps no samples of its own here
            print(held_out_row(args.run / f"orm-s{seed}", *orms[seed], seed))
    print("\nThe models' sampled test answers\n\n| model | seed | answers | σ(ORM) right, reflects / not (n) "
          "| σ(ORM) wrong, reflects / not (n) | right pairs of a problem: plain above reflected (pairs) |"
          "\n|---|---|---|---|---|---|")
    for seed in seeds:
        orm, tokenizer = orms[seed]
        for model in args.models:
            records = [r for r in read_jsonl(test_samples(args.run, model, seed))[: args.n] if r.get("samples")]
            rows = [(r["question"], s) for r in records for s in r["samples"]]
            prompts = [build_prompt(Problem(id="", question=q, answer=""), tokenizer) for q, _ in rows]
            raw = score_sequences(orm, tokenizer, prompts, [s["text"] for _, s in rows], batch_size=64).tolist()
            groups: dict[tuple[bool, bool], list[float]] = {(c, f): [] for c in (True, False) for f in (True, False)}
            for (_, s), x in zip(rows, raw):
                groups[(bool(s["correct"]), bool(s["reflects"]))].append(sigmoid(x))
            per_problem, start = [], 0  # raw scores back into each problem's samples
            for r in records:
                per_problem.append(raw[start: start + len(r["samples"])])
                start += len(r["samples"])
            m = ranking_metrics([[bool(s["correct"]) for s in r["samples"]] for r in records], per_problem,
                                reflects=[[bool(s["reflects"]) for s in r["samples"]] for r in records])

            def cell(correct: bool) -> str:
                yes, no = groups[(correct, True)], groups[(correct, False)]
                mean = lambda xs: f"{statistics.fmean(xs):.3f}" if xs else "–"  # noqa: E731
                return f"{mean(yes)} / {mean(no)} ({len(yes):,} / {len(no):,})"

            print(f"| {model} | {seed} | {len(rows):,} | {cell(True)} | {cell(False)} "
                  f"| {share(m['by_reflection']['right_plain_above_reflected'])} |")


if __name__ == "__main__":
    main()

"""Where the models of a finished `satori run` reflect, counted over their sampled test answers.

Not a speed benchmark: the figures behind the presets' ``rae.t_min`` choice and RAE's cut rule.
For each model and seed it reads the sampled answers of ``RUN/eval_MODEL-sS/test_samples.jsonl``
and counts the answers that reflect, those whose first reflection comes after they have written
a final answer (a ``\\boxed{}`` in an earlier step: the model checks a finished solution, as a
restart state cut back 0 steps asks it to) and how many of those end right, and those with two
reflections in a row (which the demonstrations never contain, and which RAE's old cut made).
Then, apart for a first reflection mid-solution and one after a final answer, the answers that
went wrong -> right (F→T) and right -> wrong (T→F) across it, as `satori eval` grades them
(``pre_reflect_correct``: the answer before the reflection, or the step checker's verdict on
the line before it).

    .venv/bin/python benchmarks/reflection_positions.py runs/full sft_coat rl_round1 --seeds 0,1,2
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import run_models_parser, test_samples
from satori.coat import final_answer_step, parse_steps
from satori.data import read_jsonl


def positions(response: str) -> dict[str, bool]:
    """Whether a response reflects at all, first after a final answer, and twice in a row."""
    steps = parse_steps(response)
    at = [i for i, s in enumerate(steps) if s.action == "reflect"]
    return {"reflects": bool(at),
            "after_answer": bool(at) and final_answer_step(steps[:at[0]]) is not None,
            "twice_in_a_row": any(i + 1 in at for i in at)}


def count(path: Path) -> dict[str, int]:
    """The counts over every sampled answer of one evaluation file."""
    n = {"answers": 0, "reflects": 0, "after_answer": 0, "after_answer_right": 0, "twice_in_a_row": 0,
         "mid F→T": 0, "mid T→F": 0, "after_answer F→T": 0, "after_answer T→F": 0}
    for record in read_jsonl(path):
        for sample in record.get("samples", []):
            p = positions(sample["text"])
            n["answers"] += 1
            for key in ("reflects", "after_answer", "twice_in_a_row"):
                n[key] += p[key]
            n["after_answer_right"] += p["after_answer"] and bool(sample["correct"])
            before, after = sample.get("pre_reflect_correct"), bool(sample["correct"])
            if before is not None and before != after:
                n[f"{'after_answer' if p['after_answer'] else 'mid'} {'F→T' if after else 'T→F'}"] += 1
    return n


def main() -> None:
    ap = run_models_parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    print("| model | seed | sampled answers | reflect | first reflect after a final answer | of those right "
          "| two reflections in a row | F→T / T→F, first reflection mid-solution | F→T / T→F, after a final answer |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for seed in args.seeds.split(","):
            path = test_samples(args.run, model, seed)
            n = count(path)
            if not n["answers"]:
                sys.exit(f"{path}: no sampled answers (the evaluation ran with k = 0)")
            print(f"| {model} | {seed} | {n['answers']:,} | {n['reflects']:,} | {n['after_answer']:,} "
                  f"| {n['after_answer_right']:,} | {n['twice_in_a_row']:,} | {n['mid F→T']:,} / {n['mid T→F']:,} "
                  f"| {n['after_answer F→T']:,} / {n['after_answer T→F']:,} |")


if __name__ == "__main__":
    main()

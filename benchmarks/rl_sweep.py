"""Re-run an RL stage of a finished `satori run` with other settings, and compare greedy accuracy.

Not a speed benchmark: a screening tool for issue 4 (does RL beat format tuning?). It reads the
RL config that a finished run recorded for ``--stage`` (``RUN/rl_round1-sS/rl_result.json`` by
default; ``--stage rl_round2`` for round 2), so each variant starts from the same policy (the
format-tuned model, or for round 2 the distilled one), ORM and restart buffer; only the overrides
change. Every model, the starting one included, is then evaluated greedily on ``--n`` problems
of ``--data`` (validation by default: settings are chosen there, the test split only reports;
500 problems give a standard error of about 1.3 points at 90%),
and with ``--k`` sampled as the presets sample (T 0.7) on the first ``--sample-limit`` of them,
for the reflection figures: how often the samples reflect, their F→T / T→F counts,
P(reflect) after a fresh mistake / a wrong / a right line by the step checker, and how often the step after a
reflection repairs a wrong line / breaks a right one.

    .venv/bin/python benchmarks/rl_sweep.py RUN --seed 0 --n 500 \\
        --variant "t03=--temperature 0.3 --steps 40 --rollout-batch 128 --train-batch 64" \\
        --variant "grpo=--advantage grpo --critic-warmup 0 --n-samples 8 --rollout-batch 16 --train-batch 64"

Writes each variant to ``OUT/NAME-sS`` (its evaluation to ``OUT/NAME-sS/eval-valid-n500-k8-first100``)
and prints a markdown table; a finished variant or evaluation is not run again (``satori rl``
resumes; an evaluation is reused only with the same ``--n``, ``--k`` and ``--sample-limit``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml


def satori(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "satori.cli", *args], check=True)


def evaluate(model: Path, out: Path, data: str, n: int, k: int, sample_limit: int) -> dict:
    """Greedy on ``n`` problems of ``data``; with ``k`` > 0 also k samples (T 0.7) on the first ``sample_limit``."""
    if not (out / "results.json").exists():
        satori("eval", "--model", str(model), "--data", data, "--data.n", str(n), "--k", str(k),
               "--temperature", "0.7", "--sample-limit", str(sample_limit), "--out", str(out))
    return json.loads((out / "results.json").read_text())["metrics"]


def row(name: str, m: dict) -> str:
    """A table row: greedy pass@1 and, when sampled, the sampled answers' reflection figures."""
    cells = [name, f"{m['pass@1']:.3f}"]
    if "sampled" in m:
        refl = m["sampled"]["reflection"]
        steps = refl.get("steps", {})
        cells += [f"{m['sample_accuracy']:.3f}", f"{m['sampled']['reflect_rate']:.3f}",
                  f"{refl['counts']['F->T']} / {refl['counts']['T->F']}",
                  " / ".join(f"{steps.get(f'p_reflect_after_{w}', 0):.3f}" for w in ("mistake", "wrong", "right")),
                  f"{steps.get('p_repair_after_reflect', 0):.3f} / {steps.get('p_break_after_reflect', 0):.3f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished `satori run` folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", default="rl_round1", help="the RL stage re-run: rl_round1, rl_round2 or an ablation's")
    ap.add_argument("--data", default="testbed:valid", help="evaluation problems (a path or testbed:SPLIT)")
    ap.add_argument("--n", type=int, default=500, help="problems for the greedy evaluation")
    ap.add_argument("--k", type=int, default=0, help="samples per problem for the sampled reflection figures")
    ap.add_argument("--sample-limit", type=int, default=100, help="problems sampled (the first N)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES (satori rl options)")
    ap.add_argument("--out", type=Path, default=Path("runs/rl_sweep"))
    args = ap.parse_args()

    recorded = args.run / f"{args.stage}-s{args.seed}" / "rl_result.json"
    if not recorded.exists():
        sys.exit(f"{recorded}: not found; give a run folder whose {args.stage} stage finished")
    cfg = json.loads(recorded.read_text())["config"]
    cfg.pop("out")
    args.out.mkdir(parents=True, exist_ok=True)
    base_yaml = args.out / f"{args.stage}-s{args.seed}.yaml"
    base_yaml.write_text(yaml.safe_dump(cfg))

    # the evaluation settings name the folder, so a finished evaluation is reused only for the same ones
    tag = (args.data.replace("testbed:", "").replace("/", "_") + f"-n{args.n}"
           + (f"-k{args.k}-first{args.sample_limit}" if args.k else ""))

    def measure(model: Path, out: Path) -> dict:
        return evaluate(model, out.with_name(f"{out.name}-{tag}"), args.data, args.n, args.k, args.sample_limit)

    start = "format-tuned" if args.stage == "rl_round1" else f"start of {args.stage}"
    rows = [(start, measure(Path(cfg["policy"]), args.out / f"eval-start-{args.stage}-s{args.seed}"))]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        if not name or not overrides:
            sys.exit(f"--variant {spec!r}: expected NAME=OVERRIDES")
        out = args.out / f"{name}-s{args.seed}"
        if not (out / "rl_result.json").exists():
            satori("rl", "--config", str(base_yaml), "--out", str(out), *shlex.split(overrides))
        rows.append((name, measure(out, out / "eval")))

    head = [f"model (seed {args.seed})", f"greedy pass@1 on {args.n} problems of {args.data}"]
    if args.k:
        head += [f"sample accuracy (k {args.k}, first {args.sample_limit})", "reflect rate (sampled)", "F→T / T→F",
                 "P(reflect) after a mistake / a wrong / a right line", "repair / break after a reflect"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, m in rows:
        print(row(name, m))


if __name__ == "__main__":
    main()

"""Re-run RL round 1 of a finished `satori run` with other settings, and compare greedy accuracy.

Not a speed benchmark: a screening tool for issue 4 (does RL beat format tuning?). It reads the
round-1 RL config that a finished run recorded (``RUN/rl_round1-sS/rl_result.json``), so each
variant starts from the same format-tuned model, ORM and restart buffer; only the overrides
change. Every model, the format-tuned one included, is then evaluated greedily on ``--n`` test
problems (more than the preset's 100: 500 problems give a standard error of about 2 points).

    .venv/bin/python benchmarks/rl_sweep.py RUN --seed 0 --n 500 \\
        --variant "t03=--temperature 0.3 --steps 40 --rollout-batch 128 --train-batch 64" \\
        --variant "grpo=--advantage grpo --critic-warmup 0 --n-samples 8 --rollout-batch 16 --train-batch 64"

Writes each variant to ``OUT/NAME-sS`` and prints a markdown table; a finished variant is not
run again (``satori rl`` resumes).
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


def greedy_accuracy(model: Path, out: Path, n: int) -> float:
    if not (out / "results.json").exists():
        satori("eval", "--model", str(model), "--data", "testbed:test", "--data.n", str(n), "--k", "0",
               "--out", str(out))
    return json.loads((out / "results.json").read_text())["metrics"]["pass@1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished `satori run` folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=500, help="test problems for the greedy evaluation")
    ap.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES (satori rl options)")
    ap.add_argument("--out", type=Path, default=Path("runs/rl_sweep"))
    args = ap.parse_args()

    recorded = args.run / f"rl_round1-s{args.seed}" / "rl_result.json"
    if not recorded.exists():
        sys.exit(f"{recorded}: not found; give a run folder whose satori branch finished")
    cfg = json.loads(recorded.read_text())["config"]
    cfg.pop("out")
    args.out.mkdir(parents=True, exist_ok=True)
    base_yaml = args.out / f"round1-s{args.seed}.yaml"
    base_yaml.write_text(yaml.safe_dump(cfg))

    rows = [("format-tuned", greedy_accuracy(Path(cfg["policy"]), args.out / f"eval-ft-s{args.seed}", args.n))]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        if not name or not overrides:
            sys.exit(f"--variant {spec!r}: expected NAME=OVERRIDES")
        out = args.out / f"{name}-s{args.seed}"
        if not (out / "rl_result.json").exists():
            satori("rl", "--config", str(base_yaml), "--out", str(out), *shlex.split(overrides))
        rows.append((name, greedy_accuracy(out, out / "eval", args.n)))

    print(f"\n| model (seed {args.seed}) | greedy pass@1 on {args.n} test problems |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc:.3f} |")


if __name__ == "__main__":
    main()

"""LaTRO step time against K (rationales sampled per question).

Each block is ``satori.train.latro.run_latro`` from the shipped testbed base model on
``testbed:train`` for ``--steps`` steps in a fresh folder (no held-out evaluation, no
checkpoints); per-step times come from its ``metrics.jsonl`` (``step_seconds``: the whole
step; ``sample_seconds``: sampling the K rationales of every question and cutting them; the
rest is the policy and reference passes, backward and optimizer step). The first
``--skip-first`` steps of each block are not timed. The values of K alternate inside each
repeat (the order reverses every other repeat).

Usage:
    .venv/bin/python benchmarks/bench_latro.py --out benchmarks/results/latro.json
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_model_dir, base_parser, fmt, int_list, machine_info, machine_lines, markdown_table, quiet_hf, set_threads,
    stats, write_results,
)


def latro_block(k: int, args: Any, steps: int, seed: int, workdir: Path) -> list[dict[str, float]]:
    from accelerate.state import AcceleratorState, GradientState

    from satori.data import DataConfig
    from satori.train.common import read_metrics
    from satori.train.latro import LatroConfig, run_latro

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = Path(tempfile.mkdtemp(prefix=f"latro-k{k}-", dir=workdir))
    cfg = LatroConfig(
        model=str(base_model_dir()), out=str(out), data=DataConfig(path="testbed:train", n=args.n_problems),
        valid_data=DataConfig(path="testbed:valid", n=10), k=k, steps=steps, batch_size=args.batch_size,
        micro_batch=args.micro_batch, max_rationale_tokens=args.max_rationale_tokens,
        gen_batch_size=args.gen_batch_size, bf16=args.bf16, eval_every=0, save_every=10**9, seed=seed,
        threads=args.threads,
    )
    run_latro(cfg)
    rows = []
    for m in read_metrics(out):
        if "step_seconds" not in m:
            continue
        n = args.batch_size * k
        rows.append({"step": m["step_seconds"], "sample": m["sample_seconds"],
                     "update": m["step_seconds"] - m["sample_seconds"], "rationales": n,
                     "tokens": m["rationale_len"] * n, "rationale_len": m["rationale_len"]})
    shutil.rmtree(out, ignore_errors=True)
    if len(rows) != steps:
        raise RuntimeError(f"K={k}: expected {steps} logged steps, got {len(rows)} (skipped bad steps?)")
    return rows


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], "benchmarks/results/latro.json")
    p.add_argument("--ks", type=int_list, default=[2, 4, 8, 16])
    p.add_argument("--batch-size", type=int, default=8, help="questions per step (quick preset: 8)")
    p.add_argument("--micro-batch", type=int, default=4, help="questions per micro-batch (quick preset: 4)")
    p.add_argument("--max-rationale-tokens", type=int, default=128, help="L (quick preset: 128)")
    p.add_argument("--gen-batch-size", type=int, default=64, help="sequences per generation batch")
    p.add_argument("--steps", type=int, default=3, help="steps per block")
    p.add_argument("--skip-first", type=int, default=1, help="untimed first steps of each block")
    p.add_argument("--n-problems", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the quick preset uses it)")
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    if args.skip_first >= args.steps:
        raise SystemExit("--skip-first must be smaller than --steps")
    set_threads(args.threads)
    quiet_hf()
    info = machine_info(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-latro-"))
    workdir.mkdir(parents=True, exist_ok=True)

    print("warm-up", flush=True)
    latro_block(args.ks[0], args, 1, seed=1000, workdir=workdir)
    blocks: dict[int, list[dict[str, Any]]] = {k: [] for k in args.ks}
    for r in range(args.repeats):
        order = args.ks if r % 2 == 0 else args.ks[::-1]
        for k in order:
            t0 = time.perf_counter()
            rows = latro_block(k, args, args.steps, seed=r, workdir=workdir)
            timed = rows[args.skip_first:]
            summary = {
                "step_s": sum(x["step"] for x in timed) / len(timed),
                "sample_s": sum(x["sample"] for x in timed) / len(timed),
                "update_s": sum(x["update"] for x in timed) / len(timed),
                "rationale_len": sum(x["rationale_len"] for x in timed) / len(timed),
                "rationales_per_s": sum(x["rationales"] for x in timed) / sum(x["step"] for x in timed),
                "tokens_per_s": sum(x["tokens"] for x in timed) / sum(x["step"] for x in timed),
            }
            blocks[k].append({"repeat": r, "wall_s": time.perf_counter() - t0, "steps": rows, "summary": summary})
            print(f"repeat {r + 1}/{args.repeats} K={k:<3}: {summary['step_s']:.2f} s/step "
                  f"(sample {summary['sample_s']:.2f}, update {summary['update_s']:.2f}), "
                  f"rationale len {summary['rationale_len']:.1f}", flush=True)

    keys = ("step_s", "sample_s", "update_s", "rationale_len", "rationales_per_s", "tokens_per_s")
    agg = {k: {key: stats([b["summary"][key] for b in blocks[k]]) for key in keys} for k in args.ks}
    print("\n## LaTRO step time against K\n")
    print(machine_lines(info))
    print(f"- model: testbed base; {args.batch_size} questions per step, micro-batch {args.micro_batch}, "
          f"L = {args.max_rationale_tokens}, {'bf16 autocast' if args.bf16 else 'fp32'}; "
          f"{args.steps - args.skip_first} of {args.steps} steps timed per block\n")
    print("Median (min–max) over repeats.\n")
    print(markdown_table(
        ["K", "rationales/step", "s/step", "sample s", "update s", "rationale len", "rationales/s",
         "rationale tokens/s"],
        [[k, args.batch_size * k, fmt(agg[k]["step_s"], 2), fmt(agg[k]["sample_s"], 2), fmt(agg[k]["update_s"], 2),
          fmt(agg[k]["rationale_len"], 1), fmt(agg[k]["rationales_per_s"], 1), fmt(agg[k]["tokens_per_s"], 0)]
         for k in args.ks]))
    write_results(args.out, {"benchmark": "latro", "machine": info, "args": vars(args), "summary": agg,
                             "blocks": blocks})
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

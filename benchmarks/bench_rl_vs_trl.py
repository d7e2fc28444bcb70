"""RL step throughput: satori's RL loop (GRPO mode and PPO mode) against TRL's GRPOTrainer.

One process alternates the systems: a warm-up block of each, then for every repeat one block
of ``--steps`` optimizer steps of each system (the order rotates from repeat to repeat). A
block is a fresh run from the same policy weights: ``satori.train.ppo.run_rl`` with
``steps=K`` in a new folder (per-step times from its ``metrics.jsonl``), or a new
``trl.GRPOTrainer`` with ``max_steps=K`` (per-step times from a callback, generation and
scoring times from timers wrapped around the trainer's own methods). The first
``--skip-first`` steps of every block are not timed (first-call costs of a fresh model).

Equal work per optimizer step (printed with the results):

* the same model: the shipped testbed base (3.4M-parameter Llama) with the COAT meta tokens
  added (``satori rl`` requires them; both systems load this same folder);
* the same prompts: ``testbed:train`` problems rendered by ``satori.data.build_prompt``;
* ``--prompts`` prompts × ``--group`` completions = one optimizer step (satori:
  ``rollout_batch`` × ``n_samples`` with ``train_batch`` = all of them, ``ppo_epochs`` 1;
  TRL: ``generation_batch_size`` = the same number, ``num_generations`` = group,
  ``per_device_train_batch_size`` × ``gradient_accumulation_steps`` = the same number,
  ``num_iterations`` 1); micro-batches of ``--micro-batch`` sequences in both;
* the same ``--max-new-tokens``, ``--temperature`` (plain sampling: TRL's top-p 1, top-k 0);
* the same precision: fp32, or ``--bf16`` (satori ``bf16: true``; TRL ``bf16=True``);
  TRL's GRPOConfig defaults ``bf16=True`` and ``gradient_checkpointing=True``, both are set
  explicitly here (no gradient checkpointing in either);
* the same reward: satori's rule reward ``1[correct] - 1`` graded by
  ``satori.grading.grade_batch`` (truncated or blank completions never correct); TRL gets a
  reward function with that logic; no ORM, no KL (satori ``kl_coef`` 0, TRL ``beta`` 0: no
  reference model in either), no reflection bonus (``beta`` 0);
* AdamW (torch), constant learning rate 1e-5, gradient clipping 1.0 in both.

What still differs (inherent to the systems, reported, not equalised): satori's PPO mode
also trains a critic (value model initialised from the policy); satori computes the rollout's
old log-probabilities in one extra no-grad forward pass (TRL skips it when generation and
optimisation are aligned, as here); sampling differs (the completions and so their lengths
differ: tokens/s accounts for that; the mean completion length is reported).

Usage (see benchmarks/README.md for the sizes of a real run):
    .venv/bin/python benchmarks/bench_rl_vs_trl.py --out benchmarks/results/rl_vs_trl.json
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    base_parser, coat_policy, fmt, machine_info, machine_lines, markdown_table, quiet_hf, ratio_stats, set_threads,
    stats, write_results,
)

SYSTEMS = ("satori-grpo", "satori-ppo", "trl-grpo")
LR = 1e-5


# --------------------------------------------------------------------------- shared pieces


def rule_reward(texts: list[str], truncated: list[bool], golds: list[str]) -> list[float]:
    """satori's rule reward (``algos.satori_reward`` without ORM and bonus): 0 if correct, else -1.
    Same grading call as ``satori.train.ppo.rule_correct``."""
    from satori.grading import grade_batch, is_blank_response

    unearned = [cut or is_blank_response(t) for t, cut in zip(texts, truncated)]
    graded = grade_batch(texts, golds, truncated=unearned, last_number_fallback=False)
    return [0.0 if ok else -1.0 for _, ok in graded]


class DtypeProbe:
    """Records the dtype of the lm_head output during generation (shows what precision each
    system really generates in)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.active = False

    def hook(self, model: Any) -> Any:
        head = model.get_output_embeddings()

        def record(_module: Any, _inputs: Any, output: Any) -> None:
            if self.active:
                self.seen.add(str(output.dtype).replace("torch.", ""))
        return head.register_forward_hook(record)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next block can open an Accelerator with
    another mixed-precision setting (TRL with bf16 after satori's ``mixed_precision='no'``)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def step_rows(values: list[dict[str, float]], skip: int) -> list[dict[str, float]]:
    return values[skip:] if len(values) > skip else values[-1:]


def block_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """Throughput of one block from its timed steps (totals, so long and short steps weigh
    by their time)."""
    t = sum(r["step"] for r in rows)
    return {
        "steps": len(rows),
        "samples_per_s": sum(r["samples"] for r in rows) / t,
        "tokens_per_s": sum(r["tokens"] for r in rows) / t,
        "step_s": t / len(rows),
        "generate_s": sum(r["generate"] for r in rows) / len(rows),
        "score_s": sum(r["score"] for r in rows) / len(rows),
        "update_s": sum(r["update"] for r in rows) / len(rows),
        "other_s": sum(r["step"] - r["generate"] - r["score"] - r["update"] for r in rows) / len(rows),
        "gen_tokens_per_s": sum(r["tokens"] for r in rows) / max(1e-9, sum(r["generate"] for r in rows)),
        "mean_completion_len": sum(r["tokens"] for r in rows) / sum(r["samples"] for r in rows),
        "truncated_frac": sum(r["truncated"] * r["samples"] for r in rows) / sum(r["samples"] for r in rows),
    }


# --------------------------------------------------------------------------- satori


def satori_block(mode: str, policy: Path, args: Any, steps: int, seed: int, workdir: Path,
                 probe: DtypeProbe) -> list[dict[str, float]]:
    import satori.train.ppo as ppo
    from satori.data import DataConfig
    from satori.train.common import read_metrics

    out = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=workdir))
    n = args.prompts * args.group
    cfg = ppo.RLConfig(
        policy=str(policy), out=str(out), data=DataConfig(path="testbed:train", n=args.n_problems),
        orm="", critic_init="policy", advantage="grpo" if mode == "satori-grpo" else "gae",
        n_samples=args.group, steps=steps, rollout_batch=args.prompts, train_batch=n, micro_batch=args.micro_batch,
        ppo_epochs=1, actor_lr=LR, critic_lr=LR, kl_coef=0.0, beta=0.0, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, max_grad_norm=1.0, gen_batch_size=args.gen_batch_size or n,
        bf16=args.bf16, save_every=10**9, seed=seed, threads=args.threads,
    )
    original = ppo.generate

    def probed_generate(model: Any, *a: Any, **kw: Any) -> Any:
        handle = probe.hook(model)
        probe.active = True
        try:
            return original(model, *a, **kw)
        finally:
            probe.active = False
            handle.remove()

    ppo.generate = probed_generate
    try:
        ppo.run_rl(cfg)
    finally:
        ppo.generate = original
    rows, prev = [], 0.0
    for m in read_metrics(out):
        if "time_generate" not in m:
            continue
        rows.append({"step": m["elapsed"] - prev, "generate": m["time_generate"], "score": m["time_score"],
                     "update": m["time_update"], "samples": n, "tokens": m["response_tokens"],
                     "truncated": m.get("truncated", 0.0)})
        prev = m["elapsed"]
    shutil.rmtree(out, ignore_errors=True)
    if len(rows) != steps:
        raise RuntimeError(f"{mode}: expected {steps} logged steps, got {len(rows)} (skipped bad steps?)")
    return rows


# --------------------------------------------------------------------------- TRL


def trl_dataset(policy: Path, n_problems: int) -> Any:
    from datasets import Dataset

    from satori.data import DataConfig, build_prompt, load_problems
    from satori.rollout import load_tokenizer

    tok = load_tokenizer(policy)
    problems = load_problems(DataConfig(path="testbed:train", n=n_problems))
    return Dataset.from_list([{"prompt": build_prompt(p, tok), "answer": p.answer} for p in problems])


def trl_block(policy: Path, dataset: Any, args: Any, steps: int, seed: int, workdir: Path,
              probe: DtypeProbe) -> list[dict[str, float]]:
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from satori.rollout import decode, eos_ids, load_model, load_tokenizer

    tok, model = load_tokenizer(policy), load_model(policy)
    stop = set(eos_ids(model, tok))
    n = args.prompts * args.group
    if n % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide prompts × group = {n}")
    lengths: list[list[int]] = []
    truncs: list[float] = []

    def correctness(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                    answer: list[str], **_: Any) -> list[float]:
        texts, cut, lens = [], [], []
        for ids in completion_ids:
            ended = len(ids) > 0 and ids[-1] in stop
            resp = list(ids[:-1]) if ended else list(ids)
            texts.append(decode(tok, resp))
            cut.append(not ended)
            lens.append(len(resp))
        lengths.append(lens)
        truncs.append(sum(cut) / len(cut))
        return rule_reward(texts, cut, list(answer))

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Clock.marks = [time.perf_counter()]

        def on_step_end(self, *a: Any, **k: Any) -> None:
            Clock.marks.append(time.perf_counter())

    out = Path(tempfile.mkdtemp(prefix="trl-", dir=workdir))
    cfg = GRPOConfig(
        output_dir=str(out), use_cpu=True, seed=seed, data_seed=seed,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=n // args.micro_batch,
        generation_batch_size=n, num_generations=args.group, num_iterations=1, max_steps=steps,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=0.0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=args.bf16, fp16=False, gradient_checkpointing=False,
        use_vllm=False, report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=cfg, train_dataset=dataset,
                              processing_class=tok, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # it prints the final log dict
    gen_times: list[float] = []
    gs_times: list[float] = []
    inner_generate = trainer._generate
    inner_gen_score = trainer._generate_and_score_completions

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        probe.active = True
        try:
            return inner_generate(*a, **k)
        finally:
            probe.active = False
            gen_times.append(time.perf_counter() - t0)

    def timed_gen_score(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner_gen_score(*a, **k)
        finally:
            gs_times.append(time.perf_counter() - t0)

    trainer._generate = timed_generate
    trainer._generate_and_score_completions = timed_gen_score
    handle = probe.hook(model)
    try:
        trainer.train()
    finally:
        handle.remove()
    marks = Clock.marks
    if not (len(marks) - 1 == len(gen_times) == len(gs_times) == len(lengths) == steps):
        raise RuntimeError(f"trl: {len(marks) - 1} steps, {len(gen_times)} generations, {len(gs_times)} scorings, "
                           f"{len(lengths)} reward calls; expected {steps} of each (one generation per step)")
    rows = []
    for i in range(steps):
        step = marks[i + 1] - marks[i]
        rows.append({"step": step, "generate": gen_times[i], "score": gs_times[i] - gen_times[i],
                     "update": step - gs_times[i], "samples": n, "tokens": float(sum(lengths[i])),
                     "truncated": truncs[i]})
    del trainer, model
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- main


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], "benchmarks/results/rl_vs_trl.json")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (satori rollout_batch)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (n_samples / num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--gen-batch-size", type=int, default=0,
                   help="satori generation batch (0: all completions of a step in one batch, as TRL does)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed block")
    p.add_argument("--skip-first", type=int, default=1, help="untimed first steps of each block")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of the untimed warm-up block of each system")
    p.add_argument("--n-problems", type=int, default=256, help="testbed:train problems in the prompt pool")
    p.add_argument("--bf16", action="store_true", help="bf16 mode of both systems (default fp32)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--workdir", default="", help="scratch folder (default: a new temporary folder)")
    args = p.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    bad = set(systems) - set(SYSTEMS)
    if bad:
        raise SystemExit(f"unknown systems {sorted(bad)}")
    if args.skip_first >= args.steps:
        raise SystemExit("--skip-first must be smaller than --steps")
    set_threads(args.threads)
    quiet_hf()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames in TRL's config
    info = machine_info(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    policy = coat_policy(workdir)
    dataset = trl_dataset(policy, args.n_problems) if "trl-grpo" in systems else None
    probes = {s: DtypeProbe() for s in systems}

    def run(system: str, steps: int, seed: int) -> list[dict[str, float]]:
        set_threads(args.threads)
        reset_accelerate()
        try:
            if system == "trl-grpo":
                return trl_block(policy, dataset, args, steps, seed, workdir, probes[system])
            return satori_block(system, policy, args, steps, seed, workdir, probes[system])
        finally:
            gc.collect()

    print(f"warm-up: {args.warmup_steps} step(s) of each system", flush=True)
    for s in systems:
        run(s, args.warmup_steps, seed=1000)
    blocks: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(args.repeats):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for s in order:
            t0 = time.perf_counter()
            rows = run(s, args.steps, seed=r)
            summary = block_summary(step_rows(rows, args.skip_first))
            blocks[s].append({"repeat": r, "seed": r, "wall_s": time.perf_counter() - t0, "steps": rows,
                              "summary": summary})
            print(f"repeat {r + 1}/{args.repeats} {s:<12} {summary['samples_per_s']:8.2f} samples/s "
                  f"{summary['tokens_per_s']:9.1f} tokens/s  step {summary['step_s']:.2f}s "
                  f"(gen {summary['generate_s']:.2f}, score {summary['score_s']:.2f}, "
                  f"update {summary['update_s']:.2f})  mean len {summary['mean_completion_len']:.1f}", flush=True)

    keys = ("samples_per_s", "tokens_per_s", "step_s", "generate_s", "score_s", "update_s", "other_s",
            "gen_tokens_per_s", "mean_completion_len", "truncated_frac")
    agg = {s: {k: stats([b["summary"][k] for b in blocks[s]]) for k in keys} for s in systems}
    ratios: dict[str, dict[str, Any]] = {}
    if "trl-grpo" in systems:
        for s in systems:
            if s == "trl-grpo":
                continue
            ratios[f"{s} / trl-grpo"] = {
                k: ratio_stats([b["summary"][k] for b in blocks[s]], [b["summary"][k] for b in blocks["trl-grpo"]])
                for k in ("samples_per_s", "tokens_per_s")}

    n = args.prompts * args.group
    equal = [
        f"model: shipped testbed base + COAT tokens ({policy}), same weights at the start of every block",
        f"completions per optimizer step: {args.prompts} prompts × {args.group} = {n}; one optimizer step per "
        f"RL step (1 epoch), micro-batch {args.micro_batch}",
        f"max new tokens {args.max_new_tokens}, temperature {args.temperature} (no top-p/top-k), "
        f"precision {'bf16' if args.bf16 else 'fp32'} (generation ran in: "
        + ", ".join(f"{s} {'/'.join(sorted(probes[s].seen)) or '?'}" for s in systems) + ")",
        "reward: satori rule reward (grade_batch), no ORM, no KL / reference model, no bonus; "
        "AdamW lr 1e-5, clip 1.0; no gradient checkpointing",
        f"timed: {args.steps - args.skip_first} of {args.steps} steps per block × {args.repeats} repeats "
        f"(first {args.skip_first} step(s) of each block untimed); warm-up block of {args.warmup_steps} step(s)",
        "differs by design: satori-ppo also trains a critic; satori recomputes old log-probs (one no-grad pass); "
        "sampled completions (hence lengths) differ",
    ]
    print("\n## RL step throughput: satori vs TRL GRPOTrainer\n")
    print(machine_lines(info))
    print("\nEqual work:\n" + "\n".join(f"- {e}" for e in equal) + "\n")
    print("Median (min–max) over repeats; a repeat's value is the total over its timed steps.\n")
    print(markdown_table(
        ["system", "samples/s", "tokens/s", "step s", "generate s", "score s", "update s", "other s",
         "gen tokens/s", "mean len", "truncated"],
        [[s, fmt(agg[s]["samples_per_s"], 2), fmt(agg[s]["tokens_per_s"], 0), fmt(agg[s]["step_s"], 2),
          fmt(agg[s]["generate_s"], 2), fmt(agg[s]["score_s"], 2), fmt(agg[s]["update_s"], 2),
          fmt(agg[s]["other_s"], 2), fmt(agg[s]["gen_tokens_per_s"], 0), fmt(agg[s]["mean_completion_len"], 1),
          fmt(agg[s]["truncated_frac"], 2)] for s in systems]))
    if ratios:
        print("\nRatio (paired by repeat), median (min–max):\n")
        print(markdown_table(["ratio", "samples/s", "tokens/s"],
                             [[k, fmt(v["samples_per_s"], 2), fmt(v["tokens_per_s"], 2)] for k, v in ratios.items()]))
    print("\ngenerate = sampling only; score = reward grading + (satori) old log-probs, values, advantages / "
          "(TRL) reward and advantage bookkeeping; update = forward/backward/optimizer; other = the rest of "
          "the step (logging, data).")
    write_results(args.out, {"benchmark": "rl_vs_trl", "machine": info, "args": vars(args), "equal_work": equal,
                             "generation_dtype": {s: sorted(probes[s].seen) for s in systems},
                             "summary": agg, "ratios": ratios, "blocks": blocks})
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

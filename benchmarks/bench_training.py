"""Training throughput of the testbed model: one forward + backward + AdamW step, against
sequence length, fp32 vs bf16 autocast, sdpa vs eager attention.

Each configuration trains a fresh copy of the shipped testbed base model (3.4M-parameter
Llama, fp32 weights) on random token ids: ``--batch`` rows of L tokens, all real (no
padding), causal-LM loss on every position (``model(input_ids, labels=input_ids)``),
``torch.optim.AdamW``; bf16 runs the forward and the loss under
``satori.train.common.autocast(True)`` (as every satori trainer does), the backward and the
optimizer step outside it. tokens/s = batch × L / step time. Configurations alternate inside
each repeat; a repeat times ``--steps`` steps after one untimed step of a freshly loaded model.

Usage:
    .venv/bin/python benchmarks/bench_training.py --out benchmarks/results/training.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    base_model_dir, base_parser, fmt, int_list, machine_info, machine_lines, markdown_table, quiet_hf, ratio_stats,
    set_threads, stats, write_results,
)


def load(attn: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir()), attn_implementation=attn,
                                                 dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    model.train()
    return model


def train_steps(attn: str, bf16: bool, batch: int, seq: int, steps: int, seed: int) -> list[float]:
    """Seconds of each of ``steps`` timed steps (after one untimed step)."""
    from satori.train.common import autocast

    model = load(attn)
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    times = []
    for i in range(steps + 1):
        ids = torch.randint(2, vocab, (batch, seq), generator=g)
        t0 = time.perf_counter()
        with autocast(bf16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], "benchmarks/results/training.json")
    p.add_argument("--seq-lens", type=int_list, default=[128, 256, 512])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration and repeat")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--attn", default="sdpa,eager")
    args = p.parse_args()
    set_threads(args.threads)
    quiet_hf()
    info = machine_info(args.threads)
    precisions = [x for x in args.precisions.split(",") if x]
    attns = [x for x in args.attn.split(",") if x]
    configs = [(L, prec, attn) for L in args.seq_lens for prec in precisions for attn in attns]

    runs: dict[str, list[float]] = {}  # tokens/s of each repeat
    step_s: dict[str, list[float]] = {}  # mean seconds per step of each repeat
    for r in range(args.repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for L, prec, attn in order:
            times = train_steps(attn, prec == "bf16", args.batch, L, args.steps, seed=r)
            tps = args.batch * L * len(times) / sum(times)
            runs.setdefault(f"{L}|{prec}|{attn}", []).append(tps)
            step_s.setdefault(f"{L}|{prec}|{attn}", []).append(sum(times) / len(times))
            print(f"repeat {r + 1}/{args.repeats} L={L:<4} {prec} {attn:<5}: {tps:8.0f} tokens/s "
                  f"({sum(times) / len(times):.3f} s/step)", flush=True)

    summary = {k: {"tokens_per_s": stats(v), "step_s": stats(step_s[k])} for k, v in runs.items()}
    rows = []
    for L, prec, attn in configs:
        key = f"{L}|{prec}|{attn}"
        row = [L, prec, attn, fmt(summary[key]["tokens_per_s"], 0), fmt(summary[key]["step_s"], 3)]
        ref = runs.get(f"{L}|fp32|sdpa")
        row.append(fmt(ratio_stats(runs[key], ref), 2) if ref else "–")
        rows.append(row)
    print("\n## Training throughput (forward + backward + AdamW step)\n")
    print(machine_lines(info))
    print(f"- model: testbed base (fp32 weights), batch {args.batch} rows of L tokens, no padding; "
          f"{args.steps} timed step(s) per configuration and repeat\n")
    print("Median (min–max) over repeats; the last column is the speed-up against fp32 + sdpa at the same L "
          "(paired by repeat).\n")
    print(markdown_table(["L", "precision", "attention", "tokens/s", "s/step", "vs fp32 sdpa"], rows))
    write_results(args.out, {"benchmark": "training", "machine": info, "args": vars(args), "summary": summary,
                             "runs": {"tokens_per_s": runs, "step_s": step_s}})


if __name__ == "__main__":
    main()

"""Shared-prompt update (``RLConfig.share_prompt``) against the plain one.

Two measurements, each alternating the two paths inside every repeat (order reversed every
other repeat), bf16 autocast as in the presets:

* ``micro``: one policy micro-batch of 16 rows (2 prompts × 8 responses, random tokens, the
  shipped testbed base model), forward + backward of a token-mean log-likelihood loss, at
  several prompt lengths (responses 35–95 tokens): ``satori.rollout.token_logprobs`` against
  ``satori.rollout.shared_prompt_logprobs``.
* ``loop``: ``satori rl --advantage grpo`` at the RL-vs-TRL benchmark's settings (8 prompts ×
  8 samples, micro-batch 16, 128 new tokens, temperature 1), ``time_update`` per step with
  ``share_prompt`` on and off; the same seed gives both the same rollouts, so steps pair up.

Usage:
    .venv/bin/python benchmarks/bench_shared_prompt.py --out benchmarks/results/shared_prompt.json
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
    base_model_dir, base_parser, coat_policy, fmt, int_list, machine_info, machine_lines, markdown_table, quiet_hf,
    ratio_stats, set_threads, stats, write_results,
)


def micro(args: Any) -> dict[int, dict[str, Any]]:
    import torch

    from satori.rollout import load_model, pack_sequences, shared_prompt_logprobs, token_logprobs

    model = load_model(base_model_dir())
    g = torch.Generator().manual_seed(0)
    out = {}
    for plen in args.prompt_lens:
        prompts = [torch.randint(5, 1000, (plen + d,), generator=g).tolist() for d in (-3, 3)]
        rows_p = [prompts[i // 8] for i in range(16)]
        rows_r = [torch.randint(5, 1000, (int(n),), generator=g).tolist() for n in torch.randint(35, 96, (16,), generator=g)]
        b = pack_sequences(rows_p, rows_r, pad_id=1)
        ids, attn, m = b["input_ids"], b["attention_mask"], b["response_mask"]

        def run(shared: bool) -> float:
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                kw = dict(return_entropy=True, entropy_grad=False)
                o = (shared_prompt_logprobs(model, ids, attn, [len(p) for p in rows_p], **kw) if shared
                     else token_logprobs(model, ids, attn, **kw))
                loss = (o["logp"].float() * m).sum() / m.sum()
            loss.backward()
            return time.perf_counter() - t

        run(True), run(False)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.repeats):
            for shared in ((False, True) if r % 2 == 0 else (True, False)):
                times[shared].append(run(shared))
        out[plen] = {"plain_s": stats(times[False]), "shared_s": stats(times[True]),
                     "speedup": ratio_stats(times[False], times[True])}
        print(f"prompt {plen}: plain {fmt(out[plen]['plain_s'], 3)} s, shared {fmt(out[plen]['shared_s'], 3)} s",
              flush=True)
    return out


def loop(args: Any, workdir: Path) -> dict[str, Any]:
    import satori.train.ppo as ppo
    from satori.data import DataConfig
    from satori.train.common import read_metrics

    policy = coat_policy(workdir)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats):
        for shared in ((False, True) if r % 2 == 0 else (True, False)):
            out = workdir / f"r{r}-{shared}"
            ppo.run_rl(ppo.RLConfig(
                policy=str(policy), out=str(out), data=DataConfig(path="testbed:train", n=256), critic_init="policy",
                advantage="grpo", n_samples=8, steps=args.steps, rollout_batch=8, train_batch=64, micro_batch=16,
                actor_lr=1e-5, beta=0.0, temperature=1.0, max_new_tokens=128, gen_batch_size=64, bf16=True,
                save_every=10**9, seed=r, threads=args.threads, share_prompt=shared))
            times[shared] += [m["time_update"] for m in read_metrics(out) if "time_update" in m][1:]
            shutil.rmtree(out, ignore_errors=True)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    return {"plain_s": stats(times[False]), "shared_s": stats(times[True]),
            "speedup": ratio_stats(times[False], times[True])}


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], "benchmarks/results/shared_prompt.json")
    p.add_argument("--prompt-lens", type=int_list, default=[35, 200, 400])
    p.add_argument("--steps", type=int, default=3, help="RL steps per loop block (the first is not timed)")
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    set_threads(args.threads)
    quiet_hf()
    info = machine_info(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-shared-"))
    res_micro = micro(args)
    res_loop = loop(args, workdir)
    print("\n## Shared-prompt update\n")
    print(machine_lines(info))
    print("Median (min–max) over repeats; speed-up = plain / shared, paired.\n")
    print(markdown_table(["measurement", "plain s", "shared s", "speed-up"],
                         [[f"micro-batch, prompt {k} tokens", fmt(v["plain_s"], 3), fmt(v["shared_s"], 3),
                           fmt(v["speedup"], 2)] for k, v in res_micro.items()]
                         + [["GRPO update per step (testbed prompts)", fmt(res_loop["plain_s"], 2),
                             fmt(res_loop["shared_s"], 2), fmt(res_loop["speedup"], 2)]]))
    write_results(args.out, {"benchmark": "shared_prompt", "machine": info, "args": vars(args),
                             "micro": res_micro, "loop": res_loop})
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Generation throughput of ``satori.rollout.generate`` (engine "kv" vs "hf") against batch
size and length, and the ceiling this CPU allows for this model.

Throughput: the shipped testbed base model samples at temperature 1 (``--temperature``)
one response to each of B distinct ``testbed:train`` prompts, all in one batch, with at most
N new tokens; tokens/s = generated response tokens (end token excluded) / wall time. Within
a repeat both engines get the same seed, so they produce the same tokens (the "kv" engine
returns exactly ``model.generate``'s tokens): equal work. Engines and sizes alternate inside
each repeat.

Ceiling (printed below the throughput table):

* matmul rate of this CPU, fp32 and bf16, GFLOP/s: at the model's decode shapes (a [B, hidden]
  activation times each weight matrix of the model, for each batch size B) and at a large
  square shape (the machine's peak);
* FLOPs per generated token: 2 × (the matmul weights of the decoder layers) + 2 × hidden ×
  vocab (lm_head) + attention 4 × layers × hidden × context (QKᵀ and AV), with context = mean
  prompt length + half the mean response length of that configuration;
* ceiling tokens/s = rate at the model's shapes / FLOPs per token (compute only), and with the
  per-step overhead: B / (overhead + B × FLOPs per token / rate), where the overhead is the
  measured time of one decode step at batch 1 (each engine: greedy decoding of one prompt,
  wall time / decode steps) minus the compute of that one row.

Usage:
    .venv/bin/python benchmarks/bench_generation.py --out benchmarks/results/generation.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    base_model_dir, base_parser, count_params, fmt, int_list, machine_info, machine_lines, markdown_table, quiet_hf,
    ratio_stats, set_threads, stats, write_results,
)

ENGINES = ("kv", "hf")


# --------------------------------------------------------------------------- matmul rate


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, min_seconds: float = 0.2) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` (best of a timed loop lasting >= min_seconds)."""
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):
        torch.matmul(a, b)
    iters, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
        iters *= 2
    return 2 * m * k * n * iters / elapsed / 1e9


def model_matmul_shapes(model: Any) -> list[tuple[int, int, int]]:
    """(in, out, count) of every Linear weight in one forward of one token (layers and lm_head)."""
    shapes: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.in_features, mod.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return [(i, o, c) for (i, o), c in shapes.items()]


def model_shape_rate(model: Any, batch: int, dtype: torch.dtype, min_seconds: float) -> float:
    """Effective GFLOP/s over one token's matmuls at batch ``batch`` (FLOP-weighted harmonic mean)."""
    flops = seconds = 0.0
    for i, o, c in model_matmul_shapes(model):
        rate = matmul_gflops(batch, i, o, dtype, min_seconds)
        f = 2.0 * batch * i * o * c
        flops += f
        seconds += f / (rate * 1e9)
    return flops / seconds / 1e9


def flops_per_token(model: Any, context: float) -> dict[str, float]:
    cfg = model.config
    linear = sum(2.0 * i * o * c for i, o, c in model_matmul_shapes(model))
    head = model.get_output_embeddings()
    lm_head = 2.0 * head.in_features * head.out_features
    heads_dim = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    attention = 4.0 * cfg.num_hidden_layers * heads_dim * context
    return {"layers": linear - lm_head, "lm_head": lm_head, "attention": attention,
            "total": linear + attention}


# --------------------------------------------------------------------------- generation


def run_generate(model: Any, tok: Any, prompts: list[str], engine: str, max_new: int, temperature: float,
                 seed: int) -> dict[str, float]:
    from satori.rollout import generate

    t0 = time.perf_counter()
    samples = generate(model, tok, prompts, max_new_tokens=max_new, temperature=temperature, n=1,
                       batch_size=len(prompts), max_batch_tokens=10**9, seed=seed, engine=engine)
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.response_ids) for s in samples)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "mean_len": tokens / len(samples), "truncated": sum(s.truncated for s in samples) / len(samples),
            "prompt_len": sum(len(s.prompt_ids) for s in samples) / len(samples)}


def step_overhead(model: Any, tok: Any, prompt: str, engine: str, max_new: int, repeats: int) -> dict[str, Any]:
    """Seconds per decode step at batch 1 (greedy; wall time / steps, prompt pass included)."""
    from satori.rollout import generate

    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s = generate(model, tok, [prompt], max_new_tokens=max_new, temperature=0.0, engine=engine)[0]
        steps = len(s.response_ids) + (0 if s.truncated else 1)
        per_step.append((time.perf_counter() - t0) / max(1, steps))
    return stats(per_step)


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], "benchmarks/results/generation.json")
    p.add_argument("--batch-sizes", type=int_list, default=[16, 64, 256])
    p.add_argument("--max-new-tokens", type=int_list, default=[64, 128, 256])
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--overhead-tokens", type=int, default=64, help="max new tokens of the batch-1 overhead runs")
    p.add_argument("--matmul-seconds", type=float, default=0.2, help="minimum timed seconds per matmul shape")
    p.add_argument("--large-matmul", type=int, default=2048, help="side of the square matmul for the peak rate")
    args = p.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    set_threads(args.threads)
    quiet_hf()
    info = machine_info(args.threads)

    from satori.data import build_prompt
    from satori.rollout import load_model, load_tokenizer
    from satori.testbed import make_problems

    base = base_model_dir()
    tok, model = load_tokenizer(base), load_model(base)
    prompts_all = [build_prompt(q, tok) for q in make_problems("train", max(args.batch_sizes), seed=0)]
    configs = [(b, n) for n in args.max_new_tokens for b in args.batch_sizes]

    print("warm-up", flush=True)
    for e in engines:
        run_generate(model, tok, prompts_all[:4], e, 8, args.temperature, seed=12345)
    runs: dict[str, list[dict[str, float]]] = {}
    for r in range(args.repeats):
        for b, n in configs:
            order = engines if r % 2 == 0 else engines[::-1]
            for e in order:
                res = run_generate(model, tok, prompts_all[:b], e, n, args.temperature, seed=r)
                runs.setdefault(f"{e}|{b}|{n}", []).append(res)
                print(f"repeat {r + 1}/{args.repeats} engine {e:<2} batch {b:>4} max_new {n:>4}: "
                      f"{res['tokens_per_s']:8.0f} tokens/s ({res['tokens']} tokens in {res['seconds']:.2f}s, "
                      f"mean len {res['mean_len']:.1f})", flush=True)

    # ---- ceiling
    print("measuring matmul rates and per-step overhead", flush=True)
    params = count_params(model)
    rates: dict[str, Any] = {"large": {}, "model_shapes": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        s = args.large_matmul
        rates["large"][name] = stats([matmul_gflops(s, s, s, dtype, args.matmul_seconds)
                                      for _ in range(args.repeats)])
        rates["model_shapes"][name] = {
            b: stats([model_shape_rate(model, b, dtype, args.matmul_seconds / 4) for _ in range(args.repeats)])
            for b in [1, *args.batch_sizes]}
    overhead = {e: step_overhead(model, tok, prompts_all[0], e, args.overhead_tokens, args.repeats) for e in engines}

    rows, summary = [], {}
    for b, n in configs:
        per_engine = {e: runs[f"{e}|{b}|{n}"] for e in engines}
        first = per_engine[engines[0]]
        prompt_len = first[0]["prompt_len"]
        mean_len = sum(x["mean_len"] for x in first) / len(first)
        context = prompt_len + mean_len / 2
        fpt = flops_per_token(model, context)
        entry: dict[str, Any] = {"batch": b, "max_new_tokens": n, "prompt_len": prompt_len, "flops_per_token": fpt}
        for name in ("fp32", "bf16"):
            rate = rates["model_shapes"][name][b]["median"] * 1e9
            entry[f"ceiling_compute_{name}"] = rate / fpt["total"]
        for e in engines:
            entry[e] = {k: stats([x[k] for x in per_engine[e]]) for k in ("tokens_per_s", "seconds", "mean_len",
                                                                           "truncated")}
            # pure overhead: the batch-1 step time minus the compute of its one row
            rate1 = rates["model_shapes"]["fp32"][1]["median"] * 1e9
            ov = max(0.0, overhead[e]["median"] - fpt["total"] / rate1)
            entry[e]["overhead_s"] = ov
            rate = rates["model_shapes"]["fp32"][b]["median"] * 1e9
            entry[e]["ceiling_with_overhead_fp32"] = b / (ov + b * fpt["total"] / rate)
        if "kv" in engines and "hf" in engines:
            entry["kv_over_hf"] = ratio_stats([x["tokens_per_s"] for x in per_engine["kv"]],
                                              [x["tokens_per_s"] for x in per_engine["hf"]])
        summary[f"{b}|{n}"] = entry
        row = [b, n, fmt(entry[engines[0]]["mean_len"], 1)]
        row += [fmt(entry[e]["tokens_per_s"], 0) for e in engines]
        if "kv_over_hf" in entry:
            row.append(fmt(entry["kv_over_hf"], 2))
        row += [f"{fpt['total'] / 1e6:.2f}", f"{entry['ceiling_compute_fp32']:,.0f}",
                f"{entry['ceiling_compute_bf16']:,.0f}"]
        row += [f"{entry[e]['ceiling_with_overhead_fp32']:,.0f}" for e in engines]
        rows.append(row)

    headers = ["batch", "max new", "mean len"] + [f"{e} tokens/s" for e in engines]
    if "kv" in engines and "hf" in engines:
        headers.append("kv/hf")
    headers += ["MFLOP/token", "ceiling fp32", "ceiling bf16"] + [f"ceiling fp32 + {e} overhead" for e in engines]
    print("\n## Generation throughput (satori.rollout.generate)\n")
    print(machine_lines(info))
    print(f"- model: testbed base, {params['total']:,} parameters ({params['non_embedding']:,} non-embedding, "
          f"lm_head {'tied' if params['tied'] else 'untied'} {params['lm_head']:,}), fp32 weights; "
          f"temperature {args.temperature}, one batch of B distinct prompts, same seed for both engines\n")
    print("Median (min–max) over repeats. Ceilings: tokens/s allowed by the matmul rate at the model's shapes "
          "(compute only), and adding the measured batch-1 per-step overhead of each engine.\n")
    print(markdown_table(headers, rows))
    print("\nMatmul rate, GFLOP/s, median (min–max):\n")
    mrows = [[f"{s}×{s}×{s}", fmt(rates["large"]["fp32"], 0), fmt(rates["large"]["bf16"], 0)]
             for s in [args.large_matmul]]
    mrows += [[f"model shapes, batch {b}", fmt(rates["model_shapes"]["fp32"][b], 1),
               fmt(rates["model_shapes"]["bf16"][b], 1)] for b in [1, *args.batch_sizes]]
    print(markdown_table(["shape", "fp32", "bf16"], mrows))
    print("\nTime of one decode step at batch 1 (ms), median (min–max); the overhead used above is this "
          "minus one row's compute:\n")
    print(markdown_table(["engine", "ms/step", "tokens/s at batch 1"],
                         [[e, fmt(overhead[e], 2, 1e3), f"{1 / overhead[e]['median']:,.0f}"] for e in engines]))
    write_results(args.out, {"benchmark": "generation", "machine": info, "args": vars(args), "params": params,
                             "matmul_gflops": rates, "step_overhead_s": overhead, "summary": summary,
                             "runs": runs})


if __name__ == "__main__":
    main()

"""Calibration figures of a pretrained testbed base model.

Usage:
    .venv/bin/python benchmarks/testbed_calibration.py [MODEL_DIR] [--n-test 500] [--n-ood 200]
        [--n-sample 100] [--k 8] [--json out.json]

MODEL_DIR defaults to the shipped ``src/satori/assets/testbed-base``. Reports greedy pass@1 on
the in-distribution test split (by level) and on the out-of-distribution split, where the first
wrong step falls, the diversity of answers sampled at temperature 1.0, and token lengths of
prompts and responses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from satori.data import plain_prompt
from satori.testbed.checker import check_steps, last_boxed
from satori.testbed.pretrain import generate
from satori.testbed.tasks import make_problems

DEFAULT_DIR = (
    Path(__file__).resolve().parents[1] / "src" / "satori" / "assets" / "testbed-base"
)


def greedy_report(model, tok, problems, max_new_tokens: int) -> dict:
    """Greedy pass@1 by level and the histogram of first wrong steps."""
    t = time.perf_counter()
    responses = generate(
        model, tok, [plain_prompt(p.question) for p in problems], max_new_tokens
    )
    seconds = time.perf_counter() - t
    by_level, first_wrong, reasons = defaultdict(list), Counter(), Counter()
    rel = Counter()
    for p, r in zip(problems, responses):
        c = check_steps(p, r)
        by_level[p.meta["level"]].append(c.final_correct)
        if c.first_wrong_step is not None:
            first_wrong[c.first_wrong_step] += 1
            reasons[c.reason.split(",")[0]] += 1
            rel[f"{c.first_wrong_step}/{p.meta['level']}"] += 1
    correct = [x for v in by_level.values() for x in v]
    return {
        "pass@1": round(sum(correct) / len(correct), 4),
        "all_steps_correct": round(1 - sum(first_wrong.values()) / len(problems), 4),
        "pass@1_by_level": {
            k: round(sum(v) / len(v), 3) for k, v in sorted(by_level.items())
        },
        "first_wrong_step_hist": dict(sorted(first_wrong.items())),
        "first_wrong_reasons": dict(reasons.most_common()),
        "gen_seconds": round(seconds, 1),
        "example_response": responses[0],
    }


def sampling_report(model, tok, problems, k: int, max_new_tokens: int) -> dict:
    """Distinct final answers among ``k`` samples at temperature 1.0, pass@1 and pass@k."""
    prompts = [plain_prompt(p.question) for p in problems for _ in range(k)]
    t = time.perf_counter()
    responses = generate(
        model, tok, prompts, max_new_tokens, do_sample=True, temperature=1.0
    )
    seconds = time.perf_counter() - t
    distinct, p1, pk = [], [], []
    for i, p in enumerate(problems):
        rs = responses[i * k : (i + 1) * k]
        distinct.append(len({last_boxed(r) for r in rs}))
        ok = [check_steps(p, r).final_correct for r in rs]
        p1.append(sum(ok) / k)
        pk.append(any(ok))
    return {
        "k": k,
        "mean_distinct_answers": round(statistics.mean(distinct), 2),
        "frac_problems_with_>=3_distinct": round(
            sum(d >= 3 for d in distinct) / len(distinct), 3
        ),
        "distinct_hist": dict(sorted(Counter(distinct).items())),
        "pass@1_T1": round(statistics.mean(p1), 4),
        f"pass@{k}_T1": round(statistics.mean(pk), 4),
        "tokens_per_second": round(
            sum(len(tok(r).input_ids) for r in responses) / seconds
        ),
        "gen_seconds": round(seconds, 1),
    }


def length_report(tok, problems) -> dict:
    """Token counts of prompts and reference responses (+eos), by level."""
    by_level = defaultdict(list)
    prompt_lens = []
    for p in problems:
        n_prompt = len(tok(plain_prompt(p.question)).input_ids)
        prompt_lens.append(n_prompt)
        by_level[p.meta["level"]].append(len(tok(p.solution).input_ids) + 1)
    return {
        "prompt_tokens_mean": round(statistics.mean(prompt_lens), 1),
        "prompt_tokens_max": max(prompt_lens),
        "response_tokens_mean_by_level": {
            k: round(statistics.mean(v), 1) for k, v in sorted(by_level.items())
        },
        "response_tokens_max": max(max(v) for v in by_level.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", default=str(DEFAULT_DIR))
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-ood", type=int, default=200)
    ap.add_argument("--n-sample", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    info_path = Path(args.model_dir) / "build_info.json"
    build = json.loads(info_path.read_text()) if info_path.exists() else {}

    test = make_problems("test", args.n_test, seed=args.seed)
    ood = make_problems("ood", args.n_ood, seed=args.seed)
    report = {
        "model_dir": args.model_dir,
        "build_seconds": build.get("seconds"),
        "build_valid_accuracy": build.get("valid", {}).get("accuracy"),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "lengths": length_report(tok, test + ood),
        "test_greedy": greedy_report(model, tok, test, args.max_new_tokens),
        "ood_greedy": greedy_report(model, tok, ood, args.max_new_tokens),
        "test_sampling": sampling_report(
            model, tok, test[: args.n_sample], args.k, args.max_new_tokens
        ),
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

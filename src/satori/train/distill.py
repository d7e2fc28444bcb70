"""``satori distill``: iterative self-improvement (METHOD.md §3, last bullet).

After an RL round, the RL policy samples ``n_samples`` solutions for every problem of a
pool; each problem's success rate is its share of correct samples. The *hardest solved*
problems (lowest success rate above zero) are kept, with one correct trajectory each, and
the **base** model is fine-tuned on them with ``satori sft`` — a parameter reset that
escapes the RL local optimum. Round 2 is then ``satori rl`` from the distilled model.

Outputs in ``out``: ``pool_samples.jsonl`` (every sample, graded), ``distill_data.jsonl``
(the chosen trajectories, ``question`` + ``response``), ``selection.json`` (statistics),
and the distilled model (from ``satori sft``) in ``out/model``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from satori.coat import REFLECT
from satori.config import check
from satori.data import DataConfig, load_problems, read_jsonl
from satori.errors import SatoriError
from satori.evaluate import sample_graded
from satori.rollout import load_model, load_tokenizer
from satori.train.sft import SFTConfig, run_sft
from satori.utils import seed_everything, set_threads, write_json, write_jsonl


@dataclass
class DistillConfig:
    """``satori distill``: sample the RL policy, keep the hardest solved problems, SFT the base model."""

    __aliases__: ClassVar[dict[str, str]] = {"data": "data.path"}

    policy: str = field(default="", metadata={"help": "the RL policy to distil from"})
    base: str = field(default="", metadata={"help": "the base model to fine-tune"})
    out: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:train"))
    n_samples: int = 4
    temperature: float = 0.6
    max_new_tokens: int = 256
    batch_size: int = 64
    keep_fraction: float = field(default=0.5, metadata={"help": "share of the solved problems kept, hardest first"})
    max_success_rate: float = field(default=1.0, metadata={"help": "drop problems solved more often than this"})
    pick: str = field(default="shortest", metadata={
        "help": "which correct trajectory of a kept problem: shortest, first (the first sampled: an unbiased "
                "draw from the policy's correct ones) or reflective (the first that reflects, else the first)"})
    sft: SFTConfig = field(default_factory=SFTConfig)
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        check(self.n_samples >= 1, f"n_samples must be >= 1, got {self.n_samples}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        check(0 < self.keep_fraction <= 1, f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        check(0 < self.max_success_rate <= 1, f"max_success_rate must be in (0, 1], got {self.max_success_rate}")
        check(self.pick in PICKS, f"pick must be one of {', '.join(PICKS)}, got {self.pick!r}")


#: how :func:`select_hardest_solved` picks a kept problem's trajectory among its correct samples
PICKS = ("shortest", "first", "reflective")


def pick_trajectory(correct: list[dict[str, Any]], pick: str) -> dict[str, Any]:
    """One of a problem's correct samples (in sampling order): the ``shortest`` (ties: the first
    sampled), the ``first``, or the first ``reflective`` one (with a ``<|reflect|>``), else the first."""
    if pick == "shortest":
        return min(correct, key=lambda s: len(s["response"]))
    if pick == "reflective":
        return next((s for s in correct if REFLECT in s["response"]), correct[0])
    if pick == "first":
        return correct[0]
    raise SatoriError(f"distill: unknown pick {pick!r}; expected one of {', '.join(PICKS)}")


def select_hardest_solved(samples: list[dict[str, Any]], keep_fraction: float, max_success_rate: float = 1.0,
                          pick: str = "shortest") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One correct trajectory for each of the hardest solved problems.

    ``samples`` are dicts with ``id``, ``question``, ``response`` and ``correct``. A problem's
    success rate is the share of its samples that are correct; problems never solved, or
    solved more often than ``max_success_rate``, are dropped; the rest are sorted by success
    rate (ascending, ties by id) and the first ``ceil(keep_fraction * n)`` kept, each with the
    correct trajectory :func:`pick_trajectory` chooses.
    """
    import math

    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_id[s["id"]].append(s)
    rates = {pid: sum(s["correct"] for s in ss) / len(ss) for pid, ss in by_id.items()}
    solved = [pid for pid, r in rates.items() if 0 < r <= max_success_rate]
    solved.sort(key=lambda pid: (rates[pid], pid))
    kept = solved[: math.ceil(keep_fraction * len(solved))] if solved else []
    chosen = []
    for pid in kept:
        correct = [s for s in by_id[pid] if s["correct"]]
        best = pick_trajectory(correct, pick)
        chosen.append({"id": pid, "question": best["question"], "answer": best["answer"],
                       "response": best["response"], "success_rate": rates[pid]})
    stats = {"problems": len(by_id), "solved": sum(r > 0 for r in rates.values()), "kept": len(chosen),
             "mean_success_rate": sum(rates.values()) / max(1, len(rates)),
             "kept_mean_success_rate": sum(c["success_rate"] for c in chosen) / max(1, len(chosen)),
             "kept_reflective": sum(REFLECT in c["response"] for c in chosen)}
    return chosen, stats


def run_distill(cfg: DistillConfig) -> dict[str, Any]:
    for name in ("policy", "base", "out"):
        if not getattr(cfg, name):
            raise SatoriError(f"--{name} is required")
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    pool_path = out / "pool_samples.jsonl"
    if pool_path.exists():  # sampling is the expensive part: a re-run reuses it
        samples = read_jsonl(pool_path)
    else:
        samples = sample_graded(load_model(cfg.policy), load_tokenizer(cfg.policy), load_problems(cfg.data),
                                k=cfg.n_samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.seed, batch_size=cfg.batch_size)
        write_jsonl(pool_path, samples)
    chosen, stats = select_hardest_solved(samples, cfg.keep_fraction, cfg.max_success_rate, cfg.pick)
    if not chosen:
        raise SatoriError(f"distill: the policy {cfg.policy} solved none of the {stats['problems']} pool problems")
    write_jsonl(out / "distill_data.jsonl", chosen)
    write_json(out / "selection.json", stats)
    sft_cfg = dataclasses.replace(cfg.sft, model=cfg.base, data=str(out / "distill_data.jsonl"),
                                  out=str(out / "model"), seed=cfg.seed)
    result = run_sft(sft_cfg)
    return {"selection": stats, "sft": result, "model": str(out / "model")}

"""Held-out model selection, shared by the loops that keep their best model (``satori rl``,
``satori latro``).

:class:`BestModel` measures greedy pass@1 on validation problems (never the test split) at
the start of a run and every ``eval_every`` steps (and after the last one). The best model
so far (ties: the earlier, so the starting model wins a tie) is written to ``out/best``
atomically; at the end it becomes the run's final model. Its step and score are part of
the loop's checkpoint state, so a resumed run selects what the uninterrupted one does.

With several processes each one evaluates its share of the problems (every ``world``-th)
and the counts are summed, so selection costs the same wall time per process whatever the
number of processes; the best model's state dict is gathered collectively (``accelerate``'s
``get_state_dict``, as :func:`satori.train.common.save_final_model` does for ZeRO-3 / FSDP; tested
with DDP on CPU) and written by the main process only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from satori.data import DataConfig, Problem
from satori.errors import SatoriError
from satori.train.common import autocast
from satori.utils import write_json

BEST = "best"
INFO = "best.json"


def due(step: int, every: int, last: int) -> bool:
    """Whether the held-out measurement is taken after ``step`` steps: at the start (step 0),
    every ``every`` steps, and after the ``last`` step."""
    return step in (0, last) or step % every == 0


def improves(value: float, best: dict[str, Any]) -> bool:
    """Whether a held-out score ``value`` replaces the best so far (strictly better: ties keep
    the earlier model, the start of the run included)."""
    return not best or value > best["valid_acc"]


class BestModel:
    """The best held-out model of a run (see the module docstring)."""

    def __init__(self, acc: Any, tokenizer: Any, problems: list[Problem], data: DataConfig, out: Path, *,
                 max_new_tokens: int, batch_size: int, seed: int, bf16: bool, state: dict[str, Any] | None = None):
        self.acc, self.tokenizer, self.out = acc, tokenizer, Path(out)
        self.problems = problems
        self.data = data
        self.gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.seed, self.bf16 = seed, bf16
        self.best: dict[str, Any] = dict(state or {})

    def accuracy(self, model: Any) -> float:
        """Greedy pass@1 of ``model`` (unwrapped) on the problems; each process grades its
        share, the counts are summed over processes."""
        from satori.evaluate import EvalConfig, GenConfig, evaluate

        acc = self.acc
        mine = self.problems[acc.process_index:: acc.num_processes]
        solved = 0.0
        if mine:
            cfg = EvalConfig(data=self.data, gen=GenConfig(**self.gen), seed=self.seed)
            with torch.no_grad(), autocast(self.bf16):
                _, records = evaluate(model, self.tokenizer, mine, cfg, progress=False)
            solved = float(sum(r["greedy"]["correct"] for r in records))
        # float64: counts up to 2^53 exact, so 897 of 1000 is 0.897, not float32's 0.89700001
        total = acc.reduce(torch.tensor([solved, float(len(mine))], dtype=torch.float64, device=acc.device),
                           reduction="sum")
        return float(total[0] / total[1])

    def evaluate(self, model: Any, step: int) -> float:
        """Held-out accuracy of ``model`` (as prepared by ``accelerate``) after ``step`` steps;
        keeps ``out/best`` at the best model so far. Call on every process."""
        self.acc.wait_for_everyone()
        unwrapped = self.acc.unwrap_model(model)
        use_cache, unwrapped.config.use_cache = unwrapped.config.use_cache, True  # off while training
        value = self.accuracy(unwrapped)
        unwrapped.config.use_cache = use_cache
        if improves(value, self.best):
            self.best = {"step": step, "valid_acc": value}
            self._save(model)
        return value

    def _save(self, model: Any) -> None:
        """Write ``out/best`` (model, tokenizer, ``best.json``) via a temporary folder and renames."""
        acc = self.acc
        state_dict = acc.get_state_dict(model)
        if acc.is_main_process:
            final, tmp, old = self.out / BEST, self.out / f".tmp-best-{os.getpid()}", self.out / f".old-best-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / INFO, self.best)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def install(self) -> None:
        """Make the best model the run's final model: copy ``out/best``'s files into ``out``.
        Refuses a ``best`` folder that is not the model the loop's state names (a folder
        left by another run)."""
        if self.acc.is_main_process:
            folder = self.out / BEST
            info = folder / INFO
            on_disk = json.loads(info.read_text()) if info.is_file() else None
            if on_disk is None or on_disk.get("step") != self.best.get("step"):
                raise SatoriError(f"{folder}: holds the model of step {on_disk and on_disk.get('step')}, but the "
                                  f"run's best held-out model is step {self.best.get('step')}; remove {folder} "
                                  f"and the checkpoints to start again")
            for f in folder.iterdir():
                if f.is_file() and f.name != INFO:
                    shutil.copy2(f, self.out / f.name)
        self.acc.wait_for_everyone()

    def summary(self) -> dict[str, Any]:
        return {"final": f"best held-out model (step {self.best['step']})", "best_step": self.best["step"],
                "best_valid_acc": self.best["valid_acc"], "valid_problems": len(self.problems)}

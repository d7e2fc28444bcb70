"""Held-out model selection, shared by the loops that keep their best model (``satori rl``,
``satori latro``).

:class:`BestModel` measures greedy pass@1 on validation problems (never the test split) at
the start of a run and every ``eval_every`` steps (and after the last one). The best model
so far (ties: the earlier, so the starting model wins a tie) is written to ``out/best``
atomically; at the end it becomes the run's final model. With ``keep_last_z`` > 0 the last
model stays the final one unless the best beats it on the same problems by at least that
paired z (:func:`paired_z`): the highest of a few noisy scores mostly picks noise (on the
testbed, seed 0 of the full preset kept step 5 at 93.7% over step 15 at 93.5% on 1,000
problems, and step 15 was the policy RL had changed; ``configs/full.yaml``), while a real drop
still sends the run back. The best and last models' steps, scores and per-problem results are
part of the loop's checkpoint state, so a resumed run selects what the uninterrupted one does.

With several processes each one evaluates its share of the problems (every ``world``-th)
and the per-problem results are summed, so selection costs the same wall time per process whatever the
number of processes; the best model's state dict is gathered collectively (``accelerate``'s
``get_state_dict``, as :func:`satori.train.common.save_final_model` does for ZeRO-3 / FSDP; tested
with DDP on CPU) and written by the main process only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

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


def paired_z(better: Sequence[bool], than: Sequence[bool]) -> float:
    """How far ``better`` beats ``than`` on the same problems (per-problem right / wrong): the
    problems only ``better`` solves minus those only ``than`` solves, over the square root of
    their sum (McNemar's statistic, signed); 0 when they solve the same problems."""
    if len(better) != len(than):
        raise SatoriError(f"paired_z: {len(better)} results against {len(than)}")
    gain = sum(bool(b) and not t for b, t in zip(better, than))
    loss = sum(bool(t) and not b for b, t in zip(better, than))
    return (gain - loss) / (gain + loss) ** 0.5 if gain + loss else 0.0


def improves(value: float, best: dict[str, Any]) -> bool:
    """Whether a held-out score ``value`` replaces the best so far (strictly better: ties keep
    the earlier model, the start of the run included)."""
    return not best or value > best["valid_acc"]


class BestModel:
    """The best held-out model of a run (see the module docstring)."""

    def __init__(self, acc: Any, tokenizer: Any, problems: list[Problem], data: DataConfig, out: Path, *,
                 max_new_tokens: int, batch_size: int, seed: int, bf16: bool, state: dict[str, Any] | None = None,
                 last: dict[str, Any] | None = None, keep_last_z: float = 0.0):
        self.acc, self.tokenizer, self.out = acc, tokenizer, Path(out)
        self.problems = problems
        self.data = data
        self.gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.seed, self.bf16 = seed, bf16
        self.best: dict[str, Any] = dict(state or {})
        self.last: dict[str, Any] = dict(last or {})  # the latest measurement
        self.keep_last_z = keep_last_z

    def results(self, model: Any) -> list[bool]:
        """Whether ``model`` (unwrapped) solves each problem, greedily; each process grades its
        share (every ``world``-th problem), the results are summed over processes."""
        from satori.evaluate import EvalConfig, GenConfig, evaluate

        acc = self.acc
        mine = self.problems[acc.process_index:: acc.num_processes]
        solved = torch.zeros(len(self.problems), dtype=torch.float64, device=acc.device)
        if mine:
            cfg = EvalConfig(data=self.data, gen=GenConfig(**self.gen), seed=self.seed)
            with torch.no_grad(), autocast(self.bf16):
                _, records = evaluate(model, self.tokenizer, mine, cfg, progress=False)
            solved[acc.process_index:: acc.num_processes] = torch.tensor(
                [float(r["greedy"]["correct"]) for r in records], dtype=torch.float64)
        return [bool(x) for x in acc.reduce(solved, reduction="sum").tolist()]

    def evaluate(self, model: Any, step: int) -> float:
        """Held-out accuracy of ``model`` (as prepared by ``accelerate``) after ``step`` steps;
        keeps ``out/best`` at the best model so far. Call on every process."""
        self.acc.wait_for_everyone()
        unwrapped = self.acc.unwrap_model(model)
        use_cache, unwrapped.config.use_cache = unwrapped.config.use_cache, True  # off while training
        solved = self.results(unwrapped)
        unwrapped.config.use_cache = use_cache
        # a count over the number of problems: 897 of 1000 is 0.897 exactly as a float
        self.last = {"step": step, "valid_acc": sum(solved) / len(solved), "solved": solved}
        if improves(self.last["valid_acc"], self.best):
            self.best = dict(self.last)
            self._save(model)
        return self.last["valid_acc"]

    def keeps_last(self) -> bool:
        """Whether the last model measured stays the final one: it is the best, or with
        ``keep_last_z`` > 0 the best does not beat it by that paired z."""
        if self.keep_last_z <= 0 or not self.best or self.best["step"] == self.last.get("step"):
            return False  # the best always, nothing measured, or the best is the last: install() it
        if not ("solved" in self.best and "solved" in self.last):
            raise SatoriError(f"{self.out}: the checkpoint's selection state has no per-problem results (written "
                              f"by an older satori); remove {self.out / 'checkpoints'} to start again")
        return paired_z(self.best["solved"], self.last["solved"]) < self.keep_last_z

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
        out = {"final": f"best held-out model (step {self.best['step']})", "best_step": self.best["step"],
               "best_valid_acc": self.best["valid_acc"], "valid_problems": len(self.problems)}
        if self.keep_last_z > 0 and self.last:
            z = paired_z(self.best["solved"], self.last["solved"])
            if self.keeps_last():
                out["final"] = (f"last model (step {self.last['step']}): the best, step {self.best['step']}, beats "
                                f"it by a paired z of {z:.2f} < {self.keep_last_z:g}")
            out.update(last_step=self.last["step"], last_valid_acc=self.last["valid_acc"], paired_z=z)
        return out

"""What every training loop shares: processes, checkpoints, schedules, logging, stopping.

* :func:`make_accelerator` opens a CPU or GPU run, one or several processes (accelerate);
* :func:`save_checkpoint` writes model, optimizer, scheduler, RNG states and the loop's own
  state into a temporary folder and renames it into place, so a checkpoint is never
  half-written and a failed write leaves the previous one usable;
  :func:`latest_checkpoint` / :func:`load_checkpoint` bring them back for ``--resume``;
* :class:`MetricsLog` appends one JSON line per step (and writes TensorBoard scalars);
* :class:`StopSignal` turns SIGTERM / SIGINT into a flag the loop checks, so the loop can
  checkpoint and exit cleanly (:func:`end_of_step` raises :class:`satori.errors.Stopped`);
  a second signal interrupts at once;
* :func:`check_finite` / :func:`grads_finite` find NaN / inf before they reach the weights;
  :func:`skip_bad_step` reports and counts such a step and stops the run after
  ``max_bad_steps`` of them (the last checkpoint stays as it was).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from satori.errors import SatoriError, Stopped
from satori.utils import write_json

CKPT_PREFIX = "step-"
TMP_PREFIX = ".tmp-" + CKPT_PREFIX
logger = logging.getLogger("satori")


def make_accelerator(cpu: bool | None = None, mixed_precision: str = "no") -> Any:
    """An ``accelerate.Accelerator``; on machines without CUDA it runs on the CPU (gloo)."""
    from accelerate import Accelerator

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def autocast(enabled: bool) -> Any:
    """bf16 autocast on the device in use (CUDA when present, else CPU), or a no-op context."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def save_final_model(acc: Any, model: Any, out: str | Path, tokenizer: Any = None) -> None:
    """Save a trained (possibly wrapped / sharded) model with ``save_pretrained``.

    Call on every process: under DeepSpeed ZeRO-3 or FSDP the full state dict has to be
    gathered collectively; only the main process writes.
    """
    state_dict = acc.get_state_dict(model)
    unwrapped = acc.unwrap_model(model)
    unwrapped.config.use_cache = True
    if acc.is_main_process:
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    acc.wait_for_everyone()


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def linear_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then linear decay to 0 (LaTRO's schedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup))


def constant_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then 1."""
    return (step + 1) / warmup if warmup > 0 and step < warmup else 1.0


#: the learning-rate schedules a config can name
LR_SCHEDULES = ("constant", "cosine", "linear")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total: int, warmup: int) -> Any:
    fn = {"cosine": cosine_lr, "linear": linear_lr, "constant": constant_lr}.get(kind)
    if fn is None:
        raise SatoriError(f"unknown lr schedule {kind!r}; expected one of {', '.join(LR_SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: fn(s, total, warmup))


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints`` (temporary folders ignored)."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.json").is_file()]
    if not done:
        return None
    return max(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def _remove_stale_temporaries(root: Path) -> None:
    """Delete temporary checkpoint folders left by a killed writer (its process is gone)."""
    for p in root.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # the writer is still alive (another run on the same folder?): leave it
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


def save_checkpoint(out: str | Path, step: int, models: dict[str, Any], optimizers: dict[str, Any],
                    state: dict[str, Any], tokenizer: Any = None, keep: int = 2) -> Path:
    """Write ``out/checkpoints/step-N`` atomically (temporary folder, then rename).

    ``models`` maps names to (unwrapped) modules saved with ``save_pretrained`` when they
    have it, each with ``tokenizer`` beside it, so ``step-N/policy`` is a model folder that
    ``satori eval`` and the other commands read; ``optimizers`` maps names to objects with
    ``state_dict`` (optimizers, schedulers); ``state`` is the loop's own JSON state. Older checkpoints beyond ``keep``
    are removed only after the new one is in place. A write that fails (full disk, quota,
    I/O error) removes its temporary folder and raises ``SatoriError`` naming the previous
    checkpoint, which is untouched; temporary folders of killed writers are cleaned up.
    """
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f"{TMP_PREFIX}{step}-{os.getpid()}"
    previous = latest_checkpoint(out)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, model in models.items():
            if getattr(model, "save_pretrained", None) is not None:
                model.save_pretrained(tmp / name, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / name)
            else:
                torch.save(model.state_dict(), tmp / f"{name}.pt")
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optim.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, **state})  # written last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno:
            reason = os.strerror(e.errno)
        else:  # e.g. safetensors reports a full disk as its own error type
            reason = f"{type(e).__name__}: {e}"
        hint = " (free disk space, then resume)" if (
            getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(e).lower()) else ""
        raise SatoriError(f"could not write checkpoint {final}: {reason}{hint}; the previous checkpoint "
                          f"{previous or '(none)'} is intact") from e
    except BaseException:  # KeyboardInterrupt: no half-written folder either
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = sorted((p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and p != final),
                 key=lambda p: int(p.name[len(CKPT_PREFIX):]))
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, models: dict[str, Any], optimizers: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer / scheduler state and RNG state; returns the loop state."""
    from safetensors.torch import load_file

    for name, model in models.items():
        folder = path / name
        if folder.is_dir():
            files = sorted(folder.glob("*.safetensors"))
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(load_file(str(f)))
            missing, unexpected = model.load_state_dict(sd, strict=False)
            # tied weights are stored once; anything else missing is an error
            really_missing = [k for k in missing if "lm_head" not in k]
            if really_missing or unexpected:
                raise SatoriError(f"{folder}: checkpoint does not match the model "
                                  f"(missing {really_missing[:3]}, unexpected {unexpected[:3]})")
        else:
            model.load_state_dict(torch.load(path / f"{name}.pt", weights_only=True))
    opt_states = torch.load(path / "optim.pt", weights_only=False)
    for name, opt in optimizers.items():
        opt.load_state_dict(opt_states[name])
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """Append-only JSONL metrics (``metrics.jsonl``) plus TensorBoard scalars."""

    def __init__(self, out: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(Path(out) / "tensorboard"))
                except ImportError:  # pragma: no cover - tensorboard is a dependency
                    self.writer = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, so no step appears twice. A run
        that starts at step 0 starts an empty log (step 0 holds the measurements taken before
        training, which it takes again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if step > 0 and line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    p = Path(out) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class StopSignal:
    """Catch SIGTERM / SIGINT so the loop can checkpoint and exit; restores handlers on exit.

    The first signal sets ``requested`` (and ``signum``); a second one, while the loop is
    still finishing its step, raises ``KeyboardInterrupt`` at once (Ctrl-C twice quits).
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        logger.warning("%s received: stopping after this step with a checkpoint (send it again to quit at once)",
                       signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


_LIBC: Any = None
TRIM_EVERY = 10  # steps; trimming every step costs about 15% of a format-tuning step


def release_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc ``malloc_trim``).

    On CPU, PyTorch frees tensors with ``free``; glibc keeps the pages of the many
    activation-sized blocks of a training step in its heap, and with sequence lengths that
    change from step to step the heap fragments and the process grows for the whole run
    (format tuning on the testbed: 3.6 GiB peak RSS without trimming). A no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def end_of_step(done: int, total: int, save_every: int, stop: StopSignal, checkpoint: Any, log: MetricsLog,
                out: str | Path) -> None:
    """What every loop does after step ``done`` (also after a skipped one): freed memory back
    to the system (:func:`release_memory`), a checkpoint every ``save_every`` steps (the final
    model is saved separately), and on SIGTERM / SIGINT a checkpoint and a clean stop
    (:class:`satori.errors.Stopped`)."""
    if done % TRIM_EVERY == 0:
        release_memory()
    saved = False
    if done % save_every == 0 and done < total:
        checkpoint(done)
        saved = True
    if stop.requested:
        if not saved:
            checkpoint(done)
        log.close()
        name = signal.Signals(stop.signum).name if stop.signum else "signal"
        raise Stopped(f"stopped by {name} at step {done}; resume with --resume "
                      f"(checkpoint in {Path(out) / 'checkpoints'})", signum=stop.signum)


def skip_bad_step(step: int, bad_steps: int, max_bad_steps: int, what: str, log: MetricsLog, out: str | Path,
                  **metrics: Any) -> int:
    """Report step ``step`` as skipped because ``what`` held NaN / inf; returns the new count
    of bad steps. The caller has already discarded the step's gradients. After more than
    ``max_bad_steps`` such steps the run stops (``SatoriError``) with its checkpoints as they
    were: no NaN ever reaches the weights, so the last checkpoint is good."""
    bad_steps += 1
    logger.warning("step %d skipped: NaN/inf in %s (%d bad step(s), limit --max-bad-steps %d)",
                   step, what, bad_steps, max_bad_steps)
    log.log(step, {"skipped_nonfinite": 1, "bad_steps": bad_steps, "nonfinite": what, **metrics})
    if bad_steps > max_bad_steps:
        log.close()
        raise SatoriError(f"training stopped: {bad_steps} steps had NaN/inf values (the last one in {what}; "
                          f"limit --max-bad-steps {max_bad_steps}); last good checkpoint: {latest_checkpoint(out)}")
    return bad_steps


def check_finite(name: str, value: torch.Tensor | float) -> bool:
    """True when ``value`` holds no NaN / inf."""
    t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    return bool(torch.isfinite(t).all())


def grads_finite(model: torch.nn.Module) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())

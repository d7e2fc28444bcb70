"""Cached, resumable pipeline stages.

A stage writes into its own folder of the run directory. Its *key* is a hash of its name,
its configuration, the keys of the stages it reads from and the satori version; the key and
a ``done`` flag are kept in ``stage.json``. Running a stage whose folder holds a finished
result with the same key is a no-op; a folder with a different key is cleared first; an
unfinished folder with the same key is handed back to the stage, whose trainers resume from
their last checkpoint (so a killed run repeats no finished stage and resumes at the step
where it stopped).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from satori import __version__
from satori.utils import write_json


def stage_key(name: str, config: Any, deps: dict[str, str]) -> str:
    blob = json.dumps({"stage": name, "config": config, "deps": dict(sorted(deps.items())), "version": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    key: str
    seconds: float
    skipped: bool
    result: Any = None


@dataclass
class Runner:
    """Runs stages in order with progress lines (elapsed time and ETA)."""

    run_dir: Path
    planned: list[tuple[str, float]] = field(default_factory=list)  # (name, expected weight)
    records: list[StageRecord] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    echo: Callable[[str], None] = print

    def plan(self, name: str, weight: float = 1.0) -> None:
        self.planned.append((name, weight))

    def _eta(self) -> str:
        done = {r.name for r in self.records}
        total_w = sum(w for _, w in self.planned) or 1.0
        done_w = sum(w for n, w in self.planned if n in done)
        active = [r for r in self.records if not r.skipped]
        if not active or done_w <= 0 or done_w >= total_w:
            return "?" if done_w < total_w else "0s"
        spent = sum(r.seconds for r in active)
        active_w = sum(w for n, w in self.planned if n in {r.name for r in active})
        return _fmt(spent / max(active_w, 1e-9) * (total_w - done_w))

    def run(self, name: str, config: Any, deps: list[str], fn: Callable[[Path], Any]) -> Any:
        """Run ``fn(stage_dir)`` unless its finished result is cached; returns its result."""
        folder = self.run_dir / name
        key = stage_key(name, config, {d: self.keys[d] for d in deps})
        meta_path = folder / "stage.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        index = len(self.records) + 1
        total = len(self.planned) or index
        if meta and meta.get("key") == key and meta.get("done"):
            self.keys[name] = key
            self.records.append(StageRecord(name, key, meta.get("seconds", 0.0), True, meta.get("result")))
            self.echo(f"[{index}/{total}] {name}: cached ({_fmt(meta.get('seconds', 0.0))} originally)")
            return meta.get("result")
        if meta and meta.get("key") != key and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        resumed = bool(meta and meta.get("key") == key)
        write_json(meta_path, {"key": key, "done": False, "name": name})
        self.echo(f"[{index}/{total}] {name}: {'resuming' if resumed else 'running'} "
                  f"(elapsed {_fmt(time.time() - self.started)}, ETA {self._eta()})")
        t0 = time.time()
        result = fn(folder)
        seconds = round(time.time() - t0, 2)
        write_json(meta_path, {"key": key, "done": True, "name": name, "seconds": seconds, "result": result})
        self.keys[name] = key
        self.records.append(StageRecord(name, key, seconds, False, result))
        self.echo(f"[{index}/{total}] {name}: done in {_fmt(seconds)} (elapsed {_fmt(time.time() - self.started)}, "
                  f"ETA {self._eta()})")
        return result

    def summary(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "seconds": r.seconds, "skipped": r.skipped} for r in self.records]


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"

"""Cached, resumable pipeline stages.

A stage writes into its own folder of the run directory. Its *key* is a hash of its name,
its configuration (with the run folder's and the base model's paths written as placeholders,
see :func:`relocatable`), the keys of the stages it reads from (a model folder given as
input, such as the base model, counts by :func:`folder_fingerprint`, its content, not its
location) and the satori version; so a run folder that moved, or a run continued from
another checkout, keeps its cache. The key and a ``done`` flag are kept in ``stage.json``. Running a stage whose folder holds a finished
result with the same key is a no-op; a folder with a different key is cleared first; an
unfinished folder with the same key is handed back to the stage, whose trainers resume from
their last checkpoint (so a killed run repeats no finished stage and resumes at the step
where it stopped).

The key holds the settings, not the code: a run continued after an update keeps its
stages. ``stage.json`` records a hash of each of satori's source files when the stage
started (:func:`source_hashes`) and, once it is done, which of them its process had loaded
(:func:`loaded_sources`); a stage reused or resumed after one of *those* files changed is
flagged, naming the files, in the progress line, in :meth:`Runner.summary` and so in the
report (an edit to the report code does not flag a training stage). A change that makes a
stage produce something else from the same settings belongs in that stage's key (as the
rae stage's ``CUT_RULE``), so that old results are redone rather than reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from satori import __version__
from satori.errors import SatoriError, Stopped
from satori.utils import name_files, write_json


def relocatable(config: Any, places: dict[str, str]) -> Any:
    """``config`` with every path under a folder of ``places`` written relative to its name.

    ``places`` maps an absolute folder to a placeholder (``{"/home/u/runs/quick": "$RUN"}``):
    a string equal to the folder or under it (``/home/u/runs/quick/sft-s0``) becomes
    ``$RUN`` / ``$RUN/sft-s0``; anything else, such as ``/home/u/runs/quickly``, is kept.
    Stage keys hash this form, so a run folder that moved, or a base model read from
    another checkout, keeps its cache (what the folder holds is keyed by its content).
    """
    if isinstance(config, dict):
        return {k: relocatable(v, places) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [relocatable(v, places) for v in config]
    if isinstance(config, str):
        for folder, name in sorted(places.items(), key=lambda kv: -len(kv[0])):  # the deepest folder first
            folder = folder.rstrip("/")
            if config == folder or config.startswith(folder + "/"):
                return name + config[len(folder):]
    return config


def stage_key(name: str, config: Any, deps: dict[str, str]) -> str:
    blob = json.dumps({"stage": name, "config": config, "deps": dict(sorted(deps.items())), "version": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _package_root() -> Path:
    return Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def source_hashes(package: Path | None = None) -> dict[str, str]:
    """``{relative path: hash}`` of each ``.py`` file of a package (satori's by default); read once
    per process."""
    root = Path(package) if package else _package_root()
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            for path in sorted(root.rglob("*.py"))}


def code_fingerprint(package: Path | None = None) -> str:
    """A hash of a package's Python source, satori's by default: each ``.py`` file's path (relative
    to the package, so a moved checkout keeps it) and content, from :func:`source_hashes`."""
    digest = hashlib.sha256()
    for path, content in source_hashes(package).items():
        digest.update(f"{path}\0{content}\n".encode())
    return digest.hexdigest()[:12]


def loaded_sources(package: Path | None = None) -> list[str]:
    """The package's source files (relative paths, as :func:`source_hashes` names them) among the
    modules this process has imported: what a stage run in it could have used."""
    root = Path(package) if package else _package_root()
    out = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py"):
            path = Path(file).resolve()
            if path.is_relative_to(root):
                out.add(path.relative_to(root).as_posix())
    return sorted(out)


def changed_sources(meta: dict[str, Any], now: dict[str, str]) -> list[str]:
    """The source files a stage's process loaded (all of them while it is unfinished) whose hash
    in ``stage.json`` (``meta["sources"]``) differs from ``now``; a file gone counts as changed."""
    then = meta.get("sources") or {}
    used = meta["modules"] if meta.get("done") and "modules" in meta else sorted(then)
    return [m for m in used if then.get(m) != now.get(m)]


#: files up to this size are hashed whole; larger ones (model weights) by size and both ends
FINGERPRINT_WHOLE = 64 << 20
FINGERPRINT_ENDS = 1 << 20


def folder_fingerprint(folder: str | Path) -> str:
    """A content fingerprint of a model folder that does not depend on where it lives.

    Every file (sorted relative paths) contributes its path and size, and its bytes: all of
    them up to ``FINGERPRINT_WHOLE``, the first and last ``FINGERPRINT_ENDS`` of a larger
    file (hashing a 15 GB checkpoint on every run would cost minutes). A stage that reads
    the base model is keyed by this, so moving or copying a checkout keeps the run's cache.
    """
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= FINGERPRINT_WHOLE:
                digest.update(fh.read())
            else:
                digest.update(fh.read(FINGERPRINT_ENDS))
                fh.seek(size - FINGERPRINT_ENDS)
                digest.update(fh.read(FINGERPRINT_ENDS))
    return digest.hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    key: str
    seconds: float
    skipped: bool
    result: Any = None
    #: reused or resumed from a stage made by other satori code: the files it used that changed since (True for
    #: a stage recorded before the files were, whose package fingerprint differs)
    other_code: list[str] | bool = False


@dataclass
class Runner:
    """Runs stages in order with progress lines (elapsed time and ETA)."""

    run_dir: Path
    planned: list[tuple[str, float]] = field(default_factory=list)  # (name, expected weight)
    records: list[StageRecord] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    echo: Callable[[str], None] = print
    isolate: bool = False  # run each stage in a child process (see :func:`run_in_child`)
    #: absolute folders whose paths in a stage's config are keyed by a placeholder (:func:`relocatable`);
    #: the run folder itself is always one
    places: dict[str, str] = field(default_factory=dict)
    code: str = field(default_factory=code_fingerprint)  # the whole package's, for the report
    sources: dict[str, str] = field(default_factory=source_hashes)  # each file's, recorded in stage.json

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
        places = {str(self.run_dir): "$RUN", str(self.run_dir.resolve()): "$RUN", **self.places}
        key = stage_key(name, relocatable(config, places), {d: self.keys[d] for d in deps})
        meta_path = folder / "stage.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        index = len(self.records) + 1
        total = len(self.planned) or index
        other_code = self._other_code(meta) if meta and meta.get("key") == key else False
        other = _describe_other_code(other_code, meta, self.code)
        if meta and meta.get("key") == key and meta.get("done"):
            self.keys[name] = key
            self.records.append(StageRecord(name, key, meta.get("seconds", 0.0), True, meta.get("result"), other_code))
            self.echo(f"[{index}/{total}] {name}: cached ({_fmt(meta.get('seconds', 0.0))} originally{other})")
            return meta.get("result")
        if meta and meta.get("key") != key and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        resumed = bool(meta and meta.get("key") == key)
        # a resumed stage keeps the code that started it (its checkpoints came from that code)
        code = {k: meta[k] for k in ("code", "sources") if k in meta} if resumed and meta else {
            "code": self.code, "sources": self.sources}
        write_json(meta_path, {"key": key, "done": False, "name": name, **code})
        self.echo(f"[{index}/{total}] {name}: {'resuming' if resumed else 'running'} "
                  f"(elapsed {_fmt(time.time() - self.started)}, ETA {self._eta()}{other})")
        t0 = time.time()
        done = run_in_child(_with_sources(fn), folder) if self.isolate else _with_sources(fn)(folder)
        result = done["result"]
        seconds = round(time.time() - t0, 2)
        write_json(meta_path, {"key": key, "done": True, "name": name, **code, "modules": done["modules"],
                               "seconds": seconds, "result": result})
        self.keys[name] = key
        self.records.append(StageRecord(name, key, seconds, False, result, other_code))
        self.echo(f"[{index}/{total}] {name}: done in {_fmt(seconds)} (elapsed {_fmt(time.time() - self.started)}, "
                  f"ETA {self._eta()})")
        return result

    def _other_code(self, meta: dict[str, Any]) -> list[str] | bool:
        """The files the stage used that changed since it was made (or started); ``False`` if none.
        A stage.json from before the files were recorded: ``True`` if the package's fingerprint differs."""
        if "sources" in meta:
            return changed_sources(meta, self.sources) or False
        return meta.get("code") not in (None, self.code)

    def summary(self) -> list[dict[str, Any]]:
        """Each stage's name, time, whether it was cached (and ``other_code`` when it was made or
        started by other satori code), and, for a trainer that selects its model on held-out
        data, which model it kept (its result's ``final``)."""
        return [{"name": r.name, "seconds": r.seconds, "skipped": r.skipped,
                 **({"other_code": r.other_code} if r.other_code else {}),
                 **({"final": r.result["final"]} if isinstance(r.result, dict) and "final" in r.result else {})}
                for r in self.records]


def _describe_other_code(other_code: list[str] | bool, meta: dict[str, Any] | None, now: str) -> str:
    if not other_code:
        return ""
    if other_code is True:
        return f"; made by other satori code ({(meta or {}).get('code')}, now {now})"
    return f"; made by other satori code: {name_files(other_code)} changed since"


def _with_sources(fn: Callable[[Path], Any]) -> Callable[[Path], dict[str, Any]]:
    """``fn`` returning ``{"result": fn(folder), "modules": the source files its process loaded}``
    (run where the stage runs: in the child process when stages are isolated)."""
    def run(folder: Path) -> dict[str, Any]:
        result = fn(folder)
        return {"result": result, "modules": loaded_sources()}
    return run


def run_in_child(fn: Callable[[Path], Any], folder: Path) -> Any:
    """``fn(folder)`` in a forked child process; its result (JSON-like) comes back by pipe.

    Why: a stage's memory goes back to the system when its process ends, so the pipeline's
    peak is its largest stage's, not the sum of what every stage left in the allocator (the
    quick preset in one process: 5.8 GiB; see benchmarks/RESULTS.md). The parent only
    orchestrates and never runs a torch kernel, so forking it is safe.

    Errors keep their meaning: a :class:`SatoriError` in the child is raised again here
    with the same message, a stop on SIGTERM / SIGINT (:class:`Stopped`, checkpoint written)
    as ``Stopped``, anything else as ``RuntimeError`` carrying the child's traceback. The
    child runs in its own process group and the parent forwards SIGTERM / SIGINT to it, so
    a signal reaches the training loop exactly once however it was sent (Ctrl-C twice still
    quits at once); the child also gets SIGTERM if the parent dies.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        os.setpgrp()
        _die_with_parent()
        try:
            msg: tuple[Any, ...] = ("ok", fn(folder))
        except Stopped as e:
            msg = ("stopped", str(e), e.signum)
        except SatoriError as e:
            msg = ("error", str(e))
        except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
            msg = ("bug", traceback.format_exc())
        send.send(msg)
        send.close()

    proc = ctx.Process(target=child, name=f"satori-stage-{folder.name}")
    proc.start()
    send.close()

    def forward(signum: int, frame: Any) -> None:
        if proc.pid is not None:
            os.kill(proc.pid, signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            msg = recv.recv()
        except EOFError:
            msg = None
        proc.join()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        recv.close()
    if msg is None:
        code = proc.exitcode or 0
        if -code in (signal.SIGTERM, signal.SIGINT):  # before the stage could catch it (e.g. while loading)
            raise Stopped(f"stage {folder.name}: stopped by {signal.Signals(-code).name} before it could "
                          "write a checkpoint; run again to resume", signum=-code)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        hint = "; out of memory? (dmesg shows the kernel's OOM kills)" if code == -signal.SIGKILL else ""
        raise RuntimeError(f"stage {folder.name}: its process {how} without a result{hint}")
    if msg[0] == "ok":
        return msg[1]
    if msg[0] == "stopped":
        raise Stopped(msg[1], signum=msg[2])
    if msg[0] == "error":
        raise SatoriError(msg[1])
    raise RuntimeError(f"stage {folder.name} failed in its process:\n{msg[1]}")


def _die_with_parent() -> None:
    """Linux: deliver SIGTERM to this process when its parent exits (no orphaned stages)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"

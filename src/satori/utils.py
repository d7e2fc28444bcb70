"""Small shared helpers: seeding, threads, atomic files, JSONL."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (when present) and torch."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


def default_threads() -> int:
    """Threads per process when none are asked for: ``OMP_NUM_THREADS`` when it is set, else every
    core. Launchers set it for each of several processes so that they do not take the cores several
    times over (``torchrun``: 1 unless set; ``accelerate launch``: ``--num_cpu_threads_per_process``)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else os.cpu_count() or 1


def set_threads(n: int = 0) -> None:
    """Use ``n`` intra-op threads (0: :func:`default_threads`)."""
    torch.set_num_threads(n if n > 0 else default_threads())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def name_files(files: list[str], most: int = 3) -> str:
    """``a.py, b.py, c.py and 2 more``: a list of names short enough for one line."""
    return ", ".join(files[:most]) + (f" and {len(files) - most} more" if len(files) > most else "")

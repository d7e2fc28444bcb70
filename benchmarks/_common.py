"""Helpers shared by the benchmark scripts: machine facts, timing statistics, tables, output.

Every script records :func:`machine_info` with its results, reports the median and the
spread (min–max and interquartile range) of its repeats through :func:`stats`, prints
markdown tables with :func:`markdown_table` and writes everything to the ``--out`` JSON file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- arguments


def base_parser(description: str, out_default: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark shares: --repeats, --threads, --out."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", default=out_default, help="JSON file for the results")
    return p


def run_models_parser(description: str) -> argparse.ArgumentParser:
    """A parser for the diagnostics that read a finished ``satori run``: RUN, then stage names."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("run", type=Path, help="a finished `satori run` folder")
    p.add_argument("models", nargs="+", help="stage names: sft_coat, rl_round1, ...")
    return p


def test_samples(run: Path, model: str, seed: str | int) -> Path:
    """``RUN/eval_MODEL-sSEED/test_samples.jsonl``; exits with a message naming it when it is missing."""
    path = Path(run) / f"eval_{model}-s{seed}" / "test_samples.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: no such evaluation (is the run finished, and the stage name right?)")
    return path


def test_problems(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The testbed problems (with their ground truth) an evaluation file's records are about, by
    id: the pipeline's test split is ``make_problems("test", n, seed)`` with ids ``...-sSEED-I``."""
    from satori.testbed import make_problems

    seeds = {r["id"].rsplit("-", 2)[1] for r in records}
    if len(seeds) != 1 or not all(r["id"].startswith("testbed-test-s") for r in records):
        sys.exit("not the testbed's test split (ids testbed-test-sSEED-I)")
    n = 1 + max(int(r["id"].rsplit("-", 1)[1]) for r in records)
    return {p.id: p for p in make_problems("test", n, seed=int(seeds.pop()[1:]))}


def int_list(text: str) -> list[int]:
    """``"16,64,256"`` -> ``[16, 64, 256]`` (for argparse ``type=``)."""
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def set_threads(n: int) -> None:
    """Use ``n`` torch intra-op threads (and one inter-op thread)."""
    import torch

    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass


# --------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector-extension flags that matter for matmul speed (AVX2 / AVX-512 / AMX / bf16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
                return [f for f in flags if f in keep]
    except OSError:
        pass
    return []


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty(src)" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce or weigh a number: CPU, cores, memory, library
    versions, date, the full command line and the git commit of the code measured."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "accelerate": _version("accelerate"),
        "satori": _version("satori-rl"),
        "git_commit": _git_commit(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF")
                if k in os.environ},
    }
    load = info["load_average_at_start"]
    if load and load[0] > 0.5:
        info["warning"] = (f"load average {load[0]:.2f} at start: other work is running, timings are not "
                           "reliable (with all cores busy, multi-threaded torch can slow down many times over)")
        print(f"WARNING: {info['warning']}", file=sys.stderr, flush=True)
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return info


def machine_lines(info: dict[str, Any]) -> str:
    """A short markdown block of the machine facts, printed above the tables."""
    return "\n".join([
        f"- machine: {info['cpu_model']} ({', '.join(info['cpu_flags']) or 'no flags read'}), "
        f"{info['logical_cores']} logical cores, {info.get('memory_gib', '?')} GiB, "
        f"torch threads {info['torch_threads']}, load average at start {info['load_average_at_start']}",
        f"- versions: torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, "
        f"accelerate {info['accelerate']}, python {info['python']}, satori commit {info['git_commit']}",
        f"- date: {info['date']}",
        f"- command: `{info['command']}`",
        *([f"- **warning**: {info['warning']}"] if info.get("warning") else []),
    ])


# --------------------------------------------------------------------------- statistics


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and quartiles of the repeats (``n`` = how many)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None, "values": []}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "values": [float(v) for v in values]}


def fmt(s: dict[str, Any] | None, digits: int = 1, scale: float = 1.0) -> str:
    """``median (min–max)`` of a :func:`stats` dict, for a table cell."""
    if not s or s.get("median") is None:
        return "–"

    def f(x: float) -> str:
        return f"{x * scale:,.{digits}f}"
    if s["n"] == 1:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Statistics of the per-repeat ratios ``num[i] / den[i]`` (paired repeats)."""
    return stats([a / b for a, b in zip(num, den) if b])


# --------------------------------------------------------------------------- tables and output


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def write_results(path: str | Path, obj: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["seconds"]``."""
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - t0


# --------------------------------------------------------------------------- models


def base_model_dir() -> Path:
    from satori.testbed import BASE_MODEL_DIR

    if not (Path(BASE_MODEL_DIR) / "config.json").is_file():
        raise SystemExit(f"the shipped testbed base model is missing ({BASE_MODEL_DIR})")
    return Path(BASE_MODEL_DIR)


def coat_policy(workdir: str | Path) -> Path:
    """The testbed base model with the COAT meta tokens added (what ``satori rl`` requires of
    a policy; format tuning normally adds them), saved once under ``workdir/policy``."""
    folder = Path(workdir) / "policy"
    if (folder / "config.json").is_file():
        return folder
    from satori import coat
    from satori.rollout import load_model, load_tokenizer

    base = base_model_dir()
    tok, model = load_tokenizer(base), load_model(base)
    coat.add_coat_tokens(tok, model)
    tmp = Path(workdir) / ".policy-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def count_params(model: Any) -> dict[str, int]:
    """Parameter counts: total, embedding (input), lm_head (0 extra when tied), non-embedding."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    head_n = head.weight.numel() if head is not None else 0
    return {"total": total, "embedding": emb, "lm_head": head_n, "tied": int(tied),
            "non_embedding": total - emb - (0 if tied else head_n)}


def quiet_hf() -> None:
    """Silence Hugging Face progress bars and info logs (they would bury the tables)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass

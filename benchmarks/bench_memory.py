"""Peak memory (RSS) of each stage of a pipeline run (default: the quick preset).

Runs ``satori run CONFIG --out DIR`` in a child process (a fresh ``DIR`` per repeat, so no
stage is cached), samples every ``--interval`` seconds the resident set size of the child
plus all its descendants (math-verify grading workers, data loaders) with psutil, and maps
each sample to the stage that was running, read from the pipeline's progress lines
``[i/N] STAGE: running (...)`` and ``[i/N] STAGE: done in ...`` (the child runs with
``PYTHONUNBUFFERED=1`` so lines arrive when printed). Samples outside a stage (start-up,
report writing) are reported as ``(outside stages)``.

RSS of several processes is summed, so pages shared between a parent and a forked child
(``satori run`` runs each stage in a forked child: ``stage_processes``) are counted twice: the
total is an upper bound. PSS (proportional set size: a shared page counts 1/n in each of its
n processes) summed over the processes is the memory the tree really holds; the main process
alone is reported too. A stage
shorter than the sampling interval may get no sample ("–").

Each stage's ``threads`` is set to ``--threads`` in a copy of the config written next to
the run (0 keeps the config's own setting).

Usage:
    .venv/bin/python benchmarks/bench_memory.py --config configs/quick.yaml --out benchmarks/results/memory.json
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, base_parser, fmt, machine_info, machine_lines, markdown_table, stats, write_results  # noqa: E402

STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+): (running|resuming|cached|done)")
OUTSIDE = "(outside stages)"
GIB = 2**30


def config_with_threads(src: Path, dst: Path, threads: int) -> None:
    """Copy the pipeline YAML, setting ``threads`` in every section whose config has that field."""
    import yaml

    from satori.pipeline import PipelineConfig

    data = yaml.safe_load(src.read_text()) or {}
    if threads > 0:
        defaults = PipelineConfig()
        for f in dataclasses.fields(defaults):
            section = getattr(defaults, f.name)
            if not dataclasses.is_dataclass(section):
                continue
            if "threads" in {g.name for g in dataclasses.fields(section)}:
                data.setdefault(f.name, {})["threads"] = threads
            for g in dataclasses.fields(section):  # nested sections (distill.sft)
                sub = getattr(section, g.name)
                if dataclasses.is_dataclass(sub) and "threads" in {h.name for h in dataclasses.fields(sub)}:
                    data.setdefault(f.name, {}).setdefault(g.name, {})["threads"] = threads
    dst.write_text(yaml.safe_dump(data, sort_keys=False))


def tree_rss(proc: Any) -> tuple[int, int, int, int]:
    """(RSS of the process and all its descendants, RSS of the process alone, process count,
    PSS of the process and its descendants)."""
    import psutil

    def rss_pss(p: Any) -> tuple[int, int]:
        info = p.memory_full_info()
        return info.rss, getattr(info, "pss", info.rss)

    try:
        main, pss = rss_pss(proc)
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0, 0, 0
    total, count = main, 1
    for c in children:
        try:
            r, q = rss_pss(c)
            total, pss, count = total + r, pss + q, count + 1
        except psutil.NoSuchProcess:
            pass
    return total, main, count, pss


def run_once(config: Path, out_dir: Path, interval: float, log_path: Path) -> dict[str, Any]:
    import psutil

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", "import sys; from satori.cli import main; sys.exit(main())",
           "run", str(config), "--out", str(out_dir)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                             cwd=str(REPO))
    proc = psutil.Process(child.pid)
    state = {"stage": OUTSIDE}
    order: list[str] = []
    stage_seconds: dict[str, float] = {}
    lock = threading.Lock()

    def reader() -> None:
        started: dict[str, float] = {}
        with log_path.open("w") as log:
            for line in child.stdout:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                m = STAGE_LINE.match(line.strip())
                if not m:
                    continue
                print("   ", line.rstrip(), flush=True)
                name, what = m.group(3), m.group(4)
                with lock:
                    if what in ("running", "resuming"):
                        state["stage"] = name
                        started[name] = time.perf_counter()
                        order.append(name)
                    elif what == "done":
                        state["stage"] = OUTSIDE
                        stage_seconds[name] = time.perf_counter() - started.get(name, time.perf_counter())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    samples: list[tuple[float, str, int, int, int, int]] = []
    t0 = time.perf_counter()
    while child.poll() is None:
        total, main, count, pss = tree_rss(proc)
        with lock:
            stage = state["stage"]
        if total:
            samples.append((time.perf_counter() - t0, stage, total, main, count, pss))
        time.sleep(interval)
    thread.join(timeout=10)
    if child.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise SystemExit(f"pipeline failed (exit {child.returncode}); last lines of {log_path}:\n" + "\n".join(tail))
    peaks: dict[str, dict[str, Any]] = {}
    for _, stage, total, main, count, pss in samples:
        p = peaks.setdefault(stage, {"rss": 0, "pss": 0, "main_rss": 0, "max_processes": 0, "samples": 0})
        p["rss"] = max(p["rss"], total)
        p["pss"] = max(p["pss"], pss)
        p["main_rss"] = max(p["main_rss"], main)
        p["max_processes"] = max(p["max_processes"], count)
        p["samples"] += 1
    return {"stages": order, "peaks": peaks, "stage_seconds": stage_seconds,
            "overall_rss": max((s[2] for s in samples), default=0),
            "overall_main_rss": max((s[3] for s in samples), default=0),
            "overall_pss": max((s[5] for s in samples), default=0),
            "wall_s": time.perf_counter() - t0, "n_samples": len(samples),
            "timeline": [(round(t, 2), st, tot, m, q) for t, st, tot, m, _, q in samples]}


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], "benchmarks/results/memory.json")
    p.add_argument("--config", default=str(REPO / "configs" / "quick.yaml"))
    p.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    p.add_argument("--workdir", default="", help="folder for the runs (default: a temporary folder, removed)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders")
    p.add_argument("--no-timeline", action="store_true", help="leave the per-sample timeline out of the JSON")
    args = p.parse_args()
    info = machine_info(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yaml"
    config_with_threads(Path(args.config), config, args.threads)

    runs = []
    for r in range(args.repeats):
        out_dir = workdir / f"run-{r}"
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"repeat {r + 1}/{args.repeats}: satori run {args.config} --out {out_dir}", flush=True)
        res = run_once(config, out_dir, args.interval, workdir / f"run-{r}.log")
        print(f"repeat {r + 1}/{args.repeats}: peak {res['overall_rss'] / GIB:.2f} GiB RSS, "
              f"{res['overall_pss'] / GIB:.2f} GiB PSS "
              f"(main process {res['overall_main_rss'] / GIB:.2f} GiB) in {res['wall_s']:.0f}s", flush=True)
        if args.no_timeline:
            res.pop("timeline")
        runs.append(res)
        if not args.keep_runs:
            shutil.rmtree(out_dir, ignore_errors=True)

    stages = list(dict.fromkeys(s for res in runs for s in res["stages"]))
    if any(OUTSIDE in res["peaks"] for res in runs):
        stages.append(OUTSIDE)
    summary: dict[str, Any] = {}
    rows = []
    for s in stages:
        got = [res["peaks"][s] for res in runs if s in res["peaks"]]
        entry = {"rss_gib": stats([g["rss"] / GIB for g in got]),
                 "pss_gib": stats([g.get("pss", 0) / GIB for g in got]),
                 "main_rss_gib": stats([g["main_rss"] / GIB for g in got]),
                 "max_processes": max((g["max_processes"] for g in got), default=0),
                 "seconds": stats([res["stage_seconds"][s] for res in runs if s in res["stage_seconds"]])}
        summary[s] = entry
        rows.append([s, fmt(entry["rss_gib"], 2), fmt(entry["pss_gib"], 2), fmt(entry["main_rss_gib"], 2),
                     entry["max_processes"],
                     fmt(entry["seconds"], 0)])
    overall = {"rss_gib": stats([res["overall_rss"] / GIB for res in runs]),
               "pss_gib": stats([res["overall_pss"] / GIB for res in runs]),
               "main_rss_gib": stats([res["overall_main_rss"] / GIB for res in runs]),
               "wall_s": stats([res["wall_s"] for res in runs])}
    rows.append(["**overall**", fmt(overall["rss_gib"], 2), fmt(overall["pss_gib"], 2),
                 fmt(overall["main_rss_gib"], 2), "",
                 fmt(overall["wall_s"], 0)])
    print("\n## Peak memory (RSS) per pipeline stage\n")
    print(machine_lines(info))
    print(f"- pipeline: `satori run {args.config}` (threads {args.threads or 'as configured'}), sampled every "
          f"{args.interval}s; RSS of the pipeline process plus its children\n")
    print("Median (min–max) over repeats, GiB.\n")
    print(markdown_table(["stage", "peak RSS (all processes)", "peak PSS (all processes)", "peak RSS (main process)",
                          "max processes",
                          "stage seconds"], rows))
    write_results(args.out, {"benchmark": "memory", "machine": info, "args": vars(args),
                             "config_used": config.read_text(), "summary": summary, "overall": overall,
                             "runs": runs})
    if not args.workdir and not args.keep_runs:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

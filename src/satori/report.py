"""The run report: the papers' claims checked against a run, tables, plots, a trajectory viewer.

``satori run`` collects everything it measured into one ``results`` dict (schema below) and
calls :func:`write_report`, which writes

- ``report.md``: header, results table, claims table, plot links, stages table;
- ``report.html``: the same, self-contained (inline CSS and JS, plots as base64 PNG) plus a
  trajectory viewer that splits each response at the meta-action tokens;
- ``results.json``: the input plus a top-level ``"claims"`` list;
- ``plots/*.png``: the plots (matplotlib, Agg canvas).

Schema of ``results`` (every piece is optional except ``models``; a quick run may have one
seed and no ablations)::

    {"preset", "date", "command", "seconds", "version", "seeds": [0, 1],
     "models": {name: {"label": str, "seeds": {"0": {"test": metrics, "ood": metrics}}}},
     "curves": {run: {"0": [{"step": 1, "reward": ..., "accuracy": ..., "response_length": ...}]}},
     "trajectories": [{"model", "id", "question", "answer", "response", "extracted", "correct"}],
     "stages": [{"name", "seconds", "skipped", "other_code"?, "final"?}]}

where ``metrics`` is the output of :func:`satori.evaluate.compute_metrics`.

Everything that comes from a model (responses, extracted answers) or from the user (labels,
commands) is HTML-escaped; the viewer's data is embedded as JSON with ``<``, ``>`` and ``&``
written as unicode escapes and is put on the page with ``textContent`` only.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from satori import __version__, coat
from satori.utils import atomic_write_text, name_files, write_json

# (claim name, model A, model B, split, metric path, rule) for "A beats B"-style claims.
# rule ">" means mean(A) > mean(B) over seeds; ">=" means mean(A) >= mean(B).
COMPARISON_CLAIMS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("RL beats format tuning", "rl_round1", "sft_coat", "test", "pass@1", ">"),
    ("COAT beats plain CoT", "rl_round1", "rl_cot", "test", "pass@1", ">"),
    ("RAE helps", "rl_round1", "rl_no_rae", "test", "pass@1", ">"),
    ("the ORM bonus helps", "rl_round1", "rl_rule_only", "test", "pass@1", ">"),
    ("the reflection bonus β helps", "rl_round1", "rl_beta0", "test", "pass@1", ">"),
    ("round 2 ≥ round 1", "rl_round2", "rl_round1", "test", "pass@1", ">="),
    # over the k samples at the evaluation temperature: at testbed scale the greedy answers of
    # the RL models never reflect, so a greedy F→T share is not measurable there
    ("F→T rises after RL", "rl_round1", "sft_coat", "test", "sampled.reflection.f_to_t_share", ">"),
    ("LaTRO beats the base model", "latro", "base", "test", "pass@1", ">"),
    ("LaTRO beats SFT on gold rationales", "latro", "sft_gold", "test", "pass@1", ">"),
)
#: the models a claim compares on their sampled answers (the F→T claim's two)
SAMPLED_CLAIM_MODELS = frozenset(m for c in COMPARISON_CLAIMS if c[4].startswith("sampled.") for m in c[1:3])
LENGTH_CLAIM = "response length first drops then grows during RL"
LENGTH_RUN = "rl_round1"
MIN_CURVE_POINTS = 6
CURVE_METRICS = (("reward", "reward"), ("accuracy", "accuracy"), ("response_length", "response length (tokens)"))
BEHAVIOUR_METRICS = (("reflect_rate", "reflect"), ("explore_rate", "explore"),
                     ("reflection.f_to_t_share", "F→T share"), ("reflection.t_to_f_share", "T→F share"))


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value). Raises on empty input."""
    if not values:
        raise ValueError("mean_std of no values")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_accuracy_difference(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Two models graded on the same problems (``a[i]``, ``b[i]``: problem i right): the
    difference of their accuracies, its standard error over problems (the sample std of the
    per-problem differences / sqrt(n)), and how many problems only A / only B got right."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equal-length gradings of at least 2 problems, got {len(a)} and {len(b)}")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    mean, std = mean_std(d)
    return {"n": len(d), "diff": mean, "se": std / math.sqrt(len(d)), "a_only": d.count(1), "b_only": d.count(-1)}


def metric_value(metrics: dict[str, Any], path: str) -> float | None:
    """The value at a dotted ``path`` (``"reflection.f_to_t_share"``), or None when absent.

    A reflection share (``[sampled.]reflection.*_share``) is None when no reflected answer
    changed correctness: ``compute_metrics`` writes 0.0 there, which would read as a
    measurement.
    """
    *head, last = path.split(".")
    parent = node_at(metrics, head)
    if not isinstance(parent, dict) or last not in parent:
        return None
    node = parent[last]
    if path.endswith("_share") and "counts" in parent:
        counts = parent["counts"]
        if counts.get("F->T", 0) + counts.get("T->F", 0) == 0:
            return None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def node_at(metrics: Any, keys: list[str]) -> Any:
    """``metrics[k1][k2]...`` for ``keys``, or None when a key is missing."""
    node = metrics
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def seed_values(results: dict[str, Any], model: str, split: str, path: str) -> list[float]:
    """The metric of ``model`` on ``split`` for every seed that measured it (seed-key order)."""
    return list(values_by_seed(results, model, split, path).values())


def values_by_seed(results: dict[str, Any], model: str, split: str, path: str) -> dict[str, float]:
    """``{seed: value}`` of the metric of ``model`` on ``split``, for every seed that measured it,
    in seed order."""
    seeds = results.get("models", {}).get(model, {}).get("seeds", {})
    values = {}
    for key in sorted(seeds, key=_seed_sort_key):
        metrics = seeds[key].get(split)
        value = metric_value(metrics, path) if metrics else None
        if value is not None:
            values[str(key)] = value
    return values


def paired_differences(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """``{seed: a - b}`` over the seeds both measured. A pipeline seed pairs its models (round 1
    starts from that seed's format-tuned model), so these differences, not the two spreads, say
    how much seed to seed variation a comparison has to clear."""
    return {seed: a[seed] - b[seed] for seed in a if seed in b}


def _seed_sort_key(key: Any) -> tuple[int, Any]:
    text = str(key)
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average; the window shrinks at the ends so the output has ``len(values)``."""
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - half): i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def mean_curve(per_seed: dict[str, list[dict[str, Any]]], key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, mean, std) of ``key`` over seeds, aligned on ``step`` (a step missing in a seed uses the others)."""
    by_step: dict[float, list[float]] = {}
    for rows in per_seed.values():
        for i, row in enumerate(rows):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                by_step.setdefault(float(row.get("step", i + 1)), []).append(float(value))
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


# --------------------------------------------------------------------------- claims


def compare_claim(results: dict[str, Any], name: str, a: str, b: str, split: str, path: str,
                  rule: str = ">") -> dict[str, Any]:
    """One "A beats B" claim.

    Held when ``mean(A) > mean(B)`` over seeds (``rule=">="``: ``mean(A) >= mean(B)``),
    None when either model has no value for the metric. The numbers also give the difference
    and ``significant``: whether ``|difference|`` exceeds the pooled std
    ``sqrt((std_A² + std_B²) / 2)``; None unless both sides have at least 2 seeds. The verdict
    never depends on significance.
    """
    by_a, by_b = values_by_seed(results, a, split, path), values_by_seed(results, b, split, path)
    va, vb = list(by_a.values()), list(by_b.values())
    numbers: dict[str, Any] = {"a": a, "b": b, "split": split, "metric": path, "rule": rule,
                               "values_a": va, "values_b": vb}
    missing = [m for m, v in ((a, va), (b, vb)) if not v]
    if missing:
        why = " and ".join(
            f"{m} is not in this run" if m not in results.get("models", {}) else f"{m} has no {split} {path}"
            for m in missing)
        return {"name": name, "held": None, "numbers": numbers, "detail": f"Not measured: {why}."}
    (ma, sa), (mb, sb) = mean_std(va), mean_std(vb)
    diff = ma - mb
    pooled = math.sqrt((sa ** 2 + sb ** 2) / 2)
    significant = abs(diff) > pooled if len(va) >= 2 and len(vb) >= 2 else None
    held = _meets(diff, rule)
    numbers.update(mean_a=ma, std_a=sa, n_a=len(va), mean_b=mb, std_b=sb, n_b=len(vb),
                   diff=diff, pooled_std=pooled, significant=significant)
    sig = {True: f"larger than the pooled std {_pct(pooled)}",
           False: f"within the pooled std {_pct(pooled)}",
           None: "too few seeds to compare with the spread"}[significant]
    detail = (f"{a} {split} {_metric_label(path)} {_pm(ma, sa, len(va))} (n={len(va)}) vs {b} "
              f"{_pm(mb, sb, len(vb))} (n={len(vb)}): difference {diff * 100:+.1f} points, {sig}.")
    paired = paired_differences(by_a, by_b)
    if len(paired) >= 2:
        ahead = sum(_meets(d, rule) for d in paired.values())
        md, sd = mean_std(list(paired.values()))
        numbers.update(seed_diffs=paired, seeds_ahead=ahead, paired_mean=md, paired_std=sd)
        detail += (f" Paired by seed ({', '.join(paired)}): " + " / ".join(f"{d * 100:+.1f}" for d in paired.values())
                   + f", {md * 100:+.1f} ± {sd * 100:.1f}; {a} {'ahead' if rule == '>' else 'level or ahead'} in "
                   f"{ahead} of {len(paired)}.")
    if path.endswith("_share"):  # a share of few events: say how many
        node = path.split(".")[:-1]
        ca, cb = (summed_counts(results, m, split, node + ["counts"], ("F->T", "T->F")) for m in (a, b))
        numbers.update(changed_a=ca, changed_b=cb)
        detail += (f" Reflected answers that changed correctness, summed over seeds: {a} {sum(ca.values())} "
                   f"({ca['F->T']} F→T, {ca['T->F']} T→F), {b} {sum(cb.values())} "
                   f"({cb['F->T']} F→T, {cb['T->F']} T→F).")
        # a mid-solution check's answer-level outcome also takes in every later step's slips; the step
        # checker's counts give the check's own effect (testbed problems only)
        sa, sb = (summed_counts(results, m, split, node + ["steps", "counts"], ("wrong_repaired", "right_broken"))
                  for m in (a, b))
        if sum(sa.values()) and sum(sb.values()):
            numbers.update(step_effect_a=sa, step_effect_b=sb)
            own = lambda c: (f"{c['wrong_repaired']:,} / {c['right_broken']:,} "  # noqa: E731
                             f"({_pct(c['wrong_repaired'] / sum(c.values()))}% repairs)")
            detail += (" The step after a check, by the step checker (the check's own effect; the answer also takes "
                       f"in later slips), repairs a wrong line / breaks a right one: {a} {own(sa)}, {b} {own(sb)}.")
    return {"name": name, "held": held, "numbers": numbers, "detail": detail}


def _meets(diff: float, rule: str) -> bool:
    """Whether A - B = ``diff`` satisfies a claim's ``rule`` (``">"``: beats; ``">="``: level or beats)."""
    return diff > 0 if rule == ">" else diff >= 0


def summed_counts(results: dict[str, Any], model: str, split: str, node: list[str],
                  keys: Sequence[str]) -> dict[str, int]:
    """``keys`` of the counts dict at ``node`` of a model's ``split`` metrics, summed over seeds
    (0 where a seed lacks them)."""
    total = {key: 0 for key in keys}
    for seed in results.get("models", {}).get(model, {}).get("seeds", {}).values():
        counts = node_at(seed.get(split), node)
        for key in total:
            total[key] += int(counts.get(key, 0)) if isinstance(counts, dict) else 0
    return total


def length_claim(results: dict[str, Any], run: str = LENGTH_RUN, min_points: int = MIN_CURVE_POINTS) -> dict[str, Any]:
    """"Response length first drops then grows during RL", from the round-1 training curve.

    The per-step mean over seeds of ``response_length`` is smoothed with a centred moving
    average of window ``max(3, n // 5)``; the claim holds when the minimum of the smoothed
    curve is strictly below both its first and its last value. None when the curve has fewer
    than ``min_points`` steps or is missing. As for the comparisons, ``significant`` (never
    used for the verdict) says whether both the drop and the rise exceed the seeds' spread
    at the minimum (the smoothed per-step std over seeds); None with one seed.
    """
    per_seed = results.get("curves", {}).get(run, {})
    steps, values, stds = mean_curve(per_seed, "response_length") if per_seed else ([], [], [])
    numbers: dict[str, Any] = {"run": run, "n_points": len(values), "n_seeds": len(per_seed)}
    if len(values) < min_points:
        detail = (f"Not measured: the {run} response-length curve has {len(values)} points "
                  f"(at least {min_points} needed).")
        return {"name": LENGTH_CLAIM, "held": None, "numbers": numbers, "detail": detail}
    window = max(3, len(values) // 5)
    smoothed = smooth(values, window)
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    start, lowest, end = smoothed[0], smoothed[low], smoothed[-1]
    held = lowest < start and lowest < end
    spread = smooth(stds, window)[low]
    significant = (start - lowest > spread and end - lowest > spread) if len(per_seed) >= 2 else None
    numbers.update(window=window, start=start, start_step=steps[0], min=lowest, min_step=steps[low],
                   end=end, end_step=steps[-1], spread_at_min=spread, significant=significant)
    detail = (f"{run} mean response length (moving average over {window} steps, {len(per_seed)} seed(s)): "
              f"{start:.1f} tokens at step {steps[0]:g}, minimum {lowest:.1f} at step {steps[low]:g}, "
              f"{end:.1f} at step {steps[-1]:g}.")
    if significant is not None:
        detail += (f" Drop {start - lowest:.1f}, rise {end - lowest:.1f} tokens; the seeds' std at the minimum is "
                   f"{spread:.1f}: {'both larger' if significant else 'not both larger'}.")
    return {"name": LENGTH_CLAIM, "held": held, "numbers": numbers, "detail": detail}


def compute_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim of the papers, checked against ``results``.

    Items are ``{"name", "held" (True / False / None = not measured), "numbers", "detail"}``.
    A comparison "A beats B" holds when the mean over seeds of A's test metric is greater
    than B's ("round 2 ≥ round 1": greater or equal); the difference and a ``significant``
    flag (difference larger than the pooled std) are reported alongside, never used for the
    verdict. See :func:`compare_claim` and :func:`length_claim` for the exact rules.
    """
    claims = [compare_claim(results, *spec) for spec in COMPARISON_CLAIMS]
    claims.insert(7, length_claim(results))  # after "F→T rises", as listed in the paper order
    return claims


# --------------------------------------------------------------------------- formatting

CLAIMS_RULE = ("\"A beats B\" holds when mean(A) > mean(B) over seeds; \"beyond pooled std\" reports whether "
               "the difference exceeds sqrt((std_A² + std_B²)/2), and \"seeds ahead\" in how many seeds A beats "
               "the B of the same seed (a seed's models share its earlier stages: round 1 starts from that seed's "
               "format-tuned model); neither decides the verdict.")


def _pct(x: float) -> str:
    return f"{x * 100:.1f}"


def _pm(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    """``"41.2 ± 2.0"`` (or ``"41.2"`` for one seed), in percent by default."""
    text = f"{mean * scale:.{digits}f}"
    return text + f" ± {std * scale:.{digits}f}" if n > 1 else text


def _metric_label(path: str) -> str:
    return {"pass@1": "pass@1 (%)", "reflection.f_to_t_share": "F→T share (%)",
            "sampled.reflection.f_to_t_share": "F→T share of the sampled answers (%)"}.get(path, path)


def _maj_key(metrics: dict[str, Any] | None) -> str | None:
    return next((k for k in (metrics or {}) if k.startswith("maj@")), None)


def _cell(results: dict[str, Any], model: str, split: str, path: str, percent: bool = True) -> str:
    values = seed_values(results, model, split, path)
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return _pm(mean, std, len(values)) if percent else _pm(mean, std, len(values), scale=1.0)


def _maj_cell(results: dict[str, Any], model: str) -> str:
    seeds = results.get("models", {}).get(model, {}).get("seeds", {})
    keys = {_maj_key(s.get("test")) for s in seeds.values()} - {None}
    if not keys:
        return "n/a"
    return " / ".join(_cell(results, model, "test", key) + ("" if len(keys) == 1 else f" ({key})")
                      for key in sorted(keys))


def results_scope(results: dict[str, Any]) -> str:
    """The sentence above the results table: which split, how many problems, how seeds combine."""
    tests = [s["test"] for m in results.get("models", {}).values() for s in m.get("seeds", {}).values()
             if s.get("test")]
    sizes = sorted({t["n"] for t in tests if "n" in t})
    sampled = sorted({t["k_problems"] for t in tests if "k_problems" in t})
    scope = "Test split unless noted"
    if sizes:
        scope += f" ({' / '.join(map(str, sizes))} problems"
        if sampled and sampled != sizes:
            scope += f"; maj@k and the sampled columns over the first {' / '.join(map(str, sampled))}"
        scope += ")"
    return scope + "; mean ± std over seeds (sample std) when there are several."


def results_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (text cells, one row per model, input order)."""
    models = results.get("models", {})
    ks = {_maj_key(s.get("test")) for m in models.values() for s in m.get("seeds", {}).values()} - {None}
    maj_header = (ks.pop() if len(ks) == 1 else "maj@k") + " (%)"
    header = ["model", "label", "seeds", "pass@1 (%)", maj_header, "OOD pass@1 (%)", "format (%)",
              "reflect (%)", "explore (%)", "F→T share (%)", "T→F share (%)", "reflect, sampled (%)",
              "F→T share, sampled (%)", "reflect after a mistake / a wrong / a right step, sampled (%)",
              "repair / break after a reflect, sampled (%)", "mean tokens"]
    rows = []
    for name, model in models.items():
        rows.append([
            name, str(model.get("label", "")), str(len(model.get("seeds", {}))),
            _cell(results, name, "test", "pass@1"), _maj_cell(results, name),
            _cell(results, name, "ood", "pass@1"), _cell(results, name, "test", "format_compliance"),
            _cell(results, name, "test", "reflect_rate"), _cell(results, name, "test", "explore_rate"),
            _cell(results, name, "test", "reflection.f_to_t_share"),
            _cell(results, name, "test", "reflection.t_to_f_share"),
            _cell(results, name, "test", "sampled.reflect_rate"),
            _cell(results, name, "test", "sampled.reflection.f_to_t_share"),
            " / ".join(_cell(results, name, "test", f"sampled.reflection.steps.p_reflect_after_{w}")
                       for w in ("mistake", "wrong", "right")),
            " / ".join(_cell(results, name, "test", f"sampled.reflection.steps.p_{w}_after_reflect")
                       for w in ("repair", "break")),
            _cell(results, name, "test", "mean_tokens", percent=False),
        ])
    return header, rows


def verdict_text(held: bool | None) -> str:
    """``"held"``, ``"not held"`` or ``"not measured"``."""
    return {True: "held", False: "not held", None: "not measured"}[held]


def claims_rows(claims: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the claims table."""
    header = ["claim", "verdict", "difference", "beyond pooled std", "seeds ahead", "numbers"]
    rows = []
    for c in claims:
        n = c["numbers"]
        diff, sig = n.get("diff"), n.get("significant")
        ahead = f"{n['seeds_ahead']} of {len(n['seed_diffs'])}" if "seed_diffs" in n else "—"
        rows.append([c["name"], verdict_text(c["held"]),
                     "" if diff is None else f"{diff * 100:+.1f} points",
                     {True: "yes", False: "no", None: "—"}[sig], ahead, c["detail"]])
    return header, rows


def stages_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the stages table (with a total row); ``final`` names the model a
    trainer kept when it selects on held-out data."""
    stages = results.get("stages", [])
    def skipped(s: dict[str, Any]) -> str:
        other = s.get("other_code")  # the files that changed since the stage was made, or True
        if not other:
            return "yes (cached)" if s.get("skipped") else "no"
        files = f": {name_files(other)} changed since" if isinstance(other, list) else ""
        return (f"yes (cached, made by other satori code{files})" if s.get("skipped")
                else f"no (resumed, started by other satori code{files})")

    rows = [[str(s.get("name", "")), f"{float(s.get('seconds', 0.0)):.1f}", skipped(s), str(s.get("final", ""))]
            for s in stages]
    if stages:
        rows.append(["total", f"{sum(float(s.get('seconds', 0.0)) for s in stages):.1f}", "", ""])
    return ["stage", "seconds", "skipped", "final model"], rows


def format_seconds(seconds: float | None) -> str:
    """``"13 min 32 s"``, ``"1 h 02 min"`` or ``"4.2 s"``; ``"n/a"`` for None."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def header_items(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The report header as (label, value) pairs."""
    seeds = results.get("seeds")
    return [
        ("preset", str(results.get("preset", "n/a"))),
        ("date", str(results.get("date", "n/a"))),
        ("command", str(results.get("command", "n/a"))),
        ("total time", format_seconds(results.get("seconds"))),
        ("seeds", ", ".join(str(s) for s in seeds) if seeds else "n/a"),
        ("satori version", str(results.get("version", __version__))),
        ("satori code", str(results.get("code", "n/a"))),
        ("report written", datetime.now().isoformat(timespec="seconds")),
    ]


# --------------------------------------------------------------------------- plots


def _new_figure(width: float = 7.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_curve(results: dict[str, Any], key: str, ylabel: str, path: Path) -> bool:
    """One line per RL run (``rl_*``): the mean over seeds of ``key`` per step, ±std band.

    Returns False (and writes nothing) when no run logged ``key``.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = False
    for run, per_seed in results.get("curves", {}).items():
        if not run.startswith("rl_"):
            continue
        steps, mean, std = mean_curve(per_seed, key)
        if not steps:
            continue
        line, = ax.plot(steps, mean, label=f"{run} (n={len(per_seed)})", linewidth=1.5)
        if len(per_seed) > 1:
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        drawn = True
    if not drawn:
        return False
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} during RL (mean over seeds, ±std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def plot_other_curves(results: dict[str, Any], path: Path) -> bool:
    """Training curves of runs that are not RL runs (e.g. LaTRO): one panel per run, each numeric key."""
    runs = {run: per_seed for run, per_seed in results.get("curves", {}).items() if not run.startswith("rl_")}
    panels = []
    for run, per_seed in runs.items():
        keys = sorted({k for rows in per_seed.values() for row in rows for k, v in row.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
        if keys:
            panels.append((run, per_seed, keys[:4]))
    if not panels:
        return False
    fig = _new_figure(7.0, 3.2 * len(panels))
    for i, (run, per_seed, keys) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for key in keys:
            steps, mean, _ = mean_curve(per_seed, key)
            ax.plot(steps, mean, label=key, linewidth=1.5)
        ax.set_title(f"{run} training (mean over {len(per_seed)} seed(s))")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def _grouped_bars(ax: Any, groups: list[str], series: list[tuple[str, list[float | None]]]) -> None:
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        ax.bar(xs, [0.0 if v is None else v for v in values], width=width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)


def plot_by_level(results: dict[str, Any], path: Path) -> bool:
    """Test pass@1 by difficulty level: one group per level, one bar per model (mean over seeds)."""
    models = results.get("models", {})
    levels: list[str] = []
    for model in models.values():
        for s in model.get("seeds", {}).values():
            for level in (s.get("test") or {}).get("by_level", {}):
                if level not in levels:
                    levels.append(level)
    if not levels:
        return False
    levels.sort(key=_seed_sort_key)
    series = []
    for name in models:
        values = []
        for level in levels:
            vals = seed_values(results, name, "test", f"by_level.{level}.pass@1")
            values.append(mean_std(vals)[0] * 100 if vals else None)
        if any(v is not None for v in values):
            series.append((name, values))
    fig = _new_figure(max(7.0, 1.2 * len(levels) + 3), 4.5)
    ax = fig.add_subplot()
    _grouped_bars(ax, [f"level {lv}" for lv in levels], series)
    ax.set_ylabel("pass@1 (%)")
    ax.set_title("Test accuracy by difficulty level (mean over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def plot_behaviour(results: dict[str, Any], path: Path) -> bool:
    """Reflect / explore rates and F→T / T→F shares per model (test split, mean over seeds)."""
    names = list(results.get("models", {}))
    series = []
    for key, label in BEHAVIOUR_METRICS:
        values = []
        for name in names:
            vals = seed_values(results, name, "test", key)
            values.append(mean_std(vals)[0] * 100 if vals else None)
        series.append((label, values))
    if not names or all(v is None for _, values in series for v in values):
        return False
    fig = _new_figure(max(7.0, 0.9 * len(names) + 2), 4.5)
    ax = fig.add_subplot()
    _grouped_bars(ax, names, series)
    ax.set_ylabel("%")
    ax.set_title("COAT behaviour on test (mean over seeds; F→T/T→F among changed answers)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def write_plots(results: dict[str, Any], plot_dir: Path) -> dict[str, tuple[Path, str]]:
    """Write every plot that has data; returns ``{name: (png path, caption)}``."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(f"rl_{key}", f"{label.capitalize()} over RL steps",
             lambda p, key=key, label=label: plot_curve(results, key, label, p)) for key, label in CURVE_METRICS]
    jobs += [("accuracy_by_level", "Test pass@1 by difficulty level", lambda p: plot_by_level(results, p)),
             ("behaviour", "Reflect / explore rates and F→T / T→F shares", lambda p: plot_behaviour(results, p)),
             ("other_curves", "Other training curves", lambda p: plot_other_curves(results, p))]
    written = {}
    for name, caption, draw in jobs:
        path = plot_dir / f"{name}.png"
        if draw(path):
            written[name] = (path, caption)
    return written


# --------------------------------------------------------------------------- markdown


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table; pipes and newlines in cells are escaped."""
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(results: dict[str, Any], claims: list[dict[str, Any]], plots: dict[str, tuple[Path, str]],
                    out_dir: Path) -> str:
    """The markdown report (same tables as the HTML, plots linked, no viewer)."""
    parts = [f"# satori run report: {results.get('preset', 'n/a')}", ""]
    parts += [f"- **{label}**: {_md_escape(value)}" for label, value in header_items(results)]
    n_held = sum(c["held"] is True for c in claims)
    n_measured = sum(c["held"] is not None for c in claims)
    parts += ["", "## Results", "",
              results_scope(results), "",
              markdown_table(*results_rows(results)),
              f"## Claims ({n_held} of {n_measured} measured held)", "",
              CLAIMS_RULE, "",
              markdown_table(*claims_rows(claims)), "## Plots", ""]
    if plots:
        for path, caption in plots.values():
            parts += [f"![{caption}]({path.relative_to(out_dir).as_posix()})", ""]
    else:
        parts += ["No plot data in this run.", ""]
    parts += ["## Stages", ""]
    header, rows = stages_rows(results)
    parts += [markdown_table(header, rows) if rows else "No stage timings recorded.\n"]
    return "\n".join(parts)


# --------------------------------------------------------------------------- HTML


def html_table(header: list[str], rows: list[list[str]], table_id: str,
               row_classes: Sequence[str] | None = None) -> str:
    """An escaped HTML table; ``row_classes`` gives an optional class per body row."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{html.escape(row_classes[i])}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def trajectory_steps(response: str) -> list[dict[str, Any]]:
    """The response split at the meta tokens: ``[{"action", "token"}, ...]`` plus ``"text"``.

    ``token`` is the meta token that opens the step, or None for a first step written
    without one.
    """
    steps = coat.parse_steps(response)
    bare_first = bool(steps) and not any(response.lstrip().startswith(t) for t in coat.META_TOKENS)
    return [{"action": s.action, "token": None if (i == 0 and bare_first) else coat.TOKEN_OF_ACTION[s.action],
             "text": s.text} for i, s in enumerate(steps)]


def viewer_data(trajectories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the viewer's JS renders: each trajectory with its COAT steps and behaviour flags."""
    out = []
    for t in trajectories:
        response = str(t.get("response", ""))
        steps = trajectory_steps(response)
        out.append({
            "model": str(t.get("model", "")), "id": str(t.get("id", "")), "question": str(t.get("question", "")),
            "answer": str(t.get("answer", "")),
            "extracted": None if t.get("extracted") is None else str(t.get("extracted")),
            "correct": bool(t.get("correct")), "steps": steps,
            "reflects": any(s["action"] == "reflect" for s in steps),
            "explores": any(s["action"] == "explore" for s in steps),
        })
    return out


def script_json(obj: Any) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>``, ``&`` and line separators escaped."""
    text = json.dumps(obj, ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:1rem 1.5rem 3rem}
h1{font-size:1.5rem;margin:.5rem 0}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d5d9e0}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:0}
dl.meta dt{font-weight:600}dl.meta dd{margin:0;font-family:ui-monospace,monospace}
nav a{margin-right:1rem}
table{border-collapse:collapse;background:#fff;font-size:.85rem;margin:.5rem 0;width:100%}
th,td{border:1px solid #d5d9e0;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#eef1f5}
tr.held td:nth-child(2){background:#dff3e3;color:#145a24;font-weight:600}
tr.not-held td:nth-child(2){background:#fbe1e1;color:#8a1c1c;font-weight:600}
tr.unmeasured td:nth-child(2){background:#eceff3;color:#555}
.plots{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;background:#fff;border:1px solid #d5d9e0;padding:.5rem;flex:1 1 480px;max-width:100%}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85rem;color:#555;margin-top:.3rem}
.filters{display:flex;gap:1rem;align-items:center;flex-wrap:wrap;margin:.5rem 0}
.traj{background:#fff;border:1px solid #d5d9e0;border-radius:6px;margin:.75rem 0;padding:.6rem .8rem}
.traj-head{display:flex;gap:.8rem;flex-wrap:wrap;align-items:center;font-size:.85rem}
.verdict{padding:.1rem .5rem;border-radius:4px;font-weight:600}
.verdict.correct{background:#dff3e3;color:#145a24}.verdict.wrong{background:#fbe1e1;color:#8a1c1c}
.question{white-space:pre-wrap;margin:.4rem 0;font-size:.9rem;color:#333}
.step{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.82rem;margin:.25rem 0;
 padding:.3rem .5rem;border-left:4px solid #b9c2cf;background:#f9fafb}
.step-continue{border-left-color:#6c8ebf}
.step-reflect{border-left-color:#d79b00;background:#fff6e0}
.step-explore{border-left-color:#9c4fd6;background:#f5ebfd}
.badge{display:inline-block;font-size:.72rem;padding:0 .4rem;border-radius:3px;margin-right:.4rem;color:#fff}
.badge-continue{background:#6c8ebf}.badge-reflect{background:#d79b00}.badge-explore{background:#9c4fd6}
.muted{color:#666}
"""

JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("traj-data").textContent);
  var list = document.getElementById("traj-list");
  var fModel = document.getElementById("f-model");
  var fVerdict = document.getElementById("f-verdict");
  var fReflect = document.getElementById("f-reflect");
  var count = document.getElementById("traj-count");
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  var models = [];
  data.forEach(function (t) { if (models.indexOf(t.model) < 0) { models.push(t.model); } });
  models.forEach(function (m) { var o = el("option", null, m); o.value = m; fModel.appendChild(o); });
  var cards = data.map(function (t) {
    var card = el("div", "traj");
    var head = el("div", "traj-head");
    head.appendChild(el("strong", "traj-model", t.model));
    head.appendChild(el("span", "muted", t.id));
    head.appendChild(el("span", "verdict " + (t.correct ? "correct" : "wrong"), t.correct ? "correct" : "wrong"));
    head.appendChild(el("span", null, "gold: " + t.answer));
    head.appendChild(el("span", null, "extracted: " + (t.extracted === null ? "(none)" : t.extracted)));
    card.appendChild(head);
    card.appendChild(el("div", "question", t.question));
    var steps = el("div", "steps");
    t.steps.forEach(function (s) {
      var step = el("div", "step step-" + s.action);
      if (s.token) { step.appendChild(el("span", "badge badge-" + s.action, s.token)); }
      step.appendChild(el("span", "step-text", s.text));
      steps.appendChild(step);
    });
    if (!t.steps.length) { steps.appendChild(el("div", "step muted", "(empty response)")); }
    card.appendChild(steps);
    list.appendChild(card);
    return card;
  });
  function apply() {
    var shown = 0;
    data.forEach(function (t, i) {
      var ok = (!fModel.value || t.model === fModel.value) &&
        (!fVerdict.value || (fVerdict.value === "correct") === t.correct) &&
        (!fReflect.checked || t.reflects);
      cards[i].hidden = !ok;
      if (ok) { shown += 1; }
    });
    count.textContent = "showing " + shown + " of " + data.length;
  }
  [fModel, fVerdict, fReflect].forEach(function (e) { e.addEventListener("change", apply); });
  apply();
})();
"""


def render_html(results: dict[str, Any], claims: list[dict[str, Any]], plots: dict[str, tuple[Path, str]]) -> str:
    """The self-contained HTML report (inline CSS/JS, plots as base64 PNG, trajectory viewer)."""
    esc = html.escape
    meta = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in header_items(results))
    claim_classes = [{True: "held", False: "not-held", None: "unmeasured"}[c["held"]] for c in claims]
    n_held = sum(c["held"] is True for c in claims)
    n_measured = sum(c["held"] is not None for c in claims)
    figures = []
    for name, (path, caption) in plots.items():
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(f'<figure><img class="plot" id="plot-{esc(name)}" alt="{esc(caption)}" '
                       f'src="data:image/png;base64,{b64}"><figcaption>{esc(caption)}</figcaption></figure>')
    stage_header, stage_rows = stages_rows(results)
    trajectories = viewer_data(results.get("trajectories", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>satori report: {esc(str(results.get('preset', 'n/a')))}</title>
<style>{CSS}</style></head>
<body><main>
<h1>satori run report: {esc(str(results.get('preset', 'n/a')))}</h1>
<dl class="meta">{meta}</dl>
<nav><a href="#results">results</a><a href="#claims">claims</a><a href="#plots">plots</a>
<a href="#viewer">trajectories</a><a href="#stages">stages</a></nav>
<section id="results"><h2>Results</h2>
<p>{esc(results_scope(results))}</p>
{html_table(*results_rows(results), table_id="results-table")}</section>
<section id="claims"><h2>Claims ({n_held} of {n_measured} measured held)</h2>
<p>{esc(CLAIMS_RULE)}</p>
{html_table(*claims_rows(claims), table_id="claims-table", row_classes=claim_classes)}</section>
<section id="plots"><h2>Plots</h2><div class="plots">{''.join(figures) or '<p>No plot data in this run.</p>'}</div></section>
<section id="viewer"><h2>Trajectories</h2>
<div class="filters">
<label>model <select id="f-model"><option value="">all</option></select></label>
<label>verdict <select id="f-verdict"><option value="">all</option><option value="correct">correct</option>
<option value="wrong">wrong</option></select></label>
<label><input type="checkbox" id="f-reflect"> reflects</label>
<span id="traj-count" class="muted"></span>
<span><span class="badge badge-continue">continue</span><span class="badge badge-reflect">reflect</span><span class="badge badge-explore">explore</span></span>
</div>
<noscript><p>The trajectory viewer needs JavaScript.</p></noscript>
<div id="traj-list"></div>
<script type="application/json" id="traj-data">{script_json(trajectories)}</script>
</section>
<section id="stages"><h2>Stages</h2>
{html_table(stage_header, stage_rows, table_id="stages-table") if stage_rows else '<p>No stage timings recorded.</p>'}
</section>
</main>
<script>{JS}</script>
</body></html>
"""


# --------------------------------------------------------------------------- entry point


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``results.json`` and ``plots/*.png`` into ``out_dir``.

    ``results.json`` is the input plus a top-level ``"claims"`` list (each with ``name``,
    ``held``, ``numbers``, ``detail``). Returns ``{"markdown", "html", "json"}`` and one
    ``"plot_<name>"`` entry per written plot, each mapped to its path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claims = compute_claims(results)
    plots = write_plots(results, out / "plots")
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
    atomic_write_text(paths["markdown"], render_markdown(results, claims, plots, out))
    atomic_write_text(paths["html"], render_html(results, claims, plots))
    write_json(paths["json"], {**results, "claims": claims})
    paths.update({f"plot_{name}": path for name, (path, _) in plots.items()})
    return paths

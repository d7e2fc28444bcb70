"""Evaluation of any causal LM on any problem set.

Greedy pass@1; pass@k and maj@k from ``k`` samples; a per-level breakdown; format
compliance (a parseable final answer in a valid COAT structure); the COAT behaviour
metrics: how often a response reflects or explores, and after a reflection whether the
answer went wrong→right (F→T) or right→wrong (T→F), comparing the answer written before the
first ``<|reflect|>`` with the final one; mean response tokens and truncation rate.

The metrics are a pure function of per-problem records (:func:`compute_metrics`), so they
are unit-tested on hand-made samples; :func:`evaluate` produces those records from a model.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from satori import coat
from satori.config import check, to_dict
from satori.data import DataConfig, Problem, build_prompt, load_problems, read_jsonl
from satori.errors import SatoriError
from satori.grading import answers_equal, extract_answer, grade_batch, normalize_answer
from satori.rollout import Sample, generate, load_model, load_tokenizer
from satori.testbed.checker import reflection_points
from satori.testbed.tasks import has_ground_truth
from satori.utils import seed_everything, set_threads, write_json, write_jsonl


@dataclass
class GenConfig:
    """How responses are generated."""

    max_new_tokens: int = 400
    batch_size: int = 64
    max_batch_tokens: int = 65536
    use_chat_template: bool = True

    def validate(self) -> None:
        check(self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        check(self.max_batch_tokens > 0, f"max_batch_tokens must be > 0, got {self.max_batch_tokens}")


@dataclass
class EvalConfig:
    """``satori eval``: evaluate a model on a problem set."""

    __aliases__: ClassVar[dict[str, str]] = {"data": "data.path"}

    model: str = field(default="", metadata={"help": "local model folder"})
    data: DataConfig = field(default_factory=DataConfig)
    out: str = field(default="", metadata={"help": "output folder (default: MODEL/eval-DATA)"})
    gen: GenConfig = field(default_factory=GenConfig)
    k: int = field(default=0, metadata={"help": "samples per problem for pass@k / maj@k (0: greedy only)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature for the k samples"})
    sample_limit: int = field(default=0, metadata={
        "help": "draw the k samples for the first N problems only (0: all); greedy pass@1 covers every problem"})
    seed: int = 0
    threads: int = 0
    last_number_fallback: bool = False

    def validate(self) -> None:
        check(self.k >= 0, f"k must be >= 0, got {self.k}")
        check(self.temperature > 0, f"temperature must be > 0 for sampling, got {self.temperature}")
        check(self.sample_limit >= 0, f"sample_limit must be >= 0, got {self.sample_limit}")


# --------------------------------------------------------------------------- metrics


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent extracted answer (normalised); ties go to the first seen."""
    keys = [normalize_answer(a) for a in answers if a is not None and a.strip()]
    if not keys:
        return None
    counts = Counter(keys)
    best = max(counts.values())
    return next(k for k in keys if counts[k] == best)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def reflection_outcome(pre_correct: bool | None, final_correct: bool) -> str | None:
    """``"F->T"``, ``"T->F"``, ``"T->T"`` or ``"F->F"`` for a reflected response (None if it did not reflect)."""
    if pre_correct is None:
        return None
    return ("T" if pre_correct else "F") + "->" + ("T" if final_correct else "F")


def _rate(num: float, den: float) -> float:
    return num / den if den else 0.0


def compute_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics from per-problem records.

    Each record has ``level``, ``greedy`` (a dict with ``correct``, ``valid_format``,
    ``reflects``, ``explores``, ``pre_reflect_correct`` (None when it did not reflect),
    ``n_tokens``, ``truncated``) and ``samples`` (a list of dicts with ``extracted`` and
    ``correct``; empty for every problem, or for the problems past a sample limit). The
    sampled metrics (``pass@k``, ``maj@k``, ``sample_accuracy``) are over the problems with
    samples, ``k_problems`` of them. When the samples also carry ``reflects``, ``explores`` and
    ``pre_reflect_correct``, ``sampled`` holds the behaviour metrics over all their samples
    (a small model may reflect at temperature > 0 and never greedily).
    """
    n = len(records)
    if n == 0:
        return {"n": 0}
    greedy = [r["greedy"] for r in records]
    out: dict[str, Any] = {
        "n": n,
        "pass@1": _rate(sum(g["correct"] for g in greedy), n),
        "format_compliance": _rate(sum(g["valid_format"] for g in greedy), n),
        "reflect_rate": _rate(sum(g["reflects"] for g in greedy), n),
        "explore_rate": _rate(sum(g["explores"] for g in greedy), n),
        "truncation_rate": _rate(sum(g["truncated"] for g in greedy), n),
        "mean_tokens": sum(g["n_tokens"] for g in greedy) / n,
    }
    out["reflection"] = reflection_stats(greedy)
    with_samples = [r for r in records if r["samples"]]
    if with_samples:
        ks = {len(r["samples"]) for r in with_samples}
        if len(ks) != 1:
            raise ValueError("every record with samples must have the same number of them")
        k, n_k = ks.pop(), len(with_samples)
        out["k"], out["k_problems"] = k, n_k
        if k > 1:  # a sampled pass@1 is ``sample_accuracy``: "pass@1" stays the greedy one
            out[f"pass@{k}"] = sum(pass_at_k(k, sum(s["correct"] for s in r["samples"]), k) for r in with_samples) / n_k
        out[f"maj@{k}"] = _rate(sum(_majority_correct(r["samples"]) for r in with_samples), n_k)
        out["sample_accuracy"] = sum(sum(s["correct"] for s in r["samples"]) / k for r in with_samples) / n_k
        samples = [s for r in with_samples for s in r["samples"]]
        if all("pre_reflect_correct" in s for s in samples):
            out["sampled"] = {
                "n": len(samples),
                "reflect_rate": _rate(sum(s["reflects"] for s in samples), len(samples)),
                "explore_rate": _rate(sum(s["explores"] for s in samples), len(samples)),
                "reflection": reflection_stats(samples),
            }
    by_level: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_level[r.get("level")].append(r)
    if len(by_level) > 1 or None not in by_level:
        out["by_level"] = {
            str(level): _level_metrics(rs) for level, rs in sorted(by_level.items(), key=lambda kv: str(kv[0]))
        }
    return out


def reflection_stats(responses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """F→T / T→F counts, shares and rates over responses with ``pre_reflect_correct`` and ``correct``."""
    outcomes = Counter(reflection_outcome(r["pre_reflect_correct"], r["correct"]) for r in responses)
    n_reflected = sum(v for key, v in outcomes.items() if key is not None)
    changed = outcomes["F->T"] + outcomes["T->F"]
    return {
        "n_reflected": n_reflected,
        "counts": {key: outcomes[key] for key in ("F->T", "T->F", "T->T", "F->F")},
        # among reflected answers that changed correctness (the paper's F→T vs T→F split)
        "f_to_t_share": _rate(outcomes["F->T"], changed),
        "t_to_f_share": _rate(outcomes["T->F"], changed),
        # over all reflected responses
        "f_to_t_rate": _rate(outcomes["F->T"], n_reflected),
        "t_to_f_rate": _rate(outcomes["T->F"], n_reflected),
        **({"steps": step_reflection_stats([r["step_reflects"] for r in responses])}
           if responses and all("step_reflects" in r for r in responses) else {}),
    }


def step_reflection_stats(counts: Sequence[dict[str, int]]) -> dict[str, Any]:
    """Whether reflections follow mistakes: P(reflect | the line so far is wrong) against
    P(reflect | it is right), and P(reflect | the step just made a right line wrong), the
    plainest sign that a model notices its own slip (a slip counts there once, however many
    wrong steps follow it; the first counts each of them), over every step of every response
    (``step_reflects`` counts, from :func:`satori.testbed.checker.reflection_points`),
    P(wrong | reflect), and what the step after a reflection does to the line: puts a wrong
    line right (a repair) or a right line wrong (a break). These two are the reflection's own effect; the answer-level F→T /
    T→F counts of a mid-solution reflection also take in every later step's slips."""
    tot = Counter()
    for c in counts:
        tot.update(c)
    reflected = tot["wrong_reflected"] + tot["right_reflected"]
    return {
        "counts": {key: tot[key] for key in ("wrong", "wrong_reflected", "right", "right_reflected", "mistakes",
                                             "mistakes_reflected", "wrong_repaired", "right_broken")},
        "p_reflect_after_wrong": _rate(tot["wrong_reflected"], tot["wrong"]),
        "p_reflect_after_mistake": _rate(tot["mistakes_reflected"], tot["mistakes"]),
        "p_reflect_after_right": _rate(tot["right_reflected"], tot["right"]),
        "p_wrong_given_reflect": _rate(tot["wrong_reflected"], reflected),
        # of the reflections after a wrong line, the share whose next step puts the line right
        "p_repair_after_reflect": _rate(tot["wrong_repaired"], tot["wrong_reflected"]),
        # of the reflections after a right line, the share whose next step puts the line wrong
        "p_break_after_reflect": _rate(tot["right_broken"], tot["right_reflected"]),
    }


def _majority_correct(samples: Sequence[dict[str, Any]]) -> bool:
    winner = majority_answer([s["extracted"] for s in samples])
    if winner is None:
        return False
    return any(s["correct"] for s in samples if s["extracted"] is not None and normalize_answer(s["extracted"]) == winner)


def _level_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    m = {"n": len(records), "pass@1": _rate(sum(r["greedy"]["correct"] for r in records), len(records))}
    with_samples = [r for r in records if r["samples"]]
    if with_samples:
        k = len(with_samples[0]["samples"])
        m[f"maj@{k}"] = _rate(sum(_majority_correct(r["samples"]) for r in with_samples), len(with_samples))
    return m


# --------------------------------------------------------------------------- records from a model


def response_record(sample: Sample, problem: Problem, extracted: str | None, correct: bool) -> dict[str, Any]:
    """Everything evaluation keeps about one greedy response."""
    beh = coat.behaviour(sample.text)
    # where it could have reflected, by the step checker (testbed problems only)
    points = reflection_points(problem, sample.text) if has_ground_truth(problem) else None
    return {
        "text": sample.text,
        "extracted": extracted,
        "correct": bool(correct),
        "truncated": sample.truncated,
        "n_tokens": len(sample.response_ids),
        "valid_format": extracted is not None and coat.is_valid_coat(sample.text),
        "reflects": beh["reflects"],
        "explores": beh["explores"],
        "n_steps": beh["n_steps"],
        "pre_reflect_correct": pre_reflect_correct(problem, sample.text, points) if beh["reflects"] else None,
        **({"step_reflects": step_reflect_counts(points)} if points is not None else {}),
    }


def pre_reflect_correct(problem: Problem, text: str, points: list[tuple[bool, bool]] | None) -> bool | None:
    """Whether what a response had before its first ``<|reflect|>`` was right: the answer it
    wrote there, or, when it reflects mid-solution on a testbed problem (no answer yet), the
    line of reasoning so far (``points``, :func:`satori.testbed.checker.reflection_points` of
    ``text``: the step checker's verdict on the steps before the reflection). None when
    neither can be told (no answer before the reflection, no step checker)."""
    pre = extract_answer(coat.answer_before_first_reflect(text), last_number_fallback=False)
    if pre is not None:
        return answers_equal(pre, problem.answer)
    return next((ok for ok, reflected in points or () if reflected), None)


def step_reflect_counts(points: Sequence[tuple[bool, bool]]) -> dict[str, int]:
    """Steps after which the line of reasoning is wrong / right, and how many of each a
    ``<|reflect|>`` follows (from :func:`satori.testbed.checker.reflection_points`; see
    :func:`step_reflection_stats`)."""
    # each reflection that a step follows: (the line before it is right, the line after that step is right)
    followed = [(ok, nxt) for (ok, r), (nxt, _) in zip(points, points[1:]) if r]
    # the steps that make a right line (or the empty start) wrong: the model's fresh mistakes
    fresh = [r for (before, _), (ok, r) in zip([(True, False), *points], points) if before and not ok]
    return {"wrong": sum(not ok for ok, _ in points), "wrong_reflected": sum(r and not ok for ok, r in points),
            "right": sum(ok for ok, _ in points), "right_reflected": sum(r and ok for ok, r in points),
            "mistakes": len(fresh), "mistakes_reflected": sum(fresh),
            # a reflection after a wrong line, and the next step (the explore) makes the line right
            "wrong_repaired": sum(not ok and nxt for ok, nxt in followed),
            # a reflection after a right line, and the next step (the explore, or the step after
            # a <|continue|>) makes the line wrong
            "right_broken": sum(ok and not nxt for ok, nxt in followed)}


def evaluate(model: Any, tokenizer: Any, problems: Sequence[Problem], cfg: EvalConfig,
             progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``model`` on ``problems``: (metrics, per-problem records)."""
    prompts = [build_prompt(p, tokenizer, use_chat_template=cfg.gen.use_chat_template) for p in problems]
    golds = [p.answer for p in problems]
    common = dict(max_new_tokens=cfg.gen.max_new_tokens, batch_size=cfg.gen.batch_size,
                  max_batch_tokens=cfg.gen.max_batch_tokens, progress=progress)
    greedy = generate(model, tokenizer, prompts, temperature=0.0, seed=cfg.seed, desc="eval greedy", **common)
    graded = grade_batch([s.text for s in greedy], golds, truncated=[s.truncated for s in greedy],
                         last_number_fallback=cfg.last_number_fallback)
    sampled_graded: list[list[dict[str, Any]]] = [[] for _ in problems]
    if cfg.k:
        limit = cfg.sample_limit or len(prompts)
        sampled = generate(model, tokenizer, prompts[:limit], temperature=cfg.temperature, n=cfg.k, seed=cfg.seed,
                           desc=f"eval k={cfg.k}", **common)
        res = grade_batch([s.text for s in sampled], [golds[s.index] for s in sampled],
                          truncated=[s.truncated for s in sampled], last_number_fallback=cfg.last_number_fallback)
        for s, (ext, ok) in zip(sampled, res):
            sampled_graded[s.index].append(response_record(s, problems[s.index], ext, ok))
    records = []
    for i, (p, s, (ext, ok)) in enumerate(zip(problems, greedy, graded)):
        records.append({
            "id": p.id, "level": p.meta.get("level"), "question": p.question, "answer": p.answer,
            "greedy": response_record(s, p, ext, ok), "samples": sampled_graded[i],
        })
    return compute_metrics(records), records


def sample_graded(model: Any, tokenizer: Any, problems: Sequence[Problem], *, k: int, temperature: float,
                  max_new_tokens: int, seed: int, batch_size: int = 64, last_number_fallback: bool = False,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Sample ``k`` responses per problem and grade them: one flat record per sample
    (``id``, ``question``, ``answer``, ``response``, ``correct``, ``truncated``, ``sample``)."""
    prompts = [build_prompt(p, tokenizer) for p in problems]
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, n=k,
                       batch_size=batch_size, seed=seed, progress=progress, desc=f"sample k={k}")
    graded = grade_batch([s.text for s in samples], [problems[s.index].answer for s in samples],
                         truncated=[s.truncated for s in samples], last_number_fallback=last_number_fallback)
    return [{"id": problems[s.index].id, "question": problems[s.index].question, "answer": problems[s.index].answer,
             "response": s.text, "correct": bool(ok), "truncated": s.truncated, "sample": s.meta["sample"]}
            for s, (_, ok) in zip(samples, graded)]


def read_samples(path: str | Path, last_number_fallback: bool = False) -> list[dict[str, Any]]:
    """Graded samples from a JSONL file: each line needs ``response``, ``id`` or ``question``,
    and ``correct`` (a bool) or an ``answer`` to grade against. Errors name the line."""
    records = read_jsonl(path)
    if not records:
        raise SatoriError(f"{path}: no samples")
    to_grade = []
    for i, rec in enumerate(records, 1):
        where = f"{path}:{i}"
        if not isinstance(rec.get("response"), str):
            raise SatoriError(f"{where}: missing or non-text field 'response'")
        if not isinstance(rec.get("id"), (str, int)) and not isinstance(rec.get("question"), str):
            raise SatoriError(f"{where}: a sample needs an 'id' or a 'question'")
        if "correct" in rec:
            if not isinstance(rec["correct"], bool):
                raise SatoriError(f"{where}: field 'correct' must be true or false, got {rec['correct']!r}")
        elif isinstance(rec.get("answer"), (str, int, float)) and not isinstance(rec.get("answer"), bool):
            to_grade.append(i - 1)
        else:
            raise SatoriError(f"{where}: needs a 'correct' flag or an 'answer' to grade against")
    if to_grade:
        res = grade_batch([records[j]["response"] for j in to_grade], [str(records[j]["answer"]) for j in to_grade],
                          truncated=[bool(records[j].get("truncated", False)) for j in to_grade],
                          last_number_fallback=last_number_fallback)
        for j, (_, ok) in zip(to_grade, res):
            records[j]["correct"] = bool(ok)
    out = []
    for rec in records:
        r = dict(rec)
        if "id" in r:
            r["id"] = str(r["id"])
        r["truncated"] = bool(r.get("truncated", False))
        out.append(r)
    return out


def markdown_table(metrics: dict[str, Any], title: str = "") -> str:
    """A small markdown summary of :func:`compute_metrics` output."""
    rows = [("problems", metrics["n"]), ("pass@1 (greedy)", metrics["pass@1"])]
    if "k" in metrics:
        k = metrics["k"]
        rows += [(f"pass@{k}", metrics[f"pass@{k}"])] if k > 1 else [("sampled accuracy", metrics["sample_accuracy"])]
        rows += [(f"maj@{k}", metrics[f"maj@{k}"])]
        if metrics.get("k_problems", metrics["n"]) < metrics["n"]:
            rows += [("problems sampled (first N)", metrics["k_problems"])]
    rows += [("format compliance", metrics["format_compliance"]), ("reflect rate", metrics["reflect_rate"]),
             ("explore rate", metrics["explore_rate"]),
             ("F→T share of changed", metrics["reflection"]["f_to_t_share"]),
             ("T→F share of changed", metrics["reflection"]["t_to_f_share"]),
             ("reflected responses", metrics["reflection"]["n_reflected"]),
             ("truncation rate", metrics["truncation_rate"]), ("mean response tokens", metrics["mean_tokens"])]
    lines = [f"### {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for name, v in rows:
        lines.append(f"| {name} | {v:.3f} |" if isinstance(v, float) else f"| {name} | {v} |")
    if "by_level" in metrics:
        lines += ["", "| level | n | pass@1 |" + (" maj |" if "k" in metrics else ""),
                  "|---|---|---|" + ("---|" if "k" in metrics else "")]
        for level, m in metrics["by_level"].items():
            maj = next((f" {v:.3f} |" for key, v in m.items() if key.startswith("maj@")), "")
            lines.append(f"| {level} | {m['n']} | {m['pass@1']:.3f} |{maj}")
    return "\n".join(lines) + "\n"


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """``satori eval``: load, evaluate, write ``results.json``, ``results.md``, ``samples.jsonl``."""
    if not cfg.model:
        raise SatoriError("--model is required")
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    problems = load_problems(cfg.data)
    model = load_model(cfg.model)
    t0 = time.time()
    metrics, records = evaluate(model, tokenizer, problems, cfg)
    metrics["seconds"] = round(time.time() - t0, 2)
    data_name = cfg.data.path.replace(":", "-").replace("/", "_").strip("_.")
    out = Path(cfg.out) if cfg.out else Path(cfg.model) / f"eval-{data_name}"
    write_json(out / "results.json", {"config": to_dict(cfg), "metrics": metrics})
    (out / "results.md").write_text(markdown_table(metrics, title=f"{cfg.model} on {cfg.data.path}"))
    write_jsonl(out / "samples.jsonl", records)
    metrics["out"] = str(out)
    return metrics

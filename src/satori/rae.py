"""``satori rae``: Restart-and-Explore initial states for RL (METHOD.md §3).

The format-tuned policy samples ``k`` solutions per problem (or an existing graded samples
file is read). For each problem we pick, with a seeded RNG, one correct and one wrong
trajectory, cut off its last ``T`` steps (``T`` drawn uniformly from
``t_min..min(t_max, n_steps - 1)``, so at least one step always stays; steps that extend the
line of reasoning, see below) and append
``<|reflect|>``. The cut of a correct trajectory goes to the positive restart buffer
(status ``+1``), the cut of a wrong one to the negative buffer (status ``-1``); every
original problem is also an initial state (status ``0``, empty prefix). RL samples its
initial states from this merged set; the reward bonus depends on the status.

Choices made here, each one deliberate:

* **Step boundaries** are the meta-action tokens (:func:`satori.coat.parse_steps`); a
  response without tokens is one step, so only ``T = 0`` is possible for it.
* **``T`` counts the steps that extend the line of reasoning** (continue and explore steps):
  a state never ends on a reflection, so ``<|reflect|>`` is never appended right after a
  ``<|reflect|>`` step. A cut keeps a solution step and drops everything after it, the
  reflections on it included; ``T = 0`` drops a reflection that ends the response. Two
  reflections in a row are a situation no COAT demonstration contains, and the model cannot
  use it: see ``benchmarks/restart_states.py`` (in the full preset's seed-0 buffer cut the
  old way, 478 of 3,022 restart states ended so, and the format-tuned model finished few of
  them right).
* **The final-answer step is a step like any other.** ``T = 0`` keeps the whole response,
  boxed answer included (not a reflection after it), and the model is asked to reflect on
  its finished answer;
  ``T >= 1`` removes the answer step and the ``T - 1`` steps before it, so the model
  reflects on unfinished reasoning.
* **Where a wrong trajectory is cut** (``negative_cut``). ``end``, the paper's rule, cuts
  back ``T`` steps from the end like a correct one, so a negative state may end before the
  mistake, on a line that is still right. ``first_error`` (testbed problems only) asks the
  step checker where the line first goes wrong and cuts right after that step, so every
  negative state ends on a mistake that the reflection can find (its ``T`` may then exceed
  ``t_max``); a wrong answer whose line has no wrong step keeps its drawn ``T``. The cut is
  still at least ``t_min`` steps back, so with ``t_min: 1`` a mistake in the final step leaves
  a state that ends before it.
* **``t_min``** (default 0, the paper's range ``0..2``) cuts back at least ``t_min`` steps.
  With 1, no state reflects after a finished answer. Even when the demonstrations never do
  (``synth.reflect_position: step``) the model may: the testbed presets' format-tuned model
  reflected after its answer in 602 of 16,000 sampled answers, and RL from ``T = 0`` states
  is what trained that out of it (configs/full.yaml), so the presets keep 0.
* **Truncated samples** (hit the length limit without an end token) and blank ones are
  never restart sources: they have no final step to reflect on; nor are samples with no
  more than ``t_min`` steps.
* **The context check** counts ``prompt tokens + prefix tokens`` with the policy's
  tokenizer against ``max_prompt_tokens`` (or ``max_position_embeddings - max_new_tokens``);
  a state that does not fit is refused with an error naming it, or dropped and counted
  with ``on_overflow: skip``.

Outputs in ``out``: ``initial_states.jsonl`` (``id``, ``question``, ``answer``, ``prefix``,
``status``, ``T``, ``meta``), ``rae_stats.json`` and, when the policy was sampled,
``samples.jsonl`` (one graded sample per line; ``satori rae --samples`` reads it back).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from satori.coat import REFLECT, Step, coat_token_ids, parse_steps, render_steps
from satori.config import check, to_dict
from satori.data import DataConfig, Problem, build_prompt, load_problems
from satori.errors import SatoriError
from satori.rollout import load_model, load_tokenizer
from satori.testbed.checker import first_wrong_prefix
from satori.testbed.tasks import has_ground_truth
from satori.evaluate import read_samples, sample_graded
from satori.utils import seed_everything, set_threads, write_json, write_jsonl

STATUS_ORIGINAL, STATUS_POSITIVE, STATUS_NEGATIVE = 0, 1, -1
# How T counts steps (see the module docstring). It is part of ``satori run``'s cache key for the
# rae stage, so a run folder whose states were cut by another rule (a reflection counted as a
# step before 2026-12-06) cuts them again rather than reuse them.
CUT_RULE = "line steps"
NEGATIVE_CUTS = ("end", "first_error")


@dataclass
class RAEConfig:
    """``satori rae``: build the Restart-and-Explore initial states for PPO."""

    __aliases__: ClassVar[dict[str, str]] = {"data": "data.path"}

    policy: str = field(default="", metadata={"help": "format-tuned model folder (sampler, tokenizer, context size)"})
    data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:train"))
    out: str = field(default="", metadata={"help": "output folder"})
    samples: str = field(default="", metadata={"help": "graded samples JSONL (id or question, response, correct); "
                                                       "skips sampling the policy"})
    k: int = field(default=8, metadata={"help": "samples per problem"})
    temperature: float = 1.0
    max_new_tokens: int = field(default=400, metadata={"help": "sampling length; also the RL generation budget the "
                                                               "states must leave room for"})
    gen_batch_size: int = 64
    t_max: int = field(default=2, metadata={"help": "cut back T in t_min..t_max steps"})
    t_min: int = field(default=0, metadata={
        "help": "cut back at least t_min steps (0, the paper: a reflection may follow the final answer; 1: never)"})
    negative_cut: str = field(default="end", metadata={
        "help": "where wrong trajectories are cut: end (back T steps from the end, the paper) or first_error "
                "(right after the step where the line first goes wrong, by the testbed step checker)"})
    include_originals: bool = field(default=True, metadata={"help": "add each problem itself (status 0)"})
    max_prompt_tokens: int = field(default=0, metadata={"help": "limit on prompt + prefix tokens "
                                                                  "(0: max_position_embeddings - max_new_tokens)"})
    on_overflow: str = field(default="raise", metadata={"help": "raise or skip states that do not fit"})
    last_number_fallback: bool = False
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        check(self.k > 0, f"k must be > 0, got {self.k}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        check(self.gen_batch_size > 0, f"gen_batch_size must be > 0, got {self.gen_batch_size}")
        check(0 <= self.t_min <= self.t_max, f"need 0 <= t_min <= t_max, got t_min {self.t_min}, t_max {self.t_max}")
        check(self.max_prompt_tokens >= 0, f"max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        check(self.on_overflow in ("raise", "skip"), f"on_overflow must be raise or skip, got {self.on_overflow!r}")
        check(self.negative_cut in NEGATIVE_CUTS,
              f"negative_cut must be one of {', '.join(NEGATIVE_CUTS)}, got {self.negative_cut!r}")


# --------------------------------------------------------------------------- graded samples


def group_samples(problems: Sequence[Problem], samples: Sequence[dict[str, Any]]
                  ) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Samples per problem id, matched by ``id`` (else by question text); also the number of
    samples that match no problem. A sample whose id matches but whose question differs is
    refused: it was sampled on another problem set."""
    by_id = {p.id: p for p in problems}
    by_question = {p.question: p.id for p in problems}
    groups: dict[str, list[dict[str, Any]]] = {p.id: [] for p in problems}
    unmatched = 0
    for s in samples:
        sid = s.get("id")
        if sid is not None and sid in by_id:
            q = s.get("question")
            if isinstance(q, str) and q.strip() != by_id[sid].question.strip():
                raise SatoriError(f"sample for problem {sid!r} has a different question than the problem set; "
                                  "were the samples made on other data?")
            groups[sid].append(s)
        elif isinstance(s.get("question"), str) and s["question"].strip() in by_question:
            groups[by_question[s["question"].strip()]].append(s)
        else:
            unmatched += 1
    return groups, unmatched


# --------------------------------------------------------------------------- cutting


def line_step_ends(steps: Sequence[Step]) -> list[int]:
    """Where a restart state may end: for each of the COAT ``steps`` (``parse_steps`` of a
    response) that extends the line of reasoning (a continue or explore step, not a
    reflection), how many steps a cut right after it keeps. ``T = t`` keeps ``ends[-1 - t]``."""
    return [i + 1 for i, step in enumerate(steps) if step.action != "reflect"]


def cut_trajectory(response: str, t: int) -> str:
    """``response`` cut right after its line step ``t`` places before the last one (line steps:
    continue / explore steps; whatever follows the cut, reflections included, goes), followed by
    ``<|reflect|>``: a state never ends on a reflection.

    ``t = 0`` keeps every step up to the last line step (the final answer included). Refuses
    ``t`` that would cut away every line step, and blank responses.
    """
    steps = parse_steps(response)
    if not steps:
        raise SatoriError("cannot cut a blank response")
    ends = line_step_ends(steps)
    if not 0 <= t < len(ends):
        raise SatoriError(f"cannot cut back {t} steps from a response with {len(ends)} step(s) "
                          f"that extend its line of reasoning")
    return render_steps(steps[: ends[-1 - t]]) + REFLECT


def usable_samples(samples: Sequence[dict[str, Any]], t_min: int = 0) -> list[dict[str, Any]]:
    """The samples a restart state may come from: not truncated, and with more than ``t_min``
    line steps (so a blank one never is, and a cut of ``t_min`` steps leaves at least one)."""
    return [s for s in samples
            if not s.get("truncated") and len(line_step_ends(parse_steps(s["response"]))) > t_min]


def first_error_cut(problem: Problem, response: str) -> int | None:
    """``T`` that cuts ``response`` right after the COAT step where its line of reasoning first
    goes wrong (by the testbed step checker), so the state ends on the mistake; None when no
    prefix's line is wrong (a wrong boxed answer after a right line)."""
    steps = parse_steps(response)
    first = first_wrong_prefix(problem, [render_steps(steps[: i + 1]) for i in range(len(steps))])
    if first is None:
        return None
    return sum(end > first + 1 for end in line_step_ends(steps))  # the line steps after the mistake


def _restart_state(problem: Problem, sample: dict[str, Any], status: int, t_range: tuple[int, int],
                   rng: random.Random, negative_cut: str = "end") -> dict[str, Any]:
    n_steps = len(line_step_ends(parse_steps(sample["response"])))
    t = rng.randint(t_range[0], min(t_range[1], n_steps - 1))
    if status == STATUS_NEGATIVE and negative_cut == "first_error":
        at_error = first_error_cut(problem, sample["response"])
        t = t if at_error is None else max(at_error, t_range[0])
    tag = "pos" if status == STATUS_POSITIVE else "neg"
    return {
        "id": f"{problem.id}/{tag}", "question": problem.question, "answer": problem.answer,
        "prefix": cut_trajectory(sample["response"], t), "status": status, "T": t,
        "meta": {**problem.meta, "problem_id": problem.id, "sample": sample.get("sample"), "n_steps": n_steps},
    }


def build_initial_states(problems: Sequence[Problem], samples: Sequence[dict[str, Any]], t_max: int,
                         rng: random.Random, include_originals: bool = True, negative_cut: str = "end",
                         t_min: int = 0) -> list[dict[str, Any]]:
    """The merged initial states: originals (status 0), then the positive buffer (+1), then
    the negative buffer (-1), each in problem order.

    Per problem, in this order of RNG draws: choose a correct sample, draw its ``T``; choose
    a wrong sample, draw its ``T`` (in ``t_min..t_max``). Truncated and blank samples are never
    chosen, nor samples with no more than ``t_min`` steps; samples matching no problem are
    ignored (see :func:`group_samples`). With ``negative_cut == "first_error"`` a wrong sample
    is cut at its first mistake instead (:func:`first_error_cut`, but at least ``t_min`` steps
    back; the drawn ``T`` is kept when its line has none, so the draws stay the same); this
    needs testbed problems.
    """
    if negative_cut == "first_error":
        no_truth = next((p.id for p in problems if not has_ground_truth(p)), None)
        if no_truth is not None:
            raise SatoriError(f"negative_cut first_error needs the testbed step checker; problem {no_truth!r} "
                              "is not a testbed problem (use negative_cut end)")
    groups, _ = group_samples(problems, samples)
    positive, negative = [], []
    for p in problems:
        usable = usable_samples(groups[p.id], t_min)
        correct = [s for s in usable if s["correct"]]
        wrong = [s for s in usable if not s["correct"]]
        if correct:
            positive.append(_restart_state(p, rng.choice(correct), STATUS_POSITIVE, (t_min, t_max), rng))
        if wrong:
            negative.append(_restart_state(p, rng.choice(wrong), STATUS_NEGATIVE, (t_min, t_max), rng, negative_cut))
    originals = [{"id": p.id, "question": p.question, "answer": p.answer, "prefix": "",
                  "status": STATUS_ORIGINAL, "T": None, "meta": {**p.meta, "problem_id": p.id}}
                 for p in problems] if include_originals else []
    return originals + positive + negative


# --------------------------------------------------------------------------- context check


def state_prompt(state: dict[str, Any], tokenizer: Any) -> str:
    """The prompt a state starts from (before its prefix), exactly as RL builds it."""
    problem = Problem(id=str(state["meta"].get("problem_id", state["id"])), question=state["question"],
                      answer=state["answer"], meta=state["meta"])
    return build_prompt(problem, tokenizer)


def state_tokens(state: dict[str, Any], tokenizer: Any) -> tuple[int, int]:
    """(prompt tokens, prefix tokens) of an initial state."""
    n_prompt = len(tokenizer(state_prompt(state, tokenizer), add_special_tokens=False)["input_ids"])
    n_prefix = len(tokenizer(state["prefix"], add_special_tokens=False)["input_ids"]) if state["prefix"] else 0
    return n_prompt, n_prefix


def check_fit(states: list[dict[str, Any]], tokenizer: Any, limit: int, on_overflow: str = "raise"
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Split states into (kept, dropped, prefix token counts of the kept restart states).

    A state whose prompt + prefix exceeds ``limit`` tokens raises ``SatoriError`` naming it,
    or is dropped with ``on_overflow == "skip"``.
    """
    kept, dropped, prefix_tokens = [], [], []
    for s in states:
        n_prompt, n_prefix = state_tokens(s, tokenizer)
        if n_prompt + n_prefix > limit:
            if on_overflow != "skip":
                raise SatoriError(
                    f"initial state {s['id']} (problem {s['meta'].get('problem_id', s['id'])}): prompt + prefix is "
                    f"{n_prompt + n_prefix} tokens, more than the limit of {limit}; lower --t-max, raise "
                    "--max-prompt-tokens, or use --on-overflow skip")
            dropped.append(s)
            continue
        kept.append(s)
        if s["status"] != STATUS_ORIGINAL:
            prefix_tokens.append(n_prefix)
    return kept, dropped, prefix_tokens


def prompt_limit(policy: str, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """``max_prompt_tokens`` when set, else the policy's context size minus the generation budget."""
    if max_prompt_tokens > 0:
        return max_prompt_tokens
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(policy, local_files_only=True).get_text_config()
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int):
        raise SatoriError(f"{policy}: config has no max_position_embeddings; set --max-prompt-tokens")
    limit = context - max_new_tokens
    if limit <= 0:
        raise SatoriError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                          f"{context}-token context")
    return limit


def state_stats(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts per status and the histogram of ``T`` per buffer."""
    by_status = Counter(str(s["status"]) for s in states)
    t_hist: dict[str, dict[str, int]] = {}
    for status in (STATUS_POSITIVE, STATUS_NEGATIVE):
        c = Counter(s["T"] for s in states if s["status"] == status)
        t_hist[str(status)] = {str(t): c[t] for t in sorted(c)}
    return {"states": len(states), "by_status": {k: by_status.get(k, 0) for k in ("0", "1", "-1")},
            "t_hist": t_hist}


# --------------------------------------------------------------------------- command


def run_rae(cfg: RAEConfig) -> dict[str, Any]:
    """Sample (or read) graded trajectories, build and check the initial states, write them."""
    for name in ("policy", "out"):
        if not getattr(cfg, name):
            raise SatoriError(f"--{name} is required")
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    t0 = time.time()
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.policy)
    coat_token_ids(tokenizer)  # the policy must know <|reflect|> as one token (format-tuned)
    limit = prompt_limit(cfg.policy, cfg.max_prompt_tokens, cfg.max_new_tokens)
    problems = load_problems(cfg.data)
    if not problems:
        raise SatoriError(f"{cfg.data.path}: no problems")
    if cfg.samples:
        samples = read_samples(cfg.samples, cfg.last_number_fallback)
    else:
        model = load_model(cfg.policy)
        samples = sample_graded(model, tokenizer, problems, k=cfg.k, temperature=cfg.temperature,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.gen_batch_size,
                                last_number_fallback=cfg.last_number_fallback)
        del model
        write_jsonl(out / "samples.jsonl", samples)
    groups, unmatched = group_samples(problems, samples)
    states = build_initial_states(problems, samples, cfg.t_max, random.Random(cfg.seed), cfg.include_originals,
                                  cfg.negative_cut, cfg.t_min)
    kept, dropped, prefix_tokens = check_fit(states, tokenizer, limit, cfg.on_overflow)
    usable = {pid: usable_samples(g, cfg.t_min) for pid, g in groups.items()}
    stats = state_stats(kept)
    stats.update({
        "problems": len(problems),
        "samples": len(samples),
        "sample_accuracy": sum(bool(s["correct"]) for g in groups.values() for s in g)
        / max(1, sum(len(g) for g in groups.values())),
        "problems_with_correct": sum(any(s["correct"] for s in g) for g in usable.values()),
        "problems_with_wrong": sum(any(not s["correct"] for s in g) for g in usable.values()),
        "problems_without_samples": sum(not g for g in groups.values()),
        "unmatched_samples": unmatched,
        "skipped_unusable": sum(len(groups[p]) - len(usable[p]) for p in groups),
        "dropped_overflow": len(dropped),
        "dropped_by_status": dict(Counter(str(s["status"]) for s in dropped)),
        "prompt_limit": limit,
        "mean_prefix_tokens": sum(prefix_tokens) / len(prefix_tokens) if prefix_tokens else 0.0,
        "max_prefix_tokens": max(prefix_tokens, default=0),
        "seconds": round(time.time() - t0, 2),
    })
    write_jsonl(out / "initial_states.jsonl", kept)
    write_json(out / "rae_stats.json", {"config": to_dict(cfg), "stats": stats})
    return stats

"""COAT trajectories under construction: pure string assembly, no models.

A trajectory is a list of steps ``(agent, action, text)`` (agent ``generator`` or
``critic``, action ``continue``/``reflect``/``explore``) plus its *line of reasoning*: the
indices of the steps that form the current solution once reflections are skipped and each
explore step has replaced the step it redoes. The line is what the generator is shown
(as plain chain-of-thought, steps separated by blank lines, no meta tokens) when it
continues after feedback, and what a critic judges in the next round.

Where a reflection goes (``position``):

- ``"step"``: right after the step the critic names (the first wrong step, or the step it
  verifies); everything the generator wrote after that step is dropped. A wrong solution
  then has no answer before its first ``<|reflect|>``.
- ``"end"``: after the complete solution, answer included, so the answer before the first
  ``<|reflect|>`` is the wrong (or right) one the generator wrote; this is the F→T shape the
  evaluation measures. A verification at the end restates the answer ("So the answer is
  \\boxed{X}.") so the response still ends with a boxed answer.

A correction is a ``<|reflect|>`` step (what is wrong) followed by an ``<|explore|>`` step
(the hint; for the rule critic the corrected ``Step k: ...`` line). The explore step replaces
line position ``keep + 1``; the generator continues from there. A verification is a single
``<|reflect|>`` step; at position ``step`` the generator continues after the verified step.

Types (by the sequence of critic rounds): ``I`` no reflection; ``II-I`` one verification;
``II-II`` a verification, then a correction; ``III-I`` one correction; ``III-II`` two
corrections.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace

from satori.coat import META_TOKENS, Step, parse_steps, render_steps, split_cot_steps

GENERATOR = "generator"
CRITIC = "critic"
TYPES = ("I", "II-I", "II-II", "III-I", "III-II")
POSITIONS = ("step", "end")

_TYPE_OF_ROUNDS = {
    (): "I",
    ("verify",): "II-I",
    ("verify", "correct"): "II-II",
    ("correct",): "III-I",
    ("correct", "correct"): "III-II",
}
_ANSWER_LINE = re.compile(r"^.*\\boxed\{.*$", re.M)


@dataclass
class Trajectory:
    """A trajectory being built: its steps, its current line of reasoning, its history."""

    steps: list[tuple[str, str, str]]  # (agent, action, text)
    line: list[int]  # indices into ``steps`` of the current line of reasoning, in order
    sample: int = 0  # which generator sample it grew from
    rounds: list[str] = field(default_factory=list)  # "verify" / "correct" per critic round
    positions: list[str] = field(default_factory=list)  # "step" / "end" per critic round


@dataclass
class Feedback:
    """A critic's feedback on the line of reasoning of a trajectory.

    ``after``: 1-based line position after which the reflection goes (position ``step``).
    ``keep``: line positions kept before the explore step (corrections only).
    ``complete``: the explore text already ends with the final boxed answer, so the
    generator need not continue.
    """

    kind: str  # "verify" or "correct"
    after: int
    reflect: str
    explore: str = ""
    keep: int = 0
    complete: bool = False


def has_meta_token(text: str) -> bool:
    """Whether ``text`` contains one of the three meta-action tokens."""
    return any(t in text for t in META_TOKENS)


def from_cot(text: str, sample: int = 0) -> Trajectory | None:
    """A trajectory from a plain chain-of-thought solution (every step a continuation).

    None when the text has no step or already contains meta tokens (it would not render).
    """
    pieces = split_cot_steps(text)
    if not pieces or has_meta_token(text):
        return None
    return Trajectory([(GENERATOR, "continue", s) for s in pieces], list(range(len(pieces))), sample)


def line_texts(traj: Trajectory) -> list[str]:
    """The texts of the steps of the current line of reasoning."""
    return [traj.steps[i][2] for i in traj.line]


def plain_view(traj: Trajectory) -> str:
    """The line of reasoning as the generator's own plain format: steps joined by blank
    lines, no meta tokens; answer lines are removed from every step but the last."""
    texts = line_texts(traj)
    cleaned = [_ANSWER_LINE.sub("", t).strip() for t in texts[:-1]] + texts[-1:]
    return "\n\n".join(t for t in cleaned if t)


def continuation_prefix(traj: Trajectory) -> str:
    """What the generator continues from: the plain view and a blank line (next step)."""
    return plain_view(traj) + "\n\n"


def response(traj: Trajectory) -> str:
    """The COAT rendering: steps joined by their meta tokens, no extra whitespace."""
    return render_steps([Step(action, text) for _, action, text in traj.steps])


def provenance(traj: Trajectory) -> list[dict[str, str]]:
    """One ``{"agent", "action", "text"}`` per step, aligned with ``parse_steps(response)``."""
    return [{"agent": a, "action": act, "text": t} for a, act, t in traj.steps]


def type_of_rounds(rounds: list[str] | tuple[str, ...]) -> str | None:
    """The trajectory type of a sequence of critic rounds, None if it has no name."""
    return _TYPE_OF_ROUNDS.get(tuple(rounds))


def type_of_response(text: str) -> str | None:
    """The trajectory type read from a COAT response alone: each ``<|reflect|>`` is a
    verification, or a correction when an ``<|explore|>`` follows it directly."""
    actions = [s.action for s in parse_steps(text)]
    rounds = [
        "correct" if i + 1 < len(actions) and actions[i + 1] == "explore" else "verify"
        for i, a in enumerate(actions)
        if a == "reflect"
    ]
    return type_of_rounds(rounds)


def _last_critic_step(traj: Trajectory) -> int:
    return max((i for i, (agent, _, _) in enumerate(traj.steps) if agent == CRITIC), default=-1)


def apply_feedback(traj: Trajectory, fb: Feedback, position: str, answer: str | None = None) -> tuple[Trajectory, bool]:
    """Insert the critic's feedback; returns the new trajectory and whether it is complete
    (ends with a final answer) or needs the generator to continue.

    ``position`` ``step`` puts the reflection after line position ``fb.after`` (and drops
    the rest); it falls back to ``end`` when that step is the last one or lies before an
    earlier critic step. A verification at ``end`` restates ``answer`` in a boxed sentence.
    """
    n = len(traj.line)
    after = min(max(fb.after, 1), n)
    cut = traj.line[after - 1]
    if position == "step" and (after == n or cut < _last_critic_step(traj)):
        position = "end"
    if position == "step":
        steps = list(traj.steps[: cut + 1])
        line = list(traj.line[:after])
    else:
        steps = list(traj.steps)
        line = list(traj.line)
    if fb.kind == "verify":
        text = fb.reflect.strip()
        complete = False
        if position == "end":
            text += f"\nSo the answer is \\boxed{{{answer}}}."
            complete = True
        steps.append((CRITIC, "reflect", text))
    else:
        steps.append((CRITIC, "reflect", fb.reflect.strip()))
        steps.append((CRITIC, "explore", fb.explore.strip()))
        line = line[: min(fb.keep, len(line))] + [len(steps) - 1]
        complete = fb.complete
    new = replace(traj, steps=steps, line=line, rounds=traj.rounds + [fb.kind],
                  positions=traj.positions + [position])
    return new, complete


def extend(traj: Trajectory, text: str) -> Trajectory | None:
    """Append the generator's continuation (plain CoT) as continue steps; None if it has no
    step or contains meta tokens."""
    pieces = split_cot_steps(text)
    if not pieces or has_meta_token(text):
        return None
    start = len(traj.steps)
    steps = traj.steps + [(GENERATOR, "continue", s) for s in pieces]
    return replace(traj, steps=steps, line=traj.line + list(range(start, len(steps))))


def balance_corrections(rows: list[dict], max_fix_share: float, key: str = "") -> list[dict]:
    """The demonstrations with at most ``max_fix_share`` of them corrections (types III-*).

    A weak generator is wrong far more often than right, so most of its demonstrations
    correct a mistake; a model format-tuned on them learns that a reflection *finds* a
    mistake, and then "corrects" right answers (measured on the testbed: see the issue 3
    note). Dropping the surplus corrections (a deterministic choice by record id and
    ``key``) keeps the verdict after ``<|reflect|>`` something the model must judge.
    Order is kept; ``max_fix_share >= 1`` keeps everything.
    """
    fixes = [r for r in rows if _is_correction(r)]
    others = len(rows) - len(fixes)
    if max_fix_share >= 1 or not fixes:
        return list(rows)
    keep_n = min(len(fixes), int(max_fix_share * others / (1 - max_fix_share)))
    rank = sorted(fixes, key=lambda r: hashlib.sha256(f"{key}/{r.get('id')}/{r.get('type')}".encode()).hexdigest())
    kept = {id(r) for r in rank[:keep_n]}
    return [r for r in rows if not _is_correction(r) or id(r) in kept]


def _is_correction(row: dict) -> bool:
    """A type III-* demonstration: its first reflection finds a mistake and corrects it."""
    return str(row.get("type", "")).startswith("III")


def mistakes_as_context(row: dict) -> dict:
    """A correction (type III-*) with everything before its first ``<|reflect|>`` moved from
    ``response`` to ``context``: ``satori sft`` then shows the model the mistaken steps but
    trains it only to reflect on them and correct them, not to make them. Other rows are
    returned unchanged. (The paper trains on whole trajectories; a small model imitates the
    mistakes too, measured on the testbed: see the issue 3 note.)"""
    from satori.coat import REFLECT

    text = row.get("response", "")
    if not _is_correction(row) or REFLECT not in text:
        return row
    cut = text.index(REFLECT)
    return {**row, "context": text[:cut], "response": text[cut:]}

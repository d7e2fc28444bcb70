"""Exact step checking of testbed solutions.

A solution is read as a sequence of steps: split at blank lines and at the COAT meta-action
tokens ``<|continue|>``, ``<|reflect|>`` and ``<|explore|>``. From each step the first equation
``a op b = c`` is taken (op one of ``+ - * / × ÷ x``); steps without an equation are skipped.
The equations form the *line of reasoning* that is compared with the ground truth:

- a step that begins with ``<|reflect|>`` is a verification, not part of the line, and is
  skipped;
- a step labelled ``Step k:`` with ``k`` at most one past the current line *replaces* step
  ``k`` and drops everything after it, so an ``<|explore|>`` that redoes step 3 is checked as
  the new step 3 (an unlabelled step is appended).

Equation ``k`` is right when it applies operation ``k`` with its operand to the correct value
after step ``k - 1`` and its arithmetic is right (``+`` and ``*`` may have their operands
swapped). A line that stops early is wrong at the first missing step; equations beyond the
last operation are wrong ("extra step"). The final answer is the last ``\\boxed{...}``.
Nothing here raises on bad text: garbage has no equations and is wrong at step 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from satori.data import Problem
from satori.errors import SatoriError
from satori.testbed.tasks import chain_values, format_equation, ground_truth

META_TOKENS = ("<|continue|>", "<|reflect|>", "<|explore|>")
_NUM = r"-?\d{1,12}(?:\.\d{1,12})?"
_EQ = re.compile(rf"({_NUM})\s*([+\-*/×÷xX−])\s*({_NUM})\s*=\s*({_NUM})")
_LABEL = re.compile(r"^\s*Step\s+(\d{1,6})\s*:")
_SPLIT = re.compile(r"(<\|continue\|>|<\|reflect\|>|<\|explore\|>)|\n\s*\n")
_OPS = {
    "+": "+",
    "-": "-",
    "−": "-",
    "*": "*",
    "×": "*",
    "x": "*",
    "X": "*",
    "/": "/",
    "÷": "/",
}


@dataclass
class Equation:
    """One parsed equation ``a op b = c`` (numbers as exact fractions)."""

    a: Fraction
    op: str
    b: Fraction
    c: Fraction
    text: str


@dataclass
class StepCheck:
    """The verdict on a solution.

    ``first_wrong_step`` is the 1-based index of the first wrong equation in the line of
    reasoning (``None`` when every step is right); ``expected`` the correct equations;
    ``found`` the equations read from the text; ``final_correct`` whether the last boxed
    answer equals the gold answer.
    """

    n_steps: int
    first_wrong_step: int | None
    reason: str
    expected: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    final_correct: bool = False


def parse_equation(text: str) -> Equation | None:
    """The first equation ``a op b = c`` in ``text``, or None."""
    m = _EQ.search(text)
    if m is None:
        return None
    a, op, b, c = m.groups()
    return Equation(Fraction(a), _OPS[op], Fraction(b), Fraction(c), m.group(0))


def split_steps(text: str) -> list[tuple[str, str]]:
    """``(action, text)`` steps: split at blank lines and meta-action tokens.

    ``action`` is ``"continue"``, ``"reflect"`` or ``"explore"`` for a step that follows that
    token, ``""`` for the first step and steps that follow a blank line.
    """
    return [(action, chunk) for action, chunk, _ in _split(text)]


def _split(text: str) -> list[tuple[str, str, int]]:
    """:func:`split_steps` with where each step starts in ``text`` (its first non-blank character)."""
    steps: list[tuple[str, str, int]] = []
    action, pos = "", 0
    for m in [*_SPLIT.finditer(text), None]:
        end = len(text) if m is None else m.start()
        chunk = text[pos:end]
        if chunk.strip():
            steps.append((action, chunk.strip(), pos + len(chunk) - len(chunk.lstrip())))
        if m is not None:
            action = m.group(1)[2:-2] if m.group(1) else ""
            pos = m.end()
    return steps


def _line_states(steps: list[tuple[str, str]]):
    """``(i, line)`` after each step ``steps[i]`` that changes the line of reasoning."""
    line: list[Equation] = []
    for i, (action, step) in enumerate(steps):
        if action == "reflect":
            continue
        eq = parse_equation(step)
        if eq is None:
            continue
        label = _LABEL.match(step)
        if label is not None and 1 <= int(label.group(1)) <= len(line) + 1:
            del line[int(label.group(1)) - 1 :]
        line.append(eq)
        yield i, line


def line_of_reasoning(text: str) -> list[Equation]:
    """The equations of the final line of reasoning (see the module docstring)."""
    line: list[Equation] = []
    for _, line in _line_states(split_steps(text)):
        pass
    return list(line)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _same_number(text: str | None, gold: str) -> bool:
    """Whether a boxed answer is the gold integer (whitespace and ``$`` ignored)."""
    if text is None:
        return False
    cleaned = text.strip().strip("$").strip().replace(",", "")
    if not re.fullmatch(_NUM, cleaned):
        return False
    return Fraction(cleaned) == Fraction(gold)


def _arith(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b if b != 0 else None


def _step_verdict(eq: Equation, prev: int, op: str, operand: int) -> str:
    """``""`` when the equation is the right step, otherwise the reason it is wrong."""
    if eq.op != op:
        return f"wrong operation {eq.op!r}, expected {op!r}"
    pairs = [(eq.a, eq.b)] + ([(eq.b, eq.a)] if op in "+*" else [])
    if not any(a == prev for a, _ in pairs):
        return f"wrong previous value, expected {prev}"
    if not any(a == prev and b == operand for a, b in pairs):
        return f"wrong operand, expected {operand}"
    if _arith(eq.a, eq.op, eq.b) != eq.c:
        return "wrong arithmetic"
    return ""


def _expected(problem: Problem) -> tuple[list[int], list[list], list[str]]:
    start, ops = ground_truth(problem)
    values = chain_values(start, ops)
    texts = [
        format_equation(values[k], op, x, values[k + 1])
        for k, (op, x) in enumerate(ops)
    ]
    return values, ops, texts


def _first_wrong(line: list[Equation], values: list[int], ops: list[list]) -> tuple[int, str] | None:
    """``(k, reason)`` for the first wrong equation of ``line`` (1-based), None when all are right."""
    for k, eq in enumerate(line):
        if k >= len(ops):
            return k + 1, "extra step"
        verdict = _step_verdict(eq, values[k], *ops[k])
        if verdict:
            return k + 1, verdict
    return None


def check_steps(problem: Problem, text: str) -> StepCheck:
    """Find the first wrong step of ``text`` (plain or COAT) against ``problem``'s ground truth."""
    values, ops, expected = _expected(problem)
    line = line_of_reasoning(text)
    final_correct = _same_number(last_boxed(text), problem.answer)
    found = [eq.text for eq in line]
    first, reason = _first_wrong(line, values, ops) or (None, "all steps correct")
    if first is None and len(line) < len(ops):
        first, reason = len(line) + 1, "missing step"
    return StepCheck(len(line), first, reason, expected, found, final_correct)


def reflection_points(problem: Problem, text: str) -> list[tuple[bool, bool]]:
    """Where a solution could have reflected, and whether it did.

    One pair per step that extends the line of reasoning (a plain step or an explore step):
    ``(the line so far is right, the next step is a <|reflect|>)``. Over many solutions,
    P(reflect | the line is wrong) against P(reflect | it is right) says whether the model's
    reflections notice its mistakes or fall anywhere.
    """
    values, ops, _ = _expected(problem)
    steps = split_steps(text)
    return [(_first_wrong(line, values, ops) is None, i + 1 < len(steps) and steps[i + 1][0] == "reflect")
            for i, line in _line_states(steps)]


def new_step_outcomes(problem: Problem, text: str) -> list[tuple[int, bool, str]]:
    """Each step that adds the next step to a right line of reasoning (not a redone step, not
    a step after the line went wrong), as ``(where it starts in text, whether a <|reflect|>
    came earlier in the text, "" if the step is right else why it is wrong)``.

    The slip rate of such steps by position, with and without a check before them, tells
    whether a check costs the steps after it anything beyond the length it adds
    (``benchmarks/slips_by_position.py``)."""
    values, ops, _ = _expected(problem)
    steps = _split(text)
    first_reflect = next((i for i, (action, _, _) in enumerate(steps) if action == "reflect"), len(steps))
    out: list[tuple[int, bool, str]] = []
    prev_len, prev_right = 0, True
    for i, line in _line_states([(action, chunk) for action, chunk, _ in steps]):
        wrong = _first_wrong(line, values, ops)
        if prev_right and len(line) == prev_len + 1 and steps[i][0] != "explore":
            out.append((steps[i][2], first_reflect < i, "" if wrong is None else wrong[1]))
        prev_len, prev_right = len(line), wrong is None
    return out


def first_wrong_prefix(problem: Problem, prefixes: Sequence[str]) -> int | None:
    """Index of the first of ``prefixes`` (growing prefixes of one solution, e.g. its first
    1, 2, ... COAT steps) whose line of reasoning is wrong; None when every one is right.

    A prefix whose line is shorter than the chain is not wrong for that: it has not finished.
    """
    values, ops, _ = _expected(problem)
    for i, text in enumerate(prefixes):
        if _first_wrong(line_of_reasoning(text), values, ops) is not None:
            return i
    return None


def _check_k(problem: Problem, k: int) -> tuple[list[int], list[list], list[str]]:
    values, ops, expected = _expected(problem)
    if not 1 <= k <= len(ops):
        raise SatoriError(
            f"step {k} out of range: problem {problem.id!r} has {len(ops)} steps"
        )
    return values, ops, expected


def verify_step(problem: Problem, k: int, equation: str) -> bool:
    """Whether ``equation`` (text containing ``a op b = c``) is the right step ``k`` (1-based)."""
    values, ops, _ = _check_k(problem, k)
    eq = parse_equation(equation)
    return eq is not None and _step_verdict(eq, values[k - 1], *ops[k - 1]) == ""


def correct_step_text(problem: Problem, k: int) -> str:
    """The right equation for step ``k`` (1-based), e.g. ``12 - 3 = 9``."""
    return _check_k(problem, k)[2][k - 1]

"""Procedural arithmetic word problems with exact ground truth.

A problem is a start quantity and a chain of operations (``+``, ``-``, ``*`` and exact ``/``)
told in words: "Ana has 7 marbles. She finds 5 more marbles. Then her marbles double. How
many marbles does Ana have now?". Its difficulty ``level`` is the number of operations.
``meta`` holds the ground truth (``start``, ``ops`` as ``[[op, operand], ...]``) so the
checker can verify every step of a solution, not only the final answer.

Splits: ``train``, ``valid`` and ``test`` draw levels 2..6 and are disjoint because each
question is assigned to one split by a hash of its text; ``ood`` draws 7..8 steps, more than
training ever shows. Everything is deterministic for a seed.

The reference solution restates one sentence of the question and writes one equation per
step, steps separated by blank lines::

    Step 1: She finds 5 more marbles. 7 + 5 = 12

    Step 2: She gives 3 marbles to Ben. 12 - 3 = 9

    Step 3: Then her marbles double. 9 * 2 = 18
    The answer is \\boxed{18}.

(Restating the sentence makes the next operand a copy of nearby text, which a tiny model
learns far faster than counting sentences.)

With ``error_rate > 0`` each step independently gets an arithmetic slip (result off by a
little) or a wrong operand, and later steps continue from the wrong value, which is how the
testbed controls how often its base model makes mistakes.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

from satori.data import Problem
from satori.errors import SatoriError

#: Every intermediate value stays in [MIN_VALUE, MAX_VALUE]. Two-digit numbers keep the
#: arithmetic learnable by the tiny model in a few minutes (with three digits it mostly fails
#: at step 1). Keeping values >= 4 avoids a pile of tiny answers (1, 2, 3) that a model
#: guesses right by luck.
MIN_VALUE = 4
MAX_VALUE = 99
START_RANGE = (4, 40)
ADD_RANGE = (2, 20)
SUB_RANGE = (2, 20)
MUL_RANGE = (2, 3)
DIV_RANGE = (2, 5)

IN_DIST_LEVELS = (2, 3, 4, 5, 6)
OOD_LEVELS = (7, 8)
SPLITS = ("train", "valid", "test", "ood")
#: Hash buckets (out of 100) of the in-distribution splits.
_BUCKETS = {"train": range(80), "valid": range(80, 90), "test": range(90, 100)}

NAMES = (
    ("Ana", "she", "her"),
    ("Ben", "he", "his"),
    ("Chloe", "she", "her"),
    ("David", "he", "his"),
    ("Emma", "she", "her"),
    ("Farid", "he", "his"),
    ("Grace", "she", "her"),
    ("Hugo", "he", "his"),
    ("Iris", "she", "her"),
    ("Jonas", "he", "his"),
    ("Kenji", "he", "his"),
    ("Lena", "she", "her"),
    ("Maya", "she", "her"),
    ("Noah", "he", "his"),
    ("Olga", "she", "her"),
    ("Pablo", "he", "his"),
    ("Rosa", "she", "her"),
    ("Sam", "he", "his"),
    ("Tara", "she", "her"),
    ("Yusuf", "he", "his"),
)
OBJECTS = (
    "marbles",
    "apples",
    "stickers",
    "coins",
    "books",
    "stamps",
    "shells",
    "cards",
    "pencils",
    "cookies",
    "beads",
    "toy cars",
    "buttons",
    "flowers",
    "eggs",
    "candies",
)
FRIENDS = (
    "a friend",
    "her brother",
    "his sister",
    "the teacher",
    "a neighbour",
    "a classmate",
)

_ADD = (
    "{S} finds {n} more {o}.",
    "{S} buys {n} more {o}.",
    "{F_cap} gives {s_obj} {n} {o}.",
    "{S} gets {n} more {o}.",
    "{S} wins {n} {o} in a game.",
)
_SUB = (
    "{S} gives {n} {o} to {F}.",
    "{S} loses {n} {o}.",
    "{S} sells {n} {o}.",
    "{S} uses up {n} {o}.",
    "{S} trades away {n} {o}.",
)
_MUL = {
    2: ("Then {p} {o} double.", "{S} doubles {p} {o}."),
    3: ("Then {p} {o} triple.", "{S} triples {p} {o}."),
}
_MUL_ANY = (
    "{S} ends up with {n} times as many {o}.",
    "{P_cap} {o} grow to {n} times as many.",
)
_DIV = {
    2: ("{S} gives away half of {p} {o}.", "Then {p} {o} are cut in half."),
    3: ("{S} keeps only a third of {p} {o}.",),
}
_DIV_ANY = (
    "{S} splits {p} {o} into {n} equal groups and keeps one group.",
    "{S} shares {p} {o} equally among {n} kids, keeping one share.",
)


def apply_op(value: int, op: str, operand: int) -> int:
    """The exact result of one operation (``/`` must divide exactly)."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    if op == "/":
        if operand == 0 or value % operand:
            raise SatoriError(f"inexact division {value} / {operand}")
        return value // operand
    raise SatoriError(f"unknown operation {op!r}")


def chain_values(start: int, ops: Sequence[Sequence]) -> list[int]:
    """All values of a chain: ``[start, after step 1, ..., final]``."""
    values = [int(start)]
    for op, operand in ops:
        values.append(apply_op(values[-1], op, int(operand)))
    return values


def _feasible_ops(value: int) -> list[tuple[str, list[int]]]:
    """The operations (with their allowed operands) that keep the value in range."""
    out = []
    adds = [n for n in range(ADD_RANGE[0], ADD_RANGE[1] + 1) if value + n <= MAX_VALUE]
    subs = [n for n in range(SUB_RANGE[0], SUB_RANGE[1] + 1) if value - n >= MIN_VALUE]
    muls = [n for n in range(MUL_RANGE[0], MUL_RANGE[1] + 1) if value * n <= MAX_VALUE]
    divs = [
        n
        for n in range(DIV_RANGE[0], DIV_RANGE[1] + 1)
        if value % n == 0 and value // n >= MIN_VALUE
    ]
    for op, operands in (("+", adds), ("-", subs), ("*", muls), ("/", divs)):
        if operands:
            out.append((op, operands))
    return out


def _random_chain(rng: random.Random, level: int) -> tuple[int, list[list]]:
    """A start value and ``level`` operations keeping every value in range."""
    start = rng.randint(*START_RANGE)
    value, ops = start, []
    for _ in range(level):
        op, operands = rng.choice(_feasible_ops(value))
        operand = rng.choice(operands)
        ops.append([op, operand])
        value = apply_op(value, op, operand)
    return start, ops


def _sentence(rng: random.Random, op: str, n: int, fill: dict[str, str]) -> str:
    """One sentence describing an operation."""
    if op == "+":
        templates = _ADD
    elif op == "-":
        templates = _SUB
    elif op == "*":
        templates = _MUL.get(n, ()) + _MUL_ANY
    else:
        templates = _DIV.get(n, ()) + _DIV_ANY
    return rng.choice(templates).format(n=n, **fill)


def _question(rng: random.Random, start: int, ops: Sequence[Sequence]) -> str:
    """The word problem for a chain, with a random name, object and phrasing."""
    name, subj, poss = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    friend = rng.choice(FRIENDS)
    obj_pron = "her" if subj == "she" else "him"
    parts = [f"{name} has {start} {obj}."]
    for i, (op, n) in enumerate(ops):
        use_name = i == 0 or rng.random() < 0.3
        fill = {
            "S": name if use_name else subj.capitalize(),
            "p": poss,
            "P_cap": f"{name}'s" if use_name else poss.capitalize(),
            "o": obj,
            "F": friend,
            "F_cap": friend[0].upper() + friend[1:],
            "s_obj": obj_pron,
        }
        parts.append(_sentence(rng, op, int(n), fill))
    parts.append(f"How many {obj} does {name} have now?")
    return " ".join(parts)


def _bucket(question: str) -> int:
    """A stable hash bucket in [0, 100) of a question's text."""
    return (
        int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
        % 100
    )


def split_of(question: str) -> str:
    """The in-distribution split (train/valid/test) a question belongs to."""
    b = _bucket(question)
    return next(s for s, r in _BUCKETS.items() if b in r)


def make_problems(
    split: str, n: int, seed: int = 0, levels: Sequence[int] | None = None
) -> list[Problem]:
    """``n`` distinct problems of ``split`` (train/valid/test/ood), deterministic for ``seed``.

    Levels cycle through ``levels`` (default 2..6, or 7..8 for ``ood``) so each level gets an
    equal share. Questions are assigned to train/valid/test by hash, so the three splits never
    share a question whatever the seeds; ``ood`` questions have more steps than any of them.
    Each problem carries its error-free reference solution.
    """
    if split not in SPLITS:
        raise SatoriError(
            f"unknown testbed split {split!r}; choose one of {', '.join(SPLITS)}"
        )
    if n < 0:
        raise SatoriError(f"number of problems must be >= 0, got {n}")
    levels = (
        tuple(levels)
        if levels is not None
        else (OOD_LEVELS if split == "ood" else IN_DIST_LEVELS)
    )
    if not levels or any(not isinstance(lv, int) or lv < 1 for lv in levels):
        raise SatoriError(f"levels must be positive integers, got {levels!r}")
    rng = random.Random(f"satori-testbed/{split}/{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            raise SatoriError(
                f"could not generate {n} distinct {split} problems at levels {levels}"
            )
        level = levels[len(problems) % len(levels)]
        start, ops = _random_chain(rng, level)
        question = _question(rng, start, ops)
        if question in seen or (split != "ood" and split_of(question) != split):
            continue
        seen.add(question)
        answer = chain_values(start, ops)[-1]
        p = Problem(
            id=f"testbed-{split}-s{seed}-{len(problems)}",
            question=question,
            answer=str(answer),
            meta={
                "start": start,
                "ops": ops,
                "level": level,
                "source": "testbed",
                "split": split,
            },
        )
        p.solution = reference_solution(p)
        problems.append(p)
    return problems


def has_ground_truth(problem: Problem) -> bool:
    """Whether ``problem`` carries the testbed's ground-truth steps (meta ``start`` and ``ops``)."""
    return "start" in (problem.meta or {}) and "ops" in (problem.meta or {})


def ground_truth(problem: Problem) -> tuple[int, list[list]]:
    """``(start, ops)`` of a testbed problem; SatoriError if it has none."""
    meta = problem.meta or {}
    if not has_ground_truth(problem):
        raise SatoriError(
            f"problem {problem.id!r} has no testbed ground truth (meta start/ops)"
        )
    return int(meta["start"]), [[str(op), int(x)] for op, x in meta["ops"]]


def format_equation(a: int, op: str, b: int, c: int) -> str:
    """One equation in the testbed step format, e.g. ``12 - 3 = 9``."""
    return f"{a} {op} {b} = {c}"


def format_solution(
    equations: Sequence[str], answer: int | str, restated: Sequence[str] = ()
) -> str:
    """Steps ``Step k: [restated sentence] <equation>`` separated by blank lines.

    ``restated`` (optional, one per equation) are the question's sentences the steps restate;
    the answer line ends the last step.
    """
    lead = list(restated) if len(restated) == len(equations) else [""] * len(equations)
    steps = [
        f"Step {k}: {(s + ' ') if s else ''}{eq}"
        for k, (s, eq) in enumerate(zip(lead, equations), 1)
    ]
    final = f"The answer is \\boxed{{{answer}}}."
    if not steps:
        return final
    steps[-1] += "\n" + final
    return "\n\n".join(steps)


def operation_sentences(problem: Problem) -> list[str]:
    """The sentences of the question that state the operations (empty if they can't be found)."""
    sentences = re.split(r"(?<=[.?!])\s+", problem.question.strip())
    n_ops = len(problem.meta.get("ops", []))
    return sentences[1 : 1 + n_ops] if len(sentences) == n_ops + 2 else []


def _valid_continuation(value: int, ops: Sequence[Sequence]) -> bool:
    """Whether the remaining operations stay exact and in range starting from ``value``."""
    if not MIN_VALUE <= value <= MAX_VALUE:
        return False
    for op, operand in ops:
        if op == "/" and value % operand:
            return False
        value = apply_op(value, op, operand)
        if not MIN_VALUE <= value <= MAX_VALUE:
            return False
    return True


def _step_error(
    rng: random.Random, value: int, op: str, operand: int, rest: Sequence[Sequence]
) -> tuple[int, int] | None:
    """A wrong ``(operand_written, result_written)`` for one step, or None if none fits.

    Half the time a slip in the result (off by a small amount), otherwise a wrong operand with
    correct arithmetic. The wrong result must let the later steps continue exactly and in range,
    so larger offsets are tried when small ones would make a later division inexact.
    """
    correct = apply_op(value, op, operand)
    kinds = ["result", "operand"]
    if rng.random() < 0.5:
        kinds.reverse()
    for kind in kinds:
        if kind == "result":
            deltas = [d * s for d in range(1, 61) for s in (1, -1)]
            small = deltas[:10]
            rng.shuffle(small)
            deltas[:10] = small
            for d in deltas:
                if _valid_continuation(correct + d, rest):
                    return operand, correct + d
        else:
            offsets = [d * s for d in range(1, 4) for s in (1, -1)]
            rng.shuffle(offsets)
            for d in offsets:
                b = operand + d
                if b < 1 or (op in "*/" and b < 2) or (op == "/" and value % b):
                    continue
                result = apply_op(value, op, b)
                if result != correct and _valid_continuation(result, rest):
                    return b, result
    return None


def reference_solution(
    problem: Problem, error_rate: float = 0.0, rng: random.Random | None = None
) -> str:
    """The step-by-step solution of a testbed problem, optionally with injected errors.

    Each step independently gets an error with probability ``error_rate`` (a result off by a
    small amount, or a wrong operand); later steps continue from the wrong value, so an error
    changes the final answer. ``rng`` defaults to one seeded by the problem id.
    """
    if not 0.0 <= error_rate <= 1.0:
        raise SatoriError(f"error_rate must be in [0, 1], got {error_rate}")
    start, ops = ground_truth(problem)
    rng = (
        rng
        if rng is not None
        else random.Random(f"satori-testbed/solution/{problem.id}")
    )
    value, equations = start, []
    for k, (op, operand) in enumerate(ops):
        result_operand, result = operand, None
        if error_rate > 0 and rng.random() < error_rate:
            wrong = _step_error(rng, value, op, operand, ops[k + 1 :])
            if wrong is not None:
                result_operand, result = wrong
        if result is None:
            result = apply_op(value, op, operand)
        equations.append(format_equation(value, op, result_operand, result))
        value = result
    return format_solution(equations, value, operation_sentences(problem))

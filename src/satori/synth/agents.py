"""The critic and the selector: what they say and how their answers are read.

Critics judge the line of reasoning of a trajectory (see :mod:`satori.synth.trajectory`):

- :func:`rule_correction` / :func:`rule_verification` (testbed): built on the exact step
  checker. For a wrong line it names the first wrong step and what is wrong
  (``<|reflect|>``: the step redone from the question, then what the line has instead)
  and gives the corrected step as the hint (``<|explore|>``:
  ``Step k: <restated sentence> a op b = c`` in the generator's own format, plus the answer
  line when ``k`` is the last step, so the trajectory is complete). For a correct line it
  redoes an intermediate step and finds it matches (``<|reflect|>``). Wording comes from several
  templates, chosen by a deterministic key.
- :func:`critic_prompt` / :func:`parse_critic_reply`: the prompt of an LLM critic (it sees
  the problem, the reference solution and the numbered candidate steps) and a tolerant
  parser of its reply (``First wrong step: 3`` / ``Hint: ...``, or ``Verify step: 2`` /
  ``Verification: ...``).

Selectors rank the finished trajectories of one type: :func:`rule_key` (correct first, then
shorter, then fewer reflections, then sample order: deterministic) or an outcome reward
model (:func:`satori.train.orm.score_sequences`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence


from satori.data import Problem
from satori.synth.trajectory import Feedback, has_meta_token
from satori.testbed.checker import check_steps, correct_step_text, first_wrong_prefix, parse_equation
from satori.testbed.tasks import chain_values, ground_truth, operation_sentences


def pick(key: str, n: int) -> int:
    """A deterministic choice in ``range(n)`` from a string key (stable across processes)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % n


def unit(key: str) -> float:
    """A deterministic number in [0, 1) from a string key."""
    return pick(key, 1 << 30) / float(1 << 30)


# --------------------------------------------------------------------------- rule critic

_VERB = {"+": "add", "-": "subtract", "*": "multiply by", "/": "divide by"}

#: How the rule critic checks a step: it first quotes what the line has, then redoes the
#: step from the question (the operation and the previous result), and only then gives the
#: verdict, comparing the two results it has just written. A small model imitating
#: these checks decides "right" or "wrong" by comparing two adjacent numbers, instead of
#: committing to a verdict before working anything out. The openings do not give the
#: verdict away.
OPENINGS = ("Let me check step {k}.", "Wait, let me check step {k}.", "Let me verify step {k}.",
            "Let me double-check step {k}.")
REDO = "Step {k} has {found}. The problem says to {verb} {operand}: {equation}."
WRONG_VERDICTS = ("{found_c} is not {c}, so step {k} is wrong.", "{found_c} is not {c}: step {k} is a mistake.")
RIGHT_VERDICTS = ("That matches, so step {k} is right.", "It gives {c} too, so step {k} is correct.")
EXTRA_STEP = "Wait, step {k} is wrong: {found}. There is no step {k}, the problem has only {n} operations."
MISSING_TEMPLATES = (
    "Wait, the solution stops too early: step {k} is missing. {why_cap}.",
    "Hmm, let me check the steps. Step {k} is missing: {why}.",
)
FINAL_TEMPLATES = (
    "Wait, the steps are correct but the final answer is not: it should be the result of step {n}, {value}.",
    "Hmm, let me check the answer. The last step gives {value}, so the answer {found} is wrong.",
)


def step_check(problem: Problem, k: int, found: str, wrong: bool, key: str) -> str:
    """The critic's check of step ``k`` (1-based) whose equation in the line is ``found``:
    an opening, ``found`` quoted, the step redone from the question, then the verdict
    (``wrong`` is the step checker's). Wording is chosen deterministically from ``key``."""
    _, ops = ground_truth(problem)
    op, operand = ops[k - 1]
    right = correct_step_text(problem, k)
    c, found_c = right.rsplit("= ", 1)[1], found.rsplit("= ", 1)[-1]
    if wrong and c == found_c:  # a wrong step with the right result: compare the equations
        c, found_c = right, found
    verdicts = WRONG_VERDICTS if wrong else RIGHT_VERDICTS
    return " ".join((
        OPENINGS[pick(key + "/open", len(OPENINGS))].format(k=k),
        REDO.format(verb=_VERB[op], operand=operand, equation=right, k=k, found=found),
        verdicts[pick(key + "/verdict", len(verdicts))].format(k=k, found_c=found_c, c=c),
    ))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def first_wrong_position(problem: Problem, texts: Sequence[str]):
    """``(m, check)``: the first line position whose prefix contains a wrong equation, and
    the checker's verdict on that prefix; ``(None, check of the whole line)`` if none does."""
    prefixes = ["\n\n".join(texts[:m]) for m in range(1, len(texts) + 1)]
    i = first_wrong_prefix(problem, prefixes)
    if i is None:
        return None, check_steps(problem, "\n\n".join(texts))
    return i + 1, check_steps(problem, prefixes[i])


def rule_correction(problem: Problem, texts: Sequence[str], key: str) -> Feedback | None:
    """Feedback on a wrong line of reasoning (``texts`` = its steps), from the step checker.

    None when the checker finds nothing wrong (steps and final answer both right).
    """
    start, ops = ground_truth(problem)
    n_ops = len(ops)
    m, c = first_wrong_position(problem, texts)
    gold = problem.answer
    if m is None:
        if c.first_wrong_step is None:
            if c.final_correct:
                return None
            found = re.findall(r"\\boxed\{([^}]*)\}", texts[-1]) if texts else []
            reflect = FINAL_TEMPLATES[pick(key + "/t", len(FINAL_TEMPLATES))].format(
                n=n_ops, value=gold, found=found[-1] if found else "")
            return Feedback("correct", after=len(texts), keep=len(texts), reflect=reflect,
                            explore=f"The answer is \\boxed{{{gold}}}.", complete=True)
        k = c.first_wrong_step  # a step is missing after a correct prefix
        values = chain_values(start, ops)
        op, operand = ops[k - 1]
        why = f"after {values[k - 1]} we still have to {_VERB[op]} {operand}"
        reflect = MISSING_TEMPLATES[pick(key + "/t", len(MISSING_TEMPLATES))].format(
            k=k, why_cap=_cap(why), why=why)
        return Feedback("correct", after=len(texts), keep=len(texts), reflect=reflect,
                        explore=_redo(problem, k, n_ops), complete=k == n_ops)
    k = c.first_wrong_step
    found = c.found[k - 1]
    if k > n_ops:  # an extra step after a complete, correct line
        return Feedback("correct", after=m, keep=m - 1, reflect=EXTRA_STEP.format(k=k, found=found, n=n_ops),
                        explore=f"The answer is \\boxed{{{gold}}}.", complete=True)
    return Feedback("correct", after=m, keep=m - 1, reflect=step_check(problem, k, found, True, key),
                    explore=_redo(problem, k, n_ops), complete=k == n_ops)


def _redo(problem: Problem, k: int, n_ops: int) -> str:
    """The corrected step ``k`` in the testbed's own format (the restated sentence of the
    question when it can be found, then the equation; the answer line if it is the last)."""
    sentences = operation_sentences(problem)
    lead = f"{sentences[k - 1]} " if len(sentences) == n_ops else ""
    text = f"Step {k}: {lead}{correct_step_text(problem, k)}"
    if k == n_ops:
        text += f"\nThe answer is \\boxed{{{problem.answer}}}."
    return text


def rule_verification(problem: Problem, texts: Sequence[str], key: str, last_ok: bool) -> Feedback | None:
    """A check of an intermediate step of a correct line that finds it right.

    The step is chosen (deterministically from ``key``) among the steps holding an equation
    that checks out (those before the first wrong one, if any), excluding the last unless
    ``last_ok``; None if there is none.
    """
    first_wrong, _ = first_wrong_position(problem, texts)
    right = texts if first_wrong is None else texts[: first_wrong - 1]
    candidates = [j for j, t in enumerate(right, 1) if parse_equation(t) is not None]
    if not last_ok:
        candidates = [j for j in candidates if j < len(texts)]
    if not candidates:
        return None
    j = candidates[pick(key + "/j", len(candidates))]
    found = parse_equation(texts[j - 1]).text
    return Feedback("verify", after=j, reflect=step_check(problem, j, found, False, key))


# --------------------------------------------------------------------------- LLM critic

CRITIC_WRONG_PROMPT = (
    "You are checking a student's solution to a math problem against a reference solution.\n"
    "Problem: {question}\n\nReference solution:\n{reference}\n\n"
    "Student's solution (steps numbered):\n{steps}\n\n"
    "The student's final answer is wrong. Find the first wrong step. Reply exactly in this form:\n"
    "First wrong step: <number>\nReason: <one sentence: what is wrong in that step>\n"
    "Hint: <one sentence: how to do that step correctly, without giving the final answer>"
)
CRITIC_VERIFY_PROMPT = (
    "You are checking a student's solution to a math problem against a reference solution.\n"
    "Problem: {question}\n\nReference solution:\n{reference}\n\n"
    "Student's solution (steps numbered):\n{steps}\n\n"
    "The student's solution is correct. Pick one intermediate step and verify it in one line, "
    "for example by checking its calculation another way. Reply exactly in this form:\n"
    "Verify step: <number>\nVerification: <one line>"
)

_FIELD_END = r"(?=\n\s*\**\s*(?:first\s+wrong\s+step|reason|hint|verify\s+step|verification)\b|\Z)"
_WRONG_STEP = re.compile(r"first\s+wrong\s+step\s*\**\s*[:#=\-]?\s*\**\s*(?:step\s*)?\(?(\d{1,4})", re.I)
_VERIFY_STEP = re.compile(r"verify\s+step\s*\**\s*[:#=\-]?\s*\**\s*(?:step\s*)?\(?(\d{1,4})", re.I)
_REASON = re.compile(r"reason\s*\**\s*:\s*\**\s*(.+?)" + _FIELD_END, re.I | re.S)
_HINT = re.compile(r"hint\s*\**\s*:\s*\**\s*(.+?)" + _FIELD_END, re.I | re.S)
_VERIFICATION = re.compile(r"verification\s*\**\s*:\s*\**\s*(.+?)" + _FIELD_END, re.I | re.S)


def critic_prompt(problem: Problem, texts: Sequence[str], kind: str) -> str:
    """The LLM critic's prompt for a line of reasoning (``kind`` ``correct`` = it is wrong
    and needs a correction; ``verify`` = it is right and needs a verification)."""
    reference = problem.solution or f"The answer is {problem.answer}."
    steps = "\n".join(f"({i}) {t}" for i, t in enumerate(texts, 1))
    template = CRITIC_WRONG_PROMPT if kind == "correct" else CRITIC_VERIFY_PROMPT
    return template.format(question=problem.question, reference=reference, steps=steps)


def _clean(text: str) -> str:
    """One tidy line: markdown emphasis and meta tokens removed, whitespace collapsed."""
    for t in ("<|continue|>", "<|reflect|>", "<|explore|>"):
        text = text.replace(t, " ")
    text = text.replace("**", "")
    return " ".join(text.split()).strip()


def parse_critic_reply(reply: str, kind: str, n_steps: int) -> Feedback | None:
    """Feedback from an LLM critic's reply; None when it cannot be read.

    A correction needs a step number in ``1..n_steps`` and a non-empty hint (the reason is
    optional); a verification needs a step number and a non-empty verification line.
    """
    if kind == "correct":
        m = _WRONG_STEP.search(reply)
        hint = _HINT.search(reply)
        if m is None or hint is None:
            return None
        k = int(m.group(1))
        hint_text = _clean(hint.group(1))
        if not 1 <= k <= n_steps or not hint_text:
            return None
        reason = _REASON.search(reply)
        reason_text = _clean(reason.group(1)) if reason else ""
        reflect = f"Wait, step {k} is wrong: {reason_text}" if reason_text else f"Wait, step {k} is wrong."
        return Feedback("correct", after=k, keep=k - 1, reflect=reflect, explore=hint_text)
    m = _VERIFY_STEP.search(reply)
    ver = _VERIFICATION.search(reply)
    if m is None or ver is None:
        return None
    j = int(m.group(1))
    ver_text = _clean(ver.group(1))
    if not 1 <= j <= n_steps or not ver_text:
        return None
    return Feedback("verify", after=j, reflect=f"Let me verify step {j}: {ver_text}")


def valid_feedback(fb: Feedback | None) -> bool:
    """Feedback that can be rendered: non-blank texts without meta tokens."""
    if fb is None or not fb.reflect.strip() or has_meta_token(fb.reflect + fb.explore):
        return False
    return fb.kind == "verify" or bool(fb.explore.strip())


# --------------------------------------------------------------------------- selectors


def rule_key(correct: bool, response: str, n_reflect: int, sample: int) -> tuple:
    """Sort key of the rule selector (smaller is better): correct, shorter, fewer
    reflections, earlier sample, then the text itself, so the choice is deterministic."""
    return (not correct, len(response), n_reflect, sample, response)

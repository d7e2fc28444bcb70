"""Tests for satori.grading: extraction, equivalence, batch and file grading, time bounds."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from satori.errors import SatoriError
from satori.grading import (
    _shutdown_workers,
    answers_equal,
    extract_answer,
    grade,
    grade_batch,
    grade_file,
    normalize_answer,
)

PATHOLOGICAL = "9^{9^{9^{9}}}"  # sympy tries to evaluate this power for minutes


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{3}, then <|reflect|> no: \\boxed {4}.", "4"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("$\\boxed{-12}$", "-12"),
        ("\\boxed{12 \\text{ cm}}", "12 \\text{ cm}"),
        ("\\boxed{25\\%}", "25\\%"),
        ("\\boxed{\\$18}", "\\$18"),
        ("The answer is 42.", "42"),
        ("Therefore, the final answer is $\\frac{3}{4}$. I hope", "\\frac{3}{4}"),
        ("THE ANSWER IS: **1,234**", "1,234"),
        ("the answer is 3.5. Done", "3.5"),
        ("The answer is 12 cm.\nmore text 99", "12 cm"),
        ("blah\n#### 72", "72"),
        ("#### 1,000\n", "1,000"),
        ("she has 3 apples and then -3.5 left", "-3.5"),
        ("total 1,234,567 pears", "1,234,567"),
        ("10-5 = 5", "5"),
        ("\\boxed{5} and an answer is 6", "5"),  # boxed beats "answer is"
        ("The answer is 6\n#### 7", "6"),  # "answer is" beats ####
        ("#### 7 and then 8", "7 and then 8"),  # #### beats the last number
        ("\\boxed{5<|reflect|>}", "5<|reflect|>"),  # meta tokens are not stripped
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{42",  # truncated box: no answer at all
        "\\boxed{5} then <|reflect|> so \\boxed{\\frac{1}{2}",  # last box unclosed
        "put it in \\boxed",
        "",
        "no digits here",
    ],
)
def test_extract_answer_none(text: str) -> None:
    assert extract_answer(text) is None


def test_last_number_fallback_switch() -> None:
    text = "she has 17 apples left"
    assert extract_answer(text) == "17"
    assert extract_answer(text, last_number_fallback=False) is None
    # markdown headings are not GSM8K answers
    assert extract_answer("#### Step 1: add\n so 9", last_number_fallback=False) is None
    # the empty box of an instruction is ignored
    assert extract_answer("put your answer in \\boxed{}. It is 8") == "8"


@given(st.integers(-10**12, 10**12), st.text(alphabet="ab {}\n.", max_size=30))
@settings(max_examples=60, deadline=None)
def test_boxed_integer_roundtrip(n: int, noise: str) -> None:
    text = f"{noise} \\boxed{{{n}}} {noise.replace('{', '').replace('}', '')}"
    assert extract_answer(text) == str(n)
    assert answers_equal(extract_answer(text), f"{n:,}")


@pytest.mark.parametrize(
    "text",
    [
        "{" * 1_000_000,
        "\\boxed{" + "{" * 1_000_000,
        "\\boxed{" + "{" * 1_000_000 + "}",
        "\\boxed{" * 200_000,
        "1" * 1_000_000,
        "1," * 500_000,
        "answer is " * 100_000,
        "#" * 1_000_000,
        "- " * 500_000,
        "5 " + "cm " * 300_000,
    ],
)
def test_huge_inputs_are_fast(text: str) -> None:
    # a guard against catastrophic backtracking (minutes or hours), not a speed target:
    # the bound is loose so a busy CI machine does not fail it
    start = time.monotonic()
    extracted = extract_answer(text)
    normalize_answer(text)
    answers_equal(extracted, "5")
    grade(text, "5")
    assert time.monotonic() - start < 15.0


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  5  ", "5"),
        ("$5$", "5"),
        ("\\$5", "5"),
        ("50\\%", "50"),
        ("50%", "50"),
        ("5.", "5"),
        ("5 \\text{ cm}", "5"),
        ("5 cm", "5"),
        ("5 dollars", "5"),
        ("12\\text{cm}^2", "12"),
        ("\\text{yes}", "yes"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\rightarrow", "\\rightarrow"),
        ("1\\!234", "1234"),
        ("1,234", "1234"),
        ("1,234,567.5", "1234567.5"),
        ("1{,}000", "1000"),
        ("(1,2)", "(1,2)"),
        ("(1,234)", "(1,234)"),
        ("1,2", "1,2"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("2x", "2x"),
        ("5<|reflect|>", "5<|reflect|>"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "1/2"),
        ("-\\frac{3}{4}", "-0.75"),
        ("1,234", "1234"),
        ("50\\%", "50"),
        ("50%", "\\frac{1}{2}"),  # via math-verify, which reads 50% as 1/2
        ("\\$18", "18"),
        ("12 \\text{ cm}", "12"),
        ("x = 5", "5"),
        ("10.00", "10"),
        ("(1, 2)", "(1,2)"),
        ("2^{1/2}", "\\sqrt{2}"),  # via math-verify
        ("(x+1)^2", "x^2+2x+1"),  # via math-verify
        ("\\{2, 1\\}", "\\{1,2\\}"),  # via math-verify
    ],
)
def test_answers_equal_true(pred: str, gold: str) -> None:
    assert answers_equal(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (None, "5"),
        ("", "5"),
        ("  ", "5"),
        ("5", ""),
        ("6", "5"),
        ("-5", "5"),
        ("0.333", "1/3"),
        ("0.333333", "1/3"),  # numbers compare exactly
        ("12", "1,2"),
        ("\\pi", "3"),
        ("five", "5"),
        ("5<|reflect|>", "5"),
        ("\\sqrt{3}", "\\sqrt{2}"),  # via math-verify
        ("(3, 4)", "(1,2)"),  # via math-verify
        ("1" * 10_000, "1"),
    ],
)
def test_answers_equal_false(pred: str | None, gold: str) -> None:
    assert not answers_equal(pred, gold)


# --------------------------------------------------------------------------- grade


def test_grade_rules() -> None:
    assert grade("\\boxed{5}", "5") == ("5", True)
    assert grade("", "5") == (None, False)
    assert grade(" \n\t", "5") == (None, False)
    assert grade("\\boxed{5}", "5", truncated=True) == ("5", False)
    assert grade("so she has 5 left", "5") == ("5", True)
    assert grade("so she has 5 left", "5", last_number_fallback=False) == (None, False)
    coat = "Step 1: 2+2=5 <|reflect|> wrong. <|explore|> 2+2=4 \\boxed{4}"
    assert grade(coat, "4") == ("4", True)
    assert grade("\\boxed{4<|explore|>}", "4") == ("4<|explore|>", False)


def test_grade_batch_matches_grade_and_keeps_order() -> None:
    responses = ["\\boxed{2^{1/2}}", "\\boxed{5}", "", "\\boxed{\\sqrt{3}}", "x 7", "\\boxed{9}"] * 12
    golds = ["\\sqrt{2}", "5", "5", "\\sqrt{2}", "7", "8"] * 12
    cut = [False, False, False, False, False, True] * 12
    batch = grade_batch(responses, golds, truncated=cut, workers=2)
    single = [grade(r, g, truncated=c) for r, g, c in zip(responses, golds, cut)]
    assert batch == single
    assert [ok for _, ok in batch[:6]] == [True, True, False, False, True, False]
    with pytest.raises(SatoriError, match="responses"):
        grade_batch(["a"], ["a", "b"])
    with pytest.raises(SatoriError, match="timeout"):
        grade_batch(["a"], ["a"], timeout=0)
    with pytest.raises(SatoriError, match="timeout"):
        answers_equal("a", "b", timeout=float("inf"))


def _child_pids() -> set[int]:
    """PIDs of this process's live children (Linux /proc)."""
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            kids.add(int(entry))
    return kids


def test_fast_batches_start_no_process_and_overruns_replace_workers() -> None:
    _shutdown_workers()
    before = _child_pids()
    responses = [f"so \\boxed{{{i}}}" for i in range(500)]
    results = grade_batch(responses, [str(i) for i in range(0, 1000, 2)], workers=2)
    assert [ok for _, ok in results] == [i == 0 for i in range(500)]
    assert _child_pids() == before
    assert answers_equal("2^{1/2}", "\\sqrt{2}")  # starts one worker and keeps it
    assert len(_child_pids() - before) == 1
    assert not answers_equal(PATHOLOGICAL, "1", timeout=0.5)  # the worker is killed
    assert _child_pids() == before
    assert answers_equal("2^{1/2}", "\\sqrt{2}")  # a fresh worker serves the next call
    (worker_pid,) = _child_pids() - before
    os.kill(worker_pid, signal.SIGKILL)  # an idle worker dies (e.g. the OOM killer)
    time.sleep(0.2)
    assert answers_equal("2^{1/2}", "\\sqrt{2}")  # the dead one is skipped, not blamed


def test_timeout_from_a_thread() -> None:
    out: dict[str, object] = {}

    def run() -> None:
        start = time.monotonic()
        out["slow"] = answers_equal(PATHOLOGICAL, "1", timeout=1.0)
        out["slow_s"] = time.monotonic() - start
        out["normal"] = grade("\\boxed{2^{1/2}}", "\\sqrt{2}", timeout=5.0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert out["slow"] is False
    assert out["slow_s"] < 4.0
    assert out["normal"] == ("2^{1/2}", True)


def _grade_in_child(pair: tuple[str, str]) -> tuple[bool, bool]:
    pred, gold = pair
    return answers_equal(pred, gold), answers_equal(PATHOLOGICAL, "1", timeout=0.5)


def test_works_inside_daemonic_worker_process() -> None:
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # pool workers are daemonic
        result = pool.apply_async(_grade_in_child, (("2^{1/2}", "\\sqrt{2}"),)).get(timeout=60)
    assert result == (True, False)


# --------------------------------------------------------------------------- generated file


def _records(rng: random.Random, n: int) -> list[tuple[dict, bool]]:
    """``n`` varied records with their known correct labels."""
    filler = ["Let x be the count.", "Step 1: 3 + 4 = 7.", "We have 12 items.", "Check: 2*6 = 12."]
    out = []
    for i in range(n):
        kind = i % 24
        a, b = rng.randint(1, 40), rng.randint(2, 40)
        n_int = rng.randint(-50, 99_999)
        pre = " ".join(rng.sample(filler, 2)) + "\n\n"
        gold: object = str(n_int)
        truncated = False
        if kind == 0:
            resp, ok = pre + f"So the answer is \\boxed{{{n_int}}}.", True
            gold = n_int if rng.random() < 0.5 else str(n_int)  # JSON numbers allowed
        elif kind == 1:
            resp, ok = pre + f"\\boxed{{{n_int + rng.choice([-2, -1, 1, 3])}}}", False
        elif kind == 2:
            k = rng.randint(1, 4)
            gold = str(Fraction(a, b))
            cmd = rng.choice(["frac", "dfrac", "tfrac"])
            resp, ok = pre + f"\\boxed{{\\{cmd}{{{k * a}}}{{{k * b}}}}}", True
        elif kind == 3:
            gold = str(Fraction(a, b))
            resp, ok = pre + f"\\boxed{{\\frac{{{a + b}}}{{{b}}}}}", False
        elif kind == 4:
            gold = f"\\frac{{{a}}}{{{b}}}"
            resp, ok = pre + f"the final answer is {a}/{b}.", True
        elif kind == 5:
            value = Fraction(rng.randint(1, 400), 8)
            gold = str(float(value))
            shown = rng.choice([f"{float(value):.3f}", f"\\frac{{{value.numerator}}}{{{value.denominator}}}"])
            resp, ok = pre + f"\\boxed{{{shown}}}", True
        elif kind == 6:
            value = Fraction(rng.randint(1, 400), 8)
            gold = str(float(value))
            resp, ok = pre + f"\\boxed{{{float(value) + 0.01:.3f}}}", False
        elif kind == 7:
            big = rng.randint(1000, 10**9)
            gold = str(big)
            resp, ok = pre + rng.choice([f"The answer is ${big:,}$.", f"\\boxed{{{big:,}}}", f"#### {big:,}"]), True
        elif kind == 8:
            big = rng.randint(1000, 10**9)
            gold = str(big)
            resp, ok = pre + f"The answer is {big + 1000:,}.", False
        elif kind == 9:
            money = rng.randint(1, 999)
            gold = str(money)
            resp, ok = pre + rng.choice([f"\\boxed{{\\${money}}}", f"The answer is ${money}.", f"\\boxed{{{money}.00}}"]), True
        elif kind == 10:
            pct = rng.randint(1, 99)
            gold = str(pct)
            wrong = rng.random() < 0.5
            resp, ok = pre + f"\\boxed{{{pct + wrong}\\%}}", not wrong
        elif kind == 11:
            length = rng.randint(1, 500)
            gold = str(length)
            unit = rng.choice(["\\boxed{%d \\text{ cm}}", "The answer is %d meters.", "\\boxed{%d\\text{ km}^2}"])
            resp, ok = pre + unit % length, True
        elif kind == 12:
            root = rng.choice([2, 3, 5, 6, 7, 10, 11])
            gold = f"\\sqrt{{{root}}}"
            shown, ok = rng.choice([(f"\\sqrt{{{root}}}", True), (f"{root}^{{1/2}}", True), (f"\\sqrt{{{root + 1}}}", False)])
            resp = pre + f"\\boxed{{{shown}}}"
        elif kind == 13:
            resp, ok = pre + f"{n_int} - 0 = {n_int}\n#### {n_int}", True
        elif kind == 14:
            resp, ok = pre + f"so she has {n_int} apples left", True
        elif kind == 15:
            resp, ok = pre + f"so she has {n_int + 7} apples left", False
        elif kind == 16:
            resp, ok = rng.choice(["", "   ", "\n\n", "\t"]), False
        elif kind == 17:
            resp, ok, truncated = pre + f"\\boxed{{{n_int}}}", False, True
        elif kind == 18:
            resp, ok = pre + f"\\boxed{{{n_int}<|reflect|>}}", False
        elif kind == 19:
            first, last = rng.sample([n_int, n_int + 1], 2)
            resp = f"{pre}\\boxed{{{first}}}\n\n<|reflect|> Let me check.\n\n<|explore|> Redo: \\boxed{{{last}}}"
            ok = last == n_int
        elif kind == 20:
            resp, ok = pre + f"So \\boxed{{{n_int}", False
        elif kind == 21:
            gold = f"-{a}"
            shown, ok = rng.choice([(f"-{a}", True), (f"{a}", False)])
            resp = pre + f"\\boxed{{{shown}}}"
        elif kind == 22:
            gold = f"({a},{b})"
            shown, ok = rng.choice([(f"\\left( {a}, {b} \\right)", True), (f"({a + 50}, {b})", False)])
            resp = pre + f"\\boxed{{{shown}}}"
        else:
            gold = "\\frac{1}{2}"
            resp, ok = pre + "\\boxed{50\\%}", True  # percent vs fraction: math-verify reads 1/2
        record = {"id": i, "question": f"q{i}", "response": resp, "gold": gold}
        if truncated or rng.random() < 0.3:
            record["cut"] = truncated
        out.append((record, ok))
    rng.shuffle(out)
    return out


def test_generated_file_full_agreement(tmp_path: Path) -> None:
    labelled = _records(random.Random(20240611), 1200)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "graded.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r, _ in labelled), encoding="utf-8")
    start = time.monotonic()
    accuracy = grade_file(src, dst, "response", "gold", truncated_field="cut", workers=2)
    elapsed = time.monotonic() - start
    graded = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert len(graded) == len(labelled)
    mismatches = [
        (g["response"], g["gold"], g["extracted"], ok)
        for g, (_, ok) in zip(graded, labelled)
        if g["correct"] is not ok
    ]
    assert mismatches == []
    for g, (record, _) in zip(graded, labelled):
        assert {k: v for k, v in g.items() if k not in ("extracted", "correct")} == record
    assert accuracy == pytest.approx(sum(ok for _, ok in labelled) / len(labelled))
    assert 0.3 < accuracy < 0.8
    # a guard against a stuck worker pool, not a speed target (grading speed is measured in
    # benchmarks/): 25 s failed with the suite niced beside a pipeline run on 2 cores (50 s)
    assert elapsed < 180
    assert [p.name for p in dst.parent.iterdir()] == ["graded.jsonl"]  # no temp file left


# --------------------------------------------------------------------------- grade_file errors


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_grade_file_accepts_numeric_answers_and_blank_lines(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.jsonl", ['{"r": "\\\\boxed{42}", "y": 42}', "", '{"r": "x", "y": 0.5}'])
    out = tmp_path / "b.jsonl"
    assert grade_file(src, out, "r", "y") == 0.5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"r": "\\boxed{42}", "y": 42, "extracted": "42", "correct": True},
        {"r": "x", "y": 0.5, "extracted": None, "correct": False},
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no records"),
        (["", "  "], "no records"),
        (['{"r": "1", "y": "1"}', '{"r": "1", "y": '], r"in\.jsonl:2: malformed JSON"),
        (['{"r": "1", "y": "1"}', "[1, 2]"], r"in\.jsonl:2: expected a JSON object"),
        (['{"r": "1", "y": "1"}', '{"r": "1"}'], r"in\.jsonl:2: missing field 'y'"),
        (['{"y": "1"}'], r"in\.jsonl:1: missing field 'r'"),
        (['{"r": null, "y": "1"}'], r"in\.jsonl:1: field 'r' must be a string, got null"),
        (['{"r": "1", "y": [1]}'], r"in\.jsonl:1: field 'y' must be a string, got list"),
        (['{"r": "1", "y": "1", "cut": "no"}'], r"in\.jsonl:1: field 'cut' must be true or false"),
    ],
)
def test_grade_file_errors(tmp_path: Path, lines: list[str], message: str) -> None:
    src = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SatoriError, match=message):
        grade_file(src, out, "r", "y", truncated_field="cut")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_grade_file_missing_input(tmp_path: Path) -> None:
    with pytest.raises(SatoriError, match="nope.jsonl"):
        grade_file(tmp_path / "nope.jsonl", tmp_path / "out.jsonl", "r", "y")


def test_grade_file_bad_utf8(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"r": "1", "y": "1"}\n{"r": "\xff", "y": "1"}\n')
    with pytest.raises(SatoriError, match=r"in\.jsonl:2: not valid UTF-8"):
        grade_file(src, tmp_path / "out.jsonl", "r", "y")

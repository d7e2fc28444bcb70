"""Tests of the testbed: tasks, step checker, tokenizer/model factory, pretraining."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from satori.data import Problem, plain_prompt
from satori.errors import SatoriError
from satori.testbed.checker import (
    check_steps,
    correct_step_text,
    first_wrong_prefix,
    new_step_outcomes,
    parse_equation,
    reflection_points,
    verify_step,
)
from satori.testbed.model import build_model, build_tokenizer
from satori.testbed.pretrain import (
    CHECK_CUE,
    PretrainConfig,
    checked_line,
    checked_prompt,
    checking_text,
    lr_at,
    make_batch,
    pretrain,
)
from satori.testbed.tasks import (
    MAX_VALUE,
    MIN_VALUE,
    chain_values,
    make_problems,
    reference_solution,
)

# Ana has 7. +5 -> 12, -3 -> 9, *2 -> 18, /3 -> 6
HAND = Problem(
    id="hand",
    question="Ana has 7 marbles. She finds 5 more marbles. She gives 3 marbles to Ben. "
    "Then her marbles double. She keeps only a third of her marbles. How many marbles does Ana have now?",
    answer="6",
    meta={
        "start": 7,
        "ops": [["+", 5], ["-", 3], ["*", 2], ["/", 3]],
        "level": 4,
        "source": "testbed",
        "split": "test",
    },
)
RIGHT = [
    "Step 1: 7 + 5 = 12",
    "Step 2: 12 - 3 = 9",
    "Step 3: 9 * 2 = 18",
    "Step 4: 18 / 3 = 6\nThe answer is \\boxed{6}.",
]


def solution(steps: list[str]) -> str:
    return "\n\n".join(steps)


# ---------------------------------------------------------------- tasks


def test_make_problems_deterministic_and_seed_dependent():
    a = make_problems("train", 50, seed=3)
    b = make_problems("train", 50, seed=3)
    c = make_problems("train", 50, seed=4)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.question for p in a] != [p.question for p in c]


def test_splits_are_disjoint_across_seeds():
    questions = {}
    for split, n in (("train", 2000), ("valid", 300), ("test", 300)):
        questions[split] = {
            p.question for s in (0, 1) for p in make_problems(split, n, seed=s)
        }
    assert not questions["train"] & questions["valid"]
    assert not questions["train"] & questions["test"]
    assert not questions["valid"] & questions["test"]
    assert len(questions["valid"]) > 550  # distinct within the split


def test_levels_meta_and_bounds():
    problems = make_problems("valid", 100, seed=0)
    ood = make_problems("ood", 20, seed=0)
    assert [p.meta["level"] for p in problems[:10]] == [2, 3, 4, 5, 6, 2, 3, 4, 5, 6]
    assert {p.meta["level"] for p in ood} == {7, 8}
    assert {p.meta["level"] for p in make_problems("test", 9, levels=(3,))} == {3}
    for p in problems + ood:
        assert json.loads(json.dumps(p.meta)) == p.meta
        assert p.meta["source"] == "testbed" and p.meta["split"] in ("valid", "ood")
        assert len(p.meta["ops"]) == p.meta["level"]
        values = chain_values(p.meta["start"], p.meta["ops"])
        assert all(MIN_VALUE <= v <= MAX_VALUE for v in values)
        assert p.answer == str(values[-1])
        assert (
            len(re.findall(r"\. ", p.question)) >= p.meta["level"]
        )  # one sentence per op


def test_make_problems_rejects_bad_input():
    with pytest.raises(SatoriError):
        make_problems("dev", 3)
    with pytest.raises(SatoriError):
        make_problems("train", 3, levels=(0,))


def test_reference_solution_format():
    for p in make_problems("test", 20, seed=1):
        steps = p.solution.split("\n\n")
        assert len(steps) == p.meta["level"]
        for k, step in enumerate(steps, 1):
            assert step.startswith(f"Step {k}: ")
            assert len(re.findall(r"=", step)) == 1
        assert steps[-1].endswith(f"The answer is \\boxed{{{p.answer}}}.")
        check = check_steps(p, p.solution)
        assert check.first_wrong_step is None and check.final_correct


def _step_errors(p: Problem, text: str) -> list[bool]:
    """Per written step: is it an injected error (bad arithmetic or wrong operand)?"""
    errors, prev = [], None
    eqs = [parse_equation(s) for s in text.split("\n\n")]
    for (op, operand), eq in zip(p.meta["ops"], eqs):
        assert (
            prev is None or eq.a == prev
        )  # continues from the written (maybe wrong) value
        arith = {
            "+": eq.a + eq.b,
            "-": eq.a - eq.b,
            "*": eq.a * eq.b,
            "/": eq.a / eq.b,
        }[eq.op]
        errors.append(arith != eq.c or eq.b != operand or eq.op != op)
        prev = eq.c
    return errors


def test_error_injection_rate_and_propagation():
    problems = make_problems("train", 1000, seed=2)
    rng = random.Random(0)
    flags, one_error_final_wrong = [], []
    for p in problems:
        text = reference_solution(p, error_rate=0.2, rng=rng)
        errs = _step_errors(p, text)
        flags += errs
        last = parse_equation(text.split("\n\n")[-1])
        assert text.endswith(f"\\boxed{{{int(last.c)}}}.")
        if sum(errs) == 1:
            one_error_final_wrong.append(check_steps(p, text).final_correct is False)
            assert check_steps(p, text).first_wrong_step == errs.index(True) + 1
    rate = sum(flags) / len(flags)  # about 4000 steps: sd of the rate about 0.006
    assert abs(rate - 0.2) < 0.03, rate
    assert len(one_error_final_wrong) > 200 and all(one_error_final_wrong)
    assert reference_solution(problems[0], 0.0) == problems[0].solution
    with pytest.raises(SatoriError):
        reference_solution(problems[0], error_rate=1.5)


# ---------------------------------------------------------------- checker


def test_checker_accepts_right_solution_and_swapped_operands():
    c = check_steps(HAND, solution(RIGHT))
    assert (c.first_wrong_step, c.final_correct, c.n_steps) == (None, True, 4)
    assert c.expected == ["7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18", "18 / 3 = 6"]
    swapped = solution(
        ["Step 1: 5 + 7 = 12", *RIGHT[1:2], "Step 3: 2 × 9 = 18", RIGHT[3]]
    )
    assert check_steps(HAND, swapped).first_wrong_step is None


def test_checker_wrong_arithmetic_at_step_3():
    text = solution(
        [
            *RIGHT[:2],
            "Step 3: 9 * 2 = 19",
            "Step 4: 19 / 3 = 6\nThe answer is \\boxed{6}.",
        ]
    )
    c = check_steps(HAND, text)
    assert c.first_wrong_step == 3 and "arithmetic" in c.reason
    assert c.final_correct  # right answer by luck, wrong steps


def test_checker_wrong_operand_at_step_2():
    text = solution(
        [
            RIGHT[0],
            "Step 2: 12 - 4 = 8",
            "Step 3: 8 * 2 = 16",
            "Step 4: 16 / 3 = 5\nThe answer is \\boxed{5}.",
        ]
    )
    c = check_steps(HAND, text)
    assert c.first_wrong_step == 2 and "operand" in c.reason and not c.final_correct


def test_checker_wrong_previous_value_and_operation():
    assert (
        check_steps(HAND, solution([RIGHT[0], "Step 2: 11 - 3 = 8"])).first_wrong_step
        == 2
    )
    c = check_steps(HAND, solution([RIGHT[0], "Step 2: 12 + 3 = 15"]))
    assert c.first_wrong_step == 2 and "operation" in c.reason


def test_checker_missing_and_extra_steps():
    c = check_steps(HAND, solution(RIGHT[:2]) + "\nThe answer is \\boxed{9}.")
    assert (c.first_wrong_step, c.reason, c.final_correct) == (3, "missing step", False)
    c = check_steps(
        HAND, solution(RIGHT[:3] + ["Step 4: 18 / 3 = 6", "Step 5: 6 + 1 = 7"])
    )
    assert (c.first_wrong_step, c.reason) == (5, "extra step")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "hello world",
        "\\boxed{",
        "= = 3 + ",
        "9" * 5000 + " + 1 = 2",
        "Step 99: 1 / 0 = 0",
    ],
)
def test_checker_garbage_is_wrong_at_step_1(garbage):
    c = check_steps(HAND, garbage)
    assert c.first_wrong_step == 1 and not c.final_correct


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("0123456789 +-*/=x÷\n:Step<|reflect|>{}\\boxed"))
        | st.characters(),
        max_size=200,
    )
)
def test_checker_never_raises(text):
    c = check_steps(HAND, text)
    assert c.first_wrong_step is None or 1 <= c.first_wrong_step <= 5


def test_checker_coat_text():
    coat = "<|continue|>".join(RIGHT)
    assert check_steps(HAND, coat).first_wrong_step is None
    # a wrong step 2, a reflection naming it, an exploration that redoes it and continues
    text = (
        RIGHT[0] + "<|continue|>Step 2: 12 - 3 = 8<|continue|>Step 3: 8 * 2 = 16"
        "<|reflect|>Wait, let me check step 2. 12 - 3 = 8 is wrong, it should be 12 - 3 = 9."
        "<|explore|>Step 2: 12 - 3 = 9<|continue|>" + "<|continue|>".join(RIGHT[2:])
    )
    c = check_steps(HAND, text)
    assert c.first_wrong_step is None and c.final_correct and c.n_steps == 4
    # same but never corrected: the checker sees the wrong line
    bad = text.split("<|explore|>")[0] + "\nThe answer is \\boxed{16}."
    assert check_steps(HAND, bad).first_wrong_step == 2
    # a verification step that quotes a wrong equation does not count as a step
    verified = (
        "<|continue|>".join(RIGHT[:2])
        + "<|reflect|>Let me verify: 12 - 3 = 10? No."
        + "<|continue|>"
        + "<|continue|>".join(RIGHT[2:])
    )
    assert check_steps(HAND, verified).first_wrong_step is None


def test_reflection_points_pair_each_step_with_the_reflection_after_it():
    # a wrong step 2, one more step on the wrong line, a reflection, the redone step 2, then right to the end
    text = (
        RIGHT[0] + "<|continue|>Step 2: 12 - 3 = 8<|continue|>Step 3: 8 * 2 = 16"
        "<|reflect|>Wait, step 2 is wrong.<|explore|>Step 2: 12 - 3 = 9<|continue|>"
        + "<|continue|>".join(RIGHT[2:])
    )
    # (line right so far, a reflection follows): step 1 right; step 2 wrong; step 3 on the wrong line,
    # then the reflection; the explored step 2 right again, steps 3 and 4 right
    assert reflection_points(HAND, text) == [(True, False), (False, False), (False, True), (True, False),
                                             (True, False), (True, False)]
    # a verification after a right step is a reflection after a right line; its quoted equation is no step
    verified = "<|continue|>".join(RIGHT[:2]) + "<|reflect|>Let me verify: 12 - 3 = 10? No.<|continue|>" + \
        "<|continue|>".join(RIGHT[2:])
    assert reflection_points(HAND, verified) == [(True, False), (True, True), (True, False), (True, False)]
    # plain CoT: no reflection anywhere; an extra step past the last operation is a wrong line
    assert reflection_points(HAND, solution(RIGHT + ["Step 5: 6 + 1 = 7"])) == [(True, False)] * 4 + [(False, False)]
    assert reflection_points(HAND, "no equations at all") == []


def test_new_step_outcomes_judge_each_new_step_of_a_right_line_with_where_it_starts():
    # step 1 right, a check, step 2 slips (wrong arithmetic), step 3 goes on from the wrong line,
    # a check finds step 2, its redo is not a new step, then step 3 again and step 4, both right
    check = "<|reflect|>Let me verify step 1: 7 + 5 = 12. Right.<|continue|>"
    text = (RIGHT[0] + check + "Step 2: 12 - 3 = 8<|continue|>Step 3: 8 * 2 = 16"
            "<|reflect|>Step 2 is wrong.<|explore|>Step 2: 12 - 3 = 9<|continue|>" + "<|continue|>".join(RIGHT[2:]))
    outcomes = new_step_outcomes(HAND, text)
    assert [(after, why) for _, after, why in outcomes] == [
        (False, ""), (True, "wrong arithmetic"), (True, ""), (True, "")]
    starts = [at for at, _, _ in outcomes]
    assert [text[at:at + 7] for at in starts] == ["Step 1:", "Step 2:", "Step 3:", "Step 4:"]
    assert starts[1] == len(RIGHT[0] + check) and starts[2] == text.index(RIGHT[2])
    # plain text: a step is placed after its blank line; a wrong operand, then nothing more is new
    plain = solution([RIGHT[0], "Step 2: 12 - 4 = 8", *RIGHT[2:]])
    assert new_step_outcomes(HAND, plain) == [(0, False, ""), (len(RIGHT[0]) + 2, False, "wrong operand, expected 3")]
    assert new_step_outcomes(HAND, "  \n\nno equations") == []


def test_first_wrong_prefix_finds_where_the_line_first_goes_wrong():
    steps = [RIGHT[0], "Step 2: 12 - 3 = 8", "Step 3: 8 * 2 = 16", "Step 4: 16 / 3 = 5\nThe answer is \\boxed{5}."]
    prefixes = ["<|continue|>".join(steps[: i + 1]) for i in range(len(steps))]
    assert first_wrong_prefix(HAND, prefixes) == 1
    right = ["<|continue|>".join(RIGHT[: i + 1]) for i in range(len(RIGHT))]
    assert first_wrong_prefix(HAND, right) is None  # unfinished lines are not wrong
    # a reflection that quotes a wrong equation is no step; an explore that redoes step 2 wrongly is
    checked = right[1] + "<|reflect|>Is 12 - 3 = 10? No."
    assert first_wrong_prefix(HAND, [right[0], right[1], checked, checked + "<|explore|>Step 2: 12 - 3 = 7"]) == 3
    assert first_wrong_prefix(HAND, []) is None


def test_verify_step_and_correct_step_text():
    assert correct_step_text(HAND, 3) == "9 * 2 = 18"
    assert verify_step(HAND, 3, "Step 3: 9 * 2 = 18")
    assert verify_step(HAND, 1, "5 + 7 = 12")
    assert not verify_step(HAND, 3, "9 * 2 = 19")
    assert not verify_step(HAND, 3, "no equation here")
    for k in (0, 5):
        with pytest.raises(SatoriError):
            correct_step_text(HAND, k)
    with pytest.raises(SatoriError):
        check_steps(Problem(id="x", question="q", answer="1"), "Step 1: 1 + 1 = 2")


# ---------------------------------------------------------------- tokenizer and model


@pytest.fixture(scope="module")
def tokenizer():
    problems = make_problems("train", 300, seed=0)
    return build_tokenizer(
        [plain_prompt(p.question) + p.solution for p in problems], vocab_size=512
    )


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_digits_and_prompt_boundary(tokenizer):
    ids = tokenizer("x 12345 = 678", add_special_tokens=False).input_ids
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if p.isdigit()] == list("12345678")
    p = make_problems("test", 1)[0]
    prompt = plain_prompt(p.question)
    joint = tokenizer(prompt + p.solution, add_special_tokens=False).input_ids
    assert (
        joint
        == tokenizer(prompt, add_special_tokens=False).input_ids
        + tokenizer(p.solution, add_special_tokens=False).input_ids
    )
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_model_save_load_with_auto_classes(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model(len(tokenizer), "tiny", tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok2("Step 1: 7 + 5 = 12").input_ids])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    default = AutoModelForCausalLM.from_pretrained(
        tmp_path
    )  # SDPA: same maths, other kernel
    assert torch.allclose(model(ids).logits, default(ids).logits, atol=1e-5)
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id
    small = build_model(len(tokenizer), "small")
    assert 1_000_000 <= sum(p.numel() for p in small.parameters()) <= 10_000_000
    with pytest.raises(SatoriError):
        build_model(100, "huge")


# ---------------------------------------------------------------- pretraining


def test_lr_schedule():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_make_batch_masks_prompt_and_padding():
    ids, labels = make_batch(
        [([5, 6, 7, 8], 2), ([9, 10, 11], 1)], pad_id=1, multiple=8
    )
    assert ids.shape == (2, 8)
    assert ids[1].tolist() == [9, 10, 11, 1, 1, 1, 1, 1]
    assert labels[0].tolist() == [-100, -100, 7, 8] + [-100] * 4
    assert labels[1].tolist() == [-100, 10, 11] + [-100] * 5


def test_checking_exercise_checks_mid_solution_and_goes_on_right():
    rng = random.Random(0)
    kinds = set()
    for problem in make_problems("train", 200, seed=3):
        prompt, response = checking_text(problem, rng)
        assert prompt.startswith(plain_prompt(problem.question)) and prompt.endswith(CHECK_CUE)
        steps = prompt[len(plain_prompt(problem.question)) : -len(CHECK_CUE)].split("\n\n")
        cut, n = len(steps), problem.meta["level"]
        prefix = check_steps(problem, "\n\n".join(steps))
        wrong = prefix.first_wrong_step if (prefix.first_wrong_step or n + 1) <= prefix.n_steps else None
        assert wrong in (None, cut)  # cut at the first wrong step, if any
        verdict = response.split("\n\n")[0]
        kept = steps[:-1] if wrong else steps
        if wrong or cut < n:  # the rest begins at the redone step or the next one
            assert response.count(f"Step {len(kept) + 1}:") == 1
            rest = response[response.index(f"Step {len(kept) + 1}:") :]
        else:
            rest = ""
        line = check_steps(problem, "\n\n".join(kept + [rest] if rest else kept))
        assert line.first_wrong_step is None and line.n_steps == n and line.final_correct
        if wrong:
            assert f"step {cut}" in verdict.lower()
        kinds.add(("wrong" if wrong else "right", cut < n))
    assert kinds == {("wrong", True), ("wrong", False), ("right", True), ("right", False)}


def test_checking_exercise_prior_checks_check_earlier_right_steps_in_the_prompt():
    problems = make_problems("train", 200, seed=3)
    plain = [checking_text(p, random.Random(p.id)) for p in problems]
    # 0 draws nothing more: the exercises are the ones without the option
    assert [checking_text(p, random.Random(p.id), 0.0) for p in problems] == plain
    n_checks = []
    for problem, (prompt0, response0) in zip(problems, plain):
        prompt, response = checking_text(problem, random.Random(problem.id), 1.0)
        assert response == response0  # the same exercise, answered the same way
        line = prompt[len(plain_prompt(problem.question)) : -len(CHECK_CUE)]
        cut = len(prompt0[len(plain_prompt(problem.question)) : -len(CHECK_CUE)].split("\n\n"))
        chunks = line.split("\n\n")
        checks = [c for c in chunks if c.startswith(CHECK_CUE.strip())]
        # with chance 1 every step before the cut is checked, right after it, and found right
        assert len(checks) == cut - 1
        for k, c in enumerate(checks, start=1):
            assert chunks[chunks.index(c) - 1].startswith(f"Step {k}:")
            assert f"step {k}" in c.lower() and "wrong" not in c and "mistake" not in c
        # the line the checks leave is the exercise's own
        assert check_steps(problem, line).found == check_steps(problem, prompt0[len(plain_prompt(problem.question)):]).found
        n_checks.append(len(checks))
    assert max(n_checks) >= 3


def test_checked_prompt_puts_right_checks_between_right_steps():
    for problem in [p for p in make_problems("valid", 20, seed=2) if p.meta["level"] > 2]:
        plain = checked_prompt(problem, 2, 0, seed=0)
        assert plain == plain_prompt(problem.question) + "\n\n".join(problem.solution.split("\n\n")[:2]) + "\n\n"
        for c in (1, 2):
            prompt = checked_prompt(problem, 2, c, seed=0)
            body = prompt[len(plain_prompt(problem.question)):]
            assert body.count(CHECK_CUE) == c and prompt.endswith("\n\n")
            assert all(f"step {k}" in chunk.lower() and "wrong" not in chunk
                       for k, chunk in enumerate(body.split(CHECK_CUE)[1:], start=1))
            # the checks leave the line as it was: with the next step written, three right steps
            step3 = problem.solution.split("\n\n")[2]
            verdict = check_steps(problem, body + step3)
            assert verdict.found == check_steps(problem, plain[len(plain_prompt(problem.question)):] + step3).found
            assert verdict.n_steps == 3 and verdict.first_wrong_step in (None, 4)  # nothing wrong so far


def test_checked_line_judges_a_check_by_what_follows_it():
    # HAND: 7 +5 -> 12, -3 -> 9, *2 -> 18, /3 -> 6
    steps = ["Step 1: 7 + 5 = 12", "Step 2: 12 - 3 = 8"]  # wrong at step 2
    rest = "Step 3: 9 * 2 = 18\n\nStep 4: 18 / 3 = 6\nThe answer is \\boxed{6}."
    assert checked_line(HAND, steps, f"Step 2 is wrong. Step 2: 12 - 3 = 9\n\n{rest}") == (True, True)
    assert checked_line(HAND, steps, "Step 2 is wrong. Step 2: 12 - 3 = 7\n\nStep 3: 7 * 2 = 14") == (True, False)
    assert checked_line(HAND, steps, "That matches.\n\nStep 3: 8 * 2 = 16") == (False, False)
    right = ["Step 1: 7 + 5 = 12", "Step 2: 12 - 3 = 9"]
    assert checked_line(HAND, right, f"It is right, step 2 has 12 - 3 = 9.\n\n{rest}") == (False, True)
    assert checked_line(HAND, right, f"Redo. Step 2: 12 - 3 = 9\n\n{rest}") == (True, True)
    assert checked_line(HAND, right, "It is right.") == (False, False)  # stops: not a solution
    done = right + [rest.split("\n\n")[0], rest.split("\n\n")[1]]
    assert checked_line(HAND, done, "It is right.") == (False, True)


TINY = {
    "model_size": "tiny",
    "steps": 3,
    "batch_size": 4,
    "n_valid": 5,
    "max_new_tokens": 6,
    "tokenizer_corpus": 50,
    "vocab_size": 400,
    "warmup_steps": 1,
}


def test_tiny_pretrain_is_deterministic_and_writes_build_info(tmp_path):
    threads = torch.get_num_threads()
    try:
        m1 = pretrain(tmp_path / "a", seed=5, **TINY)
        m2 = pretrain(tmp_path / "b", seed=5, **TINY)
        m3 = pretrain(tmp_path / "c", seed=6, **TINY)
    finally:
        torch.set_num_threads(threads)
    w1, w2, w3 = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)
    assert m1["loss_curve"] == m2["loss_curve"]
    info = json.loads((tmp_path / "a" / "build_info.json").read_text())
    assert info["config"]["seed"] == 5 and info["config"]["steps"] == 3
    assert (
        0.0 <= info["valid"]["accuracy"] <= 1.0
        and "satori_version" in info
        and "seconds" in info
    )
    checks = info["valid"]["checks"]
    assert checks["wrong"]["n"] + checks["right"]["n"] == TINY["n_valid"]
    assert all(0.0 <= checks[k][m] <= 1.0 for k, m in (("wrong", "repaired"), ("right", "kept_right")))
    assert not (tmp_path / "a.tmp").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    AutoTokenizer.from_pretrained(tmp_path / "a")
    with pytest.raises(SatoriError):
        pretrain(tmp_path / "a", seed=5, **TINY)
    with pytest.raises(SatoriError):
        pretrain(tmp_path / "d", no_such_setting=1)
    assert m3["config"]["seed"] == 6


def test_shipped_base_model_matches_default_config():
    from satori.testbed import BASE_MODEL_DIR

    info = json.loads((BASE_MODEL_DIR / "build_info.json").read_text())
    # rebuild the asset when defaults change; a setting added since the build (prior_checks) must
    # default to what the build did, and is then absent from its record
    defaults = PretrainConfig().__dict__
    assert set(info["config"]) <= set(defaults) and {**defaults, **info["config"]} == defaults
    assert set(defaults) - set(info["config"]) == {"prior_checks"} and defaults["prior_checks"] == 0
    tok = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)
    assert model.config.vocab_size == len(tok) and tok.padding_side == "left"
    # an imperfect reasoner, neither hopeless nor solved (the seed-0 build: 0.83 on 256 valid
    # problems, 0.69 on the 6-step ones) ...
    assert 0.6 <= info["valid"]["accuracy"] <= 0.9 and info["valid"]["accuracy_by_level"]["6"] < 0.8
    # ... that can check its work: after a wrong step and `Check:` it mostly repairs the line,
    # and it leaves right steps alone (the seed-0 build: 0.82 repaired, 0 right steps redone)
    checks = info["valid"]["checks"]
    assert checks["wrong"]["repaired"] > 0.6 and checks["right"]["redone"] < 0.1

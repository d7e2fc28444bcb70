"""satori rae: cutting at COAT step boundaries, buffer labels, merge, context check."""

import json
import random

import pytest

from satori.coat import CONTINUE, EXPLORE, REFLECT, parse_steps
from satori.data import DataConfig, Problem
from satori.errors import SatoriError
from satori.evaluate import read_samples
from satori.rae import (
    RAEConfig, build_initial_states, check_fit, cut_trajectory, first_error_cut, group_samples, run_rae,
)

C, R, E = CONTINUE, REFLECT, EXPLORE
FOUR = (f"Step 1: 2 + 3 = 5\n\n{C}Step 2: 5 * 2 = 10\n\n{R}Wait, 5 * 2 = 10 is correct.\n\n"
        f"{C}Step 3: 10 - 1 = 9\nThe answer is \\boxed{{9}}.")


def test_cut_zero_keeps_everything_then_reflects():
    assert cut_trajectory(FOUR, 0) == FOUR + R


def test_cut_drops_line_steps_at_token_boundaries():
    prefix = cut_trajectory(FOUR, 1)
    assert prefix == f"Step 1: 2 + 3 = 5\n\n{C}Step 2: 5 * 2 = 10\n\n{R}"
    assert [s.action for s in parse_steps(prefix)] == ["continue", "continue", "reflect"]
    assert "boxed" not in prefix  # T >= 1 removes the final-answer step
    # the reflection on step 2 is no step of the line: T = 1 cuts it away with step 3, never
    # leaving two reflections in a row
    assert cut_trajectory(FOUR, 2) == f"Step 1: 2 + 3 = 5\n\n{R}"


def test_cut_counts_the_steps_of_the_line_and_never_ends_on_a_reflection():
    fixed = (f"Step 1: 7 + 5 = 12{C}Step 2: 12 - 3 = 8{R}12 - 3 = 9, so step 2 is wrong.{E}Step 2: 12 - 3 = 9"
             f"{C}Step 3: 9 * 2 = 18{C}Step 4: 18 / 3 = 6 \\boxed{{6}}")
    assert cut_trajectory(fixed, 0) == fixed + R
    assert cut_trajectory(fixed, 1) == fixed[: fixed.index(f"{C}Step 4")] + R
    assert cut_trajectory(fixed, 2) == fixed[: fixed.index(f"{C}Step 3")] + R  # right after the redone step
    assert cut_trajectory(fixed, 3) == f"Step 1: 7 + 5 = 12{C}Step 2: 12 - 3 = 8{R}"  # the mistake, its check cut
    for t in range(4):
        actions = [s.action for s in parse_steps(cut_trajectory(fixed, t))]
        assert actions[-1] == "reflect" and actions[-2] != "reflect"
    # a response that ends on a reflection: T = 0 drops it rather than reflect on it
    assert cut_trajectory(RIGHT_CHAIN + f"{R}All four steps check out.", 0) == RIGHT_CHAIN + R
    # the mistake is in step 2 and two line steps follow it, whatever the reflections
    checked = WRONG_CHAIN.replace(f"8{C}Step 3", f"8{R}Step 2 looks right.{C}Step 3")
    assert first_error_cut(CHAIN, checked) == 2
    assert cut_trajectory(checked, 2) == f"Step 1: 7 + 5 = 12{C}Step 2: 12 - 3 = 8{R}"


def test_cut_never_removes_every_step():
    assert cut_trajectory(FOUR, 2) == f"Step 1: 2 + 3 = 5\n\n{R}"
    with pytest.raises(SatoriError, match="3 step"):
        cut_trajectory(FOUR, 3)  # three steps extend the line; the reflection does not
    with pytest.raises(SatoriError, match="blank"):
        cut_trajectory("  \n", 0)
    # plain text without meta tokens is one step: only T = 0
    assert cut_trajectory("Step 1: 1 + 1 = 2\n\\boxed{2}", 0) == "Step 1: 1 + 1 = 2\n\\boxed{2}" + R


def _problems(n):
    return [Problem(id=f"p{i}", question=f"What is {i} + 1?", answer=str(i + 1), meta={"level": 2}) for i in range(n)]


def _coat(i, answer, n_steps=4):
    steps = [f"Step {j}: thinking about {i}\n\n" for j in range(1, n_steps)]
    return steps[0] + "".join(C + s for s in steps[1:]) + f"{C}So \\boxed{{{answer}}}."


def _samples(problems):
    out = []
    for i, p in enumerate(problems):
        if i % 4 != 3:  # every 4th problem has only wrong samples
            out += [{"id": p.id, "question": p.question, "response": _coat(i, p.answer, 3 + j), "correct": True,
                     "sample": j} for j in range(2)]
        if i % 4 != 2:  # every 4th has only correct ones
            out += [{"id": p.id, "question": p.question, "response": _coat(i, "0", 3 + j), "correct": False,
                     "sample": 2 + j} for j in range(2)]
        out.append({"id": p.id, "question": p.question, "response": _coat(i, "7")[:20], "correct": False,
                    "truncated": True, "sample": 9})
    return out


def test_states_labels_merge_and_determinism():
    problems = _problems(8)
    samples = _samples(problems)
    states = build_initial_states(problems, samples, t_max=2, rng=random.Random(5))
    assert [s["status"] for s in states[:8]] == [0] * 8
    assert all(s["prefix"] == "" and s["T"] is None for s in states[:8])
    pos = [s for s in states if s["status"] == 1]
    neg = [s for s in states if s["status"] == -1]
    assert [s["meta"]["problem_id"] for s in pos] == ["p0", "p1", "p2", "p4", "p5", "p6"]
    assert [s["meta"]["problem_id"] for s in neg] == ["p0", "p1", "p3", "p4", "p5", "p7"]
    by_id = {p.id: p for p in problems}
    for s in pos + neg:
        assert s["prefix"].endswith(R) and s["answer"] == by_id[s["meta"]["problem_id"]].answer
        assert 0 <= s["T"] <= min(2, s["meta"]["n_steps"] - 1)
        source = next(x for x in samples if x["id"] == s["meta"]["problem_id"] and x["sample"] == s["meta"]["sample"])
        assert not source.get("truncated") and source["correct"] == (s["status"] == 1)
        assert s["prefix"] == cut_trajectory(source["response"], s["T"])
        if s["T"] == 0:
            assert "boxed" in s["prefix"]
    assert build_initial_states(problems, samples, 2, random.Random(5)) == states
    other = [build_initial_states(problems, samples, 2, random.Random(seed)) for seed in range(6, 12)]
    assert any(o != states for o in other)
    assert {s["T"] for o in other for s in o if s["status"]} == {0, 1, 2}
    only_buffers = build_initial_states(problems, samples, 2, random.Random(5), include_originals=False)
    assert only_buffers == states[8:]


# a testbed problem: 7, +5 -> 12, -3 -> 9, *2 -> 18, /3 -> 6
CHAIN = Problem(id="chain", question="Ana has 7 marbles. She finds 5 more. She gives 3 away. Then her marbles "
                "double. She keeps a third. How many marbles does Ana have now?", answer="6",
                meta={"start": 7, "ops": [["+", 5], ["-", 3], ["*", 2], ["/", 3]], "level": 4, "source": "testbed"})
RIGHT_CHAIN = f"Step 1: 7 + 5 = 12{C}Step 2: 12 - 3 = 9{C}Step 3: 9 * 2 = 18{C}Step 4: 18 / 3 = 6 \\boxed{{6}}"
# wrong at step 2, carried on to a wrong answer
WRONG_CHAIN = f"Step 1: 7 + 5 = 12{C}Step 2: 12 - 3 = 8{C}Step 3: 8 * 2 = 16{C}Step 4: 16 / 3 = 5 \\boxed{{5}}"


def test_first_error_cut_ends_the_negative_state_on_the_mistake():
    assert first_error_cut(CHAIN, WRONG_CHAIN) == 2  # 4 steps, the line goes wrong after the 2nd
    assert first_error_cut(CHAIN, RIGHT_CHAIN) is None
    # a right line with a wrong boxed answer has no step to cut at
    assert first_error_cut(CHAIN, RIGHT_CHAIN.replace("{6}", "{7}")) is None
    samples = [{"id": "chain", "question": CHAIN.question, "response": RIGHT_CHAIN, "correct": True, "sample": 0},
               {"id": "chain", "question": CHAIN.question, "response": WRONG_CHAIN, "correct": False, "sample": 1}]
    for seed in range(5):
        end = build_initial_states([CHAIN], samples, 3, random.Random(seed))
        at_error = build_initial_states([CHAIN], samples, 3, random.Random(seed), negative_cut="first_error")
        assert at_error[:2] == end[:2]  # the original and the positive state are drawn as before
        assert at_error[2]["T"] == 2 and at_error[2]["prefix"] == f"Step 1: 7 + 5 = 12{C}Step 2: 12 - 3 = 8{R}"
    lucky = [dict(samples[1], response=RIGHT_CHAIN.replace("{6}", "{7}"))]
    assert (build_initial_states([CHAIN], lucky, 3, random.Random(1), negative_cut="first_error")
            == build_initial_states([CHAIN], lucky, 3, random.Random(1)))  # no mistake in the line: the drawn T
    with pytest.raises(SatoriError, match=r"problem 'p0' is not a testbed problem"):
        build_initial_states(_problems(1), [], 2, random.Random(0), negative_cut="first_error")
    with pytest.raises(SatoriError, match="negative_cut must be one of end, first_error"):
        RAEConfig(negative_cut="start").validate()


def test_t_min_keeps_reflections_off_the_finished_answer():
    problems = _problems(8)
    samples = _samples(problems)
    for seed in range(6):
        states = build_initial_states(problems, samples, t_max=2, rng=random.Random(seed), t_min=1)
        cut = [s for s in states if s["status"]]
        assert cut and all(1 <= s["T"] <= 2 and "boxed" not in s["prefix"] for s in cut)
    # a one-step answer has nothing to cut back to: it is no restart source with t_min 1
    one_step = [{"id": "p0", "question": problems[0].question, "response": "So \\boxed{1}.", "correct": True}]
    assert len(build_initial_states(problems[:1], one_step, 2, random.Random(0))) == 2
    assert len(build_initial_states(problems[:1], one_step, 2, random.Random(0), t_min=1)) == 1
    # a mistake in the final step: the first_error cut still goes back t_min steps
    last_wrong = [{"id": "chain", "question": CHAIN.question, "correct": False,
                   "response": RIGHT_CHAIN.replace("18 / 3 = 6 \\boxed{6}", "18 / 3 = 5 \\boxed{5}")}]
    assert first_error_cut(CHAIN, last_wrong[0]["response"]) == 0
    neg = build_initial_states([CHAIN], last_wrong, 2, random.Random(0), negative_cut="first_error", t_min=1)[-1]
    assert neg["T"] == 1 and neg["prefix"].endswith(f"9 * 2 = 18{R}")
    with pytest.raises(SatoriError, match="t_min 3, t_max 2"):
        RAEConfig(t_min=3).validate()


def test_samples_from_other_data_are_refused_or_ignored():
    problems = _problems(2)
    _, unmatched = group_samples(problems, [{"question": "unknown", "response": "x", "correct": True}])
    assert unmatched == 1
    groups, _ = group_samples(problems, [{"question": "What is 1 + 1?", "response": "x", "correct": True}])
    assert len(groups["p1"]) == 1  # matched by question when there is no id
    with pytest.raises(SatoriError, match="p0"):
        group_samples(problems, [{"id": "p0", "question": "Another question", "response": "x", "correct": True}])


def test_read_samples_grades_and_names_bad_lines(tmp_path):
    good = tmp_path / "s.jsonl"
    good.write_text(json.dumps({"id": 3, "question": "q", "answer": "12", "response": "so \\boxed{12}"}) + "\n"
                    + json.dumps({"id": "4", "response": "\\boxed{5}", "correct": False}) + "\n")
    recs = read_samples(good)
    assert [r["correct"] for r in recs] == [True, False] and recs[0]["id"] == "3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "response": "r", "correct": True}) + "\n"
                   + json.dumps({"id": "2", "response": "r"}) + "\n")
    with pytest.raises(SatoriError, match=r"bad.jsonl:2: needs a 'correct'"):
        read_samples(bad)


def _tokenizer(path):
    from satori.rollout import load_tokenizer

    return load_tokenizer(path)


def test_overflow_is_refused_with_the_problem_id_or_skipped(tiny_coat):
    tok = _tokenizer(tiny_coat)
    problems = _problems(3)
    samples = [{"id": "p1", "question": problems[1].question, "response": _coat(1, "2", 3) + " pad" * 200,
                "correct": True, "sample": 0}]
    states = build_initial_states(problems, samples, t_max=0, rng=random.Random(0))
    sizes = [len(tok(s["prefix"])["input_ids"]) for s in states]
    assert sizes[-1] > 150
    limit = 120
    with pytest.raises(SatoriError, match=r"p1/pos \(problem p1\).*limit of 120"):
        check_fit(states, tok, limit)
    kept, dropped, prefix_tokens = check_fit(states, tok, limit, on_overflow="skip")
    assert [s["id"] for s in dropped] == ["p1/pos"] and len(kept) == 3 and prefix_tokens == []
    kept, dropped, prefix_tokens = check_fit(states, tok, 10_000)
    assert len(kept) == 4 and not dropped and prefix_tokens == [sizes[-1]]


def _write_samples(path, problems):
    with path.open("w") as fh:
        for r in _samples(problems):
            fh.write(json.dumps(r) + "\n")


def _problems_file(path, problems):
    with path.open("w") as fh:
        for p in problems:
            fh.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n")


def test_run_rae_from_a_samples_file(tmp_path, tiny_coat):
    problems = _problems(8)
    _problems_file(tmp_path / "problems.jsonl", problems)
    _write_samples(tmp_path / "samples.jsonl", problems)
    cfg = RAEConfig(policy=str(tiny_coat), data=DataConfig(path=str(tmp_path / "problems.jsonl")),
                    samples=str(tmp_path / "samples.jsonl"), out=str(tmp_path / "rae"), max_new_tokens=256, seed=1,
                    threads=1)
    stats = run_rae(cfg)
    lines = [json.loads(x) for x in (tmp_path / "rae" / "initial_states.jsonl").read_text().splitlines()]
    assert len(lines) == stats["states"] == 20
    assert stats["by_status"] == {"0": 8, "1": 6, "-1": 6}
    assert sum(stats["t_hist"]["1"].values()) == 6 and sum(stats["t_hist"]["-1"].values()) == 6
    assert stats["skipped_unusable"] == 8 and stats["prompt_limit"] == 1024 - 256
    assert stats["mean_prefix_tokens"] > 0
    assert set(lines[0]) == {"id", "question", "answer", "prefix", "status", "T", "meta"}
    saved = json.loads((tmp_path / "rae" / "rae_stats.json").read_text())
    assert saved["stats"]["by_status"] == stats["by_status"]
    # the same states must not fit a tight limit: the error names the first state that overflows
    cfg.max_prompt_tokens = 60
    with pytest.raises(SatoriError, match=r"initial state p\d"):
        run_rae(cfg)
    cfg.on_overflow = "skip"
    assert run_rae(cfg)["dropped_overflow"] > 0


def test_run_rae_samples_the_policy_and_needs_coat_tokens(tmp_path, tiny_base, tiny_coat):
    data = DataConfig(path="testbed:train", n=3)
    cfg = RAEConfig(policy=str(tiny_coat), data=data, out=str(tmp_path / "rae"), k=2, max_new_tokens=4,
                    threads=1)
    stats = run_rae(cfg)
    samples = [json.loads(x) for x in (tmp_path / "rae" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {s["sample"] for s in samples} == {0, 1}
    assert stats["samples"] == 6 and stats["by_status"]["0"] == 3
    with pytest.raises(SatoriError, match="no single token"):
        run_rae(RAEConfig(policy=str(tiny_base), data=data, out=str(tmp_path / "x"), k=2, max_new_tokens=4))

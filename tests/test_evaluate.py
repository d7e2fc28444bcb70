"""Evaluation metrics on hand-made samples, and a real evaluation of a tiny model."""

import pytest

from satori.coat import CONTINUE, EXPLORE, REFLECT
from satori.data import Problem
from satori.evaluate import EvalConfig, compute_metrics, evaluate, majority_answer, markdown_table, pass_at_k, response_record
from satori.rollout import Sample


def rec(level, correct, pre=None, samples=(), reflects=False, valid=True, tokens=10):
    return {"level": level, "samples": [{"extracted": e, "correct": c} for e, c in samples],
            "greedy": {"correct": correct, "valid_format": valid, "reflects": reflects or pre is not None,
                       "explores": False, "pre_reflect_correct": pre, "n_tokens": tokens, "truncated": False}}


def test_wrong_then_reflect_then_right_counts_as_f_to_t():
    text = ("Step 1: 2 + 3 = 6\nThe answer is \\boxed{6}." + REFLECT + "Wait, step 1 is wrong." + EXPLORE
            + "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}.")
    s = Sample(prompt="", text=text, prompt_ids=[], response_ids=list(range(30)), truncated=False)
    r = response_record(s, Problem(id="1", question="", answer="5"), "5", True)
    assert r["pre_reflect_correct"] is False and r["reflects"] and r["explores"] and r["valid_format"]
    m = compute_metrics([{"level": 2, "samples": [], "greedy": r}])
    assert m["reflection"]["counts"]["F->T"] == 1 and m["reflection"]["f_to_t_share"] == 1.0


def test_a_mid_solution_reflection_is_judged_by_the_line_before_it():
    # no answer before the <|reflect|>: on a testbed problem the steps before it decide F or T
    problem = Problem(id="t", question="", answer="10", meta={"start": 2, "ops": [["+", 3], ["*", 2]]})
    fixed = ("Step 1: 2 + 3 = 6" + REFLECT + "Let me check step 1. 6 is not 5, so step 1 is wrong." + EXPLORE
             + "Step 1: 2 + 3 = 5" + CONTINUE + "Step 2: 5 * 2 = 10\nThe answer is \\boxed{10}.")
    doubted = fixed.replace("= 6", "= 5").replace("6 is not 5, so step 1 is wrong", "That matches")
    broken = doubted.replace("Step 2: 5 * 2 = 10", "Step 2: 5 * 2 = 12").replace("{10}", "{12}")
    records = []
    for text, extracted, correct in ((fixed, "10", True), (doubted, "10", True), (broken, "12", False)):
        s = Sample(prompt="", text=text, prompt_ids=[], response_ids=[1], truncated=False)
        records.append(response_record(s, problem, extracted, correct))
    assert [r["pre_reflect_correct"] for r in records] == [False, True, True]
    counts = compute_metrics([{"level": 2, "samples": [], "greedy": r} for r in records])["reflection"]["counts"]
    assert counts == {"F->T": 1, "T->F": 1, "T->T": 1, "F->F": 0}
    # without a step checker and without an answer before the reflection, it cannot be told
    plain = Problem(id="p", question="", answer="10")
    s = Sample(prompt="", text=fixed, prompt_ids=[], response_ids=[1], truncated=False)
    assert response_record(s, plain, "10", True)["pre_reflect_correct"] is None


def test_reflections_after_wrong_and_right_steps_of_testbed_answers():
    problem = Problem(id="t", question="", answer="5", meta={"start": 2, "ops": [["+", 3]]})
    wrong_then_fixed = ("Step 1: 2 + 3 = 6\nThe answer is \\boxed{6}." + REFLECT + "Wait, step 1 is wrong." + EXPLORE
                        + "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}.")
    right_then_doubted = "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}." + REFLECT + "Let me verify step 1."
    right_plain = "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}."
    wrong_then_wrong = wrong_then_fixed.replace("Step 1: 2 + 3 = 5", "Step 1: 2 + 3 = 7")
    assert response_record(Sample(prompt="", text=wrong_then_wrong, prompt_ids=[], response_ids=[1], truncated=False),
                           problem, "7", False)["step_reflects"]["wrong_repaired"] == 0
    greedy = []
    for text in (wrong_then_fixed, right_then_doubted, right_plain, right_plain):
        s = Sample(prompt="", text=text, prompt_ids=[], response_ids=[1, 2], truncated=False)
        greedy.append(response_record(s, problem, "5", True))
    assert greedy[0]["step_reflects"] == {"wrong": 1, "wrong_reflected": 1, "right": 1, "right_reflected": 0,
                                          "mistakes": 1, "mistakes_reflected": 1, "wrong_repaired": 1, "right_broken": 0}
    steps = compute_metrics([{"level": 1, "samples": [], "greedy": g} for g in greedy])["reflection"]["steps"]
    assert steps["counts"] == {"wrong": 1, "wrong_reflected": 1, "right": 4, "right_reflected": 1, "mistakes": 1,
                               "mistakes_reflected": 1, "wrong_repaired": 1, "right_broken": 0}
    assert steps["p_reflect_after_mistake"] == 1.0
    assert steps["p_repair_after_reflect"] == 1.0 and steps["p_break_after_reflect"] == 0.0
    assert steps["p_reflect_after_wrong"] == 1.0 and steps["p_reflect_after_right"] == 0.25
    assert steps["p_wrong_given_reflect"] == 0.5
    # a reflection on a right line breaks it when the step after it is wrong: a false alarm's explore, or a
    # slip in the step after <|continue|>; a step right after the reflection that keeps the line right does not
    two = Problem(id="u", question="", answer="10", meta={"start": 2, "ops": [["+", 3], ["*", 2]]})
    check = "Step 1: 2 + 3 = 5" + REFLECT + "Let me check step 1."
    cases = {check + EXPLORE + "Step 1: 2 + 3 = 6" + CONTINUE + "Step 2: 6 * 2 = 12": (1, 1),
             check + CONTINUE + "Step 2: 5 * 2 = 11": (1, 1),
             # the second reflection has no step after it
             check + CONTINUE + "Step 2: 5 * 2 = 10" + REFLECT + "Let me check step 2.": (2, 0)}
    for text, (reflected, broken) in cases.items():
        rec = response_record(Sample(prompt="", text=text, prompt_ids=[], response_ids=[1], truncated=False),
                              two, None, False)["step_reflects"]
        assert (rec["right_reflected"], rec["right_broken"]) == (reflected, broken), text
    # a mistake is the step that makes a right line wrong: a line that stays wrong, or goes wrong again after a
    # repair, counts each fresh slip once (wrong, wrong_reflected, mistakes, mistakes_reflected)
    three = Problem(id="v", question="", answer="13", meta={"start": 2, "ops": [["+", 3], ["*", 2], ["+", 3]]})
    mistakes = {
        # wrong at step 1, still wrong at step 2 where it reflects: a reflection after a wrong line, not a mistake
        "Step 1: 2 + 3 = 6" + CONTINUE + "Step 2: 6 * 2 = 12" + REFLECT + "Let me check step 2.": (2, 1, 1, 0),
        # right, then a slip at step 2 that the reflection follows
        "Step 1: 2 + 3 = 5" + CONTINUE + "Step 2: 5 * 2 = 11" + REFLECT + "Let me check step 2.": (1, 1, 1, 1),
        # a slip, repaired by the explore, then a second slip: two mistakes, the first one reflected
        ("Step 1: 2 + 3 = 6" + REFLECT + "Check step 1." + EXPLORE + "Step 1: 2 + 3 = 5" + CONTINUE
         + "Step 2: 5 * 2 = 10" + CONTINUE + "Step 3: 10 + 3 = 14"): (2, 1, 2, 1),
    }
    for text, want in mistakes.items():
        rec = response_record(Sample(prompt="", text=text, prompt_ids=[], response_ids=[1], truncated=False),
                              three, None, False)["step_reflects"]
        assert (rec["wrong"], rec["wrong_reflected"], rec["mistakes"], rec["mistakes_reflected"]) == want, text
    # a problem without testbed ground truth has no step counts, and the metrics have no "steps" block
    other = response_record(Sample(prompt="", text=right_plain, prompt_ids=[], response_ids=[1], truncated=False),
                            Problem(id="g", question="", answer="5"), "5", True)
    assert "step_reflects" not in other
    assert "steps" not in compute_metrics([{"level": 1, "samples": [], "greedy": other}])["reflection"]


def test_metrics_by_hand():
    records = [
        rec(2, True, samples=[("4", True), ("4", True), ("5", False)]),
        rec(2, False, pre=True, samples=[("1", False), ("2", False), ("3", True)]),
        rec(3, True, pre=False, samples=[("7", False), ("7", False), ("8", True)], valid=False),
        rec(3, False, samples=[(None, False), ("9", False), ("9", False)], tokens=20),
    ]
    m = compute_metrics(records)
    assert m["pass@1"] == 0.5 and m["format_compliance"] == 0.75 and m["reflect_rate"] == 0.5
    assert m["maj@3"] == 0.25  # only the first: 4,4 wins; record 2 is a three-way tie -> first ('1') wins
    assert m["pass@3"] == 0.75
    assert m["reflection"]["counts"] == {"F->T": 1, "T->F": 1, "T->T": 0, "F->F": 0}
    assert m["mean_tokens"] == 12.5
    assert m["by_level"]["2"]["pass@1"] == 0.5 and m["by_level"]["3"]["maj@3"] == 0.0


def test_behaviour_of_the_samples_by_hand():
    def sample(correct, pre, explores=False):
        return {"extracted": "1", "correct": correct, "reflects": pre is not None, "explores": explores,
                "pre_reflect_correct": pre}

    records = [
        {"level": 2, "greedy": rec(2, True)["greedy"],
         "samples": [sample(True, False), sample(True, None), sample(False, True, explores=True)]},
        {"level": 2, "greedy": rec(2, False)["greedy"],
         "samples": [sample(True, False), sample(False, None), sample(False, False)]},
    ]
    m = compute_metrics(records)
    assert m["reflection"]["n_reflected"] == 0  # greedy answers did not reflect
    sampled = m["sampled"]
    assert sampled["n"] == 6 and sampled["reflect_rate"] == pytest.approx(4 / 6)
    assert sampled["explore_rate"] == pytest.approx(1 / 6)
    assert sampled["reflection"]["counts"] == {"F->T": 2, "T->F": 1, "T->T": 0, "F->F": 1}
    assert sampled["reflection"]["f_to_t_share"] == pytest.approx(2 / 3)
    # samples without behaviour fields (older records) give no sampled block
    assert "sampled" not in compute_metrics([rec(2, True, samples=[("1", True)])])


def test_one_sample_per_problem_leaves_greedy_pass_at_1_alone():
    # greedy right on both, the single sample wrong on both: pass@1 is the greedy figure
    records = [rec(2, True, samples=[("9", False)]), rec(3, True, samples=[("9", False)])]
    m = compute_metrics(records)
    assert m["pass@1"] == 1.0 and m["sample_accuracy"] == 0.0 and m["maj@1"] == 0.0
    assert m["by_level"]["2"]["pass@1"] == 1.0
    assert "| pass@1 (greedy) | 1.000 |" in markdown_table(m) and "| sampled accuracy | 0.000 |" in markdown_table(m)


def test_sampled_metrics_cover_only_the_problems_with_samples():
    # four problems, greedy right on three; samples (k=2) for the first two only
    records = [rec(2, True, samples=[("4", True), ("4", True)]), rec(2, False, samples=[("1", False), ("3", True)]),
               rec(3, True), rec(3, True)]
    m = compute_metrics(records)
    assert m["n"] == 4 and m["pass@1"] == 0.75 and m["k"] == 2 and m["k_problems"] == 2
    assert m["sample_accuracy"] == 0.75  # (2/2 + 1/2) / 2, not / 4
    assert m["pass@2"] == 1.0 and m["maj@2"] == 0.5  # a 1-1 tie goes to the first answer seen, '1'
    assert m["by_level"]["2"]["maj@2"] == 0.5 and "maj@2" not in m["by_level"]["3"]
    assert "| problems sampled (first N) | 2 |" in markdown_table(m)
    assert "problems sampled" not in markdown_table(compute_metrics(records[:2]))
    with pytest.raises(ValueError, match="same number"):
        compute_metrics([rec(2, True, samples=[("4", True)]), rec(2, True, samples=[("4", True), ("4", True)])])


def test_pass_at_k_and_majority():
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 / 5) * (2 / 4))
    assert majority_answer(["1,000", "1000", "7"]) == "1000"
    assert majority_answer([None, ""]) is None


def test_evaluate_a_real_tiny_model(tiny_coat):
    from satori.data import DataConfig, load_problems
    from satori.rollout import load_model, load_tokenizer

    problems = load_problems(DataConfig(path="testbed:test", n=6))
    cfg = EvalConfig(model=str(tiny_coat), k=2)
    cfg.gen.max_new_tokens = 8
    metrics, records = evaluate(load_model(tiny_coat), load_tokenizer(tiny_coat), problems, cfg, progress=False)
    assert metrics["n"] == 6 and metrics["pass@1"] == 0.0 and "maj@2" in metrics and "by_level" in metrics
    assert all(len(r["samples"]) == 2 for r in records)
    assert metrics["truncation_rate"] > 0
    assert metrics["sampled"]["n"] == 12 and all("pre_reflect_correct" in s for r in records for s in r["samples"])
    # with a sample limit the first 4 get their 2 samples, the same ones as without it; greedy covers all 6
    cfg.sample_limit = 4
    limited, limited_records = evaluate(load_model(tiny_coat), load_tokenizer(tiny_coat), problems, cfg, progress=False)
    assert limited["n"] == 6 and limited["k_problems"] == 4 and limited["sampled"]["n"] == 8
    assert [len(r["samples"]) for r in limited_records] == [2, 2, 2, 2, 0, 0]
    assert [r["greedy"]["text"] for r in limited_records] == [r["greedy"]["text"] for r in records]

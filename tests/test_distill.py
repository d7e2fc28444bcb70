"""Distillation keeps the hardest problems the policy solved, one correct trajectory each."""

import pytest

from satori.errors import SatoriError
from satori.train.distill import DistillConfig, pick_trajectory, select_hardest_solved


def s(pid, correct, response="r"):
    return {"id": pid, "question": f"q{pid}", "answer": "1", "response": response, "correct": correct}


def test_hardest_solved_first_and_shortest_correct_kept():
    samples = [s("a", True), s("a", True), s("a", True), s("a", False),      # 0.75
               s("b", False), s("b", True, "long answer"), s("b", True, "short"), s("b", False),  # 0.5
               s("c", False), s("c", False), s("c", False), s("c", False),   # never solved
               s("d", True), s("d", False), s("d", False), s("d", False)]    # 0.25
    chosen, stats = select_hardest_solved(samples, keep_fraction=0.6)
    assert [c["id"] for c in chosen] == ["d", "b"]
    assert chosen[1]["response"] == "short"
    assert stats == {"problems": 4, "solved": 3, "kept": 2, "mean_success_rate": 0.375,
                     "kept_mean_success_rate": 0.375, "kept_reflective": 0}
    chosen, _ = select_hardest_solved(samples, keep_fraction=1.0, max_success_rate=0.5)
    assert [c["id"] for c in chosen] == ["d", "b"]
    assert select_hardest_solved([s("x", False)], 1.0)[0] == []


def test_pick_chooses_among_the_correct_samples_in_sampling_order():
    correct = [s("a", True, "Step 1: 2 + 2 = 4<|continue|>Step 2: 4 - 1 = 3"),
               s("a", True, "Step 1: 2 + 2 = 5<|reflect|>wrong<|explore|>Step 1: 2 + 2 = 4"),
               s("a", True, "Step 1: 3"),
               s("a", True, "Step 1: 2 + 2 = 4<|reflect|>right<|continue|>Step 2: 3")]
    assert pick_trajectory(correct, "shortest") is correct[2]
    assert pick_trajectory(correct, "first") is correct[0]
    assert pick_trajectory(correct, "reflective") is correct[1]
    assert pick_trajectory(correct[2:3], "reflective") is correct[2]  # none reflects: the first
    with pytest.raises(SatoriError, match="unknown pick 'longest'"):
        pick_trajectory(correct, "longest")


def test_pick_decides_which_trajectory_of_a_kept_problem_is_trained_on():
    samples = [s("a", False), s("a", True, "plain and long"), s("a", True, "x<|reflect|>y"), s("a", True, "short")]
    for pick, response, reflective in (("shortest", "short", 0), ("first", "plain and long", 0),
                                       ("reflective", "x<|reflect|>y", 1)):
        chosen, stats = select_hardest_solved(samples, keep_fraction=1.0, pick=pick)
        assert [c["response"] for c in chosen] == [response]
        assert stats["kept_reflective"] == reflective


def test_unknown_pick_is_refused_by_name():
    with pytest.raises(SatoriError, match="pick must be one of shortest, first, reflective, got 'best'"):
        DistillConfig(pick="best").validate()

"""Distillation keeps the hardest problems the policy solved, one correct trajectory each."""

from satori.train.distill import select_hardest_solved


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
                     "kept_mean_success_rate": 0.375}
    chosen, _ = select_hardest_solved(samples, keep_fraction=1.0, max_success_rate=0.5)
    assert [c["id"] for c in chosen] == ["d", "b"]
    assert select_hardest_solved([s("x", False)], 1.0)[0] == []

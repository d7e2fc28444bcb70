"""Two CPU processes (gloo) give the same first update as one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
from conftest import model_weights, same_weights


def _launch(nproc, args, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "satori.cli", *args, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "satori.cli", *args, "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rl_two_processes_match_one(tmp_path, tiny_coat):
    args = ["rl", "--policy", str(tiny_coat), "--data", "testbed:train", "--data.n", "16", "--critic-init", "policy",
            "--steps", "1", "--rollout-batch", "8", "--train-batch", "4", "--micro-batch", "2",
            "--max-new-tokens", "12", "--temperature", "1.0", "--actor-lr", "1e-3", "--critic-lr", "1e-3",
            "--threads", "1", "--seed", "5"]
    one = _launch(1, args, tmp_path / "one")[0]
    two = _launch(2, args, tmp_path / "two")[0]
    # micro-batches are cut to their own longest row, so one and two processes run kernels of
    # different shapes: float32 rounding (~1e-7 of per-token terms of order 1) is the only slack
    assert two["first_policy_loss"] == pytest.approx(one["first_policy_loss"], rel=1e-5, abs=1e-6)
    for key in ("policy_loss", "value_loss", "entropy", "grad_norm", "reward", "response_length"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_grpo_with_shared_prompts_two_processes_match_one(tmp_path, tiny_coat):
    """The shared-prompt update calls the model's layers, not the DDP wrapper, and averages the
    gradients itself: two steps (the second starts from the first's averaged update) must
    match one process (without the averaging, step 1's gradient norm differs)."""
    args = ["rl", "--policy", str(tiny_coat), "--data", "testbed:train", "--data.n", "16", "--advantage", "grpo",
            "--n-samples", "2", "--steps", "2", "--rollout-batch", "4", "--train-batch", "8", "--micro-batch", "2",
            "--max-new-tokens", "12", "--temperature", "1.0", "--actor-lr", "1e-3", "--threads", "1", "--seed", "5",
            "--entropy-coef", "0.05"]  # an untrained model's rewards are all -1: the entropy term makes gradients
    one = _launch(1, args, tmp_path / "one")
    two = _launch(2, args, tmp_path / "two")
    assert all(r["grad_norm"] > 0 for r in one)
    for a, b in zip(one, two):
        for key in ("first_policy_loss", "policy_loss", "entropy", "grad_norm", "reward", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_sft_two_processes_match_one(tmp_path, tiny_coat, sft_jsonl):
    args = ["sft", "--model", str(tiny_coat), "--data", str(sft_jsonl), "--max-steps", "2", "--batch-size", "2",
            "--grad-accum", "2", "--valid-fraction", "0", "--lr", "1e-3", "--threads", "1", "--seed", "3"]
    one = _launch(1, args + ["--batch-size", "8", "--grad-accum", "1"], tmp_path / "one")  # same global batch of 8
    two = _launch(2, args, tmp_path / "two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)


@pytest.mark.parametrize("value, expected", [("1", 1), ("3,1", 3), ("", None), ("0", None), ("many", None)])
def test_threads_follow_the_launchers_omp_num_threads(monkeypatch, value, expected):
    # torchrun / accelerate launch give each of several processes OMP_NUM_THREADS=1; `threads: 0`
    # must keep to it instead of taking every core in every process
    import torch

    from satori.utils import set_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    try:
        set_threads(0)
        assert torch.get_num_threads() == (expected or os.cpu_count())
        set_threads(2)  # an explicit count wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rl_selection_two_processes_match_one(tmp_path, shipped_coat):
    """Each process evaluates every second held-out problem and the counts are summed: the held-out
    accuracy, the selected step and the final policy match one process (9 problems: shards of 5 and 4)."""
    args = ["rl", "--policy", str(shipped_coat), "--data", "testbed:train", "--data.n", "16", "--critic-init", "policy",
            "--steps", "1", "--rollout-batch", "8", "--train-batch", "8", "--micro-batch", "4",
            "--max-new-tokens", "32", "--temperature", "1.0", "--actor-lr", "1e-2", "--threads", "1", "--seed", "5",
            "--eval-every", "1", "--valid-data", "testbed:valid", "--valid-data.n", "9", "--eval-max-new-tokens", "128"]
    one = [(r["step"], r["valid_acc"], r["best_step"]) for r in _launch(1, args, tmp_path / "one")]
    two = [(r["step"], r["valid_acc"], r["best_step"]) for r in _launch(2, args, tmp_path / "two")]
    assert one == two and one[0][1] > 0.5, one
    best = [json.loads((tmp_path / d / "best" / "best.json").read_text()) for d in ("one", "two")]
    assert best[0] == best[1]  # the per-problem results too: the shards' results land in problem order
    assert (best[0]["step"], best[0]["valid_acc"]) == (0, one[0][1])  # lr 1e-2 wrecks the policy in a step
    assert len(best[0]["solved"]) == 9 and sum(best[0]["solved"]) / 9 == one[0][1]
    start, a, b = (model_weights(d) for d in (shipped_coat, tmp_path / "one", tmp_path / "two"))
    assert same_weights(start, a) and same_weights(a, b)

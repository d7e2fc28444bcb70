"""satori orm: pairs, Bradley-Terry training, padding-free scores, critic view, resume, selection."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from satori.data import DataConfig, Problem, build_prompt
from satori.errors import SatoriError
from satori.rollout import load_tokenizer
from satori.train.orm import (
    ORMConfig, check_same_tokenizer, init_orm, load_orm, make_pairs, ranking_metrics, run_orm, score_sequences,
    selected_text,
)


def rec(pid, response, correct):
    return {"id": pid, "question": f"question {pid}", "response": response, "correct": correct}


def test_make_pairs_all_distinct_pairs_and_seeded_subsets():
    records = [rec("a", "A1", True), rec("a", "A1", True), rec("a", "A2", True), rec("a", "W1", False),
               rec("a", "W2", False), rec("a", "W3", False), rec("b", "B1", True), rec("b", "B2", True),
               rec("c", "X", False), rec("d", "D1", True), rec("d", "D2", False)]
    pairs = make_pairs(records)
    assert [(p.problem_id, p.chosen, p.rejected) for p in pairs] == [
        ("a", "A1", "W1"), ("a", "A1", "W2"), ("a", "A1", "W3"), ("a", "A2", "W1"), ("a", "A2", "W2"),
        ("a", "A2", "W3"), ("d", "D1", "D2")]
    assert pairs[0].question == "question a"
    sub = make_pairs(records, max_pairs_per_problem=2, seed=1)
    assert [p.problem_id for p in sub] == ["a", "a", "d"]
    assert len({(p.chosen, p.rejected) for p in sub}) == 3
    assert sub == make_pairs(records, max_pairs_per_problem=2, seed=1)
    assert any(make_pairs(records, 2, seed=s) != sub for s in range(2, 8))


def test_ranking_metrics_by_hand():
    correct = [[True, False, False], [False, False], [True, True], [False, True]]
    scores = [[2.0, 1.0, 3.0], [0.0, 1.0], [5.0, 5.0], [1.0, 1.0]]
    m = ranking_metrics(correct, scores, margin=0.0)
    # picks: wrong (3.0), wrong, right, first on a tie -> wrong
    assert m["best_of_k"] == pytest.approx(1 / 4)
    assert m["best_of_k_mixed"] == pytest.approx(0.0) and m["n_mixed"] == 2
    assert m["sample_accuracy"] == pytest.approx((1 / 3 + 0 + 1 + 1 / 2) / 4)
    assert m["pass_at_k"] == pytest.approx(3 / 4)
    # pairs: (2>1) win, (2<3) loss, tie (1 vs 1) half
    assert m["pairwise_accuracy"] == pytest.approx(1.5 / 3)
    sig = lambda x: torch.nn.functional.logsigmoid(torch.tensor(x)).item()  # noqa: E731
    assert m["pair_loss"] == pytest.approx(-(sig(1.0) + sig(-1.0) + sig(0.0)) / 3, rel=1e-5)


def test_ranking_metrics_split_by_reflection_by_hand():
    correct = [[True, True, False, False], [True, False], [True, True, True]]
    scores = [[3.0, 1.0, 2.0, 0.0], [0.0, 1.0], [1.0, 1.0, 0.0]]
    reflects = [[False, True, True, False], [True, False], [False, True, True]]
    m = ranking_metrics(correct, scores, reflects=reflects)
    by = m["by_reflection"]
    # right/wrong pairs: problem 0 (plain 3 > reflected 2, plain 3 > plain 0, reflected 1 < reflected 2,
    # reflected 1 > plain 0); problem 1 (reflected 0 < plain 1); problem 2 has no wrong answer
    assert by["right_plain/wrong_reflects"] == {"accuracy": 1.0, "pairs": 1}
    assert by["right_plain/wrong_plain"] == {"accuracy": 1.0, "pairs": 1}
    assert by["right_reflects/wrong_reflects"] == {"accuracy": 0.0, "pairs": 1}
    assert by["right_reflects/wrong_plain"] == {"accuracy": 0.5, "pairs": 2}
    assert m["pairwise_accuracy"] == pytest.approx(3 / 5)
    # right plain vs right reflected: problem 0 (3 > 1), problem 2 (1 = 1 a tie, 1 > 0)
    assert by["right_plain_above_reflected"]["pairs"] == 3
    assert by["right_plain_above_reflected"]["share"] == pytest.approx(2.5 / 3)
    # the split leaves the other figures alone and is absent without the flags
    plain = ranking_metrics(correct, scores)
    assert "by_reflection" not in plain
    assert plain == {k: v for k, v in m.items() if k != "by_reflection"}
    assert "0.83" in selected_text(7, m, 4) and "step 7" in selected_text(7, m, 4)


def test_scores_do_not_depend_on_padding_or_batching(tiny_coat):
    tok = load_tokenizer(tiny_coat)
    torch.manual_seed(0)
    orm = init_orm(str(tiny_coat), tok)
    with torch.no_grad():  # a visible head: the fresh one is tiny
        orm.score.weight.normal_(0, 1.0)
    prompts = ["Problem: 1 + 2?\nSolution:\n", "Problem: a much longer question about 17 apples and pears?\n"]
    responses = ["3", "Step 1: 17 + 5 = 22\n\nStep 2: 22 * 2 = 44\nThe answer is \\boxed{44}."]
    alone = torch.cat([score_sequences(orm, tok, [p], [r]) for p, r in zip(prompts, responses)])
    together = score_sequences(orm, tok, prompts, responses, batch_size=2)
    reversed_ = score_sequences(orm, tok, prompts[::-1], responses[::-1], batch_size=2).flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reversed_, alone, rtol=1e-5, atol=1e-5)
    assert abs(float(alone[0] - alone[1])) > 1e-3  # the two sequences really score differently
    # a manual left-padded batch read at the last token would agree too: the head reads the last real token
    ids = tok(prompts[0] + responses[0], add_special_tokens=False)["input_ids"]
    pad = [tok.pad_token_id] * 5
    with torch.no_grad():
        left = orm(input_ids=torch.tensor([pad + ids]), attention_mask=torch.tensor([[0] * 5 + [1] * len(ids)]),
                   position_ids=torch.tensor([[0] * 5 + list(range(len(ids)))])).logits[0, 0]
    torch.testing.assert_close(left, alone[0], rtol=1e-5, atol=1e-5)


def test_check_same_tokenizer(tiny_base, tiny_coat):
    a, b = load_tokenizer(tiny_coat), load_tokenizer(tiny_coat)
    check_same_tokenizer(a, b, "ppo")
    with pytest.raises(SatoriError, match=r"ppo: tokenizers differ: vocabulary.*<\|continue\|>"):
        check_same_tokenizer(a, load_tokenizer(tiny_base), "ppo")
    c = load_tokenizer(tiny_coat)
    c.pad_token = c.eos_token
    with pytest.raises(SatoriError, match="pad_token_id"):
        check_same_tokenizer(a, c, "ppo")


# --------------------------------------------------------------------------- end to end on a separable set


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _separable(path, split, n, seed):
    """Correct samples end with the boxed gold answer; wrong ones never box an answer."""
    from satori.testbed.tasks import make_problems, reference_solution

    rows = []
    for p in make_problems(split, n, seed=seed):
        ref = reference_solution(p)
        rows += [{"id": p.id, "question": p.question, "response": ref, "correct": True},
                 {"id": p.id, "question": p.question, "response": ref.split("\n")[0] + "\nDone.", "correct": True},
                 {"id": p.id, "question": p.question, "response": "I do not know the answer.", "correct": False},
                 {"id": p.id, "question": p.question, "response": ref.split("\n")[0] + "\nNo idea.",
                  "correct": False}]
    rows[1]["response"] = rows[0]["response"]  # one duplicated response: counted once in pairs
    return _write(path, rows)


def cfg(tmp_path, policy, name, **kw):
    base = dict(policy=str(policy), out=str(tmp_path / name),
                samples=str(_separable(tmp_path / "train.jsonl", "train", 12, 0)),
                valid_samples=str(_separable(tmp_path / "valid.jsonl", "valid", 6, 1)),
                max_steps=6, batch_size=4, lr=3e-3, warmup_ratio=0.0, eval_every=100, save_every=100, threads=1,
                seed=3)
    base.update(kw)
    return ORMConfig(**base)


def test_trained_orm_separates_and_loads_as_a_critic(tmp_path, tiny_coat):
    from transformers import AutoModelForTokenClassification

    result = run_orm(cfg(tmp_path, tiny_coat, "orm", max_steps=30, eval_every=10))
    out = tmp_path / "orm"
    assert result["train_pairs"] == 11 * 4 + 2  # 2 correct x 2 wrong; problem 1 has a duplicate correct
    assert result["valid_sample_accuracy"] == pytest.approx(0.5) and result["valid_pass_at_k"] == 1.0
    assert result["best"]["pairwise_accuracy"] >= 0.9
    assert result["best"]["best_of_k"] > result["valid_sample_accuracy"]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "valid_best_of_k" in e] == [10, 20, 30]
    assert result["best_step"] in (10, 20, 30) and not (out / "best").exists()
    assert evals[-1]["loss"] < evals[0]["loss"]
    # no sample reflects: every pair is plain against plain, and the report's line names the step
    by = result["best"]["by_reflection"]
    assert by["right_plain/wrong_plain"]["accuracy"] == result["best"]["pairwise_accuracy"]
    assert by["right_plain/wrong_plain"]["pairs"] > 0 and by["right_reflects/wrong_plain"]["pairs"] == 0
    assert by["right_plain_above_reflected"] == {"share": None, "pairs": 0}
    assert result["final"].startswith(f"step {result['best_step']}: held-out pairwise accuracy")

    orm, tok = load_orm(out)
    check_same_tokenizer(tok, load_tokenizer(tiny_coat), "orm vs policy")
    valid = [json.loads(x) for x in (tmp_path / "valid.jsonl").read_text().splitlines()]
    prompts = [build_prompt(Problem(id="", question=r["question"], answer=""), tok) for r in valid]
    scores = score_sequences(orm, tok, prompts, [r["response"] for r in valid])
    good = scores[[i for i, r in enumerate(valid) if r["correct"]]]
    bad = scores[[i for i, r in enumerate(valid) if not r["correct"]]]
    ranked = sum(float(g > b) for g in good for b in bad) / (len(good) * len(bad))  # held-out AUC
    assert ranked >= 0.85 and good.mean() > bad.mean() + 1.0

    critic, info = AutoModelForTokenClassification.from_pretrained(out, num_labels=1, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # same head, no fresh bias
    critic.train()  # no dropout: training mode gives the same values
    ids = tok(prompts[0] + valid[0]["response"], add_special_tokens=False)["input_ids"]
    values = critic(input_ids=torch.tensor([ids])).logits[0, :, 0]
    torch.testing.assert_close(values[-1], scores[0], rtol=1e-5, atol=1e-5)


def test_resume_gives_identical_weights_and_reuses_samples(tmp_path, tiny_coat):
    first = run_orm(cfg(tmp_path, tiny_coat, "full", save_every=2))
    assert first["samples_cached"] is False and first["resumed_from"] == 0
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for name in ("model.safetensors", "config.json", "orm_result.json"):
        (part / name).unlink()
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-2", "step-4"]
    shutil.rmtree(part / "checkpoints" / "step-4")
    result = run_orm(cfg(tmp_path, tiny_coat, "part", save_every=2, resume=True))
    assert result["resumed_from"] == 2 and result["samples_cached"] is True
    assert result["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    wf, wp = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert set(wf) == set(wp) and "score.weight" in wf
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k


def test_batch_vs_accumulation_gives_the_same_losses(tmp_path, tiny_coat):
    run_orm(cfg(tmp_path, tiny_coat, "a", max_steps=3, batch_size=8, grad_accum=1))
    run_orm(cfg(tmp_path, tiny_coat, "b", max_steps=3, batch_size=2, grad_accum=4))

    def losses(name):
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("a") == pytest.approx(losses("b"), rel=1e-5)


def test_policy_sampling_is_cached_and_no_pairs_is_an_error(tmp_path, tiny_coat):
    c = ORMConfig(policy=str(tiny_coat), out=str(tmp_path / "orm"), data=DataConfig(path="testbed:train", n=3),
                  valid_data=DataConfig(path="testbed:valid", n=2), k=2, max_new_tokens=4, threads=1)
    with pytest.raises(SatoriError, match="no \\(correct, wrong\\) training pairs"):
        run_orm(c)  # an untrained model never answers correctly
    lines = [json.loads(x) for x in (tmp_path / "orm" / "samples.jsonl").read_text().splitlines()]
    assert [r["split"] for r in lines] == ["train"] * 6 + ["valid"] * 4
    assert all(r["correct"] is False for r in lines)
    mtime = (tmp_path / "orm" / "samples.jsonl").stat().st_mtime_ns
    with pytest.raises(SatoriError, match="training pairs"):
        run_orm(c)
    assert (tmp_path / "orm" / "samples.jsonl").stat().st_mtime_ns == mtime  # not resampled
    c.k = 3
    with pytest.raises(SatoriError, match="training pairs"):
        run_orm(c)
    assert len((tmp_path / "orm" / "samples.jsonl").read_text().splitlines()) == 15  # new settings: resampled


def test_load_orm_refuses_a_plain_policy(tiny_coat):
    with pytest.raises(SatoriError, match="not an outcome reward model"):
        load_orm(tiny_coat)

"""LaTRO: the gradient estimator, rationale cutting, rewards, and the training loop
(resume, determinism, micro-batch invariance, model selection, multiple-choice data)."""

import copy
import json
import shutil

import pytest
import torch
from conftest import model_weights, same_weights

from satori.data import DataConfig, Problem, build_prompt, load_problems, plain_prompt
from satori.errors import SatoriError
from satori.rollout import Sample
from satori.testbed.model import build_model, build_tokenizer
from satori.testbed.tasks import make_problems
from satori.train.common import read_metrics
from satori.train.latro import (
    LatroConfig,
    Rollout,
    answer_text,
    cut_rationale,
    group_loss,
    make_rollouts,
    run_latro,
)

EOS = 99


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random testbed model + tokenizer saved to disk; returns the folder."""
    torch.manual_seed(0)
    problems = make_problems("train", 200, seed=1)
    texts = [plain_prompt(p.question) + p.solution for p in problems]
    tok = build_tokenizer(texts, vocab_size=400)
    model = build_model(len(tok), "tiny", tok)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- cutting


PIECES = ["Step", " 1", ": ", "3", " + ", "4", " = ", "7", "\n", "The answer is", " \\boxed{", "7", "}."]


def test_cut_at_answer_cue_before_the_cue():
    ids = list(range(len(PIECES)))
    assert cut_rationale(ids, PIECES, {EOS}, ["The answer is", "\\boxed"], 50) == (9, "cue")
    # the earliest cue wins, whichever is listed first
    assert cut_rationale(ids, PIECES, {EOS}, ["\\boxed", "The answer is"], 50) == (9, "cue")
    assert cut_rationale(ids, PIECES, {EOS}, ["\\boxed"], 50) == (10, "cue")


def test_cut_at_a_cue_starting_inside_a_token_drops_that_token():
    pieces = ["ab", "c The ans", "wer is", " 5"]
    assert cut_rationale([1, 2, 3, 4], pieces, {EOS}, ["The answer is"], 50) == (1, "cue")


def test_cut_at_eos_and_cues_after_eos_are_ignored():
    ids = [1, 2, 3, EOS, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert cut_rationale(ids, PIECES, {EOS}, ["The answer is"], 50) == (3, "eos")
    assert cut_rationale([EOS, 1], ["", "x"], {EOS}, ["The answer is"], 50) == (0, "eos")
    # several end tokens
    assert cut_rationale([1, 7, 2], ["a", "b", "c"], {EOS, 7}, [], 50) == (1, "eos")


def test_cut_at_length_marks_truncation():
    ids = list(range(20))
    pieces = ["x"] * 20
    assert cut_rationale(ids, pieces, {EOS}, ["The answer is"], 5) == (5, "length")
    # a stop starting at token L leaves exactly L rationale tokens: not truncated
    ids = list(range(len(PIECES)))
    assert cut_rationale(ids, PIECES, {EOS}, ["The answer is"], 9) == (9, "cue")
    assert cut_rationale(ids, PIECES, {EOS}, ["The answer is"], 8) == (8, "length")
    assert cut_rationale([1, 2, EOS], ["a", "b", ""], {EOS}, [], 2) == (2, "eos")
    assert cut_rationale([1, 2, 3, EOS], ["a", "b", "c", ""], {EOS}, [], 2) == (2, "length")
    # a response shorter than L that never stopped (e.g. hit the generation limit) is truncated
    assert cut_rationale([1, 2], ["a", "b"], {EOS}, [], 5) == (2, "length")


def test_make_rollouts_cuts_real_tokens_and_appends_the_gold_answer(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    p = Problem(id="0", question="Ana has 3 apples. She finds 4 more apples. How many?", answer="7")
    prompt = build_prompt(p, tok)
    rationale = "Step 1: 3 + 4 = 7\n"
    resp = tok(rationale + "The answer is \\boxed{8}.", add_special_tokens=False)["input_ids"]
    sample = Sample(prompt=prompt, text="", prompt_ids=tok(prompt)["input_ids"], response_ids=resp,
                    truncated=False, index=0)
    long_sample = Sample(prompt=prompt, text="", prompt_ids=sample.prompt_ids, response_ids=resp,
                         truncated=True, index=0)
    y = tok(answer_text(p), add_special_tokens=False)["input_ids"]
    r, r_long = make_rollouts([sample, long_sample], [y], tok, [tok.eos_token_id],
                              ["The answer is", "\\boxed"], max_tokens=4)
    assert tok.decode(r_long.rationale_ids) == tok.decode(resp[:4]) and r_long.truncated
    [r] = make_rollouts([sample], [y], tok, [tok.eos_token_id], ["The answer is", "\\boxed"], max_tokens=64)
    assert tok.decode(r.rationale_ids) == rationale and r.stop == "cue" and not r.truncated
    assert tok.decode(r.answer_ids) == "The answer is \\boxed{7}."
    # no cue, stopped by EOS
    resp2 = tok("Step 1: 3 + 4 = 7", add_special_tokens=False)["input_ids"]
    s2 = Sample(prompt=prompt, text="", prompt_ids=sample.prompt_ids, response_ids=resp2, truncated=False)
    [r2] = make_rollouts([s2], [y], tok, [tok.eos_token_id], ["The answer is"], max_tokens=64)
    assert r2.rationale_ids == resp2 and r2.stop == "eos"
    # a rationale that does not end a line gets y after the separator, not glued to its last word
    y_sep = tok("\n" + answer_text(p), add_special_tokens=False)["input_ids"]
    [r3, r4] = make_rollouts([s2, sample], [y], tok, [tok.eos_token_id], ["The answer is"], max_tokens=64,
                             separated_ids=[y_sep])
    assert r3.answer_ids == y_sep and tok.decode(r3.rationale_ids + r3.answer_ids) == (
        "Step 1: 3 + 4 = 7\nThe answer is \\boxed{7}.")
    assert r4.answer_ids == y  # cut at a cue that starts a line: y as it is


def test_a_cue_inside_a_token_is_cut_before_that_token_and_y_follows_the_separator():
    # a real tokenizer may write " $\\" as one token: the cue "\\boxed" starts inside it
    pieces = [" the", " answer", " is", " $\\", "boxed", "{", "1", "8", "}$", "<eos>"]
    ids = list(range(len(pieces) - 1)) + [EOS]
    assert cut_rationale(ids, pieces, {EOS}, ["The answer is", "\\boxed"], 50) == (3, "cue")

    class Pieces:  # decodes each id to its piece, as batch_decode does
        def batch_decode(self, rows, **kw):
            return [pieces[r[0]] if r[0] != EOS else "<eos>" for r in rows]

    s = Sample(prompt="q", text="", prompt_ids=[50], response_ids=ids[:-1], truncated=False, index=0)
    [r] = make_rollouts([s], [[60]], Pieces(), [EOS], ["The answer is", "\\boxed"], 50, separated_ids=[[61, 60]])
    assert r.rationale_ids == [0, 1, 2] and r.stop == "cue" and r.answer_ids == [61, 60]


# --------------------------------------------------------------------------- estimator


def _fixed_rollouts(vocab: int, k: int, n_questions: int, truncated_at: set[int]) -> list[Rollout]:
    g = torch.Generator().manual_seed(3)
    out = []
    for q in range(n_questions):
        prompt = torch.randint(2, vocab, (5 + q,), generator=g).tolist()
        answer = torch.randint(2, vocab, (3,), generator=g).tolist()
        for j in range(k):
            n = 2 + (3 * j + q) % 6  # rationales of different lengths (padding in the batch)
            z = torch.randint(2, vocab, (n,), generator=g).tolist()
            i = q * k + j
            out.append(Rollout(prompt, z, answer, i in truncated_at, "length" if i in truncated_at else "eos"))
    return out


def _sums(model, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(z|x) and log π(y|x⊕z) of one unpadded sequence, by direct indexing."""
    seq = torch.tensor([r.prompt_ids + r.rationale_ids + r.answer_ids])
    logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), dim=-1)
    p, z = len(r.prompt_ids), len(r.rationale_ids)
    tokens = seq[0].tolist()
    zs = sum(logp[t - 1, tokens[t]] for t in range(p, p + z)) if z else logp.new_zeros(())
    ys = sum(logp[t - 1, tokens[t]] for t in range(p + z, len(tokens)))
    return zs, ys


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
def test_estimator_gradient_and_rewards_match_the_formula_by_hand(tiny, sft_weight):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # π0 differs from πθ so the KL term matters
        for prm in ref.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    beta, penalty, k = 0.3, 0.7, 4
    rollouts = _fixed_rollouts(model.config.vocab_size, k, 2, truncated_at={2})
    params = [p for p in model.parameters()]

    loss, stats = group_loss(model, ref, rollouts, k, pad_id=1, beta=beta, sft_weight=sft_weight,
                             truncation_penalty=penalty)
    got = torch.autograd.grad(loss, params)

    # by hand: separate passes for each rollout, separate autograd for each term
    grads_z, grads_y, rewards = [], [], []
    for r in rollouts:
        zs, ys = _sums(model, r)
        grads_z.append(torch.autograd.grad(zs, params, retain_graph=True))
        grads_y.append(torch.autograd.grad(ys, params))
        with torch.no_grad():
            ref_zs, _ = _sums(ref, r)
        rewards.append(ys.item() - beta * (zs.item() - ref_zs.item()))
    for q in range(2):  # truncated: the group's lowest raw reward minus the penalty
        group = rewards[q * k:(q + 1) * k]
        floor = min(group) - penalty
        for j in range(k):
            if rollouts[q * k + j].truncated:
                rewards[q * k + j] = floor
    adv = []
    for q in range(2):
        group = rewards[q * k:(q + 1) * k]
        adv += [group[j] - sum(group[i] for i in range(k) if i != j) / (k - 1) for j in range(k)]
    assert stats["reward"].tolist() == pytest.approx(rewards, rel=1e-4, abs=1e-4)
    assert stats["advantage"].tolist() == pytest.approx(adv, rel=1e-4, abs=1e-4)
    n = len(rollouts)
    for i, g in enumerate(got):
        grad_j = sum(adv[b] * grads_z[b][i].double() + sft_weight * grads_y[b][i].double() for b in range(n)) / n
        torch.testing.assert_close(g.double(), -grad_j, rtol=1e-3, atol=1e-6)
    assert any(float(g.abs().max()) > 1e-4 for g in got)


# --------------------------------------------------------------------------- the loop


def _cfg(model, out, **kw) -> LatroConfig:
    base = {"model": str(model), "out": str(out), "data": DataConfig(path="testbed:train", n=16),
            "valid_data": DataConfig(path="testbed:valid", n=4), "k": 4, "batch_size": 2, "micro_batch": 1,
            "max_rationale_tokens": 12, "steps": 4, "save_every": 2, "eval_every": 0, "lr": 3e-3,
            "sft_weight": 0.5, "threads": 1, "gen_batch_size": 16, "eval_max_new_tokens": 16}
    return LatroConfig(**{**base, **kw})


def test_determinism_and_exact_resume(tiny, tmp_path):
    a, a2, b = tmp_path / "a", tmp_path / "a2", tmp_path / "b"
    res = run_latro(_cfg(tiny, a))
    assert res["final"].startswith("last step")
    run_latro(_cfg(tiny, a2))
    assert same_weights(model_weights(a), model_weights(a2)), "same seed must give identical weights"
    assert not same_weights(model_weights(a), model_weights(tiny)), "training changed nothing"
    # resume from the step-2 checkpoint of the same run: steps 3 and 4 again
    shutil.copytree(a / "checkpoints", b / "checkpoints")
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step-2"]
    run_latro(_cfg(tiny, b, resume=True))
    assert same_weights(model_weights(a), model_weights(b)), "2 + 2 resumed steps must equal 4 steps"
    assert [m["step"] for m in read_metrics(b)] == [3, 4]
    m = read_metrics(a)
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "kl", "rationale_len", "stop_rate", "answer_logp", "loss",
                "grad_norm", "lr"):
        assert key in m[0]
    assert m[0]["lr"] > m[3]["lr"] > 0  # linear decay
    assert abs(m[0]["kl"]) < 1e-5  # first step: the policy is still π0
    assert m[1]["kl"] != 0.0
    c = tmp_path / "c"
    run_latro(_cfg(tiny, c, seed=1))
    assert not same_weights(model_weights(a), model_weights(c)), "the seed must matter"


def test_micro_batches_do_not_change_the_update(tiny, tmp_path):
    run_latro(_cfg(tiny, tmp_path / "m1", steps=1, micro_batch=1, batch_size=4))
    run_latro(_cfg(tiny, tmp_path / "m4", steps=1, micro_batch=4, batch_size=4))
    # Adam is invariant to the gradient's scale, so compare the logged gradient norm and loss too
    [s1], [s4] = read_metrics(tmp_path / "m1"), read_metrics(tmp_path / "m4")
    assert s1["grad_norm"] == pytest.approx(s4["grad_norm"], rel=1e-4)
    assert s1["loss"] == pytest.approx(s4["loss"], rel=1e-4, abs=1e-6)
    w1, w4 = model_weights(tmp_path / "m1"), model_weights(tmp_path / "m4")
    for name in w1:
        torch.testing.assert_close(w1[name], w4[name], rtol=1e-3, atol=1e-5)


def test_best_held_out_model_is_the_final_model(tiny, tmp_path):
    out = tmp_path / "sel"
    res = run_latro(_cfg(tiny, out, steps=2, eval_every=1))
    best = json.loads((out / "best" / "best.json").read_text())
    # a random tiny model solves nothing: every evaluation ties at 0, the earliest (the
    # initial model) is kept, and it is what lands in `out`
    assert res["initial_valid_acc"] == 0.0 and best["step"] == 0 and best["valid_acc"] == 0.0
    assert best["solved"] == [False] * len(best["solved"]) and best["solved"]  # per problem, none solved
    assert same_weights(model_weights(out), model_weights(tiny))
    assert same_weights(model_weights(out), model_weights(out / "best"))
    assert [m["step"] for m in read_metrics(out) if "valid_acc" in m] == [0, 1, 2]


def test_test_split_is_refused_for_model_selection(tiny, tmp_path):
    with pytest.raises(SatoriError, match="test split"):
        run_latro(_cfg(tiny, tmp_path / "x", valid_data=DataConfig(path="testbed:test")))
    with pytest.raises(SatoriError, match="answer"):
        run_latro(_cfg(tiny, tmp_path / "x", answer_template="The answer is {}"))


def test_arc_multiple_choice_flows_through(tiny, tmp_path):
    rows = [
        {"id": f"q{i}", "question": f"Which number is largest ({i})?",
         "choices": {"label": ["A", "B", "C"], "text": ["1", "9", "4"]}, "answerKey": "B"}
        for i in range(3)
    ]
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(DataConfig(path=str(path)))
    assert answer_text(problems[0]) == "The answer is B."
    from transformers import AutoTokenizer

    assert "B. 9" in build_prompt(problems[0], AutoTokenizer.from_pretrained(tiny))
    out = tmp_path / "arc"
    res = run_latro(_cfg(tiny, out, data=DataConfig(path=str(path)), valid_data=DataConfig(path=str(path)),
                         steps=2, eval_every=2))
    assert res["train_problems"] == 3 and res["valid_problems"] == 3
    m = read_metrics(out)
    assert [x["step"] for x in m] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(x["reward_mean"])) for x in m[1:])

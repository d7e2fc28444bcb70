"""satori rl: the PPO loop end to end on a tiny model; resume; refusals."""

import json
import logging
import shutil

import pytest
import torch
from conftest import model_weights, same_weights
from safetensors.torch import load_file

from satori.config import from_dict
from satori.data import DataConfig
from satori.errors import SatoriError
from satori.train.ppo import RLConfig, run_rl


def rl_cfg(tmp_path, policy, name, **kw):
    base = dict(policy=str(policy), out=str(tmp_path / name), data={"path": "testbed:train", "n": 16},
                critic_init="policy", steps=2, rollout_batch=8, train_batch=4, micro_batch=2, max_new_tokens=12,
                temperature=1.0, actor_lr=1e-3, critic_lr=1e-3, save_every=1, threads=1, seed=5)
    base.update(kw)
    return from_dict(RLConfig, base)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_runs_and_logs_every_part(tmp_path, tiny_coat):
    run_rl(rl_cfg(tmp_path, tiny_coat, "ppo"))
    rows = metrics(tmp_path / "ppo")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_rule", "reward_orm", "reward_bonus", "policy_loss", "value_loss", "clipfrac",
                "entropy", "response_length", "reflect_rate", "explore_rate", "approx_kl"):
        assert key in rows[0], key
    # an untrained model is never right: the rule reward is -1 for every sample
    assert rows[0]["reward_rule"] == -1.0
    assert (tmp_path / "ppo" / "model.safetensors").exists() and (tmp_path / "ppo" / "critic").is_dir()


@pytest.mark.parametrize("adv", ["grpo", "rloo"])
def test_group_advantages_need_no_critic(tmp_path, tiny_coat, adv):
    run_rl(rl_cfg(tmp_path, tiny_coat, adv, advantage=adv, n_samples=2, rollout_batch=4, steps=1,
                  kl_coef=0.1, kl_in="loss", kl_kind="k3"))
    row = metrics(tmp_path / adv)[0]
    assert "value_loss" not in row and "kl" in row and not (tmp_path / adv / "critic").exists()


def test_resume_equals_uninterrupted(tmp_path, tiny_coat):
    run_rl(rl_cfg(tmp_path, tiny_coat, "full", steps=3))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    (part / "model.safetensors").unlink()
    shutil.rmtree(part / "critic")
    # keep only the step-1 checkpoint: the run "died" during step 2
    shutil.rmtree(part / "checkpoints" / "step-2")
    run_rl(rl_cfg(tmp_path, tiny_coat, "part", steps=3, resume=True))
    assert [r["step"] for r in metrics(part)] == [1, 2, 3]
    assert metrics(part)[-1]["policy_loss"] == pytest.approx(metrics(tmp_path / "full")[-1]["policy_loss"], abs=1e-7)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a checkpoint's policy is a model folder of its own (tokenizer included): evaluated like any model
    from satori.evaluate import EvalConfig, run_eval
    from satori.train.common import latest_checkpoint

    policy = latest_checkpoint(tmp_path / "full") / "policy"
    cfg = EvalConfig(model=str(policy), out=str(tmp_path / "eval-checkpoint"))
    cfg.data.path, cfg.data.n, cfg.gen.max_new_tokens = "testbed:test", 2, 8
    assert run_eval(cfg)["n"] == 2
    assert load_file(str(policy / "model.safetensors")).keys() == a.keys()


def test_critic_warmup_freezes_the_policy_and_trains_the_critic(tmp_path, tiny_coat):
    run_rl(rl_cfg(tmp_path, tiny_coat, "warm", steps=3, critic_warmup=2))
    rows = metrics(tmp_path / "warm")
    assert ["policy_loss" in r for r in rows] == [False, False, True]
    assert all(r["value_loss"] > 0 for r in rows)
    start = load_file(str(tiny_coat / "model.safetensors"))
    ckpt = tmp_path / "warm" / "checkpoints" / "step-2"
    frozen = load_file(str(ckpt / "policy" / "model.safetensors"))
    assert all(torch.equal(start[k], frozen[k]) for k in start)
    trained = load_file(str(tmp_path / "warm" / "model.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    # the critic moved during the warm-up (its value head starts from scratch: compare the backbone)
    critic = load_file(str(ckpt / "critic" / "model.safetensors"))
    shared = [k for k in critic if k.startswith("model.") and k in start]
    assert shared and any(not torch.equal(start[k], critic[k]) for k in shared)


def test_impossible_configs_are_refused():
    with pytest.raises(SatoriError, match=r"train_batch \(64\) is larger than the rollout batch"):
        from_dict(RLConfig, {"rollout_batch": 8, "train_batch": 64})
    with pytest.raises(SatoriError, match="needs n_samples >= 2"):
        from_dict(RLConfig, {"advantage": "grpo", "n_samples": 1, "train_batch": 8, "rollout_batch": 8,
                             "micro_batch": 8})
    with pytest.raises(SatoriError, match="kl_kind"):
        from_dict(RLConfig, {"kl_kind": "k4"})
    with pytest.raises(SatoriError, match="critic_warmup needs advantage=gae"):
        from_dict(RLConfig, {"advantage": "grpo", "n_samples": 2, "critic_warmup": 1})
    with pytest.raises(SatoriError, match=r"critic_warmup \(5\) must be < steps \(5\)"):
        from_dict(RLConfig, {"steps": 5, "critic_warmup": 5})


def test_restart_state_longer_than_context_is_refused(tmp_path, tiny_coat):
    buf = tmp_path / "rae.jsonl"
    buf.write_text(json.dumps({"id": "x", "question": "q", "answer": "1", "status": -1,
                               "prefix": "Step 1: 1 + 1 = 2" * 200 + "<|reflect|>"}) + "\n")
    with pytest.raises(SatoriError, match="initial state of problem 'x'.*exceeds the context"):
        run_rl(rl_cfg(tmp_path, tiny_coat, "ctx", restart_buffer=str(buf)))


def test_a_restart_buffer_that_replaces_other_problems_than_data_says_so(tmp_path, caplog):
    from satori.data import DataConfig, load_problems
    from satori.train.ppo import load_states

    probs = load_problems(DataConfig(path="testbed:train", n=4))
    buf = tmp_path / "rae.jsonl"
    recs = [{"id": p.id, "question": p.question, "answer": p.answer, "status": 0} for p in probs]
    recs.append({"id": f"{probs[0].id}/wrong-1", "question": probs[0].question, "answer": probs[0].answer,
                 "status": -1, "prefix": "Step 1: x<|reflect|>", "meta": {"problem_id": probs[0].id}})
    buf.write_text("".join(json.dumps(r) + "\n" for r in recs))

    def warned(**data):
        cfg = from_dict(RLConfig, {"restart_buffer": str(buf), **({"data": data} if data else {})})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="satori"):
            load_states(cfg, None)
        return caplog.text

    assert warned() == ""                                   # data left at its default
    assert warned(path="testbed:train", n=4) == ""          # the buffer's own problems
    assert "data (testbed:train, n=16, limit=0) is unread" in warned(path="testbed:train", n=16)
    assert "RL samples the 5 states of the restart buffer" in warned(path=str(tmp_path / "missing.jsonl"))
    buf.write_text("".join(json.dumps(r) + "\n" for r in recs[4:] + recs[1:4]))  # problem 0 only as a restart
    assert warned(path="testbed:train", n=4) == ""  # its restart names the problem


def test_policy_without_coat_tokens_is_refused(tmp_path, tiny_base):
    with pytest.raises(SatoriError, match="format tuning|add_coat_tokens"):
        run_rl(rl_cfg(tmp_path, tiny_base, "nocoat"))


def make_orm(src, dst, poison=False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    orm = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    orm.config.pad_token_id = tok.pad_token_id
    if poison:
        with torch.no_grad():
            orm.score.weight.fill_(float("nan"))
    orm.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_orm_reward_and_critic_from_orm(tmp_path, tiny_coat):
    orm = make_orm(tiny_coat, tmp_path / "orm")
    run_rl(rl_cfg(tmp_path, tiny_coat, "withorm", orm=str(orm), critic_init="orm", steps=1))
    row = metrics(tmp_path / "withorm")[0]
    assert 0 < row["reward_orm"] < 1 and row["reward"] == pytest.approx(row["reward_rule"] + row["reward_orm"]
                                                                         + row["reward_bonus"], abs=1e-6)


def test_orm_with_another_tokenizer_is_refused(tmp_path, tiny_coat, tiny_base):
    orm = make_orm(tiny_base, tmp_path / "orm_base")
    with pytest.raises(SatoriError, match="ORM .* vs policy"):
        run_rl(rl_cfg(tmp_path, tiny_coat, "mismatch", orm=str(orm)))


def test_nan_reward_is_refused(tmp_path, tiny_coat):
    orm = make_orm(tiny_coat, tmp_path / "orm_nan", poison=True)
    with pytest.raises(SatoriError, match=r"NaN/inf values \(the last one in reward; limit --max-bad-steps 1"):
        run_rl(rl_cfg(tmp_path, tiny_coat, "nan", orm=str(orm), max_bad_steps=1))
    assert [r["nonfinite"] for r in metrics(tmp_path / "nan")] == ["reward", "reward"]


@pytest.mark.parametrize("adv", ["gae", "grpo"])
def test_single_update_reuses_the_update_logprobs_with_the_same_result(tmp_path, tiny_coat, monkeypatch, adv):
    """One epoch over one mini-batch: skipping the separate old-log-prob pass changes nothing."""
    import satori.train.ppo as ppo

    kw = dict(advantage=adv, n_samples=2, rollout_batch=4, train_batch=8, micro_batch=4, steps=2)
    assert ppo.single_update(rl_cfg(tmp_path, tiny_coat, "x", **kw), has_ref=False)
    run_rl(rl_cfg(tmp_path, tiny_coat, "fast", **kw))
    monkeypatch.setattr(ppo, "single_update", lambda cfg, has_ref: False)
    run_rl(rl_cfg(tmp_path, tiny_coat, "slow", **kw))
    fast, slow = metrics(tmp_path / "fast"), metrics(tmp_path / "slow")
    for a, b in zip(fast, slow):
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], abs=1e-5)
        assert a["clipfrac"] == b["clipfrac"] == 0.0
    wa, wb = load_file(str(tmp_path / "fast" / "model.safetensors")), load_file(str(tmp_path / "slow" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_by_length_equals_one_full_width_pass_on_every_real_token(tiny_coat):
    """Micro-batches sorted by length and cut to their own longest row give the same
    per-token log-probabilities as one pass over the whole padded batch."""
    from satori.rollout import load_model, pack_sequences, token_logprobs
    from satori.train.ppo import by_length

    model = load_model(tiny_coat).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (int(n),), generator=g).tolist() for n in (3, 9, 4, 6, 2)]
    responses = [torch.randint(5, 300, (int(n),), generator=g).tolist() for n in (12, 1, 30, 7, 18)]
    batch = pack_sequences(prompts, responses, pad_id=0, eos_id=1)
    with torch.no_grad():
        full = token_logprobs(model, batch["input_ids"], batch["attention_mask"])["logp"]
        cut = by_length(lambda ids, attn: token_logprobs(model, ids, attn)["logp"], batch, micro=2)
    real = batch["attention_mask"][:, 1:].bool()  # positions that score a real token
    assert cut.shape == full.shape
    assert torch.allclose(cut[real], full[real], atol=1e-5)
    assert (batch["response_mask"].bool() <= real).all()  # every trained token is covered


@pytest.mark.parametrize("adv", ["grpo", "gae"])
def test_shared_prompt_update_equals_the_plain_one(tmp_path, tiny_coat, monkeypatch, adv):
    """Running each prompt once for its group of responses changes no loss and no weight
    (several micro-batches, two optimizer steps per rollout, the critic alongside for gae)."""
    import satori.train.ppo as ppo

    calls = []
    inner = ppo.shared_prompt_logprobs
    monkeypatch.setattr(ppo, "shared_prompt_logprobs", lambda *a, **k: calls.append(1) or inner(*a, **k))
    # an untrained model's rewards are all -1 (zero group advantages): the entropy term makes gradients
    kw = dict(advantage=adv, n_samples=3, rollout_batch=4, train_batch=6, micro_batch=3, steps=2, max_new_tokens=16,
              entropy_coef=0.05)
    run_rl(rl_cfg(tmp_path, tiny_coat, "shared", **kw))
    assert len(calls) == 2 * 2 * 2  # steps × mini-batches × micro-batches
    run_rl(rl_cfg(tmp_path, tiny_coat, "plain", share_prompt=False, **kw))
    assert len(calls) == 8
    shared, plain = metrics(tmp_path / "shared"), metrics(tmp_path / "plain")
    assert all(r["grad_norm"] > 0 for r in shared)
    assert [r["response_length"] for r in shared] == [r["response_length"] for r in plain]
    for a, b in zip(shared, plain):
        for key in ("policy_loss", "first_policy_loss", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    wa, wb = load_file(str(tmp_path / "shared" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_prompt_chunks_keep_groups_together():
    from satori.rollout import pack_sequences
    from satori.train.ppo import prompt_chunks

    prompts = [[5, 6], [7, 8, 9], [5, 6], [7, 8, 9], [5, 6], [7, 8, 9]]
    responses = [[1] * n for n in (4, 2, 1, 5, 3, 3)]
    b = pack_sequences(prompts, responses, pad_id=0)
    chunks = prompt_chunks(b["input_ids"], b["attention_mask"], b["response_mask"], torch.arange(6), micro=3)
    assert [c.tolist() for c, _ in chunks] == [[2, 4, 0], [1, 5, 3]]  # each group by length
    assert [w for _, w in chunks] == [6, 8]


def test_shared_prompts_apply_only_to_groups_on_unsharded_supported_models(tmp_path, tiny_coat):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from satori.rollout import load_model
    from satori.train.ppo import shared_prompts_apply

    model = load_model(tiny_coat)
    grpo = rl_cfg(tmp_path, tiny_coat, "x", advantage="grpo", n_samples=2, rollout_batch=4)
    plain = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    assert shared_prompts_apply(grpo, plain, model)
    assert not shared_prompts_apply(rl_cfg(tmp_path, tiny_coat, "x"), plain, model)  # one sample per prompt
    assert not shared_prompts_apply(rl_cfg(tmp_path, tiny_coat, "x", advantage="grpo", n_samples=2, rollout_batch=4,
                                           share_prompt=False), plain, model)
    for sharded in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        assert not shared_prompts_apply(grpo, SimpleNamespace(distributed_type=sharded), model)


@pytest.mark.parametrize("adv", ["gae", "grpo"])
def test_rl_raises_the_reward_on_the_problems_it_trains_on(tmp_path, shipped_coat, adv):
    # 8 problems, every step samples each one 8 times: accuracy on them must climb
    extra = dict(n_samples=8, rollout_batch=8) if adv == "grpo" else dict(n_samples=1, rollout_batch=64,
                                                                          critic_warmup=2)
    cfg = rl_cfg(tmp_path, shipped_coat, adv, data={"path": "testbed:train", "n": 8}, advantage=adv, steps=10,
                 train_batch=32, micro_batch=32, max_new_tokens=128, temperature=1.0, actor_lr=1e-4, critic_lr=1e-4,
                 save_every=100, threads=2, **extra)
    run_rl(cfg)
    acc = [r["accuracy"] for r in metrics(tmp_path / adv)]
    first, last = sum(acc[:2]) / 2, sum(acc[-3:]) / 3
    # measured: gae 0.53 -> 0.69 (its first 2 steps train only the critic), grpo 0.61 -> 0.89 (0.62 -> 0.90
    # before e06c126 stopped whitening group advantages a second time);
    # one step's accuracy over 64 samples has a spread of about 0.06
    assert last > first + 0.12, acc


def _selection_cfg(tmp_path, policy, name, **kw):
    """Selection on 16 held-out problems after every step, from the shipped testbed base."""
    base = dict(data={"path": "testbed:train", "n": 16}, train_batch=8, micro_batch=8, max_new_tokens=64,
                threads=2, eval_every=1, valid_data={"path": "testbed:valid", "n": 16}, eval_max_new_tokens=128)
    base.update(kw)
    return rl_cfg(tmp_path, policy, name, **base)


def test_selection_is_due_at_the_start_every_n_steps_and_after_the_last():
    from satori.train.select import due

    assert [s for s in range(13) if due(s, 5, 12)] == [0, 5, 10, 12]
    assert [s for s in range(11) if due(s, 5, 10)] == [0, 5, 10]


def test_improves_keeps_the_earlier_model_on_ties():
    from satori.train.select import improves

    assert improves(0.0, {})  # the first measurement is the best so far
    assert improves(0.51, {"step": 0, "valid_acc": 0.5})
    assert not improves(0.5, {"step": 0, "valid_acc": 0.5})
    assert not improves(0.49, {"step": 5, "valid_acc": 0.5})


def test_paired_z_by_hand():
    from satori.train.select import paired_z

    # problems 1 and 2 only the first solves, problem 4 only the second: (2 - 1) / sqrt(3)
    assert paired_z([1, 1, 1, 0, 1], [0, 0, 1, 1, 1]) == pytest.approx(1 / 3 ** 0.5)
    assert paired_z([0, 0, 1, 1, 1], [1, 1, 1, 0, 1]) == pytest.approx(-1 / 3 ** 0.5)
    assert paired_z([1, 0, 1], [1, 0, 1]) == 0.0  # the same problems: no evidence either way
    assert paired_z([1] * 9 + [0], [0] * 10) == pytest.approx(3.0)
    with pytest.raises(SatoriError, match="3 results against 2"):
        paired_z([1, 0, 1], [1, 0])


def test_keeps_last_unless_the_best_beats_it_by_the_paired_z(tmp_path):
    from satori.train.select import BestModel

    def chooser(best_solved, last_solved, z):
        best = {"step": 5, "valid_acc": sum(best_solved) / 10, "solved": best_solved}
        last = {"step": 15, "valid_acc": sum(last_solved) / 10, "solved": last_solved}
        return BestModel(None, None, [], DataConfig(path="testbed:valid"), tmp_path, max_new_tokens=8, batch_size=1,
                         seed=0, bf16=False, state=best, last=last, keep_last_z=z)

    close = chooser([1] * 9 + [0], [1] * 8 + [0, 1], 2.0)  # best 0.9, last 0.8: 2 against 1, z 0.58
    assert close.keeps_last()
    assert close.summary()["final"].startswith("last model (step 15)")
    assert not chooser([1] * 9 + [0], [1] * 8 + [0, 1], 0.0).keeps_last()  # z 0: the best, always
    assert not chooser([1] * 9 + [0], [0] * 10, 2.0).keeps_last()  # 9 against 0, z 3: a real drop
    same_step = chooser([1] * 10, [1] * 10, 2.0)
    same_step.last["step"] = 5
    assert not same_step.keeps_last()  # the best is the last: install it


def test_selection_keeps_the_starting_policy_when_every_step_is_worse(tmp_path, shipped_coat):
    # lr 1e-2 wrecks the policy in one step: held-out accuracy 0.875 at the start, then 0
    res = run_rl(_selection_cfg(tmp_path, shipped_coat, "sel", actor_lr=1e-2, keep_last_z=2.0))
    rows = metrics(tmp_path / "sel")
    acc = {r["step"]: r["valid_acc"] for r in rows if "valid_acc" in r}
    assert list(acc) == [0, 1, 2] and acc[0] > 0.5 > max(acc[1], acc[2]), acc
    assert res["best_step"] == 0 and res["best_valid_acc"] == acc[0]
    assert same_weights(model_weights(tmp_path / "sel"), model_weights(shipped_coat))
    info = json.loads((tmp_path / "sel" / "rl_result.json").read_text())
    assert info["last_step"]["final"] == "best held-out model (step 0)"
    # with keep_last_z 2 too: the drop is far beyond it (14 or so of 16 problems lost, none won)
    assert res["last_step"] == 2 and res["paired_z"] > 3
    # selection only reads the policy: the same run without it trains identically, and its
    # final policy is the wrecked last one
    run_rl(_selection_cfg(tmp_path, shipped_coat, "last", actor_lr=1e-2, eval_every=0))
    plain = metrics(tmp_path / "last")
    assert [r["policy_loss"] for r in plain] == [r["policy_loss"] for r in rows if "policy_loss" in r]
    assert not same_weights(model_weights(tmp_path / "last"), model_weights(shipped_coat))


def test_selection_picks_the_best_step(tmp_path, shipped_coat):
    # GRPO on 16 problems, held-out accuracy measured on the same 16 (measured: 0.875 at the
    # start, 0.94 after step 1, 1.0 after steps 2-4)
    cfg = _selection_cfg(tmp_path, shipped_coat, "up", advantage="grpo", n_samples=4, steps=4, rollout_batch=16,
                         train_batch=64, micro_batch=32, max_new_tokens=128, actor_lr=1e-4, seed=1, save_every=10,
                         valid_data={"path": "testbed:train", "n": 16})
    res = run_rl(cfg)
    acc = [(r["step"], r["valid_acc"]) for r in metrics(tmp_path / "up") if "valid_acc" in r]
    assert [s for s, _ in acc] == [0, 1, 2, 3, 4]
    top = max(a for _, a in acc)
    assert top > acc[0][1], acc
    assert res["best_step"] == next(s for s, a in acc if a == top)  # the earliest of the best
    assert same_weights(model_weights(tmp_path / "up"), model_weights(tmp_path / "up" / "best"))
    assert not same_weights(model_weights(tmp_path / "up"), model_weights(shipped_coat))


def test_resume_keeps_the_selection(tmp_path, shipped_coat):
    run_rl(_selection_cfg(tmp_path, shipped_coat, "full", actor_lr=1e-2, steps=3))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    (part / "model.safetensors").unlink()
    shutil.rmtree(part / "checkpoints" / "step-2")  # the run died during step 2
    run_rl(_selection_cfg(tmp_path, shipped_coat, "part", actor_lr=1e-2, steps=3, resume=True))
    def measured(out):  # the logged values, without wall-clock times
        return [{k: v for k, v in r.items() if k not in ("time", "elapsed") and not k.startswith("time_")}
                for r in metrics(out)]

    assert measured(part) == measured(tmp_path / "full")
    # without the best model in the checkpoint's state, the resumed run would take step 2, its
    # first measurement, as the best
    assert json.loads((part / "best" / "best.json").read_text())["step"] == 0
    assert same_weights(model_weights(part), model_weights(shipped_coat))


def test_test_split_is_refused_for_rl_selection(tmp_path, tiny_coat):
    with pytest.raises(SatoriError, match="test split"):
        run_rl(rl_cfg(tmp_path, tiny_coat, "x", eval_every=1, valid_data={"path": "testbed:test", "n": 4}))


def test_group_advantages_are_not_whitened_again_but_gae_advantages_are(tmp_path, tiny_coat):
    from satori import algos
    from satori.train.ppo import rollout_advantages

    # two prompts, two samples each: the first prompt's samples both wrong (no signal), the
    # second's one right and short, one wrong and long
    scores = torch.tensor([-1.0, -1.0, 0.0, -1.0])
    lengths = [10, 10, 2, 10]
    mask = torch.zeros(4, 10)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    for adv_kind, fn in (("grpo", algos.grpo_advantages), ("rloo", algos.rloo_advantages)):
        adv = fn(scores, 2).unsqueeze(1) * mask
        cfg = rl_cfg(tmp_path, tiny_coat, "x", advantage=adv_kind, n_samples=2, rollout_batch=2)
        out = rollout_advantages(adv, mask, cfg)
        assert torch.equal(out[:2], torch.zeros(2, 10))  # a group that all scored the same teaches nothing
        assert out[2, 0] > 0 > out[3, 0]
        # re-centring over the tokens (what whitening did) gives the all-wrong group a positive advantage
        assert algos.masked_whiten(adv, mask)[0, 0] > 0.4
    gae = torch.randn(4, 10) * mask
    assert torch.allclose(rollout_advantages(gae, mask, rl_cfg(tmp_path, tiny_coat, "x")), algos.masked_whiten(gae, mask))
    assert torch.equal(rollout_advantages(gae, mask, rl_cfg(tmp_path, tiny_coat, "x", whiten_advantages=False)), gae)


def test_actor_lr_schedule_warms_up_then_follows_the_named_schedule(tmp_path, tiny_coat):
    from satori.train.common import make_scheduler

    def lrs(kind, total=10, warmup=2):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make_scheduler(opt, kind, total, warmup), []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("constant") == [0.5] + [1.0] * 9  # a warm-up no longer switches the schedule to cosine
    assert lrs("constant", warmup=0) == [1.0] * 10
    cos = lrs("cosine")
    assert cos[:2] == [0.5, 1.0] and cos[-1] < 0.05 and cos[1:] == sorted(cos[1:], reverse=True)
    with pytest.raises(SatoriError, match="unknown lr schedule 'step'; expected one of constant, cosine, linear"):
        lrs("step")
    with pytest.raises(SatoriError, match="lr_schedule must be one of constant, cosine, linear, got 'step'"):
        rl_cfg(tmp_path, tiny_coat, "x", lr_schedule="step").validate()

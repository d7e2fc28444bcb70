"""Tests of satori.algos against hand-computed numbers and naive loop references."""

from __future__ import annotations

import math

import pytest
import torch

from satori import algos
from satori.errors import SatoriError



def close(a, b, tol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, atol=tol, rtol=tol)


def ragged_mask(lengths, T):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_sum_ignore_padding_even_if_not_finite():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("-inf"), float("inf")]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(algos.masked_sum(x, m), 7.0)
    assert close(algos.masked_mean(x, m), 7.0 / 3)
    assert close(algos.masked_mean(x, m, dim=1), [1.5, 4.0])
    assert close(algos.masked_sum(x, m, dim=0), [5.0, 2.0, 0.0])
    # a slice with no valid entry averages to 0, not nan
    assert close(algos.masked_mean(x, m, dim=0), [2.5, 2.0, 0.0])


def test_masked_var_matches_torch_var_of_selected_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g)
    m = ragged_mask([7, 3, 1, 5], 7)
    sel = x[m.bool()]
    assert close(algos.masked_var(x, m), sel.var(unbiased=True))
    assert close(algos.masked_var(x, m, unbiased=False), sel.var(unbiased=False))
    # hand example: entries 1, 2, 3 -> mean 2, biased var 2/3, unbiased 1
    x2 = torch.tensor([[1.0, 2.0, 99.0], [3.0, -5.0, 7.0]])
    m2 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(algos.masked_var(x2, m2), 1.0)
    assert close(algos.masked_var(x2, m2, unbiased=False), 2.0 / 3)


def test_masked_whiten_mean0_var1_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    x = 3.0 + 5.0 * torch.randn(5, 9, generator=g)
    m = ragged_mask([9, 4, 2, 7, 1], 9)
    w = algos.masked_whiten(x, m)
    valid = w[m.bool()]
    assert close(valid.mean(), 0.0, 1e-5)
    assert close(valid.var(unbiased=True), 1.0, 1e-4)
    assert torch.all(w[~m.bool()] == 0)
    # garbage in padding changes nothing
    x_garbage = torch.where(m.bool(), x, torch.full_like(x, 1e6))
    assert torch.equal(algos.masked_whiten(x_garbage, m), w)
    # shift_mean=False keeps the mean, rescales the spread
    w2 = algos.masked_whiten(x, m, shift_mean=False)
    sel = x[m.bool()]
    assert close(w2[m.bool()].mean(), sel.mean(), 1e-4)
    assert close(w2[m.bool()].var(), 1.0, 1e-4)


# --------------------------------------------------------------------------- rewards


def test_place_terminal_reward_hand_example():
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    out = algos.place_terminal_reward(torch.tensor([2.0, -1.0, 0.5]), m)
    expected = [[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0.5]]
    assert close(out, expected)


def test_place_terminal_reward_rejects_empty_row_and_bad_shapes():
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(SatoriError, match="no valid response token"):
        algos.place_terminal_reward(torch.tensor([1.0, 2.0]), m)
    with pytest.raises(SatoriError):
        algos.place_terminal_reward(torch.tensor([1.0]), m)


def test_kl_estimators_on_known_numbers():
    lp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    ln2 = math.log(2.0)
    assert close(algos.kl_penalty(lp, ref, "k1"), [ln2, -ln2])
    assert close(algos.kl_penalty(lp, ref, "k2"), [0.5 * ln2**2, 0.5 * ln2**2])
    # k3 = r - 1 - log r with r = ref/p: r = 0.5 -> 0.5 - 1 + ln2 ; r = 2 -> 2 - 1 - ln2
    assert close(algos.kl_penalty(lp, ref, "k3"), [ln2 - 0.5, 1.0 - ln2])


def test_kl_k3_nonnegative_and_k1_k3_unbiased():
    g = torch.Generator().manual_seed(2)
    a, b = 3.0 * torch.randn(1000, generator=g), 3.0 * torch.randn(1000, generator=g)
    assert torch.all(algos.kl_penalty(a, b, "k3") >= 0)
    assert torch.all(algos.kl_penalty(a, b, "k2") >= 0)
    # exact expectation under p of each estimator vs the true KL(p || q)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    for kind in ("k1", "k3"):
        est = (p * algos.kl_penalty(p.log(), q.log(), kind)).sum()
        assert close(est, true_kl, 1e-9), kind
    # and by Monte Carlo sampling from p
    idx = torch.multinomial(p.float(), 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        mc = algos.kl_penalty(p.log()[idx], q.log()[idx], kind).mean()
        assert abs(mc.item() - true_kl) < 0.02, kind
    # k2 is biased in general
    k2 = (p * algos.kl_penalty(p.log(), q.log(), "k2")).sum()
    assert abs(k2.item() - true_kl) > 1e-3


def test_kl_unknown_kind_names_options():
    with pytest.raises(SatoriError, match="k1, k2, k3"):
        algos.kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


def test_token_rewards_clip_and_kl():
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([15.0, -0.5])
    assert close(algos.token_rewards(scores, m, clip=10.0), [[0, 0, 10.0], [0, -0.5, 0]])
    assert close(algos.token_rewards(scores, m), [[0, 0, 15.0], [0, -0.5, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, float("nan")]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    r = algos.token_rewards(scores, m, logp, ref, kl_coef=0.1, kl_kind="k1", clip=10.0)
    # k1 = logp - ref = [[0.5, -1, 0], [1, 0, pad]]
    assert close(r, [[-0.05, 0.1, 10.0], [-0.1, -0.5, 0.0]])
    assert not r.requires_grad
    with pytest.raises(SatoriError):
        algos.token_rewards(scores, m, kl_coef=0.1)
    with pytest.raises(SatoriError):
        algos.token_rewards(scores, m, clip=0.0)


# --------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain-Python GAE: per row, compress the valid positions, loop backwards, scatter back."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        pos = [t for t in range(T) if mask[b][t] != 0]
        r = [rewards[b][t] for t in pos]
        v = [values[b][t] for t in pos]
        a = [0.0] * len(pos)
        running = 0.0
        for i in reversed(range(len(pos))):
            v_next = v[i + 1] if i + 1 < len(pos) else 0.0
            running = r[i] + gamma * v_next - v[i] + gamma * lam * running
            a[i] = running
        for i, t in enumerate(pos):
            adv[b][t] = a[i]
            ret[b][t] = a[i] + v[i]
    return torch.tensor(adv), torch.tensor(ret)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_python_loop_on_ragged_masks(gamma, lam):
    g = torch.Generator().manual_seed(3)
    m = ragged_mask([6, 1, 4, 3], 6)
    rewards = torch.randn(4, 6, generator=g)
    values = torch.randn(4, 6, generator=g)
    adv, ret = algos.gae(rewards, values, m, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), m.tolist(), gamma, lam)
    assert close(adv, ref_adv)
    assert close(ret, ref_ret)


def test_gae_skips_holes_inside_the_mask():
    g = torch.Generator().manual_seed(4)
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    rewards = torch.randn(2, 5, generator=g)
    values = torch.randn(2, 5, generator=g)
    adv, ret = algos.gae(rewards, values, m, 0.9, 0.7)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), m.tolist(), 0.9, 0.7)
    assert close(adv, ref_adv)
    assert close(ret, ref_ret)


def test_gae_gamma1_lam1_returns_equal_terminal_reward():
    m = ragged_mask([4, 2, 3], 5)
    scores = torch.tensor([1.0, -0.5, 0.25])
    rewards = algos.place_terminal_reward(scores, m)
    values = torch.tensor(
        [[0.3, -1.0, 2.0, 0.1, 9.0], [0.0, 0.5, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 9.0, 9.0]]
    )
    adv, ret = algos.gae(rewards, values, m, gamma=1.0, lam=1.0)
    assert close(ret, scores[:, None] * m)
    assert close(adv, (scores[:, None] - values) * m)


def test_gae_hand_example():
    # one row, r = [0, 0, 1], V = [0.5, 0.2, 0.4], gamma = 1, lam = 0.5
    # delta = [0 + 0.2 - 0.5, 0 + 0.4 - 0.2, 1 + 0 - 0.4] = [-0.3, 0.2, 0.6]
    # A2 = 0.6 ; A1 = 0.2 + 0.5*0.6 = 0.5 ; A0 = -0.3 + 0.5*0.5 = -0.05
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.4]])
    adv, ret = algos.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert close(adv, [[-0.05, 0.5, 0.6]])
    assert close(ret, [[0.45, 0.7, 1.0]])


def test_gae_has_no_grad():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = algos.gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- PPO losses


def ppo_hand_case():
    # ratios and advantages per valid token (old_logp = 0, so logp = log ratio):
    #  1.5, A=+1 -> max(-1.5, -1.2) = -1.2  clipped (upper side)
    #  0.5, A=-1 -> max( 0.5,  0.8) =  0.8  clipped (lower side)
    #  1.1, A=+2 -> max(-2.2, -2.2) = -2.2  inside the trust region
    #  0.7, A=+1 -> max(-0.7, -0.8) = -0.7  pessimistic unclipped term
    #  1.5, A=-1 -> max( 1.5,  1.2) =  1.5  pessimistic unclipped term
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0], [0.7, 1.5, 1.0, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 0.0], [1.0, -1.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return ratios.log(), torch.zeros(2, 4), adv, m


def test_policy_loss_hand_computation_and_clipfrac():
    logp, old, adv, m = ppo_hand_case()
    logp.requires_grad_(True)
    loss, stats = algos.policy_loss(logp, old, adv, m, clip_eps=0.2)
    assert close(loss, (-1.2 + 0.8 - 2.2 - 0.7 + 1.5) / 5)
    assert close(stats["clipfrac"], 2 / 5)
    r = [1.5, 0.5, 1.1, 0.7, 1.5]
    assert close(stats["approx_kl"], sum(x - 1 - math.log(x) for x in r) / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp of -A*rho = -A*rho, zero where the clipped term is chosen, zero on padding
    assert close(grad, [[0.0, 0.0, -2.2 / 5, 0.0], [-0.7 / 5, 1.5 / 5, 0.0, 0.0]])


def test_policy_loss_no_clipping_when_ratio_is_one():
    logp = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, 3.0]])
    loss, stats = algos.policy_loss(logp, logp.clone(), adv, torch.ones(1, 2))
    assert close(loss, -2.0)
    assert close(stats["clipfrac"], 0.0) and close(stats["approx_kl"], 0.0)


def test_value_loss_clipping_hand_computation():
    # old = 0, eps = 0.2
    # v=0.5, R=1.0 : (0.5)^2=0.25, clipped v=0.2 -> 0.64  -> 0.64 (clip active)
    # v=-0.1,R=-1  : 0.81, clipped same         -> 0.81
    # v=0.1, R=0.3 : 0.04                       -> 0.04
    # v=0.5, R=0.3 : 0.04, clipped 0.2 -> 0.01  -> 0.04
    values = torch.tensor([[0.5, -0.1, 9.0], [0.1, 0.5, 9.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    returns = torch.tensor([[1.0, -1.0, 0.0], [0.3, 0.3, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, stats = algos.value_loss(values, old, returns, m, clip_eps=0.2)
    assert close(loss, 0.5 * (0.64 + 0.81 + 0.04 + 0.04) / 4)
    assert close(stats["clipfrac"], 0.25)
    (grad,) = torch.autograd.grad(loss, values)
    # grad of 0.5*(v-R)^2/4 = (v-R)/4 where unclipped is chosen; 0 where the clipped one is
    assert close(grad, [[0.0, 0.9 / 4, 0.0], [-0.2 / 4, 0.2 / 4, 0.0]])
    loss_nc, stats_nc = algos.value_loss(values, old, returns, m, clip_eps=None)
    assert close(loss_nc, 0.5 * (0.25 + 0.81 + 0.04 + 0.04) / 4)
    assert close(stats_nc["clipfrac"], 0.0)


def _pad_columns(x, k, fill):
    return torch.cat([x, torch.full((x.shape[0], k), fill, dtype=x.dtype)], dim=1)


@pytest.mark.parametrize("fill", [0.0, 123.0, float("nan"), float("-inf")])
def test_padding_invariance(fill):
    g = torch.Generator().manual_seed(5)
    B, T, k = 3, 5, 4
    m = ragged_mask([5, 2, 3], T)
    logp = -torch.rand(B, T, generator=g)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    old_values = values + 0.3 * torch.randn(B, T, generator=g)
    rewards = torch.randn(B, T, generator=g)
    mp = _pad_columns(m, k, 0.0)

    def run(pad):
        P = (lambda x: _pad_columns(x, k, fill)) if pad else (lambda x: x)
        mask = mp if pad else m
        lp = P(logp).requires_grad_(True)
        v = P(values).requires_grad_(True)
        pl, ps = algos.policy_loss(lp, P(old), P(adv), mask)
        vl, vs = algos.value_loss(v, P(old_values), P(rewards), mask)
        a, r = algos.gae(P(rewards), P(values), mask, 1.0, 0.95)
        (glp,) = torch.autograd.grad(pl, lp)
        (gv,) = torch.autograd.grad(vl, v)
        return pl, ps, vl, vs, a[:, :T], r[:, :T], glp[:, :T], gv[:, :T], a[:, T:], glp[:, T:]

    base, padded = run(False), run(True)
    for x, y in zip(base[:8], padded[:8]):
        if isinstance(x, dict):
            for key in x:
                assert close(x[key], y[key]), key
        else:
            assert close(x, y)
    assert torch.all(padded[8] == 0) and torch.all(padded[9] == 0)


def test_shape_mismatch_is_a_satori_error():
    with pytest.raises(SatoriError, match="shape mismatch"):
        z = torch.zeros(2, 3)
        algos.policy_loss(z, z, torch.zeros(2, 4), torch.ones(2, 3))


# --------------------------------------------------------------------------- entropy


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    naive = -(p * p.log()).sum(-1)
    assert close(algos.entropy_from_logits(logits), naive, 1e-10)
    assert close(algos.entropy_from_logits(torch.zeros(5)), math.log(5))
    # huge logits: one-hot distribution, entropy 0, no overflow
    assert close(algos.entropy_from_logits(torch.tensor([1000.0, 0.0, -1000.0])), 0.0)
    # -inf entries (masked vocabulary): entropy of the rest and a finite gradient
    z = torch.tensor([0.0, 0.0, float("-inf")], requires_grad=True)
    h = algos.entropy_from_logits(z)
    assert close(h, math.log(2))
    (grad,) = torch.autograd.grad(h, z)
    assert torch.all(torch.isfinite(grad))


# --------------------------------------------------------------------------- group baselines


def test_grpo_advantages_hand_example():
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3*0.25^2)/3) = 0.5
    adv = algos.grpo_advantages(s, 4, eps=1e-12)
    assert close(adv, [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    adv_nostd = algos.grpo_advantages(s, 4, normalize_std=False)
    assert close(adv_nostd, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    # the default eps shows up in the denominator
    assert close(algos.grpo_advantages(s, 4)[0], 0.75 / (0.5 + 1e-6), 1e-7)


def test_rloo_advantages_hand_example():
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 5.0, 1.0, 7.0])
    adv = algos.rloo_advantages(s, 4)
    # group 2 baselines: (5+1+7)/3, (3+1+7)/3, (3+5+7)/3, (3+5+1)/3
    assert close(adv, [1.0, -1 / 3, -1 / 3, -1 / 3, -4 / 3, 4 / 3, -4.0, 4.0])
    assert close(algos.leave_one_out_baseline(torch.tensor([[2.0, 4.0]])), [[4.0, 2.0]])


def test_group_errors():
    with pytest.raises(SatoriError, match="at least 2"):
        algos.rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(SatoriError, match="groups of 3"):
        algos.rloo_advantages(torch.zeros(4), 3)
    with pytest.raises(SatoriError, match="groups of 3"):
        algos.grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(SatoriError):
        algos.leave_one_out_baseline(torch.zeros(3, 1))


# --------------------------------------------------------------------------- reward model


def test_bradley_terry_loss_hand_numbers():
    rc, rr = torch.tensor([3.0, 1.0]), torch.tensor([0.0, 1.0])
    # margin 2: d = [1, -2]; -log sigmoid(d) = log(1 + e^-d)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    assert close(algos.bradley_terry_loss(rc, rr, margin=2.0), expected)
    expected0 = (math.log1p(math.exp(-3.0)) + math.log(2.0)) / 2
    assert close(algos.bradley_terry_loss(rc, rr), expected0)
    # gradient pushes chosen up, rejected down
    rc.requires_grad_(True)
    rr.requires_grad_(True)
    gc, gr = torch.autograd.grad(algos.bradley_terry_loss(rc, rr, 2.0), (rc, rr))
    assert torch.all(gc < 0) and torch.all(gr > 0)


# --------------------------------------------------------------------------- Satori reward


def test_satori_reward_all_six_combinations():
    status = torch.tensor([-1, -1, 0, 0, 1, 1])
    correct = torch.tensor([True, False, True, False, True, False])
    orm = torch.tensor([0.0, math.log(3.0), 0.0, 0.0, math.log(3.0), 0.0])
    out = algos.satori_reward(correct, orm, status, beta=0.5)
    assert close(out["rule"], [0, -1, 0, -1, 0, -1])
    assert close(out["orm"], [0.5, 0.75, 0.5, 0.5, 0.75, 0.5])
    assert close(out["bonus"], [0.5, 0, 0, 0, 0, -0.5])
    assert close(out["total"], [1.0, -0.25, 0.5, -0.5, 0.75, -1.0])
    no_orm = algos.satori_reward(correct, orm, status, beta=0.5, use_orm=False)
    assert close(no_orm["orm"], [0] * 6)
    assert close(no_orm["total"], [0.5, -1, 0, -1, 0, -1.5])
    none_orm = algos.satori_reward(correct, None, status, beta=0.0)
    assert close(none_orm["total"], [0, -1, 0, -1, 0, -1])


def test_satori_reward_rejects_bad_status():
    with pytest.raises(SatoriError, match="restart_status"):
        algos.satori_reward(torch.tensor([True]), None, torch.tensor([2]))


# --------------------------------------------------------------------------- LaTRO


def test_latro_rewards_hand_numbers_and_truncation():
    ans = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    rat = torch.tensor([-10.0, -12.0, -8.0, -20.0])
    ref = torch.tensor([-11.0, -12.0, -9.0, -18.0])
    # rat - ref = [1, 0, 1, -2] ; r = ans - 0.5 * that = [-1.5, -2, -1, -2]
    r = algos.latro_rewards(ans, rat, ref, beta=0.5, truncated=torch.tensor([False] * 4))
    assert close(r, [-1.5, -2.0, -1.0, -2.0])
    assert not r.requires_grad
    r = algos.latro_rewards(ans, rat, ref, 0.5, torch.tensor([False, False, False, True]), 1.0)
    assert close(r, [-1.5, -2.0, -1.0, -3.0])
    # the group minimum includes the truncated rationales' own raw rewards
    r = algos.latro_rewards(ans, rat, ref, 0.5, torch.tensor([True, False, False, False]), 0.5)
    assert close(r, [-2.5, -2.0, -1.0, -2.0])
    # batched over questions: the minimum is per group (last dim)
    r2 = algos.latro_rewards(
        torch.tensor([[-1.0, -4.0], [-2.0, -3.0]]), torch.zeros(2, 2), torch.zeros(2, 2), 0.1,
        torch.tensor([[True, False], [False, False]]), 1.0,
    )
    assert close(r2, [[-5.0, -4.0], [-2.0, -3.0]])


def test_latro_answer_floor_ties_the_rationales_below_it():
    ans = torch.tensor([-0.1, -9.0, -15.0, -4.0])
    rat, ref = torch.tensor([-5.0, -5.0, -5.0, -6.0]), torch.tensor([-5.0, -5.0, -5.0, -5.0])
    # floor -6: -9 and -15 both count as -6; the KL part still applies after the floor
    r = algos.latro_rewards(ans, rat, ref, beta=0.5, answer_floor=-6.0)
    assert close(r, [-0.1, -6.0, -6.0, -4.0 + 0.5])
    # the default is the paper's reward (no floor)
    assert close(algos.latro_rewards(ans, rat, ref, beta=0.5), [-0.1, -9.0, -15.0, -3.5])


def test_latro_loss_gradient_on_tiny_linear_policy():
    """A softmax policy over V tokens with logits W h (h a fixed feature per position).

    Hand formula: grad_W log softmax(W h)[tok] = (onehot(tok) - softmax(W h)) h^T, so
    grad_W loss = -(1/(B K)) sum_{b,k} [A_bk sum_{t in z_bk} (e_t - p_t) h_t^T
                                        + lam sum_{t in y_b} (e_t - p_t) h_t^T].
    """
    g = torch.Generator().manual_seed(7)
    V, D, B, K, Lz, Ly = 5, 3, 2, 3, 4, 2
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    hz = torch.randn(B, K, Lz, D, generator=g, dtype=torch.float64)
    hy = torch.randn(B, K, Ly, D, generator=g, dtype=torch.float64)
    z = torch.randint(0, V, (B, K, Lz), generator=g)
    y = torch.randint(0, V, (B, K, Ly), generator=g)
    A = torch.randn(B, K, generator=g, dtype=torch.float64)
    lam = 0.7

    def seq_logp(h, toks):
        logits = h @ W.T  # [B, K, L, V]
        return logits.log_softmax(-1).gather(-1, toks.unsqueeze(-1)).squeeze(-1).sum(-1)

    loss = algos.latro_loss(seq_logp(hz, z), seq_logp(hy, y), A, sft_weight=lam)
    (grad,) = torch.autograd.grad(loss, W)

    Wd = W.detach()
    expected = torch.zeros(V, D, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            for h_seq, toks, weight in ((hz, z, A[b, k].item()), (hy, y, lam)):
                for t in range(toks.shape[2]):
                    h = h_seq[b, k, t]
                    p = torch.softmax(Wd @ h, dim=0)
                    e = torch.zeros(V, dtype=torch.float64)
                    e[toks[b, k, t]] = 1.0
                    expected -= weight * torch.outer(e - p, h) / (B * K)
    assert close(grad, expected, 1e-10)

    # advantages are constants even if they carry grad
    A_grad = A.clone().requires_grad_(True)
    loss2 = algos.latro_loss(seq_logp(hz, z), seq_logp(hy, y), A_grad, sft_weight=lam)
    assert close(loss2, loss, 1e-12)
    (ga,) = torch.autograd.grad(loss2, A_grad, allow_unused=True)
    assert ga is None


def test_latro_loss_value_and_zero_sft_weight():
    rat = torch.tensor([[-2.0, -4.0]])
    ans = torch.tensor([[-1.0, -3.0]])
    A = torch.tensor([[1.0, -1.0]])
    # -mean([1*-2 + 0.5*-1, -1*-4 + 0.5*-3]) = -mean([-2.5, 2.5]) = 0
    assert close(algos.latro_loss(rat, ans, A, 0.5), 0.0)
    # -mean([-2, 4]) = -1
    assert close(algos.latro_loss(rat, ans, A, 0.0), -1.0)

"""The reinforcement-learning maths of satori, as small pure functions over tensors.

Conventions used throughout:

* Per-token tensors are ``[batch, T]`` over the *response* tokens only.
* ``mask`` is a float tensor of the same shape: 1 for a real response token, 0 for padding.
  Padding normally follows the end of the response; functions that walk the sequence
  (``place_terminal_reward``, ``gae``) also tolerate holes inside it.
* Log-probabilities are per token (natural log). Values at padded positions are never read:
  they may hold anything, including ``-inf`` or ``nan``, without changing a result or a
  gradient.

Sources: PPO (Schulman et al., 2017), GAE (Schulman et al., 2016), the k1/k2/k3 KL estimators
(Schulman, "Approximating KL divergence", 2020), GRPO (Shao et al., 2024), RLOO (Ahmadian et
al., 2024), Bradley-Terry reward models (Ouyang et al., 2022), the Satori reward (Shen et al.,
2025, see METHOD.md section 3) and LaTRO (Chen et al., 2024, METHOD.md section 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from satori.errors import SatoriError

KL_KINDS = ("k1", "k2", "k3")

__all__ = [
    "KL_KINDS",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "place_terminal_reward",
    "kl_penalty",
    "token_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "leave_one_out_baseline",
    "grpo_advantages",
    "rloo_advantages",
    "bradley_terry_loss",
    "satori_reward",
    "latro_rewards",
    "latro_loss",
]


# --------------------------------------------------------------------------- helpers


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{name}={list(s)}" for name, s in shapes.items())
        raise SatoriError(f"shape mismatch: {desc}")


def _zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with padded entries replaced by 0 (no nan/inf leaks into values or gradients)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


# --------------------------------------------------------------------------- masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask)`` over ``dim`` (all elements when ``None``); padded entries are ignored
    even when they are not finite."""
    weighted = _zero_pad(x, mask) * mask
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all elements when ``None``).

    A slice with no valid entry gives 0 rather than ``nan``.
    """
    count = _as_float(mask.sum() if dim is None else mask.sum(dim=dim))
    return masked_sum(x, mask, dim) / count.clamp_min(torch.finfo(count.dtype).tiny)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x`` (over all of them, as one population).

    ``var = mean_m((x - mean_m(x))^2)``, times ``n / (n - 1)`` (Bessel) when ``unbiased`` and
    there are ``n >= 2`` valid entries; with fewer the correction is skipped (0 or 1 entry has
    variance 0).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n >= 2:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its valid entries over the whole
    batch: ``(x - mu) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back
    (only the scale changes). Padded entries of the result are 0.

    Used for PPO advantage whitening (METHOD.md section 3: "advantages whitened over the batch").
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_pad(out, mask)


# --------------------------------------------------------------------------- rewards


def place_terminal_reward(scores: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` scalar scores -> ``[B, T]`` per-token rewards, each score on the last valid token
    of its row (the position of the largest index with ``mask != 0``), 0 elsewhere.

    Raises ``SatoriError`` for a row with no valid token: its reward would silently vanish.
    Keep the EOS token in the response mask so that even an empty answer has one token.
    """
    if mask.dim() != 2 or scores.shape != mask.shape[:1]:
        raise SatoriError(
            f"place_terminal_reward wants scores [B] and mask [B, T], "
            f"got scores {list(scores.shape)} and mask {list(mask.shape)}"
        )
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = ((mask != 0) * positions).max(dim=1).values - 1
    if (last < 0).any():
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise SatoriError(f"rows {rows} have no valid response token to carry the reward")
    scores = _as_float(scores)
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    return out.scatter(1, last.unsqueeze(1), scores.unsqueeze(1))


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``
    (Schulman, "Approximating KL divergence", 2020). With ``d = logp - ref_logp``:

    * ``k1 = d``                      unbiased, high variance, can be negative;
    * ``k2 = d^2 / 2``                biased, low variance, >= 0;
    * ``k3 = exp(-d) - (-d) - 1``     unbiased, low variance, >= 0.

    The result is not masked.
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise SatoriError(f"unknown KL estimator kind {kind!r}; choose one of {', '.join(KL_KINDS)}")


def token_rewards(
    scores: Tensor,
    mask: Tensor,
    logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k1",
    clip: float | None = None,
) -> Tensor:
    """Per-token PPO rewards with the KL penalty folded into the reward:

    ``r_t = 1[t = last] * clamp(score, -clip, clip) - kl_coef * KL_t``, 0 on padding,

    where ``KL_t = kl_penalty(logp, ref_logp, kl_kind)``. Satori's published settings use
    ``kl_coef = 0`` and ``clip = 10`` (METHOD.md section 3). Computed without gradients.
    """
    with torch.no_grad():
        scores = _as_float(scores.detach())
        if clip is not None:
            if clip <= 0:
                raise SatoriError(f"reward clip must be positive, got {clip}")
            scores = scores.clamp(-clip, clip)
        rewards = place_terminal_reward(scores, mask)
        if kl_coef != 0.0:
            if logp is None or ref_logp is None:
                raise SatoriError("kl_coef is non-zero but logp or ref_logp was not given")
            _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
            kl = kl_penalty(_zero_pad(logp, mask), _zero_pad(ref_logp, mask), kl_kind)
            rewards = rewards - kl_coef * kl.to(rewards.dtype) * mask
        return rewards


# --------------------------------------------------------------------------- PPO


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over the valid tokens.

    ``delta_t = r_t + gamma * V_{t'} - V_t`` with ``t'`` the next valid token (``V = 0`` after
    the last one), ``A_t = delta_t + gamma * lam * A_{t'}``, ``returns_t = A_t + V_t``.
    Padded positions are skipped (their rewards and values are never read) and are 0 in both
    outputs. Computed without gradients.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    with torch.no_grad():
        valid = mask != 0
        rewards = _zero_pad(rewards.detach(), mask)
        values = _zero_pad(values.detach(), mask)
        next_value = torch.zeros_like(values[:, 0])
        next_adv = torch.zeros_like(values[:, 0])
        advantages = torch.zeros_like(values)
        for t in range(values.shape[1] - 1, -1, -1):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv_t = delta + gamma * lam * next_adv
            next_adv = torch.where(valid[:, t], adv_t, next_adv)
            next_value = torch.where(valid[:, t], values[:, t], next_value)
            advantages[:, t] = adv_t
        advantages = _zero_pad(advantages, mask)
        returns = _zero_pad(advantages + values, mask)
    return advantages, returns


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al., 2017), averaged over all valid tokens:

    ``rho = exp(logp - old_logp)``,
    ``loss = mean_m( max(-A * rho, -A * clamp(rho, 1 - eps, 1 + eps)) )``.

    Stats (detached 0-d tensors, token-means over valid tokens):

    * ``clipfrac``: fraction of tokens where the clipped term is strictly the larger one (its
      gradient is then zero);
    * ``approx_kl``: the k3 estimate of ``KL(pi_old || pi)`` from the tokens (sampled from
      ``pi_old``): ``rho - 1 - log rho``.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    logp = _zero_pad(logp, mask)
    log_ratio = logp - _zero_pad(old_logp.detach(), mask)
    adv = _zero_pad(advantages.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (as in PPO2 / OpenAI baselines), averaged over valid tokens:

    ``v_c = old + clamp(v - old, -eps, eps)``,
    ``loss = 0.5 * mean_m( max((v - R)^2, (v_c - R)^2) )``; ``clip_eps=None`` gives
    ``0.5 * mean_m((v - R)^2)``.

    Stats (detached 0-d tensor): ``clipfrac``, the fraction of valid tokens where the clipped
    error is strictly larger (0 without clipping).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    values = _zero_pad(values, mask)
    returns = _zero_pad(returns.detach(), mask)
    err = (values - returns) ** 2
    if clip_eps is None:
        loss = 0.5 * masked_mean(err, mask)
        return loss, {"clipfrac": torch.zeros((), dtype=err.dtype, device=err.device)}
    old_values = _zero_pad(old_values.detach(), mask)
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).to(err.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, shape ``logits.shape[:-1]``:

    ``H = logsumexp(z) - sum_i softmax(z)_i * z_i`` (no ``log`` of a probability, so it is
    stable for large logits; entries at ``-inf`` contribute 0 and no ``nan`` gradient).
    """
    probs = torch.softmax(logits, dim=-1)
    safe = torch.where(probs > 0, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return torch.logsumexp(logits, dim=-1) - (probs * safe).sum(dim=-1)


# --------------------------------------------------------------------------- group baselines


def leave_one_out_baseline(x: Tensor, dim: int = -1) -> Tensor:
    """``b_i = mean_{j != i} x_j = (sum_j x_j - x_i) / (K - 1)`` along ``dim`` (size K >= 2).

    The baseline of RLOO (Ahmadian et al., 2024) and of LaTRO's gradient estimator.
    """
    k = x.shape[dim]
    if k < 2:
        raise SatoriError(f"a leave-one-out baseline needs at least 2 samples per group, got {k}")
    return (x.sum(dim=dim, keepdim=True) - x) / (k - 1)


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise SatoriError(f"scores must be 1-D [N], got shape {list(scores.shape)}")
    if group_size < 2:
        raise SatoriError(f"group_size must be at least 2, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise SatoriError(
            f"{scores.shape[0]} scores cannot be split into groups of {group_size}"
        )
    return _as_float(scores.detach()).view(-1, group_size)


def grpo_advantages(
    scores: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al., 2024): ``(s_i - mean_g) / (std_g + eps)``
    with the unbiased (Bessel) std of the group; ``normalize_std=False`` gives ``s_i - mean_g``.

    ``scores`` is ``[N]`` with groups of ``group_size`` consecutive entries (all samples of one
    prompt together). Computed without gradients.
    """
    groups = _groups(scores, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages: ``s_i - mean_{j != i} s_j`` within each group of
    ``group_size`` consecutive entries of ``scores`` ``[N]``. Computed without gradients."""
    groups = _groups(scores, group_size)
    return (groups - leave_one_out_baseline(groups, dim=1)).reshape(-1)


# --------------------------------------------------------------------------- reward model


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: float = 0.0) -> Tensor:
    """Pairwise Bradley-Terry loss ``mean(-log sigmoid(r_chosen - r_rejected - margin))``.

    Satori's outcome reward model uses margin ``tau = 2`` (METHOD.md section 3).
    """
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


# --------------------------------------------------------------------------- Satori reward


def satori_reward(
    correct: Tensor,
    orm_scores: Tensor | None,
    restart_status: Tensor,
    beta: float = 0.5,
    use_orm: bool = True,
) -> dict[str, Tensor]:
    """Satori's RL reward (METHOD.md section 3), per sequence, as ``[B]`` tensors:

    * ``rule  = 1[correct] - 1``  (0 or -1);
    * ``orm   = sigmoid(orm_score)`` (0 when ``use_orm`` is False or ``orm_scores`` is None);
    * ``bonus = +beta`` if the start came from the negative restart buffer (status -1) and the
      completion is correct, ``-beta`` if it came from the positive buffer (status +1) and the
      completion is wrong, else 0;
    * ``total = rule + orm + bonus``.

    ``restart_status`` holds -1, 0 (an original problem) or +1. Computed without gradients.
    """
    correct = correct.detach().bool()
    status = restart_status.detach()
    _check_same_shape(correct=correct, restart_status=status)
    if correct.dim() != 1:
        raise SatoriError(f"correct must be 1-D [B], got shape {list(correct.shape)}")
    bad = ~((status == -1) | (status == 0) | (status == 1))
    if bad.any():
        raise SatoriError(
            f"restart_status must be -1, 0 or +1; got {sorted(set(status[bad].tolist()))}"
        )
    dtype = torch.get_default_dtype()
    if use_orm and orm_scores is not None:
        _check_same_shape(correct=correct, orm_scores=orm_scores)
        orm = torch.sigmoid(_as_float(orm_scores.detach()))
        dtype = orm.dtype
    else:
        orm = torch.zeros(correct.shape, dtype=dtype, device=correct.device)
    rule = correct.to(dtype) - 1.0
    rescued = ((status == -1) & correct).to(dtype)
    spoiled = ((status == 1) & ~correct).to(dtype)
    bonus = beta * rescued - beta * spoiled
    return {"rule": rule, "orm": orm, "bonus": bonus, "total": rule + orm + bonus}


# --------------------------------------------------------------------------- LaTRO


def latro_rewards(
    answer_logp: Tensor,
    rationale_logp: Tensor,
    ref_rationale_logp: Tensor,
    beta: float,
    truncated: Tensor | None = None,
    truncation_penalty: float = 0.0,
    answer_floor: float = float("-inf"),
) -> Tensor:
    """LaTRO's self-reward of each of K rationales of one question (Chen et al., 2024):

    ``r_k = max(log pi(y | x + z_k), answer_floor) - beta * (log pi(z_k | x) - log pi0(z_k | x))``

    (sums of token log-probs, not length-normalised; the paper has no floor: ``-inf``). A
    finite ``answer_floor`` makes every rationale that leaves the gold answer less likely
    than ``exp(answer_floor)`` equally bad, so the ranking among rationales that argue for
    a wrong answer (which digits of the gold answer the wrong one happens to share) stops
    adding noise to the advantages. Rationales that hit the length limit
    without stopping (``truncated``) get ``min_j r_j - truncation_penalty``, where the minimum
    runs over the raw rewards of the whole group, truncated ones included: a truncated
    rationale therefore ranks below every complete one of its group (for a positive penalty),
    and the value stays on the group's own scale whatever the answer likelihoods are.

    Inputs are ``[K]`` (or ``[..., K]``, groups along the last dimension). Computed without
    gradients.
    """
    _check_same_shape(
        answer_logp=answer_logp,
        rationale_logp=rationale_logp,
        ref_rationale_logp=ref_rationale_logp,
    )
    if truncation_penalty < 0:
        raise SatoriError(f"truncation_penalty must be >= 0, got {truncation_penalty}")
    with torch.no_grad():
        log_ratio = rationale_logp.detach() - ref_rationale_logp.detach()
        rewards = answer_logp.detach().clamp(min=answer_floor) - beta * log_ratio
        if truncated is not None:
            truncated = truncated.detach().bool()
            _check_same_shape(answer_logp=answer_logp, truncated=truncated)
            floor = rewards.min(dim=-1, keepdim=True).values - truncation_penalty
            rewards = torch.where(truncated, floor.expand_as(rewards), rewards)
        return rewards


def latro_loss(
    rationale_logp_sum: Tensor,
    answer_logp_sum: Tensor,
    advantages: Tensor,
    sft_weight: float,
) -> Tensor:
    """LaTRO surrogate loss over ``[B, K]`` (B questions, K rationales each):

    ``loss = -mean_{b,k}[ A_bk * log pi(z_bk | x_b) + sft_weight * log pi(y_b | x_b + z_bk) ]``

    with ``A`` treated as a constant (detached), so that the gradient is the LaTRO estimator
    ``-mean_{b,k}[ A_bk grad log pi(z_bk|x_b) + sft_weight grad log pi(y_b|x_b+z_bk) ]``
    (METHOD.md section 4; the release's default ``sft_weight`` is 0).
    """
    _check_same_shape(
        rationale_logp_sum=rationale_logp_sum,
        answer_logp_sum=answer_logp_sum,
        advantages=advantages,
    )
    objective = advantages.detach() * rationale_logp_sum
    if sft_weight != 0.0:
        objective = objective + sft_weight * answer_logp_sum
    return -objective.mean()

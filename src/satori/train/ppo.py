"""``satori rl``: Satori's self-improvement stage — PPO with Restart-and-Explore.

One loop, top to bottom, each step:

1. **Initial states.** ``rollout_batch`` states drawn (seeded by the step) from the problems
   and, with Restart-and-Explore, from the restart buffers built by ``satori rae``: a state
   is a question plus a response prefix that ends in ``<|reflect|>`` and a restart status
   (+1 from a correct trajectory, -1 from a wrong one, 0 for an original problem).
2. **Rollout.** ``n_samples`` continuations per state at ``temperature`` (batch-invariant
   sampling: the same seed gives the same samples for any batch size or process count).
3. **Reward** (METHOD.md §3): ``r = r_rule + σ(r_orm) + r_bonus`` on the last response token;
   the answer of the whole trajectory (prefix + continuation) is graded; a truncated or empty
   continuation, or one of meta-action tokens only, is never correct (:func:`rule_correct`);
   optional KL to a frozen reference, in the reward or in the loss (k1 / k2 / k3; coefficient
   0 creates no reference model); reward clipping. A NaN / inf reward skips the step.
4. **Advantages.** ``gae`` (the paper's PPO: a critic initialised from the ORM, γ, λ) or, as
   options of the same loop, ``grpo`` / ``rloo`` group baselines over the ``n_samples``
   continuations of a state (no critic); GAE advantages are whitened over the batch
   (``whiten_advantages``), group advantages are not (:func:`rollout_advantages`).
5. **Update.** ``ppo_epochs`` passes over shuffled mini-batches of ``train_batch``
   sequences (gradient accumulation over ``micro_batch``): clipped policy loss, clipped
   value loss. Log-probabilities at update time use the same temperature and masks as the
   rollout's ``old_logp``. With one epoch over one mini-batch (``train_batch`` = the whole
   rollout) and no KL reward, ``old_logp`` is not computed in a separate pass: it equals the
   update's own log-probabilities (detached), ratio 1, as in GRPO's single-step case.
   During the first ``critic_warmup`` steps only the critic is updated (the policy is frozen):
   a fresh value head predicts about 0 while the returns are about -1, so the last tokens of
   every response (the end-of-sequence token among them) get strongly negative advantages and
   the policy learns to stop ending its answers (measured on the testbed: rule-reward-only PPO
   from a policy-initialised critic went from 86 to 232 tokens, 83% truncated, in 12 steps;
   with 3 warm-up steps it kept 75-93 tokens).
6. **Bookkeeping.** Metrics every step (reward and each part, KL, entropy, clip fraction,
   value loss, response length, reflect / explore rates) to JSONL and TensorBoard; atomic
   checkpoints every ``save_every`` steps and on SIGTERM; ``resume`` continues exactly.
7. **Selection** (``eval_every`` > 0, off by default as in the paper): greedy pass@1 on
   held-out problems (``valid_data``, never the test split) before the first step, every
   ``eval_every`` steps and after the last; the best of these policies (ties: the earlier,
   so the starting policy when no step beat it) is the final policy written to ``out``
   (:class:`satori.train.select.BestModel`), or with ``keep_last_z`` the last policy unless
   the best beats it on the same problems by that paired z; the critic in ``out/critic`` is the last
   step's. A few PPO steps on a small model can lower its accuracy in one seed and raise it
   in another (full preset at 76bd913, round 1, greedy pass@1 on 2,000 validation problems,
   format-tuned / step 15: seed 0 89.3 / 91.6, seed 2 90.2 / 87.3), and the reward curve does
   not show which: rollouts are sampled, restarted and partly from wrong prefixes.

Multi-process (accelerate): each process rolls out its share of the global batch; losses
are normalised by global token counts, so the gradient does not depend on the number of
processes.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from satori import algos, coat
from satori.config import check, to_dict, validate_all
from satori.data import DataConfig, Problem, build_prompt, load_problems, read_jsonl
from satori.errors import SatoriError
from satori.grading import grade_batch, is_blank_response
from satori.rollout import (
    generate, load_model, load_tokenizer, pack_sequences, shared_prompt_logprobs, shared_prompt_supported,
    token_logprobs,
)
from satori.train.common import (
    end_of_step, skip_bad_step,
    LR_SCHEDULES, MetricsLog, StopSignal, autocast, grads_finite, latest_checkpoint, load_checkpoint, logger,
    make_accelerator, make_scheduler, save_checkpoint, save_final_model,
)
from satori.train.select import BestModel, due
from satori.utils import seed_everything, set_threads, write_json

ADVANTAGES = ("gae", "grpo", "rloo")


@dataclass
class RLConfig:
    """``satori rl``: PPO (or GRPO / RLOO) with Restart-and-Explore and the Satori reward."""

    __aliases__: ClassVar[dict[str, str]] = {"data": "data.path", "valid_data": "valid_data.path"}

    policy: str = field(default="", metadata={"help": "format-tuned model folder"})
    out: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:train"), metadata={
        "help": "the problems RL samples; unread with a restart buffer, whose states include its problems"})
    restart_buffer: str = field(default="", metadata={
        "help": "initial states JSONL from `satori rae` ('' = no RAE): its problems (status 0) and restarts "
                "replace data"})
    orm: str = field(default="", metadata={"help": "outcome reward model folder ('' = rule reward only)"})
    critic_init: str = field(default="orm", metadata={"help": "orm or policy"})
    critic_warmup: int = field(default=0, metadata={
        "help": "first steps that train only the critic, the policy frozen (gae only)"})
    advantage: str = field(default="gae", metadata={"help": "gae (PPO with critic), grpo or rloo"})
    n_samples: int = field(default=1, metadata={"help": "continuations per initial state"})
    steps: int = 20
    rollout_batch: int = field(default=64, metadata={"help": "initial states per step (global)"})
    train_batch: int = field(default=32, metadata={"help": "sequences per optimizer step (global)"})
    micro_batch: int = 16
    ppo_epochs: int = 1
    actor_lr: float = 1e-5
    critic_lr: float = 5e-5
    warmup_steps: int = field(default=0, metadata={"help": "policy updates of linear lr warm-up, in steps"})
    lr_schedule: str = field(default="constant", metadata={"help": "the actor's lr after warm-up: constant "
                                                                   "(as published), cosine or linear decay to 0"})
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    kl_coef: float = 0.0
    kl_kind: str = "k1"
    kl_in: str = field(default="reward", metadata={"help": "reward or loss"})
    beta: float = field(default=0.5, metadata={"help": "reflection bonus"})
    reward_clip: float = 10.0
    whiten_advantages: bool = field(default=True, metadata={
        "help": "whiten GAE advantages over the rollout (grpo / rloo advantages are centred per prompt already)"})
    entropy_coef: float = 0.0
    temperature: float = 0.6
    max_new_tokens: int = 256
    max_grad_norm: float = 1.0
    gen_batch_size: int = 64
    share_prompt: bool = field(default=True, metadata={
        "help": "with n_samples > 1, the update runs each prompt once for its group of responses "
                "(Llama / Qwen2 layouts, one process or DDP; same log-probabilities and gradients, less compute)"})
    bf16: bool = False
    save_every: int = 10
    eval_every: int = field(default=0, metadata={
        "help": "greedy pass@1 on valid_data before the first step, every N steps and after the last; the best "
                "policy (ties: the earlier) is the final one (0: never; the last policy is the final one)"})
    keep_last_z: float = field(default=0.0, metadata={
        "help": "with eval_every: the last policy stays the final one unless the best held-out one beats it on "
                "the same problems by at least this paired z (0: the best is always the final one)"})
    valid_data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:valid", n=200),
                                   metadata={"help": "held-out problems for eval_every (never the test split)"})
    eval_max_new_tokens: int = 256
    max_bad_steps: int = 5
    resume: bool = False
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        check(self.advantage in ADVANTAGES, f"advantage must be one of {list(ADVANTAGES)}, got {self.advantage!r}")
        check(self.critic_init in ("orm", "policy"), f"critic_init must be orm or policy, got {self.critic_init!r}")
        check(self.kl_kind in algos.KL_KINDS, f"kl_kind must be one of {list(algos.KL_KINDS)}, got {self.kl_kind!r}")
        check(self.kl_in in ("reward", "loss"), f"kl_in must be reward or loss, got {self.kl_in!r}")
        check(self.lr_schedule in LR_SCHEDULES,
              f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        for name in ("steps", "rollout_batch", "train_batch", "micro_batch", "ppo_epochs", "n_samples",
                     "max_new_tokens", "save_every"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        total = self.rollout_batch * self.n_samples
        check(self.train_batch <= total, f"train_batch ({self.train_batch}) is larger than the rollout "
              f"batch (rollout_batch × n_samples = {total})")
        check(self.micro_batch <= self.train_batch, f"micro_batch ({self.micro_batch}) is larger than "
              f"train_batch ({self.train_batch})")
        check(self.advantage == "gae" or self.n_samples >= 2,
              f"advantage={self.advantage} needs n_samples >= 2 (a group per state), got {self.n_samples}")
        check(self.temperature > 0, f"temperature must be > 0 for RL sampling, got {self.temperature}")
        check(self.kl_coef >= 0 and self.beta >= 0, "kl_coef and beta must be >= 0")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        for name in ("actor_lr", "critic_lr", "clip", "reward_clip", "max_grad_norm", "gen_batch_size"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check(self.critic_warmup < self.steps, f"critic_warmup ({self.critic_warmup}) must be < steps ({self.steps})")
        check(self.critic_warmup == 0 or self.advantage == "gae",
              f"critic_warmup needs advantage=gae (a critic to warm up), got advantage={self.advantage}")
        for name in ("warmup_steps", "critic_warmup", "value_clip", "entropy_coef", "max_bad_steps", "eval_every",
                     "keep_last_z"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.eval_max_new_tokens > 0, f"eval_max_new_tokens must be > 0, got {self.eval_max_new_tokens}")
        check(not self.eval_every or self.valid_data.path != "testbed:test", "valid_data is used for model "
              "selection and may not be the test split (testbed:test); set valid_data.path (e.g. testbed:valid)")


@dataclass
class State:
    """An initial state: a problem, a response prefix ('' or ending with <|reflect|>), a status."""

    problem: Problem
    prefix: str = ""
    status: int = 0


def load_states(cfg: RLConfig, tokenizer: Any) -> list[State]:
    """The problems (status 0) or, with a restart buffer, every state it holds."""
    if not cfg.restart_buffer:
        return [State(p) for p in load_problems(cfg.data)]
    states = []
    for i, rec in enumerate(read_jsonl(cfg.restart_buffer), 1):
        where = f"{cfg.restart_buffer}:{i}"
        for key in ("id", "question", "answer", "status"):
            if key not in rec:
                raise SatoriError(f"{where}: missing field '{key}'")
        if rec["status"] not in (-1, 0, 1):
            raise SatoriError(f"{where}: field 'status' must be -1, 0 or 1, got {rec['status']!r}")
        prob = Problem(id=str(rec["id"]), question=rec["question"], answer=str(rec["answer"]),
                       meta=dict(rec.get("meta") or {}))
        states.append(State(prob, rec.get("prefix") or "", int(rec["status"])))
    if not states:
        raise SatoriError(f"{cfg.restart_buffer}: no initial states")
    _warn_if_data_unread(cfg, states)
    return states


def _warn_if_data_unread(cfg: RLConfig, states: list[State]) -> None:
    """A restart buffer's states replace ``data``: say so when ``data`` was set to other problems."""
    if cfg.data == RLConfig().data:
        return
    held = {str(s.problem.meta.get("problem_id", s.problem.id)) for s in states}
    try:
        same = {p.id for p in load_problems(cfg.data)} == held
    except SatoriError:
        same = False
    if not same:
        logger.warning(f"data ({cfg.data.path}, n={cfg.data.n}, limit={cfg.data.limit}) is unread: RL samples the "
                       f"{len(states)} states of the restart buffer {cfg.restart_buffer} instead, on its own "
                       f"{len(held)} problems")


def check_context(states: list[State], tokenizer: Any, model: Any, max_new_tokens: int) -> None:
    """Refuse states whose prompt + prefix + generation would not fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    for s in states:
        n = len(tokenizer(build_prompt(s.problem, tokenizer) + s.prefix, add_special_tokens=False)["input_ids"])
        if n + max_new_tokens + 1 > limit:
            raise SatoriError(f"initial state of problem {s.problem.id!r} has {n} prompt tokens; with "
                              f"max_new_tokens={max_new_tokens} it exceeds the context of {limit} tokens")


def step_states(states: list[State], step: int, size: int, seed: int) -> list[State]:
    """The ``size`` initial states of step ``step`` (seeded shuffle per pass over the pool)."""
    out, pos = [], step * size
    n = len(states)
    while len(out) < size:
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        take = min(size - len(out), n - offset)
        out.extend(states[i] for i in order[offset: offset + take])
        pos += take
    return out


def rule_correct(samples: list[Any], states: list[State]) -> torch.Tensor:
    """Whether each sampled continuation earns the correctness reward: the answer of the
    whole trajectory (prefix + continuation) is graded, but a continuation that is truncated,
    empty or only meta-action / special tokens never counts as correct (else a policy
    restarted from a correct prefix would be paid for writing nothing)."""
    full = [st.prefix + s.text for st, s in zip(states, samples)]
    unearned = [s.truncated or is_blank_response(s.text) for s in samples]
    graded = grade_batch(full, [st.problem.answer for st in states], truncated=unearned, last_number_fallback=False)
    return torch.tensor([ok for _, ok in graded], dtype=torch.bool)


def by_length(fn: Any, batch: dict[str, torch.Tensor], micro: int) -> torch.Tensor:
    """``fn(input_ids, attention_mask)`` -> ``[b, width - 1]`` per-token values over the
    right-padded ``batch`` in micro-batches of similar length, each cut to its own longest
    row; returns ``[B, L - 1]`` float32, equal to one full-width pass at every position that
    scores a real token (padding positions are arbitrary, as they are there; the response
    mask excludes them)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=ids.device)
    for idx, width in length_chunks(attn, torch.arange(ids.shape[0], device=ids.device), micro):
        out[idx, : width - 1] = fn(ids[idx, :width], attn[idx, :width]).float()
    return out


def length_chunks(attn: torch.Tensor, rows: torch.Tensor, micro: int) -> list[tuple[torch.Tensor, int]]:
    """``rows`` of a right-padded batch sorted by length and cut into micro-batches of
    ``micro``: ``(row indices, width)`` pairs, ``width`` the longest row of the chunk (its
    columns past that are padding in every row)."""
    lengths = attn[rows].sum(1)
    return _cut(rows[lengths.argsort(stable=True)], attn, micro)


def _cut(order: torch.Tensor, attn: torch.Tensor, micro: int) -> list[tuple[torch.Tensor, int]]:
    """``order`` cut into micro-batches of ``micro`` rows, each with its longest row's length."""
    return [(order[i: i + micro], int(attn[order[i: i + micro]].sum(1).max())) for i in range(0, len(order), micro)]


def prompt_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Prompt length of each row: its first response token sits at column ``prompt_len``,
    scored at ``response_mask`` column ``prompt_len - 1``."""
    return (response_mask > 0).float().argmax(1) + 1


def prompt_chunks(ids: torch.Tensor, attn: torch.Tensor, response_mask: torch.Tensor, rows: torch.Tensor,
                  micro: int) -> list[tuple[torch.Tensor, int]]:
    """Like :func:`length_chunks`, but the rows that share a prompt (the tokens before their
    response) are kept together, by length within a group, so that a micro-batch of a
    group-sampled rollout holds whole groups (:func:`satori.rollout.shared_prompt_logprobs`)."""
    groups: dict[tuple[int, ...], int] = {}
    group = [groups.setdefault(tuple(ids[r, :p].tolist()), len(groups))
             for r, p in zip(rows.tolist(), prompt_lengths(response_mask[rows]).tolist())]
    lengths = attn[rows].sum(1).tolist()
    return _cut(rows[sorted(range(len(group)), key=lambda i: (group[i], lengths[i]))], attn, micro)


def values_of(critic: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position values aligned with ``token_logprobs`` (value of the state before token t+1)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    out = critic(input_ids=ids, attention_mask=attn, position_ids=position_ids)
    return out.logits[:, :-1, 0].float()


def load_critic(path: str) -> Any:
    """A per-token value model: the ORM's (or policy's) backbone with a scalar ``score`` head."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    # no dropout on the value head (transformers defaults it to 0.1): values must be a
    # deterministic function of the sequence, at rollout and at update time alike
    config = AutoConfig.from_pretrained(path, num_labels=1, local_files_only=True)
    config.classifier_dropout = 0.0
    critic = AutoModelForTokenClassification.from_pretrained(path, config=config, local_files_only=True)
    critic.config.use_cache = False
    return critic


def rollout_advantages(adv: torch.Tensor, mask: torch.Tensor, cfg: RLConfig) -> torch.Tensor:
    """The advantages the update uses: GAE advantages whitened over the whole rollout when
    ``whiten_advantages`` (METHOD.md §3); group advantages (grpo, rloo) as they are. Those are
    centred on their prompt's samples already, and centring them again over the rollout's tokens
    would give a prompt whose samples all scored the same a non-zero advantage, its sign set by
    whether the other prompts' wrong answers ran longer."""
    if cfg.whiten_advantages and cfg.advantage == "gae":
        return algos.masked_whiten(adv, mask)
    return adv


def run_rl(cfg: RLConfig) -> dict[str, Any]:
    """Train the policy; writes the final policy (and critic) into ``cfg.out``."""
    for name in ("policy", "out"):
        if not getattr(cfg, name):
            raise SatoriError(f"--{name} is required")
    validate_all(cfg)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    acc = make_accelerator()
    out = Path(cfg.out)
    world, rank = acc.num_processes, acc.process_index
    check(cfg.rollout_batch % world == 0, f"rollout_batch ({cfg.rollout_batch}) must be divisible by the "
          f"number of processes ({world})")
    check(cfg.train_batch % world == 0 and (cfg.train_batch // world) % min(cfg.micro_batch, cfg.train_batch // world)
          == 0, f"train_batch ({cfg.train_batch}) must split evenly over {world} processes and micro_batch")
    tokenizer = load_tokenizer(cfg.policy)
    coat.coat_token_ids(tokenizer)  # the policy must know the meta-actions (format tuning adds them)
    policy = load_model(cfg.policy)
    policy.config.use_cache = False
    states = load_states(cfg, tokenizer)
    check_context(states, tokenizer, policy, cfg.max_new_tokens)

    orm = None
    if cfg.orm:
        from satori.train.orm import check_same_tokenizer, load_orm

        orm, orm_tok = load_orm(cfg.orm)
        check_same_tokenizer(tokenizer, orm_tok, where=f"ORM {cfg.orm} vs policy {cfg.policy}")
        orm.requires_grad_(False)
        orm.to(acc.device)
    critic = None
    if cfg.advantage == "gae":
        init = cfg.orm if cfg.critic_init == "orm" and cfg.orm else cfg.policy
        critic = load_critic(init)
        critic.train()
    ref = None
    if cfg.kl_coef > 0:
        ref = load_model(cfg.policy)
        ref.requires_grad_(False)
        ref.to(acc.device)

    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.actor_lr, weight_decay=0.0)
    updates_per_step = cfg.ppo_epochs * (cfg.rollout_batch * cfg.n_samples // cfg.train_batch)
    sched = make_scheduler(opt, cfg.lr_schedule, (cfg.steps - cfg.critic_warmup) * updates_per_step,
                           cfg.warmup_steps * updates_per_step)
    models: dict[str, Any] = {"policy": policy}
    optims: dict[str, Any] = {"policy_opt": opt, "policy_sched": sched}
    critic_opt = None
    if critic is not None:
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)
        models["critic"] = critic
        optims["critic_opt"] = critic_opt

    start, bad_steps = 0, 0
    best_state: dict[str, Any] = {}
    last_state: dict[str, Any] = {}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, models, optims)
        start, bad_steps, best_state = state["step"], state.get("bad_steps", 0), state.get("best", {})
        last_state = state.get("last", {})
    valid = load_problems(cfg.valid_data) if cfg.eval_every else []
    if cfg.eval_every and not valid:
        raise SatoriError(f"valid_data {cfg.valid_data.path}: no problems")
    policy, opt = acc.prepare(policy, opt)
    if critic is not None:
        critic, critic_opt = acc.prepare(critic, critic_opt)
    log = MetricsLog(out, enabled=acc.is_main_process)
    log.truncate_after(start)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    t0 = time.time()
    result: dict[str, Any] = {}
    best = BestModel(acc, tokenizer, valid, cfg.valid_data, out, max_new_tokens=cfg.eval_max_new_tokens,
                     batch_size=cfg.gen_batch_size, seed=cfg.seed, bf16=cfg.bf16, state=best_state, last=last_state,
                     keep_last_z=cfg.keep_last_z)

    def checkpoint(step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            unwrapped = {"policy": acc.unwrap_model(policy)}
            if critic is not None:
                unwrapped["critic"] = acc.unwrap_model(critic)
            save_checkpoint(out, step, unwrapped, optims,
                            {"bad_steps": bad_steps, "best": best.best, "last": best.last, "config": to_dict(cfg)},
                            tokenizer=tokenizer)
        acc.wait_for_everyone()

    def select(done: int) -> dict[str, float]:
        """Held-out accuracy after step ``done`` when it is due (every ``eval_every`` steps, the last
        step, and the start), with the best step so far; else nothing."""
        if not valid or not due(done, cfg.eval_every, cfg.steps):
            return {}
        return {"valid_acc": best.evaluate(policy, done), "best_step": best.best["step"]}

    if start == 0 and valid:
        log.log(0, select(0))

    on_policy = single_update(cfg, ref is not None)
    share_prompts = shared_prompts_apply(cfg, acc, acc.unwrap_model(policy))
    with StopSignal() as stop:
        for step in range(start, cfg.steps):
            # ---- 1. initial states of this step; this process's share
            per_proc = cfg.rollout_batch // world
            chosen = step_states(states, step, cfg.rollout_batch, cfg.seed)[rank * per_proc:(rank + 1) * per_proc]
            prompts = [build_prompt(s.problem, tokenizer) + s.prefix for s in chosen]

            # ---- 2. rollout
            t_step = time.perf_counter()
            unwrapped_policy = acc.unwrap_model(policy)
            unwrapped_policy.config.use_cache = True
            samples = generate(unwrapped_policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, n=cfg.n_samples, batch_size=cfg.gen_batch_size,
                               seed=cfg.seed * 100_003 + step, prompt_offset=rank * per_proc)
            unwrapped_policy.config.use_cache = False
            unwrapped_policy.train()
            t_generated = time.perf_counter()

            # ---- 3. reward
            sstate = [chosen[s.index] for s in samples]
            correct = rule_correct(samples, sstate)
            orm_scores = None
            if orm is not None:
                from satori.train.orm import score_sequences

                orm_scores = score_sequences(orm, tokenizer, [build_prompt(st.problem, tokenizer) for st in sstate],
                                             [st.prefix + s.text for st, s in zip(sstate, samples)],
                                             batch_size=cfg.gen_batch_size).float()
            status = torch.tensor([st.status for st in sstate], dtype=torch.long)
            parts = algos.satori_reward(correct, orm_scores, status, beta=cfg.beta, use_orm=orm is not None)
            nonfinite = (~torch.isfinite(parts["total"])).sum().float().to(acc.device)
            if float(acc.reduce(nonfinite, reduction="sum")) > 0:  # every process skips the same steps
                bad_steps = skip_bad_step(step + 1, bad_steps, cfg.max_bad_steps, "reward", log, out,
                                          orm_scores=str(None if orm_scores is None else orm_scores.tolist()[:8]))
                if selected := select(step + 1):
                    log.log(step + 1, selected)
                end_of_step(step + 1, cfg.steps, cfg.save_every, stop, checkpoint, log, out)
                continue

            # ---- pack sequences, old log-probs, reference log-probs, values
            batch = pack_sequences([s.prompt_ids for s in samples],
                                   [s.scored_ids(eos_id) for s in samples],
                                   pad_id=pad_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            mask = batch["response_mask"]
            with torch.no_grad(), autocast(cfg.bf16):
                # one epoch over one mini-batch: the update's own log-probabilities *are* the old
                # ones (ratio 1), so the separate pass is skipped unless a KL reward needs them
                def logps(model: Any) -> Any:
                    return lambda ids, attn: token_logprobs(model, ids, attn, temperature=cfg.temperature)["logp"]
                old_logp = None if on_policy else by_length(logps(policy), batch, cfg.micro_batch)
                ref_logp = by_length(logps(ref), batch, cfg.micro_batch) if ref is not None else None
                old_values = (by_length(lambda ids, attn: values_of(critic, {"input_ids": ids, "attention_mask": attn}),
                                        batch, cfg.micro_batch) if critic is not None else None)
            kl_reward = cfg.kl_coef if cfg.kl_in == "reward" else 0.0
            token_r = algos.token_rewards(parts["total"].to(acc.device), mask, old_logp, ref_logp,
                                          kl_coef=kl_reward if ref is not None else 0.0, kl_kind=cfg.kl_kind,
                                          clip=cfg.reward_clip)

            # ---- 4. advantages
            if cfg.advantage == "gae":
                adv, returns = algos.gae(token_r, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
            else:
                seq_r = algos.masked_sum(token_r, mask, dim=1)
                fn = algos.grpo_advantages if cfg.advantage == "grpo" else algos.rloo_advantages
                adv = fn(seq_r, cfg.n_samples).unsqueeze(1) * mask
                returns = None
            # every process gets the whole rollout, so mini-batches are the same as in one process
            rollout = _gather_rollout(acc, {**batch, "old_logp": old_logp, "ref_logp": ref_logp,
                                            "old_values": old_values, "adv": adv, "returns": returns}, pad_id)
            rollout["adv"] = rollout_advantages(rollout["adv"], rollout["response_mask"], cfg)

            # ---- 5. PPO update
            t_scored = time.perf_counter()
            # critic warm-up: the first steps fit the critic to the frozen policy's returns
            stats = _ppo_update(cfg, acc, policy, critic, opt, critic_opt, sched, rollout, step,
                                train_policy=step >= cfg.critic_warmup, share_prompt=share_prompts)
            if stats is None:
                bad_steps = skip_bad_step(step + 1, bad_steps, cfg.max_bad_steps, "losses or gradients", log, out)
                if selected := select(step + 1):
                    log.log(step + 1, selected)
                end_of_step(step + 1, cfg.steps, cfg.save_every, stop, checkpoint, log, out)
                continue

            # ---- 6. metrics, checkpoints
            beh = [coat.behaviour(s.text) for s in samples]
            sums = {
                "reward": parts["total"], "reward_rule": parts["rule"], "reward_orm": parts["orm"],
                "reward_bonus": parts["bonus"], "accuracy": correct.float(),
                "response_length": torch.tensor([float(len(s.response_ids)) for s in samples]),
                "truncated": torch.tensor([float(s.truncated) for s in samples]),
                "reflect_rate": torch.tensor([float(b["reflects"]) for b in beh]),
                "explore_rate": torch.tensor([float(b["explores"]) for b in beh]),
            }
            metrics = _global_means(acc, {k: (v.float().sum(), len(samples)) for k, v in sums.items()})
            for st_val, name in ((-1, "accuracy_from_wrong"), (1, "accuracy_from_correct"), (0, "accuracy_from_start")):
                sel = status == st_val
                metrics.update(_global_means(acc, {name: (correct[sel].float().sum(), int(sel.sum()))}))
            if ref_logp is not None and old_logp is not None:
                metrics.update(_global_means(acc, {"kl": ((old_logp - ref_logp).mul(mask).sum(), float(mask.sum()))}))
            metrics.update(stats)
            now = time.perf_counter()
            metrics.update(lr=sched.get_last_lr()[0], elapsed=time.time() - t0, time_generate=t_generated - t_step,
                           time_score=t_scored - t_generated, time_update=now - t_scored,
                           response_tokens=float(sum(len(s.response_ids) for s in samples)))
            done = step + 1
            metrics.update(select(done))
            log.log(done, metrics)
            result = metrics
            end_of_step(done, cfg.steps, cfg.save_every, stop, checkpoint, log, out)
    log.close()
    acc.wait_for_everyone()
    if best.best and not best.keeps_last():  # the best held-out policy is the final one
        best.install()
    else:
        save_final_model(acc, policy, out, tokenizer)
    result = {**result, **(best.summary() if best.best else {"final": f"last step ({cfg.steps})"})}
    if critic is not None:
        save_final_model(acc, critic, out / "critic")
    if acc.is_main_process:
        write_json(out / "rl_result.json", {"config": to_dict(cfg), "last_step": result,
                                             "seconds": round(time.time() - t0, 2), "bad_steps": bad_steps})
    acc.wait_for_everyone()
    return result


def shared_prompts_apply(cfg: RLConfig, acc: Any, model: Any) -> bool:
    """Whether the update runs each prompt once for its group (``cfg.share_prompt``): only with
    groups (``n_samples > 1``), a supported layout, and one process or plain DDP. DeepSpeed
    and FSDP shard the parameters and gather them in the wrapper's own forward, which the
    shared pass does not call, so they keep the plain pass."""
    from accelerate.utils import DistributedType

    sharded = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    return cfg.share_prompt and cfg.n_samples > 1 and not sharded and shared_prompt_supported(model)


def single_update(cfg: RLConfig, has_ref: bool) -> bool:
    """True when each rollout is used for exactly one optimizer step and no KL reward needs
    the rollout's log-probabilities: they then equal the update's own (no separate pass)."""
    return (cfg.ppo_epochs == 1 and cfg.train_batch == cfg.rollout_batch * cfg.n_samples
            and (not has_ref or cfg.kl_in == "loss"))


def _gather_rollout(acc: Any, tensors: dict[str, torch.Tensor | None], pad_id: int) -> dict[str, Any]:
    """Concatenate every process's rollout tensors in rank order (padded to a common length)."""
    if acc.num_processes == 1:
        return dict(tensors)
    out: dict[str, Any] = {}
    for key, t in tensors.items():
        if t is None:
            out[key] = None
            continue
        pad = pad_id if key == "input_ids" else 0
        t = acc.pad_across_processes(t.contiguous(), dim=1, pad_index=pad) if t.dim() > 1 else t
        out[key] = acc.gather(t.contiguous())
    return out


def _ppo_update(cfg: RLConfig, acc: Any, policy: Any, critic: Any, opt: Any, critic_opt: Any, sched: Any,
                rollout: dict[str, Any], step: int, train_policy: bool = True,
                share_prompt: bool = False) -> dict[str, float] | None:
    """``ppo_epochs`` passes of clipped-surrogate updates over shuffled mini-batches.

    ``rollout`` holds the whole global rollout on every process. A mini-batch is
    ``train_batch`` sequences of a seeded global shuffle; each process takes its
    ``train_batch / processes`` share and micro-batches it. Each loss is a token mean over
    the mini-batch's token count, so micro-batching and the number of processes do not
    change the update. Returns the averaged statistics, or None when a loss or gradient was
    not finite (that mini-batch is not applied).

    ``share_prompt``: micro-batches hold whole groups of rows with the same prompt, and the
    policy runs each prompt once (:func:`satori.rollout.shared_prompt_logprobs`). That pass
    calls the model's layers, not the DDP wrapper, so with several processes the policy's
    gradients are averaged here, once per mini-batch, instead of by DDP.
    """
    world, rank = acc.num_processes, acc.process_index
    mask = rollout["response_mask"]
    n_global = mask.shape[0]
    mb_local = cfg.train_batch // world
    micro = min(cfg.micro_batch, mb_local)
    totals: dict[str, float] = {}
    count = 0
    g = torch.Generator().manual_seed(cfg.seed * 31 + step)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n_global, generator=g)
        for mb_start in range(0, n_global - cfg.train_batch + 1, cfg.train_batch):
            mb_all = order[mb_start: mb_start + cfg.train_batch]
            mb_tokens = mask[mb_all].sum().clamp(min=1)
            mb = mb_all[rank * mb_local: (rank + 1) * mb_local]
            mb_stats: dict[str, float] = {}
            # batching by length: micro-batches of similar lengths, each cut to its own longest
            # row (rows are right-padded), so no micro-batch pays for the rollout's longest one
            chunks = (prompt_chunks(rollout["input_ids"], rollout["attention_mask"], mask, mb, micro)
                      if share_prompt else length_chunks(rollout["attention_mask"], mb, micro))
            for n_chunk, (idx, width) in enumerate(chunks):
                ids, attn = rollout["input_ids"][idx, :width], rollout["attention_mask"][idx, :width]
                m = mask[idx, :width - 1]
                share = float(m.sum() / mb_tokens)  # this micro-batch's share of the mini-batch's tokens
                last = n_chunk == len(chunks) - 1
                if train_policy:
                    _policy_micro_step(cfg, acc, policy, rollout, ids, attn, idx, m, share, last, mb_stats,
                                       share_prompt)
                if critic is not None:
                    with (nullcontext() if last else acc.no_sync(critic)), autocast(cfg.bf16):
                        values = values_of(critic, {"input_ids": ids, "attention_mask": attn})
                        vl, vst = algos.value_loss(values, rollout["old_values"][idx, :width - 1],
                                                   rollout["returns"][idx, :width - 1], m,
                                                   clip_eps=cfg.value_clip if cfg.value_clip > 0 else None)
                        acc.backward(vl * share * world)
                    _add(mb_stats, "value_loss", float(vl.detach()) * share)
                    _add(mb_stats, "value_clipfrac", float(vst["clipfrac"]) * share)
            if train_policy and share_prompt and world > 1:
                _average_gradients(acc, policy)
            finite = all(math.isfinite(v) for v in mb_stats.values()) and (
                not train_policy or grads_finite(policy)) and (critic is None or grads_finite(critic))
            if not finite:
                opt.zero_grad(set_to_none=True)
                if critic_opt is not None:
                    critic_opt.zero_grad(set_to_none=True)
                return None
            # per-process partial sums of token-weighted statistics -> mini-batch values
            mb_stats = {k: float(acc.reduce(torch.tensor(v, device=acc.device), reduction="sum"))
                        for k, v in mb_stats.items()}
            if train_policy:
                mb_stats["grad_norm"] = float(acc.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if critic is not None:
                acc.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                critic_opt.step()
                critic_opt.zero_grad(set_to_none=True)
            if count == 0 and train_policy:
                mb_stats["first_policy_loss"] = mb_stats["policy_loss"]
            for k, v in mb_stats.items():
                _add(totals, k, v)
            count += 1
    return {k: (v if k == "first_policy_loss" else v / max(1, count)) for k, v in totals.items()}


def _policy_micro_step(cfg: RLConfig, acc: Any, policy: Any, rollout: dict[str, Any], ids: torch.Tensor,
                       attn: torch.Tensor, idx: torch.Tensor, m: torch.Tensor, share: float, last: bool,
                       stats: dict[str, float], share_prompt: bool = False) -> None:
    """Forward and backward of the policy loss on one micro-batch (``ids`` / ``attn``: the
    rollout's rows ``idx`` cut to their longest, response mask ``m``) holding ``share`` of the
    mini-batch's tokens; token-weighted statistics go into ``stats``. Gradients are
    synchronised by DDP only on the ``last`` micro-batch (never with ``share_prompt``: the
    caller averages them).
    """
    width = ids.shape[1]
    kw = dict(temperature=cfg.temperature, return_entropy=True, entropy_grad=cfg.entropy_coef > 0)
    with (nullcontext() if last and not share_prompt else acc.no_sync(policy)), autocast(cfg.bf16):
        if share_prompt:
            out = shared_prompt_logprobs(acc.unwrap_model(policy), ids, attn, prompt_lengths(m).tolist(), **kw)
        else:
            out = token_logprobs(policy, ids, attn, **kw)
        logp = out["logp"].float()
        old = logp.detach() if rollout["old_logp"] is None else rollout["old_logp"][idx, :width - 1]
        pg, st = algos.policy_loss(logp, old, rollout["adv"][idx, :width - 1], m, clip_eps=cfg.clip)
        loss = pg
        if rollout["ref_logp"] is not None and cfg.kl_in == "loss":
            kl = algos.masked_mean(algos.kl_penalty(logp, rollout["ref_logp"][idx, :width - 1], cfg.kl_kind), m)
            loss = loss + cfg.kl_coef * kl
            _add(stats, "kl_loss", float(kl.detach()) * share)
        ent = algos.masked_mean(out["entropy"].float(), m)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent
        acc.backward(loss * share * acc.num_processes)  # DDP averages gradients over processes
    _add(stats, "policy_loss", float(pg.detach()) * share)
    _add(stats, "clipfrac", float(st["clipfrac"]) * share)
    _add(stats, "approx_kl", float(st["approx_kl"]) * share)
    _add(stats, "entropy", float(ent.detach()) * share)


def _average_gradients(acc: Any, model: Any) -> None:
    """Average ``model``'s gradients over the processes (what DDP does after a backward)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.copy_(acc.reduce(p.grad, reduction="mean"))


def _global_means(acc: Any, parts: dict[str, tuple[torch.Tensor, float]]) -> dict[str, float]:
    """Means over all processes from per-process (sum, count); keys with no data are left out."""
    out = {}
    for key, (total, n) in parts.items():
        pair = torch.tensor([float(total), float(n)], device=acc.device)
        pair = acc.reduce(pair, reduction="sum")
        if pair[1] > 0:
            out[key] = float(pair[0] / pair[1])
    return out


def _add(d: dict[str, float], key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value

"""``satori latro``: LaTRO, latent reasoning optimisation by self-rewarding (METHOD.md §4).

The rationale z is a latent variable between a question x and its gold answer y. The model
samples K rationales per question; each is rewarded with the model's own log-likelihood of
the gold answer after it, minus a KL penalty to the frozen initial model π0:

    r_k = log πθ(y | x⊕z_k) − β · (log πθ(z_k|x) − log π0(z_k|x)),
    A_k = r_k − mean_{j≠k} r_j                       (leave-one-out baseline),
    ∇J ≈ mean_k [ A_k ∇log πθ(z_k|x) + λ ∇log πθ(y | x⊕z_k) ].

The loop, top to bottom (:func:`run_latro`):

1. each step takes the next ``batch_size`` questions of a seeded per-epoch shuffle; with
   several processes each takes its share;
2. K rationales per question are sampled from the current policy at ``temperature``;
   each is cut (:func:`cut_rationale`) at the first end-of-sequence token, or just *before*
   the first answer cue ("The answer is", "\\boxed"), or after ``max_rationale_tokens``
   tokens (then it is *truncated* and gets the penalised reward of
   :func:`satori.algos.latro_rewards`);
3. the gold answer is appended through ``answer_template`` (the template's tokens are y),
   after ``answer_separator`` when the rationale does not end in whitespace (see
   :func:`make_rollouts`);
4. one policy forward pass per x⊕z⊕y sequence gives both sums, log πθ(z|x) (at the
   sampling temperature, the distribution z was drawn from) and log πθ(y|x⊕z) (at
   temperature 1, summed, not length-normalised); one no-grad pass of π0 gives log π0(z|x);
   micro-batches hold whole questions, so rewards and leave-one-out advantages are computed
   from that same pass;
5. loss = :func:`satori.algos.latro_loss`, scaled so that the gradient is the mean over the
   *global* batch whatever the number of processes or micro-batches; AdamW, linear decay,
   gradient clipping; NaN/inf steps are skipped (and counted);
6. greedy accuracy on held-out problems (``valid_data``, never the test split) before
   training and every ``eval_every`` steps; the best of these models (ties: the earlier) is
   the final model written to ``out``; atomic checkpoints every ``save_every`` steps and on
   SIGTERM; ``resume: true`` continues so that the final weights equal an uninterrupted run
   (sampling seeds are a function of the seed and the step, not of the RNG history).

Default ``sft_weight`` λ = 0, as in the LaTRO release. The λ term trains the model to write
the gold answer after *every* sampled rationale, including the ones that argue for another
answer; that teaches answers that do not follow from the reasoning, which the
self-reward then cannot see (it already rewards rationales that make the gold answer
likely). λ = 1 gives the full gradient of J and is available as an option.

Testbed defaults (a ~3M-parameter model): K = 8, L = 128, lr 2e-5. On a candidate testbed
base, 60 steps of 8 questions raised the held-out mean log πθ(y|x⊕z) from -14.8 to -14.0 with
KL(πθ||π0) on the rationales at 0.3 nats; lr 1e-4 reached -13.5 but drifted 3.3 nats from π0.
For a 7B model the release used lr 5e-7, K = 16, ``max_rationale_tokens`` 500.

Questions per step matter more than the learning rate suggests: the gradient of one
question's K rationales is noisy, and Adam moves every weight by about ``lr`` per step
whatever the noise. From the testbed base (held-out greedy accuracy 0.55), 8 questions per
step at lr 5e-5 drifted (0.40 after 10 steps, the answer log-likelihood flat, KL to π0 near
1 nat); 32 questions per step at lr 1e-5 reached 0.59 at steps 20, 40 and 60 (test 0.46 →
0.49). The full preset uses the latter.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from satori.algos import latro_loss, latro_rewards, masked_sum, rloo_advantages
from satori.config import check, to_dict, validate_all
from satori.data import DataConfig, Problem, build_prompt, load_problems
from satori.errors import SatoriError
from satori.rollout import Sample, eos_ids, generate, load_model, load_tokenizer
from satori.train.common import (
    end_of_step,
    skip_bad_step,
    MetricsLog,
    StopSignal,
    autocast,
    grads_finite,
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    make_scheduler,
    save_checkpoint,
    save_final_model,
)
from satori.train.select import BestModel, due
from satori.train.sft import global_batch
from satori.utils import seed_everything, set_threads, write_json

#: Gold answer appended after a maths rationale (the testbed's own answer line).
MATH_ANSWER_TEMPLATE = "The answer is \\boxed{{{answer}}}."
#: Gold answer appended after a multiple-choice rationale (ARC: the label).
CHOICE_ANSWER_TEMPLATE = "The answer is {answer}."


@dataclass
class LatroConfig:
    """``satori latro``: train a model with LaTRO on questions with gold answers."""

    __aliases__: ClassVar[dict[str, str]] = {"data": "data.path", "valid_data": "valid_data.path"}

    model: str = field(default="", metadata={"help": "local model folder to start from (also the reference π0)"})
    out: str = field(default="", metadata={"help": "output folder (model, checkpoints, metrics)"})
    data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:train", n=2000))
    valid_data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:valid", n=200))
    k: int = field(default=8, metadata={"help": "rationales sampled per question"})
    beta: float = field(default=0.05, metadata={"help": "weight of the KL penalty to the initial model"})
    sft_weight: float = field(default=0.0, metadata={"help": "weight λ of the answer-likelihood gradient term"})
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    steps: int = 100
    batch_size: int = field(default=8, metadata={"help": "questions per optimizer step (all processes)"})
    micro_batch: int = field(default=2, metadata={"help": "questions per forward/backward micro-batch"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rationales"})
    max_rationale_tokens: int = field(default=128, metadata={"help": "L: longer rationales are truncated"})
    answer_cues: list[str] = field(default_factory=lambda: ["The answer is", "\\boxed"],
                                   metadata={"help": "a rationale is cut just before the first of these"})
    answer_template: str = field(default="", metadata={
        "help": "text of y with an {answer} field (default: 'The answer is \\boxed{{{answer}}}.', "
                "or 'The answer is {answer}.' for multiple choice)"})
    answer_separator: str = field(default="\n", metadata={
        "help": "put before y when the rationale does not end in whitespace (stopped by EOS or length, or cut "
                "before a token in which a cue starts), so that x⊕z⊕y is text the model could write"})
    truncation_penalty: float = field(default=1.0, metadata={"help": "truncated: group's min reward minus this"})
    answer_floor: float = field(default=float("-inf"), metadata={
        "help": "answer log-likelihoods below this count as this (-inf: none, as in the paper; see "
                "satori.algos.latro_rewards)"})
    max_grad_norm: float = 1.0
    gen_batch_size: int = field(default=64, metadata={"help": "sequences per generation batch"})
    eval_every: int = field(default=25, metadata={"help": "held-out greedy accuracy every N steps (0: never)"})
    eval_max_new_tokens: int = 256
    save_every: int = 25
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many NaN/inf steps"})
    resume: bool = False
    seed: int = 0
    bf16: bool = False
    threads: int = 0

    def validate(self) -> None:
        check(self.k >= 2, f"k must be >= 2 (the leave-one-out baseline needs two samples), got {self.k}")
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        check(self.sft_weight >= 0, f"sft_weight must be >= 0, got {self.sft_weight}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.steps > 0, f"steps must be > 0, got {self.steps}")
        check(self.batch_size > 0 and self.micro_batch > 0, "batch_size and micro_batch must be > 0")
        check(self.micro_batch <= self.batch_size, f"micro_batch ({self.micro_batch}) is larger than "
              f"batch_size ({self.batch_size})")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.gen_batch_size > 0, f"gen_batch_size must be > 0, got {self.gen_batch_size}")
        check(self.eval_max_new_tokens > 0, f"eval_max_new_tokens must be > 0, got {self.eval_max_new_tokens}")
        check(self.max_bad_steps >= 0, f"max_bad_steps must be >= 0, got {self.max_bad_steps}")
        check(self.temperature > 0, f"temperature must be > 0 (rationales are sampled), got {self.temperature}")
        check(self.max_rationale_tokens > 0, f"max_rationale_tokens must be > 0, got {self.max_rationale_tokens}")
        check(all(c for c in self.answer_cues), "answer_cues may not contain an empty string")
        check(self.truncation_penalty >= 0, f"truncation_penalty must be >= 0, got {self.truncation_penalty}")
        check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        check(self.eval_every >= 0 and self.save_every > 0, "eval_every must be >= 0 and save_every > 0")
        # a nested section given in part starts from DataConfig's defaults (path testbed:test)
        check(self.data.path != "testbed:test", "data may not be the test split (testbed:test); "
              "set data.path (e.g. testbed:train)")
        check(self.valid_data.path != "testbed:test", "valid_data is used for model selection and may not be "
              "the test split (testbed:test); set valid_data.path (e.g. testbed:valid)")
        if self.answer_template:
            try:
                text = self.answer_template.format(answer="ANSWER")
            except (KeyError, IndexError, ValueError) as e:
                raise SatoriError(f"answer_template {self.answer_template!r} is not a valid template "
                                  f"with an {{answer}} field ({e})") from None
            check("ANSWER" in text, f"answer_template {self.answer_template!r} has no {{answer}} field")


# --------------------------------------------------------------------------- rationales


@dataclass
class Rollout:
    """One sampled rationale with the gold answer appended: the sequence x⊕z⊕y."""

    prompt_ids: list[int]
    rationale_ids: list[int]
    answer_ids: list[int]
    truncated: bool  # z hit max_rationale_tokens without a stop
    stop: str  # "eos", "cue" or "length"


def cut_rationale(token_ids: Sequence[int], pieces: Sequence[str], eos: set[int] | Sequence[int],
                  cues: Sequence[str], max_tokens: int) -> tuple[int, str]:
    """Where a sampled response's rationale ends: ``(n_tokens, stop)``.

    ``pieces[i]`` is the decoded text of ``token_ids[i]``. The rationale is
    ``token_ids[:n_tokens]``, ending before the first end-of-sequence token (``"eos"``) or
    before the token in which the first answer cue starts (``"cue"``), whichever comes
    first, provided it starts within the first ``max_tokens + 1`` tokens (so the rationale
    has at most ``max_tokens`` tokens); otherwise the rationale is the first ``max_tokens``
    tokens (``"length"``: truncated). Cues are searched in the text before the first EOS.
    """
    if len(pieces) != len(token_ids):
        raise SatoriError(f"cut_rationale: {len(token_ids)} tokens but {len(pieces)} pieces")
    eos = set(eos)
    eos_at = next((i for i, t in enumerate(token_ids) if t in eos), None)
    end = len(token_ids) if eos_at is None else eos_at
    starts, text = [], []
    pos = 0
    for piece in pieces[:end]:
        starts.append(pos)
        text.append(piece)
        pos += len(piece)
    joined = "".join(text)
    found = [joined.find(c) for c in cues]
    found = [f for f in found if f >= 0]
    cue_at = bisect.bisect_right(starts, min(found)) - 1 if found else None
    if cue_at is not None and cue_at <= max_tokens:
        return cue_at, "cue"  # a cue before any EOS (end >= cue token)
    if eos_at is not None and eos_at <= max_tokens:
        return eos_at, "eos"
    return min(max_tokens, len(token_ids)), "length"


def answer_text(problem: Problem, template: str = "") -> str:
    """The text of y: the gold answer in ``template`` (default by problem type)."""
    if not template:
        template = CHOICE_ANSWER_TEMPLATE if problem.meta.get("choices") else MATH_ANSWER_TEMPLATE
    return template.format(answer=problem.answer)


def cue_slack(tokenizer: Any, cues: Sequence[str]) -> int:
    """Extra tokens to sample past ``L`` so that a cue starting at token ``L`` is seen whole."""
    return max((len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in cues), default=0) + 1


def make_rollouts(samples: Sequence[Sample], answer_ids: Sequence[Sequence[int]], tokenizer: Any,
                  eos: Sequence[int], cues: Sequence[str], max_tokens: int,
                  separated_ids: Sequence[Sequence[int]] | None = None) -> list[Rollout]:
    """Cut each sampled response into a rationale and append its question's answer tokens:
    ``answer_ids[sample.index]`` after a rationale that is empty or ends in whitespace (cut at a
    cue that starts a line), else ``separated_ids[sample.index]`` (y after the separator; by
    default the same tokens). Without it, a rationale stopped mid-line, or cut before a token
    such as `` $\\`` in which the cue ``\\boxed`` starts, would be scored as
    ``"...the answer isThe answer is \\boxed{7}."``, a string the model never writes."""
    separated_ids = answer_ids if separated_ids is None else separated_ids
    out = []
    for s in samples:
        raw = s.scored_ids(eos[0])
        pieces = tokenizer.batch_decode([[t] for t in raw], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
        n, stop = cut_rationale(raw, pieces, eos, cues, max_tokens)
        text = "".join(pieces[:n])
        y = answer_ids if not text or text[-1].isspace() else separated_ids
        out.append(Rollout(list(s.prompt_ids), raw[:n], list(y[s.index]), stop == "length", stop))
    return out


# --------------------------------------------------------------------------- scoring


def build_batch(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``x⊕z⊕y`` rows with ``z_mask`` / ``y_mask`` aligned with next-token
    log-probs (position ``t`` scores token ``t + 1``)."""
    width = max(len(r.prompt_ids) + len(r.rationale_ids) + len(r.answer_ids) for r in rollouts)
    n = len(rollouts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    z_mask = torch.zeros((n, width - 1))
    y_mask = torch.zeros((n, width - 1))
    for b, r in enumerate(rollouts):
        p, z, y = len(r.prompt_ids), len(r.rationale_ids), len(r.answer_ids)
        if p == 0:
            raise SatoriError("a rollout has an empty prompt")
        ids[b, : p + z + y] = torch.tensor(r.prompt_ids + r.rationale_ids + r.answer_ids, dtype=torch.long)
        attn[b, : p + z + y] = 1
        z_mask[b, p - 1: p - 1 + z] = 1.0
        y_mask[b, p - 1 + z: p - 1 + z + y] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "z_mask": z_mask, "y_mask": y_mask}


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                   bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: ``(log π(z|x), log π(y|x⊕z))`` per row, sums over the masked tokens.

    The rationale is scored at ``temperature`` (the distribution it was sampled from), the
    answer at temperature 1 (the model's likelihood of the gold answer).
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    with autocast(bf16):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    logp_t = logp if temperature == 1.0 else picked / temperature - torch.logsumexp(logits / temperature, dim=-1)
    return masked_sum(logp_t, batch["z_mask"], dim=1), masked_sum(logp, batch["y_mask"], dim=1)


def group_loss(model: Any, ref_model: Any, rollouts: Sequence[Rollout], k: int, pad_id: int, *, beta: float,
               sft_weight: float, truncation_penalty: float, temperature: float = 1.0,
               bf16: bool = False, answer_floor: float = float("-inf")) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LaTRO loss of whole questions: ``rollouts`` holds groups of ``k`` consecutive
    rationales of the same question. One policy pass (with grad) and one π0 pass (no grad).

    Returns the loss (mean over the rollouts) and detached per-rollout stats: ``reward``,
    ``advantage``, ``kl`` (log πθ(z|x) − log π0(z|x)), ``answer_logp``, ``rationale_logp``.
    """
    if len(rollouts) % k:
        raise SatoriError(f"{len(rollouts)} rollouts cannot be split into groups of k={k}")
    device = next(model.parameters()).device
    batch = {name: t.to(device) for name, t in build_batch(rollouts, pad_id).items()}
    z_logp, y_logp = sequence_logps(model, batch, temperature, bf16)
    with torch.no_grad():
        ref_z_logp, _ = sequence_logps(ref_model, batch, temperature, bf16)
    truncated = torch.tensor([r.truncated for r in rollouts], device=device)
    rewards = latro_rewards(y_logp.view(-1, k), z_logp.view(-1, k), ref_z_logp.view(-1, k), beta,
                            truncated.view(-1, k), truncation_penalty, answer_floor)
    advantages = rloo_advantages(rewards.reshape(-1), k).view(-1, k)
    loss = latro_loss(z_logp.view(-1, k), y_logp.view(-1, k), advantages, sft_weight)
    stats = {"reward": rewards.reshape(-1), "advantage": advantages.reshape(-1),
             "kl": (z_logp - ref_z_logp).detach(), "answer_logp": y_logp.detach(),
             "rationale_logp": z_logp.detach()}
    return loss, stats


# --------------------------------------------------------------------------- the loop


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of one step (independent of RNG history, so a resumed run samples
    what the uninterrupted one did; with ``prompt_offset`` the samples do not depend on the
    number of processes either)."""
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


def run_latro(cfg: LatroConfig) -> dict[str, Any]:
    """Train with LaTRO; returns the run's summary. Writes the final model + tokenizer to ``cfg.out``."""
    for name in ("model", "out"):
        if not getattr(cfg, name):
            raise SatoriError(f"--{name} is required")
    validate_all(cfg)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    acc = make_accelerator()
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise SatoriError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    share = cfg.batch_size // world
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    ref_model = load_model(cfg.model)  # π0: always the initial model, also when resuming
    ref_model.requires_grad_(False)
    problems = load_problems(cfg.data)
    if not problems:
        raise SatoriError(f"{cfg.data.path}: no training problems")
    valid = load_problems(cfg.valid_data) if cfg.eval_every else []
    prompts = [build_prompt(p, tokenizer) for p in problems]
    answers, separated = ([tokenizer(sep + answer_text(p, cfg.answer_template), add_special_tokens=False)["input_ids"]
                           for p in problems] for sep in ("", cfg.answer_separator))
    stop_ids = eos_ids(model, tokenizer)
    new_tokens = cfg.max_rationale_tokens + cue_slack(tokenizer, cfg.answer_cues)
    pad_id = tokenizer.pad_token_id

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, "linear", cfg.steps, cfg.warmup_steps)
    start, bad_steps = 0, 0
    best_state: dict[str, Any] = {}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"model": model}, {"optimizer": optimizer, "scheduler": scheduler})
        start, bad_steps, best_state = state["step"], state.get("bad_steps", 0), state.get("best", {})
    model, optimizer = acc.prepare(model, optimizer)
    ref_model.to(acc.device)
    log = MetricsLog(out, enabled=acc.is_main_process)
    log.truncate_after(start)
    result: dict[str, Any] = {"steps": cfg.steps, "train_problems": len(problems), "valid_problems": len(valid)}
    t0 = time.time()
    best = BestModel(acc, tokenizer, valid, cfg.valid_data, out, max_new_tokens=cfg.eval_max_new_tokens,
                     batch_size=cfg.gen_batch_size, seed=cfg.seed, bf16=cfg.bf16, state=best_state)

    def checkpoint(step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(out, step, {"model": acc.unwrap_model(model)},
                            {"optimizer": optimizer, "scheduler": scheduler},
                            {"bad_steps": bad_steps, "best": best.best, "config": to_dict(cfg)}, tokenizer=tokenizer)
        acc.wait_for_everyone()

    if valid and start == 0:
        result["initial_valid_acc"] = best.evaluate(model, 0)
        log.log(0, {"valid_acc": result["initial_valid_acc"]})

    with StopSignal() as stop:
        for step in range(start, cfg.steps):
            # 1-3. this process's questions; K rationales each; cut; gold answer appended
            t_step = time.time()
            chosen = global_batch(len(problems), cfg.seed, step, cfg.batch_size)[rank * share:(rank + 1) * share]
            with autocast(cfg.bf16):
                samples = generate(acc.unwrap_model(model), tokenizer, [prompts[i] for i in chosen],
                                   max_new_tokens=new_tokens, temperature=cfg.temperature, n=cfg.k,
                                   batch_size=cfg.gen_batch_size, seed=step_seed(cfg.seed, step),
                                   prompt_offset=rank * share)
            rollouts = make_rollouts(samples, [answers[i] for i in chosen], tokenizer, stop_ids,
                                     cfg.answer_cues, cfg.max_rationale_tokens, [separated[i] for i in chosen])
            t_sample = time.time() - t_step
            # 4-5. one policy pass per sequence; loss scaled to the mean over the global batch
            loss_sum = 0.0
            stats: list[torch.Tensor] = []
            n_micro = math.ceil(share / cfg.micro_batch)
            for m in range(n_micro):
                group = rollouts[m * cfg.micro_batch * cfg.k:(m + 1) * cfg.micro_batch * cfg.k]
                n_questions = len(group) // cfg.k
                sync = acc.no_sync(model) if m < n_micro - 1 else nullcontext()
                with sync:
                    loss, st = group_loss(model, ref_model, group, cfg.k, pad_id, beta=cfg.beta,
                                          sft_weight=cfg.sft_weight, truncation_penalty=cfg.truncation_penalty,
                                          temperature=cfg.temperature, bf16=cfg.bf16,
                                          answer_floor=cfg.answer_floor)
                    loss = loss * (n_questions / cfg.batch_size)
                    acc.backward(loss * world)  # DDP averages over processes
                loss_sum += float(loss.detach())
                stats.append(torch.stack([st["reward"], st["kl"], st["answer_logp"]], dim=1))
            local = torch.cat(stats).float()
            shape = torch.tensor([[len(r.rationale_ids), float(not r.truncated), float(r.stop == "cue")]
                                  for r in rollouts])
            every = acc.gather(torch.cat([local, shape], dim=1).to(acc.device)).cpu()
            loss_total = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="sum"))
            if not math.isfinite(loss_total) or not bool(torch.isfinite(every).all()) or not grads_finite(model):
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                what = ("rewards" if not bool(torch.isfinite(every).all()) else
                        "loss" if not math.isfinite(loss_total) else "gradients")
                bad_steps = skip_bad_step(step + 1, bad_steps, cfg.max_bad_steps, what, log, out, loss=loss_total)
                end_of_step(step + 1, cfg.steps, cfg.save_every, stop, checkpoint, log, out)
                continue
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            reward, kl, answer_logp, length, stopped, cue = every.unbind(dim=1)
            metrics = {"loss": loss_total, "reward_mean": float(reward.mean()),
                       "reward_std": float(reward.std(unbiased=False)), "kl": float(kl.mean()),
                       "answer_logp": float(answer_logp.mean()), "rationale_len": float(length.mean()),
                       "stop_rate": float(stopped.mean()), "cue_rate": float(cue.mean()),
                       "grad_norm": float(grad_norm), "lr": lr, "sample_seconds": round(t_sample, 3),
                       "step_seconds": round(time.time() - t_step, 3), "elapsed": round(time.time() - t0, 2)}
            # 6. held-out accuracy, best-model selection, checkpoints
            if valid and due(done, cfg.eval_every, cfg.steps):
                metrics["valid_acc"] = best.evaluate(model, done)
                result["last_valid_acc"] = metrics["valid_acc"]
            log.log(done, metrics)
            result.update(loss=loss_total, reward_mean=metrics["reward_mean"], kl=metrics["kl"])
            end_of_step(done, cfg.steps, cfg.save_every, stop, checkpoint, log, out)
    log.close()
    acc.wait_for_everyone()
    if best.best:  # the best held-out model is the final model
        best.install()
        result.update(best.summary())
    else:
        save_final_model(acc, model, out, tokenizer)
        result["final"] = f"last step ({cfg.steps})"
    if acc.is_main_process:
        result.update(seconds=round(time.time() - t0, 2), bad_steps=bad_steps)
        write_json(out / "latro_result.json", {"config": to_dict(cfg), "result": result})
    acc.wait_for_everyone()
    return result

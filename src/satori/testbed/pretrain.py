"""From-scratch "pretraining" of the testbed base model.

Trains the tokenizer and a tiny Llama on ``plain_prompt(question) + solution + eos`` where the
solution is the reference solution with arithmetic errors injected at ``error_rate`` per step
(fresh errors every epoch), with the loss on the response tokens only. A share
``check_fraction`` of the examples are *checking exercises* instead: a solution (wrong half
the time) cut after a step, ``Check:``, the rule critic's verdict on the line so far (with
the wrong step redone), and the rest of the solution done right. A real base model has read
plenty of people checking their work as they go; these give the testbed base model the
critic's language and a use for it (so format tuning can teach *when* to reflect rather
than a new vocabulary), while its own solutions never contain a check. The short budget leaves
the model an imperfect reasoner, the stand-in for a pretrained base model such as
Qwen2.5-Math-7B. The result (model, tokenizer, ``build_info.json``) is written to a temporary
directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from satori import __version__
from satori.data import Problem, plain_prompt
from satori.errors import SatoriError
from satori.testbed import tasks
from satori.testbed.checker import check_steps, parse_equation, split_steps
from satori.testbed.model import build_model, build_tokenizer, count_parameters
from satori.testbed.tasks import make_problems, reference_solution


@dataclass
class PretrainConfig:
    """Every hyperparameter of :func:`pretrain` (plain types, so a CLI can expose them)."""

    seed: int = 0
    # 2,000 steps with 40% checking exercises: the seed-0 build checks its work (after a wrong
    # step and ``Check:`` it redoes the step 97% of the time and repairs the line 82%; it
    # redoes no right step), where 1,300 steps with 20% did not (56% / 11.5%, and redid 40% of
    # right steps); greedy accuracy 0.83 on 256 valid problems (build records), against 0.53
    steps: int = 2000
    batch_size: int = 16
    n_train: int = 0  # problems; 0 means steps * batch_size (each problem seen once)
    n_valid: int = 256
    error_rate: float = 0.1
    check_fraction: float = 0.4  # share of examples that are checking exercises
    # chance that each step before a checking exercise's cut was checked too (in the prompt): the
    # rest of the solution then comes later in the response, where the base is weakest
    prior_checks: float = 0.0
    model_size: str = "small"
    vocab_size: int = 1024
    tokenizer_corpus: int = 4000  # texts the tokenizer is trained on
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast for training (evaluation runs in fp32)
    pad_to_multiple: int = (
        16  # batch widths rounded up to this (bounds memory under bf16)
    )
    num_threads: int = 2  # torch threads; 0 leaves the current setting
    eval_batch_size: int = 128
    max_new_tokens: int = 96
    log_every: int = 100

    def validate(self) -> None:
        for name in ("steps", "batch_size", "n_valid", "vocab_size", "tokenizer_corpus", "lr", "grad_clip",
                     "pad_to_multiple", "eval_batch_size", "max_new_tokens", "log_every"):
            if not getattr(self, name) > 0:
                raise SatoriError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("n_train", "warmup_steps", "weight_decay", "num_threads"):
            if getattr(self, name) < 0:
                raise SatoriError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("error_rate", "min_lr_ratio", "check_fraction", "prior_checks"):
            if not 0 <= getattr(self, name) <= 1:
                raise SatoriError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SatoriError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def training_text(problem: Problem, solution: str) -> tuple[str, str]:
    """``(prompt, response)`` of one training example."""
    return plain_prompt(problem.question), solution


CHECK_CUE = "\n\nCheck:\n"


def with_right_checks(problem: Problem, steps: Sequence[str], checked: Iterable[int], key: str) -> list[str]:
    """``steps`` (plain solution steps, right ones) with step ``k`` followed by the check cue and
    the critic's check finding it right, for each ``k`` (1-based) in ``checked``; the wording is
    chosen from ``key``."""
    from satori.synth import agents  # the critic lives with stage 1, which builds on the testbed

    out = list(steps)
    for k in checked:
        out[k - 1] += CHECK_CUE + agents.step_check(problem, k, parse_equation(steps[k - 1]).text, False, f"{key}/{k}")
    return out


def checking_text(problem: Problem, rng: random.Random, prior_checks: float = 0.0) -> tuple[str, str]:
    """``(prompt, response)`` of a checking exercise, a solution checked as it is written.

    The prompt is a solution of ``problem`` (with wrong steps half the time) cut after one of
    its steps: the first wrong one if there is one, else a random one, and the check cue.
    The response is the rule critic's check of that step
    (:func:`satori.synth.agents.step_check`: the step redone from the question, then the
    verdict), the corrected step if it was wrong, and then the rest of the solution, done
    right. So the base model has read checks made in the middle of a solution that change
    how it goes on, as a real base model has. With ``prior_checks`` each (right) step before
    the cut has that chance of a check of its own in the prompt, so the response comes later.
    """
    from satori.synth import agents  # the critic lives with stage 1, which builds on the testbed

    solution = reference_solution(problem, 0.35 if rng.random() < 0.5 else 0.0, rng)
    texts = [text for _, text in split_steps(solution)]
    right = [text for _, text in split_steps(reference_solution(problem))]
    key = f"pretrain/{problem.id}/{rng.random()}"
    wrong, _ = agents.first_wrong_position(problem, texts)
    cut = wrong if wrong is not None else rng.randint(1, len(texts))
    if wrong is not None:
        feedback = agents.rule_correction(problem, texts[:cut], key)
        check = f"{feedback.reflect} {feedback.explore}"
    else:
        check = agents.step_check(problem, cut, parse_equation(texts[cut - 1]).text, False, key)
    checked = [k for k in range(1, cut) if rng.random() < prior_checks] if prior_checks > 0 else []
    line = with_right_checks(problem, texts[:cut], checked, key)
    response = "\n\n".join([check, *right[cut:]])
    return plain_prompt(problem.question) + "\n\n".join(line) + CHECK_CUE, response


def encode_examples(
    tokenizer, pairs: list[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """Token ids of ``prompt + response + eos`` and the prompt length, per pair.

    Prompt and response are tokenized separately, exactly as at inference time.
    """
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False).input_ids
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [(p + r + [eos], len(p)) for p, r in zip(prompts, responses)]


def make_batch(
    examples: list[tuple[list[int], int]], pad_id: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on the prompt and padding).

    The width is rounded up to a multiple of ``multiple``: few distinct shapes keep oneDNN's
    per-shape bf16 kernel cache (and the process's memory) small.
    """
    width = max(len(ids) for ids, _ in examples)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr`` (``step`` is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def batch_order(
    lengths: list[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled batches of indices, grouped by similar length to waste little padding.

    Indices are shuffled, sorted by length within windows of 16 batches, cut into batches,
    and the batches shuffled again.
    """
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 16
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    bf16: bool = False,
) -> list[str]:
    """Responses to plain-text prompts (batched, left padding); special tokens removed."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    out: list[str] = []
    try:
        for b in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[b : b + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_k=0 if do_sample else None,
                    top_p=1.0 if do_sample else None,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            out += tokenizer.batch_decode(
                gen[:, enc.input_ids.shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
    return out


def greedy_accuracy(
    model,
    tokenizer,
    problems: list[Problem],
    max_new_tokens: int,
    batch_size: int = 128,
    bf16: bool = False,
) -> dict[str, Any]:
    """Greedy pass@1 (final answer right, by the checker), overall and per level."""
    responses = generate(
        model,
        tokenizer,
        [plain_prompt(p.question) for p in problems],
        max_new_tokens,
        batch_size,
        bf16=bf16,
    )
    by_level: dict[int, list[bool]] = defaultdict(list)
    steps_ok = 0
    for p, r in zip(problems, responses):
        check = check_steps(p, r)
        by_level[int(p.meta["level"])].append(check.final_correct)
        steps_ok += check.first_wrong_step is None
    correct = [c for v in by_level.values() for c in v]
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "all_steps_correct": steps_ok / max(1, len(problems)),
        "accuracy_by_level": {
            str(k): sum(v) / len(v) for k, v in sorted(by_level.items())
        },
        "n": len(problems),
    }


def checked_line(problem: Problem, steps: list[str], after_check: str) -> tuple[bool, bool]:
    """How a check made after ``steps`` (a line cut after its last step) went, judged by
    what the model did, not by the words of its verdict: ``(redone, right)``, whether
    ``after_check`` writes the last step again (``Step k:``), and whether the line it leaves
    (the kept steps, then the steps written after the check) is a complete right solution."""
    k = len(steps)
    redo = after_check.find(f"Step {k}:")
    if redo >= 0:
        line = [*steps[:-1], after_check[redo:]]
    else:
        goes_on = after_check.find(f"Step {k + 1}:")
        line = steps + ([after_check[goes_on:]] if goes_on >= 0 else [])
    check = check_steps(problem, "\n\n".join(line))
    return redo >= 0, check.first_wrong_step is None and check.final_correct


def check_probe(
    model, tokenizer, problems: list[Problem], seed: int, max_new_tokens: int, batch_size: int = 128
) -> dict[str, Any]:
    """Can the model check its work as it goes? One checking exercise per problem (its
    prompt only: a line cut after a step, the first wrong one if any, and ``Check:``),
    greedy continuation, judged by :func:`checked_line`. ``wrong`` lines: how often the
    step is redone, and redone with the line then right (``repaired``); ``right`` lines: how
    often the step is kept and the line finished right (``kept_right``)."""
    from satori.synth import agents  # the critic lives with stage 1, which builds on the testbed

    rng = random.Random(f"{seed}/check-probe")
    cases = []
    for p in problems:
        prompt, _ = checking_text(p, rng)
        steps = prompt[len(plain_prompt(p.question)) : -len(CHECK_CUE)].split("\n\n")
        cases.append((p, prompt, steps, agents.first_wrong_position(p, steps)[0] is not None))
    outs = generate(model, tokenizer, [prompt for _, prompt, _, _ in cases], max_new_tokens, batch_size)
    tally = {"wrong": dict.fromkeys(("n", "redone", "repaired"), 0),
             "right": dict.fromkeys(("n", "redone", "kept_right"), 0)}
    for (p, _, steps, wrong), out in zip(cases, outs):
        redone, right = checked_line(p, steps, out)
        t = tally["wrong" if wrong else "right"]
        t["n"] += 1
        t["redone"] += redone
        t["repaired" if wrong else "kept_right"] += redone == wrong and right
    return {
        kind: {"n": t["n"], **{k: v / max(1, t["n"]) for k, v in t.items() if k != "n"}}
        for kind, t in tally.items()
    }


def checked_prompt(problem: Problem, m: int, c: int, seed: int) -> str:
    """The prompt of :func:`after_checks_probe`: ``problem``'s first ``m`` steps done right, the
    first ``c`` of them each followed by the check cue and the critic's check finding it right."""
    steps = [text for _, text in split_steps(reference_solution(problem))][:m]
    steps = with_right_checks(problem, steps, range(1, c + 1), f"{seed}/after-checks/{problem.id}")
    return plain_prompt(problem.question) + "\n\n".join(steps) + "\n\n"


def after_checks_probe(
    model, tokenizer, problems: list[Problem], seed: int, max_new_tokens: int, batch_size: int = 128,
    m: int = 2, checks: tuple[int, ...] = (0, 1, 2),
) -> dict[str, Any]:
    """What a check costs the steps after it: the model is given the first ``m`` steps of a
    problem done right, with ``c`` of them checked and found right (:func:`checked_prompt`), and
    goes on greedily; the share of problems it finishes with every step right, per ``c`` in
    ``checks``, over the problems with more than ``m`` steps. The checks change nothing in the
    line, only how far back the question is; a model that reads them as a real base model would
    finishes as often after two as after none."""
    cases = [p for p in problems if int(p.meta["level"]) > m]
    out: dict[str, Any] = {"n": len(cases), "steps_given": m}
    for c in checks:
        prompts = [checked_prompt(p, m, c, seed) for p in cases]
        responses = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        right = 0
        for p, prompt, response in zip(cases, prompts, responses):
            verdict = check_steps(p, prompt[len(plain_prompt(p.question)):] + response)
            right += verdict.first_wrong_step is None and verdict.final_correct
        out[f"finished_right_after_{c}_checks"] = right / max(1, len(cases))
    return out


@dataclass
class ProbeConfig:
    """``satori testbed probe``: what a testbed model does on held-out problems, measured the
    way :func:`pretrain` records it (greedy accuracy and :func:`check_probe`), and what a check
    costs the steps after it (:func:`after_checks_probe`)."""

    model: str = ""  # a model folder; empty: the shipped base model
    n: int = 256  # valid problems
    seed: int = 0  # of the problems and of the checking exercises (a build's own seed)
    max_new_tokens: int = 192
    batch_size: int = 128

    def validate(self) -> None:
        for name in ("n", "max_new_tokens", "batch_size"):
            if not getattr(self, name) > 0:
                raise SatoriError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.model and not (Path(self.model) / "config.json").is_file():
            raise SatoriError(f"model: {self.model} is not a model folder (no config.json)")


def probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Greedy accuracy, the check probe and the after-checks probe of ``cfg.model`` on ``cfg.n``
    valid problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from satori.testbed import BASE_MODEL_DIR

    cfg.validate()
    path = cfg.model or str(BASE_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    valid = make_problems("valid", cfg.n, seed=cfg.seed)
    result = greedy_accuracy(model, tokenizer, valid, cfg.max_new_tokens, cfg.batch_size)
    result["checks"] = check_probe(model, tokenizer, valid, cfg.seed, cfg.max_new_tokens, cfg.batch_size)
    result["after_checks"] = after_checks_probe(model, tokenizer, valid, cfg.seed, cfg.max_new_tokens,
                                                cfg.batch_size)
    return {"model": path, **result}


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing an existing ``out`` (old copy removed last)."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def pretrain(
    out_dir: str | os.PathLike,
    config: PretrainConfig | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the testbed tokenizer and base model from scratch; write them to ``out_dir``.

    ``overrides`` replace fields of ``config`` (e.g. ``pretrain(out, steps=10, seed=1)``).
    Deterministic for a seed and thread count. Returns the metrics also written to
    ``build_info.json``. An existing non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    cfg = config or PretrainConfig()
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SatoriError(f"unknown pretrain setting(s): {', '.join(unknown)}")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SatoriError(
            f"output directory {out} exists and is not empty (pass overwrite=True to replace it)"
        )

    t_start, cpu_start = time.perf_counter(), time.process_time()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    n_train = cfg.n_train or cfg.steps * cfg.batch_size
    train = make_problems("train", n_train, seed=cfg.seed)
    valid = make_problems("valid", cfg.n_valid, seed=cfg.seed)

    def epoch_examples(epoch: int) -> list[tuple[list[int], int]]:
        erng = random.Random(f"{cfg.seed}/epoch/{epoch}")
        pairs = [
            checking_text(p, erng, cfg.prior_checks) if erng.random() < cfg.check_fraction
            else training_text(p, reference_solution(p, cfg.error_rate, erng))
            for p in train
        ]
        return encode_examples(tokenizer, pairs)

    t0 = time.perf_counter()
    corpus_rng = random.Random(f"{cfg.seed}/tokenizer")
    corpus = [
        "".join(checking_text(p, corpus_rng)) if corpus_rng.random() < cfg.check_fraction
        else plain_prompt(p.question) + p.solution
        for p in corpus_rng.sample(train, min(len(train), cfg.tokenizer_corpus))
    ]
    tokenizer = build_tokenizer(corpus, vocab_size=cfg.vocab_size)
    t_tokenizer = time.perf_counter() - t0

    model = build_model(len(tokenizer), cfg.model_size, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        foreach=True,
    )

    t0 = time.perf_counter()
    model.train()
    losses: list[list[float]] = []
    epoch, examples, batches = 0, [], []
    n_tokens = 0
    for step in range(cfg.steps):
        if not batches:
            examples = epoch_examples(epoch)
            batches = batch_order(
                [len(ids) for ids, _ in examples], cfg.batch_size, rng
            )
            epoch += 1
        input_ids, labels = make_batch(
            [examples[i] for i in batches.pop()],
            tokenizer.pad_token_id,
            cfg.pad_to_multiple,
        )
        n_tokens += input_ids.numel()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append([step, round(loss.item(), 4)])
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluation = greedy_accuracy(
        model, tokenizer, valid, cfg.max_new_tokens, cfg.eval_batch_size
    )
    # room for a check and then the rest of a solution
    evaluation["checks"] = check_probe(
        model, tokenizer, valid, cfg.seed, 2 * cfg.max_new_tokens, cfg.eval_batch_size
    )
    evaluation["after_checks"] = after_checks_probe(
        model, tokenizer, valid, cfg.seed, 2 * cfg.max_new_tokens, cfg.eval_batch_size
    )
    t_eval = time.perf_counter() - t0

    metrics = {
        "satori_version": __version__,
        "config": dataclasses.asdict(cfg),
        "task_ranges": {
            name: getattr(tasks, name)
            for name in (
                "MIN_VALUE",
                "MAX_VALUE",
                "START_RANGE",
                "ADD_RANGE",
                "SUB_RANGE",
                "MUL_RANGE",
                "DIV_RANGE",
            )
        },
        "n_train_problems": n_train,
        "epochs": epoch,
        "n_parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "train_tokens": n_tokens,
        "final_loss": losses[-1][1],
        "loss_curve": losses,
        "valid": evaluation,
        "seconds": {
            "tokenizer": round(t_tokenizer, 2),
            "train": round(t_train, 2),
            "eval": round(t_eval, 2),
            "total": round(time.perf_counter() - t_start, 2),
            "cpu_total": round(time.process_time() - cpu_start, 2),
        },
        "torch_version": torch.__version__,
        "platform": platform.platform(),
    }

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    metrics["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    (tmp / "build_info.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _replace_dir(tmp, out)
    return metrics

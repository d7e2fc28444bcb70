"""``satori sft``: supervised fine-tuning on (prompt, response) pairs.

Used for format tuning (stage 1: behaviour cloning of COAT demonstrations), for distilling
the RL policy back into the base model, and for LaTRO's SFT baseline on gold rationales.

The loop, top to bottom:

1. load the model and tokenizer, add the COAT tokens when missing;
2. tokenise ``prompt + response + eos``; the loss covers response tokens only;
3. each optimizer step takes the next ``batch_size × grad_accum × processes`` examples of a
   seeded per-epoch shuffle; the loss is the sum of token losses divided by the number of
   response tokens in that *global* batch, so ``batch 8 × 1 step`` and
   ``batch 1 × 8 accumulation`` (or 2 processes × 4) give the same gradient;
4. AdamW, cosine schedule with warm-up, gradient clipping, optional bf16 autocast, optional
   packing (several examples per row, each attending only to itself);
5. held-out loss every ``eval_every`` steps; an atomic checkpoint every ``save_every``
   steps and on SIGTERM; ``--resume`` restores weights, optimizer, scheduler, RNG and the
   data position, so the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from satori.coat import ACTION_OF_TOKEN, check_init_text, coat_token_ids
from satori.config import check, to_dict, validate_all
from satori.data import Problem, build_prompt, read_jsonl
from satori.errors import SatoriError
from satori.rollout import load_model, load_tokenizer, token_logprobs
from satori.train.common import (
    end_of_step, skip_bad_step,
    MetricsLog, StopSignal, autocast, grads_finite, latest_checkpoint, load_checkpoint, make_accelerator,
    make_scheduler, save_checkpoint, save_final_model,
)
from satori.utils import seed_everything, set_threads, write_json


@dataclass
class SFTConfig:
    """``satori sft``: fine-tune a model on JSONL records with ``response`` and ``prompt`` (or ``question``)."""

    __aliases__: ClassVar[dict[str, str]] = {}

    model: str = field(default="", metadata={"help": "local model folder to start from"})
    data: str = field(default="", metadata={"help": "JSONL with 'response' and 'prompt' or 'question'"})
    out: str = field(default="", metadata={"help": "output folder (model, checkpoints, metrics)"})
    valid_data: str = field(default="", metadata={"help": "held-out JSONL (default: a slice of data)"})
    valid_fraction: float = 0.05
    prompt_field: str = "prompt"
    question_field: str = "question"
    response_field: str = "response"
    context_field: str = field(default="context", metadata={
        "help": "optional field: text between prompt and response that the model reads but is not "
                "trained to write (e.g. the mistaken steps before a correction)"})
    epochs: float = 2.0
    max_steps: int = field(default=0, metadata={"help": "stop after N optimizer steps (0: use epochs)"})
    batch_size: int = field(default=16, metadata={"help": "examples per micro-batch per process"})
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 1024
    packing: bool = False
    bf16: bool = False
    add_coat_tokens: bool = True
    coat_init: str = field(default="text", metadata={
        "help": "how the rows of newly added COAT tokens start: 'text' (the mean embedding of a paragraph "
                "break, 'Wait,' and 'Alternatively,': satori.coat.INIT_TEXT) or 'mean' (of all rows)"})
    coat_init_text: dict[str, str] = field(default_factory=dict, metadata={
        "help": "with coat_init 'text': other text for some actions, e.g. {reflect: 'Check:'}, the words the "
                "model itself writes there"})
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many NaN/inf steps"})
    resume: bool = False
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        check(self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be > 0")
        check(self.epochs > 0 or self.max_steps > 0, "either epochs or max_steps must be > 0")
        check(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.valid_fraction < 1, f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        check(self.max_len > 8, f"max_len must be > 8, got {self.max_len}")
        check(self.save_every > 0 and self.eval_every > 0, "save_every and eval_every must be > 0")
        check(self.coat_init in ("text", "mean"), f"coat_init must be 'text' or 'mean', got {self.coat_init!r}")
        check_init_text(self.coat_init_text)
        check(self.log_every > 0, f"log_every must be > 0, got {self.log_every}")
        check(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        check(self.max_bad_steps >= 0, f"max_bad_steps must be >= 0, got {self.max_bad_steps}")


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]  # includes the final eos


def tokenize_examples(records: list[dict[str, Any]], tokenizer: Any, cfg: SFTConfig, source: str) -> list[Example]:
    """Records -> token ids; errors name the file, line and field."""
    out = []
    eos = tokenizer.eos_token_id
    for i, rec in enumerate(records, 1):
        where = f"{source}:{i}"
        resp = rec.get(cfg.response_field)
        if not isinstance(resp, str) or not resp.strip():
            raise SatoriError(f"{where}: missing or empty field '{cfg.response_field}'")
        if isinstance(rec.get(cfg.prompt_field), str):
            prompt = rec[cfg.prompt_field]
        elif isinstance(rec.get(cfg.question_field), str) and rec[cfg.question_field].strip():
            prompt = build_prompt(Problem(id=str(i), question=rec[cfg.question_field], answer=""), tokenizer)
        else:
            raise SatoriError(f"{where}: needs a '{cfg.prompt_field}' or a '{cfg.question_field}' field")
        context = rec.get(cfg.context_field, "")
        if not isinstance(context, str):
            raise SatoriError(f"{where}: field '{cfg.context_field}' must be text, got {type(context).__name__}")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if context:
            p_ids = p_ids + tokenizer(context, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"] + [eos]
        if len(p_ids) + len(r_ids) > cfg.max_len:
            raise SatoriError(f"{where}: example has {len(p_ids) + len(r_ids)} tokens, more than max_len="
                              f"{cfg.max_len}; raise --max-len or shorten the data")
        out.append(Example(p_ids, r_ids))
    return out


def batch_tensors(examples: list[Example], pad_id: int, packing: bool, max_len: int) -> dict[str, Any]:
    """Rows for one micro-batch: ``input_ids``, ``attention_mask`` (None when packed),
    ``position_ids`` and ``loss_mask`` aligned with ``token_logprobs`` (position t scores t+1)."""
    if packing:
        rows: list[list[tuple[list[int], int]]] = [[]]
        used = 0
        for ex in examples:
            n = len(ex.prompt_ids) + len(ex.response_ids)
            if used + n > max_len and rows[-1]:
                rows.append([])
                used = 0
            rows[-1].append((ex.prompt_ids + ex.response_ids, len(ex.prompt_ids)))
            used += n
    else:
        rows = [[(ex.prompt_ids + ex.response_ids, len(ex.prompt_ids))] for ex in examples]
    width = max(sum(len(seq) for seq, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width - 1))
    for b, row in enumerate(rows):
        start = 0
        for seq, n_prompt in row:
            end = start + len(seq)
            ids[b, start:end] = torch.tensor(seq)
            pos[b, start:end] = torch.arange(len(seq))
            attn[b, start:end] = 1
            loss_mask[b, start + n_prompt - 1: end - 1] = 1.0
            start = end
        if start < width:  # padding continues as its own short "sequence"
            pos[b, start:] = torch.arange(width - start)
    return {"input_ids": ids, "attention_mask": None if packing else attn, "position_ids": pos,
            "loss_mask": loss_mask}


def next_token_logprobs(model: Any, batch: dict[str, Any], bf16: bool) -> torch.Tensor:
    """Log-probability of every next token of a micro-batch (fp32; position t scores t+1)."""
    with autocast(bf16):
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                              position_ids=batch["position_ids"])["logp"]
    return logp.float()


def sum_token_loss(model: Any, batch: dict[str, Any], bf16: bool) -> torch.Tensor:
    """Sum of the negative log-likelihood over the response tokens of a micro-batch."""
    return -(next_token_logprobs(model, batch, bf16) * batch["loss_mask"]).sum()


def data_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of epoch ``epoch``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(n: int, seed: int, step: int, size: int) -> list[int]:
    """Example indices of optimizer step ``step``: positions ``[step*size, (step+1)*size)`` of
    the concatenated per-epoch shuffles (a batch may span an epoch boundary)."""
    out = []
    pos = step * size
    while len(out) < size:
        epoch, offset = divmod(pos, n)
        order = data_order(n, seed, epoch)
        take = min(size - len(out), n - offset)
        out.extend(order[offset: offset + take])
        pos += take
    return out


def meta_token_ids(tokenizer: Any) -> dict[str, int]:
    """The COAT tokens' ids by action (``{"reflect": id, ...}``); empty for a tokenizer without them."""
    try:
        return {ACTION_OF_TOKEN[token]: i for token, i in coat_token_ids(tokenizer).items()}
    except SatoriError:
        return {}


@torch.no_grad()
def heldout_metrics(model: Any, examples: list[Example], pad_id: int, cfg: SFTConfig,
                    watch: dict[str, int] | None = None) -> dict[str, float]:
    """``valid_loss``, the token-mean loss on held-out examples, and for each token of
    ``watch`` (name -> id) that the held-out responses hold, ``valid_p_<name>``: the model's
    mean probability of that token where the response has it. For the COAT tokens this says
    whether format tuning taught the actions at all, which the loss alone hides: a model can
    fit the text around them and still give ``<|explore|>`` a few percent after a verdict of
    "wrong"."""
    was = model.training
    model.eval()
    total, tokens = 0.0, 0
    p_sum = dict.fromkeys(watch or {}, 0.0)
    p_n = dict.fromkeys(watch or {}, 0)
    for i in range(0, len(examples), cfg.batch_size):
        chunk = examples[i: i + cfg.batch_size]
        batch = batch_tensors(chunk, pad_id, False, cfg.max_len)
        logp = next_token_logprobs(model, batch, cfg.bf16)
        mask = batch["loss_mask"]
        total += float(-(logp * mask).sum())
        tokens += int(mask.sum())
        targets = batch["input_ids"][:, 1:]
        for name, token_id in (watch or {}).items():
            at = (targets == token_id) & (mask > 0)
            p_sum[name] += float(logp[at].exp().sum())
            p_n[name] += int(at.sum())
    model.train(was)
    out = {"valid_loss": total / max(1, tokens)}
    out.update({f"valid_p_{name}": p_sum[name] / p_n[name] for name in p_sum if p_n[name]})
    return out


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Train; returns the final metrics. Writes the model + tokenizer into ``cfg.out``."""
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise SatoriError(f"--{name} is required")
    validate_all(cfg)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    acc = make_accelerator()
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.model)
    records = read_jsonl(cfg.data)
    if not records:
        raise SatoriError(f"{cfg.data}: no records")
    model = load_model(cfg.model)
    if cfg.add_coat_tokens:
        from satori.coat import add_coat_tokens

        add_coat_tokens(tokenizer, model, init=cfg.coat_init, init_text=cfg.coat_init_text)
    examples = tokenize_examples(records, tokenizer, cfg, cfg.data)
    if cfg.valid_data:
        valid = tokenize_examples(read_jsonl(cfg.valid_data), tokenizer, cfg, cfg.valid_data)
        train = examples
    else:
        n_valid = int(len(examples) * cfg.valid_fraction)
        order = data_order(len(examples), cfg.seed, -1)
        valid = [examples[i] for i in order[:n_valid]]
        train = [examples[i] for i in order[n_valid:]]
    if not train:
        raise SatoriError(f"{cfg.data}: no training examples left after the held-out split")
    world, rank = acc.num_processes, acc.process_index
    per_process = cfg.batch_size * cfg.grad_accum
    size = per_process * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / size))
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, "cosine", total_steps, int(cfg.warmup_ratio * total_steps))
    start = 0
    bad_steps = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"model": model}, {"optimizer": optimizer, "scheduler": scheduler})
        start, bad_steps = state["step"], state.get("bad_steps", 0)
    model, optimizer = acc.prepare(model, optimizer)
    pad_id = tokenizer.pad_token_id
    watch = meta_token_ids(tokenizer)
    log = MetricsLog(out, enabled=acc.is_main_process)
    log.truncate_after(start)
    result: dict[str, Any] = {"steps": total_steps, "train_examples": len(train), "valid_examples": len(valid)}
    t0 = time.time()

    def checkpoint(step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(out, step, {"model": acc.unwrap_model(model)},
                            {"optimizer": optimizer, "scheduler": scheduler},
                            {"bad_steps": bad_steps, "config": to_dict(cfg)}, tokenizer=tokenizer)
        acc.wait_for_everyone()

    with StopSignal() as stop:
        for step in range(start, total_steps):
            indices = global_batch(len(train), cfg.seed, step, size)
            batch_examples = [train[i] for i in indices]
            n_tokens = sum(len(ex.response_ids) for ex in batch_examples)  # same on every process
            mine = batch_examples[rank * per_process: (rank + 1) * per_process]
            loss_sum = 0.0
            for m in range(cfg.grad_accum):
                micro = mine[m * cfg.batch_size: (m + 1) * cfg.batch_size]
                batch = batch_tensors(micro, pad_id, cfg.packing, cfg.max_len)
                batch = {k: (v.to(acc.device) if v is not None else None) for k, v in batch.items()}
                sync = acc.no_sync(model) if m < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    loss = sum_token_loss(model, batch, cfg.bf16) / n_tokens
                    acc.backward(loss * world)  # DDP averages over processes
                loss_sum += float(loss.detach())
            loss_total = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="sum"))
            if not math.isfinite(loss_total) or not grads_finite(model):
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                what = "gradients" if math.isfinite(loss_total) else "loss"
                bad_steps = skip_bad_step(step + 1, bad_steps, cfg.max_bad_steps, what, log, out, loss=loss_total)
                end_of_step(step + 1, total_steps, cfg.save_every, stop, checkpoint, log, out)
                continue
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            metrics = {"loss": loss_total, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                       "tokens": n_tokens, "elapsed": time.time() - t0}
            if valid and (done % cfg.eval_every == 0 or done == total_steps):
                held_out = heldout_metrics(acc.unwrap_model(model), valid, pad_id, cfg, watch)
                metrics.update(held_out)
                result.update(held_out)
            if done % cfg.log_every == 0 or "valid_loss" in metrics:
                log.log(done, metrics)
            result["loss"] = loss_total
            end_of_step(done, total_steps, cfg.save_every, stop, checkpoint, log, out)
    log.close()
    acc.wait_for_everyone()
    save_final_model(acc, model, out, tokenizer)
    if acc.is_main_process:
        result.update(seconds=round(time.time() - t0, 2), bad_steps=bad_steps)
        write_json(out / "sft_result.json", {"config": to_dict(cfg), "result": result})
    acc.wait_for_everyone()
    return result

"""``satori orm``: the outcome reward model (METHOD.md §3).

The loop, top to bottom:

1. the policy samples ``k`` solutions per train and per held-out problem (or graded
   samples files are read); they are graded and cached in ``out/samples.jsonl`` with the
   settings in ``out/sampling.json``, so a resumed (or repeated) run does not resample;
2. every problem with both correct and wrong samples gives (correct, wrong) pairs: all
   pairs of distinct responses, or a seeded subset of ``max_pairs_per_problem``;
3. the ORM is ``AutoModelForSequenceClassification(policy, num_labels=1)``: the policy's
   transformer with a scalar head (``score``) read at the last token of ``prompt +
   response`` (no end token is appended, so the score sits exactly where PPO puts the
   reward and where the critic, initialised from this model, predicts it);
4. Bradley-Terry loss ``-log σ(r⁺ - r⁻ - τ)`` summed over the pairs of the *global* batch
   and divided by its size (so batch 8 × 1 and 4 × 2 accumulation give the same gradient),
   AdamW, cosine schedule with warm-up, gradient clipping, optional bf16 autocast, NaN/inf
   steps skipped and counted, atomic checkpoints every ``save_every`` steps and on SIGTERM,
   exact ``--resume``;
5. every ``eval_every`` steps (and at the end): pairwise accuracy and best-of-k accuracy on
   the held-out problems (the highest-scored of each problem's ``k`` samples, fraction
   correct; beside the mean sample accuracy and pass@k it is bounded by), and pairwise accuracy
   split by whether the answers reflect (``by_reflection``: an ORM can learn "a check means a
   mistake" and tax every check in RL's reward); the checkpoint with the best held-out best-of-k
   accuracy (ties: pairwise accuracy) is the final ORM.

Scoring always uses right padding and ``config.pad_token_id``; the head reads the rightmost
non-pad token. The saved config sets ``token_classification_bias = False`` and
``classifier_dropout = 0.0``, so ``AutoModelForTokenClassification.from_pretrained(orm,
num_labels=1)`` loads the same head as a per-token value model (PPO's critic) whose value at
the last token equals the ORM score.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from satori.algos import bradley_terry_loss
from satori.coat import behaviour
from satori.config import check, to_dict, validate_all
from satori.data import DataConfig, Problem, build_prompt, load_problems
from satori.errors import SatoriError
from satori.evaluate import read_samples, sample_graded
from satori.rollout import load_model, load_tokenizer
from satori.train.common import (
    end_of_step, skip_bad_step,
    MetricsLog, StopSignal, autocast, grads_finite, latest_checkpoint, load_checkpoint, make_accelerator,
    make_scheduler, save_checkpoint,
)
from satori.train.sft import global_batch
from satori.utils import read_json, seed_everything, set_threads, write_json, write_jsonl

log = logging.getLogger("satori")


@dataclass
class ORMConfig:
    """``satori orm``: train the outcome reward model on the policy's own graded samples."""

    __aliases__: ClassVar[dict[str, str]] = {"data": "data.path", "valid": "valid_data.path"}

    policy: str = field(default="", metadata={"help": "format-tuned model folder: sampler and ORM initialisation"})
    out: str = field(default="", metadata={"help": "output folder (ORM + tokenizer, samples, checkpoints, metrics)"})
    data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:train"))
    valid_data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:valid", n=200))
    samples: str = field(default="", metadata={"help": "graded train samples JSONL (id or question, response, "
                                                       "correct); replaces sampling on data"})
    valid_samples: str = field(default="", metadata={"help": "graded held-out samples JSONL; replaces sampling "
                                                             "on valid_data"})
    k: int = field(default=8, metadata={"help": "samples per problem"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    max_new_tokens: int = 400
    gen_batch_size: int = 64
    last_number_fallback: bool = False
    max_pairs_per_problem: int = field(default=0, metadata={"help": "0: all (correct, wrong) pairs"})
    margin: float = field(default=2.0, metadata={"help": "Bradley-Terry margin tau"})
    epochs: float = 1.0
    max_steps: int = field(default=0, metadata={"help": "stop after N optimizer steps (0: use epochs)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch per process"})
    grad_accum: int = 1
    score_batch_size: int = field(default=16, metadata={"help": "sequences per forward when scoring"})
    lr: float = 1e-5
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = field(default=0, metadata={"help": "longest prompt + response in tokens (0: model context); "
                                                      "longer pairs are dropped and counted"})
    bf16: bool = False
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many NaN/inf steps"})
    resume: bool = False
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        check(self.k > 1, f"k must be > 1 to get (correct, wrong) pairs, got {self.k}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.max_new_tokens > 0 and self.gen_batch_size > 0, "max_new_tokens and gen_batch_size must be > 0")
        check(self.max_pairs_per_problem >= 0, f"max_pairs_per_problem must be >= 0, got {self.max_pairs_per_problem}")
        check(self.margin >= 0, f"margin must be >= 0, got {self.margin}")
        check(self.batch_size > 0 and self.grad_accum > 0 and self.score_batch_size > 0,
              "batch_size, grad_accum and score_batch_size must be > 0")
        check(self.epochs > 0 or self.max_steps > 0, "either epochs or max_steps must be > 0")
        check(self.max_steps >= 0 and self.max_len >= 0, "max_steps and max_len must be >= 0")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.save_every > 0 and self.eval_every > 0 and self.log_every > 0,
              "save_every, eval_every and log_every must be > 0")
        check(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        check(self.max_bad_steps >= 0, f"max_bad_steps must be >= 0, got {self.max_bad_steps}")


# --------------------------------------------------------------------------- tokenizers


_PROBE = "Step 1: 12 + 7 = 19\n\n<|reflect|>Wait, 19 is correct.<|explore|>So the answer is \\boxed{19}."


def check_same_tokenizer(tok_a: Any, tok_b: Any, where: str) -> None:
    """Raise ``SatoriError`` unless two tokenizers have the same vocabulary, the same
    special tokens and encode a probe text (digits, COAT tokens, a box) identically."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:3]
        only_b = sorted(set(vb) - set(va))[:3]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:3]
        raise SatoriError(f"{where}: tokenizers differ: vocabulary of {len(va)} vs {len(vb)} tokens "
                          f"(only in the first: {only_a}, only in the second: {only_b}, other ids: {moved})")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = getattr(tok_a, name), getattr(tok_b, name)
        if a != b:
            raise SatoriError(f"{where}: tokenizers differ: {name} is {a} vs {b}")
    if sorted(tok_a.all_special_tokens) != sorted(tok_b.all_special_tokens):
        raise SatoriError(f"{where}: tokenizers differ in their special tokens: "
                          f"{sorted(tok_a.all_special_tokens)} vs {sorted(tok_b.all_special_tokens)}")
    if tok_a(_PROBE, add_special_tokens=False)["input_ids"] != tok_b(_PROBE, add_special_tokens=False)["input_ids"]:
        raise SatoriError(f"{where}: tokenizers have the same vocabulary but encode text differently")


# --------------------------------------------------------------------------- pairs


@dataclass
class Pair:
    """A (correct, wrong) pair of responses to one problem."""

    problem_id: str
    question: str
    chosen: str
    rejected: str


def group_records(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Graded sample records grouped by problem (``id``, else the question), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        key = str(r["id"]) if r.get("id") is not None else r["question"]
        groups.setdefault(key, []).append(r)
    return groups


def make_pairs(records: Sequence[dict[str, Any]], max_pairs_per_problem: int = 0, seed: int = 0) -> list[Pair]:
    """Every (correct, wrong) pair of distinct responses of each problem; with
    ``max_pairs_per_problem > 0`` a seeded random subset of that many per problem.
    Duplicate responses (same text, same grade) count once."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for pid, group in group_records(records).items():
        good = list(dict.fromkeys(r["response"] for r in group if r["correct"]))
        bad = list(dict.fromkeys(r["response"] for r in group if not r["correct"]))
        combos = list(product(good, bad))
        if max_pairs_per_problem and len(combos) > max_pairs_per_problem:
            combos = rng.sample(combos, max_pairs_per_problem)
        question = group[0]["question"]
        pairs.extend(Pair(pid, question, c, w) for c, w in combos)
    return pairs


# --------------------------------------------------------------------------- scoring


def encode(tokenizer: Any, prompt: str, response: str) -> list[int]:
    """Token ids of ``prompt + response`` as the policy produced them (each part encoded
    on its own, no special tokens added). Refuses a sequence ending in the pad token:
    the score head would silently read an earlier token."""
    ids = (tokenizer(prompt, add_special_tokens=False)["input_ids"]
           + tokenizer(response, add_special_tokens=False)["input_ids"])
    if not ids:
        raise SatoriError("cannot score an empty sequence")
    if ids[-1] == tokenizer.pad_token_id:
        raise SatoriError("a scored sequence ends with the pad token; strip padding from responses first")
    return ids


def sequence_scores(orm: Any, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Scores ``[len(rows)]`` of token-id rows, right-padded into one batch (differentiable)."""
    width = max(len(r) for r in rows)
    device = next(orm.parameters()).device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attn[b, : len(row)] = 1
    out = orm(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
    return out.logits[:, 0]


@torch.no_grad()
def score_rows(orm: Any, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
               bf16: bool = False) -> torch.Tensor:
    """Scores of token-id rows in length-sorted batches, in input order (float32, CPU)."""
    was = orm.training
    orm.eval()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    scores = torch.empty(len(rows), dtype=torch.float32)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            with autocast(bf16):
                s = sequence_scores(orm, [rows[i] for i in idx], pad_id)
            scores[torch.tensor(idx)] = s.float().cpu()
    finally:
        orm.train(was)
    return scores


def score_sequences(orm: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                    batch_size: int = 16, bf16: bool = False) -> torch.Tensor:
    """ORM scores (raw, before any sigmoid) of ``prompt + response`` texts, ``[N]`` float32."""
    if len(prompts) != len(responses):
        raise SatoriError(f"score_sequences: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return torch.empty(0)
    pad_id = orm.config.pad_token_id
    if pad_id is None:
        raise SatoriError("the ORM's config has no pad_token_id; load it with satori.train.orm.load_orm")
    rows = [encode(tokenizer, p, r) for p, r in zip(prompts, responses)]
    context = getattr(orm.config.get_text_config(), "max_position_embeddings", None)
    longest = max(len(r) for r in rows)
    if isinstance(context, int) and longest > context:
        raise SatoriError(f"a scored sequence has {longest} tokens, more than the ORM's context of {context}")
    return score_rows(orm, rows, pad_id, batch_size, bf16)


def init_orm(policy: str, tokenizer: Any) -> Any:
    """A fresh ORM: the policy with a new scalar head, configured for scoring and for its
    later use as a token-classification critic."""
    from transformers import AutoModelForSequenceClassification

    orm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, local_files_only=True)
    orm.config.pad_token_id = tokenizer.pad_token_id
    orm.config.token_classification_bias = False  # the critic's head = this head (no bias)
    orm.config.classifier_dropout = 0.0  # no dropout on the critic's values
    return orm


def load_orm(path: str | Path) -> tuple[Any, Any]:
    """A trained ORM and its tokenizer from a folder written by ``satori orm`` (eval mode)."""
    from transformers import AutoModelForSequenceClassification

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SatoriError(f"{p}: not a model folder (no config.json)")
    tokenizer = load_tokenizer(p)
    orm, info = AutoModelForSequenceClassification.from_pretrained(
        str(p), num_labels=1, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
    for key, saved_shape, _ in info.get("mismatched_keys") or ():
        if key.startswith("score"):
            raise SatoriError(f"{p} has num_labels={saved_shape[0]}; an outcome reward model needs 1")
    if info["missing_keys"]:
        raise SatoriError(f"{p}: not an outcome reward model (no trained score head: missing "
                          f"{sorted(info['missing_keys'])[:3]}); train one with `satori orm`")
    if orm.config.pad_token_id is None:
        orm.config.pad_token_id = tokenizer.pad_token_id
    orm.eval()
    return orm, tokenizer


# --------------------------------------------------------------------------- held-out metrics


def _order(a: float, b: float) -> float:
    """1 if a scores above b, 0.5 on a tie, 0 below."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def ranking_metrics(correct: Sequence[Sequence[bool]], scores: Sequence[Sequence[float]],
                    margin: float = 0.0, reflects: Sequence[Sequence[bool]] | None = None) -> dict[str, Any]:
    """Per-problem grades and scores -> best-of-k accuracy (highest score, first on ties),
    mean sample accuracy, pass@k, and over the problems with both outcomes: best-of-k,
    pairwise accuracy (ties count half) and the Bradley-Terry loss of all pairs.

    With ``reflects`` (per sample: does it write ``<|reflect|>``), ``by_reflection`` splits the
    pairs by whether the right and the wrong answer reflect (``right_reflects/wrong_plain`` and
    so on: accuracy, pairs) and adds ``right_plain_above_reflected``: over the pairs of a
    problem's right answers of which exactly one reflects, how often the plain one scores higher
    (ties half). An ORM that tells right from wrong and not checks from no checks gives 0.5 there;
    one that learned "a check means a mistake" gives far more, and taxes every check in RL's
    reward (benchmarks/orm_reflections.py measured 0.91 on the testbed)."""
    n = len(correct)
    if n == 0:
        raise SatoriError("no held-out problems to evaluate the ORM on")
    best, mixed_best, hits, losses = [], [], [], []
    cells: dict[str, list[float]] = {f"right_{a}/wrong_{b}": [] for a in ("reflects", "plain")
                                     for b in ("reflects", "plain")}
    plain_above: list[float] = []
    kind = lambda f: "reflects" if f else "plain"  # noqa: E731
    for p, (c, s) in enumerate(zip(correct, scores)):
        pick = bool(c[max(range(len(s)), key=lambda i: (s[i], -i))])
        best.append(pick)
        r = reflects[p] if reflects is not None else None
        if any(c) and not all(c):
            mixed_best.append(pick)
            for i, j in product(range(len(c)), range(len(c))):
                if c[i] and not c[j]:
                    hits.append(_order(s[i], s[j]))
                    losses.append(float(-F.logsigmoid(torch.tensor(s[i] - s[j] - margin))))
                    if r is not None:
                        cells[f"right_{kind(r[i])}/wrong_{kind(r[j])}"].append(hits[-1])
        if r is not None:
            plain_above += [_order(s[i], s[j]) for i, j in product(range(len(c)), range(len(c)))
                            if c[i] and c[j] and not r[i] and r[j]]
    by_reflection: dict[str, Any] = {
        name: {"accuracy": sum(h) / len(h) if h else None, "pairs": len(h)} for name, h in cells.items()}
    by_reflection["right_plain_above_reflected"] = {
        "share": sum(plain_above) / len(plain_above) if plain_above else None, "pairs": len(plain_above)}
    return {
        "n_problems": n,
        "n_mixed": len(mixed_best),
        "best_of_k": sum(best) / n,
        "sample_accuracy": sum(sum(c) / len(c) for c in correct) / n,
        "pass_at_k": sum(any(c) for c in correct) / n,
        "best_of_k_mixed": sum(mixed_best) / len(mixed_best) if mixed_best else None,
        "pairwise_accuracy": sum(hits) / len(hits) if hits else None,
        "pair_loss": sum(losses) / len(losses) if losses else None,
        **({"by_reflection": by_reflection} if reflects is not None else {}),
    }


def selected_text(step: int, m: dict[str, Any], k: int) -> str:
    """One line on the selected ORM for the run report's stage table."""
    num = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    tax = m.get("by_reflection", {}).get("right_plain_above_reflected", {}).get("share")
    return (f"step {step}: held-out pairwise accuracy {num(m['pairwise_accuracy'])}, best-of-{k} "
            f"{num(m['best_of_k'])} (sample accuracy {num(m['sample_accuracy'])}); a plain right answer "
            f"above a reflected one {num(tax)}")


def evaluate_orm(orm: Any, tokenizer: Any, records: Sequence[dict[str, Any]], cfg: ORMConfig) -> dict[str, Any]:
    """Score every held-out sample and compute :func:`ranking_metrics`."""
    groups = list(group_records(records).values())
    prompts = [build_prompt(Problem(id="", question=g[0]["question"], answer=""), tokenizer) for g in groups]
    flat_prompts = [prompts[i] for i, g in enumerate(groups) for _ in g]
    flat = score_sequences(orm, tokenizer, flat_prompts, [r["response"] for g in groups for r in g],
                           cfg.score_batch_size, cfg.bf16).tolist()
    scores, start = [], 0
    for g in groups:
        scores.append(flat[start: start + len(g)])
        start += len(g)
    return ranking_metrics([[bool(r["correct"]) for r in g] for g in groups], scores, cfg.margin,
                           [[behaviour(r["response"])["reflects"] for r in g] for g in groups])


# --------------------------------------------------------------------------- samples cache


def sampling_key(cfg: ORMConfig) -> dict[str, Any]:
    """Everything the cached samples depend on."""
    return {"policy": str(Path(cfg.policy).resolve()), "data": to_dict(cfg.data), "valid_data": to_dict(cfg.valid_data),
            "samples": cfg.samples, "valid_samples": cfg.valid_samples, "k": cfg.k, "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "last_number_fallback": cfg.last_number_fallback}


def cached_samples(out: Path, key: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The cached samples in ``out`` when they were made with ``key``, else None."""
    meta, path = out / "sampling.json", out / "samples.jsonl"
    if not (meta.is_file() and path.is_file()) or read_json(meta) != key:
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def draw_samples(cfg: ORMConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """Graded train and held-out samples (``split`` = train / valid), from files or the policy."""
    model = None
    records = []
    for split, path, data, seed in (("train", cfg.samples, cfg.data, cfg.seed),
                                    ("valid", cfg.valid_samples, cfg.valid_data, cfg.seed + 1)):
        if path:
            recs = read_samples(path, cfg.last_number_fallback)
        else:
            problems = load_problems(data)
            if not problems:
                raise SatoriError(f"{data.path}: no problems")
            model = model or load_model(cfg.policy)
            recs = sample_graded(model, tokenizer, problems, k=cfg.k, temperature=cfg.temperature,
                                 max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.gen_batch_size,
                                 last_number_fallback=cfg.last_number_fallback)
        for i, r in enumerate(recs, 1):
            if not isinstance(r.get("question"), str):
                raise SatoriError(f"{path}:{i}: the ORM needs the 'question' text of every sample")
            records.append({**r, "split": split})
    return records


# --------------------------------------------------------------------------- training


def run_orm(cfg: ORMConfig) -> dict[str, Any]:
    """Sample, pair, train, select on held-out best-of-k; writes the ORM + tokenizer to ``cfg.out``."""
    for name in ("policy", "out"):
        if not getattr(cfg, name):
            raise SatoriError(f"--{name} is required")
    validate_all(cfg)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    acc = make_accelerator()
    out = Path(cfg.out)
    t0 = time.time()
    tokenizer = load_tokenizer(cfg.policy)

    # 1. graded samples, cached
    key = sampling_key(cfg)
    records = cached_samples(out, key)
    cached = records is not None
    if records is None:
        if cfg.resume and (out / "sampling.json").is_file():
            raise SatoriError(f"{out}: cached samples were made with other settings than this --resume run")
        if acc.is_main_process:
            records = draw_samples(cfg, tokenizer)
            write_jsonl(out / "samples.jsonl", records)
            write_json(out / "sampling.json", key)
        acc.wait_for_everyone()
        records = cached_samples(out, key)
    train_recs = [r for r in records if r["split"] == "train"]
    valid_recs = [r for r in records if r["split"] == "valid"]
    overlap = {r["question"] for r in train_recs} & {r["question"] for r in valid_recs}
    if overlap:
        log.warning("%d held-out question(s) also appear in the training samples", len(overlap))
    if not valid_recs:
        raise SatoriError("no held-out samples: set --valid-data or --valid-samples")

    # 2. pairs -> token ids
    seed_everything(cfg.seed)  # the new head's init must not depend on whether we sampled
    orm = init_orm(cfg.policy, tokenizer)
    max_len = cfg.max_len or orm.config.get_text_config().max_position_embeddings
    pairs = make_pairs(train_recs, cfg.max_pairs_per_problem, cfg.seed)
    train: list[tuple[list[int], list[int]]] = []
    too_long = 0
    for p in pairs:
        prompt = build_prompt(Problem(id=p.problem_id, question=p.question, answer=""), tokenizer)
        chosen, rejected = encode(tokenizer, prompt, p.chosen), encode(tokenizer, prompt, p.rejected)
        if max(len(chosen), len(rejected)) > max_len:
            too_long += 1
            continue
        train.append((chosen, rejected))
    if not train:
        raise SatoriError(f"no (correct, wrong) training pairs: {len(group_records(train_recs))} problems, none with "
                          "both a correct and a wrong sample that fits max_len; raise k or temperature, or use "
                          "easier problems")

    # 3. optimisation state
    world, rank = acc.num_processes, acc.process_index
    per_process = cfg.batch_size * cfg.grad_accum
    size = per_process * world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / size))
    orm.train()
    orm.config.use_cache = False
    optimizer = torch.optim.AdamW(orm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, "cosine", total_steps, int(cfg.warmup_ratio * total_steps))
    start, bad_steps, best = 0, 0, None
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"model": orm}, {"optimizer": optimizer, "scheduler": scheduler})
        start, bad_steps, best = state["step"], state.get("bad_steps", 0), state.get("best")
    model, optimizer = acc.prepare(orm, optimizer)
    pad_id = tokenizer.pad_token_id
    metrics_log = MetricsLog(out, enabled=acc.is_main_process)
    metrics_log.truncate_after(start)
    baseline = ranking_metrics([[bool(r["correct"]) for r in g] for g in group_records(valid_recs).values()],
                               [[0.0] * len(g) for g in group_records(valid_recs).values()])
    result: dict[str, Any] = {
        "steps": total_steps, "resumed_from": start, "samples_cached": cached, "train_pairs": len(train),
        "pairs_too_long": too_long, "train_problems": len(group_records(train_recs)),
        "train_problems_with_pairs": len({p.problem_id for p in pairs}),
        "train_sample_accuracy": sum(r["correct"] for r in train_recs) / max(1, len(train_recs)),
        "valid_problems": baseline["n_problems"], "valid_mixed_problems": baseline["n_mixed"],
        "valid_sample_accuracy": baseline["sample_accuracy"], "valid_pass_at_k": baseline["pass_at_k"],
    }
    best_dir = out / "best"

    def checkpoint(step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(out, step, {"model": acc.unwrap_model(model)},
                            {"optimizer": optimizer, "scheduler": scheduler},
                            {"bad_steps": bad_steps, "best": best, "config": to_dict(cfg)}, tokenizer=tokenizer)
        acc.wait_for_everyone()

    # 4. the loop
    with StopSignal() as stop:
        for step in range(start, total_steps):
            batch = [train[i] for i in global_batch(len(train), cfg.seed, step, size)]
            mine = batch[rank * per_process: (rank + 1) * per_process]
            loss_sum, wins = 0.0, 0
            for m in range(cfg.grad_accum):
                micro = mine[m * cfg.batch_size: (m + 1) * cfg.batch_size]
                sync = acc.no_sync(model) if m < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    with autocast(cfg.bf16):
                        scores = sequence_scores(model, [c for c, _ in micro] + [r for _, r in micro], pad_id)
                    scores = scores.float()
                    r_chosen, r_rejected = scores[: len(micro)], scores[len(micro):]
                    loss = bradley_terry_loss(r_chosen, r_rejected, cfg.margin) * len(micro) / size
                    acc.backward(loss * world)  # DDP averages over processes
                loss_sum += float(loss.detach())
                wins += int((r_chosen > r_rejected).sum())
            loss_total = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="sum"))
            if not math.isfinite(loss_total) or not grads_finite(model):
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                what = "gradients" if math.isfinite(loss_total) else "loss"
                bad_steps = skip_bad_step(step + 1, bad_steps, cfg.max_bad_steps, what, metrics_log, out,
                                          loss=loss_total)
                end_of_step(step + 1, total_steps, cfg.save_every, stop, checkpoint, metrics_log, out)
                continue
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            win_total = float(acc.reduce(torch.tensor(float(wins), device=acc.device), reduction="sum"))
            metrics = {"loss": loss_total, "train_pair_accuracy": win_total / size, "grad_norm": float(grad_norm),
                       "lr": scheduler.get_last_lr()[0], "elapsed": time.time() - t0}
            if done % cfg.eval_every == 0 or done == total_steps:
                ev = evaluate_orm(acc.unwrap_model(model), tokenizer, valid_recs, cfg)
                metrics.update({f"valid_{k}": v for k, v in ev.items() if isinstance(v, float)})
                tax = ev["by_reflection"]["right_plain_above_reflected"]["share"]
                if tax is not None:
                    metrics["valid_right_plain_above_reflected"] = tax
                rank_key = [ev["best_of_k"], ev["pairwise_accuracy"] or 0.0]
                if best is None or rank_key > best["key"]:
                    best = {"step": done, "key": rank_key, "metrics": ev}
                    if acc.is_main_process:
                        save_model_atomic(acc.unwrap_model(model), tokenizer, best_dir, {"step": done, "metrics": ev})
                    acc.wait_for_everyone()
                result["last_eval"] = ev
            if done % cfg.log_every == 0 or "valid_best_of_k" in metrics:
                metrics_log.log(done, metrics)
            result["loss"] = loss_total
            end_of_step(done, total_steps, cfg.save_every, stop, checkpoint, metrics_log, out)
    metrics_log.close()

    # 5. the best held-out checkpoint becomes the ORM
    acc.wait_for_everyone()
    if acc.is_main_process:
        if best is None or not best_dir.is_dir():
            raise SatoriError(f"{out}: no evaluated checkpoint to select (missing {best_dir})")
        saved = read_json(best_dir / "selected.json")["step"] if (best_dir / "selected.json").is_file() else None
        if saved != best["step"]:
            raise SatoriError(f"{best_dir} holds step {saved} but the run selected step {best['step']}; "
                              "rerun without --resume")
        (best_dir / "selected.json").unlink()
        for f in best_dir.iterdir():
            shutil.copy2(f, out / f.name)
        shutil.rmtree(best_dir)
        result.update(best_step=best["step"], best=best["metrics"], bad_steps=bad_steps,
                      seconds=round(time.time() - t0, 2), final=selected_text(best["step"], best["metrics"], cfg.k))
        write_json(out / "orm_result.json", {"config": to_dict(cfg), "result": result})
    acc.wait_for_everyone()
    return result


def save_model_atomic(model: Any, tokenizer: Any, folder: Path, info: dict[str, Any]) -> None:
    """Write model + tokenizer (+ ``selected.json`` = ``info``) to ``folder`` via a temporary
    folder and a rename."""
    tmp = folder.with_name(f".{folder.name}-tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, safe_serialization=True)
    model.config.use_cache = False
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "selected.json", info)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)

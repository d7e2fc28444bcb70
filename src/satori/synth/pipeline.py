"""``satori synth``: stage-1 demonstration synthesis (METHOD.md §2).

For each batch of problems (``batch_size`` problems → one batched generate call):

1. the *generator* samples ``n_samples`` chain-of-thought solutions per problem; they are
   graded (and, on testbed problems with ``check_steps``, every step must check out too);
   up to ``k_keep`` distinct correct and ``k_keep`` distinct wrong ones are kept (only
   solutions that end with a boxed answer and were not cut by the length limit);
2. each kept correct solution becomes a type-I trajectory as it is, and a candidate for a
   verification; each kept wrong one a candidate for a correction;
3. for up to ``max_rounds`` rounds the *critic* writes its feedback (a ``<|reflect|>``
   verification, or a ``<|reflect|>`` + ``<|explore|>`` correction), placed after the named
   step or after the whole solution (``reflect_position``: ``step``, ``end`` or ``mix``
   with ``end_fraction``; see :mod:`satori.synth.trajectory`), and the generator continues
   from the feedback in its own plain format; trajectories that end wrong get another round;
4. the *selector* keeps the best trajectory of each type per problem (types I, II-I,
   II-II, III-I, III-II); only trajectories that end correct and are valid COAT are kept.

Output folder: ``trajectories.jsonl`` (one record per kept trajectory: ``id``, ``question``,
``answer``, ``response``, ``type``, ``provenance``, ``meta``; ``question`` + ``response``
is what ``satori sft`` reads), ``done.jsonl`` (one line of statistics per processed
problem: the done marker), ``errors.jsonl`` (problems whose backend requests failed; they
are not marked done), ``config.json`` and ``summary.json``.

Resume: records of a batch are appended and fsynced before the batch's done markers. A
re-run with the same folder drops records of problems without a done marker (a batch cut
short) and any half-written line, then skips done problems. With a local (``hf``)
generator a batch cut short is regenerated whole with its own seed, so a resumed run writes
the same records as an uninterrupted one (same seed, data and batch settings); with an
``openai`` generator only the missing problems are requested again (per-problem seeds).
A problem whose requests failed is reported in ``errors.jsonl`` and retried by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import satori
from satori.coat import behaviour, is_valid_coat
from satori.config import check, to_dict
from satori.data import SATORI_PROMPT, DataConfig, Problem, build_prompt, load_problems, question_text
from satori.errors import SatoriError
from satori.grading import extract_answer, grade_batch
from satori.synth import agents as ag
from satori.synth import backends as be
from satori.synth import trajectory as tj
from satori.testbed import BASE_MODEL_DIR
from satori.testbed.checker import check_steps
from satori.testbed.tasks import has_ground_truth
from satori.utils import atomic_write_text, set_threads, write_json

log = logging.getLogger("satori")

GENERATOR_BACKENDS = ("hf", "openai")
CRITIC_BACKENDS = ("rule", "hf", "openai")
SELECTOR_BACKENDS = ("rule", "orm")
#: Settings that change the records; a resumed run must match them.
_RESULT_KEYS = ("data", "generator", "critic", "selector", "n_samples", "k_keep", "temperature",
                "max_new_tokens", "max_rounds", "reflect_position", "end_fraction", "batch_size",
                "gen_batch_size", "seed", "check_steps")
_RUNTIME_AGENT_KEYS = ("timeout", "max_retries", "backoff", "concurrency", "base_url", "api_key_env")


@dataclass
class AgentConfig:
    """One agent's backend.

    ``backend``: generator ``hf`` | ``openai``; critic ``rule`` | ``hf`` | ``openai``;
    selector ``rule`` | ``orm``; empty means the role's default (``hf``, ``rule``, ``rule``). ``path``: local model folder (``hf``, ``orm``; empty for the
    generator means the shipped testbed base model). ``base_url``, ``model``,
    ``api_key_env`` (the NAME of the variable holding the key; '' for none), ``timeout``,
    ``max_retries``, ``backoff``, ``concurrency``, ``continue_mode``: the ``openai`` backend.
    ``temperature`` and ``max_new_tokens`` apply to an LLM critic (the generator uses the
    top-level settings).
    """

    backend: str = field(default="", metadata={"help": "hf, openai, rule or orm ('' = the role's default)"})
    path: str = field(default="", metadata={"help": "local model folder (hf, orm)"})
    base_url: str = field(default="", metadata={"help": "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1"})
    model: str = field(default="", metadata={"help": "served model name (openai)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "NAME of the API key variable ('' = none)"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per request (openai)"})
    max_retries: int = field(default=4, metadata={"help": "retries on errors, 5xx, 429, time-outs (openai)"})
    backoff: float = field(default=1.0, metadata={"help": "first back-off in seconds, doubled per retry"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight (openai)"})
    continue_mode: str = field(default="prefix", metadata={"help": "prefix (assistant prefix) or instruction"})
    temperature: float = field(default=0.0, metadata={"help": "critic sampling temperature (0 = greedy)"})
    max_new_tokens: int = field(default=256, metadata={"help": "critic reply length"})
    dtype: str = field(default="float32", metadata={"help": "hf/orm weights dtype"})

    def validate(self) -> None:
        check(self.backend in set(("",) + GENERATOR_BACKENDS + CRITIC_BACKENDS + SELECTOR_BACKENDS),
              f"unknown agent backend {self.backend!r}")
        check(self.timeout > 0, f"agent timeout must be > 0, got {self.timeout}")
        check(self.max_retries >= 0, f"agent max_retries must be >= 0, got {self.max_retries}")
        check(self.backoff >= 0, f"agent backoff must be >= 0, got {self.backoff}")
        check(self.concurrency >= 1, f"agent concurrency must be >= 1, got {self.concurrency}")
        check(self.continue_mode in ("prefix", "instruction"),
              f"agent continue_mode must be prefix or instruction, got {self.continue_mode!r}")
        check(self.temperature >= 0, f"agent temperature must be >= 0, got {self.temperature}")
        check(self.max_new_tokens >= 1, f"agent max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class SynthConfig:
    """``satori synth``: build COAT demonstrations with generator, critic and selector."""

    __aliases__: ClassVar[dict[str, str]] = {"data": "data.path"}

    data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:train"))
    out: str = field(default="runs/synth", metadata={"help": "output folder (resumed if it exists)"})
    generator: AgentConfig = field(default_factory=AgentConfig)
    critic: AgentConfig = field(default_factory=AgentConfig)
    selector: AgentConfig = field(default_factory=AgentConfig)
    n_samples: int = field(default=8, metadata={"help": "generator samples per problem"})
    k_keep: int = field(default=4, metadata={"help": "correct and wrong samples kept per problem"})
    temperature: float = field(default=0.7, metadata={"help": "generator sampling temperature"})
    max_new_tokens: int = field(default=160, metadata={"help": "generator tokens per solution / continuation"})
    max_rounds: int = field(default=2, metadata={"help": "critic rounds (0..2)"})
    reflect_position: str = field(default="mix", metadata={"help": "step, end or mix"})
    end_fraction: float = field(default=0.5, metadata={"help": "share of reflections placed at the end (mix)"})
    batch_size: int = field(default=32, metadata={"help": "problems per batch (one generate call)"})
    gen_batch_size: int = field(default=256, metadata={"help": "rows per forward pass of an hf generator"})
    seed: int = 0
    check_steps: bool = field(default=True, metadata={"help": "testbed: correct = answer and every step right"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: OMP_NUM_THREADS when set, else all cores)"})
    progress: bool = True

    def __post_init__(self) -> None:
        for acfg, default in ((self.generator, "hf"), (self.critic, "rule"), (self.selector, "rule")):
            if not acfg.backend:
                acfg.backend = default

    def validate(self) -> None:
        check(self.generator.backend in GENERATOR_BACKENDS,
              f"generator.backend must be one of {list(GENERATOR_BACKENDS)}, got {self.generator.backend!r}")
        check(self.critic.backend in CRITIC_BACKENDS,
              f"critic.backend must be one of {list(CRITIC_BACKENDS)}, got {self.critic.backend!r}")
        check(self.selector.backend in SELECTOR_BACKENDS,
              f"selector.backend must be one of {list(SELECTOR_BACKENDS)}, got {self.selector.backend!r}")
        check(self.n_samples >= 1, f"n_samples must be >= 1, got {self.n_samples}")
        check(self.k_keep >= 1, f"k_keep must be >= 1, got {self.k_keep}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(0 <= self.max_rounds <= 2, f"max_rounds must be 0, 1 or 2, got {self.max_rounds}")
        check(self.reflect_position in ("step", "end", "mix"),
              f"reflect_position must be step, end or mix, got {self.reflect_position!r}")
        check(0.0 <= self.end_fraction <= 1.0, f"end_fraction must be in [0, 1], got {self.end_fraction}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.gen_batch_size >= 1, f"gen_batch_size must be >= 1, got {self.gen_batch_size}")
        check(bool(self.out), "out must name an output folder")
        check(self.selector.backend != "orm" or bool(self.selector.path),
              "selector.path must name the outcome reward model folder (selector.backend orm)")
        check(self.critic.backend != "hf" or bool(self.critic.path),
              "critic.path must name a local model folder (critic.backend hf)")


# --------------------------------------------------------------------------- agents


@dataclass
class Agents:
    """The loaded agents of a run (models, tokenizers, HTTP clients)."""

    generator: AgentConfig
    critic: AgentConfig
    selector: AgentConfig
    gen_model: Any = None
    gen_tok: Any = None
    gen_client: be.OpenAIClient | None = None
    critic_model: Any = None
    critic_tok: Any = None
    critic_client: be.OpenAIClient | None = None
    orm_model: Any = None
    orm_tok: Any = None


def _model_dir(path: str, role: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise SatoriError(f"{role}: model path does not exist: {p}")
    if not (p / "config.json").is_file():
        raise SatoriError(f"{role}: {p} is not a Hugging Face model folder (no config.json)")
    return p


def prepare_agents(cfg: SynthConfig, problems: list[Problem], load_models: bool = True) -> Agents:
    """Check every agent's configuration, then load models and open clients.

    All checks (paths, API-key variables, ground truth for the rule critic, endpoint
    probes) run before any model is loaded, so a bad setting fails in seconds. With
    ``load_models=False`` only the checks run (``satori run --dry-run``).
    """
    gen_path = cfg.generator.path or str(BASE_MODEL_DIR)
    if cfg.generator.backend == "hf":
        if not cfg.generator.path and not Path(gen_path).exists():
            raise SatoriError(f"generator: no generator.path given and the shipped testbed base model is "
                              f"missing at {gen_path} (run 'satori pretrain' or set generator.path)")
        _model_dir(gen_path, "generator")
    if cfg.critic.backend == "hf":
        _model_dir(cfg.critic.path, "critic")
    if cfg.critic.backend == "rule":
        lacking = [p.id for p in problems if not has_ground_truth(p)]
        if lacking:
            raise SatoriError(f"critic: backend rule needs testbed problems with ground truth, but {len(lacking)} "
                              f"problem(s) have none (first: {lacking[0]!r}); use critic.backend hf or openai")
    if cfg.selector.backend == "orm":
        _model_dir(cfg.selector.path, "selector")
    agents = Agents(cfg.generator, cfg.critic, cfg.selector)
    clients = []
    for role, acfg in (("generator", cfg.generator), ("critic", cfg.critic)):
        if acfg.backend == "openai":
            client = be.make_client(acfg.base_url, acfg.model, acfg.api_key_env, acfg.timeout, acfg.max_retries,
                                    acfg.backoff, acfg.concurrency, acfg.continue_mode, role)
            clients.append(client)
            setattr(agents, f"{'gen' if role == 'generator' else 'critic'}_client", client)
    for client in clients:
        be.probe(client)
    if not load_models:
        for client in clients:
            client.http.close()
        return agents
    from satori.rollout import load_model, load_tokenizer

    loaded: dict[tuple[str, str], tuple[Any, Any]] = {}

    def load(path: str, dtype: str) -> tuple[Any, Any]:
        key = (str(Path(path).resolve()), dtype)
        if key not in loaded:
            loaded[key] = (load_model(path, dtype=dtype), load_tokenizer(path))
        return loaded[key]

    if cfg.generator.backend == "hf":
        agents.gen_model, agents.gen_tok = load(gen_path, cfg.generator.dtype)
    if cfg.critic.backend == "hf":
        agents.critic_model, agents.critic_tok = load(cfg.critic.path, cfg.critic.dtype)
    if cfg.selector.backend == "orm":
        from satori.train.orm import load_orm

        agents.orm_model, agents.orm_tok = load_orm(_model_dir(cfg.selector.path, "selector"))
    return agents


def prompt_body(problem: Problem) -> str:
    """The maths prompt without any chat wrapping (what a chat endpoint receives)."""
    return question_text(problem) if problem.meta.get("choices") else SATORI_PROMPT.format(question=problem.question)


def run_generator(agents: Agents, cfg: SynthConfig, problems: list[Problem], prefixes: list[str], n: int,
                  seed: int) -> list[list[be.Completion | be.RequestFailed]]:
    """``n`` generator completions per (problem, prefix); prefixes are plain partial
    solutions to continue ('' to start from scratch)."""
    if agents.generator.backend == "hf":
        prompts = [build_prompt(p, agents.gen_tok) + pre for p, pre in zip(problems, prefixes)]
        return be.hf_complete(agents.gen_model, agents.gen_tok, prompts, n=n, temperature=cfg.temperature,
                              max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.gen_batch_size)
    requests = []
    for i, (p, pre) in enumerate(zip(problems, prefixes)):
        messages, extra = be.generator_messages(prompt_body(p), pre, agents.gen_client.continue_mode)
        for j in range(n):
            requests.append(dict(messages=messages, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 seed=ag.pick(f"{cfg.seed}/{p.id}/{pre}/{j}", 2**31), extra=extra))
    flat = be.chat_many(agents.gen_client, requests)
    return [flat[i * n:(i + 1) * n] for i in range(len(problems))]


def run_llm_critic(agents: Agents, prompts: list[str], seed: int) -> list[str | be.RequestFailed]:
    """The LLM critic's replies to its prompts (hf: chat template when the tokenizer has one)."""
    c = agents.critic
    if c.backend == "hf":
        tok = agents.critic_tok
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 if getattr(tok, "chat_template", None) else q + "\n" for q in prompts]
        out = be.hf_complete(agents.critic_model, tok, texts, n=1, temperature=c.temperature,
                             max_new_tokens=c.max_new_tokens, seed=seed, batch_size=64)
        return [o[0].text for o in out]
    replies = be.chat_many(agents.critic_client, [
        dict(messages=[{"role": "user", "content": q}], max_tokens=c.max_new_tokens, temperature=c.temperature,
             seed=ag.pick(f"{seed}/{q}", 2**31)) for q in prompts])
    return [r if isinstance(r, be.RequestFailed) else r.text for r in replies]


def judge(problems: list[Problem], texts: list[str], truncated: list[bool], strict: bool) -> list[tuple[bool, bool]]:
    """``(answer correct, correct)`` per text; ``correct`` also needs every step right on
    testbed problems when ``strict``."""
    graded = grade_batch(texts, [p.answer for p in problems], truncated=truncated, last_number_fallback=False)
    out = []
    for p, t, (_, ok) in zip(problems, texts, graded):
        steps_ok = ok and (not strict or not has_ground_truth(p) or check_steps(p, t).first_wrong_step is None)
        out.append((ok, steps_ok))
    return out


def has_answer(text: str) -> bool:
    """Whether a text ends its reasoning with a closed, non-empty boxed answer."""
    return "\\boxed" in text and extract_answer(text, last_number_fallback=False) is not None


def choose_position(cfg: SynthConfig, key: str) -> str:
    """Where a reflection goes: fixed, or for ``mix`` ``end`` with probability ``end_fraction``."""
    if cfg.reflect_position != "mix":
        return cfg.reflect_position
    return "end" if ag.unit(key + "/position") < cfg.end_fraction else "step"


# --------------------------------------------------------------------------- one batch


@dataclass
class _Chain:
    """A trajectory under refinement and where it started."""

    problem: int
    traj: tj.Trajectory
    start: str  # "verify" (from a correct sample) or "correct" (from a wrong one)


def _new_stats(n: int) -> dict[str, int]:
    return {"samples": n, "answer_correct": 0, "correct": 0, "truncated": 0, "kept_correct": 0, "kept_wrong": 0,
            "verify_attempted": 0, "verify_succeeded": 0, "correct_attempted": 0, "correct_succeeded": 0,
            "critic_failures": 0, "continuation_failures": 0}


def synth_batch(agents: Agents, cfg: SynthConfig, problems: list[Problem], seed: int) -> list[dict[str, Any]]:
    """Run generator, critic and selector on a batch of problems.

    Returns one result per problem: ``{"id", "records", "stats", "error"}`` (``error`` set
    when a backend request failed for good; such a problem has no records).
    """
    stats = [_new_stats(cfg.n_samples) for _ in problems]
    errors: list[str | None] = [None] * len(problems)
    comps = run_generator(agents, cfg, problems, [""] * len(problems), cfg.n_samples, seed)
    flat = [(i, j, c) for i, cs in enumerate(comps) for j, c in enumerate(cs)]
    for i, _, c in flat:
        if isinstance(c, be.RequestFailed):
            errors[i] = errors[i] or c.error
    ok_flat = [(i, j, c) for i, j, c in flat if isinstance(c, be.Completion)]
    verdicts = judge([problems[i] for i, _, _ in ok_flat], [c.text for _, _, c in ok_flat],
                     [c.truncated for _, _, c in ok_flat], cfg.check_steps)
    digests = [hashlib.sha256() for _ in problems]
    finals: list[tuple[int, tj.Trajectory]] = []
    pending: list[tuple[_Chain, str]] = []
    seen: list[dict[bool, set[str]]] = [{True: set(), False: set()} for _ in problems]
    for (i, j, c), (ans_ok, ok) in zip(ok_flat, verdicts):
        digests[i].update(c.text.encode("utf-8") + b"\0")
        s = stats[i]
        s["answer_correct"] += ans_ok
        s["correct"] += ok
        s["truncated"] += c.truncated
        if c.truncated or not has_answer(c.text) or c.text in seen[i][ok]:
            continue
        traj = tj.from_cot(c.text, sample=j)
        if traj is None or len(seen[i][ok]) >= cfg.k_keep:
            continue
        seen[i][ok].add(c.text)
        if ok:
            s["kept_correct"] += 1
            finals.append((i, traj))
            if cfg.max_rounds >= 1:
                s["verify_attempted"] += 1
                pending.append((_Chain(i, traj, "verify"), "verify"))
        else:
            s["kept_wrong"] += 1
            if cfg.max_rounds >= 1:
                s["correct_attempted"] += 1
                pending.append((_Chain(i, traj, "correct"), "correct"))

    for rnd in range(1, cfg.max_rounds + 1):
        pending = [(ch, kind) for ch, kind in pending if errors[ch.problem] is None]
        if not pending:
            break
        feedback = _critique(agents, cfg, problems, pending, rnd, seed)
        complete: list[_Chain] = []
        to_continue: list[_Chain] = []
        for (ch, kind), fb in zip(pending, feedback):
            if isinstance(fb, be.RequestFailed):
                errors[ch.problem] = errors[ch.problem] or fb.error
                continue
            fb, position = fb
            if not ag.valid_feedback(fb):
                stats[ch.problem]["critic_failures"] += 1
                continue
            answer = extract_answer(tj.response(ch.traj), last_number_fallback=False)
            new, done = tj.apply_feedback(ch.traj, fb, position, answer)
            (complete if done else to_continue).append(_Chain(ch.problem, new, ch.start))
        conts = run_generator(agents, cfg, [problems[ch.problem] for ch in to_continue],
                              [tj.continuation_prefix(ch.traj) for ch in to_continue], 1, seed + 7919 * rnd)
        for ch, (c,) in zip(to_continue, conts):
            if isinstance(c, be.RequestFailed):
                errors[ch.problem] = errors[ch.problem] or c.error
                continue
            new = None if c.truncated else tj.extend(ch.traj, c.text)
            if new is None:
                stats[ch.problem]["continuation_failures"] += 1
                continue
            complete.append(_Chain(ch.problem, new, ch.start))
        texts = [tj.response(ch.traj) for ch in complete]
        verdicts = judge([problems[ch.problem] for ch in complete], texts, [False] * len(texts), cfg.check_steps)
        pending = []
        for ch, text, (_, ok) in zip(complete, texts, verdicts):
            if ok:
                finals.append((ch.problem, ch.traj))
                stats[ch.problem][f"{ch.start}_succeeded"] += 1
            elif rnd < cfg.max_rounds and has_answer(text):
                pending.append((ch, "correct"))

    return _select(agents, cfg, problems, finals, stats, errors, digests)


def _critique(agents: Agents, cfg: SynthConfig, problems: list[Problem], pending: list[tuple[_Chain, str]],
              rnd: int, seed: int) -> list[tuple[tj.Feedback | None, str] | be.RequestFailed]:
    """Feedback and reflection position for each pending chain."""
    out: list[Any] = []
    keys, positions = [], []
    for ch, kind in pending:
        key = f"{cfg.seed}/{problems[ch.problem].id}/{ch.traj.sample}/{ch.start}/{rnd}"
        keys.append(key)
        positions.append(choose_position(cfg, key))
    if agents.critic.backend == "rule":
        for (ch, kind), key, pos in zip(pending, keys, positions):
            p, texts = problems[ch.problem], tj.line_texts(ch.traj)
            if kind == "correct":
                out.append((ag.rule_correction(p, texts, key), pos))
                continue
            fb = ag.rule_verification(p, texts, key, last_ok=pos == "end")
            if fb is None and pos == "step":
                fb, pos = ag.rule_verification(p, texts, key, last_ok=True), "end"
            out.append((fb, pos))
        return out
    prompts = [ag.critic_prompt(problems[ch.problem], tj.line_texts(ch.traj), kind) for ch, kind in pending]
    replies = run_llm_critic(agents, prompts, seed + 104729 * rnd)
    for (ch, kind), reply, pos in zip(pending, replies, positions):
        if isinstance(reply, be.RequestFailed):
            out.append(reply)
        else:
            out.append((ag.parse_critic_reply(reply, kind, len(ch.traj.line)), pos))
    return out


def _select(agents: Agents, cfg: SynthConfig, problems: list[Problem], finals: list[tuple[int, tj.Trajectory]],
            stats: list[dict[str, int]], errors: list[str | None], digests: list[Any]) -> list[dict[str, Any]]:
    """The best trajectory of each type per problem, as output records."""
    candidates = []
    for i, traj in finals:
        if errors[i] is not None:
            continue
        text = tj.response(traj)
        ttype = tj.type_of_rounds(traj.rounds)
        if ttype is None or not is_valid_coat(text):
            continue
        candidates.append((i, traj, text, ttype))
    scores: list[float | None] = [None] * len(candidates)
    if agents.selector.backend == "orm" and candidates:
        from satori.train.orm import score_sequences

        scores = score_sequences(agents.orm_model, agents.orm_tok,
                                 [build_prompt(problems[i], agents.orm_tok) for i, _, _, _ in candidates],
                                 [text for _, _, text, _ in candidates]).tolist()
    best: dict[tuple[int, str], tuple[tuple, int]] = {}
    for c, (i, traj, text, ttype) in enumerate(candidates):
        rule = ag.rule_key(True, text, behaviour(text)["n_reflect"], traj.sample)
        key = ((-scores[c],) if scores[c] is not None else ()) + rule
        if (i, ttype) not in best or key < best[(i, ttype)][0]:
            best[(i, ttype)] = (key, c)
    results = []
    for i, p in enumerate(problems):
        records = []
        for ttype in tj.TYPES:
            if (i, ttype) not in best:
                continue
            c = best[(i, ttype)][1]
            _, traj, text, _ = candidates[c]
            records.append({
                "id": p.id, "question": p.question, "answer": p.answer, "response": text, "type": ttype,
                "provenance": tj.provenance(traj),
                "meta": {"sample": traj.sample, "rounds": traj.rounds, "positions": traj.positions,
                         "score": scores[c], "selector": agents.selector.backend,
                         **{k: p.meta[k] for k in ("level", "source", "split") if k in p.meta}},
            })
        st = dict(stats[i], types=[r["type"] for r in records], sample_digest=digests[i].hexdigest()[:16])
        results.append({"id": p.id, "records": records, "stats": st, "error": errors[i]})
    return results


# --------------------------------------------------------------------------- files and resume


def _complete_lines(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The JSON records of a JSONL file that were fully written, and whether anything
    (a half-written line) had to be dropped."""
    if not path.exists():
        return [], False
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # what follows the last newline: empty unless a line was cut short
    records, dropped = [], bool(tail.strip())
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            dropped = True
    return records, dropped


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def recover(out: Path) -> dict[str, dict[str, Any]]:
    """Done problems (id → statistics) of an existing output folder, after dropping the
    records of problems without a done marker and any half-written line."""
    done_lines, dropped = _complete_lines(out / "done.jsonl")
    done = {d["id"]: d for d in done_lines}
    if dropped or len(done) != len(done_lines):
        atomic_write_text(out / "done.jsonl", _jsonl(list(done.values())))
    records, dropped = _complete_lines(out / "trajectories.jsonl")
    kept = [r for r in records if r.get("id") in done]
    if dropped or len(kept) != len(records):
        log.info("synth: discarding %d record(s) of unfinished problems", len(records) - len(kept))
        atomic_write_text(out / "trajectories.jsonl", _jsonl(kept))
    return done


def _append(path: Path, lines: list[dict[str, Any]]) -> None:
    """Append JSONL lines and force them to disk."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(_jsonl(lines))
        fh.flush()
        os.fsync(fh.fileno())


def _result_config(cfg: SynthConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    out = {k: d[k] for k in _RESULT_KEYS}
    for role in ("generator", "critic", "selector"):
        out[role] = {k: v for k, v in out[role].items() if k not in _RUNTIME_AGENT_KEYS}
    return out


def _check_resume(out: Path, cfg: SynthConfig) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text()).get("result_config", {})
    new = _result_config(cfg)
    for k in new:
        if old.get(k) != new[k]:
            raise SatoriError(f"{out} holds a synth run with a different '{k}' setting; "
                              "use another out folder or the same settings to resume")


def summarize(done: dict[str, dict[str, Any]], n_problems: int, failed: dict[str, str], seconds: float) -> dict[str, Any]:
    """The run summary from the per-problem statistics of every done problem."""
    tot: dict[str, int] = {}
    types = {t: 0 for t in tj.TYPES}
    with_traj = 0
    for d in done.values():
        for k, v in d.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds":
                tot[k] = tot.get(k, 0) + v
        for t in d.get("types", []):
            types[t] += 1
        with_traj += bool(d.get("types"))

    def rate(a: str, b: str) -> float | None:
        return round(tot.get(a, 0) / tot[b], 4) if tot.get(b) else None

    return {
        "problems": n_problems,
        "processed": len(done),
        "failed": len(failed),
        "failed_ids": sorted(failed)[:50],
        "records": sum(types.values()),
        "types": types,
        "problems_with_trajectories": with_traj,
        "generator": {"samples": tot.get("samples", 0), "accuracy": rate("answer_correct", "samples"),
                      "step_accuracy": rate("correct", "samples"), "truncated": tot.get("truncated", 0)},
        "refinement": {"attempted": tot.get("correct_attempted", 0), "succeeded": tot.get("correct_succeeded", 0),
                       "success_rate": rate("correct_succeeded", "correct_attempted")},
        "verification": {"attempted": tot.get("verify_attempted", 0), "succeeded": tot.get("verify_succeeded", 0),
                         "success_rate": rate("verify_succeeded", "verify_attempted")},
        "critic_failures": tot.get("critic_failures", 0),
        "continuation_failures": tot.get("continuation_failures", 0),
        "seconds": round(seconds, 2),
        "seconds_all_runs": round(sum(d.get("seconds", 0.0) for d in done.values()), 2),
    }


def run_synth(cfg: SynthConfig) -> dict[str, Any]:
    """Synthesize COAT demonstrations into ``cfg.out``; returns (and writes) the summary."""
    t0 = time.perf_counter()
    cfg.data.validate()
    cfg.generator.validate()
    cfg.critic.validate()
    cfg.selector.validate()
    cfg.validate()
    problems = load_problems(cfg.data)
    if not problems:
        raise SatoriError("synth: the data holds no problems")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SatoriError(f"out {out} exists and is not a folder")
    _check_resume(out, cfg)
    agents = prepare_agents(cfg, problems)
    set_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    done = recover(out)
    if not (out / "config.json").exists():
        write_json(out / "config.json", {"config": to_dict(cfg), "result_config": _result_config(cfg),
                                         "satori_version": satori.__version__})
    failed: dict[str, str] = {}
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(problems), initial=sum(p.id in done for p in problems), desc="synth", unit="problem")
    try:
        for b, start in enumerate(range(0, len(problems), cfg.batch_size)):
            batch = problems[start:start + cfg.batch_size]
            if all(p.id in done for p in batch):
                continue
            tb = time.perf_counter()
            # a local generator redoes the whole batch (cheap), so its sampling is the same as
            # in an uninterrupted run; an endpoint is asked only about the missing problems
            # (its requests carry per-problem seeds)
            whole = cfg.generator.backend == "hf"
            work = batch if whole else [p for p in batch if p.id not in done]
            results = synth_batch(agents, cfg, work, seed=cfg.seed * 1_000_003 + b * 9_973)
            todo = [r for r in results if r["id"] not in done]
            ok = [r for r in todo if r["error"] is None]
            share = (time.perf_counter() - tb) / max(1, len(todo))
            _append(out / "trajectories.jsonl", [rec for r in ok for rec in r["records"]])
            for r in todo:
                if r["error"] is not None:
                    failed[r["id"]] = r["error"]
                    log.error("synth: problem %s failed: %s", r["id"], r["error"])
            if len(ok) < len(todo):
                _append(out / "errors.jsonl", [{"id": r["id"], "error": r["error"]} for r in todo if r["error"]])
            markers = [{"id": r["id"], **r["stats"], "seconds": round(share, 4)} for r in ok]
            _append(out / "done.jsonl", markers)
            done.update({m["id"]: m for m in markers})
            if bar is not None:
                bar.update(len(todo))
    finally:
        if bar is not None:
            bar.close()
        for client in (agents.gen_client, agents.critic_client):
            if client is not None:
                client.http.close()
    summary = summarize({p.id: done[p.id] for p in problems if p.id in done}, len(problems), failed,
                        time.perf_counter() - t0)
    write_json(out / "summary.json", summary)
    return summary

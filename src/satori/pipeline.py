"""``satori run CONFIG``: the whole pipeline in one command, then the report.

Satori branch (per seed)::

    base ─ synth ─ sft_coat ─ samples ─┬─ orm ─┐
                                       └─ rae ─┴─ rl_round1 ─ distill ─ rl_round2

LaTRO branch (per seed): ``base ─ latro`` and the baseline ``base ─ sft_gold`` (SFT on the
gold rationales). Ablations (per seed, when listed in ``ablations``): ``rl_no_rae`` (no
restart buffer), ``rl_rule_only`` (no ORM in the reward, critic from the policy),
``rl_beta0`` (no reflection bonus), and ``cot``: ``sft_cot`` (format tuning on the same
demonstrations with every reflect / explore step removed: the generator's correct plain
chains of thought) then ``rl_cot`` (the same RL, no restart buffer since there is nothing
to restart from).

Every model is evaluated on the test split (greedy pass@1 and ``k`` samples for maj@k) and
on the out-of-distribution split; model selection inside the stages only ever looks at the
validation split. Each stage writes into ``run_dir/<stage>`` and is skipped when its
result exists for the same configuration and inputs (see :mod:`satori.stages`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from satori import __version__
from satori.config import check, to_dict
from satori.data import DataConfig, load_problems, read_jsonl
from satori.errors import SatoriError
from satori.evaluate import EvalConfig, evaluate
from satori.rae import CUT_RULE, RAEConfig, run_rae
from satori.stages import Runner, folder_fingerprint
from satori.synth.pipeline import SynthConfig, run_synth
from satori.testbed.pretrain import PretrainConfig
from satori.train.distill import DistillConfig, run_distill
from satori.train.latro import LatroConfig, run_latro
from satori.train.orm import ORMConfig, run_orm
from satori.train.ppo import RLConfig, run_rl
from satori.train.sft import SFTConfig, run_sft
from satori.utils import write_jsonl

ABLATIONS = ("no_rae", "rule_only", "beta0", "cot")
SHIPPED_BASE = Path(__file__).parent / "assets" / "testbed-base"


@dataclass
class PipelineConfig:
    """``satori run``: every stage's configuration in one file (see ``configs/``)."""

    name: str = "quick"
    out: str = field(default="", metadata={"help": "run folder (default: runs/NAME)"})
    seeds: list[int] = field(default_factory=lambda: [0])
    base_model: str = field(default="testbed", metadata={
        "help": "'testbed' (the shipped testbed base model, or pretrained when missing), 'pretrain' "
                "(always pretrain it), or a local model folder"})
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train_data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:train", n=400))
    valid_data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:valid", n=100))
    test_data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:test", n=200))
    ood_data: DataConfig = field(default_factory=lambda: DataConfig(path="testbed:ood", n=100))
    format_data: DataConfig = field(default_factory=lambda: DataConfig(path=""), metadata={
        "help": "the problems stage 1's demonstrations are synthesised on (path '' = train_data); the paper "
                "format-tunes on 10K problems, its own set, and RL samples another"})
    distill_data: DataConfig = field(default_factory=lambda: DataConfig(path=""), metadata={
        "help": "the pool the round-1 policy is sampled on for distillation (path '' = train_data); a pool "
                "larger than RL's problems gives the base model more of the hardest solved ones"})
    rl_valid_data: DataConfig = field(default_factory=lambda: DataConfig(path=""), metadata={
        "help": "the held-out problems that pick each RL run's policy when rl.eval_every / rl2.eval_every > 0 "
                "(path '' = valid_data); selection among checkpoints a point apart needs more of them than the "
                "ORM's and LaTRO's selection"})
    synth: SynthConfig = field(default_factory=SynthConfig)
    format_sft: SFTConfig = field(default_factory=SFTConfig)
    orm: ORMConfig = field(default_factory=ORMConfig)
    rae: RAEConfig = field(default_factory=RAEConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rl2: RLConfig = field(default_factory=lambda: RLConfig(temperature=1.2, n_samples=8))
    latro: LatroConfig = field(default_factory=LatroConfig)
    gold_sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(k=8))
    claim_sample_limit: int = field(default=0, metadata={
        "help": "draw the k samples of the models a claim compares on their sampled answers (the F→T claim: "
                "sft_coat and rl_round1) for the first N test problems, not eval.sample_limit (0: the same). A "
                "share of the few reflected answers that changed needs more samples than the other columns"})
    branches: list[str] = field(default_factory=lambda: ["satori", "latro"])
    ablations: list[str] = field(default_factory=list)
    trajectories_per_model: int = field(default=6, metadata={"help": "examples in the report's viewer"})
    format_mask_mistakes: bool = field(default=True, metadata={
        "help": "format tuning reads the mistaken steps before a correction's first <|reflect|> but is not "
                "trained to write them (satori.synth.trajectory.mistakes_as_context)"})
    stage_processes: bool = field(default=True, metadata={
        "help": "run each stage in its own child process, so its memory is freed when it ends (peak = the "
                "largest stage, not the sum); ignored under a multi-process launch (WORLD_SIZE > 1)"})
    format_fix_share: float = field(default=0.5, metadata={
        "help": "at most this share of the format-tuning demonstrations are corrections (types III-*); "
                "1 keeps every demonstration (satori.synth.trajectory.balance_corrections)"})

    def validate(self) -> None:
        check(len(self.seeds) > 0, "seeds must list at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct, got {self.seeds}")
        bad = sorted(set(self.ablations) - set(ABLATIONS))
        check(not bad, f"unknown ablation(s) {bad}; known: {list(ABLATIONS)}")
        bad = sorted(set(self.branches) - {"satori", "latro"})
        check(not bad, f"unknown branch(es) {bad}; known: ['satori', 'latro']")
        check(not self.ablations or "satori" in self.branches, "ablations need the satori branch")
        check(0 < self.format_fix_share <= 1, f"format_fix_share must be in (0, 1], got {self.format_fix_share}")
        check(self.claim_sample_limit >= 0, f"claim_sample_limit must be >= 0, got {self.claim_sample_limit}")
        check(not (self.rl.eval_every or self.rl2.eval_every) or self.rl_valid_pool().path != "testbed:test",
              "rl_valid_data (valid_data when its path is '') picks RL policies and may not be the test split")

    def eval_for(self, model: str) -> EvalConfig:
        """The evaluation settings of ``model``: ``eval``, with ``claim_sample_limit`` for the models a
        claim compares on their sampled answers."""
        from satori.report import SAMPLED_CLAIM_MODELS

        if self.claim_sample_limit and model in SAMPLED_CLAIM_MODELS:
            return _with(self.eval, sample_limit=self.claim_sample_limit)
        return self.eval

    def rl_valid_pool(self) -> DataConfig:
        """RL's held-out problems: ``rl_valid_data`` when it names a path, else ``valid_data``."""
        return self.rl_valid_data if self.rl_valid_data.path else self.valid_data

    def format_pool(self) -> DataConfig:
        """Format tuning's problems: ``format_data`` when it names a path, else the train data."""
        return self.format_data if self.format_data.path else self.train_data

    def distill_pool(self) -> DataConfig:
        """Distillation's problems: ``distill_data`` when it names a path, else the train data."""
        return self.distill_data if self.distill_data.path else self.train_data


@dataclass
class RunConfig:
    """``satori run CONFIG``: the pipeline file plus run-time switches."""

    dry_run: bool = field(default=False, metadata={"help": "validate config, data, model, tokenizer; train nothing"})
    out: str = field(default="", metadata={"help": "override the run folder"})


# --------------------------------------------------------------------------- stage helpers


def _with(cfg: Any, **changes: Any) -> Any:
    """A copy of a config dataclass with some fields replaced."""
    return dataclasses.replace(cfg, **changes)


def resolve_base(cfg: PipelineConfig) -> str | None:
    """The base model folder, or None when the pretrain stage must build it."""
    if cfg.base_model == "pretrain":
        return None
    if cfg.base_model == "testbed":
        return str(SHIPPED_BASE) if (SHIPPED_BASE / "config.json").is_file() else None
    if not (Path(cfg.base_model) / "config.json").is_file():
        raise SatoriError(f"base_model {cfg.base_model!r} is not a model folder (no config.json)")
    return cfg.base_model


def _eval_model(model_dir: str, cfg: PipelineConfig, eval_cfg: EvalConfig, seed: int, out: Path) -> dict[str, Any]:
    """Test split (greedy + k samples) and OOD split (greedy) metrics; samples written to ``out``."""
    from satori.rollout import load_model, load_tokenizer

    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    result: dict[str, Any] = {}
    for split, data, k in (("test", cfg.test_data, eval_cfg.k), ("ood", cfg.ood_data, 0)):
        if not data.path:
            continue
        ecfg = _with(eval_cfg, model=model_dir, data=data, k=k, seed=seed)
        metrics, records = evaluate(model, tok, load_problems(data), ecfg)
        write_jsonl(out / f"{split}_samples.jsonl", records)
        result[split] = metrics
    return result


def _pick_trajectories(records_path: Path, model: str, n: int) -> list[dict[str, Any]]:
    """A few greedy test responses for the viewer: reflected ones first, both verdicts."""
    if not records_path.exists() or n <= 0:
        return []
    rows = read_jsonl(records_path)
    rows.sort(key=lambda r: (not r["greedy"]["reflects"], r["greedy"]["correct"], r["id"]))
    picked = rows[: n // 2] + [r for r in rows[n // 2:] if r["greedy"]["correct"]][: n - n // 2]
    return [{"model": model, "id": r["id"], "question": r["question"], "answer": r["answer"],
             "response": r["greedy"]["text"], "extracted": r["greedy"]["extracted"],
             "correct": r["greedy"]["correct"]} for r in picked]


def _curve(folder: Path) -> list[dict[str, Any]]:
    from satori.train.common import read_metrics

    return [r for r in read_metrics(folder) if "reward" in r or "loss" in r]


# --------------------------------------------------------------------------- the pipeline


def run_pipeline(cfg: PipelineConfig, command: str = "", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage (cached), evaluate every model, write the report; returns the results."""
    run_dir = Path(cfg.out or f"runs/{cfg.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(run_dir, echo=echo,
                    isolate=cfg.stage_processes and int(os.environ.get("WORLD_SIZE", "1")) == 1)
    t0 = time.time()
    base = resolve_base(cfg)
    _plan(runner, cfg, need_pretrain=base is None)

    if base is None:
        def do_pretrain(folder: Path) -> dict[str, Any]:
            from satori.testbed.pretrain import pretrain

            return pretrain(folder / "model", _with(cfg.pretrain), overwrite=True)
        runner.run("pretrain", to_dict(cfg.pretrain), [], do_pretrain)
        base = str(run_dir / "pretrain" / "model")
        base_dep = ["pretrain"]
    else:
        runner.keys["base"] = f"model:{folder_fingerprint(base)}"  # content, not location
        runner.places.update({base: "$BASE", str(Path(base).resolve()): "$BASE"})
        base_dep = ["base"]

    models: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, Any]] = {}
    trajectories: list[dict[str, Any]] = []

    def evaluate_stage(name: str, model_dir: str, seed: int, deps: list[str], label: str) -> None:
        stage, eval_cfg = f"eval_{name}-s{seed}", cfg.eval_for(name)
        res = runner.run(stage, {"eval": to_dict(eval_cfg), "test": to_dict(cfg.test_data),
                                 "ood": to_dict(cfg.ood_data), "seed": seed}, deps,
                         lambda folder: _eval_model(model_dir, cfg, eval_cfg, seed, folder))
        models.setdefault(name, {"label": label, "seeds": {}})["seeds"][str(seed)] = res
        if seed == cfg.seeds[0]:
            trajectories.extend(_pick_trajectories(run_dir / stage / "test_samples.jsonl", name,
                                                   cfg.trajectories_per_model))

    def rl_stage(name: str, seed: int, rl_cfg: RLConfig, policy: str, deps: list[str], label: str,
                 orm: str = "", restart: str = "") -> str:
        folder = run_dir / f"{name}-s{seed}"
        c = _with(rl_cfg, policy=policy, out=str(folder), orm=orm, restart_buffer=restart, seed=seed, resume=True,
                  data=cfg.train_data, valid_data=cfg.rl_valid_pool(),
                  critic_init=rl_cfg.critic_init if orm else "policy")
        runner.run(f"{name}-s{seed}", to_dict(_with(c, out="")), deps, lambda f: run_rl(c))
        curves.setdefault(name, {})[str(seed)] = _curve(folder)
        evaluate_stage(name, str(folder), seed, [f"{name}-s{seed}"], label)
        return str(folder)

    for seed in cfg.seeds:
        evaluate_stage("base", base, seed, base_dep, "base model")
        if "satori" in cfg.branches:
            s = f"-s{seed}"
            # stage 1: demonstrations, format tuning
            synth_cfg = _synth_config(cfg, base, seed, run_dir)
            runner.run(f"synth{s}", to_dict(_with(synth_cfg, out="")), base_dep, lambda f: run_synth(synth_cfg))
            demos = (run_dir / f"synth{s}" /
                     f"demos-fix{cfg.format_fix_share:g}{'-masked' if cfg.format_mask_mistakes else ''}.jsonl")
            _write_demos(_demos_file(run_dir / f"synth{s}"), cfg, seed, demos)
            sft_dir = run_dir / f"sft_coat{s}"
            sft_cfg = _with(cfg.format_sft, model=base, data=str(demos), out=str(sft_dir), seed=seed, resume=True)
            runner.run(f"sft_coat{s}", to_dict(_with(sft_cfg, out="")), [f"synth{s}"], lambda f: run_sft(sft_cfg))
            evaluate_stage("sft_coat", str(sft_dir), seed, [f"sft_coat{s}"], "format-tuned (COAT)")
            # stage 2: ORM and restart buffers from the format-tuned model's own samples
            samples = run_dir / f"samples{s}" / "samples.jsonl"
            runner.run(f"samples{s}", {"k": cfg.orm.k, "t": cfg.orm.temperature, "n": cfg.orm.max_new_tokens,
                                       "data": to_dict(cfg.train_data), "seed": seed}, [f"sft_coat{s}"],
                       lambda f: _sample(str(sft_dir), cfg, seed, samples))
            orm_dir = run_dir / f"orm{s}"
            orm_cfg = _with(cfg.orm, policy=str(sft_dir), out=str(orm_dir), samples=str(samples),
                            valid_data=cfg.valid_data, seed=seed, resume=True)
            runner.run(f"orm{s}", to_dict(_with(orm_cfg, out="")), [f"samples{s}"], lambda f: run_orm(orm_cfg))
            rae_cfg = _with(cfg.rae, policy=str(sft_dir), data=cfg.train_data, samples=str(samples),
                            out=str(run_dir / f"rae{s}"), seed=seed, max_new_tokens=cfg.rl.max_new_tokens)
            runner.run(f"rae{s}", {**to_dict(_with(rae_cfg, out="")), "cut_rule": CUT_RULE}, [f"samples{s}"],
                       lambda f: run_rae(rae_cfg))
            buffer = str(run_dir / f"rae{s}" / "initial_states.jsonl")
            r1 = rl_stage("rl_round1", seed, cfg.rl, str(sft_dir), [f"orm{s}", f"rae{s}"], "PPO round 1 (RAE)",
                          orm=str(orm_dir), restart=buffer)
            # iterative self-improvement: distil into the base model, then round 2
            dist_dir = run_dir / f"distill{s}"
            dist_cfg = _with(cfg.distill, policy=r1, base=base, out=str(dist_dir), data=cfg.distill_pool(),
                             seed=seed, sft=_with(cfg.distill.sft, resume=True))
            runner.run(f"distill{s}", to_dict(_with(dist_cfg, out="")), [f"rl_round1{s}"] + base_dep,
                       lambda f: run_distill(dist_cfg))
            evaluate_stage("distilled", str(dist_dir / "model"), seed, [f"distill{s}"], "distilled base model")
            rl_stage("rl_round2", seed, cfg.rl2, str(dist_dir / "model"), [f"distill{s}", f"orm{s}"],
                     "PPO round 2", orm=str(orm_dir))
            # ablations
            if "no_rae" in cfg.ablations:
                rl_stage("rl_no_rae", seed, cfg.rl, str(sft_dir), [f"orm{s}"], "PPO without RAE", orm=str(orm_dir))
            if "rule_only" in cfg.ablations:
                rl_stage("rl_rule_only", seed, cfg.rl, str(sft_dir), [f"rae{s}"], "PPO, rule reward only",
                         restart=buffer)
            if "beta0" in cfg.ablations:
                rl_stage("rl_beta0", seed, _with(cfg.rl, beta=0.0), str(sft_dir), [f"orm{s}", f"rae{s}"],
                         "PPO, β = 0", orm=str(orm_dir), restart=buffer)
            if "cot" in cfg.ablations:
                cot_dir = run_dir / f"sft_cot{s}"
                cot_data = run_dir / f"synth{s}" / "cot_demos.jsonl"
                cot_cfg = _with(sft_cfg, data=str(cot_data), out=str(cot_dir))
                runner.run(f"sft_cot{s}", to_dict(_with(cot_cfg, out="")), [f"synth{s}"],
                           lambda f: (_write_cot_demos(demos, cot_data), run_sft(cot_cfg))[1])
                evaluate_stage("sft_cot", str(cot_dir), seed, [f"sft_cot{s}"], "format-tuned (plain CoT)")
                rl_stage("rl_cot", seed, cfg.rl, str(cot_dir), [f"sft_cot{s}", f"orm{s}"], "PPO from plain CoT",
                         orm=str(orm_dir))
        if "latro" in cfg.branches:
            s = f"-s{seed}"
            lat_dir = run_dir / f"latro{s}"
            lat_cfg = _with(cfg.latro, model=base, out=str(lat_dir), data=cfg.train_data,
                            valid_data=cfg.valid_data, seed=seed, resume=True)
            runner.run(f"latro{s}", to_dict(_with(lat_cfg, out="")), base_dep, lambda f: run_latro(lat_cfg))
            curves.setdefault("latro", {})[str(seed)] = _curve(lat_dir)
            evaluate_stage("latro", str(lat_dir), seed, [f"latro{s}"], "LaTRO")
            gold = run_dir / f"sft_gold{s}"
            gold_data = gold / "gold.jsonl"
            gold_cfg = _with(cfg.gold_sft, model=base, data=str(gold_data), out=str(gold), seed=seed, resume=True)
            runner.run(f"sft_gold{s}", to_dict(_with(gold_cfg, out="")) | {"train": to_dict(cfg.train_data)},
                       base_dep, lambda f: (_write_gold(cfg.train_data, gold_data), run_sft(gold_cfg))[1])
            evaluate_stage("sft_gold", str(gold), seed, [f"sft_gold{s}"], "SFT on gold rationales")

    results = {
        "preset": cfg.name, "date": dt.datetime.now().isoformat(timespec="seconds"), "command": command,
        # compute time of the whole pipeline (cached stages count with their original time)
        "seconds": round(sum(r["seconds"] for r in runner.summary()), 1),
        "wall_seconds_this_invocation": round(time.time() - t0, 1), "version": __version__, "code": runner.code,
        "seeds": cfg.seeds,
        "models": models, "curves": curves, "trajectories": trajectories, "stages": runner.summary(),
        "config": to_dict(cfg),
    }
    from satori.report import write_report

    paths = write_report(results, run_dir)
    echo(_summary_table(results, paths))
    other = [r["name"] for r in results["stages"] if r.get("other_code")]
    if other:
        echo(f"{len(other)} of {len(results['stages'])} stages were made (or started) by other satori code than "
             f"this run's ({runner.code}: a source file they loaded has changed since); their settings match, "
             f"so they were kept. Delete a stage's folder to "
             f"redo it: {', '.join(other)}")
    return results


def _synth_config(cfg: PipelineConfig, base: str | None, seed: int, run_dir: Path) -> SynthConfig:
    """The synthesis stage's config: format tuning's problems; a local generator is the base model."""
    gen = cfg.synth.generator
    if gen.backend in ("", "hf") and not gen.path and base:
        gen = _with(gen, path=base)
    return _with(cfg.synth, data=cfg.format_pool(), out=str(run_dir / f"synth-s{seed}"), seed=seed, generator=gen)


def _demos_file(folder: Path) -> Path:
    for name in ("trajectories.jsonl", "demos.jsonl"):
        if (folder / name).exists():
            return folder / name
    raise SatoriError(f"{folder}: the synthesis stage wrote no trajectories")


def _write_demos(trajectories: Path, cfg: PipelineConfig, seed: int, out: Path) -> None:
    """The format-tuning demonstrations: the synthesised trajectories, corrections capped,
    mistakes (optionally) read but not imitated."""
    from satori.synth.trajectory import balance_corrections, mistakes_as_context

    rows = read_jsonl(trajectories)
    rows = balance_corrections(rows, cfg.format_fix_share, key=str(seed))
    write_jsonl(out, [mistakes_as_context(r) for r in rows] if cfg.format_mask_mistakes else rows)


def _write_cot_demos(demos: Path, out: Path) -> None:
    """Plain-CoT demonstrations: the type-I trajectories (correct, no reflection) with the
    meta tokens removed, for the CoT ablation."""
    from satori.coat import parse_steps, to_cot

    rows = read_jsonl(demos)
    cot = [{"question": r["question"], "response": to_cot(parse_steps(r["response"]))} for r in rows
           if r.get("type") == "I"]
    if not cot:
        raise SatoriError(f"{demos}: no type-I trajectories to build plain-CoT demonstrations from")
    write_jsonl(out, cot)


def _write_gold(data: DataConfig, out: Path) -> None:
    """Gold rationales: the reference solutions (testbed: error-free step solutions)."""
    rows = []
    for p in load_problems(data):
        solution = p.solution
        if not solution and p.meta.get("source") == "testbed":
            from satori.testbed.tasks import reference_solution

            solution = reference_solution(p)
        if solution:
            rows.append({"question": p.question, "response": solution})
    if not rows:
        raise SatoriError(f"{data.path}: no reference solutions for the SFT baseline")
    write_jsonl(out, rows)


def _sample(policy: str, cfg: PipelineConfig, seed: int, out: Path) -> dict[str, Any]:
    from satori.evaluate import sample_graded
    from satori.rollout import load_model, load_tokenizer

    recs = sample_graded(load_model(policy), load_tokenizer(policy), load_problems(cfg.train_data), k=cfg.orm.k,
                         temperature=cfg.orm.temperature, max_new_tokens=cfg.orm.max_new_tokens, seed=seed,
                         batch_size=cfg.orm.gen_batch_size)
    write_jsonl(out, recs)
    return {"samples": len(recs), "accuracy": sum(r["correct"] for r in recs) / max(1, len(recs))}


def _plan(runner: Runner, cfg: PipelineConfig, need_pretrain: bool) -> None:
    """Stage names with rough relative costs, for the ETA."""
    if need_pretrain:
        runner.plan("pretrain", 4)
    for seed in cfg.seeds:
        s = f"-s{seed}"
        runner.plan(f"eval_base{s}", 0.5)
        if "satori" in cfg.branches:
            for name, w in (("synth", 2), ("sft_coat", 1), ("eval_sft_coat", 0.5), ("samples", 1), ("orm", 1),
                            ("rae", 0.1), ("rl_round1", 3), ("eval_rl_round1", 0.5), ("distill", 2),
                            ("eval_distilled", 0.5), ("rl_round2", 3), ("eval_rl_round2", 0.5)):
                runner.plan(name + s, w)
            for ab in cfg.ablations:
                names = {"no_rae": ["rl_no_rae"], "rule_only": ["rl_rule_only"], "beta0": ["rl_beta0"],
                         "cot": ["sft_cot", "rl_cot"]}[ab]
                for n in names:
                    runner.plan(n + s, 3 if n.startswith("rl") else 1)
                    runner.plan(f"eval_{n}{s}", 0.5)
        if "latro" in cfg.branches:
            for name, w in (("latro", 3), ("eval_latro", 0.5), ("sft_gold", 1), ("eval_sft_gold", 0.5)):
                runner.plan(name + s, w)


def _summary_table(results: dict[str, Any], paths: dict[str, Path]) -> str:
    lines = ["", f"{'model':<14} {'seeds':>5} {'pass@1':>8} {'maj@k':>8} {'ood':>8} {'reflect':>8}"]
    for name, m in results["models"].items():
        vals = list(m["seeds"].values())

        def mean(split: str, key: str) -> str:
            xs = [v[split].get(key) for v in vals if split in v and v[split].get(key) is not None]
            return f"{sum(xs) / len(xs):8.3f}" if xs else f"{'-':>8}"
        k = next((v["test"].get("k") for v in vals if "test" in v and v["test"].get("k")), None)
        lines.append(f"{name:<14} {len(vals):>5} {mean('test', 'pass@1')} "
                     f"{mean('test', f'maj@{k}') if k else '-':>8} {mean('ood', 'pass@1')} {mean('test', 'reflect_rate')}")
    from satori.report import compute_claims

    lines.append("")
    for c in compute_claims(results):
        mark = {True: "held", False: "NOT held", None: "not measured"}[c["held"]]
        lines.append(f"  [{mark:^12}] {c['name']}")
    lines.append(f"\nreport: {paths.get('html')}  ({paths.get('markdown')})")
    return "\n".join(lines)


def dry_run(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Check everything a run needs without training: data files, the base model folder and
    its tokenizer (adding the COAT tokens to a copy), the agents' backends."""
    from transformers import AutoConfig

    from satori.coat import add_coat_tokens, coat_token_ids
    from satori.rollout import load_tokenizer

    report: dict[str, Any] = {}
    for name in ("train_data", "valid_data", "test_data", "ood_data", "format_data", "distill_data",
                 "rl_valid_data"):
        data = getattr(cfg, name)
        if data.path:
            n = len(load_problems(data))
            report[name] = n
            echo(f"ok  {name}: {data.path} ({n} problems)")
    base = resolve_base(cfg)
    if base is None:
        echo("ok  base model: built by the pretrain stage (testbed)")
    else:
        conf = AutoConfig.from_pretrained(base, local_files_only=True)
        tok = load_tokenizer(base)
        ids = add_coat_tokens(tok)
        coat_token_ids(tok)
        report["base"] = {"path": base, "model_type": conf.model_type, "vocab": len(tok), "coat_ids": ids}
        echo(f"ok  base model: {base} ({conf.model_type}, tokenizer {len(tok)} tokens with COAT ids {ids})")
    if "satori" in cfg.branches:
        from satori.synth.pipeline import prepare_agents

        prepare_agents(_synth_config(cfg, base, cfg.seeds[0], Path(cfg.out or f"runs/{cfg.name}")),
                       load_problems(cfg.format_pool()), load_models=False)
        echo(f"ok  synthesis agents: generator={cfg.synth.generator.backend}, critic={cfg.synth.critic.backend}, "
             f"selector={cfg.synth.selector.backend}")
    echo("dry run passed: nothing was trained")
    return report

"""The ``satori`` command line.

Each subcommand is a config dataclass plus the function that runs it; flags are generated
from the dataclass (see :mod:`satori.config`), so a YAML file given with ``--config`` and
the flags accept exactly the same keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from satori.config import add_config_arguments, check, config_from_args, parse_settings
from satori.errors import SatoriError, Stopped


@dataclass
class GradeConfig:
    """``satori grade INPUT.jsonl --response-field F --answer-field F --out OUT.jsonl``."""

    response_field: str = "response"
    answer_field: str = "answer"
    out: str = ""
    workers: int = 0
    timeout: float = 5.0
    last_number_fallback: bool = True

    def validate(self) -> None:
        check(self.workers >= 0, f"workers must be >= 0 (0: one per core), got {self.workers}")
        check(0 < self.timeout <= 86400, f"timeout must be in (0, 86400] seconds, got {self.timeout}")


def _cmd_grade(cfg: GradeConfig, args: argparse.Namespace) -> None:
    from satori.grading import grade_file

    if not cfg.out:
        raise SatoriError("--out is required")
    acc = grade_file(args.input, cfg.out, cfg.response_field, cfg.answer_field, workers=cfg.workers,
                     timeout=cfg.timeout, last_number_fallback=cfg.last_number_fallback)
    print(f"accuracy: {acc:.4f}")


def _cmd_eval(cfg: Any, args: argparse.Namespace) -> None:
    from satori.evaluate import markdown_table, run_eval

    metrics = run_eval(cfg)
    print(markdown_table(metrics, title=f"{cfg.model} on {cfg.data.path}"))
    print(f"results: {metrics['out']}/results.json")


def _cmd_pretrain(cfg: Any, args: argparse.Namespace) -> None:
    from satori.testbed.pretrain import pretrain

    metrics = pretrain(args.out, cfg, overwrite=args.overwrite)
    print(json.dumps(metrics, indent=2, default=str))


def _is_main_process() -> bool:
    """Whether this is the first process of a launch (``RANK`` is set by accelerate / torchrun), or the only one."""
    return os.environ.get("RANK", "0") == "0"


def setup_logging(verbose: bool = False) -> None:
    """INFO to stderr (DEBUG with ``--verbose``). Every process of a multi-process run reads the
    same data and takes the same steps, so its warnings would repeat once per process: the
    processes after the first log errors only, unless ``--verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("satori").setLevel(logging.NOTSET if verbose or _is_main_process() else logging.ERROR)


def _print_result(fn: Callable[[Any], dict[str, Any]]) -> Callable[[Any, argparse.Namespace], None]:
    def run(cfg: Any, args: argparse.Namespace) -> None:
        result = fn(cfg)
        if _is_main_process():  # one summary, not one per process
            print(json.dumps(result, indent=2, default=str))
    return run


def _cmd_run(cfg: Any, args: argparse.Namespace) -> None:
    import shlex

    from satori.config import load_config
    from satori.pipeline import PipelineConfig, dry_run, run_pipeline

    overrides = parse_settings(args.settings, PipelineConfig)
    try:
        pipeline_cfg = load_config(PipelineConfig, args.pipeline_config, overrides)
    except SatoriError as e:
        raise SatoriError(f"{e} (with --set {' '.join(args.settings)})" if args.settings else str(e)) from None
    if cfg.out:
        pipeline_cfg.out = cfg.out
    if cfg.dry_run:
        dry_run(pipeline_cfg)
        return
    run_pipeline(pipeline_cfg, command="satori " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


def _commands() -> dict[str, tuple[type, Callable[[Any, argparse.Namespace], None], str, Callable | None]]:
    """name -> (config class, runner, help, extra-argument adder)."""
    from satori.evaluate import EvalConfig
    from satori.testbed.pretrain import PretrainConfig, ProbeConfig, probe
    from satori.rae import RAEConfig, run_rae
    from satori.synth.pipeline import SynthConfig, run_synth
    from satori.train.distill import DistillConfig, run_distill
    from satori.train.latro import LatroConfig, run_latro
    from satori.train.orm import ORMConfig, run_orm
    from satori.train.ppo import RLConfig, run_rl
    from satori.train.sft import SFTConfig, run_sft

    from satori.pipeline import RunConfig

    def grade_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("input", help="JSONL file of records to grade")

    def pretrain_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="folder for the model and tokenizer")
        p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("pipeline_config", metavar="CONFIG", help="pipeline YAML (e.g. configs/quick.yaml)")
        p.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY=VALUE",
                       help="change one setting of CONFIG, by dotted key with a YAML value (repeatable): "
                            "--set seeds=[0] --set rl.steps=5")

    return {
        "run": (RunConfig, _cmd_run, "run the whole pipeline from a YAML config and write the report", run_args),
        "grade": (GradeConfig, _cmd_grade, "grade responses in a JSONL file", grade_args),
        "eval": (EvalConfig, _cmd_eval, "evaluate a model: pass@1, maj@k, per level, COAT behaviour", None),
        "testbed pretrain": (PretrainConfig, _cmd_pretrain, "train the testbed base model from scratch",
                             pretrain_args),
        "testbed probe": (ProbeConfig, _print_result(probe), "a testbed model's greedy accuracy and whether it "
                          "can check a step as it goes (redo a wrong one, keep a right one)", None),
        "synth": (SynthConfig, _print_result(run_synth), "stage 1: synthesise COAT demonstrations "
                  "(generator, critic, selector)", None),
        "sft": (SFTConfig, _print_result(run_sft), "supervised fine-tuning: format tuning, distillation, "
                "SFT baselines", None),
        "orm": (ORMConfig, _print_result(run_orm), "train a Bradley-Terry outcome reward model on a policy's "
                "samples", None),
        "rae": (RAEConfig, _print_result(run_rae), "build Restart-and-Explore initial states from a policy's "
                "samples", None),
        "rl": (RLConfig, _print_result(run_rl), "PPO (or GRPO / RLOO) with Restart-and-Explore and the "
               "Satori reward", None),
        "latro": (LatroConfig, _print_result(run_latro), "LaTRO: optimise rationales with the model's own "
                  "likelihood of the gold answer", None),
        "distill": (DistillConfig, _print_result(run_distill), "sample the RL policy, keep the hardest solved "
                    "problems, fine-tune the base model on them", None),
    }


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="satori", description="Teach language models to reason by "
                                     "autoregressive search (Satori, LaTRO).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    commands = _commands()
    for name, (cls, _, help_text, extra) in commands.items():
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            p = groups[group].add_parser(leaf, help=help_text, description=help_text)
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
        if extra:
            extra(p)
        add_config_arguments(p, cls)
        p.set_defaults(_command=name)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    cls, runner, _, _ = commands[args._command]
    try:
        cfg = config_from_args(cls, args)
        runner(cfg, args)
    except Stopped as e:  # SIGTERM / SIGINT: a checkpoint was written; not an error, but not done either
        print(f"satori: {e}", file=sys.stderr)
        return 128 + (e.signum or 15)
    except SatoriError as e:
        if args.verbose:
            raise
        print(f"satori: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("satori: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

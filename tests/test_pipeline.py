"""``satori run`` end to end at toy size: every stage of both branches, then the cache."""

from __future__ import annotations

import json
import shutil

import pytest

from satori.config import load_config
from satori.errors import SatoriError
from satori.pipeline import SHIPPED_BASE, PipelineConfig, _synth_config, dry_run, run_pipeline
from satori.stages import code_fingerprint

# every stage at its smallest: a handful of problems, one or two optimiser steps
TOY = {
    "name": "toy", "seeds": [0], "branches": ["satori", "latro"], "ablations": [],
    "stage_processes": False, "trajectories_per_model": 1,
    "train_data": {"path": "testbed:train", "n": 8}, "valid_data": {"path": "testbed:valid", "n": 4},
    "test_data": {"path": "testbed:test", "n": 4}, "ood_data": {"path": "testbed:ood", "n": 2},
    "synth": {"n_samples": 2, "k_keep": 1, "max_new_tokens": 96, "max_rounds": 1, "batch_size": 16,
              "progress": False},
    "format_sft": {"max_steps": 2, "batch_size": 4, "eval_every": 100, "save_every": 100},
    "orm": {"k": 2, "max_new_tokens": 96, "max_steps": 2, "batch_size": 2, "eval_every": 100, "save_every": 100},
    "rae": {"k": 2, "max_new_tokens": 96, "t_max": 1},
    "rl": {"steps": 2, "critic_warmup": 1, "rollout_batch": 4, "train_batch": 4, "micro_batch": 4,
           "max_new_tokens": 48, "save_every": 100, "eval_every": 1, "eval_max_new_tokens": 64},
    "rl_valid_data": {"path": "testbed:valid", "n": 3},  # RL's own held-out pool, not valid_data's 4
    "distill_data": {"path": "testbed:train", "n": 12},  # its own pool, larger than RL's 8 problems
    "distill": {"n_samples": 2, "max_new_tokens": 48, "sft": {"max_steps": 1, "batch_size": 4}},
    "rl2": {"steps": 1, "n_samples": 2, "rollout_batch": 2, "train_batch": 4, "micro_batch": 4,
            "max_new_tokens": 48, "save_every": 100},
    "latro": {"k": 2, "steps": 1, "batch_size": 2, "micro_batch": 2, "max_rationale_tokens": 32,
              "eval_every": 100, "save_every": 100},
    "gold_sft": {"max_steps": 1, "batch_size": 4},
    "eval": {"k": 2, "sample_limit": 2, "gen": {"max_new_tokens": 64}},
    "claim_sample_limit": 3,  # the F→T claim's two models sample more of the test problems
}


def test_the_whole_pipeline_runs_and_a_moved_run_keeps_its_cache(tmp_path):
    base = tmp_path / "checkout-a" / "testbed-base"
    shutil.copytree(SHIPPED_BASE, base)
    cfg = load_config(PipelineConfig, overrides={**TOY, "base_model": str(base), "out": str(tmp_path / "run-a")})
    lines: list[str] = []
    first = run_pipeline(cfg, echo=lines.append)
    stages = [s["name"] for s in first["stages"]]
    for name in ("synth-s0", "sft_coat-s0", "orm-s0", "rae-s0", "rl_round1-s0", "distill-s0", "rl_round2-s0",
                 "latro-s0", "sft_gold-s0", "eval_rl_round2-s0", "eval_latro-s0"):
        assert name in stages
    assert not any(s["skipped"] for s in first["stages"])
    assert set(first["models"]) >= {"base", "sft_coat", "rl_round1", "distilled", "rl_round2", "latro", "sft_gold"}
    assert (tmp_path / "run-a" / "report.md").is_file() and (tmp_path / "run-a" / "report.html").is_file()
    results = json.loads((tmp_path / "run-a" / "results.json").read_text())
    assert results["models"]["rl_round1"]["seeds"]["0"]["test"]["n"] == 4
    sampled = {name: m["seeds"]["0"]["test"]["k_problems"] for name, m in results["models"].items()}
    assert sampled == {name: 3 if name in ("sft_coat", "rl_round1") else 2 for name in results["models"]}
    distill = json.loads((tmp_path / "run-a" / "distill-s0" / "stage.json").read_text())["result"]
    assert distill["selection"]["problems"] == 12  # the distillation pool, not the 8 train problems
    for rl in ("rl_round1-s0", "rl_round2-s0"):  # rl2 keeps its own eval_every (0): its last policy
        picked = json.loads((tmp_path / "run-a" / rl / "stage.json").read_text())["result"]
        assert ("best_step" in picked, picked.get("valid_problems")) == (
            (True, 3) if rl == "rl_round1-s0" else (False, None))

    # the run folder moves and the base model is read from another checkout: nothing re-runs
    shutil.move(tmp_path / "run-a", tmp_path / "run-b")
    other = tmp_path / "checkout-b" / "testbed-base"
    shutil.copytree(base, other)
    shutil.rmtree(base)
    # ... and every stage was made by other satori code (an update): kept, and flagged
    assert first["code"] == code_fingerprint() and not any("other_code" in s for s in first["stages"])
    for meta in (tmp_path / "run-b").glob("*/stage.json"):
        record = json.loads(meta.read_text())
        assert "stages.py" in record["modules"]  # every stage's process loaded it
        record["sources"]["stages.py"] = "0ld"
        meta.write_text(json.dumps(record))
    cfg = load_config(PipelineConfig, overrides={**TOY, "base_model": str(other), "out": str(tmp_path / "run-b")})
    again = run_pipeline(cfg, echo=lines.append)
    assert [s["name"] for s in again["stages"]] == stages
    assert all(s["skipped"] for s in again["stages"]), [s["name"] for s in again["stages"] if not s["skipped"]]
    assert all(s.get("other_code") == ["stages.py"] for s in again["stages"])
    assert f"{len(stages)} of {len(stages)} stages were made (or started) by other satori code" in lines[-1]
    assert again["models"]["rl_round1"] == first["models"]["rl_round1"]


def test_distillation_samples_the_train_data_unless_given_its_own_pool():
    cfg = load_config(PipelineConfig, overrides={k: v for k, v in TOY.items() if k != "distill_data"})
    assert cfg.distill_data.path == "" and cfg.distill_pool() == cfg.train_data
    cfg = load_config(PipelineConfig, overrides=TOY)
    assert cfg.distill_pool() == cfg.distill_data and cfg.distill_pool().n == 12


def test_demonstrations_are_synthesised_on_the_train_data_unless_given_their_own_pool(tmp_path):
    cfg = load_config(PipelineConfig, overrides=TOY)
    assert cfg.format_data.path == "" and cfg.format_pool() == cfg.train_data
    assert _synth_config(cfg, "BASE", 0, tmp_path).data == cfg.train_data
    cfg = load_config(PipelineConfig, overrides={**TOY, "format_data": {"path": "testbed:train", "n": 20}})
    synth = _synth_config(cfg, "BASE", 1, tmp_path)
    assert synth.data == cfg.format_data and synth.data.n == 20 and synth.seed == 1
    assert synth.generator.path == "BASE"  # the local generator is the base model


def test_rl_selection_reads_valid_data_unless_given_its_own_pool_never_the_test_split():
    cfg = load_config(PipelineConfig, overrides={k: v for k, v in TOY.items() if k != "rl_valid_data"})
    assert cfg.rl_valid_data.path == "" and cfg.rl_valid_pool() == cfg.valid_data
    assert load_config(PipelineConfig, overrides=TOY).rl_valid_pool().n == 3
    with pytest.raises(SatoriError, match="rl_valid_data"):
        load_config(PipelineConfig, overrides={**TOY, "rl_valid_data": {"path": "testbed:test"}})


def test_the_dry_run_reads_the_distillation_pool_and_names_a_missing_file(tmp_path):
    lines: list[str] = []
    cfg = load_config(PipelineConfig, overrides={**TOY, "format_data": {"path": "testbed:train", "n": 10}})
    report = dry_run(cfg, echo=lines.append)
    assert report["train_data"] == 8 and report["format_data"] == 10 and report["distill_data"] == 12
    assert lines[-1] == "dry run passed: nothing was trained"
    missing = tmp_path / "pool.jsonl"
    cfg = load_config(PipelineConfig, overrides={**TOY, "distill_data": {"path": str(missing)}})
    with pytest.raises(SatoriError, match="pool.jsonl"):
        dry_run(cfg, echo=lines.append)

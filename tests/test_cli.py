"""The command line: exact grade contract and one-line errors naming the problem."""

import json
import logging
import subprocess
import sys

import pytest

from satori.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("satori: error: ")
    return lines[0]


def test_grade_contract(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"resp": "so \\boxed{12}", "gold": 12, "keep": [1]}) + "\n"
                   + json.dumps({"resp": "The answer is 7.", "gold": "8"}) + "\n")
    code, out, _ = run(capsys, "grade", str(src), "--response-field", "resp", "--answer-field", "gold",
                       "--out", str(tmp_path / "out.jsonl"))
    assert code == 0 and out.strip().splitlines()[-1] == "accuracy: 0.5000"
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0] == {"resp": "so \\boxed{12}", "gold": 12, "keep": [1], "extracted": "12", "correct": True}
    assert rows[1]["correct"] is False and rows[1]["extracted"] == "7"


def test_grade_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "grade", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert code == 2 and "missing.jsonl" in one_line_error(err)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "1", "answer": "1"}\n{oops\n')
    code, _, err = run(capsys, "grade", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert "bad.jsonl:2" in one_line_error(err)
    bad.write_text('{"response": "1"}\n')
    code, _, err = run(capsys, "grade", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert "'answer'" in one_line_error(err) and "bad.jsonl:1" in err


def test_eval_errors_are_one_line(tmp_path, capsys, tiny_coat):
    code, _, err = run(capsys, "eval", "--model", str(tmp_path / "no-model"), "--data", "testbed:test")
    assert code == 2 and "model path does not exist" in one_line_error(err)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\ngen:\n  max_new_tokenz: 3\n")
    code, _, err = run(capsys, "eval", "--config", str(cfg))
    assert "unknown config key 'max_new_tokenz' in section 'gen'" in one_line_error(err) and "c.yaml" in err
    code, _, err = run(capsys, "eval", "--model", str(tiny_coat), "--data", str(tmp_path / "none.jsonl"))
    assert "data path not found" in one_line_error(err)
    code, _, err = run(capsys, "eval", "--model", str(tiny_coat), "--k", "many")
    assert "'k' must be an integer" in one_line_error(err)


def test_eval_writes_results(tmp_path, capsys, tiny_coat):
    out = tmp_path / "ev"
    code, stdout, _ = run(capsys, "eval", "--model", str(tiny_coat), "--data", "testbed:test", "--data.n", "4",
                          "--gen.max-new-tokens", "6", "--out", str(out))
    assert code == 0 and "pass@1 (greedy)" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"]["n"] == 4 and len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert (out / "results.md").read_text().startswith("### ")


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "satori.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "eval" in out.stdout and "grade" in out.stdout


def test_testbed_probe(tmp_path, capsys, tiny_base):
    code, out, _ = run(capsys, "testbed", "probe", "--model", str(tiny_base), "--n", "6", "--max-new-tokens", "8")
    result = json.loads(out[out.index("{"):])
    checks = result["checks"]
    assert code == 0 and result["n"] == 6 and checks["wrong"]["n"] + checks["right"]["n"] == 6
    # an untrained model neither solves a problem nor repairs a wrong step
    assert result["accuracy"] == 0 and checks["wrong"]["repaired"] == 0
    after = result["after_checks"]  # problems with more than the 2 given steps: levels 3-6 of 2, 3, 4, 5, 6, 2
    assert after["n"] == 4 and after["finished_right_after_0_checks"] == after["finished_right_after_2_checks"] == 0
    code, _, err = run(capsys, "testbed", "probe", "--model", str(tmp_path / "none"))
    assert code == 2 and "model:" in err and "none" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("rank, verbose, shown", [(None, False, True), ("0", False, True), ("1", False, False),
                                                  ("3", True, True)])
def test_warnings_show_once_in_a_multi_process_run(monkeypatch, caplog, rank, verbose, shown):
    from satori.cli import setup_logging

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    logger = logging.getLogger("satori")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    setup_logging(verbose)
    with caplog.at_level(logging.INFO):
        logging.getLogger("satori.data").warning("3 malformed records skipped")
        logging.getLogger("satori.train").error("out of memory")
    messages = [r.getMessage() for r in caplog.records]
    assert ("3 malformed records skipped" in messages) is shown
    assert "out of memory" in messages  # errors from every process


def test_run_changes_settings_by_dotted_key(capsys):
    from pathlib import Path

    from satori.config import parse_settings
    from satori.pipeline import PipelineConfig

    assert parse_settings(["rl.steps=5", "seeds=[0, 2]", "out=runs/x", "rl.beta=0.5"]) == {
        "rl.steps": 5, "seeds": [0, 2], "out": "runs/x", "rl.beta": 0.5}
    # a text setting keeps the value as written, where YAML would read a number
    assert parse_settings(["out=007", "name=0.10", "rl.steps=5", "train_data.path=testbed:train"], PipelineConfig) == {
        "out": "007", "name": "0.10", "rl.steps": 5, "train_data.path": "testbed:train"}
    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quick.yaml")
    code, out, _ = run(capsys, "run", quick, "--set", "train_data.n=7", "--set", "valid_data.n=9", "--dry-run")
    assert code == 0 and "train_data: testbed:train (7 problems)" in out and "valid_data: testbed:valid (9 problems)" in out
    code, _, err = run(capsys, "run", quick, "--set", "rl.stepz=5")
    line = one_line_error(err)
    assert code == 2 and "unknown config key 'stepz' in section 'rl'" in line and line.endswith("(with --set rl.stepz=5)")
    code, _, err = run(capsys, "run", quick, "--set", "rl.steps=-1")
    assert "rl: steps must be > 0, got -1 (with --set rl.steps=-1)" in one_line_error(err)
    code, _, err = run(capsys, "run", quick, "--set", "rl.steps")
    assert "--set 'rl.steps': expected KEY=VALUE" in one_line_error(err)
    code, _, err = run(capsys, "run", quick, "--set", "seeds=[0")
    assert "--set 'seeds=[0': the value is not YAML" in one_line_error(err)

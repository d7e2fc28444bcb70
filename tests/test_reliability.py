"""Reliability (issue 8): hostile inputs, faults, training health, determinism.

Every test here fails without the safeguard it names:

* bad input: COAT parsing, answer extraction, data files and configs give a result or a
  clear ``SatoriError`` (file and line, or the option), never a crash or a hang;
* faults: SIGTERM during ``satori sft / orm / rl / latro`` checkpoints and exits with 143,
  and ``--resume`` continues; SIGKILL or a full disk in the middle of a checkpoint leaves
  the previous one loadable; an endpoint answering garbage is retried, then reported;
* health: NaN / inf in the loss, reward or gradients skips the step (reported), and after
  ``max_bad_steps`` such steps the run stops with its last checkpoint intact; empty,
  meta-token-only and truncated continuations never earn the correctness reward;
* determinism: same config and seed, bitwise-identical weights (sft and rl here; LaTRO in
  ``test_latro.py::test_determinism_and_exact_resume``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from satori import coat, grading
from satori.config import from_dict, load_config
from satori.data import DataConfig, Problem, load_problems, problems_from_records
from satori.errors import SatoriError
from satori.train import common
from endpoint import LocalEndpoint

# --------------------------------------------------------------------------- strategies

_PIECES = ["\\boxed{", "\\boxed", "\\fbox{", "{", "}", "\\{", "\\}", "\\", "$", "5", "-3", "1,000", ".", " ",
           "\n", "\t", "\r", "\x00", "\x07", "\x1b[31m", "\u202e", "\ufeff", "answer is", "The answer is ",
           "#### ", "Step 1:", "\n\n", coat.CONTINUE, coat.REFLECT, coat.EXPLORE, "<|foo|>", "<|", "|>", "é", "数",
           "\U0001f600", "\\frac{1}{2}", "%", "x = "]
_SURROGATE_TEXT = st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="surrogateescape"))
ANY_TEXT = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(_PIECES), max_size=60).map("".join),
    _SURROGATE_TEXT,  # invalid UTF-8 read with errors="surrogateescape"
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="replace")),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=100),  # control characters
)
# a short random pattern repeated up to a few hundred thousand characters
HUGE_TEXT = st.tuples(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=4).map("".join),
                      st.integers(1_000, 60_000)).map(lambda t: t[0] * t[1])


def _bounded(fn, *args, limit: float = 5.0, **kw):
    start = time.monotonic()
    result = fn(*args, **kw)
    assert time.monotonic() - start < limit, f"{fn.__name__} took more than {limit} s"
    return result


# --------------------------------------------------------------------------- 1. bad input: COAT parser


def _check_coat(text: str) -> None:
    steps = coat.parse_steps(text)
    assert all(s.action in ("continue", "reflect", "explore") and isinstance(s.text, str) for s in steps)
    assert all(not coat._META_SPLIT.search(s.text) for s in steps)
    assert coat.parse_steps(coat.render_steps(steps)) == steps  # parsed text always renders back
    b = coat.behaviour(text)
    assert b["n_steps"] == len(steps) == b["n_continue"] + b["n_reflect"] + b["n_explore"]
    assert isinstance(coat.is_valid_coat(text), bool) and isinstance(coat.is_plain_cot(text), bool)
    step = coat.final_answer_step(steps)
    assert step is None or step in steps
    assert text.startswith(coat.answer_before_first_reflect(text))
    assert all(isinstance(s, str) and s for s in coat.split_cot_steps(text))
    assert isinstance(coat.to_cot(steps), str)


@given(ANY_TEXT)
@settings(max_examples=300, deadline=None)
def test_coat_parser_takes_any_text(text):
    _check_coat(text)


@given(HUGE_TEXT)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_coat_parser_on_huge_text_is_bounded(text):
    _bounded(_check_coat, text, limit=10.0)


@pytest.mark.parametrize("text", ["\\boxed{" * 6000, "\\boxed{" * 3000 + "}" + "x{" * 3000,
                                  ("\\boxed{1" + coat.REFLECT) * 4000])
def test_many_unclosed_boxes_are_linear_in_coat(text):
    # was quadratic: every unclosed \boxed{ rescanned the rest of the text (6,000 boxes: ~20 s)
    _bounded(coat.is_valid_coat, text, limit=2.0)
    _bounded(coat.final_answer_step, coat.parse_steps(text), limit=2.0)


# --------------------------------------------------------------------------- 1. bad input: answer extraction


@given(ANY_TEXT, st.one_of(st.sampled_from(["5", "-3", "1000", "\\frac{1}{2}", "x", ""]), ANY_TEXT))
@settings(max_examples=200, deadline=None)
def test_answer_extraction_and_grading_take_any_text(text, gold):
    for fallback in (True, False):
        extracted = _bounded(grading.extract_answer, text, last_number_fallback=fallback)
        assert extracted is None or isinstance(extracted, str)
    assert isinstance(_bounded(grading.normalize_answer, text), str)
    extracted, ok = _bounded(grading.grade, text, gold, timeout=2.0, limit=10.0)
    assert isinstance(ok, bool) and (extracted is None or isinstance(extracted, str))
    assert grading.grade(text, gold, truncated=True)[1] is False
    if grading.is_blank_response(text):
        assert ok is False


@given(HUGE_TEXT)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_answer_extraction_on_huge_text_is_bounded(text):
    _bounded(grading.extract_answer, text, limit=10.0)
    _bounded(grading.grade, text, "5", timeout=2.0, limit=10.0)


@pytest.mark.parametrize("text", ["\\boxedx" * 60_000, "\\fboxy" * 60_000])
def test_many_non_box_commands_are_linear_in_grading(text):
    # was quadratic: each "\boxedx" re-ran rfind over the whole text (60,000 of them: ~10 s)
    assert _bounded(grading.extract_answer, text, last_number_fallback=False, limit=2.0) is None


@given(st.binary(max_size=400))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_grade_file_with_arbitrary_bytes(tmp_path, raw):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"response": "\\\\boxed{1}", "answer": "1"}\n' + raw)
    try:
        acc = grading.grade_file(src, tmp_path / "out.jsonl", "response", "answer", timeout=2.0)
    except SatoriError as e:
        assert "in.jsonl" in str(e)
    else:
        assert 0 <= acc <= 1


# --------------------------------------------------------------------------- 1. bad input: data files


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows,match", [
    ([{"question": "a", "answer": "1"}, {"question": "b", "answer": ""}], r"x\.jsonl:2: field 'answer' is empty"),
    ([{"question": "a", "answer": "1"}, {"question": "b", "answer": None}], r"x\.jsonl:2: field 'answer' is empty"),
    ([{"question": "a", "answer": "#### 2"}, {"question": "b", "answer": "#### "}],  # a draw of the record test
     r"x\.jsonl:2: the final answer is empty \(gsm8k format\)"),
    ([{"problem": "a", "solution": "so \\boxed{ }"}], r"x\.jsonl:1: the final answer is empty \(math format\)"),
    ([{"question": "a", "answer": {"v": 1}}], r"x\.jsonl:1: field 'answer' must be text or a number, got dict"),
    ([{"question": "a", "answer": True}], r"x\.jsonl:1: field 'answer' must be text or a number, got bool"),
    ([{"question": 7.5, "answer": [1]}], r"x\.jsonl:1: field 'answer' must be text or a number, got list"),
    (['"just a string"'], r"x\.jsonl:1: expected a JSON object, got str"),
    (["[" * 100_000 + "]" * 100_000], r"x\.jsonl:1: malformed JSON"),
    ([{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, {"question": " a", "answer": "1"}],
     r"x\.jsonl:3: duplicate question \(first at .*x\.jsonl:1, same"),
    ([{"question": "a", "answer": "1"}, {"question": "a", "answer": "2"}],
     r"x\.jsonl:2: duplicate question \(first at .*x\.jsonl:1, there answer '1', here '2'\)"),
])
def test_bad_records_are_refused_naming_file_and_line(tmp_path, rows, match):
    with pytest.raises(SatoriError, match=match):
        load_problems(DataConfig(path=str(_write(tmp_path / "x.jsonl", rows))))


def test_line_numbers_count_blank_lines(tmp_path):
    path = _write(tmp_path / "x.jsonl", ["", {"question": "a", "answer": "1"}, "  ", {"question": "b"}])
    with pytest.raises(SatoriError, match=r"x\.jsonl:4: missing field 'answer'"):  # was reported as line 2
        load_problems(DataConfig(path=str(path)))


def test_skip_mode_skips_and_counts_every_kind_of_bad_line(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "1"}\n'
                     b'{"question": \n'                       # malformed JSON
                     b'\xff\xfe{"question": "c"}\n'           # invalid UTF-8
                     b'[1, 2]\n'                              # not an object
                     b'{"question": "d", "answer": ""}\n'     # empty answer
                     b'{"question": "a", "answer": "1"}\n'    # duplicate
                     b'{"question": "e", "answer": 5}\n')
    with caplog.at_level(logging.WARNING, logger="satori"):
        ps = load_problems(DataConfig(path=str(path), on_error="skip"))
    assert [(p.question, p.answer) for p in ps] == [("a", "1"), ("e", "5")]
    assert "skipped 5 record(s) (4 malformed, 1 duplicate), kept 2" in caplog.text
    assert "x.jsonl:2: malformed JSON" in caplog.text
    path.write_bytes(b"{oops\n\xff\n")
    with pytest.raises(SatoriError, match=r"no records \(2 bad line\(s\) skipped"):
        load_problems(DataConfig(path=str(path), on_error="skip"))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=8)
_RECORD = st.dictionaries(st.sampled_from(["question", "answer", "problem", "solution", "choices", "answerKey", "id",
                                           "level", "q"]), _JSON | ANY_TEXT, max_size=6)


@given(st.lists(_RECORD, max_size=6), st.sampled_from(["raise", "skip"]),
       st.sampled_from(["auto", "plain", "gsm8k", "math", "arc"]))
@example([{"question": "0", "answer": "#### "}], "raise", "auto")  # found by a draw: a blank answer was let through
@settings(max_examples=300, deadline=None)
def test_any_record_gives_a_problem_or_a_clear_error(records, on_error, fmt):
    cfg = DataConfig(path="x.jsonl", on_error=on_error, format=fmt)
    try:
        problems = problems_from_records(records, cfg, "x.jsonl")
    except SatoriError as e:
        assert on_error == "raise" and str(e).startswith("x.jsonl:")
        return
    ids = [p.id for p in problems]
    assert len(ids) == len(set(ids))
    for p in problems:
        assert isinstance(p.question, str) and p.question.strip() and isinstance(p.answer, str) and p.answer.strip()


@given(st.binary(max_size=500), st.sampled_from(["raise", "skip"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_in_a_data_file(tmp_path, raw, on_error):
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    try:
        problems = load_problems(DataConfig(path=str(path), on_error=on_error))
    except SatoriError as e:
        assert "d.jsonl" in str(e)
    else:
        assert all(isinstance(p, Problem) for p in problems)


# --------------------------------------------------------------------------- 1. bad input: configs


def _cls(name):
    from satori.cli import _commands

    return _commands()[name][0]


@pytest.mark.parametrize("command,values,match", [
    ("rl", {"micro_batch": 64, "train_batch": 32}, r"micro_batch \(64\) is larger than train_batch \(32\)"),
    ("rl", {"rollout_batch": 8, "n_samples": 2, "train_batch": 32}, r"train_batch \(32\) is larger than the rollout"),
    ("rl", {"steps": -1}, "steps must be > 0"),
    ("rl", {"actor_lr": 0}, "actor_lr must be > 0"),
    ("rl", {"reward_clip": -1}, "reward_clip must be > 0"),
    ("rl", {"gen_batch_size": 0}, "gen_batch_size must be > 0"),
    ("rl", {"max_bad_steps": -1}, "max_bad_steps must be >= 0"),
    ("rl", {"rollout_batch": "eight"}, "'rollout_batch' must be an integer"),
    ("rl", {"data": {"n": -5}}, "data.n must be > 0"),
    ("latro", {"batch_size": 2, "micro_batch": 4}, r"micro_batch \(4\) is larger than batch_size \(2\)"),
    ("latro", {"k": 1}, "k must be >= 2"),
    ("latro", {"gen_batch_size": -1}, "gen_batch_size must be > 0"),
    ("latro", {"max_bad_steps": -2}, "max_bad_steps must be >= 0"),
    ("sft", {"log_every": 0}, "log_every must be > 0"),
    ("sft", {"max_grad_norm": 0}, "max_grad_norm must be > 0"),
    ("sft", {"warmup_ratio": -0.1}, r"warmup_ratio must be in \[0, 1\]"),
    ("sft", {"batch_size": -4}, "batch_size and grad_accum must be > 0"),
    ("sft", {"max_bad_steps": -1}, "max_bad_steps must be >= 0"),
    ("sft", {"packing": "sometimes"}, "'packing' must be true or false"),
    ("orm", {"max_grad_norm": -1}, "max_grad_norm must be > 0"),
    ("orm", {"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ("orm", {"k": 1}, "k must be > 1"),
    ("eval", {"k": -1}, "k must be >= 0"),
    ("eval", {"gen": {"max_batch_tokens": 0}}, "max_batch_tokens must be > 0"),
    ("grade", {"timeout": 0}, "timeout must be in"),
    ("grade", {"workers": -2}, "workers must be >= 0"),
    ("testbed pretrain", {"vocab_size": -1}, "vocab_size must be > 0"),
    ("testbed pretrain", {"error_rate": 2.0}, r"error_rate must be in \[0, 1\]"),
    ("distill", {"batch_size": 0}, "batch_size must be > 0"),
    ("distill", {"sft": {"max_grad_norm": 0}}, "max_grad_norm must be > 0"),
])
def test_impossible_configs_are_refused_naming_the_option(command, values, match):
    with pytest.raises(SatoriError, match=match):
        from_dict(_cls(command), values)


def test_config_refused_on_the_command_line_before_any_work(tmp_path, capsys):
    from satori.cli import main

    out = tmp_path / "never"
    y = tmp_path / "c.yaml"
    y.write_text("policy: somewhere\nrollout_batch: 4\ntrain_batch: 4\nmicro_batch: 8\n")
    code = main(["rl", "--config", str(y), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "c.yaml" in err[0] and "micro_batch (8) is larger than train_batch (4)" in err[0]
    assert not out.exists()


def test_configs_changed_in_python_are_checked_before_any_work(tmp_path, tiny_coat, sft_jsonl):
    from satori.train.ppo import RLConfig, run_rl
    from satori.train.sft import SFTConfig, run_sft

    sft = SFTConfig(model=str(tiny_coat), data=str(sft_jsonl), out=str(tmp_path / "s"), max_steps=2, threads=1)
    sft.log_every = 0  # would divide by zero after the first step
    with pytest.raises(SatoriError, match="log_every must be > 0"):
        run_sft(sft)
    rl = load_config(RLConfig, overrides={"policy": str(tiny_coat), "out": str(tmp_path / "r")})
    rl.data.n = 0
    with pytest.raises(SatoriError, match="data.n must be > 0"):
        run_rl(rl)
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_shipped_presets_still_validate():
    from satori.pipeline import PipelineConfig

    for preset in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        load_config(PipelineConfig, preset)


# --------------------------------------------------------------------------- 2. faults: SIGTERM during each command

_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _stop_with_signal(argv: list[str], out: Path, sig=signal.SIGTERM, until=None, timeout: float = 120.0):
    """Run ``satori ARGV``; once ``until()`` holds (default: a first step is logged) send
    ``sig``; return (exit code, stderr)."""
    log = out.parent / f"{out.name}.stderr"
    with log.open("w") as fh:  # a file, not a pipe: a chatty child can never block on a full pipe
        proc = subprocess.Popen([sys.executable, "-m", "satori.cli", *argv], env=_ENV, stdout=subprocess.DEVNULL,
                                stderr=fh)
    until = until or (lambda: (out / "metrics.jsonl").is_file() and
                      any(json.loads(x).get("step", 0) >= 1 for x in (out / "metrics.jsonl").read_text().splitlines()))
    deadline = time.monotonic() + timeout
    try:
        while not until():
            if proc.poll() is not None:
                pytest.fail(f"satori {argv[0]} ended before the signal: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"satori {argv[0]} never reached the point to signal")
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def _stopped_at(code: int, err: str, out: Path) -> int:
    """Check a clean SIGTERM stop; the step it stopped at."""
    last = err.strip().splitlines()[-1]
    assert code == 143, err[-2000:]
    assert last.startswith("satori: stopped by SIGTERM at step ") and "--resume" in last, last
    step = int(last.split("at step ")[1].split(";")[0])
    ckpt = common.latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step-{step}"
    assert json.loads((ckpt / "state.json").read_text())["step"] == step
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    return step


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_during_sft_checkpoints_and_resume_continues(tmp_path, tiny_coat, sft_jsonl):
    from satori.train.sft import SFTConfig, run_sft

    out = tmp_path / "sft"
    args = dict(model=str(tiny_coat), data=str(sft_jsonl), out=str(out), valid_fraction=0.0, batch_size=2,
                lr=1e-3, warmup_ratio=0.0, save_every=1000, eval_every=1000, threads=1, seed=1)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    step = _stopped_at(*_stop_with_signal(["sft", *flags, "--max-steps=100000"], out), out)
    assert not (out / "model.safetensors").exists()
    result = run_sft(SFTConfig(**args, max_steps=step + 2, resume=True))
    assert _logged_steps(out) == list(range(1, step + 3)) and result["steps"] == step + 2
    assert (out / "model.safetensors").is_file()


def _orm_samples(path: Path, split: str, n: int, seed: int) -> Path:
    from satori.testbed.tasks import make_problems, reference_solution

    rows = []
    for p in make_problems(split, n, seed=seed):
        rows += [{"id": p.id, "question": p.question, "response": reference_solution(p), "correct": True},
                 {"id": p.id, "question": p.question, "response": "No idea.", "correct": False}]
    return _write(path, rows)


def test_sigterm_during_orm_checkpoints_and_resume_continues(tmp_path, tiny_coat):
    from satori.train.orm import ORMConfig, run_orm

    out = tmp_path / "orm"
    args = dict(policy=str(tiny_coat), out=str(out), samples=str(_orm_samples(tmp_path / "t.jsonl", "train", 6, 0)),
                valid_samples=str(_orm_samples(tmp_path / "v.jsonl", "valid", 3, 1)), batch_size=2, lr=1e-3,
                warmup_ratio=0.0, eval_every=100000, save_every=100000, threads=1, seed=1)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    step = _stopped_at(*_stop_with_signal(["orm", *flags, "--max-steps=100000"], out), out)
    result = run_orm(ORMConfig(**args, max_steps=step + 1, resume=True))
    assert result["resumed_from"] == step and result["best_step"] == step + 1
    assert _logged_steps(out) == list(range(1, step + 2)) and (out / "model.safetensors").is_file()


def _rl_args(policy, out) -> dict:
    return {"policy": str(policy), "out": str(out), "data": {"path": "testbed:train", "n": 8},
            "critic_init": "policy", "rollout_batch": 4, "train_batch": 4, "micro_batch": 2, "max_new_tokens": 8,
            "temperature": 1.0, "actor_lr": 1e-3, "critic_lr": 1e-3, "save_every": 100000, "threads": 1, "seed": 2}


def test_sigterm_during_rl_checkpoints_and_resume_continues(tmp_path, tiny_coat):
    from satori.train.ppo import RLConfig, run_rl

    out = tmp_path / "rl"
    args = _rl_args(tiny_coat, out)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k != "data"] + ["--data.n=8"]
    step = _stopped_at(*_stop_with_signal(["rl", *flags, "--steps=100000"], out), out)
    assert (common.latest_checkpoint(out) / "critic").is_dir()
    run_rl(from_dict(RLConfig, {**args, "steps": step + 1, "resume": True}))
    assert _logged_steps(out) == list(range(1, step + 2)) and (out / "critic").is_dir()


def test_sigterm_during_latro_checkpoints_and_resume_continues(tmp_path, tiny_base):
    from satori.train.latro import LatroConfig, run_latro

    out = tmp_path / "latro"
    args = {"model": str(tiny_base), "out": str(out), "k": 2, "batch_size": 2, "micro_batch": 1,
            "max_rationale_tokens": 6, "eval_every": 0, "save_every": 100000, "lr": 1e-3, "threads": 1,
            "gen_batch_size": 8}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()] + ["--data.n=8"]
    step = _stopped_at(*_stop_with_signal(["latro", *flags, "--steps=100000"], out), out)
    cfg = from_dict(LatroConfig, {**args, "data": {"path": "testbed:train", "n": 8}, "steps": step + 1, "resume": True})
    result = run_latro(cfg)
    assert _logged_steps(out) == list(range(1, step + 2)) and result["final"] == f"last step ({step + 1})"


def test_second_signal_quits_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with common.StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes of the main thread
                if stop.requested:
                    break
                time.sleep(0.01)
            assert stop.requested and stop.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are restored


# --------------------------------------------------------------------------- 2. faults: SIGKILL and full disk

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from satori.train import common

    out, die_at = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common.save_checkpoint(out, 1, {"model": model}, {"opt": opt}, {"note": "good"})
    real_save, real_json = torch.save, common.write_json

    def die_if(f):
        if os.path.basename(str(f)) == die_at:
            with open(f, "wb") as fh:
                fh.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = lambda obj, f, *a, **k: die_if(f) or real_save(obj, f, *a, **k)
    common.write_json = lambda f, obj: die_if(f) or real_json(f, obj)
    with torch.no_grad():
        model.weight.add_(1.0)
    common.save_checkpoint(out, 2, {"model": model}, {"opt": opt}, {"note": "never"})
    print("not killed")
""")


@pytest.mark.parametrize("die_at", ["model.pt", "state.json"])  # the first write; the completeness marker
def test_sigkill_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path, die_at):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(out), die_at], env=_ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = common.latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step-1"
    torch.manual_seed(0)
    fresh = torch.nn.Linear(3, 3)
    expected = {k: v.clone() for k, v in fresh.state_dict().items()}
    with torch.no_grad():
        fresh.weight.zero_()
    state = common.load_checkpoint(ckpt, {"model": fresh}, {"opt": torch.optim.SGD(fresh.parameters(), lr=0.1)})
    assert state["note"] == "good" and all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    stale = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert len(stale) == 1  # the killed writer's folder, never taken for a checkpoint
    common.save_checkpoint(out, 2, {"model": fresh}, {}, {"note": "after restart"})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # stale folder removed


def test_sigkill_during_sft_at_any_moment_loses_only_the_last_steps(tmp_path, tiny_coat, sft_jsonl):
    from satori.train.sft import SFTConfig, run_sft

    out = tmp_path / "sft"
    args = dict(model=str(tiny_coat), data=str(sft_jsonl), out=str(out), valid_fraction=0.0, batch_size=2,
                warmup_ratio=0.0, save_every=1, threads=1, seed=1)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]

    def three_checkpoints():
        root = out / "checkpoints"
        return root.is_dir() and len([p for p in root.iterdir() if p.name.startswith("step-")]) >= 2 and \
            (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3

    code, _ = _stop_with_signal(["sft", *flags, "--max-steps=100000"], out, sig=signal.SIGKILL,
                                until=three_checkpoints)
    assert code == -signal.SIGKILL
    ckpt = common.latest_checkpoint(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    run_sft(SFTConfig(**args, max_steps=step + 1, resume=True))
    assert _logged_steps(out) == list(range(1, step + 2))


class _Linear(torch.nn.Linear):
    """A module whose ``save_pretrained`` can be made to fail like a full disk."""

    fail = False

    def save_pretrained(self, folder, safe_serialization=True):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        if self.fail:
            raise OSError(28, "No space left on device")
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(Path(folder) / "model.safetensors"))


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, where):
    torch.manual_seed(0)
    model = _Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    common.save_checkpoint(tmp_path, 1, {"model": model}, {"opt": opt}, {"note": "good"})
    with torch.no_grad():
        model.weight.fill_(float("nan"))  # whatever happens next, step-1 must stay as it was
    if where == "model":
        model.fail = True
    else:
        real = torch.save

        def full(obj, f, *a, **k):
            if str(f).endswith("optim.pt"):
                Path(f).write_bytes(b"partial")
                raise OSError(28, "No space left on device")
            return real(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SatoriError, match=r"could not write checkpoint .*step-2: No space left on device \(free disk "
                                          r"space, then resume\); the previous checkpoint .*step-1 is intact"):
        common.save_checkpoint(tmp_path, 2, {"model": model}, {"opt": opt}, {"note": "bad"})
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]  # no temporary folder left
    back = _Linear(4, 4)
    state = common.load_checkpoint(tmp_path / "checkpoints" / "step-1", {"model": back},
                                   {"opt": torch.optim.AdamW(back.parameters(), lr=0.1)})
    assert state["note"] == "good" and all(torch.equal(back.state_dict()[k], v) for k, v in good.items())


def test_full_disk_in_a_training_run_is_a_clear_error_and_resume_works(tmp_path, monkeypatch, tiny_coat, sft_jsonl):
    from satori.train.sft import SFTConfig, run_sft

    cfg = SFTConfig(model=str(tiny_coat), data=str(sft_jsonl), out=str(tmp_path / "s"), valid_fraction=0.0,
                    batch_size=2, max_steps=4, save_every=1, warmup_ratio=0.0, threads=1, seed=1)
    real = torch.save

    def full(obj, f, *a, **k):
        if "step-3" in str(f):
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SatoriError, match="step-3: No space left on device.*step-2 is intact"):
        run_sft(cfg)
    monkeypatch.undo()  # disk space freed
    cfg.resume = True
    run_sft(cfg)
    assert _logged_steps(tmp_path / "s") == [1, 2, 3, 4]


# --------------------------------------------------------------------------- 2. faults: endpoint garbage


class _FlakyEndpoint(LocalEndpoint):
    """A chat-completions endpoint whose answer depends on a word in the request:
    ``garbage-once`` (an HTML error page with status 200, then a good answer), ``garbage``
    (always invalid JSON), ``shape`` (JSON whose content is not text), ``slow-once`` (first
    answer after 3 s), ``error-once`` (HTTP 500 first); anything else answers at once."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__(self.handle)

    def handle(self, method, path, body):
        word = body["messages"][0]["content"]
        with self.lock:
            n = self.hits[word] = self.hits.get(word, 0) + 1
        if word == "garbage" or (word == "garbage-once" and n == 1):
            return 200, b"<html>502 Bad Gateway</html>"
        if word == "shape":
            return 200, b'{"choices": [{"message": {"content": {"oops": 1}}}]}'
        if word == "error-once" and n == 1:
            return 500, {"error": "boom"}
        if word == "slow-once" and n == 1:
            time.sleep(3)
        return 200, {"choices": [{"message": {"content": f"ok {word}"}, "finish_reason": "stop"}]}


def test_endpoint_garbage_errors_and_slow_answers_are_retried_then_reported():
    from satori.synth.backends import Completion, RequestFailed, chat_many, make_client

    words = ["fine", "garbage-once", "garbage", "shape", "error-once", "slow-once"]
    with _FlakyEndpoint() as server:
        client = make_client(server.base_url, "m", "", timeout=1.0, max_retries=2, backoff=0.01, concurrency=3)
        results = chat_many(client, [{"messages": [{"role": "user", "content": w}], "max_tokens": 4,
                                      "temperature": 0.0} for w in words])
    got = dict(zip(words, results))
    for w in ("fine", "garbage-once", "error-once", "slow-once"):
        assert isinstance(got[w], Completion) and got[w].text == f"ok {w}", (w, got[w])
    for w in ("garbage", "shape"):
        assert isinstance(got[w], RequestFailed), got[w]
        assert "failed after 3 attempts" in got[w].error and "malformed chat-completions answer" in got[w].error
    assert server.hits["garbage-once"] == 2 and server.hits["garbage"] == 3 and server.hits["shape"] == 3
    assert server.hits["slow-once"] == 2


# --------------------------------------------------------------------------- 3. training health


def _sft_cfg(tmp_path, model, data, name, **kw):
    from satori.train.sft import SFTConfig

    base = dict(model=str(model), data=str(data), out=str(tmp_path / name), valid_fraction=0.0, max_steps=4,
                batch_size=4, lr=1e-3, warmup_ratio=0.0, eval_every=100, save_every=100, threads=1, seed=3)
    return SFTConfig(**{**base, **kw})


def _poison_sft_loss(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None):
    import satori.train.sft as sft

    real, calls = sft.sum_token_loss, []

    def loss(*a, **k):
        calls.append(1)
        value = real(*a, **k)
        n = len(calls)
        return value * float("nan") if n in (bad_calls or set()) or (from_call and n >= from_call) else value

    monkeypatch.setattr(sft, "sum_token_loss", loss)


def _all_finite(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for f in folder.glob("*.safetensors"):
        weights.update(load_file(str(f)))
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights.values())
    return weights


def test_sft_nan_loss_step_is_skipped_and_reported(tmp_path, monkeypatch, tiny_coat, sft_jsonl, caplog):
    from satori.train.sft import run_sft

    _poison_sft_loss(monkeypatch, bad_calls={2})
    with caplog.at_level(logging.WARNING, logger="satori"):
        result = run_sft(_sft_cfg(tmp_path, tiny_coat, sft_jsonl, "a", max_bad_steps=1))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["skipped_nonfinite"] == 1 and rows[1]["nonfinite"] == "loss" and "grad_norm" not in rows[1]
    assert "step 2 skipped: NaN/inf in loss" in caplog.text
    assert result["bad_steps"] == 1
    _all_finite(tmp_path / "a")


def test_sft_stops_after_max_bad_steps_with_the_last_good_checkpoint(tmp_path, monkeypatch, tiny_coat, sft_jsonl):
    from satori.train.sft import run_sft

    _poison_sft_loss(monkeypatch, from_call=3)
    with pytest.raises(SatoriError, match=r"training stopped: 3 steps had NaN/inf values .*--max-bad-steps 2.*step-4"):
        run_sft(_sft_cfg(tmp_path, tiny_coat, sft_jsonl, "b", max_steps=10, save_every=2, max_bad_steps=2))
    out = tmp_path / "b"
    assert not (out / "model.safetensors").exists()
    good = _all_finite(out / "checkpoints" / "step-2" / "model")
    after = _all_finite(out / "checkpoints" / "step-4" / "model")  # written after two skipped steps
    assert all(torch.equal(good[k], after[k]) for k in good)  # nothing of the bad steps reached the weights


def test_sft_inf_gradients_are_skipped(tmp_path, monkeypatch, tiny_coat, sft_jsonl):
    import satori.train.sft as sft

    real = sft.load_model
    seen = []

    def load(path):
        model = real(path)
        param = next(model.parameters())
        param.register_hook(lambda g: g * float("inf") if len(seen.append(1) or seen) == 2 else g)
        return model

    monkeypatch.setattr(sft, "load_model", load)
    result = sft.run_sft(_sft_cfg(tmp_path, tiny_coat, sft_jsonl, "g", max_steps=3))
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["nonfinite"] == "gradients" and result["bad_steps"] == 1
    _all_finite(tmp_path / "g")


def _poison_reward(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None):
    import satori.algos as algos

    real, calls = algos.satori_reward, []

    def reward(*a, **k):
        calls.append(1)
        parts = real(*a, **k)
        n = len(calls)
        if n in (bad_calls or set()) or (from_call and n >= from_call):
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(algos, "satori_reward", reward)


def test_rl_nan_reward_step_is_skipped_and_reported(tmp_path, monkeypatch, tiny_coat):
    from satori.train.ppo import RLConfig, run_rl

    _poison_reward(monkeypatch, bad_calls={2})
    run_rl(from_dict(RLConfig, {**_rl_args(tiny_coat, tmp_path / "r"), "steps": 3, "max_bad_steps": 1}))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["nonfinite"] == "reward" and "policy_loss" not in rows[1] and "policy_loss" in rows[2]
    assert json.loads((tmp_path / "r" / "rl_result.json").read_text())["bad_steps"] == 1
    _all_finite(tmp_path / "r")


def test_rl_stops_after_max_bad_steps_with_the_last_good_checkpoint(tmp_path, monkeypatch, tiny_coat):
    from satori.train.ppo import RLConfig, run_rl

    _poison_reward(monkeypatch, from_call=2)
    cfg = from_dict(RLConfig, {**_rl_args(tiny_coat, tmp_path / "r"), "steps": 6, "save_every": 1, "max_bad_steps": 1})
    with pytest.raises(SatoriError, match=r"training stopped: 2 steps had NaN/inf values \(the last one in reward"):
        run_rl(cfg)
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]
    good, after = _all_finite(root / "step-1" / "policy"), _all_finite(root / "step-2" / "policy")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_rl_nan_gradients_are_skipped(tmp_path, monkeypatch, tiny_coat):
    import satori.train.ppo as ppo

    real, calls = ppo.load_model, []

    def load(path):
        model = real(path)
        next(model.parameters()).register_hook(lambda g: g * float("nan") if len(calls) == 1 else g)
        calls.append(1)
        return model

    monkeypatch.setattr(ppo, "load_model", load)
    ppo.run_rl(from_dict(ppo.RLConfig, {**_rl_args(tiny_coat, tmp_path / "r"), "steps": 1, "max_bad_steps": 1}))
    (row,) = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert row["nonfinite"] == "losses or gradients"


# --------------------------------------------------------------------------- 3. reward hacking


def test_empty_meta_only_and_truncated_continuations_never_earn_the_correctness_reward():
    from satori.rollout import Sample
    from satori.train.ppo import State, rule_correct

    prob = Problem(id="p", question="What is 2 + 3?", answer="5")
    from_correct = State(prob, prefix="Step 1: 2 + 3 = 5.\nThe answer is \\boxed{5}.\n" + coat.REFLECT, status=1)
    fresh = State(prob)
    cases = [  # (state, continuation, truncated, earns the reward)
        (from_correct, "", False, False),
        (from_correct, coat.CONTINUE + coat.REFLECT + coat.EXPLORE, False, False),
        (from_correct, f" {coat.REFLECT}\n{coat.CONTINUE}  ", False, False),
        (from_correct, "It checks out: 2 + 3 = 5. The answer is \\boxed{5}", True, False),
        (from_correct, "It checks out: 2 + 3 = 5.", False, True),  # the trajectory's answer stands
        (from_correct, "Wait, it is \\boxed{6}.", False, False),
        (fresh, "", False, False),
        (fresh, coat.REFLECT * 3, False, False),
        (fresh, "Step 1: 2 + 3 = 5.\nThe answer is \\boxed{5}.", True, False),
        (fresh, "Step 1: 2 + 3 = 5.\nThe answer is \\boxed{}.", False, False),  # empty answer
        (fresh, "Step 1: 2 + 3 = 5.\nThe answer is \\boxed{5}.", False, True),
    ]
    samples = [Sample(prompt="", text=text, prompt_ids=[1], response_ids=[2], truncated=cut, index=i)
               for i, (_, text, cut, _) in enumerate(cases)]
    got = rule_correct(samples, [state for state, _, _, _ in cases]).tolist()
    assert got == [ok for _, _, _, ok in cases]


@pytest.mark.parametrize("response", ["", "   ", coat.CONTINUE + coat.REFLECT + coat.EXPLORE, "<|im_end|>",
                                      "\\boxed{}", "The answer is \\boxed{5", "\\boxed{" + coat.REFLECT + "}"])
def test_grading_never_rewards_empty_or_meta_only_answers(response):
    assert grading.grade(response, "5")[1] is False
    assert grading.grade_batch([response], ["5"])[0][1] is False
    assert grading.grade("\\boxed{5}", "5", truncated=True)[1] is False


# --------------------------------------------------------------------------- 4. determinism


def test_sft_same_seed_gives_bitwise_identical_weights(tmp_path, tiny_coat, sft_jsonl):
    from satori.train.sft import run_sft

    for name in ("a", "b"):
        run_sft(_sft_cfg(tmp_path, tiny_coat, sft_jsonl, name, max_steps=3, batch_size=3))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_coat / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)


def test_rl_same_seed_gives_bitwise_identical_weights(tmp_path, tiny_coat):
    from satori.train.ppo import RLConfig, run_rl

    for name in ("a", "b"):
        run_rl(from_dict(RLConfig, {**_rl_args(tiny_coat, tmp_path / name), "steps": 2}))
    for part in ("model.safetensors", "critic/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / part)), load_file(str(tmp_path / "b" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    def logged(name):  # every logged value except wall-clock times
        return [{k: v for k, v in json.loads(x).items() if not ("time" in k or "elapsed" in k or "seconds" in k)}
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert logged("a") == logged("b") and "policy_loss" in logged("a")[0]

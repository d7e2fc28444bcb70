"""satori synth: critic texts, trajectory assembly and types, the hf and openai backends
(against a real local HTTP server running a real model), resume, configuration errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from satori.coat import answer_before_first_reflect, is_valid_coat, parse_steps
from satori.data import PLAIN_RESPONSE_PREFIX, DataConfig, Problem
from satori.errors import SatoriError
from satori.grading import extract_answer
from satori.synth import AgentConfig, SynthConfig, run_synth
from satori.synth import agents as ag
from satori.synth import trajectory as tj
from satori.synth.pipeline import Agents, _select, prepare_agents, run_llm_critic
from satori.testbed import BASE_MODEL_DIR
from satori.train.orm import load_orm, score_sequences
from satori.testbed.checker import check_steps, correct_step_text
from satori.testbed.tasks import make_problems
from endpoint import LocalEndpoint

SHIPPED = BASE_MODEL_DIR
HAVE_SHIPPED = (SHIPPED / "config.json").is_file()


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return make_problems("train", 40, seed=5)


def _level(problems, level):
    return next(p for p in problems if p.meta["level"] == level)


def _steps(solution: str) -> list[str]:
    return solution.split("\n\n")


def _wrong_at(problem: Problem, k: int, delta: int = 3) -> str:
    """The reference solution with an arithmetic slip in step k (later steps carry it on;
    the slip grows until every later division stays exact)."""
    from fractions import Fraction

    from satori.testbed.tasks import format_equation, format_solution, operation_sentences

    start, ops = problem.meta["start"], problem.meta["ops"]
    for d in range(delta, delta + 200):
        value, eqs = Fraction(start), []
        for i, (op, x) in enumerate(ops, 1):
            result = {"+": value + x, "-": value - x, "*": value * x, "/": value / x}[op] + (d if i == k else 0)
            eqs.append(format_equation(value, op, x, result))
            value = result
        if all(v.denominator == 1 for v in [value]) and "/" not in "".join(e.split("=")[1] for e in eqs):
            return format_solution(eqs, value, operation_sentences(problem))
    raise AssertionError("no exact slip found")


def _finish(problem: Problem, from_step: int) -> str:
    """The reference steps from ``from_step`` on, as a generator would continue."""
    return "\n\n".join(_steps(problem.solution)[from_step - 1:])


def _check_record_shape(traj: tj.Trajectory, expected_type: str) -> str:
    text = tj.response(traj)
    assert is_valid_coat(text)
    assert tj.type_of_rounds(traj.rounds) == expected_type == tj.type_of_response(text)
    steps = parse_steps(text)
    prov = tj.provenance(traj)
    assert len(prov) == len(steps)
    assert [(s.action, s.text) for s in steps] == [(d["action"], d["text"]) for d in prov]
    return text


# --------------------------------------------------------------------------- rule critic + assembly


def test_rule_correction_names_step_and_gives_corrected_step(problems):
    p = _level(problems, 4)
    wrong = _wrong_at(p, 2)
    traj = tj.from_cot(wrong)
    fb = ag.rule_correction(p, tj.line_texts(traj), key="a")
    found = _steps(wrong)[1].split(": ", 1)[1]
    good = _steps(p.solution)[1]
    assert fb.kind == "correct" and fb.after == 2 and fb.keep == 1 and not fb.complete
    assert "step 2" in fb.reflect.lower() and found.rsplit("= ", 1)[1] in fb.reflect
    # what the line has is quoted first, then the step redone from the question
    assert fb.reflect.index(found.rsplit(". ", 1)[-1]) < fb.reflect.index(correct_step_text(p, 2))
    assert fb.explore == good  # the hint is the corrected step, "Step 2: ..."
    reflections = {ag.rule_correction(p, tj.line_texts(traj), key=f"k{i}").reflect for i in range(64)}
    assert len(reflections) == len(ag.OPENINGS) * len(ag.WRONG_VERDICTS)  # every wording is used
    assert all("step 2" in r.lower() and ": T" not in r and r.endswith(".") for r in reflections)

    for position in ("step", "end"):
        new, complete = tj.apply_feedback(traj, fb, position)
        assert not complete
        assert tj.continuation_prefix(new) == "\n\n".join(_steps(p.solution)[:2]) + "\n\n"
        done = tj.extend(new, _finish(p, 3))
        text = _check_record_shape(done, "III-I")
        c = check_steps(p, text)
        assert c.first_wrong_step is None and c.final_correct
        before = answer_before_first_reflect(text)
        if position == "end":  # the wrong answer is written before the reflection
            assert extract_answer(before, last_number_fallback=False) == wrong.rsplit("{", 1)[1].split("}")[0]
            assert done.positions == ["end"]
        else:  # cut right after the wrong step: no answer before the reflection
            assert "\\boxed" not in before and before.endswith(_steps(wrong)[1])
            assert done.positions == ["step"]


def test_rule_correction_of_last_step_completes_without_generator(problems):
    p = _level(problems, 3)
    traj = tj.from_cot(_wrong_at(p, 3))
    fb = ag.rule_correction(p, tj.line_texts(traj), key="b")
    assert fb.complete and fb.explore.endswith(f"\\boxed{{{p.answer}}}.")
    new, complete = tj.apply_feedback(traj, fb, "step")
    assert complete
    text = _check_record_shape(new, "III-I")
    assert check_steps(p, text).first_wrong_step is None


def test_rule_correction_missing_extra_and_final_answer(problems):
    p = _level(problems, 3)
    steps = _steps(p.solution)
    # stops after step 2 with a (wrong) answer
    short = steps[0] + "\n\n" + steps[1] + "\nThe answer is \\boxed{" + steps[1].rsplit("= ", 1)[1] + "}."
    fb = ag.rule_correction(p, _steps(short), key="c")
    assert "missing" in fb.reflect and fb.explore.startswith("Step 3: ") and fb.complete and fb.keep == 2
    traj = tj.from_cot(short)
    new, _ = tj.apply_feedback(traj, fb, "end")
    assert check_steps(p, tj.response(new)).first_wrong_step is None and check_steps(p, tj.response(new)).final_correct
    # correct steps, wrong boxed answer
    bad_box = p.solution.replace(f"\\boxed{{{p.answer}}}", "\\boxed{1234}")
    fb = ag.rule_correction(p, _steps(bad_box), key="d")
    assert fb.explore == f"The answer is \\boxed{{{p.answer}}}." and fb.complete
    # all right: nothing to correct
    assert ag.rule_correction(p, _steps(p.solution), key="e") is None


def test_rule_verification_rederives_a_step(problems):
    p = _level(problems, 4)
    traj = tj.from_cot(p.solution)
    texts = tj.line_texts(traj)
    for key in ("v0", "v1", "v2", "v3", "v4"):
        fb = ag.rule_verification(p, texts, key, last_ok=False)
        assert fb.kind == "verify" and 1 <= fb.after < len(texts)
        assert f"step {fb.after}" in fb.reflect and correct_step_text(p, fb.after) in fb.reflect
        result = correct_step_text(p, fb.after).rsplit("= ", 1)[1]
        assert any(v.format(k=fb.after, c=result) in fb.reflect for v in ag.RIGHT_VERDICTS)
    new, complete = tj.apply_feedback(traj, fb, "end", answer=p.answer)
    assert complete
    text = _check_record_shape(new, "II-I")
    assert text.endswith(f"So the answer is \\boxed{{{p.answer}}}.")
    assert check_steps(p, text).final_correct and check_steps(p, text).first_wrong_step is None
    new, complete = tj.apply_feedback(traj, fb, "step")
    assert not complete and new.line == traj.line[: fb.after]
    text = _check_record_shape(tj.extend(new, _finish(p, fb.after + 1)), "II-I")
    assert check_steps(p, text).first_wrong_step is None


def test_step_check_quotes_the_line_and_redoes_the_step_before_the_verdict(problems):
    p = _level(problems, 4)
    right = correct_step_text(p, 3)
    op, operand = p.meta["ops"][2]
    redo = f"The problem says to {ag._VERB[op]} {operand}: {right}."
    result = right.rsplit("= ", 1)[1]
    openings = {}
    for wrong, found in ((False, right), (True, "9 + 9 = 99"), (True, right.replace("=", "+ 0 ="))):
        texts = [ag.step_check(p, 3, found, wrong, f"k{i}") for i in range(32)]
        compared = (found, right) if found.endswith(f"= {result}") else ("99", result)
        for text in texts:
            verdicts = [v.format(k=3, c=compared[1], found_c=compared[0]) if wrong else v.format(k=3, c=result)
                        for v in (ag.WRONG_VERDICTS if wrong else ag.RIGHT_VERDICTS)]
            said = [v for v in verdicts if v in text]
            assert len(said) == 1  # exactly one verdict, and it is the step checker's
            assert text.index(f"Step 3 has {found}.") < text.index(redo) < text.index(said[0])
        openings[found] = {t[: t.index("Step 3 has")].strip() for t in texts}
    # the opening does not give the verdict away: right and wrong checks open the same ways
    assert len({frozenset(o) for o in openings.values()}) == 1
    assert openings[right] == {o.format(k=3) for o in ag.OPENINGS}


def test_every_type_is_assembled_and_labelled(problems):
    p = _level(problems, 5)
    ref = tj.from_cot(p.solution)
    made = {"I": ref}
    # II-I: verify step j, generator finishes correctly
    v = ag.rule_verification(p, tj.line_texts(ref), "x", last_ok=False)
    j = v.after
    t, _ = tj.apply_feedback(ref, v, "step")
    made["II-I"] = tj.extend(t, _finish(p, j + 1))
    # II-II: verify step j, generator slips in the last step, critic corrects it (complete)
    t2 = tj.extend(t, "\n\n".join(_steps(_wrong_at(p, 5))[j:]))
    fb = ag.rule_correction(p, tj.line_texts(t2), "y")
    assert fb.after == 5 and fb.complete
    made["II-II"], complete = tj.apply_feedback(t2, fb, "step")
    assert complete
    # III-I and III-II: wrong at step 1; after the first correction the generator slips in step 3
    w = tj.from_cot(_wrong_at(p, 1))
    t3, _ = tj.apply_feedback(w, ag.rule_correction(p, tj.line_texts(w), "z"), "end")
    made["III-I"] = tj.extend(t3, _finish(p, 2))
    t4 = tj.extend(t3, "\n\n".join(_steps(_wrong_at(p, 3))[1:]))
    t4, _ = tj.apply_feedback(t4, ag.rule_correction(p, tj.line_texts(t4), "w"), "end")
    made["III-II"] = tj.extend(t4, _finish(p, 4))
    assert set(made) == set(tj.TYPES)
    for ttype, traj in made.items():
        text = _check_record_shape(traj, ttype)
        c = check_steps(p, text)
        assert c.final_correct and c.first_wrong_step is None, (ttype, text)
        agents = [d["agent"] for d in tj.provenance(traj)]
        actions = [d["action"] for d in tj.provenance(traj)]
        assert all(a == "critic" for a, act in zip(agents, actions) if act in ("reflect", "explore"))
    assert tj.type_of_response("a<|reflect|>b<|explore|>c<|reflect|>d") is None  # correction then verify: unnamed


def test_llm_critic_reply_parsing():
    fb = ag.parse_critic_reply("**First wrong step:** Step 3\n**Reason:** 12 - 3 is 9.\n**Hint:** Subtract again.", "correct", 5)
    assert (fb.after, fb.keep, fb.explore) == (3, 2, "Subtract again.")
    assert fb.reflect == "Wait, step 3 is wrong: 12 - 3 is 9."
    fb = ag.parse_critic_reply("first wrong step: 2\nhint: use the\nright operand <|reflect|>", "correct", 2)
    assert fb.explore == "use the right operand" and fb.reflect == "Wait, step 2 is wrong."
    assert ag.parse_critic_reply("First wrong step: 7\nHint: x", "correct", 5) is None  # out of range
    assert ag.parse_critic_reply("First wrong step: 2", "correct", 5) is None  # no hint
    assert ag.parse_critic_reply("garbage 1 2 3", "correct", 5) is None
    fb = ag.parse_critic_reply("Verify step: 2\nVerification: 9 + 3 = 12, so it holds.", "verify", 4)
    assert fb.kind == "verify" and fb.after == 2 and fb.reflect == "Let me verify step 2: 9 + 3 = 12, so it holds."
    assert ag.parse_critic_reply("Verify step: 0\nVerification: ok", "verify", 4) is None


# --------------------------------------------------------------------------- selectors


def _two_corrections(p):
    """Two III-I trajectories of different length for the same problem."""
    out = []
    for s, key in ((0, "t0"), (1, "t1")):
        w = tj.from_cot(_wrong_at(p, 1, delta=1 + s), sample=s)
        t, _ = tj.apply_feedback(w, ag.rule_correction(p, tj.line_texts(w), key), ("step", "end")[s])
        out.append((0, tj.extend(t, _finish(p, 2))))
    return out


def test_rule_and_orm_selectors(tmp_path, tiny_base, problems):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    p = _level(problems, 3)
    finals = _two_corrections(p)
    texts = [tj.response(t) for _, t in finals]
    args = ([p], finals, [{}], [None], [hashlib.sha256()])
    cfg = SynthConfig()
    rule = _select(Agents(AgentConfig("hf"), AgentConfig("rule"), AgentConfig("rule")), cfg, *args)
    (rec,) = rule[0]["records"]
    assert rec["type"] == "III-I" and rec["response"] == min(texts, key=len)

    tok = AutoTokenizer.from_pretrained(tiny_base)
    base = json.loads((tiny_base / "config.json").read_text())
    for labels, name in ((1, "orm"), (2, "two")):
        config = LlamaConfig(**{k: base[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                     "num_attention_heads", "intermediate_size")},
                             num_labels=labels, pad_token_id=tok.pad_token_id)
        torch.manual_seed(1)
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with pytest.raises(SatoriError, match="num_labels=2"):
        load_orm(str(tmp_path / "two"))
    model, otok = load_orm(str(tmp_path / "orm"))
    from satori.data import build_prompt

    full = [build_prompt(p, otok) + t for t in texts]
    with torch.no_grad():  # independent scores: one unpadded sequence at a time
        single = [model(**otok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item() for t in full]
    assert score_sequences(model, otok, [build_prompt(p, otok)] * len(texts), texts).tolist() == \
        pytest.approx(single, abs=1e-4)
    agents = Agents(AgentConfig("hf"), AgentConfig("rule"), AgentConfig("orm", path=str(tmp_path / "orm")),
                    orm_model=model, orm_tok=otok)
    (rec,) = _select(agents, cfg, *args)[0]["records"]
    best = max(range(2), key=lambda i: single[i])
    assert rec["response"] == texts[best] and rec["meta"]["score"] == pytest.approx(single[best], abs=1e-4)


# --------------------------------------------------------------------------- end to end (hf)


def _base(tiny_base) -> Path:
    return SHIPPED if HAVE_SHIPPED else tiny_base


def _cfg(out, model, n=12, **kw) -> SynthConfig:
    base = dict(data=DataConfig(path="testbed:train", n=n, seed=3), out=str(out),
                generator=AgentConfig(backend="hf", path=str(model)), n_samples=4, k_keep=2, batch_size=4,
                max_new_tokens=140 if HAVE_SHIPPED else 24, threads=1, progress=False, seed=11)
    base.update(kw)
    return SynthConfig(**base)


def _records(out: Path) -> list[dict]:
    path = out / "trajectories.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _done(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "done.jsonl").read_text().splitlines()]


def test_hf_end_to_end_records_are_valid(tmp_path, tiny_base):
    out = tmp_path / "run"
    # 8 samples per problem: the shipped base is right about 1 time in 6, so every type shows up
    summary = run_synth(_cfg(out, _base(tiny_base), n=8, n_samples=8))
    assert summary["processed"] == 8 and summary["failed"] == 0
    assert summary["generator"]["samples"] == 64
    recs = _records(out)
    assert summary["records"] == len(recs) == sum(summary["types"].values())
    ps = {p.id: p for p in make_problems("train", 8, seed=3)}
    for r in recs:
        assert is_valid_coat(r["response"]) and tj.type_of_response(r["response"]) == r["type"]
        assert len(r["provenance"]) == len(parse_steps(r["response"]))
        c = check_steps(ps[r["id"]], r["response"])
        assert c.final_correct and c.first_wrong_step is None
        assert r["question"] == ps[r["id"]].question
    per = {}
    for r in recs:
        per.setdefault(r["id"], []).append(r["type"])
    assert all(len(v) == len(set(v)) for v in per.values())  # at most one of each type
    if HAVE_SHIPPED:
        assert summary["types"]["I"] > 0 and summary["types"]["III-I"] + summary["types"]["III-II"] > 0


def test_hf_llm_critic_plumbing(tmp_path, tiny_base, problems):
    cfg = _cfg(tmp_path / "x", tiny_base, critic=AgentConfig(backend="hf", path=str(tiny_base), max_new_tokens=12))
    agents = prepare_agents(cfg, problems[:2])
    assert agents.critic_model is agents.gen_model  # same folder: loaded once
    prompts = [ag.critic_prompt(p, _steps(p.solution), "correct") for p in problems[:2]]
    assert "Reference solution:" in prompts[0] and "(1) Step 1:" in prompts[0]
    replies = run_llm_critic(agents, prompts, seed=0)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    # an untrained model's reply is not parseable feedback
    assert all(ag.parse_critic_reply(r, "correct", 3) is None for r in replies)
    # a verification is only written about a step that is right
    wrong = _steps(_wrong_at(_level(problems, 4), 2))
    assert {ag.rule_verification(_level(problems, 4), wrong, f"k{i}", True).after for i in range(8)} == {1}


def test_openai_critic_and_instruction_mode(tmp_path, tiny_base, problems):
    from satori.synth import backends as be

    with _ModelServer(tiny_base) as server:
        critic = AgentConfig(backend="openai", base_url=server.base_url, model="testbed", api_key_env="",
                             max_new_tokens=8)
        agents = prepare_agents(_cfg(tmp_path / "x", tiny_base, critic=critic), problems[:2])
        prompts = [ag.critic_prompt(p, _steps(p.solution), "verify") for p in problems[:2]]
        replies = run_llm_critic(agents, prompts, seed=0)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    # requests run concurrently, so the server may receive them in any order
    assert sorted(b["messages"][0]["content"] for b in server.bodies) == sorted(prompts)
    assert all(b["max_tokens"] == 8 and b["temperature"] == 0.0 for b in server.bodies)
    msgs, extra = be.generator_messages("Problem: x", "Step 1: 1 + 1 = 2\n\n", "instruction")
    assert len(msgs) == 1 and msgs[0]["content"].endswith("Step 1: 1 + 1 = 2\n\n") and extra == {}


# --------------------------------------------------------------------------- resume


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tiny_base):
    model = _base(tiny_base)
    ref = tmp_path / "ref"
    run_synth(_cfg(ref, model))
    out = tmp_path / "killed"
    code = ("import sys, time; from satori.synth import run_synth; from satori.synth import pipeline as pl; "
            "from satori.data import DataConfig; from satori.synth import AgentConfig, SynthConfig; "
            f"run_synth(SynthConfig(data=DataConfig(path='testbed:train', n=12, seed=3), out={str(out)!r}, "
            f"generator=AgentConfig(backend='hf', path={str(model)!r}), n_samples=4, k_keep=2, batch_size=4, "
            f"max_new_tokens={_cfg(out, model).max_new_tokens}, threads=1, progress=False, seed=11))")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    done_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        path = out / "done.jsonl"
        if path.exists() and path.read_text().count("\n") >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done_at_kill = len(_done(out))
    assert 4 <= done_at_kill < 12, "the run was not killed partway"
    # simulate a crash inside the next batch's write: a record of an unfinished problem and a torn line
    with (out / "trajectories.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "testbed-train-s3-11", "response": "x"}) + "\n" + '{"id": "testbed-tr')
    with (out / "done.jsonl").open("a") as fh:
        fh.write('{"id": "testbed-train-s3-1')
    summary = run_synth(_cfg(out, model))
    assert summary["processed"] == 12
    ids = [d["id"] for d in _done(out)]
    assert sorted(ids) == sorted(d["id"] for d in _done(ref)) and len(set(ids)) == 12
    strip = lambda ds: sorted((d["id"], d["sample_digest"], tuple(d["types"])) for d in ds)  # noqa: E731
    assert strip(_done(out)) == strip(_done(ref))
    key = lambda r: (r["id"], r["type"])  # noqa: E731
    assert sorted(_records(out), key=key) == sorted(_records(ref), key=key)
    if HAVE_SHIPPED:
        assert _records(ref)
    # a run that is already complete does nothing and keeps everything
    again = run_synth(_cfg(out, model))
    assert again["processed"] == 12 and len(_records(out)) == len(_records(ref))
    with pytest.raises(SatoriError, match="different 'n_samples'"):
        run_synth(_cfg(out, model, n_samples=5))


# --------------------------------------------------------------------------- openai backend


class _ModelServer:
    """An OpenAI-compatible server on 127.0.0.1 that answers with a real local model.

    ``fail_first`` requests answer 500, ``slow_first`` requests sleep ``sleep`` seconds
    first, and requests whose messages contain ``fail_marker`` always answer 500 (or, with
    ``garbage``, status 200 with an HTML page instead of JSON, as a broken proxy does).
    """

    def __init__(self, model_path: Path, fail_first: int = 0, slow_first: int = 0, sleep: float = 0.0,
                 fail_marker: str | None = None, garbage: bool = False):
        from satori.rollout import generate, load_model, load_tokenizer

        self.model, self.tok = load_model(model_path), load_tokenizer(model_path)
        self.generate = generate
        self.fail_first, self.slow_first, self.sleep, self.fail_marker = fail_first, slow_first, sleep, fail_marker
        self.garbage = garbage
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.bodies: list[dict] = []
        self.endpoint = LocalEndpoint(self.handle)
        self.base_url = self.endpoint.base_url

    def handle(self, method, path, body):
        if method == "GET":
            if path == "/v1/models":
                return 200, {"object": "list", "data": [{"id": "testbed", "object": "model"}]}
            return 404, {"error": "not found"}
        if path != "/v1/chat/completions":
            return 404, {"error": "not found"}
        with self.lock:
            n = len(self.log)
            self.bodies.append(body)
            marked = self.fail_marker and self.fail_marker in json.dumps(body["messages"])
            kind = "fail" if n < self.fail_first or marked else "slow" if n < self.slow_first else "ok"
            self.log.append(kind)
        if kind == "fail":
            if self.garbage and marked:
                return 200, b"<html><body>502 Bad Gateway</body></html>"
            return 500, {"error": "boom"}
        if kind == "slow":
            time.sleep(self.sleep)
        return 200, self.complete(body)

    def complete(self, body: dict) -> dict:
        msgs = body["messages"]
        prompt = msgs[0]["content"] + PLAIN_RESPONSE_PREFIX  # the plain-text prompt (no chat template)
        if msgs[-1]["role"] == "assistant" and body.get("continue_final_message"):
            prompt += msgs[-1]["content"]
        with self.lock:
            (s,) = self.generate(self.model, self.tok, [prompt], max_new_tokens=body["max_tokens"],
                                 temperature=body.get("temperature", 1.0), seed=body.get("seed", 0))
        return {"object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": s.text},
                             "finish_reason": "length" if s.truncated else "stop"}]}

    def __enter__(self):
        self.endpoint.__enter__()
        return self

    def __exit__(self, *exc):
        self.endpoint.__exit__(*exc)


def _openai_cfg(out, server, n=3, **agent):
    a = dict(backend="openai", base_url=server.base_url, model="testbed", api_key_env="", timeout=60.0,
             max_retries=3, backoff=0.01, concurrency=4)
    a.update(agent)
    return _cfg(out, "unused", n=n, n_samples=2, generator=AgentConfig(**a))


def test_openai_generator_with_retries_on_500(tmp_path, tiny_base):
    with _ModelServer(_base(tiny_base), fail_first=2) as server:
        summary = run_synth(_openai_cfg(tmp_path / "o", server))
    assert summary["failed"] == 0 and summary["processed"] == 3 and summary["generator"]["samples"] == 6
    assert server.log[:2] == ["fail", "fail"] and server.log.count("fail") == 2
    first = server.bodies[2]
    assert first["model"] == "testbed" and first["messages"][0]["role"] == "user"
    assert "Problem: " in first["messages"][0]["content"]
    continued = [b for b in server.bodies if b["messages"][-1]["role"] == "assistant"]
    assert all(b["continue_final_message"] and b["messages"][-1]["content"].endswith("\n\n") for b in continued)
    if HAVE_SHIPPED:
        assert continued and _records(tmp_path / "o")


def test_openai_timeouts_are_retried(tmp_path, tiny_base):
    with _ModelServer(tiny_base, slow_first=2, sleep=3.0) as server:  # tiny model: answers in milliseconds
        summary = run_synth(_openai_cfg(tmp_path / "o", server, n=2, timeout=1.0))
    assert summary["failed"] == 0 and summary["processed"] == 2
    assert server.log[:2] == ["slow", "slow"]
    assert len(server.log) >= 2 + 4  # the two timed-out requests were sent again


@pytest.mark.parametrize("garbage", [False, True], ids=["http-500", "garbage-200"])
def test_openai_persistent_failure_is_reported_and_run_continues(tmp_path, tiny_base, garbage):
    victim = make_problems("train", 3, seed=3)[1]
    with _ModelServer(_base(tiny_base), fail_marker=victim.question, garbage=garbage) as server:
        summary = run_synth(_openai_cfg(tmp_path / "o", server, max_retries=1))
    assert summary["failed"] == 1 and summary["failed_ids"] == [victim.id] and summary["processed"] == 2
    errors = [json.loads(x) for x in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    reason = "malformed chat-completions answer" if garbage else "HTTP 500"
    assert errors[0]["id"] == victim.id and reason in errors[0]["error"] and "2 attempts" in errors[0]["error"]
    assert server.log.count("fail") == 2 * 2  # two samples, each tried twice
    assert victim.id not in {d["id"] for d in _done(tmp_path / "o")}
    with _ModelServer(_base(tiny_base)) as server:  # the failed problem is retried on the next run
        summary = run_synth(_openai_cfg(tmp_path / "o", server, max_retries=1))
    assert summary["failed"] == 0 and summary["processed"] == 3
    assert len(server.bodies) >= 2 and all(victim.question in json.dumps(b["messages"]) for b in server.bodies)


# --------------------------------------------------------------------------- configuration errors


def test_bad_configuration_fails_before_any_work(tmp_path, tiny_base, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "never"
    unreachable = AgentConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env="",
                              timeout=2.0)
    with pytest.raises(SatoriError, match="unreachable"):
        run_synth(_cfg(out, tiny_base, generator=unreachable))
    monkeypatch.delenv("SATORI_TEST_MISSING_KEY", raising=False)
    keyless = AgentConfig(backend="openai", base_url="http://127.0.0.1:1/v1", model="m",
                          api_key_env="SATORI_TEST_MISSING_KEY")
    with pytest.raises(SatoriError, match="SATORI_TEST_MISSING_KEY"):
        run_synth(_cfg(out, tiny_base, critic=keyless))
    with pytest.raises(SatoriError, match="model path does not exist"):
        run_synth(_cfg(out, tmp_path / "no-such-model"))
    with pytest.raises(SatoriError, match="selector: model path does not exist"):
        run_synth(_cfg(out, tiny_base, selector=AgentConfig(backend="orm", path=str(tmp_path / "nope"))))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    with pytest.raises(SatoriError, match="rule needs testbed problems"):
        run_synth(_cfg(out, tiny_base, data=DataConfig(path=str(plain))))
    with pytest.raises(SatoriError, match="max_rounds"):
        run_synth(_cfg(out, tiny_base, max_rounds=3))
    with pytest.raises(SatoriError, match="generator.backend"):
        run_synth(_cfg(out, tiny_base, generator=AgentConfig(backend="rule")))
    assert not out.exists()  # nothing was started


def test_balance_corrections_caps_the_share_of_corrections_deterministically():
    from satori.synth.trajectory import balance_corrections

    rows = ([{"id": f"a{i}", "type": "I"} for i in range(3)] + [{"id": f"b{i}", "type": "II-I"} for i in range(2)]
            + [{"id": f"c{i}", "type": "III-I" if i % 2 else "III-II"} for i in range(20)])
    half = balance_corrections(rows, 0.5, key="0")
    fixes = [r for r in half if r["type"].startswith("III")]
    assert len(fixes) == 5 and len(half) == 10  # 5 others -> at most 5 corrections
    assert [r for r in half if not r["type"].startswith("III")] == rows[:5]
    assert half == balance_corrections(rows, 0.5, key="0")
    assert half != balance_corrections(rows, 0.5, key="1")
    assert [rows.index(r) for r in half] == sorted(rows.index(r) for r in half)  # order kept
    assert len([r for r in balance_corrections(rows, 0.75, key="0") if r["type"].startswith("III")]) == 15
    assert balance_corrections(rows, 1.0) == rows


def test_mistakes_as_context_moves_only_the_steps_before_the_first_reflection():
    from satori.synth.trajectory import mistakes_as_context

    fix = {"id": "a", "type": "III-I", "response": "Step 1: 2 + 2 = 5<|reflect|>Wrong.<|explore|>Step 1: 2 + 2 = 4"}
    out = mistakes_as_context(fix)
    assert out["context"] == "Step 1: 2 + 2 = 5"
    assert out["response"] == "<|reflect|>Wrong.<|explore|>Step 1: 2 + 2 = 4"
    assert out["context"] + out["response"] == fix["response"] and "context" not in fix
    verify = {"id": "b", "type": "II-I", "response": "Step 1: 2 + 2 = 4<|reflect|>Check: 4 - 2 = 2."}
    assert mistakes_as_context(verify) == verify


def test_sft_trains_on_response_but_not_on_context(tiny_coat, tmp_path):
    from satori.rollout import load_tokenizer
    from satori.train.sft import SFTConfig, tokenize_examples

    tok = load_tokenizer(tiny_coat)
    cfg = SFTConfig()
    rec = {"prompt": "Q: 2 + 2?\n", "context": "Step 1: 2 + 2 = 5", "response": "<|reflect|>No: 4."}
    (ex,) = tokenize_examples([rec], tok, cfg, "mem")
    plain = tok("Q: 2 + 2?\n", add_special_tokens=False)["input_ids"]
    ctx = tok("Step 1: 2 + 2 = 5", add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids == plain + ctx
    assert ex.response_ids == tok("<|reflect|>No: 4.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(SatoriError, match="mem:1: field 'context'"):
        tokenize_examples([{**rec, "context": 3}], tok, cfg, "mem")

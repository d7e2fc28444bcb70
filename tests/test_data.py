"""Problem loaders: GSM8K, MATH, plain, ARC JSONL; dataset folders; clear errors."""

import json

import pytest

from satori.data import DataConfig, Problem, build_prompt, load_problems, problems_from_dataset, SATORI_PROMPT
from satori.errors import SatoriError


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_math_plain_and_arc(tmp_path):
    g = load_problems(DataConfig(path=str(write(tmp_path / "g.jsonl", [
        {"question": "How many?", "answer": "3 + 4 = 7\n#### 1,007"}]))))
    assert (g[0].question, g[0].answer, g[0].solution) == ("How many?", "1007", "3 + 4 = 7")
    m = load_problems(DataConfig(path=str(write(tmp_path / "m.jsonl", [
        {"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3"}]))))
    assert m[0].answer == "\\frac{1}{2}" and m[0].meta["level"] == "Level 3"
    p = load_problems(DataConfig(path=str(write(tmp_path / "p.jsonl", [{"q": "Two?", "a": 2}])),
                                 question_field="q", answer_field="a"))
    assert (p[0].question, p[0].answer) == ("Two?", "2")
    a = load_problems(DataConfig(path=str(write(tmp_path / "a.jsonl", [
        {"question": "Sky?", "choices": {"label": ["A", "B"], "text": ["blue", "green"]}, "answerKey": "A"}]))))
    assert a[0].answer == "A" and a[0].meta["choices"] == [["A", "blue"], ["B", "green"]]
    assert "A. blue" in build_prompt(a[0])


def test_dataset_objects_and_folders(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "One?", "answer": "x\n#### 1"}, {"question": "Two?", "answer": "#### 2"}])
    assert [p.answer for p in problems_from_dataset(ds)] == ["1", "2"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_problems(DataConfig(path=str(tmp_path / "saved")))) == 2
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "train.jsonl", [{"question": "Q?", "answer": "#### 5"}])
    assert load_problems(DataConfig(path=str(folder)))[0].answer == "5"


def test_testbed_source_and_limit():
    ps = load_problems(DataConfig(path="testbed:test", n=10, limit=4))
    assert len(ps) == 4 and all(p.meta["source"] == "testbed" for p in ps)


@pytest.mark.parametrize("rows,match", [
    (['{"question": "a", "answer": "#### 1"}', '{"question": '], r"x\.jsonl:2: malformed JSON"),
    ([{"question": "a", "answer": "#### 1"}, {"question": "b"}], r"x\.jsonl:2: missing field 'answer'"),
    ([{"question": "", "answer": "1"}], r"x\.jsonl:1: field 'question' is empty"),
    ([{"question": ["a"], "answer": "1"}], r"x\.jsonl:1: field 'question' must be text"),
    (["[1, 2]"], r"x\.jsonl:1: expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, rows, match):
    with pytest.raises(SatoriError, match=match):
        load_problems(DataConfig(path=str(write(tmp_path / "x.jsonl", rows))))


def test_skip_mode_counts_instead_of_failing(tmp_path):
    path = write(tmp_path / "x.jsonl", [{"question": "a", "answer": "1"}, {"question": "b"}, {"question": "c", "answer": "3"}])
    ps = load_problems(DataConfig(path=str(path), on_error="skip"))
    assert [p.answer for p in ps] == ["1", "3"]


def test_missing_paths_and_invalid_utf8(tmp_path):
    with pytest.raises(SatoriError, match="data path not found"):
        load_problems(DataConfig(path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"question": "a", "answer": "1"}\n\xff\xfe\n')
    with pytest.raises(SatoriError, match=r"b\.jsonl:2: not valid UTF-8"):
        load_problems(DataConfig(path=str(bad)))


def test_prompt_plain_and_chat_template(tiny_base):
    from transformers import AutoTokenizer

    prob = Problem(id="1", question="What is 2+2?", answer="4")
    plain = build_prompt(prob)
    assert plain.startswith(SATORI_PROMPT.format(question="What is 2+2?"))
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    chat = build_prompt(prob, tok)
    assert chat.startswith("<user>Solve the following") and chat.endswith("<assistant>")

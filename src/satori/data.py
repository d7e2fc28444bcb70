"""Problems and prompts.

A :class:`Problem` is what every stage consumes: an id, a question, the gold final answer,
optionally a reference solution, and free-form metadata (difficulty level, source, ...).
Loaders turn GSM8K-style, MATH-style and plain question/answer JSONL files, Hugging Face
``datasets`` objects and local dataset folders into problems; the prompt functions turn a
question into the text a model sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The Satori maths prompt (METHOD.md §1), used for training and evaluation.
SATORI_PROMPT = (
    "Solve the following math problem efficiently and clearly.\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}.\n"
    "Problem: {question}"
)

#: Appended to the plain-text prompt (no chat template) so the response starts on its own line.
PLAIN_RESPONSE_PREFIX = "\nSolution:\n"


@dataclass
class Problem:
    """One reasoning problem.

    ``answer`` is the gold final answer as a string (``"42"``, ``"\\frac{1}{2}"``);
    ``solution`` an optional reference solution; ``meta`` holds JSON-serialisable extras
    such as ``level`` (difficulty), ``source`` and ``split``.
    """

    id: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Problem":
        return cls(
            id=str(d["id"]),
            question=d["question"],
            answer=str(d["answer"]),
            solution=d.get("solution"),
            meta=dict(d.get("meta") or {}),
        )


def plain_prompt(question: str, template: str = SATORI_PROMPT) -> str:
    """The prompt as plain text, for models without a chat template (e.g. the testbed)."""
    return template.format(question=question) + PLAIN_RESPONSE_PREFIX


# --------------------------------------------------------------------------- loading

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from satori.config import check  # noqa: E402
from satori.errors import SatoriError  # noqa: E402

FORMATS = ("auto", "gsm8k", "math", "plain", "arc")
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


@dataclass
class DataConfig:
    """Where problems come from.

    ``path`` is a JSONL file, a local dataset folder (``datasets.save_to_disk`` output, or a
    folder of JSONL/Parquet/CSV files), or ``testbed:SPLIT`` (``train``, ``valid``, ``test``,
    ``ood``) for the embedded procedural tasks.
    """

    path: str = "testbed:test"
    format: str = field(default="auto", metadata={"help": "auto, gsm8k, math, plain or arc"})
    question_field: str = "question"
    answer_field: str = "answer"
    solution_field: str = ""
    id_field: str = ""
    split: str = field(default="train", metadata={"help": "split of a dataset folder"})
    limit: int = field(default=0, metadata={"help": "use the first N problems (0 = all)"})
    n: int = field(default=500, metadata={"help": "number of testbed problems"})
    seed: int = field(default=0, metadata={"help": "seed of the testbed problems"})
    on_error: str = field(default="raise", metadata={"help": "raise or skip malformed records"})

    def validate(self) -> None:
        check(self.format in FORMATS, f"data.format must be one of {list(FORMATS)}, got {self.format!r}")
        check(self.limit >= 0, f"data.limit must be >= 0, got {self.limit}")
        check(self.n > 0, f"data.n must be > 0, got {self.n}")
        check(self.on_error in ("raise", "skip"), f"data.on_error must be raise or skip, got {self.on_error!r}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; errors name the file and line."""
    return [rec for _, rec in read_jsonl_lines(path)]


def read_jsonl_lines(path: str | Path, errors: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; errors name the
    file and line (missing file, invalid UTF-8, malformed JSON, a value that is not an object).

    With an ``errors`` list, a bad line is skipped and its message appended there instead.
    """
    p = Path(path)
    if not p.is_file():
        raise SatoriError(f"data file not found: {p}")
    records = []

    def bad(message: str) -> None:
        if errors is None:
            raise SatoriError(message)
        errors.append(message)

    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(f"{p}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                detail = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                bad(f"{p}:{lineno}: malformed JSON ({detail})")
                continue
            if not isinstance(rec, dict):
                bad(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                continue
            records.append((lineno, rec))
    return records


def detect_format(record: dict[str, Any]) -> str:
    """Guess the record format from its keys."""
    if "problem" in record and ("solution" in record or "answer" in record):
        return "math"
    if "choices" in record and ("answerKey" in record or "answer_key" in record):
        return "arc"
    if isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return "gsm8k"
    return "plain"


def _field(rec: dict[str, Any], name: str, where: str) -> Any:
    if name not in rec:
        raise SatoriError(f"{where}: missing field '{name}' (fields present: {', '.join(sorted(rec)) or 'none'})")
    value = rec[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SatoriError(f"{where}: field '{name}' is empty")
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise SatoriError(f"{where}: field '{name}' must be text or a number, got {type(value).__name__}")
    return value


def boxed_answer(solution: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in a MATH-style solution (nested braces kept)."""
    start = solution.rfind("\\boxed")
    while start != -1:
        i = solution.find("{", start)
        if i != -1 and solution[start + len("\\boxed"):i].strip() == "":
            depth = 0
            for j in range(i, len(solution)):
                if solution[j] == "{":
                    depth += 1
                elif solution[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return solution[i + 1:j]
        start = solution.rfind("\\boxed", 0, start)
    return None


def record_to_problem(rec: dict[str, Any], fmt: str, cfg: DataConfig, where: str, index: int) -> Problem:
    """Convert one raw record (already known to be a dict) into a :class:`Problem`."""
    if fmt == "auto":
        fmt = detect_format(rec)
    meta: dict[str, Any] = {"source": where.rsplit(":", 1)[0]}
    solution = None
    if fmt == "gsm8k":
        question = str(_field(rec, cfg.question_field, where))
        full = str(_field(rec, "answer", where))
        m = _GSM8K_ANSWER.search(full)
        if not m:
            raise SatoriError(f"{where}: GSM8K answer has no '#### N' final line")
        answer = m.group(1).strip().replace(",", "")
        solution = full[: m.start()].strip()
    elif fmt == "math":
        question = str(_field(rec, "problem", where))
        if "answer" in rec and rec["answer"] not in (None, ""):
            answer = str(_field(rec, "answer", where))
            solution = rec.get("solution")
        else:
            solution = str(_field(rec, "solution", where))
            answer = boxed_answer(solution)
            if answer is None:
                raise SatoriError(f"{where}: MATH solution has no \\boxed{{}} answer and there is no 'answer' field")
        for key in ("level", "type", "subject"):
            if key in rec:
                meta[key] = rec[key]
    elif fmt == "arc":
        question, answer, choices = _arc_fields(rec, where)
        meta["choices"] = choices
    else:
        question = str(_field(rec, cfg.question_field, where))
        answer = str(_field(rec, cfg.answer_field, where)).strip()
        if cfg.solution_field:
            solution = rec.get(cfg.solution_field)
        if "level" in rec:
            meta["level"] = rec["level"]
    if not answer.strip():
        # the field had text, but what it gives as the final answer is blank: "#### " or "\\boxed{ }"
        raise SatoriError(f"{where}: the final answer is empty ({fmt} format)")
    pid = str(rec[cfg.id_field]) if cfg.id_field and cfg.id_field in rec else str(rec.get("id", index))
    return Problem(id=pid, question=question.strip(), answer=answer.strip(), solution=solution, meta=meta)


def _arc_fields(rec: dict[str, Any], where: str) -> tuple[str, str, list[list[str]]]:
    """ARC-style multiple choice: question text, answer label, [[label, text], ...]."""
    q = rec.get("question")
    if isinstance(q, dict):  # the original ARC layout nests the stem and the choices
        stem, choices_raw = q.get("stem"), q.get("choices")
    else:
        stem, choices_raw = q, rec.get("choices")
    if not isinstance(stem, str) or not stem.strip():
        raise SatoriError(f"{where}: missing or empty field 'question'")
    if isinstance(choices_raw, dict) and "label" in choices_raw and "text" in choices_raw:
        pairs = list(zip(choices_raw["label"], choices_raw["text"]))
    elif isinstance(choices_raw, list):
        pairs = [(c.get("label"), c.get("text")) for c in choices_raw if isinstance(c, dict)]
    else:
        raise SatoriError(f"{where}: field 'choices' must be a list of {{label, text}} or {{label: [...], text: [...]}}")
    if len(pairs) < 2 or any(not lab or text is None for lab, text in pairs):
        raise SatoriError(f"{where}: field 'choices' needs at least two labelled choices")
    key = rec.get("answerKey", rec.get("answer_key"))
    labels = [str(lab) for lab, _ in pairs]
    if str(key) not in labels:
        raise SatoriError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return stem, str(key), [[str(lab), str(text)] for lab, text in pairs]


def problems_from_records(records: list[dict[str, Any]], cfg: DataConfig, source: str,
                          line_numbers: list[int] | None = None, skipped_lines: list[str] | None = None) -> list[Problem]:
    """Turn raw records into problems, raising (or skipping, when ``cfg.on_error == 'skip'``)
    on malformed ones and on repeated questions (a question seen before, with or without the
    same answer: it would weigh twice, or contradict itself); duplicate ids of different
    questions get a suffix so ids stay unique. Skipped records are counted in a warning
    (with ``skipped_lines``: lines the file reader already skipped)."""
    problems: list[Problem] = []
    reasons: list[str] = list(skipped_lines or [])
    seen: dict[str, int] = {}
    questions: dict[tuple[str, str], tuple[str, str]] = {}
    fmt = cfg.format
    if fmt == "auto" and records:
        fmt = detect_format(records[0])
    for i, rec in enumerate(records):
        where = f"{source}:{line_numbers[i] if line_numbers else i + 1}"
        try:
            p = record_to_problem(rec, fmt, cfg, where, i)
            first, answer = questions.setdefault(_question_key(p), (where, p.answer))
            if first != where:
                same = "same" if answer == p.answer else f"there answer {answer!r}, here {p.answer!r}"
                raise SatoriError(f"{where}: duplicate question (first at {first}, {same}); "
                                  "remove it or set data.on_error: skip")
        except SatoriError as e:
            if cfg.on_error == "skip":
                reasons.append(str(e))
                continue
            raise
        if p.id in seen:
            seen[p.id] += 1
            p.id = f"{p.id}#{seen[p.id]}"
        else:
            seen[p.id] = 0
        problems.append(p)
        if cfg.limit and len(problems) >= cfg.limit:
            break
    if reasons:
        import logging

        duplicates = sum("duplicate question" in r for r in reasons)
        logging.getLogger("satori").warning(
            "%s: skipped %d record(s) (%d malformed, %d duplicate), kept %d; first: %s", source, len(reasons),
            len(reasons) - duplicates, duplicates, len(problems), reasons[0])
    return problems


_WHITESPACE = re.compile(r"\s+")


def _question_key(p: Problem) -> tuple[str, str]:
    return (_WHITESPACE.sub(" ", p.question).strip(), json.dumps(p.meta.get("choices")))


def problems_from_dataset(dataset: Any, cfg: DataConfig | None = None, source: str = "dataset") -> list[Problem]:
    """Problems from a Hugging Face ``datasets.Dataset`` (or any iterable of dicts)."""
    cfg = cfg or DataConfig(path=source)
    return problems_from_records([dict(r) for r in dataset], cfg, source)


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Load the problems a :class:`DataConfig` names."""
    path = cfg.path
    if path.startswith("testbed:"):
        from satori.testbed.tasks import make_problems

        split = path.split(":", 1)[1]
        problems = make_problems(split, cfg.n, seed=cfg.seed)
        return problems[: cfg.limit] if cfg.limit else problems
    p = Path(path)
    if not p.exists():
        raise SatoriError(f"data path not found: {p}")
    if p.is_file():
        if p.suffix not in (".jsonl", ".json", ".ndjson"):
            raise SatoriError(f"{p}: unsupported data file type '{p.suffix}' (expected .jsonl)")
        bad_lines: list[str] | None = [] if cfg.on_error == "skip" else None
        lines = read_jsonl_lines(p, errors=bad_lines)
        if not lines:
            raise SatoriError(f"{p}: no records" + (f" ({len(bad_lines)} bad line(s) skipped, first: {bad_lines[0]})"
                                                   if bad_lines else ""))
        problems = problems_from_records([rec for _, rec in lines], cfg, str(p), [n for n, _ in lines], bad_lines)
        if not problems:
            raise SatoriError(f"{p}: no usable records (all skipped as malformed or duplicate)")
        return problems
    return problems_from_dataset(_load_folder(p, cfg.split), cfg, source=str(p))


def _load_folder(p: Path, split: str) -> Any:
    import datasets

    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SatoriError(f"{p}: no split '{split}' (splits: {', '.join(ds)})")
            ds = ds[split]
        return ds
    for ext, builder in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv")):
        files = sorted(str(f) for f in p.glob(f"*{ext}"))
        if files:
            chosen = [f for f in files if Path(f).stem.startswith(split)] or files
            return datasets.load_dataset(builder, data_files=chosen, split="train")
    raise SatoriError(f"{p}: folder holds no saved dataset and no .jsonl/.json/.parquet/.csv files")


# --------------------------------------------------------------------------- prompts

ARC_PROMPT = (
    "Answer the following multiple-choice question. Think step by step, then give the label "
    "of the correct choice as \"The answer is X\".\nQuestion: {question}\n{choices}"
)


def question_text(problem: Problem) -> str:
    """The question as shown to the model (choices listed for multiple choice)."""
    choices = problem.meta.get("choices")
    if choices:
        listed = "\n".join(f"{label}. {text}" for label, text in choices)
        return ARC_PROMPT.format(question=problem.question, choices=listed)
    return problem.question


def build_prompt(problem: Problem, tokenizer: Any = None, template: str = SATORI_PROMPT,
                 use_chat_template: bool = True) -> str:
    """The full prompt text: the maths prompt (or the multiple-choice prompt) wrapped in the
    tokenizer's chat template when it has one, else as plain text."""
    body = question_text(problem) if problem.meta.get("choices") else template.format(question=problem.question)
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
    return body + PLAIN_RESPONSE_PREFIX

"""Final-answer extraction and answer equivalence.

Every reward, every evaluation and ``satori grade`` go through this module.

Extraction (:func:`extract_answer`) works on the raw response text; special tokens such as
``<|reflect|>`` are never stripped first, so a meta-action token inside a boxed answer makes
that answer wrong. Priority order:

1. the last ``\\boxed{...}`` / ``\\boxed {...}`` / ``\\fbox{...}`` (nested braces matched);
   if that last box is never closed the response was cut off while writing its final answer
   and *nothing* is extracted (returns ``None``); an empty box is ignored;
2. the last "... answer is X" (case-insensitive, so also "The final answer is X");
3. the last GSM8K-style ``#### X`` whose X starts like a number or a formula;
4. optionally, the last number in the text (sign, decimals, thousands separators).

Equivalence (:func:`answers_equal`) first tries a cheap path in the calling process:
normalised string equality (:func:`normalize_answer`), then exact rational equality when both
sides are plain numbers or simple fractions (``0.5 == 1/2 == \\frac{1}{2} == \\dfrac12``).
Numbers are compared exactly: ``0.333`` and ``0.333333`` are not ``1/3``. A percent sign is
decoration in the cheap path (``50\\%`` equals gold ``50``, the GSM8K/MATH convention); when a
``%`` is present and the numbers differ, math-verify decides, and it reads ``50%`` as ``1/2``.
So ``50%`` equals both ``50`` and ``1/2``. Everything the cheap path cannot decide goes to
math-verify (``parse``/``verify``) in a separate worker process with a hard time limit: a
comparison that overruns returns False and its worker is killed and replaced. Workers are
plain ``subprocess`` children (they work from the main thread, from other threads and from
daemonic worker processes), start once per process and are reused; each also arms a kernel
``SIGALRM`` backstop so it cannot outlive an overrun even if its parent died. The time limit
relies on ``select`` on pipes, so it is POSIX-only.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

from satori.errors import SatoriError

# --------------------------------------------------------------------------- extraction

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)
_ANSWER_IS = re.compile(r"answer\s{1,10}is(?![\w'’])[ \t]{0,10}:?", re.I)
_HASHES = re.compile(r"####[ \t]{0,10}([-+$\\(.\d][^\n]*)")
_LAST_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")
_SENTENCE_END = re.compile(r"\.(?!\d)")
_TRUNCATED = object()  # marker: the last box was opened but never closed


def _matching_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (escaped braces skipped), or -1."""
    if text.find("}", open_idx) < 0:  # common truncated case, decided at C speed
        return -1
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_idx):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _last_boxed(text: str) -> str | None | object:
    """Content of the last box, ``None`` when there is none, ``_TRUNCATED`` when unclosed.

    One pass over the box commands (linear time: a text of many ``\\boxedx`` non-boxes
    must not make this quadratic)."""
    commands = [(m.start(), m.end()) for m in _BOX_COMMAND.finditer(text)] if "\\" in text else []
    for start, after in reversed(commands):
        nxt = after
        while nxt < len(text) and text[nxt] in " \t":
            nxt += 1
        if nxt < len(text) and text[nxt] == "{":
            close = _matching_brace(text, nxt)
            if close < 0:
                return _TRUNCATED
            content = text[nxt + 1 : close].strip()
            return content or None
        if nxt >= len(text):
            return _TRUNCATED
        if after < len(text) and text[after].isalpha():  # e.g. \boxedtext: not a box
            continue
        # "\boxed 5": a single unbraced token
        m = re.match(r"[^\s$]+", text[nxt : nxt + 200])
        return m.group() if m else None
    return None


def _clean_inline_answer(x: str) -> str | None:
    """Trim the text after "answer is" down to the answer itself."""
    x = x.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if x.startswith(left):
            inner = x[len(left) :]
            close = inner.find(right)
            x = inner[:close] if close >= 0 else inner
            break
    else:
        m = _SENTENCE_END.search(x)
        if m:
            x = x[: m.start()]
    x = x.strip().rstrip(".,;:!").strip().strip("*").strip()
    return x or None


def _answer_is(text: str) -> str | None:
    """The X of the last "... answer is X" (up to the end of its line or sentence)."""
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return None
    line_end = text.find("\n", last.end())
    return _clean_inline_answer(text[last.end() : line_end if line_end >= 0 else len(text)])


def _hashes(text: str) -> str | None:
    """The X of the last GSM8K-style ``#### X``."""
    last = None
    for last in _HASHES.finditer(text):
        pass
    return _clean_inline_answer(last.group(1)) if last else None


def _last_number(text: str) -> str | None:
    """The last number in the text, as written (sign, decimals, thousands separators kept)."""
    last = None
    for last in _LAST_NUMBER.finditer(text):
        pass
    return last.group() if last else None


def extract_answer(text: str, *, last_number_fallback: bool = True) -> str | None:
    """The final answer of a response, or None (see the module docstring for the order)."""
    boxed = _last_boxed(text)
    if boxed is _TRUNCATED:
        return None
    if boxed is not None:
        return boxed
    for tier in (_answer_is, _hashes):
        found = tier(text)
        if found:
            return found
    return _last_number(text) if last_number_fallback else None


# --------------------------------------------------------------------------- normalisation

_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_THIN_SPACES = re.compile(r"\\[!,;:]|\\ ")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_TEXT_CMD = r"\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{[^{}]*\}"
_POWER = r"(?:\^\s*\{?\d\}?)?"
_NUMBER_WITH_UNIT = re.compile(
    rf"(-?[\d.,]*\d|\\frac\{{\d+\}}\{{\d+\}})\s*(?:(?:{_TEXT_CMD}\s*)+{_POWER}|\s[a-zA-Z]{{2,}}(?:\s+[a-zA-Z]+)*{_POWER})"
)
_TEXT_BODY = re.compile(r"\\(?:text|textrm|textnormal|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
_SINGLE_VAR_EQ = re.compile(r"[a-zA-Z]\s*=\s*([^=]+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_WHITESPACE = re.compile(r"\s+")


def normalize_answer(s: str) -> str:
    """A cheap canonical form of an answer string (no sympy; linear time)."""
    s = s.strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _LEFT_RIGHT.sub("", s)
    s = _THIN_SPACES.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = s.replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    unit = _NUMBER_WITH_UNIT.fullmatch(s)
    if unit:
        s = unit.group(1)
    s = _TEXT_BODY.sub(r"\1", s)
    eq = _SINGLE_VAR_EQ.fullmatch(s)
    if eq:
        s = eq.group(1)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = _WHITESPACE.sub("", s).rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


# --------------------------------------------------------------------------- equivalence

_DEC = r"-?(?:\d+(?:\.\d+)?|\.\d+)"
_PLAIN_NUMBER = re.compile(_DEC)
_SLASH_FRACTION = re.compile(rf"({_DEC})/({_DEC})")
_LATEX_FRACTION = re.compile(rf"(-?)\\frac\{{({_DEC})\}}\{{({_DEC})\}}")
_META_TOKEN = re.compile(r"<\|[A-Za-z_]+\|>")
_MAX_NUMBER_CHARS = 1000
_MAX_SLOW_CHARS = 5000
_MAX_TIMEOUT = 86400.0


def _as_number(s: str) -> Fraction | None:
    """The exact value of a normalised plain number or simple fraction, else None."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    try:
        if _PLAIN_NUMBER.fullmatch(s):
            return Fraction(s)
        m = _SLASH_FRACTION.fullmatch(s)
        if m and Fraction(m.group(2)) != 0:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        m = _LATEX_FRACTION.fullmatch(s)
        if m and Fraction(m.group(3)) != 0:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) else value
    except ValueError:
        return None
    return None


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """True/False when the cheap checks decide, None when math-verify has to."""
    if set(_META_TOKEN.findall(pred)) - set(_META_TOKEN.findall(gold)):
        return False
    norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
    if not norm_pred:
        return False
    if norm_pred == norm_gold:
        return True
    num_pred, num_gold = _as_number(norm_pred), _as_number(norm_gold)
    if num_pred is not None and num_gold is not None:
        if num_pred == num_gold:
            return True
        return None if ("%" in pred or "%" in gold) else False
    # a rational number never equals an expression without a single digit
    if num_gold is not None and not any(c.isdigit() for c in norm_pred):
        return False
    if num_pred is not None and not any(c.isdigit() for c in norm_gold):
        return False
    return None


def answers_equal(pred: str | None, gold: str, *, timeout: float = 5.0) -> bool:
    """Whether an extracted answer equals the gold answer.

    None or blank ``pred`` (or blank ``gold``) is False. The cheap path decides most cases
    in-process; the rest go to math-verify in a worker process bounded by ``timeout``
    seconds (an overrun is False). Answers longer than 5,000 characters that the cheap
    path cannot decide are False.
    """
    _check_timeout(timeout)
    if pred is None or not pred.strip() or not gold.strip():
        return False
    verdict = _fast_verdict(pred, gold)
    if verdict is not None:
        return verdict
    return _slow_equal(pred, gold, timeout)


def _check_timeout(timeout: float) -> None:
    """Reject time limits the worker protocol cannot honour."""
    if not 0 < timeout <= _MAX_TIMEOUT:
        raise SatoriError(f"grading: timeout must be in (0, {_MAX_TIMEOUT:g}] seconds, got {timeout}")


def _slow_equal(pred: str, gold: str, timeout: float) -> bool:
    """math-verify in a pooled worker process, bounded by ``timeout`` seconds."""
    if len(pred) > _MAX_SLOW_CHARS or len(gold) > _MAX_SLOW_CHARS:
        return False
    worker = _acquire_worker()
    verdict = worker.compare(pred, gold, timeout)
    if verdict is None:  # overrun or crash: never reuse this worker
        worker.kill()
        return False
    _release_worker(worker)
    return verdict


# --------------------------------------------------------------------------- math-verify workers

_STARTUP_TIMEOUT = 120.0
_SRC_DIR = str(Path(__file__).resolve().parent.parent)
_WORKER_BOOT = (
    f"import sys; sys.path.insert(0, {_SRC_DIR!r}); "
    "from satori.grading import _worker_main; _worker_main()"
)


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict (to be run inside a worker process only: it has no time bound)."""
    from math_verify import parse, verify

    parsed_gold = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    parsed_pred = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None))


def _worker_main() -> None:
    """Entry point of a worker process: JSON ``[pred, gold, timeout]`` lines in, ``1``/``0`` out.

    The protocol uses a private copy of stdout; anything printed by libraries goes to stderr.
    Before each comparison the worker arms ``SIGALRM`` with its default action, so the kernel
    ends it if it overruns even when the parent is gone.
    """
    import logging
    import signal

    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        import math_verify  # noqa: F401
    except ImportError as exc:
        out.write(json.dumps(f"error: math-verify is not importable ({exc})") + "\n")
        out.flush()
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        pred, gold, limit = json.loads(line)
        signal.alarm(max(1, math.ceil(limit)) + 2)
        try:
            ok = _math_verify_equal(pred, gold)
        except Exception:  # math-verify can raise on odd input: that is "not equal"
            ok = False
        signal.alarm(0)
        out.write("1\n" if ok else "0\n")
        out.flush()


class _Worker:
    """One math-verify worker process and the pipe protocol to it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._buf = b""
        line = self._read_line(time.monotonic() + _STARTUP_TIMEOUT)
        if line != "ready":
            self.kill()
            detail = json.loads(line) if line and line.startswith('"') else "it did not start"
            raise SatoriError(f"grading: math-verify worker failed: {detail}")

    def _read_line(self, deadline: float) -> str | None:
        """One line from the worker, or None on timeout or end of stream."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8")

    def compare(self, pred: str, gold: str, timeout: float) -> bool | None:
        """The worker's verdict, or None when it overran ``timeout`` or died."""
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write((json.dumps([pred, gold, timeout]) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(deadline)
        return None if line is None else line == "1"

    def kill(self) -> None:
        """End the process now and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


_POOL_LOCK = threading.Lock()
_IDLE: list[_Worker] = []
_POOL_PID = os.getpid()


def _acquire_worker() -> _Worker:
    """An idle worker of this process, or a new one."""
    global _POOL_PID
    with _POOL_LOCK:
        if _POOL_PID != os.getpid():  # forked: the inherited workers belong to the parent
            _IDLE.clear()
            _POOL_PID = os.getpid()
        while _IDLE:
            worker = _IDLE.pop()
            if worker.proc.poll() is None:
                return worker
            worker.kill()  # died while idle (e.g. OOM killer): reap and skip it
    return _Worker()


def _release_worker(worker: _Worker) -> None:
    """Put a healthy worker back; beyond one per CPU core, end it instead."""
    with _POOL_LOCK:
        if _POOL_PID == os.getpid() and len(_IDLE) < (os.cpu_count() or 1):
            _IDLE.append(worker)
            return
    worker.kill()


@atexit.register
def _shutdown_workers() -> None:
    """End the idle workers of this process."""
    with _POOL_LOCK:
        workers = list(_IDLE) if _POOL_PID == os.getpid() else []
        _IDLE.clear()
    for worker in workers:
        worker.kill()


# --------------------------------------------------------------------------- grading


def is_blank_response(response: str) -> bool:
    """True when a response holds nothing but whitespace and special tokens such as
    ``<|reflect|>`` (such a response never earns the correctness reward)."""
    return not _META_TOKEN.sub("", response).strip()


def grade(
    response: str,
    gold: str,
    *,
    truncated: bool = False,
    last_number_fallback: bool = True,
    timeout: float = 5.0,
) -> tuple[str | None, bool]:
    """(extracted answer, correct) for one response.

    A blank response (or one of special tokens only) is never correct, nor is a truncated one (generation hit the length
    limit without EOS); the extraction is still returned for inspection.
    """
    if is_blank_response(response):
        return None, False
    extracted = extract_answer(response, last_number_fallback=last_number_fallback)
    if truncated:
        return extracted, False
    return extracted, answers_equal(extracted, gold, timeout=timeout)


_PER_WORKER = 32  # undecided comparisons per worker process before another one is used


def grade_batch(
    responses: list[str],
    golds: list[str],
    *,
    truncated: list[bool] | None = None,
    workers: int = 0,
    timeout: float = 5.0,
    last_number_fallback: bool = True,
) -> list[tuple[str | None, bool]]:
    """:func:`grade` over a batch, order preserved.

    Extraction and the cheap equality path run in this process (microseconds each); only
    the comparisons they cannot decide go to math-verify worker processes, one per
    32 such comparisons up to ``workers`` (0 = ``os.cpu_count()``). A batch the cheap path
    decides entirely starts no process; workers, once started, are reused across calls.
    """
    if len(responses) != len(golds):
        raise SatoriError(f"grade_batch: {len(responses)} responses but {len(golds)} gold answers")
    if truncated is not None and len(truncated) != len(responses):
        raise SatoriError(f"grade_batch: {len(truncated)} truncated flags for {len(responses)} responses")
    _check_timeout(timeout)
    flags = truncated if truncated is not None else [False] * len(responses)
    results: list[tuple[str | None, bool]] = []
    pending: list[int] = []
    for i, (response, gold, cut) in enumerate(zip(responses, golds, flags)):
        if is_blank_response(response):
            results.append((None, False))
            continue
        extracted = extract_answer(response, last_number_fallback=last_number_fallback)
        if cut or extracted is None or not extracted.strip() or not gold.strip():
            results.append((extracted, False))
            continue
        verdict = _fast_verdict(extracted, gold)
        results.append((extracted, bool(verdict)))
        if verdict is None:
            pending.append(i)
    if pending:
        limit = workers if workers > 0 else (os.cpu_count() or 1)
        n_threads = max(1, min(limit, math.ceil(len(pending) / _PER_WORKER)))

        def slow(i: int) -> bool:
            return _slow_equal(results[i][0], golds[i], timeout)

        if n_threads == 1:
            verdicts = [slow(i) for i in pending]
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                verdicts = list(pool.map(slow, pending))
        for i, ok in zip(pending, verdicts):
            results[i] = (results[i][0], ok)
    return results


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL file with their line numbers; errors name file and line."""
    from satori.data import read_jsonl_lines

    try:
        records = read_jsonl_lines(path)
    except SatoriError as e:
        raise SatoriError(f"grade: {e}") from None
    if not records:
        raise SatoriError(f"grade: {path} contains no records")
    return records


def _field_text(record: dict, field: str, where: str, *, numbers_ok: bool) -> str:
    """A record's field as a string; numbers allowed for gold answers."""
    if field not in record:
        raise SatoriError(f"grade: {where}: missing field '{field}'")
    value = record[field]
    if isinstance(value, str):
        return value
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = "null" if value is None else type(value).__name__
    raise SatoriError(f"grade: {where}: field '{field}' must be a string, got {kind}")


def grade_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    response_field: str,
    answer_field: str,
    *,
    truncated_field: str | None = None,
    workers: int = 0,
    timeout: float = 5.0,
    last_number_fallback: bool = True,
) -> float:
    """Grade a JSONL file; write each record plus ``extracted`` and ``correct``; return accuracy.

    The gold answer may be a JSON number (it is ``str()``-ed). ``truncated_field``, when
    given, names an optional boolean field marking responses cut at the length limit.
    Existing ``extracted``/``correct`` fields are overwritten. The output is written to a
    temporary file in the same directory and moved into place, so it is never half-written.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    records = _read_records(in_path)
    responses, golds, cuts = [], [], []
    for lineno, record in records:
        where = f"{in_path}:{lineno}"
        responses.append(_field_text(record, response_field, where, numbers_ok=False))
        golds.append(_field_text(record, answer_field, where, numbers_ok=True))
        cut = record.get(truncated_field, False) if truncated_field else False
        if not isinstance(cut, bool):
            raise SatoriError(f"grade: {where}: field '{truncated_field}' must be true or false")
        cuts.append(cut)
    graded = grade_batch(
        responses, golds, truncated=cuts, workers=workers, timeout=timeout,
        last_number_fallback=last_number_fallback,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for (_, record), (extracted, correct) in zip(records, graded):
                record = {**record, "extracted": extracted, "correct": correct}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sum(correct for _, correct in graded) / len(graded)

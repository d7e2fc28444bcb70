"""Chain-of-Action-Thought (COAT): the meta-action tokens and the step format.

A COAT response is a sequence of steps. Every step after the first begins with one of three
meta-action tokens:

- ``<|continue|>``: the next step of the current line of reasoning;
- ``<|reflect|>``: pause and verify earlier steps;
- ``<|explore|>``: the current approach has a flaw, try another one.

The first step may be written without a token (it is then a continuation), and the final
answer is written as ``\\boxed{...}`` in the last step. Plain chain-of-thought is the special
case where every step is a continuation.

This module parses and renders that format (pure string functions) and adds the tokens to a
Hugging Face tokenizer, resizing a model's embedding and output matrices to match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from satori.errors import SatoriError

CONTINUE = "<|continue|>"
REFLECT = "<|reflect|>"
EXPLORE = "<|explore|>"
META_TOKENS = (CONTINUE, REFLECT, EXPLORE)

ACTION_OF_TOKEN = {CONTINUE: "continue", REFLECT: "reflect", EXPLORE: "explore"}
TOKEN_OF_ACTION = {action: token for token, action in ACTION_OF_TOKEN.items()}

_META_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in META_TOKENS) + ")")
_COT_STEP_START = re.compile(r"\s*(?:#+\s*)?(?:\*\*)?Step\b")
_BOXED = "\\boxed{"
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.S)


@dataclass(frozen=True)
class Step:
    """One step of a COAT response: the meta-action that opens it and its text (verbatim)."""

    action: str
    text: str

    def __post_init__(self) -> None:
        if self.action not in TOKEN_OF_ACTION:
            raise SatoriError(
                f"unknown COAT action {self.action!r}; expected one of {sorted(TOKEN_OF_ACTION)}"
            )


# --------------------------------------------------------------------------- parsing


def parse_steps(response: str) -> list[Step]:
    """Split a response into COAT steps at every meta-action token.

    Tokens are recognised anywhere (also mid-line, also adjacent to each other, which gives
    a step with empty text). Each token opens a step whose text is everything up to the next
    token, verbatim. Text before the first token becomes a leading ``continue`` step if it is
    non-blank (kept verbatim); whitespace-only leading text is dropped. A response without
    tokens is a single continue step; an empty or blank response gives ``[]``. Anything that
    is not exactly one of the three meta tokens (e.g. ``<|foo|>``) is plain text.
    """
    parts = _META_SPLIT.split(response)
    steps: list[Step] = []
    if parts[0].strip():
        steps.append(Step("continue", parts[0]))
    for token, text in zip(parts[1::2], parts[2::2]):
        steps.append(Step(ACTION_OF_TOKEN[token], text))
    return steps


def render_steps(steps: list[Step]) -> str:
    """Write steps back as a COAT response; the inverse of :func:`parse_steps`.

    The first step is written without a token when it is a continuation with non-blank text;
    every other step is written as its token followed by its text. For any steps whose texts
    contain no meta token, ``parse_steps(render_steps(steps)) == steps``. A step text that
    contains a meta token would not survive the round trip, so it raises ``SatoriError``.
    """
    pieces: list[str] = []
    for i, step in enumerate(steps):
        if _META_SPLIT.search(step.text):
            raise SatoriError(
                f"step {i} text contains a meta-action token; parse it with parse_steps first"
            )
        bare_first = i == 0 and step.action == "continue" and step.text.strip()
        pieces.append(step.text if bare_first else TOKEN_OF_ACTION[step.action] + step.text)
    return "".join(pieces)


def split_cot_steps(text: str) -> list[str]:
    """Split plain chain-of-thought into steps, for building COAT demonstrations.

    A new step starts after a blank line and at every line that begins with ``Step``
    (also ``## Step 2`` or ``**Step 2:**``). Steps are returned stripped; empty ones are
    dropped. Meta tokens are not interpreted here: use :func:`parse_steps` for COAT text.
    """
    steps: list[str] = []
    current: list[str] = []

    def flush() -> None:
        chunk = "\n".join(current).strip()
        if chunk:
            steps.append(chunk)
        current.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            continue
        if _COT_STEP_START.match(line):
            flush()
        current.append(line)
    flush()
    return steps


def to_cot(steps: list[Step]) -> str:
    """Render steps as plain chain-of-thought: texts stripped and joined by blank lines,
    tokens dropped, empty steps skipped (used by the plain-CoT ablation)."""
    return "\n\n".join(s.text.strip() for s in steps if s.text.strip())


def is_plain_cot(response: str) -> bool:
    """True when the response contains none of the three meta-action tokens."""
    return _META_SPLIT.search(response) is None


# --------------------------------------------------------------------------- answers


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` whose braces balance, else None.

    Escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX and do not count. One
    pass over the braces with a stack (linear time, also for thousands of unclosed boxes).
    """
    if _BOXED not in text:
        return None
    opened: list[int] = []  # for each open brace: where its content begins if it opens a box, else -1
    best = (-1, -1)
    for m in _BRACE_OR_ESCAPE.finditer(text):
        tok, i = m.group(), m.start()
        if tok == "{":
            opened.append(i + 1 if i + 1 >= len(_BOXED) and text.startswith(_BOXED, i + 1 - len(_BOXED)) else -1)
        elif tok == "}" and opened:
            begin = opened.pop()
            if begin > best[0]:
                best = (begin, i)
    return text[best[0]:best[1]] if best[0] >= 0 else None


def final_answer_step(steps: list[Step]) -> Step | None:
    """The last step holding a balanced ``\\boxed{...}`` answer, or None if no step has one."""
    for step in reversed(steps):
        if _last_boxed(step.text) is not None:
            return step
    return None


def answer_before_first_reflect(response: str) -> str:
    """The response up to (not including) its first ``<|reflect|>``; all of it if none.

    Grading this prefix and the whole response gives the F→T / T→F reflection metrics.
    """
    cut = response.find(REFLECT)
    return response if cut == -1 else response[:cut]


# --------------------------------------------------------------------------- metrics


def behaviour(response: str) -> dict:
    """Count the steps of a response by action.

    Returns ``{"n_steps", "n_continue", "n_reflect", "n_explore", "reflects", "explores"}``;
    a leading step written without a token counts as a continuation.
    """
    actions = [s.action for s in parse_steps(response)]
    n_reflect = actions.count("reflect")
    n_explore = actions.count("explore")
    return {
        "n_steps": len(actions),
        "n_continue": actions.count("continue"),
        "n_reflect": n_reflect,
        "n_explore": n_explore,
        "reflects": n_reflect > 0,
        "explores": n_explore > 0,
    }


def is_valid_coat(response: str) -> bool:
    """Whether a response is well-formed COAT.

    Rules: at least one step; no step is blank (a meta token must be followed by some text,
    so adjacent tokens are invalid); every ``<|explore|>`` comes after some earlier
    ``<|reflect|>``; the last step contains a ``\\boxed{...}`` with balanced braces and
    non-blank content (an empty box is not an answer). Text after the box is allowed.
    Plain CoT ending in a boxed answer is valid (it is all continuations).
    """
    steps = parse_steps(response)
    if not steps or any(not s.text.strip() for s in steps):
        return False
    seen_reflect = False
    for step in steps:
        if step.action == "reflect":
            seen_reflect = True
        elif step.action == "explore" and not seen_reflect:
            return False
    answer = _last_boxed(steps[-1].text)
    return answer is not None and bool(answer.strip())


# --------------------------------------------------------------------------- tokenizer / model


def coat_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the three meta tokens, keyed by token string (``ids[REFLECT]``).

    Raises ``SatoriError`` if the tokenizer does not encode each of them as one token.
    """
    vocab = tokenizer.get_vocab()
    ids: dict[str, int] = {}
    for token in META_TOKENS:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if token not in vocab or encoded != [vocab[token]]:
            raise SatoriError(
                f"tokenizer has no single token for {token}; run format tuning or "
                "satori.coat.add_coat_tokens(tokenizer, model) first"
            )
        ids[token] = vocab[token]
    return ids


#: Text whose mean token embedding starts each new meta token under ``init="text"``: a new
#: token then begins as (roughly) the words it stands for, so format tuning teaches a use,
#: not a vocabulary. Without it a tiny model needs many more demonstrations to start
#: emitting the tokens (measured on the testbed: see the issue 3 note).
INIT_TEXT = {CONTINUE: "\n\n", REFLECT: "\n\nWait,", EXPLORE: "\n\nAlternatively,"}


def check_init_text(init_text: dict[str, str]) -> dict[str, str]:
    """``init_text`` (action -> text) when every key is an action and every text non-empty."""
    for action, text in init_text.items():
        if action not in TOKEN_OF_ACTION:
            raise SatoriError(f"coat_init_text: unknown action {action!r}; expected one of {sorted(TOKEN_OF_ACTION)}")
        if not isinstance(text, str) or not text:
            raise SatoriError(f"coat_init_text.{action}: needs a non-empty text, got {text!r}")
    return init_text


def add_coat_tokens(tokenizer, model=None, init: str = "mean", init_text: dict[str, str] | None = None) -> list[int]:
    """Add the three meta tokens to a Hugging Face tokenizer as special tokens.

    Idempotent: tokens already present are not added again. Existing extra special tokens are
    kept. Returns the ids in ``META_TOKENS`` order. The tokens are special, so
    ``decode(..., skip_special_tokens=True)`` drops them: decode with
    ``skip_special_tokens=False`` wherever the actions matter (rewards, parsing).

    If ``model`` is given, its input embeddings (and output layer, tied or not) are grown to
    at least ``len(tokenizer)`` rows; they are never shrunk, so a vocabulary padded beyond
    the tokenizer keeps its size. Every new row (rows created by the resize, and the rows of
    tokens added by this call) is set to the mean of the rows before the first new one, in
    the input embedding, the output weight and the output bias. A second call changes
    nothing. Rows of tokens that were already in the tokenizer and already inside the model's
    matrix are left as they are.

    ``init="text"`` starts the rows of the added meta tokens instead at the mean of the rows
    of the tokens of :data:`INIT_TEXT` (input embedding, output weight and bias alike);
    ``init_text`` replaces the text of some of them, keyed by action (``{"reflect": ...}``):
    the words *this* model writes where the action goes.
    """
    if init not in ("mean", "text"):
        raise SatoriError(f"COAT token init must be 'mean' or 'text', got {init!r}")
    texts = {**INIT_TEXT, **{TOKEN_OF_ACTION[a]: t for a, t in check_init_text(init_text or {}).items()}}
    vocab_before = tokenizer.get_vocab()
    text_ids = {t: tokenizer(texts[t], add_special_tokens=False)["input_ids"] for t in META_TOKENS}
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(META_TOKENS)}, replace_extra_special_tokens=False
    )
    ids = list(coat_token_ids(tokenizer).values())
    added = [i for t, i in zip(META_TOKENS, ids) if t not in vocab_before]
    if model is not None:
        _grow_and_init_rows(model, len(tokenizer), added)
        if init == "text":
            _init_rows_from(model, {i: text_ids[t] for t, i in zip(META_TOKENS, ids) if i in added})
    return ids


def _init_rows_from(model, sources: dict[int, list[int]]) -> None:
    """Set row ``i`` of the embedding, output weight and bias to the mean of rows ``sources[i]``."""
    head = model.get_output_embeddings()
    bias = head.bias if isinstance(head, torch.nn.Linear) else None
    with torch.no_grad():
        for i, src in sources.items():
            rows = torch.tensor(src, dtype=torch.long)
            for matrix in (model.get_input_embeddings().weight, None if head is None else head.weight, bias):
                if matrix is not None:
                    matrix[i] = matrix[rows].float().mean(dim=0).to(matrix.dtype)


def _grow_and_init_rows(model, n_tokens: int, added_ids: list[int]) -> None:
    """Grow ``model``'s vocabulary matrices to ``n_tokens`` rows and mean-initialise new rows."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    target = max(old_rows, n_tokens)
    new_rows = sorted(set(range(old_rows, target)) | {i for i in added_ids if i < old_rows})
    if not new_rows:
        return
    n_mean = min(old_rows, new_rows[0])
    if n_mean == 0:
        raise SatoriError("model has no existing embedding rows to initialise the COAT tokens from")

    def row_mean(weight: torch.Tensor) -> torch.Tensor:
        return weight[:n_mean].detach().float().mean(dim=0)

    in_mean = row_mean(model.get_input_embeddings().weight)
    head = model.get_output_embeddings()
    out_mean = None if head is None else row_mean(head.weight)
    bias = head.bias if isinstance(head, torch.nn.Linear) else None
    bias_mean = None if bias is None else bias[:n_mean].detach().float().mean()

    if target > old_rows:
        model.resize_token_embeddings(target, mean_resizing=False)

    rows = torch.tensor(new_rows, dtype=torch.long)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[rows] = in_mean.to(emb.dtype)
        head = model.get_output_embeddings()
        if head is not None:
            head.weight[rows] = out_mean.to(head.weight.dtype)
            if bias_mean is not None:
                head.bias[rows] = bias_mean.to(head.bias.dtype)

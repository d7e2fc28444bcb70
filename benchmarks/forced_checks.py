"""What would checking every step earn? Greedy accuracy of a COAT model made to reflect after
each of its steps, against its own greedy accuracy, on testbed problems.

Not a speed benchmark: a diagnostic for issue 4. Whenever the model ends a step with
``<|continue|>``, that token is replaced by ``<|reflect|>``; the model then writes its check (and,
after ``<|explore|>``, a correction if it finds a mistake) up to its next ``<|continue|>``, which is
kept, and goes on (``--checks K``: only after each of the first K steps). The last step (it ends
the answer) is not checked. If forced checks do not raise accuracy, a policy that learns *when*
to check cannot gain by checking either; if they do, the gap is what learning where to check can
earn.

    .venv/bin/python benchmarks/forced_checks.py MODEL [MODEL ...] --n 500 [--checks 1]

Prints a markdown table: greedy accuracy as the model answers and with the forced checks, and
the answers the checks changed (wrong to right, right to wrong). Then, per model, why they changed,
judged at the first forced check: a fixed answer was wrong there and repaired, or right there and
only later steps came out differently; a broken answer was right there and the check called it
wrong (a false alarm), or the check let it stand and a later step went wrong.

A plain model (no COAT tokens, such as the testbed base, ``satori.testbed.BASE_MODEL_DIR``) is
checked in its own words: its steps end at a blank line, and the forced check is the check cue
the base read in its checking exercises (``satori.testbed.pretrain.CHECK_CUE``), written after
the blank line; the check runs to the next blank line.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from satori.coat import CONTINUE, EXPLORE, REFLECT, coat_token_ids
from satori.data import build_prompt
from satori.rollout import decode, load_model, load_tokenizer
from satori.testbed import make_problems
from satori.testbed.checker import check_steps
from satori.testbed.pretrain import CHECK_CUE
from satori.utils import set_threads

SEGMENT_TOKENS = 96  # one step or one check (with its correction) is far shorter


@dataclass
class Checking:
    """How a model's checks are written: the tokens that end a step (or a check), what a forced
    check puts in place of a step's ending, and the text that opens / closes a check."""

    stops: list[int]
    force: Callable[[list[int]], list[int]]
    opens: str
    closes: str


def checking(tok) -> Checking:
    """COAT models: a step's ``<|continue|>`` becomes ``<|reflect|>``. Plain models: after the blank
    line that ends a step (any token whose text ends with one), the check cue."""
    if REFLECT in tok.get_vocab():
        ids = coat_token_ids(tok)
        return Checking([ids[CONTINUE]], lambda seg: seg[:-1] + [ids[REFLECT]], REFLECT, CONTINUE)
    blank = [i for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).endswith("\n\n")]
    cue = tok(CHECK_CUE[2:], add_special_tokens=False).input_ids
    return Checking(blank, lambda seg: seg + cue, CHECK_CUE, "\n\n")


@torch.no_grad()
def answer(model, tok, how: Checking, prompts: list[list[int]], checks: int, max_tokens: int) -> list[list[int]]:
    """Greedy responses (token ids) to tokenized prompts, segment by segment: a segment ends where
    a step ends (``how``, from :func:`checking`) or at the end of sequence; for the first ``checks``
    steps of each response a check is forced there, and the check runs to the next step end."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    resp: list[list[int]] = [[] for _ in prompts]
    checking_now = [False] * len(prompts)  # the segment being written is a forced check
    forced = [0] * len(prompts)
    live = list(range(len(prompts)))
    while live:
        seqs = [prompts[i] + resp[i] for i in live]
        width = max(map(len, seqs))
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, pad_token_id=pad,
                             max_new_tokens=SEGMENT_TOKENS, eos_token_id=[eos, *how.stops])
        still = []
        for row, i in enumerate(live):
            new = out[row, width:].tolist()
            stop = next((j for j, t in enumerate(new) if t == eos or t in how.stops), None)
            segment = new if stop is None else new[: stop + 1]
            if stop is not None and segment[-1] != eos and forced[i] < checks and not checking_now[i]:
                segment = how.force(segment)
                checking_now[i] = True
                forced[i] += 1
            elif stop is not None:
                checking_now[i] = False
            resp[i] += segment
            if (stop is None or segment[-1] != eos) and len(resp[i]) < max_tokens:
                still.append(i)
        live = still
    return resp


def why_changed(problem, text: str, fixed: bool, how: Checking) -> str:
    """Why forcing checks changed a greedy answer (``text``: the answer with checks), judged at its
    first forced check: was the line right there, and did the check call it wrong?"""
    before, _, rest = text.partition(how.opens)
    c = check_steps(problem, before)
    right_before = c.first_wrong_step is None or c.first_wrong_step > c.n_steps  # only steps still to come
    if fixed:
        return "fixed: wrong at the check, repaired" if not right_before else "fixed: right at the check, later steps differ"
    check = rest.split(how.closes)[0]
    # a wrong verdict, in the testbed critic's wording (satori.synth.agents.WRONG_VERDICTS), even when
    # the model then forgets the <|explore|>
    says_wrong = EXPLORE in check or re.search(r"\bis not\b", check) is not None
    if right_before and says_wrong:
        return "broken: a false alarm"
    if right_before:
        return "broken: the check let the line stand, a later step went wrong"
    return "broken: wrong at the check, not repaired"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model folders: COAT (format-tuned or RL) or plain (the testbed base)")
    ap.add_argument("--n", type=int, default=500, help="test problems")
    ap.add_argument("--max-tokens", type=int, default=512, help="response length limit")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--checks", type=int, default=None, help="checks forced per response, after its first steps "
                    "(default: after every step)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: OMP_NUM_THREADS when set, else all cores)")
    args = ap.parse_args()
    set_threads(args.threads)
    problems = make_problems("test", args.n, seed=0)
    checks = args.checks if args.checks is not None else args.max_tokens  # more than a response has steps
    what = "every step" if args.checks is None else f"each of the first {args.checks} step(s)"
    print(f"| model | greedy pass@1 | with a check after {what} | wrong → right | right → wrong |\n"
          f"|---|---|---|---|---|")
    reasons = {}
    for path in args.models:
        tok, model = load_tokenizer(path), load_model(path)
        model.eval()
        how = checking(tok)
        texts, right = {}, {}  # the answers without / with the forced checks, and whether each is right
        for force in (False, True):
            texts[force] = []
            for b in range(0, len(problems), args.batch_size):
                batch = problems[b : b + args.batch_size]
                prompts = [tok(build_prompt(p, tok), add_special_tokens=False).input_ids for p in batch]
                texts[force] += [decode(tok, ids) for ids in answer(model, tok, how, prompts, checks if force else 0,
                                                                    args.max_tokens)]
            right[force] = [check_steps(p, t).final_correct for p, t in zip(problems, texts[force])]
        fixed = sum(f and not g for g, f in zip(right[False], right[True]))
        broken = sum(g and not f for g, f in zip(right[False], right[True]))
        n = len(problems)
        print(f"| {path} | {sum(right[False]) / n:.3f} | {sum(right[True]) / n:.3f} | {fixed} | {broken} |")
        reasons[path] = Counter(why_changed(p, t, f, how) for p, t, g, f in zip(problems, texts[True], right[False], right[True])
                                if g != f)
    for path, counts in reasons.items():
        print(f"\n{path}: " + "; ".join(f"{why} {c}" for why, c in sorted(counts.items())))


if __name__ == "__main__":
    main()

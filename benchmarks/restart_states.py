"""How well does a policy finish from its Restart-and-Explore states? Accuracy of a policy sampled
from the initial states of a `satori rae` buffer, grouped by what the state is.

Not a speed benchmark: a diagnostic for issue 4. RL's rollouts start from these states, so a kind
of state the policy cannot finish from is a kind RL spends its samples on for little signal. The
groups: the status (0: the problem itself, +1: a correct trajectory cut back, -1: a wrong one),
whether the cut kept the final answer (``T = 0``) or not, and what the step before the appended
``<|reflect|>`` is: a solution step, or a reflection (two reflections in a row; buffers cut before
930606e have them).

    .venv/bin/python benchmarks/restart_states.py POLICY BUFFER.jsonl [--per 150] [--temperature 0.7]

Samples ``--per`` states of each group (seeded; all when fewer), one continuation each at
``--temperature``, and prints a markdown table: the number of states in the buffer and sampled, and
the share whose whole trajectory (prefix + continuation) ends with the right answer.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

from satori.coat import parse_steps
from satori.grading import answers_equal, extract_answer
from satori.rae import state_prompt
from satori.rollout import generate, load_model, load_tokenizer


def state_kind(state: dict) -> tuple[int, str, str]:
    """(status, "answer kept" / "answer cut" / "-", "after a step" / "after a reflection" / "-")."""
    if state["status"] == 0:
        return 0, "-", "-"
    steps = parse_steps(state["prefix"])
    before = steps[-2].action if len(steps) > 1 else "continue"
    return (state["status"], "answer kept" if state["T"] == 0 else "answer cut",
            "after a reflection" if before == "reflect" else "after a step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy")
    ap.add_argument("buffer", help="initial_states.jsonl of `satori rae`")
    ap.add_argument("--per", type=int, default=150, help="states sampled per group")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    groups: dict[tuple, list[dict]] = defaultdict(list)
    with open(args.buffer) as f:
        for line in f:
            state = json.loads(line)
            groups[state_kind(state)].append(state)
    tok, model = load_tokenizer(args.policy), load_model(args.policy)
    rng = random.Random(args.seed)
    print("| status | final answer | last step before <|reflect|> | states | sampled | finished right |")
    print("|---|---|---|---|---|---|")
    for kind in sorted(groups):
        states = groups[kind]
        picked = rng.sample(states, min(args.per, len(states)))
        prompts = [state_prompt(s, tok) + s["prefix"] for s in picked]
        out = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       seed=args.seed)
        right = sum(answers_equal(extract_answer(s["prefix"] + o.text, last_number_fallback=False), s["answer"])
                    for s, o in zip(picked, out))
        print(f"| {kind[0]:+d} | {kind[1]} | {kind[2]} | {len(states)} | {len(picked)} | "
              f"{100 * right / len(picked):.1f}% |", flush=True)


if __name__ == "__main__":
    main()

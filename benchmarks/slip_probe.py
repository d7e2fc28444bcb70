"""Could a COAT model of a finished `satori run` tell where to check? A linear probe on its own hidden state.

Not a speed benchmark: a diagnostic for issue 4. After each new step of a right line (as
:func:`satori.testbed.checker.new_step_outcomes` finds them in the model's sampled test answers), the
model chooses its next meta token: ``<|continue|>`` or ``<|reflect|>``. This reads the last layer's
state at the step's last token (the one that predicts that choice), fits a logistic probe for "this
step is wrong" on the answers to the first ``--train-share`` of the problems, and reports its AUC on
the rest. For comparison it reports the AUC of where the step starts in the answer alone (later steps
slip more), and how the model itself chose: P(reflect) after a wrong and after a right step. A probe
well above the position's AUC means the state knows more about a slip than the model's choice uses.

    .venv/bin/python benchmarks/slip_probe.py runs/full sft_coat rl_round1 --seed 0 --n 1200
"""

from __future__ import annotations

from pathlib import Path

import torch

from _common import run_models_parser, test_problems, test_samples
from satori.coat import CONTINUE, EXPLORE, REFLECT
from satori.data import build_prompt, read_jsonl
from satori.rollout import load_model, load_tokenizer
from satori.testbed.checker import new_step_outcomes
from satori.utils import set_threads


@torch.no_grad()
def step_states(path: Path, records: list[dict], samples: int) -> tuple[torch.Tensor, ...]:
    """Per new step of a right line: (state at its last token, wrong?, reflected next?, where it
    starts, which record it belongs to)."""
    tok, model = load_tokenizer(str(path)), load_model(str(path)).eval()
    meta = set(tok.convert_tokens_to_ids([CONTINUE, REFLECT, EXPLORE]))
    reflect = tok.convert_tokens_to_ids(REFLECT)
    problems = test_problems(records)
    xs, wrong, reflected, start, owner = [], [], [], [], []
    for i, record in enumerate(records):
        problem = problems[record["id"]]
        prompt = build_prompt(problem, tok)
        for sample in record.get("samples", [])[:samples]:
            outcomes = new_step_outcomes(problem, sample["text"])
            if not outcomes:
                continue
            enc = tok(prompt + sample["text"], add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            for at, _, why in outcomes:
                # the meta token that ends the step; the state before it predicts it
                j = next((k for k, (a, _) in enumerate(offsets) if a >= len(prompt) + at and ids[k] in meta), None)
                if j is None:  # the answer's last step: no choice after it
                    continue
                xs.append(hidden[j - 1].float())
                wrong.append(bool(why))
                reflected.append(ids[j] == reflect)
                start.append(float(at))
                owner.append(i)
    return (torch.stack(xs), torch.tensor(wrong), torch.tensor(reflected), torch.tensor(start), torch.tensor(owner))


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random positive outranks a random negative (ties: half)."""
    pos, neg = score[label], score[~label]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean())


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 500, l2: float = 1e-3) -> torch.nn.Linear:
    """A logistic probe, classes weighted equally, on standardised features (the standardisation is
    folded into the returned layer)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    probe = torch.nn.Linear(x.shape[1], 1)
    torch.nn.init.zeros_(probe.weight), torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.Adam(probe.parameters(), lr=0.01)
    pos_weight = (1 - y.float().mean()) / y.float().mean()
    for _ in range(steps):
        opt.zero_grad()
        logits = probe((x - mu) / sd).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=pos_weight)
        (loss + l2 * probe.weight.pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        probe.weight /= sd
        probe.bias -= (probe.weight * mu).sum()
    return probe


def main() -> None:
    ap = run_models_parser(__doc__.splitlines()[0])
    ap.add_argument("--seed", default="0")
    ap.add_argument("--n", type=int, default=1200, help="test problems read (their sampled answers)")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per problem")
    ap.add_argument("--train-share", type=float, default=0.7, help="share of the problems the probe is fitted on")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    print("| model | steps (wrong) | probe AUC, held-out problems | AUC of the step's position alone "
          "| P(reflect) after a wrong / a right step |\n|---|---|---|---|---|")
    for model in args.models:
        records = list(read_jsonl(test_samples(args.run, model, args.seed)))[: args.n]
        torch.manual_seed(0)
        x, wrong, reflected, start, owner = step_states(args.run / f"{model}-s{args.seed}", records, args.samples)
        train = owner < int(len(records) * args.train_share)
        probe = fit_probe(x[train], wrong[train])
        with torch.no_grad():
            score = probe(x[~train]).squeeze(-1)
        print(f"| {model} | {len(wrong):,} ({int(wrong.sum()):,}) | {auc(score, wrong[~train]):.3f} "
              f"| {auc(start[~train], wrong[~train]):.3f} | {reflected[wrong].float().mean():.3f} / "
              f"{reflected[~wrong].float().mean():.3f} |")


if __name__ == "__main__":
    main()

"""Sampling and scoring agree; sampling is batch-invariant; special tokens survive decoding."""

import torch

from satori.coat import REFLECT
from satori.rollout import GumbelSampler, decode, generate, load_model, load_tokenizer, pack_sequences, token_logprobs


def test_sampling_is_batch_invariant_and_seeded(tiny_coat):
    tok, model = load_tokenizer(tiny_coat), load_model(tiny_coat)
    prompts = ["Problem: Ana has 3 apples.\nSolution:\n", "Problem: Ben has 12 coins and finds 7 more.\nSolution:\n",
               "Q\n"]
    a = generate(model, tok, prompts, max_new_tokens=10, temperature=1.0, n=3, batch_size=9, seed=1)
    b = generate(model, tok, prompts, max_new_tokens=10, temperature=1.0, n=3, batch_size=2, seed=1)
    c = generate(model, tok, prompts[1:], max_new_tokens=10, temperature=1.0, n=3, batch_size=4, seed=1,
                 prompt_offset=1)
    d = generate(model, tok, prompts, max_new_tokens=10, temperature=1.0, n=3, batch_size=9, seed=2)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.response_ids for s in a[3:]] == [s.response_ids for s in c]
    assert [s.response_ids for s in a] != [s.response_ids for s in d]
    assert [(s.index, s.meta["sample"]) for s in a] == [(i, j) for i in range(3) for j in range(3)]
    assert len({tuple(s.response_ids) for s in a}) > 3  # an untrained model at T=1 is diverse


def test_gumbel_sampler_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits / 0.7, -1)[0]
    sampler = GumbelSampler(0.7, [123])
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[sampler(None, logits.clone()).argmax()] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.015)


def test_token_logprobs_score_exactly_what_generation_sees(tiny_coat):
    tok, model = load_tokenizer(tiny_coat), load_model(tiny_coat)
    prompts = ["Problem: x\nSolution:\n", "Problem: a longer prompt here\nSolution:\n"]
    samples = generate(model, tok, prompts, max_new_tokens=6, temperature=0.0)
    batch = pack_sequences([s.prompt_ids for s in samples], [s.response_ids for s in samples], tok.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])["logp"]
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # greedy tokens are the argmax at every response position
    for b, s in enumerate(samples):
        pos = batch["response_mask"][b].nonzero().flatten()
        assert full[b, pos].argmax(-1).tolist() == s.response_ids
        assert torch.all(logp[b, pos] <= 0)


def test_decode_keeps_meta_tokens(tiny_coat):
    tok = load_tokenizer(tiny_coat)
    ids = tok("Step 1: 2 + 2 = 4" + REFLECT + "check", add_special_tokens=False)["input_ids"]
    assert REFLECT in decode(tok, ids + [tok.pad_token_id])

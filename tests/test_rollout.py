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


def _kv_matches_hf(model, tok, prompts, **kw):
    for temperature, n in ((0.0, 1), (1.0, 3)):
        for batch_size in (64, 4):
            fast = generate(model, tok, prompts, temperature=temperature, n=n, batch_size=batch_size, seed=3,
                            engine="kv", **kw)
            ref = generate(model, tok, prompts, temperature=temperature, n=n, batch_size=batch_size, seed=3,
                           engine="hf", **kw)
            assert [(s.response_ids, s.truncated) for s in fast] == [(s.response_ids, s.truncated) for s in ref]
    return ref


def test_kv_decoder_gives_exactly_what_model_generate_gives():
    """The testbed base model: rows end at different steps (batch compaction) and several
    samples share one prompt pass."""
    from satori.data import build_prompt
    from satori.testbed import BASE_MODEL_DIR, make_problems

    tok, model = load_tokenizer(BASE_MODEL_DIR), load_model(BASE_MODEL_DIR)
    prompts = [build_prompt(p, tok) for p in make_problems("test", 6, seed=5)] + ["Problem: 2 + 2\n"]
    ref = _kv_matches_hf(model, tok, prompts, max_new_tokens=48)
    lengths = {len(s.response_ids) for s in ref}
    assert len(lengths) > 3 and any(not s.truncated for s in ref) and any(s.truncated for s in ref)


def tiny_qwen2(vocab_size: int):
    """A random tiny Qwen2: grouped-query attention, biased q/k/v projections, untied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=500.0, tie_word_embeddings=False))


def test_kv_decoder_on_a_qwen2_layout_with_grouped_query_attention_and_bias(tiny_coat):
    tok = load_tokenizer(tiny_coat)
    model = tiny_qwen2(len(tok)).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    prompts = ["Problem: Ana has 3 apples.\nSolution:\n", "Q\n", "Problem: Ben has 12 coins and finds 7 more.\n"]
    first = generate(model, tok, prompts, max_new_tokens=12, engine="hf")
    # make a token the model emits early an end token, so rows stop at different steps
    model.generation_config.eos_token_id = [tok.eos_token_id, first[0].response_ids[4]]
    ref = _kv_matches_hf(model, tok, prompts, max_new_tokens=12)
    assert any(not s.truncated for s in ref)


def test_kv_engine_refuses_an_unsupported_architecture(tiny_coat):
    import pytest
    from transformers import GPT2Config, GPT2LMHeadModel

    from satori.errors import SatoriError

    tok = load_tokenizer(tiny_coat)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(SatoriError, match="gpt2"):
        generate(model, tok, ["Q\n"], max_new_tokens=3, engine="kv")
    assert len(generate(model, tok, ["Q\n"], max_new_tokens=3)) == 1  # auto falls back to model.generate


def _shared_prompt_matches_token_logprobs(model, tok, prompts, n, temperature):
    from satori.rollout import shared_prompt_logprobs

    samples = generate(model, tok, prompts, max_new_tokens=9, temperature=1.0, n=n, seed=4)
    eos = tok.eos_token_id
    batch = pack_sequences([s.prompt_ids for s in samples], [s.response_ids + [eos] for s in samples],
                           tok.pad_token_id)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) * mask  # any loss over responses
    grads = []
    outs = []
    for fn in ("token", "shared"):
        model.zero_grad()
        if fn == "token":
            out = token_logprobs(model, ids, attn, temperature=temperature, return_entropy=True)
        else:
            out = shared_prompt_logprobs(model, ids, attn, [len(s.prompt_ids) for s in samples],
                                         temperature=temperature, return_entropy=True)
        ((out["logp"] + 0.1 * out["entropy"]) * weights).sum().backward()
        outs.append({k: v.detach() * mask for k, v in out.items()})
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len({len(s.prompt_ids) for s in samples}) > 1  # prompts of different lengths share a batch
    assert torch.allclose(outs[0]["logp"], outs[1]["logp"], atol=1e-5)
    assert torch.allclose(outs[0]["entropy"], outs[1]["entropy"], atol=1e-5)
    assert grads[0].abs().max() > 0
    # equal up to float32 summation order (measured: 4e-5 at a largest gradient of 26)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_shared_prompt_logprobs_equal_token_logprobs_and_their_gradients():
    """Several samples per prompt, prompts of different lengths, responses of different lengths."""
    from satori.data import build_prompt
    from satori.testbed import BASE_MODEL_DIR, make_problems

    tok, model = load_tokenizer(BASE_MODEL_DIR), load_model(BASE_MODEL_DIR)
    prompts = [build_prompt(p, tok) for p in make_problems("test", 3, seed=5)] + ["Problem: 2 + 2\n"]
    _shared_prompt_matches_token_logprobs(model, tok, prompts, n=3, temperature=0.7)


def test_shared_prompt_logprobs_on_a_qwen2_layout(tiny_coat):
    tok = load_tokenizer(tiny_coat)
    model = tiny_qwen2(len(tok))
    _shared_prompt_matches_token_logprobs(model, tok, ["Problem: Ana has 3 apples.\nSolution:\n", "Q\n"], n=2,
                                          temperature=1.0)


def test_a_sample_records_which_of_several_end_tokens_stopped_it(tiny_coat):
    # chat models list several end tokens (e.g. <|im_end|> and <|endoftext|>); a trainer must score
    # the one that was sampled, not the tokenizer's eos_token
    tok, model = load_tokenizer(tiny_coat), load_model(tiny_coat)
    prompts = ["Problem: Ana has 3 apples.\nSolution:\n", "Problem: Ben finds 7 coins.\nSolution:\n", "Q\n"]
    free = generate(model, tok, prompts, max_new_tokens=16, temperature=1.0, seed=3)
    # a prompt whose sampled answer writes a new token after its first one: make that token an end token
    i, k = next((i, k) for i, s in enumerate(free) for k in range(1, len(s.response_ids))
                if s.response_ids[k] not in s.response_ids[:k])
    ids = free[i].response_ids
    assert ids[k] != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, ids[k]]
    [s] = generate(model, tok, prompts[i:i + 1], max_new_tokens=16, temperature=1.0, seed=3, prompt_offset=i)
    assert s.response_ids == ids[:k] and not s.truncated and s.stop_id == ids[k]
    assert s.scored_ids(tok.eos_token_id) == ids[:k + 1]
    [cut] = generate(model, tok, prompts[i:i + 1], max_new_tokens=k, temperature=1.0, seed=3, prompt_offset=i)
    assert cut.truncated and cut.stop_id is None and cut.scored_ids(tok.eos_token_id) == ids[:k]


def test_a_model_folder_without_tokenizer_files_is_refused_by_name(tmp_path, tiny_coat):
    import shutil

    import pytest

    from satori.errors import SatoriError

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_coat / name, weights_only / name)
    with pytest.raises(SatoriError, match=f"{weights_only}: no tokenizer files"):
        load_tokenizer(weights_only)

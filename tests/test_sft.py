"""satori sft: response-only loss, accumulation invariance, packing, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from satori.errors import SatoriError
from satori.train.sft import SFTConfig, run_sft


def cfg(tmp_path, model, data, name, **kw):
    base = dict(model=str(model), data=str(data), out=str(tmp_path / name), valid_fraction=0.0, max_steps=4,
                batch_size=4, grad_accum=1, lr=1e-3, warmup_ratio=0.0, eval_every=100, save_every=100,
                threads=1, seed=3)
    base.update(kw)
    return SFTConfig(**base)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_batch_vs_accumulation_invariance(tmp_path, tiny_coat, sft_jsonl):
    a = run_sft(cfg(tmp_path, tiny_coat, sft_jsonl, "a", batch_size=8, grad_accum=1))
    b = run_sft(cfg(tmp_path, tiny_coat, sft_jsonl, "b", batch_size=1, grad_accum=8))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == len(lb) == 4
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_packing_gives_the_same_loss(tmp_path, tiny_coat, sft_jsonl):
    run_sft(cfg(tmp_path, tiny_coat, sft_jsonl, "plain", max_steps=1, batch_size=6))
    run_sft(cfg(tmp_path, tiny_coat, sft_jsonl, "packed", max_steps=1, batch_size=6, packing=True, max_len=1024))
    assert losses(tmp_path / "packed") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)


def test_loss_decreases_and_only_response_tokens_count(tmp_path, tiny_coat, sft_jsonl):
    run_sft(cfg(tmp_path, tiny_coat, sft_jsonl, "long", max_steps=30, lr=1e-2))
    ls = losses(tmp_path / "long")
    assert ls[-1] < ls[0] * 0.8
    from satori.train.sft import batch_tensors, Example

    b = batch_tensors([Example([1, 2, 3], [4, 5, 0])], pad_id=9, packing=False, max_len=64)
    # positions 2,3,4 predict tokens 4,5,eos: exactly the response
    assert b["loss_mask"].tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]


def test_resume_gives_identical_weights(tmp_path, tiny_coat, sft_jsonl):
    import shutil

    run_sft(cfg(tmp_path, tiny_coat, sft_jsonl, "full", max_steps=6, save_every=2))
    # a run killed after its step-4 checkpoint: copy the folder, drop everything written after it
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    (part / "model.safetensors").unlink()
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-2", "step-4"]
    shutil.rmtree(part / "checkpoints" / "step-4" / "model")  # an incomplete newer checkpoint is ignored...
    (part / "checkpoints" / "step-4" / "state.json").unlink()
    result = run_sft(cfg(tmp_path, tiny_coat, sft_jsonl, "part", max_steps=6, save_every=2, resume=True))
    assert result["loss"] == pytest.approx(losses(tmp_path / "full")[-1], rel=1e-6)
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    wf, wp = weights(tmp_path / "full"), weights(part)
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k


def test_bad_records_are_named(tmp_path, tiny_coat):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "response": "r"}\n{"question": "q2"}\n')
    with pytest.raises(SatoriError, match=r"bad\.jsonl:2: missing or empty field 'response'"):
        run_sft(cfg(tmp_path, tiny_coat, bad, "x"))


def test_heldout_metrics_report_each_meta_tokens_probability(tiny_base, tiny_coat):
    """valid_p_<action>: the mean probability of a COAT token where a response has it, derived
    here from the model's own softmax, one example at a time."""
    from satori.rollout import load_model, load_tokenizer
    from satori.train.sft import Example, heldout_metrics, meta_token_ids

    tok, model = load_tokenizer(tiny_coat), load_model(tiny_coat)
    ids = meta_token_ids(tok)
    assert set(ids) == {"continue", "reflect", "explore"}
    texts = ["Step 1: 2 + 3 = 5<|continue|>Step 2: 5 * 2 = 10<|reflect|>Check: right.<|continue|>\\boxed{10}",
             "Step 1: 4 - 1 = 3<|reflect|>3 is not 2.<|explore|>Step 1: 4 - 2 = 2 \\boxed{2}"]
    examples = [Example(tok("Q: sum?\n", add_special_tokens=False)["input_ids"],
                        tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for t in texts]
    got = heldout_metrics(model, examples, tok.pad_token_id, SFTConfig(batch_size=2, bf16=False), ids)
    probs = {name: [] for name in ids}
    nll, n = 0.0, 0
    for ex in examples:
        seq = ex.prompt_ids + ex.response_ids
        with torch.no_grad():
            p = model(torch.tensor([seq])).logits[0].float().softmax(-1)
        for j in range(len(ex.prompt_ids), len(seq)):
            nll -= float(p[j - 1, seq[j]].log())
            n += 1
            for name, i in ids.items():
                if seq[j] == i:
                    probs[name].append(float(p[j - 1, i]))
    assert got["valid_loss"] == pytest.approx(nll / n, rel=1e-4)
    assert len(probs["continue"]) == 2 and len(probs["reflect"]) == 2 and len(probs["explore"]) == 1
    for name, ps in probs.items():
        assert got[f"valid_p_{name}"] == pytest.approx(sum(ps) / len(ps), rel=1e-4)
    # a tokenizer without the COAT tokens watches nothing; a token the responses lack gets no key
    assert meta_token_ids(load_tokenizer(tiny_base)) == {}
    no_explore = heldout_metrics(model, examples[:1], tok.pad_token_id, SFTConfig(bf16=False),
                                 {"explore": ids["explore"]})
    assert set(no_explore) == {"valid_loss"}

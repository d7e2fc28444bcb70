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

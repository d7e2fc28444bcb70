"""Shared fixtures: tiny models built from configs (never a hub), small testbed data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def _corpus(n: int = 200) -> list[str]:
    from satori.data import plain_prompt
    from satori.testbed.tasks import make_problems, reference_solution

    return [plain_prompt(p.question) + reference_solution(p) for p in make_problems("train", n, seed=0)]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """An untrained tiny Llama + testbed tokenizer, saved like any Hugging Face model."""
    from satori.testbed.model import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("tiny_base")
    tok = build_tokenizer(_corpus(), vocab_size=400)
    torch.manual_seed(0)
    model = build_model(len(tok), size="tiny", tokenizer=tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved model folder's ``model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same tensors, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def with_coat_tokens(src: Path, out: Path, init: str = "mean") -> Path:
    """Save a copy of the model in ``src`` with the COAT tokens added (as format tuning does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from satori.coat import add_coat_tokens

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    add_coat_tokens(tok, model, init=init)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_coat(tiny_base, tmp_path_factory) -> Path:
    """The tiny model with the COAT tokens added (as after format tuning)."""
    return with_coat_tokens(tiny_base, tmp_path_factory.mktemp("tiny_coat"))


@pytest.fixture(scope="session")
def shipped_coat(tmp_path_factory) -> Path:
    """The shipped testbed base model with the COAT tokens added: a policy whose reward RL can
    measurably raise (sampled at temperature 1.0 it is right about two times in three)."""
    from satori.testbed import BASE_MODEL_DIR

    return with_coat_tokens(BASE_MODEL_DIR, tmp_path_factory.mktemp("shipped_coat"), init="text")


@pytest.fixture()
def sft_jsonl(tmp_path) -> Path:
    """Question / response records from testbed reference solutions."""
    from satori.testbed.tasks import make_problems, reference_solution

    path = tmp_path / "sft.jsonl"
    with path.open("w") as fh:
        for p in make_problems("train", 24, seed=1):
            fh.write(json.dumps({"question": p.question, "response": reference_solution(p)}) + "\n")
    return path

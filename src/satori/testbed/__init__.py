"""The embedded testbed: procedural arithmetic word problems with exact step checking, and a
tiny causal LM pretrained from scratch on a CPU to stand in for a base model.

The shipped base model lives in ``satori/assets/testbed-base`` (see :data:`BASE_MODEL_DIR`).
"""

from pathlib import Path

from satori.testbed.checker import (
    StepCheck,
    check_steps,
    correct_step_text,
    split_steps,
    verify_step,
)
from satori.testbed.model import build_model, build_tokenizer
from satori.testbed.pretrain import PretrainConfig, pretrain
from satori.testbed.tasks import make_problems, reference_solution

#: The pretrained testbed base model shipped with the package (model + tokenizer + build_info).
BASE_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "testbed-base"

__all__ = [
    "BASE_MODEL_DIR",
    "PretrainConfig",
    "StepCheck",
    "build_model",
    "build_tokenizer",
    "check_steps",
    "correct_step_text",
    "make_problems",
    "pretrain",
    "reference_solution",
    "split_steps",
    "verify_step",
]

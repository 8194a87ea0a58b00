"""``lora`` and ``dora`` through HF ``peft`` (``LoraConfig(use_dora=...)``), one registration.

The saved adapter is ``peft``'s own format, loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .registry import DEFAULT_TARGETS, MethodFamily, Preset, register_family

_PARAMETRIC = re.compile(r"^(lora|dora)-r(\d+)$")


@dataclass
class LoraMethod:
    """``lora`` and ``dora`` (through ``peft``): rank, scale ``alpha/r``, targets."""

    name: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


# bookkeeping of peft's config, not the adapter's computation
_PEFT_BOOKKEEPING = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}


def _config_differences(saved: dict, expected: dict) -> list[str]:
    """Keys where a saved peft config differs from the one the method builds (keys only one
    side has count when not at a default-like value: a newer peft adds keys)."""
    def norm(value):
        if isinstance(value, (set, frozenset, list, tuple)) and all(isinstance(v, str) for v in value):
            return sorted(value)  # target_modules: a set, saved as a list in any order
        return value

    expected = json.loads(json.dumps(expected, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
    out = []
    for key in sorted(set(saved) | set(expected)):
        if key in _PEFT_BOOKKEEPING:
            continue
        if key in saved and key in expected:
            if norm(saved[key]) != norm(expected[key]):
                out.append(key)
        elif (saved if key in saved else expected)[key] not in (None, False, {}, []):
            out.append(key)
    return out


def _compile_friendly_dora() -> None:
    """Let ``torch.compile`` trace peft's DoRA layer without graph breaks.

    peft's DoRA forward calls ``dequantize_module_weight``, whose test for torchao weights
    (``type(weight).__module__.startswith(...)``) dynamo cannot trace: a graph break in every
    DoRA module of a compiled decoder layer. A plain (unquantized) weight is returned as is
    before that test, as peft itself would; anything else goes to peft's own function.
    """
    from peft.tuners.lora import dora

    original = dora.dequantize_module_weight
    if getattr(original, "medpeft_plain_first", False):
        return

    def dequantize_module_weight(module):
        weight = getattr(module, "weight", None)
        if not hasattr(module, "W_q") and type(weight) is torch.nn.Parameter:
            return weight
        return original(module)

    dequantize_module_weight.medpeft_plain_first = True
    dora.dequantize_module_weight = dequantize_module_weight


class PeftLoraFamily(MethodFamily):
    name = "peft-lora"
    methods = {"lora": "Fixed LoRA", "dora": "PEFT"}
    schema = LoraMethod
    presets = (
        Preset("lora-r4", "lora", {"r": 4, "alpha": 8.0}, about="vanilla LoRA r4/alpha8", table=True),
        Preset("lora-r16", "lora", about="vanilla LoRA r16/alpha32", table=True, benchmark=True),
        Preset("lora-r24", "lora", {"r": 24, "alpha": 48.0}, about="vanilla LoRA r24/alpha48", table=True),
        Preset("dora-r24", "dora", {"r": 24, "alpha": 48.0}, about="DoRA r24/alpha48", table=True, benchmark=True),
    )
    table_rows = ("library-16x-lora-r8",)  # the BiRG-LoRA paper's 16-adapter rank-8 library
    def parametric_preset(self, name):
        """``lora-rN`` / ``dora-rN`` for any N: rank N, alpha 2N (the papers' ratio)."""
        found = _PARAMETRIC.match(name)
        if not found or int(found.group(2)) < 1:
            return None
        r = int(found.group(2))
        return {"name": found.group(1), "r": r, "alpha": 2.0 * r}

    @staticmethod
    def peft_config(method):
        from peft import LoraConfig

        return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                          target_modules=list(method.target_modules), use_dora=method.name == "dora",
                          bias="none", task_type="CAUSAL_LM")

    def apply(self, model, method):
        from peft import get_peft_model

        if method.name == "dora":
            _compile_friendly_dora()
        return get_peft_model(model, self.peft_config(method))

    def remove(self, model):
        base = model.unload()
        for p in base.parameters():
            p.requires_grad_(False)
        return base

    def save(self, model, method, folder: Path):
        model.save_pretrained(folder, safe_serialization=True)

    def load(self, base_model, method, folder: Path):
        from peft import PeftModel

        if not (folder / "adapter_model.safetensors").exists():
            raise ValueError(f"{folder}: no adapter_model.safetensors (pickled adapter files are not read)")
        config_path = folder / "adapter_config.json"
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError(f"{config_path}: expected peft's config (a JSON object)")
        differ = _config_differences(saved, self.peft_config(method).to_dict())
        if differ:  # any setting that changes the adapter's computation (rslora, rank patterns, ...)
            raise ValueError(f"{config_path}: peft's config disagrees with the method's in {', '.join(differ[:5])}")
        if method.name == "dora":
            _compile_friendly_dora()
        return PeftModel.from_pretrained(base_model, str(folder)).eval()


register_family(PeftLoraFamily())

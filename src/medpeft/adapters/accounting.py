"""Parameter accounting: trainable and active parameters of each method on an architecture.

The architecture is built from its config on the ``meta`` device (no weights, no
download) and each method is applied to it exactly as in training, so the counts are
those of the real adapters, not of a formula that could drift from the code. *Active*
parameters are those one question's forward pass uses; each family says which
(``MethodFamily.count_active``).

``library-<N>x-<preset>`` counts a library of N independently trained adapters of a
preset: N times the trainable parameters, one adapter active.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .registry import catalogue, family_of, is_preset, preset_config

ARCH_DIR = Path(__file__).resolve().parents[1] / "archs"
LIBRARY = re.compile(r"^library-(\d+)x-(.+)$")


def build_meta_model(arch: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """A causal LM with the architecture ``arch`` (shipped name, config.json path, model folder
    or hub id), on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "tiny":
        from ..models import TINY_SPECIAL_TOKENS, tiny_config

        config = tiny_config(256 + len(TINY_SPECIAL_TOKENS))
    elif (ARCH_DIR / f"{arch}.json").exists() or Path(arch).is_file():
        from ..errors import MedpeftError

        path = ARCH_DIR / f"{arch}.json" if (ARCH_DIR / f"{arch}.json").exists() else Path(arch)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
                raise ValueError("field 'model_type' is missing: not a model's config.json")
            config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MedpeftError(f"{path}: not a usable model config ({first})") from None
    else:
        from ..models import model_source, require_hub_reachable

        arch = model_source(arch)  # a built-in model's converted folder
        require_hub_reachable(arch, "architecture")
        config = AutoConfig.from_pretrained(arch, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@dataclass
class MethodCount:
    method: str
    trainable_params: int
    active_params: int
    active_rank: int

    def to_json(self, arch: str) -> dict:
        return {"arch": arch, "method": self.method, "trainable_params": self.trainable_params,
                "active_params": self.active_params, "active_rank": self.active_rank}


def count_method(arch: str, name: str, method=None) -> MethodCount:
    """Trainable and active parameters of preset ``name`` (or a ``library-NX-PRESET``) on ``arch``;
    ``method``: count that method config instead of the preset's (labelled ``name``)."""
    library = LIBRARY.match(name)
    preset = library.group(2) if library else name
    if method is None and not is_preset(preset):
        raise ValueError(f"unknown method preset {preset!r}; known: {', '.join(catalogue())}, or "
                         "library-<N>x-<preset>")
    given = method is not None
    try:
        method = method if given else preset_config(preset)
    except ConfigError as err:
        raise ValueError(f"{name!r}: {err}") from None
    family = family_of(method)
    if not given and preset in catalogue() and family.depends_on(method):  # a router: its size is its library's
        raise ValueError(f"{name!r} reads the cell {family.depends_on(method)[0]!r}, whose size sets its parameters; "
                         f"count it over a library of N adapters as '{name}-<N>x' (e.g. '{name}-16x')")
    with torch.device("meta"):
        model = family.apply(build_meta_model(arch), method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    active, rank = family.count_active(model, method, trainable)
    if library:
        n = int(library.group(1))
        if n < 1:
            raise ValueError(f"{name!r}: a library needs at least one adapter")
        return MethodCount(name, n * trainable, active, rank)
    return MethodCount(name, trainable, active, rank)


def params_table(counts: list[MethodCount], arch: str) -> str:
    lines = [f"Parameters on {arch} (M = 1e6)", "", "| method | trainable | active | active rank |", "|---|---|---|---|"]
    for c in counts:
        lines.append(f"| {c.method} | {c.trainable_params / 1e6:.2f}M | {c.active_params / 1e6:.2f}M | {c.active_rank} |")
    return "\n".join(lines) + "\n"

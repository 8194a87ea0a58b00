"""Parameter accounting: trainable and active parameters of each method on an architecture.

The architecture is built from its config on the ``meta`` device (no weights, no
download) and each method is applied to it exactly as in training, so the counts are
those of the real adapters, not of a formula that could drift from the code.

*Active* parameters are those one question's forward pass uses: all of LoRA/DoRA; for
rank-gated methods the kappa selected rank atoms of A and B (``kappa/R`` of them), the
hidden gate and rho in full, and the 3 table rows a question indexes (specialty,
operation, pair) of each tag table; for an adapter library, one adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import BirgMethod, LoraMethod, MoeMethod, PRESETS, expand_preset, from_dict, METHOD_SCHEMAS
from .birg import RankGatedLoraLinear
from .moe import LoraMixtureLinear

ARCH_DIR = Path(__file__).resolve().parents[1] / "archs"
DEFAULT_METHODS = ["lora-r4", "lora-r16", "lora-r24", "dora-r24", "birg", "rankwise", "moelora", "sparsedoctor",
                   "moe-vanilla", "medmoe", "medmoe-uniform", "medmoe-bottom-heavy", "multilora", "lora-library-16x-r8"]
LIBRARY_PREFIX = "lora-library-"  # lora-library-<N>x-r<r>: N independent LoRA adapters of rank r


def build_meta_model(arch: str) -> torch.nn.Module:
    """A causal LM with the architecture ``arch`` (shipped name, config.json path, or hub id), on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "tiny":
        from ..models import TINY_SPECIAL_TOKENS, tiny_config

        config = tiny_config(256 + len(TINY_SPECIAL_TOKENS))
    elif (ARCH_DIR / f"{arch}.json").exists() or Path(arch).is_file():
        path = ARCH_DIR / f"{arch}.json" if (ARCH_DIR / f"{arch}.json").exists() else Path(arch)
        raw = json.loads(path.read_text())
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        config = AutoConfig.from_pretrained(arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass
class MethodCount:
    method: str
    trainable_params: int
    active_params: int
    active_rank: int

    def to_json(self, arch: str) -> dict:
        return {"arch": arch, "method": self.method, "trainable_params": self.trainable_params,
                "active_params": self.active_params, "active_rank": self.active_rank}


def _method_config(name: str):
    data = expand_preset({"preset": name})
    return from_dict(METHOD_SCHEMAS[data["name"]], data, "method")


def count_method(arch: str, name: str) -> MethodCount:
    """Trainable and active parameters of preset ``name`` on ``arch``."""
    from . import apply_method

    if name.startswith(LIBRARY_PREFIX):  # N identical-shaped adapters: count one, multiply
        spec = name[len(LIBRARY_PREFIX):]
        try:
            n_str, r_str = spec.split("x-r")
            n, r = int(n_str), int(r_str)
        except ValueError:
            raise ValueError(f"library preset must look like {LIBRARY_PREFIX}16x-r8, got {name!r}") from None
        with torch.device("meta"):
            model = apply_method(build_meta_model(arch), LoraMethod(r=r, alpha=2.0 * r))
        one = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return MethodCount(name, n * one, one, r)
    if name not in PRESETS:
        raise ValueError(f"unknown method preset {name!r}; known: {', '.join([*PRESETS, LIBRARY_PREFIX + 'NxrR'])}")
    method = _method_config(name)
    with torch.device("meta"):
        model = apply_method(build_meta_model(arch), method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(method, MoeMethod):
        return _count_moe(name, model, trainable)
    if not isinstance(method, BirgMethod):
        rank = getattr(method, "r", 0)
        return MethodCount(name, trainable, trainable, rank)
    inactive = 0
    for m in model.modules():
        if isinstance(m, RankGatedLoraLinear):
            inactive += (m.lora_A.numel() + m.lora_B.numel()) * (m.r - m.kappa) // m.r
            if m.gate_tags is not None:
                inactive += m.gate_tags.numel() - 3 * m.r
    return MethodCount(name, trainable, trainable - inactive, method.kappa)


def _count_moe(name: str, model: torch.nn.Module, trainable: int) -> MethodCount:
    """Active = router, anchors, and the share of specialists a token uses: top_k of them
    (topk), all (soft), one (route). Active rank: the mean over modules of the rank a token uses."""
    inactive, ranks = 0, []
    for m in model.modules():
        if isinstance(m, LoraMixtureLinear):
            spec_ranks = m.ranks[m.n_anchor:]
            spec_params = sum(spec_ranks) * (m.lora_A.shape[1] + m.lora_B.shape[0])
            used = {"topk": m.top_k, "soft": m.n_spec, "route": 1}[m.router_kind]
            inactive += spec_params - spec_params * used // m.n_spec
            ranks.append(sum(m.ranks[: m.n_anchor]) + sum(spec_ranks) * used / m.n_spec)
    return MethodCount(name, trainable, trainable - inactive, round(sum(ranks) / max(len(ranks), 1)))


def params_table(counts: list[MethodCount], arch: str) -> str:
    lines = [f"Parameters on {arch} (M = 1e6)", "", "| method | trainable | active | active rank |", "|---|---|---|---|"]
    for c in counts:
        lines.append(f"| {c.method} | {c.trainable_params / 1e6:.2f}M | {c.active_params / 1e6:.2f}M | {c.active_rank} |")
    return "\n".join(lines) + "\n"

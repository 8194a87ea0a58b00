"""A method family written outside ``src/``: proof that a family is one module and one registration.

``tagscale``: LoRA whose update is scaled per question by a learned per-specialty scalar::

    z = W0 x + s[specialty(x)] (alpha / r) B A x,        s initialised to 1
    L_scale = mean over modules and specialties of (s - 1)^2          (weights only)

It reads the tags, is routed (the audit reports each question's scale), has a weights-only
auxiliary loss, and its ``tagscale-shifted`` preset starts away from the base model (the
contract suite's documented exception to "a fresh adapter leaves the base unchanged").
conftest.py registers it, so the contract suite runs over its presets like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medpeft.adapters.audit_tools import AuditResult, tag_arrays
from medpeft.adapters.inject import InjectedFamily, InjectedLinear, adapter_dtype
from medpeft.adapters.registry import Preset, register_family
from medpeft.adapters.routing import routing_state
from medpeft.schema import require
from medpeft.tags import SPECIALTIES


@dataclass
class TagScaleMethod:
    name: str = "tagscale"
    r: int = 4
    alpha: float = 8.0
    init_b: float = 0.0  # std of B's initial values (0: the update starts at zero)
    l_scale: float = 0.01
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "down_proj"])


class TagScaledLinear(InjectedLinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, init_b: float, state, name: str):
        super().__init__(base, state, name)
        device, dtype = base.weight.device, adapter_dtype(base.weight.dtype)
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        self.scale = nn.Parameter(torch.ones(len(SPECIALTIES), device=device, dtype=dtype))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.normal_(self.lora_B, std=init_b) if init_b > 0 else nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.specialty is None or st.specialty.shape[0] != x.shape[0]:
            raise RuntimeError(f"{self.name}: needs set_routing(...) with the batch's tags")
        s = self.scale[st.specialty]  # [B]
        if st.record:
            st.records[self.name] = {"scale": s.detach()[:, None]}
        update = (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype)
        return self.base(x) + (s * self.scaling).to(x.dtype)[:, None, None] * update


class TagScaleFamily(InjectedFamily):
    name = "tagscale"
    methods = {"tagscale": "Tag-scaled LoRA (test family)"}
    schema = TagScaleMethod
    presets = (Preset("tagscale", "tagscale"),
               Preset("tagscale-shifted", "tagscale", {"init_b": 0.05}, base="tagscale"))
    parameter_losses = frozenset({"scale"})

    def identity_at_init(self, method) -> bool:  # the documented exception: tagscale-shifted
        return method.init_b == 0

    def validate(self, method, prefix="method"):
        require(method.init_b >= 0, f"{prefix}.init_b", f"must be >= 0, got {method.init_b}")

    def reads_tags(self, method):
        return True

    def make_layer(self, name, base, state, method, model):
        return TagScaledLinear(base, method.r, method.alpha, method.init_b, state, name)

    def loss_weights(self, method):
        return {"scale": method.l_scale}

    def aux_losses(self, model, method):
        state = routing_state(model)
        if method.l_scale <= 0 or not state.parameter_losses:
            return {}
        return {"scale": torch.stack([(layer.scale.float() - 1).square().mean() for layer in state.layers]).mean()}

    def audit(self, model, method, routes, items):
        spec, _, _ = tag_arrays(items)
        scales = np.stack([rec["scale"].numpy()[:, 0] for rec in routes.values()], axis=1)  # [N, modules]
        modules = [{name: {"scale": round(float(scales[i, j]), 5)} for j, name in enumerate(routes)}
                   for i in range(len(items))]
        by_specialty = {SPECIALTIES[s]: float(scales[spec == s].mean()) for s in sorted(set(spec.tolist()))}
        summary = {"n_questions": len(items), "n_modules": len(routes), "mean_scale_by_specialty": by_specialty}
        return AuditResult(summary, modules, f"audited {len(items)} questions: mean scale {scales.mean():.4f}")


register_family(TagScaleFamily())

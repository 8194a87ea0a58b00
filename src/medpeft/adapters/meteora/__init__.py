"""``meteora``: MeteoRA-style soft mixture over a frozen LoRA library (Xu et al., 2024).

Per layer and token a gate ``l = W_g x`` [K] over the library's adapters, top-k (2) with a
softmax of temperature ``T`` over the kept logits (library/layer.py)::

    z = W0 x + sum_{k in topk(l)} softmax(l_topk / T)_k (alpha/r) B_k A_k x

trained with the answer loss plus the gate's supervised loss: the cross-entropy between the
gate's distribution ``softmax(l)`` and the question's route (the adapter its route trained),
averaged over prompt tokens and modules, weighted by ``l_route``. MeteoRA trains its gates
with the task label as supervision in the same way (its "gate loss"); the coefficient is a
config key. Calibration reads source (training) items only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..library import LibraryRouterFamily, RouterMethod
from ..registry import Preset, register_family
from ..routing import routing_state


@dataclass
class MeteoraMethod(RouterMethod):
    name: str = "meteora"
    top_k: int = 2
    temperature: float = 1.0
    l_route: float = 1.0  # weight of the gate's cross-entropy with the question's route


def route_cross_entropy(state) -> torch.Tensor | None:
    """Mean over modules and prompt tokens (of questions with a route) of ``-log softmax(l)_route``."""
    outs = state.collect()
    if not outs or state.route is None:
        return None
    known = (state.route >= 0)[:, None] & state.prompt_mask  # [B, T]
    if not bool(known.any()):
        return outs[0].sum() * 0.0
    target = state.route.clamp(min=0)[:, None].expand_as(known)
    total = 0.0
    for logits in outs:
        logp = torch.log_softmax(logits.float(), dim=-1)
        total = total + -(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * known).sum() / known.sum()
    return total / len(outs)


class MeteoraFamily(LibraryRouterFamily):
    name = "meteora"
    methods = {"meteora": "Adapter library"}
    schema = MeteoraMethod
    needs_tag_routes = True
    presets = (Preset("meteora", "meteora", about="MeteoRA-style soft MoE over the library: per-token top-2 gate, "
                      "route-supervised"),)
    table_rows = ("meteora-16x",)

    def loss_weights(self, method):
        return {"route": method.l_route}

    def aux_losses(self, model, method):
        if method.l_route <= 0:
            routing_state(model).collect()
            return {}
        value = route_cross_entropy(routing_state(model))
        return {"route": value} if value is not None else {}


register_family(MeteoraFamily())

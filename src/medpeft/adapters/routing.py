"""The per-batch routing context of routed adapters (rank gates, expert routers).

Routed layers need, besides their input, the prompt mask of the batch and each
question's specialty and operation ids. ``transformers`` passes no such arguments to a
``Linear``, so instead of forking it every routed layer of a model holds a reference to
one shared :class:`RoutingState`, which the trainer and the scorers set before each
forward pass (the same pattern ``peft`` uses for per-sample adapter names).

The state is *not* cleared when a forward pass returns: with gradient checkpointing the
layers run again during ``backward()``, and must see the same context to recompute the
same gates. It is replaced by the next :func:`set_routing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ROUTING_ATTR = "medpeft_routing"


@dataclass
class RoutingState:
    prompt_mask: torch.Tensor | None = None  # [B, T] bool: prompt tokens (answers excluded)
    specialty: torch.Tensor | None = None  # [B] long
    operation: torch.Tensor | None = None  # [B] long
    freeze: bool = False  # generation: gates computed at prefill, then held fixed
    record: bool = False  # audit: keep each layer's gate outputs
    frozen: dict[str, tuple] = field(default_factory=dict)
    aux: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    records: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        self.aux.setdefault(name, []).append(value)

    def pop_aux(self) -> dict[str, torch.Tensor]:
        """Mean of each auxiliary loss over the layers that reported it in the last forward."""
        out = {k: torch.stack(v).mean() for k, v in self.aux.items() if v}
        self.aux = {}
        return out


def routing_state(model: nn.Module) -> RoutingState | None:
    """The routing state of a model with routed adapters, else None (peft LoRA, full)."""
    for m in (model, getattr(model, "base_model", None)):
        state = getattr(m, ROUTING_ATTR, None) if m is not None else None
        if state is not None:
            return state
    return None


def set_routing(
    model: nn.Module,
    prompt_mask: torch.Tensor,
    specialty: torch.Tensor,
    operation: torch.Tensor,
    *,
    freeze: bool = False,
    record: bool = False,
) -> None:
    """Give the next forward pass(es) their routing context; a no-op for unrouted models."""
    state = routing_state(model)
    if state is None:
        return
    state.prompt_mask = prompt_mask.bool()
    state.specialty, state.operation = specialty, operation
    state.freeze, state.record = freeze, record
    state.frozen, state.aux, state.records = {}, {}, {}

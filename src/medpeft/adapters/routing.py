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
    parameter_losses: bool = True  # compute weight-only losses (once per optimizer step)
    record: bool = False  # audit: keep each layer's gate outputs
    frozen: dict[str, tuple] = field(default_factory=dict)
    aux: dict[str, list[tuple[torch.Tensor, int]]] = field(default_factory=dict)
    records: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    gates: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (p, hard) per module, for losses
    pending_queue: dict = field(default_factory=dict)  # expert-queue pushes, committed after backward
    contrast: list = field(default_factory=list)  # (similarities, labels, key labels) per module
    # Per-batch quantities every routed layer needs, computed once per set_routing
    # instead of once per module (they depend on the batch, not on the layer).
    _cache: dict = field(default_factory=dict)

    def pool_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """``[B, T]`` weights of the masked mean over prompt tokens (rows sum to 1)."""
        key = ("pool", dtype)
        if key not in self._cache:
            m = self.prompt_mask.to(dtype)
            self._cache[key] = m / m.sum(1, keepdim=True).clamp(min=1)
        return self._cache[key]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``h_x``: mean of ``x`` [B, T, d] over the prompt tokens, ``[B, d]``.

        Modules that read the same input tensor (q/k/v, gate/up) share one pooling: the
        last result is kept together with the tensor it came from.
        """
        last = self._cache.get("pooled")
        if last is not None and last[0] is x:
            return last[1]
        h = torch.bmm(self.pool_weights(x.dtype).unsqueeze(1), x).squeeze(1)
        self._cache["pooled"] = (x, h)
        return h

    def tag_rows(self) -> torch.Tensor:
        """``[B, 3]`` rows of a clinical gate table: specialty, operation, their pair."""
        if "rows" not in self._cache:
            from .birg import tag_rows

            self._cache["rows"] = tag_rows(self.specialty, self.operation)
        return self._cache["rows"]

    def tag_onehot(self, dtype: torch.dtype) -> torch.Tensor:
        """``[B, rows]`` with a 1 at each of a question's three clinical-table rows."""
        key = ("onehot", dtype)
        if key not in self._cache:
            from .birg import N_TAG_ROWS

            rows = self.tag_rows()
            self._cache[key] = torch.zeros(rows.shape[0], N_TAG_ROWS, dtype=dtype, device=rows.device).scatter_(
                1, rows, 1.0)
        return self._cache[key]

    def tag_group_averager(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tag axes stacked: ``W [G, B]`` averaging rows per tag value (absent values:
        zero rows) and ``[G, G]`` pair weights, ``1/n_pairs(axis)`` on distinct present
        values of the same axis, else 0 -- so ``sum(cos * weights)`` is the sum over axes
        of the mean prototype similarity."""
        if "groups" not in self._cache:
            from ..tags import OPERATIONS, SPECIALTIES

            blocks, weights = [], []
            for ids, n_values in ((self.specialty, len(SPECIALTIES)), (self.operation, len(OPERATIONS))):
                onehot = torch.nn.functional.one_hot(ids, n_values).float().T  # [G, B]
                counts = onehot.sum(1, keepdim=True)
                present = (counts.squeeze(1) > 0).float()
                pairs = present[:, None] * present[None, :] * (1 - torch.eye(n_values, device=ids.device))
                blocks.append(onehot / counts.clamp(min=1))
                weights.append(pairs / pairs.sum().clamp(min=1))
            self._cache["groups"] = (torch.cat(blocks), torch.block_diag(*weights))
        return self._cache["groups"]

    # routed layers by decoder layer (name prefix): parameter-only losses of a decoder layer
    # are computed together by the first of its modules to run, while the layer's
    # parameters are materialised (also under per-layer sharding)
    groups: dict[str, list] = field(default_factory=dict)

    def register(self, layer) -> None:
        key = ".".join(layer.name.split(".")[:-2])
        self.groups.setdefault(key, []).append(layer)

    def orth_group(self, layer) -> list:
        """The layer's decoder-layer group if ``layer`` is the group's designated (first registered)
        module, else []. A fixed designated module, rather than "the first to run", keeps every
        forward -- including gradient checkpointing's recomputation -- doing the same work."""
        group = self.groups.get(".".join(layer.name.split(".")[:-2]), [layer])
        return group if group[0] is layer else []

    def add_aux(self, name: str, value: torch.Tensor, weight: int = 1) -> None:
        """Report a loss term summed over ``weight`` modules (1: one module's value)."""
        self.aux.setdefault(name, []).append((value, weight))

    def pop_aux(self) -> dict[str, torch.Tensor]:
        """Mean over modules of each auxiliary loss reported in the last forward."""
        out = {k: torch.stack([x for x, _ in v]).sum() / sum(w for _, w in v) for k, v in self.aux.items() if v}
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
    parameter_losses: bool = True,
) -> None:
    """Give the next forward pass(es) their routing context; a no-op for unrouted models.

    ``parameter_losses=False`` skips weight-only auxiliary losses (the trainer computes
    them on the first micro-batch of each optimizer step only).
    """
    state = routing_state(model)
    if state is None:
        return
    state.prompt_mask = prompt_mask.bool()
    state.specialty, state.operation = specialty, operation
    state.freeze, state.record, state.parameter_losses = freeze, record, parameter_losses
    state.frozen, state.aux, state.records, state._cache, state.gates = {}, {}, {}, {}, []
    state.pending_queue, state.contrast = {}, []

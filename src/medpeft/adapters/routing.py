"""The per-batch routing context of routed adapters (rank gates, expert routers).

Routed layers need, besides their input, the prompt mask of the batch and each
question's specialty and operation ids. ``transformers`` passes no such arguments to a
``Linear``, so instead of forking it every routed layer of a model holds a reference to
one shared :class:`RoutingState`, which the trainer and the scorers set before each
forward pass (the same pattern ``peft`` uses for per-sample adapter names).

The state is *not* cleared when a forward pass returns: with gradient checkpointing the
layers run again during ``backward()``, and must see the same context to recompute the
same gates. It is replaced by the next :func:`set_routing`.

Written for ``torch.compile`` of whole decoder layers (``train.compile``): a routed layer
only *reads* per-batch tensors prepared by :func:`set_routing` and writes what the loss
functions need to its own ``routing_out`` attribute -- no shared lists or dicts grow
during the forward pass -- so every decoder layer after the first runs the same compiled
graph instead of recompiling per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ROUTING_ATTR = "medpeft_routing"
# Projections of one decoder block that read the same input tensor (Llama/Qwen/Mistral
# naming). Eagerly, routed layers of one such group compute their per-question gates
# together (:func:`sibling_groups`); a layer whose input turns out to differ from its
# group's computes its own, so an architecture that breaks the naming stays correct.
SIBLING_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def topk_mask(p: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the ``k`` largest entries of each row of ``p`` [..., R], else 0.

    Used by the BiRG gate (over rank atoms) and the MoE top-k router (over experts). Eagerly
    a sort kernel and a scatter. Under ``torch.compile`` the same mask from pairwise ranks,
    ``rank_j = #{l : p_l > p_j or (p_l = p_j and l < j)}``, ``mask_j = rank_j < k``: R x R
    comparisons per row (R = 16 ranks or a few experts) that the compiler fuses with the
    softmax around them into one kernel, where top-k and scatter are two more launches per
    module (the routed step is launch-bound on a GPU, docs/performance.md). Ties (equal
    values) go to the lower index; eager ``topk`` may break them differently.
    """
    if not torch.compiler.is_compiling():
        return torch.zeros_like(p).scatter_(-1, p.topk(k, dim=-1).indices, 1.0)
    idx = torch.arange(p.shape[-1], device=p.device)
    p_j, p_l = p.unsqueeze(-1), p.unsqueeze(-2)
    ahead = (p_l > p_j) | ((p_l == p_j) & (idx[None, :] < idx[:, None]))  # [..., j, l]: l ranks before j
    return (ahead.sum(-1) < k).to(p.dtype)


def small_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` for a few rows ``a`` [B, k] (a gate's per-question products).

    Compiled: the broadcast product ``a[:, :, None] * b[None]`` summed over k, which the
    compiler turns into fused reductions in the forward and backward, where a matrix-product
    library call is one launch forward and two backward per module (the routed step is
    launch-bound on a GPU; launch counts in docs/performance.md).
    Only for a few rows: the product has B x k x n elements. Eager: the library product.
    """
    if not torch.compiler.is_compiling():
        return torch.addmm(bias, a, b) if bias is not None else a @ b
    out = (a.unsqueeze(-1) * b.unsqueeze(0)).sum(1)
    return out + bias if bias is not None else out


def sibling_groups(layers: list, names: tuple[tuple[str, ...], ...] = SIBLING_INPUTS) -> list[list]:
    """Groups (of 2 or more, in model order) of ``layers`` that share a parent module and whose
    last name components are in one tuple of ``names``: the layers that read the same input."""
    groups: dict[tuple, list] = {}
    for layer in layers:
        parent, _, child = layer.name.rpartition(".")
        for g, group in enumerate(names):
            if child in group:
                groups.setdefault((parent, g), []).append(layer)
    return [group for group in groups.values() if len(group) > 1]


@dataclass
class RoutingState:
    """The routing context every routed family needs; a family subclasses it to prepare its
    own per-batch tensors (:meth:`prepare_batch`)."""

    prompt_mask: torch.Tensor | None = None  # [B, T] bool: prompt tokens (answers excluded)
    specialty: torch.Tensor | None = None  # [B] long
    operation: torch.Tensor | None = None  # [B] long
    freeze: bool = False  # generation: gates computed at prefill, then held fixed
    parameter_losses: bool = True  # compute weight-only losses (once per optimizer step)
    record: bool = False  # audit: keep each layer's gate outputs
    frozen: dict[str, tuple] = field(default_factory=dict)
    records: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: list = field(default_factory=list)  # the routed layers sharing this state, in model order
    # [B, T] fp32: masked mean over prompt tokens (rows sum to 1), computed once per batch
    # (it depends on the batch, not on the layer); cast by the reader
    pool_weights: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)  # eager-only per-batch helpers of the loss computations
    # A family whose predictions are not one forward pass's (candidate verification) sets this:
    # ``predict(evaluator, items) -> [(predicted letters, scores)]``; the scorers call it instead.
    predict: object = None
    _pooled: tuple | None = None  # eager only: (input tensor, its pooling), shared by q/k/v and gate/up
    # eager only: (input tensor, {layer name: gate outputs}) of the last sibling group computed together
    sibling_gates: tuple | None = None

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``h_x``: mean of ``x`` [B, T, d] over the prompt tokens, ``[B, d]``, in fp32.

        Run eagerly, modules that read the same input tensor (q/k/v, gate/up) share one
        pooling (the last result is kept with the tensor it came from); compiled, the
        compiler sees the shared input itself, and a cache would only add guards.
        """
        compiling = torch.compiler.is_compiling()
        if not compiling and self._pooled is not None and self._pooled[0] is x:
            return self._pooled[1]
        h = torch.bmm(self.pool_weights.unsqueeze(1).to(x.dtype), x).squeeze(1).float()
        if not compiling:
            self._pooled = (x, h)
        return h

    def update(self, prompt_mask: torch.Tensor, specialty: torch.Tensor, operation: torch.Tensor, *,
               freeze: bool = False, record: bool = False, parameter_losses: bool = True) -> None:
        """A new batch's context (what :func:`set_routing` does for a model's state)."""
        self.prompt_mask = prompt_mask.bool()
        self.specialty, self.operation = specialty, operation
        self.freeze, self.record, self.parameter_losses = freeze, record, parameter_losses
        self.frozen, self.records, self.cache, self._pooled, self.sibling_gates = {}, {}, {}, None, None
        m = self.prompt_mask.float()
        self.pool_weights = m / m.sum(1, keepdim=True).clamp(min=1)
        for layer in self.layers:  # outputs of an abandoned forward (e.g. an exception) must not leak in
            layer.routing_out = None
        self.prepare_batch()

    def prepare_batch(self) -> None:
        """Per-batch tensors of a family's layers, computed once per batch (override)."""

    def register(self, layer) -> None:
        self.layers.append(layer)

    def collect(self) -> list:
        """``routing_out`` of every routed layer that ran in training mode since the last call,
        in model order; the outputs are cleared."""
        out = []
        for layer in self.layers:
            if layer.routing_out is not None:
                out.append(layer.routing_out)
                layer.routing_out = None
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
    if state is not None:
        state.update(prompt_mask, specialty, operation, freeze=freeze, record=record,
                     parameter_losses=parameter_losses)

"""LoRA mixtures of experts: one layer type for MoELoRA, SparseDoctor, Med-MoE-LoRA, vanilla MoE-LoRA, Multi-LoRA.

For a target linear layer and token x::

    z = W0 x + sum_{i in specialists} g_i(x) (alpha_i/r_i) B_i A_i x + sum_{a in anchors} (alpha_a/r_a) B_a A_a x

Experts are computed densely -- every expert sees every token, weighted by its gate
(0 for experts outside the top-k) -- as *one* LoRA of rank ``sum_i r_i`` whose rank
channels are scaled per token: ``u = x A_cat^T``, ``z += (u * w(x)) B_cat^T`` with
``w(x)`` the gate of each channel's expert times its ``alpha_i/r_i``. Two matrix products
whatever the number of experts, and no expert ever goes unused in a step (which is what
makes sparse MoE training hang under data parallelism).

Routers (``router``):

* ``topk``  -- ``p = softmax(W_g x)``, keep the top-k, renormalise (MoELoRA, vanilla MoE-LoRA).
* ``soft``  -- ``g = softmax(W_g x / tau)`` over all specialists, ``tau = exp(log_tau)`` learned
  (Med-MoE-LoRA's soft merging).
* ``route`` -- ``g = onehot(route of the question)``: one LoRA per specialty route
  (Multi-LoRA); each item trains only its route's expert, inference switches by route.

Med-MoE-LoRA's layer schedule: ``N_l = N_min + floor((N_max - N_min) (d / L)^gamma)``
specialists at decoder layer ``l = 1..L``, with ``d = l`` (``dense_end: top``, the paper's
asymmetric allocation) or ``d = L + 1 - l`` (``bottom``: the mirror image, its ablation).

Precision: with a half-precision base model the experts and router keep fp32 parameters
(master weights) and compute in the input's dtype.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ...tags import SPECIALTIES
from ..inject import InjectedLinear, adapter_dtype
from ..routing import RoutingState, topk_mask

MOE_LOSSES = ("balance", "var", "anchor", "con")
PARAMETER_LOSSES = frozenset({"anchor"})  # depends on weights only: once per optimizer step
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def experts_at_layer(layer: int, n_layers: int, n_min: int, n_max: int, gamma: float, dense_end: str = "top") -> int:
    """Med-MoE-LoRA's schedule ``N_l = N_min + floor((N_max - N_min) (d / L)^gamma)``, l = 1..L;
    ``d = l`` with the dense end at the top, ``d = L + 1 - l`` at the bottom."""
    depth = layer if dense_end == "top" else n_layers + 1 - layer
    return n_min + math.floor((n_max - n_min) * (depth / n_layers) ** gamma)


def layer_ranks(method, name: str, n_layers: int) -> tuple[list[int], list[float]]:
    """Expert ranks (anchors first, then specialists) and alphas of module ``name``."""
    m = method
    if m.n_min is not None:
        found = _LAYER_INDEX.search(f".{name}.")
        layer = int(found.group(1)) + 1 if found else n_layers
        n_spec = experts_at_layer(layer, n_layers, m.n_min, m.n_max, m.gamma, m.dense_end)
    else:
        n_spec = len(SPECIALTIES) if m.router == "route" and m.n_experts == 0 else m.n_experts
    spec_ranks = [m.ranks[i % len(m.ranks)] for i in range(n_spec)]
    ranks = [m.anchor_rank] * m.n_anchor + spec_ranks
    alphas = [m.alpha_ratio * r if m.alpha_ratio else m.alpha for r in ranks]
    return ranks, alphas


class ExpertQueue(nn.Module):
    """Fixed-size FIFO ring of detached expert representations and their expert labels."""

    def __init__(self, size: int, dim: int, device=None, dtype=torch.float32):
        super().__init__()
        self.size = size
        self.register_buffer("items", torch.zeros(size, dim, device=device, dtype=dtype), persistent=False)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    @torch.no_grad()
    def push(self, reps: torch.Tensor, labels: torch.Tensor) -> None:
        """Append rows (oldest entries are overwritten first)."""
        n = reps.shape[0]
        if n >= self.size:
            reps, labels, n = reps[-self.size:], labels[-self.size:], self.size
        idx = (self.ptr + torch.arange(n, device=self.items.device)) % self.size
        self.items[idx] = reps.detach().to(self.items.device, self.items.dtype)
        self.labels[idx] = labels.to(self.labels.device)
        self.ptr.copy_((self.ptr + n) % self.size)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot and its label; empty slots have label -1 (the loss masks them out)."""
        return self.items, self.labels


class LoraMixtureLinear(InjectedLinear):
    """``nn.Linear`` plus a mixture of LoRA experts (see the module docstring)."""

    def __init__(self, base: nn.Linear, *, ranks: list[int], alphas: list[float], n_anchor: int, router: str,
                 top_k: int, init_tau: float, learn_tau: bool, dropout: float, losses: tuple[str, ...],
                 gate_contrast: bool, con_temperature: float, queue_size: int, state: RoutingState, name: str = ""):
        super().__init__(base, state, name)  # routing_out: this training forward's loss inputs (moe_losses)
        if router not in ("topk", "soft", "route"):
            raise ValueError(f"router must be topk, soft or route, got {router!r}")
        self.pending_push: tuple | None = None  # queue entries of the last forward, pushed once the step is done
        self.n_anchor, self.n_spec = n_anchor, len(ranks) - n_anchor
        if self.n_spec < 1:
            raise ValueError("a mixture needs at least one routed (specialist) expert")
        if router == "topk" and not 1 <= top_k <= self.n_spec:
            raise ValueError(f"top_k must be in 1..{self.n_spec}, got {top_k}")
        self.router_kind, self.top_k = router, top_k
        self.losses, self.gate_contrast, self.con_temperature = losses, gate_contrast, con_temperature
        self.ranks = list(ranks)  # anchors first, then specialists
        d_in, d_out = base.in_features, base.out_features
        device, dtype = base.weight.device, adapter_dtype(base.weight.dtype)
        total = sum(ranks)
        self.lora_A = nn.Parameter(torch.empty(total, d_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, total, device=device, dtype=dtype))
        self.register_buffer("expert_of_channel", torch.tensor(
            [i for i, r in enumerate(ranks) for _ in range(r)], device=device), persistent=False)
        self.register_buffer("channel_scale", torch.tensor(
            [a / r for a, r in zip(alphas, ranks) for _ in range(r)], device=device, dtype=torch.float32),
            persistent=False)
        # eager channel weights w = g @ spec_to_channel + anchor_scale (channel_weights): each
        # specialist gate spread over its rank channels times alpha_i/r_i, plus the always-on
        # anchors' alpha_a/r_a; spec_to_channel also selects expert i's channels for L_con
        is_anchor = self.expert_of_channel < n_anchor
        spec = torch.arange(n_anchor, len(ranks), device=device)
        self.register_buffer("spec_to_channel", (self.expert_of_channel[None, :] == spec[:, None]).float()
                             * self.channel_scale, persistent=False)  # [n_spec, sum r]
        self.register_buffer("anchor_scale", self.channel_scale * is_anchor, persistent=False)  # [sum r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(d_in, self.n_spec, bias=False, device=device, dtype=dtype) if router != "route" else None
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_tau), device=device)) if router == "soft" and learn_tau \
            else None
        self.fixed_tau = init_tau
        self.queue = ExpertQueue(queue_size, d_out, device=device) if queue_size > 0 else None
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        start = 0
        for r in self.ranks:  # each expert as peft initialises one LoRA (Kaiming-uniform A, zero B)
            nn.init.kaiming_uniform_(self.lora_A[start:start + r], a=math.sqrt(5))
            start += r
        nn.init.zeros_(self.lora_B)

    @property
    def tau(self) -> torch.Tensor | float:
        return self.log_tau.exp() if self.log_tau is not None else self.fixed_tau

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Specialist gates ``g`` [B, T, n_spec] and router probabilities ``p`` (None for ``route``;
        for ``topk`` only when the balance loss needs them). ``route`` gates are per question:
        ``[B, 1, n_spec]``, broadcast over tokens."""
        if self.router_kind == "route":
            st = self.state
            if st.specialty is None or st.specialty.shape[0] != x.shape[0]:
                raise RuntimeError(f"{self.name}: the route router needs set_routing(...) with the batch's tags")
            return F.one_hot(st.specialty % self.n_spec, self.n_spec).float()[:, None, :], None
        logits = F.linear(x, self.router.weight.to(x.dtype)).float()
        if self.router_kind == "soft":
            p = torch.softmax(logits / self.tau, dim=-1)
            return p, p
        # softmax over the top-k logits, 0 elsewhere. Compiled: a masked softmax whose mask
        # (topk_mask) fuses with it; eagerly: topk + scatter, fewer operations
        if torch.compiler.is_compiling():
            keep = topk_mask(logits, self.top_k).bool()
            g = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
        else:
            top = logits.topk(self.top_k, dim=-1)
            g = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        return g, (torch.softmax(logits, dim=-1) if "balance" in self.losses else None)

    def channel_weights(self, g: torch.Tensor) -> torch.Tensor:
        """``w`` [..., sum r]: each rank channel's gate times its ``alpha_i/r_i`` (anchors: gate 1).

        Eagerly one addmm, ``g @ spec_to_channel + anchor_scale`` (an mm in the backward; a
        gather's backward is a slow scatter-add). Compiled, the gather itself: the compiler
        fuses it into the kernels around it, where the addmm is a library call each way.
        """
        if torch.compiler.is_compiling():
            expert_w = torch.cat([g.new_ones(*g.shape[:-1], self.n_anchor), g], dim=-1)  # anchors always on
            return expert_w[..., self.expert_of_channel] * self.channel_scale
        flat = torch.addmm(self.anchor_scale, g.reshape(-1, g.shape[-1]), self.spec_to_channel)
        return flat.reshape(*g.shape[:-1], flat.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, p = self.gates(x)
        w = self.channel_weights(g).to(x.dtype)  # [B, T, sum r] ([B, 1, sum r] for route)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        out = self.base(x) + ((self.dropout(x) @ a.T) * w) @ b.T
        if self.training and self.losses:
            self.keep_for_losses(x, g, p)
        if self.state.record:
            self.state.records[self.name] = {"gates": g.detach().expand(*x.shape[:2], -1)}
        return out

    # ------------------------------------------------------------------------- losses
    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The batch's prompt mask, if set_routing gave one for this input's shape."""
        m = self.state.prompt_mask
        ok = m is not None and m.shape == x.shape[:2] and self.state.pool_weights is not None
        return m if ok else None

    def keep_for_losses(self, x: torch.Tensor, g: torch.Tensor, p: torch.Tensor | None) -> None:
        """This forward's loss terms, kept in ``routing_out`` for :func:`moe_losses`."""
        st = self.state
        mask = self._token_mask(x)
        if mask is None:
            return
        out: dict = {}
        if "balance" in self.losses or "var" in self.losses:  # computed for all modules together (gate_losses)
            out["gates"] = (g, p if "balance" in self.losses else None)
        if "anchor" in self.losses and self.n_anchor and st.parameter_losses:
            out["anchor"] = self._anchor_norm()
        if "con" in self.losses:  # the representations of all modules are computed together (contrastive_losses)
            out["con"] = self.contrast_inputs(x, g)
        self.routing_out = out

    def _anchor_norm(self) -> torch.Tensor:
        """``sum_a ||B_a A_a||_F^2`` through the r x r Gram matrices (never the d_out x d_in product)."""
        total = self.lora_A.new_zeros((), dtype=torch.float32)
        start = 0
        for r in self.ranks[: self.n_anchor]:
            a = self.lora_A[start:start + r].float()
            b = self.lora_B[:, start:start + r].float()
            total = total + ((b.T @ b) * (a @ a.T)).sum()
            start += r
        return total

    def contrast_inputs(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``L_con`` needs from this forward: the mean prompt input ``h`` [B, d_in] (one
        pooling shared by the modules reading x) and, for SparseDoctor, the mean prompt gates
        ``gbar`` [B, n_spec]."""
        h = self.state.pooled(x)
        gbar = (g * self.state.pool_weights.unsqueeze(-1).to(g.dtype)).sum(1) if self.gate_contrast else None
        return h, gbar

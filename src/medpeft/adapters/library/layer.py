"""A frozen (or fresh) library of K LoRAs in one layer, mixed per question or per token.

For a target linear layer and token x::

    z = W0 x + sum_k c_k(x) (alpha_k / r_k) B_k A_k x

computed densely as *one* LoRA of rank ``K r`` whose rank channels are scaled per token:
``u = x A_cat^T``, ``z += (u * w) B_cat^T`` with ``w`` each channel's coefficient ``c_k`` times
``alpha_k / r_k`` -- two matrix products whatever K (the same layout as the LoRA mixtures of
experts in ``moe/layer.py``). With ``c`` one-hot on adapter k this is exactly peft's LoRA
``k`` (``B_k(A_k x) * alpha/r``, dropout off at evaluation).

Coefficients (``router``):

* ``route`` -- ``c = onehot(adapter of the question's route)`` from its tags (the library's own
  oracle routing); a route the library has no adapter for gets the uniform mean ``1/K``.
* ``topk``  -- a per-token gate ``l = W_g x`` [K]; ``c = softmax(topk(l) / T)`` over the k
  largest logits, 0 elsewhere (MeteoRA's and LoRA-Mixer's routers; their losses differ).

Why not peft's own multi-adapter LoRA: peft mixes adapters per *sample* (``adapter_names``)
or merges them with fixed weights (``add_weighted_adapter``); a per-token, trained gate over
K frozen adapters has no peft layer (Arrow's, which peft has, is used as is in ``arrow/``).

The library's weights are buffers of the router families (frozen, not saved with the router)
and parameters of ``lora-library`` itself when built fresh.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...tags import OPERATIONS
from ..inject import InjectedLinear, adapter_dtype
from ..routing import RoutingState, topk_mask


class LibraryState(RoutingState):
    """Routing state of a library layer: each question's adapter, from its tags (per batch)."""

    route_table: torch.Tensor | None = None  # [n_specialties * n_operations] adapter index, -1 = none
    n_adapters: int = 1
    route: torch.Tensor | None = None  # [B] adapter index of each question (-1: none)
    route_onehot: torch.Tensor | None = None  # [B, 1, K] oracle coefficients
    forced: int | None = None  # every question uses this adapter (-1: none, the bare base model)

    def prepare_batch(self) -> None:
        if self.forced is not None and self.specialty is not None:
            onehot = torch.zeros(self.specialty.shape[0], 1, self.n_adapters, device=self.specialty.device)
            if self.forced >= 0:
                onehot[..., self.forced] = 1.0
            self.route, self.route_onehot = None, onehot
            return
        if self.route_table is None or self.specialty is None:
            self.route = self.route_onehot = None
            return
        table = self.route_table.to(self.specialty.device)
        self.route = table[self.specialty * len(OPERATIONS) + self.operation]
        known = self.route >= 0
        onehot = F.one_hot(self.route.clamp(min=0), self.n_adapters).float()
        uniform = torch.full_like(onehot, 1.0 / self.n_adapters)
        self.route_onehot = torch.where(known[:, None], onehot, uniform)[:, None, :]


class LibraryLinear(InjectedLinear):
    """``nn.Linear`` plus K LoRAs of rank ``r`` mixed by ``router`` (module docstring)."""

    def __init__(self, base: nn.Linear, *, n_adapters: int, r: int, scales: list[float], router: str,
                 top_k: int = 1, temperature: float = 1.0, trainable_library: bool = False,
                 dropout: float = 0.0, keep_logits: bool = False, state: LibraryState, name: str = ""):
        super().__init__(base, state, name)
        if router not in ("route", "topk"):
            raise ValueError(f"router must be route or topk, got {router!r}")
        if router == "topk" and not 1 <= top_k <= n_adapters:
            raise ValueError(f"top_k must be in 1..{n_adapters} (the library's adapters), got {top_k}")
        self.n_adapters, self.r, self.router_kind = n_adapters, r, router
        self.top_k, self.temperature, self.keep_logits = top_k, temperature, keep_logits
        d_in, d_out = base.in_features, base.out_features
        device, dtype = base.weight.device, adapter_dtype(base.weight.dtype)
        a = torch.empty(n_adapters * r, d_in, device=device, dtype=dtype)
        b = torch.zeros(d_out, n_adapters * r, device=device, dtype=dtype)
        if trainable_library:
            self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
            if device.type != "meta":
                for k in range(n_adapters):  # each adapter as peft initialises one LoRA
                    nn.init.kaiming_uniform_(self.lora_A[k * r:(k + 1) * r], a=math.sqrt(5))
        else:  # frozen library weights: filled by load_library, never trained or saved by the router
            self.register_buffer("lora_A", a.zero_(), persistent=False)
            self.register_buffer("lora_B", b, persistent=False)
        self.register_buffer("channel_scale", torch.tensor(scales, device=device, dtype=torch.float32)
                             .repeat_interleave(r), persistent=False)  # [K r]: alpha_k / r_k per channel
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate = nn.Linear(d_in, n_adapters, bias=False, device=device, dtype=dtype) if router == "topk" else None

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``c`` [B, T or 1, K] and the gate logits [B, T, K] (None for ``route``)."""
        if self.router_kind == "route":
            st = self.state
            if st.route_onehot is None or st.route_onehot.shape[0] != x.shape[0]:
                raise RuntimeError(f"{self.name}: library routing needs set_routing(...) with the batch's tags")
            return st.route_onehot, None
        logits = F.linear(x, self.gate.weight.to(x.dtype)).float()
        scaled = logits / self.temperature
        if torch.compiler.is_compiling():  # a masked softmax the compiler fuses (routing.topk_mask)
            keep = topk_mask(scaled, self.top_k).bool()
            c = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        else:
            top = scaled.topk(self.top_k, dim=-1)
            c = torch.zeros_like(scaled).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        return c, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, logits = self.coefficients(x)
        w = (c.repeat_interleave(self.r, dim=-1) * self.channel_scale).to(x.dtype)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        out = self.base(x) + ((self.dropout(x) @ a.T) * w) @ b.T
        if self.training and self.keep_logits and logits is not None:
            self.routing_out = logits  # the router families' losses read them (with the prompt mask)
        if self.state.record and self.state.forced is None:  # a forced adapter routes nothing to audit
            self.state.records[self.name] = {"gates": c.detach().expand(*x.shape[:2], -1)}
        return out

"""LoRA mixtures of experts: MoELoRA, SparseDoctor, Med-MoE-LoRA, vanilla MoE-LoRA, Multi-LoRA.

One layer type covers them all. For a target linear layer and token x::

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

Auxiliary losses (weights ``l_*``; each averaged over modules, logged separately)::

    L_balance = N sum_i f_i P_i        f_i: share of top-k slots given to expert i, P_i: mean p_i  (Switch)
    L_var     = Var_i( mean_tokens g_i )                                         (Med-MoE-LoRA L_aux)
    L_anchor  = sum_a ||B_a A_a||_F^2  = sum_a tr((B_a^T B_a)(A_a A_a^T))        (anchors stay near the base)
    L_con     = SupCon over expert representations, labels = expert index       (MoELoRA)

For ``L_con`` the representation of expert i on question b is its output on the mean
prompt input, ``o_bi = B_i A_i h_b`` (the mean of ``B_i A_i x`` over prompt tokens, by
linearity), L2-normalised. With temperature ``t``::

    L_con = mean_{(b,i)} -1/|P(b,i)| sum_{(c,i) in P(b,i)} log( exp(o_bi.o_ci/t) / sum_{(c,j) != (b,i)} exp(o_bi.o_cj/t) )

positives ``P(b,i)``: the same expert on the other questions (and in the queue); every
other representation is a negative. **SparseDoctor** (``gate_contrast: true``) weights
each representation by the question's mean gate of that expert, ``o_bi = gbar_bi B_i A_i
h_b``, so the contrastive objective also supervises the router, and keeps an **expert
memory queue** per module: a fixed-size FIFO ring of past (detached) representations with
their expert labels, used as extra positives/negatives so the term needs no large batch.
The queue is updated after each optimizer micro-step with that forward's representations
(``commit_queues``); it holds no gradient and its memory is fixed. Slots not yet filled
carry label -1 and are masked out of the loss, so the queue always has one shape (no host
sync to count entries, no recompilation under ``torch.compile``).

Precision: with a half-precision base model the experts and router keep fp32 parameters
(master weights) and compute in the input's dtype; ``L_con`` runs in fp32, for all modules
of one shape at once (:func:`contrastive_losses`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..tags import SPECIALTIES
from .inject import adapter_dtype
from .routing import RoutingState, topk_mask

MOE_LOSSES = ("balance", "var", "anchor", "con")


def experts_at_layer(layer: int, n_layers: int, n_min: int, n_max: int, gamma: float) -> int:
    """Med-MoE-LoRA's schedule ``N_l = N_min + floor((N_max - N_min) (l / L)^gamma)``, l = 1..L."""
    return n_min + math.floor((n_max - n_min) * (layer / n_layers) ** gamma)


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
        self.items[idx] = reps.detach().to(self.items.dtype)
        self.labels[idx] = labels
        self.ptr.copy_((self.ptr + n) % self.size)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot and its label; empty slots have label -1 (the loss masks them out)."""
        return self.items, self.labels


def supcon(reps: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor | None, bank_labels: torch.Tensor | None,
           temperature: float) -> torch.Tensor:
    """Supervised contrastive loss of ``reps`` [n, d] (normalised) against themselves and a bank."""
    keys = reps if bank is None or bank.numel() == 0 else torch.cat([reps, bank.to(reps.dtype)])
    key_labels = labels if bank_labels is None or bank_labels.numel() == 0 else torch.cat([labels, bank_labels])
    return supcon_from_similarities((reps @ keys.T).unsqueeze(0), labels, key_labels, temperature)


def supcon_from_similarities(sims: torch.Tensor, labels: torch.Tensor, key_labels: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """The SupCon loss from stacked similarity matrices ``sims`` [M, n, n + q] (rows: the n
    representations, columns: themselves then the bank), averaged over the M modules.
    ``key_labels``: [n + q], or [M, n + q] when the modules' banks differ."""
    n = sims.shape[1]
    key_labels = key_labels.reshape(-1, 1, sims.shape[2])  # [1 or M, 1, n + q]
    self_mask = torch.zeros(sims.shape[1:], dtype=torch.bool, device=sims.device)
    self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=sims.device)
    self_mask = self_mask | (key_labels < 0)  # empty queue slots are neither positives nor negatives
    logits = (sims / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    positive = (labels[:, None] == key_labels) & ~self_mask
    n_pos = positive.sum(-1)  # [1 or M, n]
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(-1) / n_pos.clamp(min=1)  # [M, n]
    has = (n_pos > 0).to(per_anchor.dtype)  # anchors without a positive do not count (no host sync)
    return ((per_anchor * has).sum(-1) / has.sum(-1).clamp(min=1)).mean()


def expert_representations(h: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                           spec_to_channel: torch.Tensor, gbar: torch.Tensor | None) -> torch.Tensor:
    """Normalised ``o_bi = gbar_bi (alpha_i/r_i) B_i A_i h_b`` of M same-shape modules at once.

    ``h`` [M, B, d_in] mean prompt inputs, ``lora_a`` [M, R, d_in], ``lora_b`` [M, d_out, R],
    ``spec_to_channel`` [M, n_spec, R] (expert i's channels times alpha_i/r_i), ``gbar``
    [M, B, n_spec] mean prompt gates or None (MoELoRA: 1). Returns [M, B * n_spec, d_out]
    (rows: question-major, expert-minor), in fp32.
    """
    u = torch.bmm(h, lora_a.transpose(1, 2))  # [M, B, R]
    per_expert = u[:, :, None, :] * spec_to_channel[:, None]  # [M, B, n_spec, R]
    o = torch.bmm(per_expert.flatten(1, 2), lora_b.transpose(1, 2))  # [M, B * n_spec, d_out]
    if gbar is not None:
        o = o * gbar.flatten(1, 2).unsqueeze(-1)
    return F.normalize(o, dim=-1)


def contrastive_losses(layers: list["LoraMixtureLinear"], method) -> dict[str, torch.Tensor]:
    """``L_con`` of the modules that kept contrast inputs in this forward, averaged over them.

    Modules of one shape (q, k/v, o, gate/up, down) go through :func:`expert_representations`
    and the similarities among this batch's representations as one stack, so the term costs a
    few kernels per shape and forward instead of per module (launch-bound on a GPU otherwise,
    docs/performance.md); only the products with each module's queue stay per module.
    In fp32, also under mixed precision (small products; normalised vectors over a temperature).
    """
    if not layers:
        return {}
    groups: dict[tuple, list] = {}
    for layer in layers:
        h = layer.routing_out["con"][0]
        key = (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.n_spec, tuple(h.shape),
               layer.queue.size if layer.queue is not None else 0)
        groups.setdefault(key, []).append(layer)
    total = 0.0
    with torch.autocast(layers[0].lora_A.device.type, enabled=False):
        for members in groups.values():
            inputs = [m.routing_out["con"] for m in members]
            gbars = [g for _, g in inputs]
            reps = expert_representations(
                torch.stack([h for h, _ in inputs]).float(), torch.stack([m.lora_A for m in members]).float(),
                torch.stack([m.lora_B for m in members]).float(), torch.stack([m.spec_to_channel for m in members]),
                torch.stack(gbars).float() if gbars[0] is not None else None)
            n_questions = inputs[0][0].shape[0]
            labels = torch.arange(members[0].n_spec, device=reps.device).repeat(n_questions)  # expert index
            sims, key_labels = torch.bmm(reps, reps.transpose(1, 2)), labels
            if members[0].queue is not None:  # each module's memory queue: extra positives/negatives
                # one product per module against its own queue: stacking the queues would copy
                # all of them (GBs for an 8B model) every micro-batch and keep the copy for backward
                banks = [m.queue.filled() for m in members]
                sims = torch.cat([sims, torch.stack([r @ b.to(r.dtype).T for r, (b, _) in zip(reps, banks)])], dim=2)
                key_labels = torch.cat([labels.expand(len(members), -1),
                                        torch.stack([lab for _, lab in banks])], dim=1)
                for m, r in zip(members, reps.detach()):
                    m.pending_push = (r, labels)
            total = total + len(members) * supcon_from_similarities(sims, labels, key_labels, method.con_temperature)
    return {"con": total / len(layers)}


class LoraMixtureLinear(nn.Module):
    """``nn.Linear`` plus a mixture of LoRA experts (see the module docstring)."""

    def __init__(self, base: nn.Linear, *, ranks: list[int], alphas: list[float], n_anchor: int, router: str,
                 top_k: int, init_tau: float, learn_tau: bool, dropout: float, losses: tuple[str, ...],
                 gate_contrast: bool, con_temperature: float, queue_size: int, state: RoutingState, name: str = ""):
        super().__init__()
        if router not in ("topk", "soft", "route"):
            raise ValueError(f"router must be topk, soft or route, got {router!r}")
        self.base, self.name, self.state = base, name, state
        self.routing_out: dict | None = None  # this training forward's loss inputs (moe_losses reads them)
        self.pending_push: tuple | None = None  # queue entries to commit after backward
        if state is not None:
            state.register(self)
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
            self._aux_losses(x, g, p)
        if self.state.record:
            self.state.records[self.name] = {"gates": g.detach().expand(*x.shape[:2], -1)}
        return out

    # ------------------------------------------------------------------------- losses
    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The batch's prompt mask, if set_routing gave one for this input's shape."""
        m = self.state.prompt_mask
        ok = m is not None and m.shape == x.shape[:2] and self.state.pool_weights is not None
        return m if ok else None

    def _aux_losses(self, x: torch.Tensor, g: torch.Tensor, p: torch.Tensor | None) -> None:
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


def commit_queues(state: RoutingState) -> None:
    """Push the last forward's expert representations into each module's memory queue."""
    for layer in state.layers:
        if getattr(layer, "pending_push", None) is not None:
            layer.queue.push(*layer.pending_push)
            layer.pending_push = None


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class MoeLayerFactory:
    method: object
    n_layers: int

    def ranks_for(self, name: str) -> tuple[list[int], list[float]]:
        m = self.method
        if m.n_min is not None:
            found = _LAYER_INDEX.search(f".{name}.")
            layer = int(found.group(1)) + 1 if found else self.n_layers
            n_spec = experts_at_layer(layer, self.n_layers, m.n_min, m.n_max, m.gamma)
        else:
            n_spec = len(SPECIALTIES) if m.router == "route" and m.n_experts == 0 else m.n_experts
        spec_ranks = [m.ranks[i % len(m.ranks)] for i in range(n_spec)]
        ranks = [m.anchor_rank] * m.n_anchor + spec_ranks
        alphas = [m.alpha_ratio * r if m.alpha_ratio else m.alpha for r in ranks]
        return ranks, alphas

    def __call__(self, name: str, base: nn.Linear, state: RoutingState) -> LoraMixtureLinear:
        m = self.method
        ranks, alphas = self.ranks_for(name)
        losses = tuple(k for k in MOE_LOSSES if getattr(m, f"l_{k}") > 0)
        return LoraMixtureLinear(base, ranks=ranks, alphas=alphas, n_anchor=m.n_anchor, router=m.router,
                                 top_k=m.top_k, init_tau=m.tau, learn_tau=m.learn_tau, dropout=m.dropout,
                                 losses=losses, gate_contrast=m.gate_contrast, con_temperature=m.con_temperature,
                                 queue_size=m.queue_size, state=state, name=name)


def gate_losses(layers: list[LoraMixtureLinear], prompt_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``L_balance`` and ``L_var`` of the modules that kept their gates, each a mean over them.

    Over the prompt tokens: ``gbar_i`` / ``P_i`` the mean gate / router probability of expert
    i, ``f_i`` its share of top-k slots; ``L_balance = N sum_i f_i P_i`` and ``L_var =
    Var_i(gbar_i)`` per module. Modules with gates of one shape are stacked, so the terms cost
    a few operations per shape and forward instead of ~15 per module.
    """
    if not layers:
        return {}
    m = prompt_mask.to(torch.float32)[:, :, None]  # [B, T, 1]
    n_tok = m.sum().clamp(min=1)
    groups: dict[tuple, list] = {}
    for layer in layers:
        g, p = layer.routing_out["gates"]
        key = (tuple(g.shape), p is not None, "var" in layer.losses, layer.top_k, layer.n_spec)
        groups.setdefault(key, []).append(layer)
    balance, var = [], []
    for (_, with_p, with_var, top_k, n_spec), members in groups.items():
        gates = torch.stack([layer.routing_out["gates"][0] for layer in members]).float()  # [M, B, T, n]
        if with_var:
            var.append(((gates * m).sum((1, 2)) / n_tok).var(-1, unbiased=False))
        if with_p:
            probs = torch.stack([layer.routing_out["gates"][1] for layer in members]).float()
            p_mean = (probs * m).sum((1, 2)) / n_tok
            f = ((gates > 0).float() * m).sum((1, 2)) / (n_tok * max(top_k, 1))
            balance.append(n_spec * (f * p_mean).sum(-1))
    return {k: torch.cat(v).mean() for k, v in (("balance", balance), ("var", var)) if v}


def moe_losses(state: RoutingState, method) -> dict[str, torch.Tensor]:
    """Every auxiliary loss of the last forward, each a mean over the modules that reported it."""
    reported = [m for m in state.layers if m.routing_out is not None]
    # before collect(), which clears routing_out
    con = contrastive_losses([m for m in reported if "con" in m.routing_out], method)
    gated = gate_losses([m for m in reported if "gates" in m.routing_out], state.prompt_mask)
    terms: dict[str, list[torch.Tensor]] = {}
    for out in state.collect():
        for key, value in out.items():
            if key not in ("con", "gates"):
                terms.setdefault(key, []).append(value)
    return {**{k: torch.stack(v).mean() for k, v in terms.items()}, **gated, **con}


def moe_aux_loss(aux: dict[str, torch.Tensor], method, share: float) -> torch.Tensor | None:
    """``sum_k l_k L_k``; batch terms weighted by the micro-batch's share, ``anchor`` (weights only) by 1."""
    terms = [getattr(method, f"l_{k}") * v * (1.0 if k == "anchor" else share) for k, v in aux.items()]
    return torch.stack(terms).sum() if terms else None

"""BiRG-LoRA: a biaxial rank-gated LoRA layer (and the generic rank-wise control).

For a target linear layer ``z = W0 h``, per question x::

    z = W0 h + rho(x) * (alpha / R) * B diag(zeta(x)) A h
    a(x)    = a_h(h_x) + a_s[s(x)] + a_o[o(x)] + a_so[s(x), o(x)]     (gate logits, R)
    p(x)    = softmax(a(x) / tau)
    zeta(x) = hard_topk(p, kappa) + p - stopgrad(p)                    (straight-through)
    rho(x)  = sigmoid(w_rho . h_x + b_rho)

``h_x`` is the mean of *this module's input* over the prompt tokens of question x (never
the answer tokens), ``a_h`` is ``Linear(d_in -> R)``, ``a_s, a_o, a_so`` are learned
R-vectors indexed by the specialty tag, the operation tag and their pair (tables include
``unknown``). Everything is per module. Flags give the ablations: ``hidden_gate=False``
(clinical-only gate), ``clinical_gate=False`` (hidden-only gate; with ``injection=False``
and no orth/axis losses this is the ``rankwise`` control), ``injection=False``
(``rho = 1``), ``kappa`` (top-k).

Parameter layout (fused for speed, same count as separate layers): ``gate_in`` is one
``Linear(d_in -> R + 1)`` whose first R outputs are ``a_h`` and whose last is the rho
logit (``R`` outputs without injection, ``1`` without the hidden branch); ``gate_tags`` is
one ``[8 + 9 + 8*9, R]`` table holding ``a_s`` (rows 0-7), ``a_o`` (8-16) and ``a_so``
(17-88, row ``17 + 9 s + o``), so a question's clinical logits are the sum of three rows.

Auxiliary losses, computed inside the forward pass from this batch (so they also work
when parameters are sharded), averaged over modules by the trainer::

    L_ent  = -(1/B) sum_b H(p_b) / log R                      (H = entropy; in [-1, 0])
    L_bal  = R * sum_j f_j * P_j,  f_j = (1/(B kappa)) sum_b hard_bj,  P_j = (1/B) sum_b p_bj
    L_orth = mean_{j != k} cos(A_j, A_k)^2 + mean_{j != k} cos(B_:j, B_:k)^2
    L_axis = mean_{s != s'} cos(P^s, P^s') + mean_{o != o'} cos(P^o, P^o')

``L_ent`` rewards spread in each question's routing distribution (against degenerate
one-hot gates); ``L_bal`` is the Switch-Transformer load balance over rank atoms (1 when
usage is uniform, up to R/kappa when collapsed); ``L_orth`` penalises similar rank atoms
(rows of A, columns of B); ``L_axis`` separates the prototype rank distributions
``P^s = mean of p over the batch's questions with specialty s`` (and likewise per
operation) -- 0 when the batch holds fewer than two values of an axis. ``L_orth``
depends on the parameters only, so it is computed once per optimizer step (on the
step's first micro-batch) with weight 1, which gives the same gradient as computing it on
every micro-batch weighted by its share; it is computed after the forward pass for all
modules at once (:func:`routing_losses`).

Precision: with a half-precision base model the adapter's parameters are kept in fp32
(master weights, as ``peft`` does with ``autocast_adapter_dtype``); the low-rank update
runs in the input's dtype and the gate (logits, softmax, top-k, rho) in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..tags import OPERATIONS, SPECIALTIES
from .inject import adapter_dtype
from .routing import RoutingState, small_matmul, topk_mask

N_SPECIALTY, N_OPERATION = len(SPECIALTIES), len(OPERATIONS)
N_TAG_ROWS = N_SPECIALTY + N_OPERATION + N_SPECIALTY * N_OPERATION
AUX_LOSSES = ("ent", "bal", "orth", "axis")
PARAMETER_LOSSES = ("orth",)  # depend on weights only: once per optimizer step


def tag_rows(specialty: torch.Tensor, operation: torch.Tensor) -> torch.Tensor:
    """Rows of ``gate_tags`` a question reads: ``[s, 8 + o, 17 + 9 s + o]`` -> ``[B, 3]``."""
    return torch.stack([specialty, N_SPECIALTY + operation,
                        N_SPECIALTY + N_OPERATION + specialty * N_OPERATION + operation], dim=-1)


def straight_through_topk(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k mask in the forward pass, gradients of ``p`` in the backward pass."""
    hard = topk_mask(p, k)
    return hard + p - p.detach(), hard


def _offdiag_cos2(m: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between distinct rows of ``m`` [R, d]."""
    return OffDiagonalCos2.apply(m.unsqueeze(0))


class OffDiagonalCos2(torch.autograd.Function):
    """``sum over the given matrices of mean_{j != k} cos(m_j, m_k)^2`` over their rows.

    Inputs are stacks ``[K_i, R, d_i]`` of matrices (one stack per shape); all have R rows.
    With ``G = m m^T``, ``n = diag(G)``, ``C_jk = G_jk^2 / (n_j n_k)`` and ``Z = R (R - 1)``: ``L = sum_{j != k} C_jk / Z``, ``dL/dG_jk = 2 G_jk / (n_j n_k Z)`` off
    the diagonal, ``dL/dn_j = -2 sum_{k != j} C_jk / (n_j Z)``, and ``dL/dm = (S + S^T) m``
    with ``S`` those derivatives. The R x R algebra of every matrix runs stacked, so the
    cost is one batched matrix product per stack plus a fixed handful of kernels: written by
    hand because autograd's version costs ~40 kernel launches per module, which dominated a
    GPU step (docs/performance.md).
    """

    @staticmethod
    def forward(ctx, *stacks: torch.Tensor) -> torch.Tensor:
        work = torch.float64 if stacks[0].dtype == torch.float64 else torch.float32  # fp32 at least
        mfs = [m.to(work) for m in stacks]
        with torch.autocast(stacks[0].device.type, enabled=False):  # fp32 even under mixed precision
            g = torch.cat([torch.bmm(mf, mf.transpose(1, 2)) for mf in mfs])  # [K, R, R]
        r = g.shape[-1]
        n = g.diagonal(dim1=1, dim2=2).clamp_min(1e-12)  # [K, R]
        inv = 1.0 / (n.unsqueeze(2) * n.unsqueeze(1))
        off = 1.0 - torch.eye(r, device=g.device, dtype=g.dtype)
        c = g.square() * inv * off
        ctx.save_for_backward(g, n, inv, c, off, *mfs)
        ctx.dtypes = [m.dtype for m in stacks]
        return c.sum() / (r * (r - 1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, n, inv, c, off, *mfs = ctx.saved_tensors
        r = g.shape[-1]
        z = r * (r - 1)
        s = (2.0 / z) * g * inv * off - torch.diag_embed((2.0 / z) * c.sum(2) / n)
        s = (s + s.transpose(1, 2)) * grad
        parts = s.split([mf.shape[0] for mf in mfs])
        return tuple(torch.bmm(sk, mf).to(dtype) for sk, mf, dtype in zip(parts, mfs, ctx.dtypes))


def gate_math(hidden: torch.Tensor | None, clinical: torch.Tensor | None, r: int, kappa: int, tau: float,
              hidden_gate: bool, injection: bool):
    """Gate logits -> (zeta with straight-through gradients, hard mask, p, rho or None)."""
    logits = hidden[:, :r] if hidden_gate else None
    if clinical is not None:
        logits = clinical if logits is None else logits + clinical
    p = torch.softmax(logits / tau, dim=-1)
    zeta, hard = straight_through_topk(p, kappa)
    rho = torch.sigmoid(hidden[:, -1:]) if injection else None
    return zeta, hard, p, rho


def lora_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``((x A^T) * scale) B^T`` with a per-question ``scale`` [B, R] over the rank atoms, in x's dtype."""
    return ((x @ a.T.to(x.dtype)) * scale.unsqueeze(1).to(x.dtype)) @ b.T.to(x.dtype)


class RankGatedLoraLinear(nn.Module):
    """``nn.Linear`` plus a rank-gated LoRA update (see the module docstring)."""

    def __init__(self, base: nn.Linear, *, r: int, kappa: int, alpha: float, tau: float, dropout: float,
                 hidden_gate: bool, clinical_gate: bool, injection: bool, losses: tuple[str, ...],
                 state: RoutingState, name: str = ""):
        super().__init__()
        if not 1 <= kappa <= r:
            raise ValueError(f"kappa must be in 1..r, got kappa={kappa}, r={r}")
        if not (hidden_gate or clinical_gate):
            raise ValueError("the gate needs the hidden branch, the clinical branches, or both")
        self.base, self.name, self.state = base, name, state
        self.routing_out: tuple | None = None  # (p, hard) of the last training forward, for the batch losses
        if state is not None:
            state.register(self)
        self.r, self.kappa, self.scaling, self.tau = r, kappa, alpha / r, tau
        self.losses = losses
        d_in, d_out = base.in_features, base.out_features
        device, dtype = base.weight.device, adapter_dtype(base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.hidden_gate, self.injection = hidden_gate, injection
        n_in = r * hidden_gate + injection
        self.gate_in = nn.Linear(d_in, n_in, device=device, dtype=dtype) if n_in else None
        self.gate_tags = nn.Parameter(torch.zeros(N_TAG_ROWS, r, device=device, dtype=dtype)) if clinical_gate else None
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft / loralib
        nn.init.zeros_(self.lora_B)
        if self.injection:
            nn.init.zeros_(self.gate_in.weight[-1])
            nn.init.zeros_(self.gate_in.bias[-1:])  # rho = 0.5 at the start

    # ------------------------------------------------------------------------- gate
    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(zeta [B, R] with straight-through grads, hard mask [B, R], p [B, R], rho [B, 1])."""
        st = self.state
        if st.pool_weights is None or st.pool_weights.shape != x.shape[:2]:
            raise RuntimeError(
                f"{self.name}: no routing context for an input of shape {tuple(x.shape)}; call "
                "medpeft.adapters.set_routing(model, prompt_mask, specialty, operation) before the forward pass")
        with torch.autocast(x.device.type, enabled=False):  # the gate in fp32, also under mixed precision
            hidden = small_matmul(st.pooled(x), self.gate_in.weight.float().T, self.gate_in.bias.float()) \
                if self.gate_in is not None else None
            # a question's three table rows, summed, as one matmul with the batch's 3-hot tag matrix
            clinical = small_matmul(st.tag_onehot, self.gate_tags.float()) if self.gate_tags is not None else None
            return gate_math(hidden, clinical, self.r, self.kappa, self.tau, self.hidden_gate, self.injection)

    def _aux_losses(self, p: torch.Tensor, hard: torch.Tensor) -> None:
        """Keep this forward's gate for the batch losses, which :func:`routing_losses` computes
        for all modules together, vectorised over modules."""
        if any(k in self.losses for k in ("ent", "bal", "axis")):
            self.routing_out = (p, hard)

    # ------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.freeze and self.name in st.frozen:
            zeta, rho = st.frozen[self.name]  # decoding: the gate of the prefill
        else:
            zeta, hard, p, rho = self.gate(x)
            if st.freeze:
                st.frozen[self.name] = (zeta.detach(), rho.detach() if rho is not None else None)
            if self.training and self.losses:
                self._aux_losses(p, hard)
            if st.record:
                st.records[self.name] = {"hard": hard.detach(), "p": p.detach(),
                                         "rho": rho.detach() if rho is not None else torch.ones_like(p[:, :1])}
        scale = zeta * self.scaling if rho is None else zeta * (rho * self.scaling)
        return self.base(x) + lora_update(self.dropout(x), self.lora_A, self.lora_B, scale)

    def active_update(self, hard_row: torch.Tensor, rho: float) -> torch.Tensor:
        """The weight update of one question: ``rho (alpha/R) B diag(zeta) A`` [d_out, d_in]."""
        return (self.lora_B * (hard_row * rho * self.scaling)) @ self.lora_A

    def extra_repr(self) -> str:
        return (f"r={self.r}, kappa={self.kappa}, tau={self.tau}, hidden_gate={self.hidden_gate}, "
                f"clinical_gate={self.gate_tags is not None}, injection={self.injection}")


def effective_rank(update: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values of ``update`` (1..rank)."""
    s = torch.linalg.svdvals(update.float())
    s = s[s > s.max() * 1e-6] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    q = s / s.sum()
    return float(torch.exp(-(q * q.log()).sum()))


@dataclass
class BirgLayerFactory:
    method: object

    def __call__(self, name: str, base: nn.Linear, state: RoutingState) -> RankGatedLoraLinear:
        m = self.method
        losses = tuple(k for k in AUX_LOSSES if getattr(m, f"l_{k}") > 0)
        return RankGatedLoraLinear(base, r=m.r, kappa=m.kappa, alpha=m.alpha, tau=m.tau, dropout=m.dropout,
                                   hidden_gate=m.hidden_gate, clinical_gate=m.clinical_gate,
                                   injection=m.injection, losses=losses, state=state, name=name)


def routing_losses(state: RoutingState, method) -> dict[str, torch.Tensor]:
    """``L_ent``, ``L_bal``, ``L_axis`` of the last forward and, on a step's first micro-batch
    (``state.parameter_losses``), ``L_orth``; each averaged over modules.

    The gates of every module (all of rank R) are stacked to ``P, H: [M, B, R]`` so each
    loss costs a handful of tensor operations per forward instead of per module; the
    rank atoms of all modules go through :class:`OffDiagonalCos2` as a few same-shape stacks.
    """
    gates = state.collect()
    out = {}
    if method.l_orth > 0 and state.parameter_losses:
        layers = [m for m in state.layers if "orth" in m.losses]
        stacks: dict[tuple, list[torch.Tensor]] = {}
        for m in layers:
            stacks.setdefault(tuple(m.lora_A.shape), []).append(m.lora_A)
        for m in layers:
            stacks.setdefault(("B",) + tuple(m.lora_B.shape), []).append(m.lora_B.T)
        if layers:
            out["orth"] = OffDiagonalCos2.apply(*(torch.stack(v) for v in stacks.values())) / len(layers)
    if not gates:
        return out
    p = torch.stack([g[0] for g in gates])
    hard = torch.stack([g[1] for g in gates])
    r = p.shape[-1]
    if method.l_ent > 0:
        out["ent"] = (p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(r)
    if method.l_bal > 0:
        out["bal"] = r * (hard.mean(1) / method.kappa * p.mean(1)).sum(-1).mean()
    if method.l_axis > 0 and state.specialty is not None:
        averager, pair_weights = state.tag_group_averager()
        n = F.normalize(torch.einsum("gb,mbr->mgr", averager, p), dim=-1)
        out["axis"] = (n @ n.transpose(1, 2) * pair_weights).sum((1, 2)).mean()
    return out


def weighted_aux_loss(aux: dict[str, torch.Tensor], method, share: float = 1.0) -> torch.Tensor | None:
    """``l_ent L_ent + l_bal L_bal + l_orth L_orth + l_axis L_axis`` over the losses present.

    Batch losses are weighted by the micro-batch's ``share`` of the optimizer step;
    parameter losses (computed once per step) by 1.
    """
    terms = [getattr(method, f"l_{k}") * v * (1.0 if k in PARAMETER_LOSSES else share) for k, v in aux.items()]
    return torch.stack(terms).sum() if terms else None


def merge_fixed_gate(model: nn.Module, specialty: int, operation: int) -> nn.Module:
    """Fold each rank-gated layer into a plain ``nn.Linear`` for one (specialty, operation).

    Exact only when the gate depends on the tags alone (no hidden branch) and rho is 1
    (no injection); otherwise the update varies per question and merging is refused.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, RankGatedLoraLinear):
            if module.hidden_gate or module.injection:
                raise ValueError(f"{name}: the gate depends on the input (hidden branch or injection); "
                                 "merging is exact only for a tag-only gate without injection")
            with torch.no_grad():
                rows = tag_rows(torch.tensor([specialty]), torch.tensor([operation])).to(module.lora_A.device)
                logits = module.gate_tags[rows].sum(1)
                hard = straight_through_topk(torch.softmax(logits.float() / module.tau, -1), module.kappa)[1][0]
                merged = nn.Linear(module.base.in_features, module.base.out_features,
                                   bias=module.base.bias is not None, device=module.lora_A.device,
                                   dtype=module.base.weight.dtype)
                merged.weight.copy_(module.base.weight + module.active_update(hard.to(module.lora_A.dtype), 1.0))
                if module.base.bias is not None:
                    merged.bias.copy_(module.base.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, merged)
    return model

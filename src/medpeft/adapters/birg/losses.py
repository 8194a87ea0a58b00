"""BiRG-LoRA's auxiliary losses, each averaged over modules::

    L_ent  = -(1/B) sum_b H(p_b) / log R                      (H = entropy; in [-1, 0])
    L_bal  = R * sum_j f_j * P_j,  f_j = (1/(B kappa)) sum_b hard_bj,  P_j = (1/B) sum_b p_bj
    L_orth = mean_{j != k} cos(A_j, A_k)^2 + mean_{j != k} cos(B_:j, B_:k)^2
    L_axis = mean_{s != s'} cos(P^s, P^s') + mean_{o != o'} cos(P^o, P^o')

``L_ent`` rewards spread in each question's routing distribution (against degenerate
one-hot gates); ``L_bal`` is the Switch-Transformer load balance over rank atoms (1 when
usage is uniform, up to R/kappa when collapsed); ``L_orth`` penalises similar rank atoms
(rows of A, columns of B); ``L_axis`` separates the prototype rank distributions
``P^s = mean of p over the batch's questions with specialty s`` (and likewise per
operation) -- 0 when the batch holds fewer than two values of an axis.

All are computed after the forward pass, for all modules at once: each rank-gated layer
keeps its gate (``p`` and the hard mask) in ``routing_out`` and :func:`birg_losses` stacks
them. ``L_orth`` depends on the parameters only, so it is computed once per optimizer step
(on the step's first micro-batch) with weight 1, which gives the same gradient as
computing it on every micro-batch weighted by its share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...tags import OPERATIONS, SPECIALTIES
from ..routing import RoutingState

AUX_LOSSES = ("ent", "bal", "orth", "axis")
PARAMETER_LOSSES = frozenset({"orth"})  # depend on weights only: once per optimizer step


class OffDiagonalCos2(torch.autograd.Function):
    """``sum over the given matrices of mean_{j != k} cos(m_j, m_k)^2`` over their rows.

    Inputs are stacks ``[K_i, R, d_i]`` of matrices (one stack per shape); all have R rows.
    With ``G = m m^T``, ``n = diag(G)``, ``C_jk = G_jk^2 / (n_j n_k)`` and ``Z = R (R - 1)``:
    ``L = sum_{j != k} C_jk / Z``, ``dL/dG_jk = 2 G_jk / (n_j n_k Z)`` off the diagonal,
    ``dL/dn_j = -2 sum_{k != j} C_jk / (n_j Z)``, and ``dL/dm = (S + S^T) m`` with ``S`` those
    derivatives. The R x R algebra of every matrix runs stacked, so the cost is one batched
    matrix product per stack plus a fixed handful of kernels: written by hand because
    autograd's version costs tens of kernel launches per module, which dominated a GPU step
    (docs/performance.md).
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


def tag_group_averager(state: RoutingState) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tag axes stacked: ``W [G, B]`` averaging rows per tag value (absent values: zero
    rows) and ``[G, G]`` pair weights, ``1/n_pairs(axis)`` on distinct present values of the
    same axis, else 0 -- so ``sum(cos * weights)`` is the sum over axes of the mean prototype
    similarity. Cached for the batch."""
    if "groups" not in state.cache:
        blocks, weights = [], []
        for ids, n_values in ((state.specialty, len(SPECIALTIES)), (state.operation, len(OPERATIONS))):
            onehot = F.one_hot(ids, n_values).float().T  # [G, B]
            counts = onehot.sum(1, keepdim=True)
            present = (counts.squeeze(1) > 0).float()
            pairs = present[:, None] * present[None, :] * (1 - torch.eye(n_values, device=ids.device))
            blocks.append(onehot / counts.clamp(min=1))
            weights.append(pairs / pairs.sum().clamp(min=1))
        state.cache["groups"] = (torch.cat(blocks), torch.block_diag(*weights))
    return state.cache["groups"]


def birg_losses(state: RoutingState, method) -> dict[str, torch.Tensor]:
    """``L_ent``, ``L_bal``, ``L_axis`` of the last forward and, on a step's first micro-batch
    (``state.parameter_losses``), ``L_orth``: each term of non-zero weight, averaged over modules.

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
        averager, pair_weights = tag_group_averager(state)
        n = F.normalize(torch.einsum("gb,mbr->mgr", averager, p), dim=-1)
        out["axis"] = (n @ n.transpose(1, 2) * pair_weights).sum((1, 2)).mean()
    return out

"""Routing audit of rank-gated adapters: what each question's gate selected.

Per question and module: the selected rank atoms, rho, and the effective rank of the
active update ``dW = rho (alpha/R) B[:, S] diag(1) A[S, :]``, defined as ``exp`` of the
entropy of its normalised singular values. The singular values come from the small
``kappa x kappa`` core of two thin QR factorisations (``B_S = Q_B R_B``,
``A_S^T = Q_A R_A``, so ``svd(dW) = svd(R_B R_A^T)`` up to scale), never from the full
``d_out x d_in`` matrix.

Summary: mean rho, mean effective rank, atom usage by specialty x operation (a heatmap),
and the mutual information between tags and selected atoms (``audit_tools``; J = an atom
drawn uniformly from the question's selected atoms), averaged over modules.
"""

from __future__ import annotations

import numpy as np
import torch

from ..audit_tools import AuditResult, Heatmap, cells_json, tag_mutual_information, usage_by_cell
from .layer import RankGatedLoraLinear


def effective_rank(update: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values of ``update`` (1..rank)."""
    s = torch.linalg.svdvals(update.float())
    s = s[s > s.max() * 1e-6] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    q = s / s.sum()
    return float(torch.exp(-(q * q.log()).sum()))


@torch.no_grad()
def active_effective_rank(layer: RankGatedLoraLinear, atoms: torch.Tensor) -> float:
    """Effective rank of ``B[:, S] A[S, :]`` via the QR cores (rho and alpha/R only scale it)."""
    b = layer.lora_B[:, atoms].float()
    a = layer.lora_A[atoms, :].float()
    _, rb = torch.linalg.qr(b)
    _, ra = torch.linalg.qr(a.T)
    return effective_rank(rb @ ra.T)


def audit_atoms(model, routes: dict[str, dict[str, torch.Tensor]], items: list) -> AuditResult:
    """``routes``: per module ``{"hard": [N, R], "rho": [N, 1], "p": [N, R]}`` over ``items``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RankGatedLoraLinear)}
    modules: list[dict] = [{} for _ in items]
    eff_all, rho_all = [], []
    cache: dict[tuple, float] = {}
    for name, rec in routes.items():
        hard = rec["hard"]
        rho = rec["rho"].float().reshape(-1)
        for i in range(len(items)):
            atoms = tuple(int(j) for j in hard[i].nonzero().flatten())
            if (name, atoms) not in cache:
                cache[(name, atoms)] = active_effective_rank(layers[name], torch.tensor(atoms))
            eff = cache[(name, atoms)]
            modules[i][name] = {"atoms": list(atoms), "rho": round(float(rho[i]), 5), "effective_rank": round(eff, 4)}
            eff_all.append(eff)
            rho_all.append(float(rho[i]))
    hard_all = [rec["hard"].numpy() for rec in routes.values()]
    mi = tag_mutual_information(items, hard_all)
    cells = usage_by_cell(items, np.mean(hard_all, axis=0))  # selection frequency, mean over modules
    summary = {
        "n_questions": len(items), "n_modules": len(routes),
        "mean_rho": float(np.mean(rho_all)) if rho_all else None,
        "mean_effective_rank": float(np.mean(eff_all)) if eff_all else None,
        "mutual_information_bits": mi,
        "atom_usage": cells_json(cells),
    }
    headline = (f"audited {len(items)} questions x {len(routes)} modules: mean rho {summary['mean_rho']:.3f}, "
                f"mean effective rank {summary['mean_effective_rank']:.2f}, MI(tags; atoms) specialty "
                f"{mi['specialty']:.3f} / operation {mi['operation']:.3f} / pair {mi['pair']:.3f} bits")
    heatmap = Heatmap("rank_usage.png", cells, "Rank-atom usage (selection frequency, mean over modules)",
                      "rank atom", "fraction of questions selecting the atom")
    return AuditResult(summary, modules, headline, [heatmap])

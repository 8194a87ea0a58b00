"""Routing audit of library layers: which adapter each question used, by specialty x operation.

Per question and module the adapter usage (the mean coefficient over its prompt tokens) and
its top adapter; the usage by cell (heatmap, mean over modules) and the mutual information
between the tags and the adapters (usage as a soft assignment).
"""

from __future__ import annotations

import numpy as np
import torch

from ..audit_tools import AuditResult, Heatmap, cells_json, tag_mutual_information, usage_by_cell


def question_usage(records: dict[str, dict[str, torch.Tensor]], prompt_mask: torch.Tensor) -> dict:
    """``{module: {"usage": [B, K]}}``: each question's mean coefficients over its prompt tokens."""
    w = prompt_mask.float()
    return {name: {"usage": (rec["gates"].float() * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)}
            for name, rec in records.items()}


def audit_adapters(routes: dict[str, dict[str, torch.Tensor]], items: list, names: list[str]) -> AuditResult:
    modules: list[dict] = [{} for _ in items]
    mats = []
    for name, rec in routes.items():
        usage = rec["usage"].numpy()
        mats.append(usage)
        for i in range(len(items)):
            modules[i][name] = {"adapter_usage": usage[i].round(4).tolist(), "top_adapter": names[int(usage[i].argmax())]}
    mean = np.mean(mats, axis=0)
    mi = tag_mutual_information(items, mats)
    top = [names[int(j)] for j in mean.argmax(1)]
    counts = {n: top.count(n) for n in names}
    cells = usage_by_cell(items, mean)
    summary = {"n_questions": len(items), "n_modules": len(routes), "adapters": names,
               "mutual_information_bits": mi, "top_adapter_counts": counts,
               "adapter_usage_by_cell": cells_json(cells)}
    headline = (f"audited {len(items)} questions x {len(routes)} modules over {len(names)} adapters: MI(tags; adapter) "
                f"specialty {mi['specialty']:.3f} / operation {mi['operation']:.3f} / pair {mi['pair']:.3f} bits")
    heatmaps = [Heatmap("adapter_usage.png", cells, "Adapter usage (mean over modules)", "adapter",
                        "mean coefficient over the questions' prompt tokens")]
    return AuditResult(summary, modules, headline, heatmaps)

"""Routing audit of LoRA mixtures of experts.

Per question and module the expert usage (the mean gate over its prompt tokens) and its
top expert; per decoder layer the usage by specialty x operation (heatmaps of the first
and last layers, since Med-MoE-LoRA changes the expert count with depth) and the mutual
information between tags and experts (usage as a soft assignment: ``P(t, e) = (1/N)
sum_i [t_i = t] usage_ie``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..audit_tools import AuditResult, Heatmap, cells_json, tag_mutual_information, usage_by_cell


def question_usage(records: dict[str, dict[str, torch.Tensor]], prompt_mask: torch.Tensor) -> dict:
    """``{module: {"usage": [B, experts]}}``: each question's mean gate over its prompt tokens."""
    w = prompt_mask.float()
    out = {}
    for name, rec in records.items():
        gates = rec["gates"].float()
        out[name] = {"usage": (gates * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)}
    return out


def _decoder_layer(name: str) -> str:
    return ".".join(name.split(".")[:-2])


def audit_experts(routes: dict[str, dict[str, torch.Tensor]], items: list) -> AuditResult:
    modules: list[dict] = [{} for _ in items]
    by_layer: dict[str, list[np.ndarray]] = {}
    for name, rec in routes.items():
        usage = rec["usage"].numpy()
        by_layer.setdefault(_decoder_layer(name), []).append(usage)
        for i in range(len(items)):
            modules[i][name] = {"expert_usage": usage[i].round(4).tolist(), "top_expert": int(usage[i].argmax())}
    mi = tag_mutual_information(items, [rec["usage"].numpy() for rec in routes.values()])
    # modules of one decoder layer share its expert count
    layers = {layer: usage_by_cell(items, np.mean(mats, axis=0)) for layer, mats in by_layer.items()}
    summary = {
        "n_questions": len(items), "n_modules": len(routes),
        "mutual_information_bits": mi,
        "expert_usage_by_layer": {layer: cells_json(cells) for layer, cells in layers.items()},
    }
    headline = (f"audited {len(items)} questions x {len(routes)} modules: MI(tags; experts) specialty "
                f"{mi['specialty']:.3f} / operation {mi['operation']:.3f} / pair {mi['pair']:.3f} bits")
    first, last = next(iter(layers)), list(layers)[-1]
    heatmaps = [Heatmap(f"expert_usage_{which}_layer.png", layers[layer], f"Expert usage, {layer}", "expert",
                        "mean gate over the questions' prompt tokens") for which, layer in (("first", first),
                                                                                             ("last", last))]
    return AuditResult(summary, modules, headline, heatmaps)

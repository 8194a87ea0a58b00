"""Routing audit of a routed run: what each question's gates did, written for people and scripts.

The prompts go through the evaluator's own scoring forward pass with the routing state
recording each module's gate outputs; the method's family reduces them to per-question
values (``MethodFamily.question_routing``) and says what they mean (``MethodFamily.audit``,
e.g. rank atoms, rho and effective rank for BiRG, expert usage for mixtures). Written:
``per_question.jsonl``, ``summary.json`` and the family's usage heatmaps (PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .adapters import family_of
from .adapters.audit_tools import AuditResult, Heatmap
from .data.record import SUMMARY
from .dataset import TaggedRecord
from .evaluate import Evaluator
from .io import atomic_open, write_json, write_jsonl
from .tags import OPERATIONS, SPECIALTIES


def collect_routing(model, method, tokenizer, items: list[TaggedRecord], *, max_length: int = 768,
                    batch_size: int = 16) -> dict[str, dict[str, torch.Tensor]]:
    """Per-question routing values of every module over ``items`` (in item order)."""
    family = family_of(method)
    evaluator = Evaluator(model, tokenizer, max_length=max_length, batch_size=batch_size)
    parts: dict[str, dict[str, list]] = {}
    order: list[int] = []
    was_training = model.training
    model.eval()
    for idx, records, mask in evaluator.recorded_batches(items):
        order += idx
        for name, values in family.question_routing(records, mask).items():
            slot = parts.setdefault(name, {})
            for key, value in values.items():
                slot.setdefault(key, []).append(value.detach().float().cpu())
    model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {name: {key: torch.cat(chunks)[inverse] for key, chunks in values.items()} for name, values in parts.items()}


def audit(model, method, tokenizer, items: list[TaggedRecord], out_dir: Path | None = None, *,
          max_length: int = 768, batch_size: int = 16, plot: bool = True) -> AuditResult:
    """Run the audit; write ``per_question.jsonl``, ``summary.json`` and heatmaps to ``out_dir``."""
    family = family_of(method)
    if not family.routed:
        raise ValueError(f"method {method.name!r} has no routed adapters to audit "
                         "(its outputs do not depend on a per-question gate)")
    routes = collect_routing(model, method, tokenizer, items, max_length=max_length, batch_size=batch_size)
    result = family.audit(model, method, routes, items)
    kinds = {"questions": [i for i, t in enumerate(items) if t.record.question_type != SUMMARY],
             "summaries": [i for i, t in enumerate(items) if t.record.question_type == SUMMARY]}
    if all(kinds.values()):  # QA and summarisation items side by side: what each kind used
        result.summary["by_item_kind"] = {kind: _sub_audit(family, model, method, routes, items, idx)
                                          for kind, idx in kinds.items()}
    from .distributed import processes

    if out_dir is not None and processes().is_main:  # every rank computed the same audit
        out_dir = Path(out_dir)
        rows = [{"id": t.record.id, "benchmark": t.set_name, "specialty": t.tags.specialty,
                 "operation": t.tags.operation, "modules": modules} for t, modules in zip(items, result.modules)]
        write_jsonl(out_dir / "per_question.jsonl", rows)
        write_json(out_dir / "summary.json", result.summary)
        if plot:
            for heatmap in result.heatmaps:
                plot_usage(heatmap, out_dir / heatmap.filename)
    return result


def _sub_audit(family, model, method, routes: dict, items: list, idx: list[int]) -> dict:
    """The family's audit summary over the items ``idx`` only (routes are per item, in order)."""
    pick = torch.tensor(idx, dtype=torch.long)
    sub = {name: {key: value[pick] for key, value in values.items()} for name, values in routes.items()}
    result = family.audit(model, method, sub, [items[i] for i in idx])
    return {"n": len(idx), "headline": result.headline, **result.summary}


def plot_usage(heatmap: Heatmap, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{SPECIALTIES[s]} / {OPERATIONS[o]} (n={n})" for (s, o), (n, _) in heatmap.cells.items()]
    data = np.stack([u for _, u in heatmap.cells.values()]) if heatmap.cells else np.zeros((1, 1))
    fig, ax = plt.subplots(figsize=(5.0 + 0.45 * data.shape[1], 1.6 + 0.32 * len(labels)))  # room for labels
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(data.max())))
    ax.set_xticks(range(data.shape[1]), [str(j) for j in range(data.shape[1])])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(heatmap.xlabel)
    ax.set_ylabel("specialty / operation")
    ax.set_title(heatmap.title, fontsize=10)
    fig.colorbar(im, ax=ax, label=heatmap.colorbar)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)

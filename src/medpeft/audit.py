"""Routing audit of rank-gated adapters: what each question's gate selected, and why it matters.

Per question and module: the selected rank atoms, rho, and the effective rank of the
active update ``dW = rho (alpha/R) B[:, S] diag(1) A[S, :]``, defined as ``exp`` of the
entropy of its normalised singular values. The singular values come from the small
``kappa x kappa`` core of two thin QR factorisations (``B_S = Q_B R_B``,
``A_S^T = Q_A R_A``, so ``svd(dW) = svd(R_B R_A^T)`` up to scale), never from the full
``d_out x d_in`` matrix.

Summary: mean rho, mean effective rank, atom usage by specialty x operation (a PNG
heatmap), and the mutual information between tags and selected atoms::

    I(T; J) = sum_{t,j} P(t,j) log2( P(t,j) / (P(t) P(j)) ),  P(t,j) = (1/N) sum_i [t_i = t] hard_ij / kappa

(J = an atom drawn uniformly from the question's selected atoms), averaged over modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .adapters import set_routing
from .adapters.birg import RankGatedLoraLinear, effective_rank
from .adapters.moe import LoraMixtureLinear
from .adapters.routing import routing_state
from .dataset import TaggedRecord
from .evaluate import left_pad
from .io import write_json, write_jsonl
from .prompts import PromptFormatter
from .tags import OPERATIONS, SPECIALTIES


@torch.no_grad()
def collect_routing(model, tokenizer, items: list[TaggedRecord], *, max_length: int = 768,
                    batch_size: int = 16) -> dict[str, dict[str, torch.Tensor]]:
    """Gate outputs per module for every item: ``{module: {"hard": [N, R], "rho": [N]}}``."""
    if routing_state(model) is None:
        raise ValueError("this model has no routed adapters to audit (lora, dora and full have no gate)")
    fmt = PromptFormatter(tokenizer, max_length)
    device = next(model.parameters()).device
    out: dict[str, dict[str, list]] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        ids, mask = left_pad([fmt.encode_prompt(t.record).input_ids for t in chunk], tokenizer.pad_token_id, device)
        set_routing(model, mask.bool(), torch.tensor([t.tags.specialty_id for t in chunk], device=device),
                    torch.tensor([t.tags.operation_id for t in chunk], device=device), record=True)
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              logits_to_keep=1, use_cache=False)
        for name, rec in routing_state(model).records.items():
            if "gates" in rec:  # a mixture of experts: per-question mean gate over its prompt tokens
                w = mask.to(rec["gates"].dtype)
                usage = (rec["gates"] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
                out.setdefault(name, {"usage": []})["usage"].append(usage.float().cpu())
                continue
            slot = out.setdefault(name, {"hard": [], "rho": []})
            slot["hard"].append(rec["hard"].cpu())
            slot["rho"].append(rec["rho"].float().cpu().reshape(-1))
    model.train(was_training)
    return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in out.items()}


@torch.no_grad()
def active_effective_rank(layer: RankGatedLoraLinear, atoms: torch.Tensor) -> float:
    """Effective rank of ``B[:, S] A[S, :]`` via the QR cores (rho and alpha/R only scale it)."""
    b = layer.lora_B[:, atoms].float()
    a = layer.lora_A[atoms, :].float()
    _, rb = torch.linalg.qr(b)
    _, ra = torch.linalg.qr(a.T)
    return effective_rank(rb @ ra.T)


def mutual_information(tags: np.ndarray, hard: np.ndarray) -> float:
    """I(T; J) in bits, J an atom drawn uniformly from each item's selected atoms."""
    n, _ = hard.shape
    k = hard.sum(1, keepdims=True).clip(min=1)
    joint = np.zeros((int(tags.max()) + 1, hard.shape[1]))
    np.add.at(joint, tags, hard / k)
    joint /= n
    pt, pj = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pt @ pj)[nz])).sum())


def audit(model, tokenizer, items: list[TaggedRecord], out_dir: Path | None = None, *,
          max_length: int = 768, batch_size: int = 16, plot: bool = True) -> dict:
    """Run the audit; write ``per_question.jsonl``, ``summary.json`` and ``rank_usage.png`` to ``out_dir``."""
    routes = collect_routing(model, tokenizer, items, max_length=max_length, batch_size=batch_size)
    if any(isinstance(m, LoraMixtureLinear) for m in model.modules()):
        return audit_experts(routes, items, out_dir, plot=plot)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RankGatedLoraLinear)}
    spec = np.array([t.tags.specialty_id for t in items])
    op = np.array([t.tags.operation_id for t in items])
    pair = spec * len(OPERATIONS) + op
    rows, eff_all, rho_all = [], [], []
    mi = {"specialty": [], "operation": [], "pair": []}
    for name, rec in routes.items():
        hard = rec["hard"].numpy()
        mi["specialty"].append(mutual_information(spec, hard))
        mi["operation"].append(mutual_information(op, hard))
        mi["pair"].append(mutual_information(pair, hard))
    cache: dict[tuple, float] = {}
    for i, item in enumerate(items):
        modules = {}
        for name, rec in routes.items():
            atoms = tuple(int(j) for j in rec["hard"][i].nonzero().flatten())
            key = (name, atoms)
            if key not in cache:
                cache[key] = active_effective_rank(layers[name], torch.tensor(atoms))
            rho = float(rec["rho"][i])
            modules[name] = {"atoms": list(atoms), "rho": round(rho, 5), "effective_rank": round(cache[key], 4)}
            eff_all.append(cache[key])
            rho_all.append(rho)
        rows.append({"id": item.record.id, "benchmark": item.set_name, "specialty": item.tags.specialty,
                     "operation": item.tags.operation, "modules": modules})
    usage = _usage_by_cell(routes, spec, op)
    summary = {
        "n_questions": len(items), "n_modules": len(routes),
        "mean_rho": float(np.mean(rho_all)) if rho_all else None,
        "mean_effective_rank": float(np.mean(eff_all)) if eff_all else None,
        "mutual_information_bits": {k: float(np.mean(v)) for k, v in mi.items()},
        "atom_usage": {f"{SPECIALTIES[s]}|{OPERATIONS[o]}": {"n": n, "usage": u.round(4).tolist()}
                       for (s, o), (n, u) in usage.items()},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_jsonl(out_dir / "per_question.jsonl", rows)
        write_json(out_dir / "summary.json", summary)
        if plot:
            plot_usage(usage, out_dir / "rank_usage.png")
    return summary


def _usage_by_cell(routes, spec: np.ndarray, op: np.ndarray) -> dict[tuple[int, int], tuple[int, np.ndarray]]:
    """Mean selection frequency of each atom (averaged over modules) per (specialty, operation) cell."""
    mean_hard = np.mean([rec["hard"].numpy() for rec in routes.values()], axis=0)  # [N, R]
    cells = {}
    for s, o in sorted(set(zip(spec.tolist(), op.tolist()))):
        sel = (spec == s) & (op == o)
        cells[(s, o)] = (int(sel.sum()), mean_hard[sel].mean(0))
    return cells


def plot_usage(usage, path: Path, title: str = "Rank-atom usage (selection frequency, mean over modules)",
               xlabel: str = "rank atom") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_open

    labels = [f"{SPECIALTIES[s]} / {OPERATIONS[o]} (n={n})" for (s, o), (n, _) in usage.items()]
    data = np.stack([u for _, u in usage.values()]) if usage else np.zeros((1, 1))
    fig, ax = plt.subplots(figsize=(5.0 + 0.45 * data.shape[1], 1.6 + 0.32 * len(labels)))  # room for labels
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(data.max())))
    ax.set_xticks(range(data.shape[1]), [str(j) for j in range(data.shape[1])])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("specialty / operation")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of questions selecting the atom" if xlabel == "rank atom"
                 else "mean gate over the questions' prompt tokens")
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def _decoder_layer(name: str) -> str:
    return ".".join(name.split(".")[:-2])


def audit_experts(routes: dict, items: list[TaggedRecord], out_dir: Path | None, *, plot: bool = True) -> dict:
    """Mixture-of-experts audit: per question and module the expert usage (mean gate over its
    prompt tokens); per decoder layer the usage by specialty x operation and the mutual
    information between tags and experts (usage as a soft assignment: ``P(t, e) = (1/N)
    sum_i [t_i = t] usage_ie``)."""
    spec = np.array([t.tags.specialty_id for t in items])
    op = np.array([t.tags.operation_id for t in items])
    pair = spec * len(OPERATIONS) + op
    rows = [{"id": t.record.id, "benchmark": t.set_name, "specialty": t.tags.specialty, "operation": t.tags.operation,
             "modules": {}} for t in items]
    by_layer: dict[str, list[np.ndarray]] = {}
    mi = {"specialty": [], "operation": [], "pair": []}
    for name, rec in routes.items():
        usage = rec["usage"].numpy()
        by_layer.setdefault(_decoder_layer(name), []).append(usage)
        for i, row in enumerate(rows):
            row["modules"][name] = {"expert_usage": usage[i].round(4).tolist(), "top_expert": int(usage[i].argmax())}
        mi["specialty"].append(mutual_information(spec, usage))
        mi["operation"].append(mutual_information(op, usage))
        mi["pair"].append(mutual_information(pair, usage))
    layers = {}
    for layer, mats in by_layer.items():
        mean_usage = np.mean(mats, axis=0)  # [N, experts]: modules of a layer share the expert count
        cells = {}
        for s_, o_ in sorted(set(zip(spec.tolist(), op.tolist()))):
            sel = (spec == s_) & (op == o_)
            cells[(s_, o_)] = (int(sel.sum()), mean_usage[sel].mean(0))
        layers[layer] = cells
    summary = {
        "n_questions": len(items), "n_modules": len(routes),
        "mutual_information_bits": {k: float(np.mean(v)) for k, v in mi.items()},
        "expert_usage_by_layer": {layer: {f"{SPECIALTIES[s_]}|{OPERATIONS[o_]}": {"n": n, "usage": u.round(4).tolist()}
                                          for (s_, o_), (n, u) in cells.items()} for layer, cells in layers.items()},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_jsonl(out_dir / "per_question.jsonl", rows)
        write_json(out_dir / "summary.json", summary)
        if plot:
            first, last = next(iter(layers)), list(layers)[-1]
            plot_usage(layers[first], out_dir / "expert_usage_first_layer.png", title=f"Expert usage, {first}",
                       xlabel="expert")
            plot_usage(layers[last], out_dir / "expert_usage_last_layer.png", title=f"Expert usage, {last}",
                       xlabel="expert")
    return summary

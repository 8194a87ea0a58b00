"""What a routed family's audit returns, and the statistics every family's audit shares.

A family's ``audit`` turns the per-question routing of each module into an
:class:`AuditResult`; ``medpeft.audit`` writes it (per-question JSON lines, a summary,
heatmaps) and prints its headline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..tags import OPERATIONS, SPECIALTIES


@dataclass
class Heatmap:
    """Usage of routed units (rank atoms, experts) per specialty x operation cell."""

    filename: str  # PNG file name in the audit folder
    cells: dict[tuple[int, int], tuple[int, np.ndarray]]  # (specialty id, operation id) -> (n, usage [U])
    title: str
    xlabel: str
    colorbar: str


@dataclass
class AuditResult:
    summary: dict  # summary.json
    modules: list[dict]  # per question (in item order): {module name: what it did}
    headline: str  # one line for the command line
    heatmaps: list[Heatmap] = field(default_factory=list)


def mutual_information(tags: np.ndarray, assignment: np.ndarray) -> float:
    """``I(T; J)`` in bits between a question's tag ``T`` and a unit ``J`` drawn from its
    row of ``assignment`` [N, U] (normalised to sum 1: a hard top-k mask or soft usage)::

        I(T; J) = sum_{t,j} P(t,j) log2( P(t,j) / (P(t) P(j)) ),  P(t,j) = (1/N) sum_i [t_i = t] a_ij / sum_j a_ij
    """
    n, _ = assignment.shape
    k = assignment.sum(1, keepdims=True).clip(min=1e-12)
    joint = np.zeros((int(tags.max()) + 1, assignment.shape[1]))
    np.add.at(joint, tags, assignment / k)
    joint /= n
    pt, pj = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pt @ pj)[nz])).sum())


def tag_arrays(items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Specialty, operation and pair ids of tagged items."""
    spec = np.array([t.tags.specialty_id for t in items])
    op = np.array([t.tags.operation_id for t in items])
    return spec, op, spec * len(OPERATIONS) + op


def tag_mutual_information(items: list, assignments: list[np.ndarray]) -> dict[str, float]:
    """Mutual information of each tag axis (and their pair) with the units, mean over modules."""
    spec, op, pair = tag_arrays(items)
    return {axis: float(np.mean([mutual_information(ids, a) for a in assignments])) if assignments else 0.0
            for axis, ids in (("specialty", spec), ("operation", op), ("pair", pair))}


def usage_by_cell(items: list, usage: np.ndarray) -> dict[tuple[int, int], tuple[int, np.ndarray]]:
    """Mean row of ``usage`` [N, U] per (specialty, operation) cell of the items."""
    spec, op, _ = tag_arrays(items)
    cells = {}
    for s, o in sorted(set(zip(spec.tolist(), op.tolist()))):
        sel = (spec == s) & (op == o)
        cells[(s, o)] = (int(sel.sum()), usage[sel].mean(0))
    return cells


def cells_json(cells: dict[tuple[int, int], tuple[int, np.ndarray]]) -> dict:
    return {f"{SPECIALTIES[s]}|{OPERATIONS[o]}": {"n": n, "usage": u.round(4).tolist()} for (s, o), (n, u) in cells.items()}

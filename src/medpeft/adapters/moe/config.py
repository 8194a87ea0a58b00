"""The ``method:`` section of the LoRA mixtures of experts (formulas in layer.py and losses.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...schema import require, require_choice
from ..registry import DEFAULT_TARGETS

ROUTERS = ("topk", "soft", "route")
MEDMOE_RANKS = (8, 16, 32)  # Med-MoE-LoRA: heterogeneous expert ranks from {8, 16, 32}
DENSE_ENDS = ("top", "bottom")


@dataclass
class MoeMethod:
    """LoRA mixtures of experts: MoELoRA, SparseDoctor, Med-MoE-LoRA, vanilla MoE-LoRA, Multi-LoRA."""

    name: str = "moelora"
    n_experts: int = 4  # routed (specialist) experts per module; route router: 0 = one per specialty
    top_k: int = 2  # topk router
    ranks: list[int] = field(default_factory=lambda: [8])  # specialist i has rank ranks[i % len]
    alpha: float = 16.0
    alpha_ratio: float = 0.0  # > 0: alpha_i = alpha_ratio * r_i (Med-MoE-LoRA: 2)
    n_anchor: int = 0  # always-on base experts
    anchor_rank: int = 8
    router: str = "topk"  # topk | soft | route
    tau: float = 1.0  # soft router temperature (initial value when learned)
    learn_tau: bool = False
    n_min: int | None = None  # Med-MoE-LoRA layer schedule N_l (overrides n_experts)
    n_max: int | None = None
    gamma: float = 1.0
    dense_end: str = "top"  # where the schedule puts N_max: top (the paper's asymmetric) | bottom (its ablation)
    dropout: float = 0.05
    l_balance: float = 0.0  # Switch load balance (topk)
    l_var: float = 0.0  # variance of batch-mean gates across experts (Med-MoE-LoRA L_aux)
    l_anchor: float = 0.0  # ||B_a A_a||^2 of anchors
    l_con: float = 0.0  # contrastive expert loss (MoELoRA / SparseDoctor)
    gate_contrast: bool = False  # SparseDoctor: the contrastive term also supervises the router
    con_temperature: float = 0.1
    queue_size: int = 0  # SparseDoctor expert memory queue (entries per module)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def validate(m: MoeMethod, prefix: str) -> None:
    key = lambda k: f"{prefix}.{k}"  # noqa: E731
    require_choice(m.router, ROUTERS, key("router"))
    require_choice(m.dense_end, DENSE_ENDS, key("dense_end"))
    require(bool(m.ranks) and all(r >= 1 for r in m.ranks), key("ranks"), f"must be ranks >= 1, got {m.ranks}")
    if m.name == "medmoe":
        require(all(r in MEDMOE_RANKS for r in m.ranks), key("ranks"),
                f"of medmoe must be from {{{', '.join(map(str, MEDMOE_RANKS))}}}, got {m.ranks}")
    require(m.alpha_ratio >= 0, key("alpha_ratio"), f"must be >= 0, got {m.alpha_ratio}")
    require(m.n_anchor >= 0, key("n_anchor"), f"must be >= 0, got {m.n_anchor}")
    require(m.anchor_rank >= 1, key("anchor_rank"), f"must be >= 1, got {m.anchor_rank}")
    require(0 < m.tau < math.inf, key("tau"), f"must be a finite number > 0, got {m.tau}")
    require(0 < m.con_temperature < math.inf, key("con_temperature"),
            f"must be a finite number > 0, got {m.con_temperature}")
    require(math.isfinite(m.alpha_ratio), key("alpha_ratio"), f"must be finite, got {m.alpha_ratio}")
    require(m.queue_size >= 0, key("queue_size"), f"must be >= 0, got {m.queue_size}")
    if (m.n_min is None) != (m.n_max is None):
        require(False, key("n_min" if m.n_min is None else "n_max"),
                f"must be set together with {key('n_max' if m.n_min is None else 'n_min')} (the layer schedule)")
    if m.n_min is not None:
        require(m.n_min >= 1, key("n_min"), f"must be >= 1, got {m.n_min}")
        require(m.n_min <= m.n_max, key("n_min"), f"must be <= {key('n_max')} ({m.n_max}), got {m.n_min} "
                f"(for more experts in lower layers set {key('dense_end')}: bottom)")
        require(0 < m.gamma < math.inf, key("gamma"), f"must be a finite number > 0, got {m.gamma}")
        fewest = m.n_min
    else:
        require(m.n_experts >= 1 or (m.router == "route" and m.n_experts == 0), key("n_experts"),
                f"must be >= 1 (0 only with the route router: one expert per specialty), got {m.n_experts}")
        fewest = m.n_experts
    if m.router == "topk":
        require(1 <= m.top_k <= fewest, key("top_k"),
                f"must be in 1..{fewest} (the fewest experts of a module), got {m.top_k}")
    require(m.l_balance == 0 or m.router == "topk", key("l_balance"), "needs method.router: topk (the Switch "
            f"balance counts top-k slots), got router {m.router!r}")
    require(m.l_var == 0 or m.router != "route", key("l_var"),
            "has no gradient with the route router (its gates are fixed by the tags)")
    require(m.l_anchor == 0 or m.n_anchor > 0, key("l_anchor"), f"needs anchor experts ({key('n_anchor')} > 0)")
    require(not m.learn_tau or m.router == "soft", key("learn_tau"), "needs method.router: soft")
    require(not m.gate_contrast or m.l_con > 0, key("gate_contrast"), f"needs the contrastive loss ({key('l_con')} > 0)")
    require(m.queue_size == 0 or m.l_con > 0, key("queue_size"), f"needs the contrastive loss ({key('l_con')} > 0)")

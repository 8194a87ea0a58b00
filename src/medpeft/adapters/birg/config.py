"""The ``method:`` section of ``birg`` and ``rankwise`` (formulas in layer.py and losses.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...schema import require
from ..registry import DEFAULT_TARGETS


@dataclass
class BirgMethod:
    """``birg`` and ``rankwise``: rank-gated LoRA."""

    name: str = "birg"
    r: int = 16  # R, rank atoms per module
    kappa: int = 4  # active atoms per question (top-k)
    alpha: float = 32.0
    tau: float = 0.5  # softmax temperature of the gate
    dropout: float = 0.05
    hidden_gate: bool = True  # a_h(h_x) branch
    clinical_gate: bool = True  # a_s, a_o, a_so branches
    injection: bool = True  # rho(x); false = rho fixed to 1
    l_ent: float = 0.01
    l_bal: float = 0.001
    l_orth: float = 0.1
    l_axis: float = 0.5
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def validate(method: BirgMethod, prefix: str) -> None:
    require(1 <= method.kappa <= method.r, f"{prefix}.kappa",
            f"must be in 1..{prefix}.r ({method.r}), got {method.kappa}")
    require(0 < method.tau < math.inf, f"{prefix}.tau", f"must be a finite number > 0, got {method.tau}")
    require(method.hidden_gate or method.clinical_gate, f"{prefix}.hidden_gate",
            f"and {prefix}.clinical_gate are both false: the gate needs at least one branch")

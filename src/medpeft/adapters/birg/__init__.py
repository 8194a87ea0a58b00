"""BiRG-LoRA and the rank-wise family: rank-gated LoRA (config, layer, losses, audit), one registration."""

from __future__ import annotations

from ..inject import InjectedFamily
from ..registry import Preset, register_family
from ..routing import routing_state
from . import config
from .audit import audit_atoms, effective_rank
from .config import BirgMethod
from .layer import BirgRoutingState, RankGatedLoraLinear, merge_fixed_gate, set_siblings, straight_through_topk
from .losses import AUX_LOSSES, PARAMETER_LOSSES, OffDiagonalCos2, birg_losses

__all__ = ["BirgMethod", "RankGatedLoraLinear", "merge_fixed_gate", "straight_through_topk", "birg_losses",
           "OffDiagonalCos2", "effective_rank", "BirgFamily"]


class BirgFamily(InjectedFamily):
    name = "birg"
    methods = {"birg": "Single adapter", "rankwise": "Rank-wise control"}
    schema = BirgMethod
    state_class = BirgRoutingState
    parameter_losses = PARAMETER_LOSSES
    presets = (
        Preset("birg", "birg", about="BiRG-LoRA, the paper's defaults", table=True, benchmark=True),
        # the paper's generic rank-wise control: the same rank-16/top-4 adapter, hidden
        # branch only, no injection, no orthogonality or axis losses
        Preset("rankwise", "rankwise", {"clinical_gate": False, "injection": False, "l_orth": 0.0, "l_axis": 0.0},
               about="generic rank-wise gate (SMoRA-like)", table=True, benchmark=True),
        Preset("birg-clinical-only", "birg", {"hidden_gate": False}, base="birg", about="ablation: gate from the tags only"),
        Preset("birg-hidden-only", "birg", {"clinical_gate": False}, base="birg",
               about="ablation: gate from the hidden state only"),
        Preset("birg-no-injection", "birg", {"injection": False}, base="birg", about="ablation: rho fixed to 1"),
        Preset("birg-top2", "birg", {"kappa": 2}, base="birg", about="ablation: 2 active atoms"),
        Preset("birg-top8", "birg", {"kappa": 8}, base="birg", about="ablation: 8 active atoms"),
        Preset("birg-no-orth", "birg", {"l_orth": 0.0}, base="birg", about="ablation: no orthogonality loss"),
        Preset("birg-no-axis", "birg", {"l_axis": 0.0}, base="birg", about="ablation: no axis contrast"),
    )
    aliases = {"birg-top4": "birg"}  # kappa 4 is the default

    def validate(self, method, prefix="method"):
        config.validate(method, prefix)

    def apply(self, model, method):
        super().apply(model, method)
        set_siblings(self.layers(model))
        return model

    def reads_tags(self, method) -> bool:
        return method.clinical_gate

    def make_layer(self, name, base, state, method, model):
        losses = tuple(k for k in AUX_LOSSES if getattr(method, f"l_{k}") > 0)
        return RankGatedLoraLinear(base, r=method.r, kappa=method.kappa, alpha=method.alpha, tau=method.tau,
                                   dropout=method.dropout, hidden_gate=method.hidden_gate,
                                   clinical_gate=method.clinical_gate, injection=method.injection, losses=losses,
                                   state=state, name=name)

    def count_active(self, model, method, trainable):
        """Active: the kappa selected rank atoms of A and B (``kappa/R`` of them), the hidden
        gate and rho in full, and the 3 table rows a question reads of each tag table."""
        inactive = 0
        for m in self.layers(model):
            inactive += (m.lora_A.numel() + m.lora_B.numel()) * (m.r - m.kappa) // m.r
            if m.gate_tags is not None:
                inactive += m.gate_tags.numel() - 3 * m.r
        return trainable - inactive, method.kappa

    def loss_weights(self, method):
        return {k: getattr(method, f"l_{k}") for k in AUX_LOSSES}

    def aux_losses(self, model, method):
        return birg_losses(routing_state(model), method)

    def audit(self, model, method, routes, items):
        return audit_atoms(model, routes, items)


register_family(BirgFamily())

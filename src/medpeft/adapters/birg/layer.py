"""BiRG-LoRA: a biaxial rank-gated LoRA layer (and the generic rank-wise control).

For a target linear layer ``z = W0 h``, per question x::

    z = W0 h + rho(x) * (alpha / R) * B diag(zeta(x)) A h
    a(x)    = a_h(h_x) + a_s[s(x)] + a_o[o(x)] + a_so[s(x), o(x)]     (gate logits, R)
    p(x)    = softmax(a(x) / tau)
    zeta(x) = hard_topk(p, kappa) + p - stopgrad(p)                    (straight-through)
    rho(x)  = sigmoid(w_rho . h_x + b_rho)

``h_x`` is the mean of *this module's input* over the prompt tokens of question x (never
the answer tokens), ``a_h`` is ``Linear(d_in -> R)``, ``a_s, a_o, a_so`` are learned
R-vectors indexed by the specialty tag, the operation tag and their pair (tables include
``unknown``). Everything is per module. Flags give the ablations: ``hidden_gate=False``
(clinical-only gate), ``clinical_gate=False`` (hidden-only gate; with ``injection=False``
and no orth/axis losses this is the ``rankwise`` control), ``injection=False``
(``rho = 1``), ``kappa`` (top-k).

Parameter layout (fused, same count as separate layers): ``gate_in`` is one
``Linear(d_in -> R + 1)`` whose first R outputs are ``a_h`` and whose last is the rho
logit (``R`` outputs without injection, ``1`` without the hidden branch); ``gate_tags`` is
one ``[N_TAG_ROWS, R]`` table in the tags' table layout (``tags.tag_table_rows``: ``a_s``,
then ``a_o``, then ``a_so``), so a question's clinical logits are the sum of three rows.

Precision: with a half-precision base model the adapter's parameters are kept in fp32
(master weights, as ``peft`` does with ``autocast_adapter_dtype``); the low-rank update
runs in the input's dtype and the gate (logits, softmax, top-k, rho) in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...tags import N_TAG_ROWS, tag_table_rows
from ..inject import InjectedLinear, adapter_dtype
from ..routing import RoutingState, sibling_groups, small_matmul, topk_mask


@dataclass
class BirgRoutingState(RoutingState):
    """The routing context plus BiRG's per-batch tensor: each question's three-hot row
    selector of the tag tables, ``tag_onehot`` [B, N_TAG_ROWS] (fp32)."""

    tag_onehot: torch.Tensor | None = None

    def prepare_batch(self) -> None:
        rows = tag_table_rows(self.specialty, self.operation)
        self.tag_onehot = torch.zeros(rows.shape[0], N_TAG_ROWS, device=rows.device).scatter_(1, rows, 1.0)


def straight_through_topk(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k mask in the forward pass, gradients of ``p`` in the backward pass."""
    hard = topk_mask(p, k)
    return hard + p - p.detach(), hard


def gate_math(hidden: torch.Tensor | None, clinical: torch.Tensor | None, r: int, kappa: int, tau: float,
              hidden_gate: bool, injection: bool):
    """Gate logits -> (zeta with straight-through gradients, hard mask, p, rho or None)."""
    logits = hidden[..., :r] if hidden_gate else None
    if clinical is not None:
        logits = clinical if logits is None else logits + clinical
    p = torch.softmax(logits / tau, dim=-1)
    zeta, hard = straight_through_topk(p, kappa)
    rho = torch.sigmoid(hidden[..., -1:]) if injection else None
    return zeta, hard, p, rho


def group_gates(layers: list, x: torch.Tensor) -> list[tuple]:
    """The gates of ``layers`` reading the same input ``x``, one tuple per layer as
    :func:`gate_math` returns it. One layer: its own ``gate_in`` product and tag product.
    Sibling layers (q/k/v, gate/up; eager only): their ``gate_in`` weights stacked into one
    product, their tag tables side by side in another, one softmax and top-k over
    ``[B, G, R]``, and each layer gets its slice -- the same values, about 20 fewer small
    operations per sibling forward and backward (docs/performance.md)."""
    lead, n = layers[0], len(layers)
    st = lead.state

    def stacked(tensors: list, dim: int = 0) -> torch.Tensor:
        return (tensors[0] if n == 1 else torch.cat(tensors, dim)).float()

    with torch.autocast(x.device.type, enabled=False):  # the gate in fp32, also under mixed precision
        hidden = clinical = None
        if lead.gate_in is not None:
            hidden = small_matmul(st.pooled(x), stacked([m.gate_in.weight for m in layers]).T,
                                  stacked([m.gate_in.bias for m in layers]))
        if lead.gate_tags is not None:
            # a question's three table rows, summed, as one matmul with the batch's 3-hot tag matrix
            clinical = small_matmul(st.tag_onehot, stacked([m.gate_tags for m in layers], 1))
        if n == 1:
            return [gate_math(hidden, clinical, lead.r, lead.kappa, lead.tau, lead.hidden_gate, lead.injection)]
        hidden = hidden.view(-1, n, hidden.shape[1] // n) if hidden is not None else None
        clinical = clinical.view(-1, n, lead.r) if clinical is not None else None
        outs = gate_math(hidden, clinical, lead.r, lead.kappa, lead.tau, lead.hidden_gate, lead.injection)
    parts = [t.unbind(1) if t is not None else (None,) * n for t in outs]
    return [tuple(part[g] for part in parts) for g in range(n)]


def lora_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``((x A^T) * scale) B^T`` with a per-question ``scale`` [B, R] over the rank atoms, in x's dtype."""
    return ((x @ a.T.to(x.dtype)) * scale.unsqueeze(1).to(x.dtype)) @ b.T.to(x.dtype)


class RankGatedLoraLinear(InjectedLinear):
    """``nn.Linear`` plus a rank-gated LoRA update (see the module docstring).

    ``losses``: the auxiliary terms of non-zero weight; when any batch term is on, a training
    forward keeps ``routing_out = (p, hard)`` for ``losses.birg_losses``.
    """

    def __init__(self, base: nn.Linear, *, r: int, kappa: int, alpha: float, tau: float, dropout: float,
                 hidden_gate: bool, clinical_gate: bool, injection: bool, losses: tuple[str, ...],
                 state: RoutingState | None, name: str = ""):
        super().__init__(base, state, name)
        if not 1 <= kappa <= r:
            raise ValueError(f"kappa must be in 1..r, got kappa={kappa}, r={r}")
        if not (hidden_gate or clinical_gate):
            raise ValueError("the gate needs the hidden branch, the clinical branches, or both")
        self.r, self.kappa, self.scaling, self.tau = r, kappa, alpha / r, tau
        self.losses = losses
        d_in, d_out = base.in_features, base.out_features
        device, dtype = base.weight.device, adapter_dtype(base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.hidden_gate, self.injection = hidden_gate, injection
        self.siblings: list = []  # eager: layers reading the same input, gated together (set_siblings)
        n_in = r * hidden_gate + injection
        self.gate_in = nn.Linear(d_in, n_in, device=device, dtype=dtype) if n_in else None
        self.gate_tags = nn.Parameter(torch.zeros(N_TAG_ROWS, r, device=device, dtype=dtype)) if clinical_gate else None
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft / loralib
        nn.init.zeros_(self.lora_B)
        if self.injection:
            nn.init.zeros_(self.gate_in.weight[-1])
            nn.init.zeros_(self.gate_in.bias[-1:])  # rho = 0.5 at the start

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(zeta [B, R] with straight-through grads, hard mask [B, R], p [B, R], rho [B, 1])."""
        st = self.state
        if st.pool_weights is None or st.pool_weights.shape != x.shape[:2]:
            raise RuntimeError(
                f"{self.name}: no routing context for an input of shape {tuple(x.shape)}; call "
                "medpeft.adapters.set_routing(model, prompt_mask, specialty, operation) before the forward pass")
        if not self.siblings or torch.compiler.is_compiling():  # compiled, the compiler fuses instead
            return group_gates([self], x)[0]
        shared = st.sibling_gates
        if shared is None or shared[0] is not x:  # the group's first layer to run computes them all
            names = [m.name for m in self.siblings]
            shared = st.sibling_gates = (x, dict(zip(names, group_gates(self.siblings, x))))
        return shared[1][self.name]

    def keep_for_losses(self, p: torch.Tensor, hard: torch.Tensor) -> None:
        """Keep this forward's gate for the batch losses, which ``losses.birg_losses`` computes
        for all modules together, vectorised over modules."""
        if any(k in self.losses for k in ("ent", "bal", "axis")):
            self.routing_out = (p, hard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.freeze and self.name in st.frozen:
            zeta, rho = st.frozen[self.name]  # decoding: the gate of the prefill
        else:
            zeta, hard, p, rho = self.gate(x)
            if st.freeze:
                st.frozen[self.name] = (zeta.detach(), rho.detach() if rho is not None else None)
            if self.training and self.losses:
                self.keep_for_losses(p, hard)
            if st.record:
                st.records[self.name] = {"hard": hard.detach(), "p": p.detach(),
                                         "rho": rho.detach() if rho is not None else torch.ones_like(p[:, :1])}
        scale = zeta * self.scaling if rho is None else zeta * (rho * self.scaling)
        return self.base(x) + lora_update(self.dropout(x), self.lora_A, self.lora_B, scale)

    def active_update(self, hard_row: torch.Tensor, rho: float) -> torch.Tensor:
        """The weight update of one question: ``rho (alpha/R) B diag(zeta) A`` [d_out, d_in]."""
        return (self.lora_B * (hard_row * rho * self.scaling)) @ self.lora_A

    def extra_repr(self) -> str:
        return (f"r={self.r}, kappa={self.kappa}, tau={self.tau}, hidden_gate={self.hidden_gate}, "
                f"clinical_gate={self.gate_tags is not None}, injection={self.injection}")


def _gate_shape(layer: RankGatedLoraLinear) -> tuple:
    return (layer.r, layer.kappa, layer.tau, layer.hidden_gate, layer.injection, layer.gate_tags is not None,
            layer.base.in_features)


def set_siblings(layers: list) -> None:
    """Let rank-gated layers that read the same input (``routing.sibling_groups``) and have the
    same gate shape compute their gates together (:func:`group_gates`)."""
    for group in sibling_groups(layers):
        if all(_gate_shape(m) == _gate_shape(group[0]) for m in group):
            for m in group:
                m.siblings = group


def merge_fixed_gate(model: nn.Module, specialty: int, operation: int) -> nn.Module:
    """Fold each rank-gated layer into a plain ``nn.Linear`` for one (specialty, operation).

    Exact only when the gate depends on the tags alone (no hidden branch) and rho is 1
    (no injection); otherwise the update varies per question and merging is refused.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, RankGatedLoraLinear):
            if module.hidden_gate or module.injection:
                raise ValueError(f"{name}: the gate depends on the input (hidden branch or injection); "
                                 "merging is exact only for a tag-only gate without injection")
            with torch.no_grad():
                rows = tag_table_rows(torch.tensor([specialty]), torch.tensor([operation])).to(module.lora_A.device)
                logits = module.gate_tags[rows].sum(1)
                hard = straight_through_topk(torch.softmax(logits.float() / module.tau, -1), module.kappa)[1][0]
                merged = nn.Linear(module.base.in_features, module.base.out_features,
                                   bias=module.base.bias is not None, device=module.lora_A.device,
                                   dtype=module.base.weight.dtype)
                merged.weight.copy_(module.base.weight + module.active_update(hard.to(module.lora_A.dtype), 1.0))
                if module.base.bias is not None:
                    merged.bias.copy_(module.base.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, merged)
    return model

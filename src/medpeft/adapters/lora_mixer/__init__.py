"""``lora-mixer``: LoRA-Mixer-style hard-soft routing over a frozen LoRA library (Li et al., 2025).

Per layer and token a router ``l = W_g x`` [K]: a hard top-k selection, soft weights among the
selected (``softmax(l_topk / T)``; library/layer.py). Trained with the answer loss plus a
routing-specialisation loss, over prompt tokens and averaged over modules::

    L_rsl = l_balance * K sum_k f_k P_k  +  l_entropy * mean_t H(softmax(l_t / T))

``f_k``: the share of (token, selected slot) pairs routed to adapter k, ``P_k``: the mean
router probability of k (Switch-Transformer load balance, which LoRA-Mixer's specialisation
loss builds on); the entropy term sharpens each token's routing. Weights are config keys.
No route labels are read: it works over any library, metadata-routed ones included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..library import LibraryRouterFamily, RouterMethod
from ..registry import Preset, register_family
from ..routing import routing_state


@dataclass
class LoraMixerMethod(RouterMethod):
    name: str = "lora-mixer"
    top_k: int = 2
    temperature: float = 1.0
    l_balance: float = 0.01
    l_entropy: float = 0.01


def specialisation_losses(state, top_k: int, temperature: float, want: set[str]) -> dict[str, torch.Tensor]:
    outs = state.collect()
    if not outs or state.prompt_mask is None:
        return {}
    mask = state.prompt_mask.float()  # [B, T]
    n = mask.sum().clamp(min=1)
    balance, entropy = 0.0, 0.0
    for logits in outs:
        p = torch.softmax(logits.float() / temperature, dim=-1)  # [B, T, K]
        k = p.shape[-1]
        chosen = torch.zeros_like(p).scatter(-1, p.topk(min(top_k, k), dim=-1).indices, 1.0)
        f = (chosen * mask[..., None]).sum((0, 1)) / (n * min(top_k, k))
        big_p = (p * mask[..., None]).sum((0, 1)) / n
        balance = balance + k * (f * big_p).sum()
        entropy = entropy + (-(p * p.clamp(min=1e-12).log()).sum(-1) * mask).sum() / n
    out = {}
    if "balance" in want:
        out["balance"] = balance / len(outs)
    if "entropy" in want:
        out["entropy"] = entropy / len(outs)
    return out


class LoraMixerFamily(LibraryRouterFamily):
    name = "lora-mixer"
    methods = {"lora-mixer": "Adapter library"}
    schema = LoraMixerMethod
    presets = (Preset("lora-mixer", "lora-mixer", about="LoRA-Mixer-style hard-soft router over the library: top-2, "
                      "load balance + entropy shaping"),)
    table_rows = ("lora-mixer-16x",)

    def loss_weights(self, method):
        return {"balance": method.l_balance, "entropy": method.l_entropy}

    def aux_losses(self, model, method):
        want = {k for k, w in self.loss_weights(method).items() if w > 0}
        state = routing_state(model)
        if not want:
            state.collect()
            return {}
        return specialisation_losses(state, method.top_k, method.temperature, want)


register_family(LoraMixerFamily())

"""LoRA mixtures of experts: MoELoRA, SparseDoctor, Med-MoE-LoRA, vanilla MoE-LoRA, Multi-LoRA
(config, layer, losses, audit), one registration."""

from __future__ import annotations

import torch

from ..inject import InjectedFamily
from ..registry import Preset, register_family
from ..routing import routing_state
from . import config
from .audit import audit_experts, question_usage
from .config import MoeMethod
from .layer import MOE_LOSSES, PARAMETER_LOSSES, ExpertQueue, LoraMixtureLinear, experts_at_layer, layer_ranks
from .losses import commit_queues, expert_representations, pending_pushes, moe_losses, supcon_from_similarities

__all__ = ["MoeMethod", "LoraMixtureLinear", "ExpertQueue", "experts_at_layer", "moe_losses",
           "expert_representations", "supcon_from_similarities", "MoeFamily"]

_QUEUE_TENSORS = ("items", "labels", "ptr")


class MoeFamily(InjectedFamily):
    name = "moe"
    methods = {"moelora": "LoRA-MoE", "sparsedoctor": "LoRA-MoE", "medmoe": "LoRA-MoE", "moe-vanilla": "LoRA-MoE",
               "multilora": "Adapter library"}
    schema = MoeMethod
    parameter_losses = PARAMETER_LOSSES
    presets = (
        Preset("moelora", "moelora", {"l_con": 0.1}, about="4 experts, top-2, rank 8, contrastive expert loss",
               table=True, benchmark=True),
        Preset("sparsedoctor", "sparsedoctor", {"gate_contrast": True, "queue_size": 1024}, base="moelora",
               about="moelora + contrastive routing supervision + expert memory queue", table=True, benchmark=True),
        Preset("moe-vanilla", "moe-vanilla", {"l_balance": 0.01}, about="4 experts, top-2, Switch load balance",
               table=True, benchmark=True),
        Preset("medmoe", "medmoe", {"router": "soft", "learn_tau": True, "ranks": [8, 16, 32], "alpha_ratio": 2.0,
                                    "n_anchor": 1, "n_min": 2, "n_max": 8, "gamma": 2.0, "l_var": 0.01,
                                    "l_anchor": 0.01},
               about="Med-MoE-LoRA: 2 -> 8 experts with depth, anchor expert, soft router", table=True, benchmark=True),
        Preset("medmoe-uniform", "medmoe", {"n_min": 4, "n_max": 4}, base="medmoe", table=True,
               about="allocation ablation: 4 experts in every layer"),
        Preset("medmoe-bottom-heavy", "medmoe", {"dense_end": "bottom"}, base="medmoe", table=True,
               about="allocation ablation: the schedule mirrored, 8 experts at the bottom, 2 at the top"),
        Preset("multilora", "multilora", {"router": "route", "n_experts": 0},
               about="one LoRA per specialty route", table=True, benchmark=True),
    )
    aliases = {"medmoe-asymmetric": "medmoe"}  # the allocation ablation's name for the paper's own schedule

    def validate(self, method, prefix="method"):
        config.validate(method, prefix)

    def reads_tags(self, method) -> bool:
        return method.router == "route"

    def make_layer(self, name, base, state, method, model):
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
        ranks, alphas = layer_ranks(method, name, n_layers)
        losses = tuple(k for k in MOE_LOSSES if getattr(method, f"l_{k}") > 0)
        return LoraMixtureLinear(base, ranks=ranks, alphas=alphas, n_anchor=method.n_anchor, router=method.router,
                                 top_k=method.top_k, init_tau=method.tau, learn_tau=method.learn_tau,
                                 dropout=method.dropout, losses=losses, gate_contrast=method.gate_contrast,
                                 con_temperature=method.con_temperature, queue_size=method.queue_size,
                                 state=state, name=name)

    def count_active(self, model, method, trainable):
        """Active = router, anchors, and the share of specialists a token uses: top_k of them
        (topk), all (soft), one (route). Active rank: the mean over modules of the rank a token uses."""
        inactive, ranks = 0, []
        for m in self.layers(model):
            spec_ranks = m.ranks[m.n_anchor:]
            spec_params = sum(spec_ranks) * (m.lora_A.shape[1] + m.lora_B.shape[0])
            used = {"topk": m.top_k, "soft": m.n_spec, "route": 1}[m.router_kind]
            inactive += spec_params - spec_params * used // m.n_spec
            ranks.append(sum(m.ranks[: m.n_anchor]) + sum(spec_ranks) * used / m.n_spec)
        return trainable - inactive, round(sum(ranks) / max(len(ranks), 1))

    def loss_weights(self, method):
        return {k: getattr(method, f"l_{k}") for k in MOE_LOSSES}

    def aux_losses(self, model, method):
        return moe_losses(routing_state(model), method)

    def micro_batch_update(self, model):
        return pending_pushes(routing_state(model))

    def apply_step_updates(self, model, updates):
        commit_queues(routing_state(model), updates)

    def training_state(self, model) -> dict[str, torch.Tensor]:
        """SparseDoctor's expert memory queues (entries, labels, ring pointer) per module."""
        return {f"{layer.name}.queue.{key}": getattr(layer.queue, key) for layer in self.layers(model)
                if layer.queue is not None for key in _QUEUE_TENSORS}

    def load_training_state(self, model, tensors):
        own = self.training_state(model)
        if set(own) != set(tensors):
            raise ValueError(f"expert queues do not fit this model (missing {sorted(set(own) - set(tensors))[:3]}, "
                             f"unexpected {sorted(set(tensors) - set(own))[:3]})")
        with torch.no_grad():
            for key, value in tensors.items():
                if own[key].shape != value.shape:
                    raise ValueError(f"expert queue {key}: shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
                own[key].copy_(value)

    def question_routing(self, records, prompt_mask):
        return question_usage(records, prompt_mask)

    def audit(self, model, method, routes, items):
        return audit_experts(routes, items)


register_family(MoeFamily())

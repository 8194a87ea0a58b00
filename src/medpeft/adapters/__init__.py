"""Adapter methods: building, counting, saving and loading, behind one interface.

* ``lora``, ``dora``: HF ``peft`` (peft_methods.py); ``full``: every weight trainable.
* ``birg``, ``rankwise``: rank-gated LoRA (birg.py), injected by our own code (inject.py)
  since ``peft`` has no supported plug-in API for new layer types.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import BirgMethod, FullMethod, LoraMethod, MoeMethod
from ..io import atomic_dir, write_json
from . import peft_methods
from .birg import BirgLayerFactory, routing_losses, weighted_aux_loss
from .inject import inject_adapters, load_adapter_weights, save_adapter
from .moe import MoeLayerFactory, commit_queues, moe_aux_loss, moe_losses
from .routing import routing_state, set_routing

ADAPTER_DIR = "adapter"
__all__ = ["apply_method", "count_parameters", "save_trained", "load_trained", "set_routing",
           "auxiliary_losses", "after_backward", "ADAPTER_DIR"]
OWN_INJECTION = (BirgMethod, MoeMethod)  # methods whose layers we inject ourselves


def apply_method(model: nn.Module, method) -> nn.Module:
    """Make ``model`` trainable with ``method``; returns the model to train."""
    if isinstance(method, BirgMethod):
        inject_adapters(model, list(method.target_modules), BirgLayerFactory(method))
        return model
    if isinstance(method, MoeMethod):
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
        inject_adapters(model, list(method.target_modules), MoeLayerFactory(method, n_layers))
        return model
    return peft_methods.apply_method(model, method)


def uses_tags(method) -> bool:
    """Whether the method reads the clinical tags (so tag perturbation can change its output)."""
    return (isinstance(method, BirgMethod) and method.clinical_gate) or \
        (isinstance(method, MoeMethod) and method.router == "route")


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def auxiliary_losses(model: nn.Module, method, share: float = 1.0) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The routed adapters' auxiliary losses of the last forward: (weighted sum, each term).

    ``share``: this micro-batch's fraction of the optimizer step's examples.
    """
    state = routing_state(model)
    if state is None:
        return None, {}
    if isinstance(method, MoeMethod):
        aux = moe_losses(state, method)
        return moe_aux_loss(aux, method, share), aux
    aux = routing_losses(state, method)
    return weighted_aux_loss(aux, method, share), aux


def after_backward(model: nn.Module) -> None:
    """Updates that must follow a micro-batch's backward pass (SparseDoctor's expert queues)."""
    state = routing_state(model)
    if state is not None:
        commit_queues(state)


def save_trained(model: nn.Module, method, run_dir: Path) -> Path:
    """Save the trained weights to ``run_dir/adapter`` atomically.

    lora/dora: ``peft`` format, loadable with ``PeftModel.from_pretrained``; full: a
    ``save_pretrained`` folder; birg/rankwise: ``adapter.safetensors`` + ``adapter_config.json``.
    """
    final = Path(run_dir) / ADAPTER_DIR
    with atomic_dir(final) as tmp:
        if isinstance(method, OWN_INJECTION):
            save_adapter(model, method, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "medpeft_method.json", {"method": method.name})
    return final


def load_trained(base_model: nn.Module, method, run_dir: Path) -> nn.Module:
    """The base model with the trained adapter of ``run_dir`` applied (eval mode)."""
    path = Path(run_dir) / ADAPTER_DIR
    if isinstance(method, OWN_INJECTION):
        apply_method(base_model, method)
        load_adapter_weights(base_model, path)
        return base_model.eval()
    if isinstance(method, (LoraMethod, FullMethod)):
        return peft_methods.load_trained(base_model, method, path)
    raise TypeError(f"no loader for method {method!r}")

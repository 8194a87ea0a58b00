"""Our own adapter injection, for methods ``peft`` has no plug-in API for.

Find target ``nn.Linear`` modules by the last component of their name (like peft's
``target_modules``), replace each with a wrapping layer, freeze everything else, and
save/load only the adapter's trainable tensors (safetensors) with a JSON config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..io import write_json
from .routing import ROUTING_ATTR, RoutingState

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Dtype of an injected layer's weights: fp32 master weights for a half-precision base
    (bf16/fp16, as ``peft``'s ``autocast_adapter_dtype``), else the base's dtype."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


def inject_adapters(
    model: nn.Module,
    target_modules: list[str],
    make_layer: Callable[[str, nn.Linear, RoutingState], nn.Module],
) -> list[str]:
    """Wrap every ``nn.Linear`` whose name ends in one of ``target_modules``.

    Freezes the base model first; the new layers' own parameters stay trainable. Returns
    the wrapped module names. The model gets one shared :class:`RoutingState`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    state = RoutingState()
    setattr(model, ROUTING_ATTR, state)
    targets = set(target_modules)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, make_layer(name, module, state))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear module named {sorted(targets)} in {type(model).__name__}")
    return wrapped


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, by parameter name: exactly what the adapter adds."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, method, folder: Path) -> None:
    from safetensors.torch import save_file

    state = {n: t.contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS))
    write_json(folder / ADAPTER_CONFIG, {"method": dataclasses.asdict(method)})


def load_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Load saved adapter tensors into an injected model; every tensor must match."""
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    saved = load_file(str(folder / ADAPTER_WEIGHTS), device=str(device))
    own = dict(model.named_parameters())
    missing = sorted(set(adapter_state_dict(model)) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    wrong_shape = sorted(n for n in set(saved) & set(own) if saved[n].shape != own[n].shape)
    if missing or unexpected or wrong_shape:
        raise RuntimeError(f"{folder}: adapter does not fit this model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, other shapes {wrong_shape[:3]})")
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`inject_adapters`: put each wrapped base ``nn.Linear`` back, drop the state."""
    for name, module in list(model.named_modules()):
        base = getattr(module, "base", None)
        if isinstance(base, nn.Linear) and hasattr(module, "state") and hasattr(module, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    if hasattr(model, ROUTING_ATTR):
        delattr(model, ROUTING_ATTR)
    return model

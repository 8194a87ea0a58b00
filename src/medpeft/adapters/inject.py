"""Our own adapter injection, for methods ``peft`` has no plug-in API for.

Find target ``nn.Linear`` modules by the last component of their name (like peft's
``target_modules``), replace each with a wrapping layer, freeze everything else, and
save/load only the adapter's trainable tensors (safetensors). :class:`InjectedFamily`
gives a method family all of that; the family supplies the layer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .registry import MethodFamily
from .routing import ROUTING_ATTR, RoutingState, routing_state

ADAPTER_WEIGHTS = "adapter.safetensors"
METHOD_KEY = "medpeft_method"  # safetensors metadata: the method config the weights belong to


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Dtype of an injected layer's weights: fp32 master weights for a half-precision base
    (bf16/fp16, as ``peft``'s ``autocast_adapter_dtype``), else the base's dtype."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


class InjectedLinear(nn.Module):
    """Base of medpeft's own adapter layers: wraps the frozen ``nn.Linear`` ``base`` and joins
    the model's routing state. ``routing_out`` holds what this training forward gives the
    family's auxiliary losses (None when nothing)."""

    def __init__(self, base: nn.Linear, state: RoutingState | None, name: str = ""):
        super().__init__()
        self.base, self.name, self.state = base, name, state
        self.routing_out = None
        if state is not None:
            state.register(self)


def inject_adapters(
    model: nn.Module,
    target_modules: list[str],
    make_layer: Callable[[str, nn.Linear, RoutingState], InjectedLinear],
    state: RoutingState | None = None,
) -> list[str]:
    """Wrap every ``nn.Linear`` whose name ends in one of ``target_modules``.

    Freezes the base model first; the new layers' own parameters stay trainable. Returns
    the wrapped module names. The model gets one shared routing ``state``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    state = state if state is not None else RoutingState()
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
        delattr(model, ROUTING_ATTR)
        raise ValueError(f"no nn.Linear module named {sorted(targets)} in {type(model).__name__}")
    return wrapped


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`inject_adapters`: put each wrapped base ``nn.Linear`` back, drop the state."""
    state = routing_state(model)
    if state is not None:
        for layer in state.layers:
            parent_name, _, child = layer.name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
        delattr(model, ROUTING_ATTR)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, by parameter name: exactly what the adapter adds."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _method_json(method) -> str:
    return json.dumps(dataclasses.asdict(method), sort_keys=True)


def save_adapter_weights(model: nn.Module, folder: Path, method) -> None:
    """The trainable tensors, with the method config in the file's metadata (checked on load)."""
    from safetensors.torch import save_file

    state = {n: t.contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    save_file(state, str(Path(folder) / ADAPTER_WEIGHTS), metadata={METHOD_KEY: _method_json(method)})


def load_adapter_weights(model: nn.Module, folder: Path, method) -> None:
    """Load saved adapter tensors into an injected model; every tensor must match, and the
    method config must be the one the weights were saved with."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        saved_with = (fh.metadata() or {}).get(METHOD_KEY)
    if saved_with is not None and saved_with != _method_json(method):
        ours, theirs = json.loads(saved_with), dataclasses.asdict(method)
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ValueError(f"{path}: saved with another method config than the folder's (differs in {', '.join(keys)})")
    device = next(model.parameters()).device
    saved = load_file(str(path), device=str(device))
    own = dict(model.named_parameters())
    missing = sorted(set(adapter_state_dict(model)) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    wrong_shape = sorted(n for n in set(saved) & set(own) if saved[n].shape != own[n].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{path}: the adapter does not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {wrong_shape[:3]})")
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value)


class InjectedFamily(MethodFamily):
    """A family of layers medpeft injects itself: building, removal, saving and loading.

    Subclasses give :meth:`make_layer` (and may set ``state_class``, a
    :class:`RoutingState` subclass that prepares the family's per-batch tensors).
    """

    routed = True
    state_class: type = RoutingState

    def make_layer(self, name: str, base: nn.Linear, state: RoutingState, method, model: nn.Module) -> InjectedLinear:
        raise NotImplementedError

    def apply(self, model: nn.Module, method) -> nn.Module:
        inject_adapters(model, list(method.target_modules),
                        lambda name, base, state: self.make_layer(name, base, state, method, model), self.state_class())
        return model

    def remove(self, model: nn.Module) -> nn.Module:
        return remove_adapters(model)

    def save(self, model: nn.Module, method, folder: Path) -> None:
        save_adapter_weights(model, folder, method)

    def load(self, base_model: nn.Module, method, folder: Path) -> nn.Module:
        self.apply(base_model, method)
        load_adapter_weights(base_model, folder, method)
        return base_model.eval()

    def layers(self, model: nn.Module) -> list[InjectedLinear]:
        """The injected layers of ``model``, in model order."""
        state = routing_state(model)
        return list(state.layers) if state is not None else []

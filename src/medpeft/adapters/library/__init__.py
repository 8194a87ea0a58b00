"""``lora-library``: K independent peft LoRAs, one per route, and what the routers over it share.

Training the library is one run made of parts (:meth:`MethodFamily.parts`): the training
items are grouped by route (specialty, operation, their pair, or a metadata field), a route
with too few items is an error or merged into ``other`` (never dropped), and each route's
LoRA (r8/alpha16 by default, the BiRG-LoRA paper's library) is trained on its own items under
the run's whole budget, one after another, each in ``run_dir/parts/<route>`` (resumable one
by one). The adapter folder holds every route's adapter in peft's format (store.py).

Evaluated by itself, the library routes each question to its route's adapter by its tags
(oracle routing, ``reads_tags``); the routers (``arrow``, ``meteora``, ``lora-mixer``,
``medadapter``) read the same folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ...errors import ConfigError, MedpeftError
from ..inject import InjectedFamily, inject_adapters, remove_adapters
from ..registry import Part, Preset, method_from_dict, register_family
from ..routing import routing_state
from .audit import audit_adapters, question_usage
from .config import ROUTE_AXES, LibraryMethod, RouterMethod, validate_gate, validate_library, validate_router
from .layer import LibraryLinear, LibraryState
from .routes import folder_name, library_routes, route_index_table, tag_route_values
from .store import (LibraryInfo, copy_peft_adapter, export_peft, fingerprint, load_stacked, locate, read_library,
                    write_library_json)

__all__ = ["LibraryMethod", "RouterMethod", "LibraryLinear", "LibraryState", "LibraryFamily", "LibraryRouterFamily",
           "read_library", "locate", "library_of"]


def _lora_part_method(method):
    return method_from_dict({"name": "lora", "r": method.r, "alpha": method.alpha,
                             "dropout": getattr(method, "dropout", 0.0),
                             "target_modules": list(method.target_modules)})


def _inject_library(model, names: list[str], values: list[str], routes: str, r: int, alpha: float,
                    target_modules: list[str], router: str, trainable_library: bool, **layer_kwargs) -> LibraryState:
    """Wrap the targets in library layers of ``len(names)`` adapters; ``values`` are their route
    values (the oracle routing's table from tags to adapters)."""
    state = LibraryState()
    table = route_index_table(routes, values)
    state.route_table = torch.tensor(table) if table is not None else None
    state.n_adapters = len(names)
    state.library_names, state.library_values = list(names), list(values)
    inject_adapters(model, list(target_modules),
                    lambda name, base, st: LibraryLinear(base, n_adapters=len(names), r=r,
                                                         scales=[alpha / r] * len(names), router=router,
                                                         trainable_library=trainable_library, state=st, name=name,
                                                         **layer_kwargs), state)
    return state


def fill_library(model, info: LibraryInfo) -> None:
    """Copy the library's stacked weights into the model's library layers (frozen buffers)."""
    state = routing_state(model)
    device = next(model.parameters()).device
    stacked = load_stacked(info, device)
    layers = {layer.name: layer for layer in state.layers}
    if set(stacked) != set(layers):
        extra = sorted(set(stacked) ^ set(layers))[:2]
        raise MedpeftError(f"{info.folder}: the library's adapters wrap other modules than this model's targets "
                           f"({', '.join(extra)}): trained on another base model or other target_modules?")
    with torch.no_grad():
        for name, (a, b) in stacked.items():
            layer = layers[name]
            if layer.lora_A.shape != a.shape or layer.lora_B.shape != b.shape:
                raise MedpeftError(f"{info.folder}: module {name!r}: the library's LoRA weights {tuple(a.shape)} / "
                                   f"{tuple(b.shape)} do not fit this base model ({tuple(layer.lora_A.shape)} / "
                                   f"{tuple(layer.lora_B.shape)}): trained on another base model?")
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)


def library_of(method, run_dir: Path) -> LibraryInfo:
    """The trained library a router's ``method.library`` names for the run in ``run_dir``."""
    where = locate(method.library, run_dir)
    if not (where / "adapter").is_dir():
        hint = (" (a suite trains it first when it lists that cell before this one)" if "/" not in method.library
                else "")
        raise MedpeftError(f"config key 'method.library': {str(where)!r} holds no trained library{hint}")
    info = read_library(where / "adapter")
    checks = (("r", info.r, method.r), ("alpha", info.alpha, method.alpha),
              ("target_modules", sorted(info.target_modules), sorted(method.target_modules)))
    for key, theirs, ours in checks:
        if theirs != ours:
            raise MedpeftError(f"config key 'method.{key}' is {ours}, but the library in {where} has {theirs}")
    if method.n_adapters and method.n_adapters != len(info.names):
        raise MedpeftError(f"config key 'method.n_adapters' is {method.n_adapters}, but the library in {where} holds "
                           f"{len(info.names)} adapters (0 = as many as the library holds)")
    return info


class LibraryFamily(InjectedFamily):
    name = "library"
    methods = {"lora-library": "Adapter library"}
    schema = LibraryMethod
    state_class = LibraryState
    presets = (
        Preset("lora-library", "lora-library",
               about="one LoRA r8/alpha16 per specialty route, each trained on its route's items (routers read it)"),
    )

    def validate(self, method, prefix="method"):
        validate_library(method, prefix)

    def reads_tags(self, method) -> bool:
        return True  # evaluated by itself, a question uses its route's adapter

    # -- training: one part per route -------------------------------------------------------
    def parts(self, method, train_set):
        taken: set[str] = set()
        out = []
        for value, items in library_routes(method, train_set):
            name = folder_name(value, taken)
            taken.add(name)
            out.append(Part(name, _lora_part_method(method), items, {"route": value, "n_items": len(items)}))
        return out

    def assemble(self, method, parts, run_dirs, folder):
        for part in parts:
            copy_peft_adapter(run_dirs[part.name] / "adapter", folder / part.name)
        write_library_json(folder, method.routes, [{"name": p.name, **p.about} for p in parts], method.r,
                           method.alpha, list(method.target_modules))

    # -- a fresh library (contract tests, shape checks): one adapter per tag value ----------
    def apply(self, model, method):
        values = tag_route_values(method.routes)
        if values is None:
            raise ConfigError(f"config key 'method.routes' is {method.routes!r}: a metadata-routed library's adapters "
                              "come from its training data, so it is built by training, not applied")
        names = []
        for v in values:
            names.append(folder_name(v, set(names)))
        _inject_library(model, names, values, method.routes, method.r, method.alpha, method.target_modules,
                        router="route", trainable_library=True, dropout=method.dropout)
        return model

    def save(self, model, method, folder):
        """Each adapter's slices of the library layers as its own peft folder."""
        from peft import LoraConfig

        state = routing_state(model)
        config = LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                            target_modules=list(method.target_modules), bias="none", task_type="CAUSAL_LM")
        r = method.r
        for k, name in enumerate(state.library_names):
            export_peft(folder, name, {layer.name: (layer.lora_A[k * r:(k + 1) * r], layer.lora_B[:, k * r:(k + 1) * r])
                                       for layer in state.layers}, config)
        values = state.library_values
        write_library_json(folder, method.routes, [{"name": n, "route": v, "n_items": 0}
                                                   for n, v in zip(state.library_names, values)],
                           method.r, method.alpha, list(method.target_modules))

    def load(self, base_model, method, folder):
        info = read_library(folder)
        for key, theirs, ours in (("r", info.r, method.r), ("alpha", info.alpha, method.alpha),
                                  ("routes", info.routes, method.routes),
                                  ("target_modules", sorted(info.target_modules), sorted(method.target_modules))):
            if theirs != ours:
                raise ValueError(f"{folder / 'library.json'}: field {key!r} is {theirs!r}, the method's is {ours!r}")
        if info.routes not in ROUTE_AXES:
            raise MedpeftError(f"{folder}: a library routed by {info.routes!r} has no routing from the tags; "
                               "evaluate it through a router (arrow, meteora, lora-mixer, medadapter)")
        _inject_library(base_model, info.names, info.values, info.routes, info.r, info.alpha, info.target_modules,
                        router="route", trainable_library=False)
        fill_library(base_model, info)
        return base_model.eval()

    def count_active(self, model, method, trainable):
        state = routing_state(model)
        return trainable // max(state.n_adapters, 1), method.r

    def question_routing(self, records, prompt_mask):
        return question_usage(records, prompt_mask)

    def audit(self, model, method, routes, items):
        return audit_adapters(routes, items, routing_state(model).library_names)


class LibraryRouterFamily(InjectedFamily):
    """A router trained over a frozen library: library layers with a per-token top-k gate.

    Subclasses (``meteora``, ``lora-mixer``) give the schema, presets and losses. The router's
    adapter folder holds the gate weights and ``router.json`` (the library's fingerprint): a
    library changed after the router was trained is refused.
    """

    router = "topk"
    needs_tag_routes = False  # the losses read each question's route label from its tags

    def validate(self, method, prefix="method"):
        validate_router(method, prefix)
        if hasattr(method, "top_k"):
            validate_gate(method, prefix)

    def depends_on(self, method):
        return (method.library,) if "/" not in method.library else ()

    def identity_at_init(self, method) -> bool:
        return False  # the library is trained: the router changes the base model's outputs from the start

    def resolve(self, method, run_dir):
        info = library_of(method, run_dir)
        if self.needs_tag_routes and info.routes not in ROUTE_AXES:
            raise MedpeftError(f"config key 'method.library': {self.name} supervises its gate with each question's "
                               f"route from its tags, but the library is routed by {info.routes!r}")
        resolved = copy.copy(method)
        resolved.n_adapters = len(info.names)
        resolved.library_info = info
        return resolved

    def layer_kwargs(self, method) -> dict:
        return {"top_k": method.top_k, "temperature": method.temperature, "keep_logits": True}

    def apply(self, model, method):
        info = getattr(method, "library_info", None)
        on_meta = next(model.parameters()).device.type == "meta"
        if info is None and not on_meta:
            raise ConfigError(f"method {method.name!r}: its library is not located yet (MethodFamily.resolve)")
        if info is None or on_meta:  # shapes only (parameter accounting, target checks)
            n = len(info.names) if info is not None else (method.n_adapters or 1)
            names = values = [f"adapter_{k}" for k in range(n)]
            routes, info = "specialty", None
        else:
            names, values, routes = info.names, info.values, info.routes
        kwargs = self.layer_kwargs(method)
        kwargs["top_k"] = min(kwargs.get("top_k", 1), len(names))
        state = _inject_library(model, names, values, routes, method.r, method.alpha, method.target_modules,
                                router=self.router, trainable_library=False, **kwargs)
        if info is not None:
            fill_library(model, info)
            state.library_fingerprint = fingerprint(info)
        return model

    def save(self, model, method, folder):
        from ...io import write_json
        from ..inject import save_adapter_weights

        as_written = copy.copy(method)
        as_written.n_adapters = 0  # the metadata must not depend on where the library was found
        save_adapter_weights(model, folder, _plain(as_written))
        info = method.library_info
        write_json(folder / "router.json", {"library": str(info.folder), "adapters": info.names,
                                            "library_sha256": routing_state(model).library_fingerprint})

    def load(self, base_model, method, folder):
        import json

        from ..inject import load_adapter_weights

        saved = json.loads((folder / "router.json").read_text(encoding="utf-8"))
        self.apply(base_model, method)
        if saved.get("library_sha256") != routing_state(base_model).library_fingerprint:
            remove_adapters(base_model)
            raise ValueError(f"{folder / 'router.json'}: the library {method.library_info.folder} changed after this "
                             "router was trained on it (its weights or routes differ); train the router again")
        as_written = copy.copy(method)
        as_written.n_adapters = 0
        load_adapter_weights(base_model, folder, _plain(as_written))
        return base_model.eval()

    def count_active(self, model, method, trainable):
        """Active: the gates and top_k of the K adapters' weights (which are not trainable)."""
        return trainable, method.r * min(method.top_k, max(routing_state(model).n_adapters, 1))

    def parametric_preset(self, name):
        """``<router>-<N>x``: the router over a library of N adapters (``medpeft params``)."""
        import re

        for method_name in self.methods:
            found = re.fullmatch(rf"{re.escape(method_name)}-(\d+)x", name)
            if found and int(found.group(1)) >= 1:
                return {"name": method_name, "n_adapters": int(found.group(1))}
        return None

    def question_routing(self, records, prompt_mask):
        return question_usage(records, prompt_mask)

    def audit(self, model, method, routes, items):
        return audit_adapters(routes, items, routing_state(model).library_names)


def _plain(method):
    """``method`` without the attributes :meth:`LibraryRouterFamily.resolve` added."""
    import dataclasses

    return dataclasses.replace(method)


register_family(LibraryFamily())

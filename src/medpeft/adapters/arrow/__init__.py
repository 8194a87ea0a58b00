"""``arrow``: Arrow routing over the LoRA library (Ostapenko et al., 2024), through ``peft``.

Training-free: each adapter's prototype per layer is the top right singular vector of its
``B_k A_k`` (peft computes it by power iteration, seeded by ``rng_seed``); each token ``x``
mixes the top-k adapters by ``softmax(|<x, v_k>| / T)`` over the kept ones::

    z = W0 x + sum_{k in topk |x . v_k|} softmax(|x . v|_topk / T)_k (alpha/r) B_k A_k x

This is peft's own implementation (``ArrowConfig``, ``create_arrow_model``), called on the
library's peft folders; ``use_gks`` adds GenKnowSub (general adapters' mean subtracted from
each task adapter), which needs ``general_adapters`` (peft LoRA folders of the same shape).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import ConfigError, MedpeftError
from ..library import RouterMethod, library_of
from ..library.audit import audit_adapters, question_usage
from ..library.config import validate_gate, validate_router
from ..library.store import fingerprint
from ..registry import MethodFamily, Preset, register_family

ROUTER_JSON = "router.json"
_ARROW_SUFFIX = ".lora_arrow.arrow_router"  # peft's Arrow router module inside each adapted Linear


def _record_coefficients(state, name: str, module, args, kwargs, output) -> None:
    """Forward hook of peft's Arrow layer: for the audit, the per-token coefficients it mixed
    the adapters with, recomputed from its prototypes exactly as its forward does
    (``softmax(|x . v|_topk / T)``; peft keeps no copy of them)."""
    if not state.record:
        return
    x = args[0] if args else kwargs["x"]
    protos = module.prototypes
    tok = x.reshape(-1, x.shape[-1]).to(protos.dtype)
    sim = (tok @ protos.T).abs()
    top_v, idx = sim.topk(module.top_k, dim=1)
    full = torch.full_like(sim, float("-inf")).scatter(1, idx, top_v)
    coeff = torch.softmax(full / module.temperature, dim=1)
    state.records[name] = {"gates": coeff.reshape(*x.shape[:-1], -1).detach().float()}


def _attach_audit(model, names: list[str]) -> None:
    """A routing state on the Arrow model whose hooks record each module's coefficients when
    asked (``set_routing(..., record=True)``), so the routing audit works as for our layers."""
    from functools import partial

    from ..routing import ROUTING_ATTR, RoutingState

    state = RoutingState()
    state.library_names = list(names)
    setattr(model, ROUTING_ATTR, state)
    for name, module in model.named_modules():
        if name.endswith(_ARROW_SUFFIX):
            linear = name[: -len(_ARROW_SUFFIX)].removeprefix("base_model.model.")
            module.register_forward_hook(partial(_record_coefficients, state, linear), with_kwargs=True)


@dataclass
class ArrowMethod(RouterMethod):
    name: str = "arrow"
    top_k: int = 3  # peft's default
    temperature: float = 1.0
    use_gks: bool = False
    general_adapters: list[str] = field(default_factory=list)  # peft LoRA folders, for GenKnowSub
    rng_seed: int = 0  # the prototypes' power-iteration start (peft: None = nondeterministic)


def arrow_config(method, n_adapters: int):
    from peft import ArrowConfig

    return ArrowConfig(top_k=min(method.top_k, n_adapters), router_temperature=method.temperature,
                       use_gks=method.use_gks, rng_seed=method.rng_seed)


class ArrowFamily(MethodFamily):
    name = "arrow"
    methods = {"arrow": "Adapter library"}
    schema = ArrowMethod
    presets = (Preset("arrow", "arrow", about="Arrow LoRA-weight router over the library (peft), training-free"),)
    routed = True  # per-token coefficients over the adapters, recorded by hooks for the audit

    def validate(self, method, prefix="method"):
        validate_router(method, prefix)
        validate_gate(method, prefix)
        if method.use_gks and not method.general_adapters:
            raise ConfigError(f"config key '{prefix}.general_adapters' is empty, but '{prefix}.use_gks' is true: "
                              "GenKnowSub subtracts general adapters, name their folders")

    def depends_on(self, method):
        return (method.library,) if "/" not in method.library else ()

    def identity_at_init(self, method) -> bool:
        return False

    def training_free(self, method) -> bool:
        return True

    def resolve(self, method, run_dir):
        info = library_of(method, run_dir)
        for path in method.general_adapters:
            if not (Path(path) / "adapter_model.safetensors").is_file():
                raise MedpeftError(f"config key 'method.general_adapters': {path!r} is not a peft LoRA folder "
                                   "(no adapter_model.safetensors)")
        resolved = copy.copy(method)
        resolved.n_adapters = len(info.names)
        resolved.library_info = info
        return resolved

    def apply(self, model, method):
        from peft import LoraConfig, create_arrow_model, get_peft_model

        info = getattr(method, "library_info", None)
        on_meta = next(model.parameters()).device.type == "meta"
        if info is None and not on_meta:
            raise ConfigError("method 'arrow': its library is not located yet (MethodFamily.resolve)")
        if on_meta:
            # shapes only (parameter accounting): Arrow trains nothing and adds no parameters
            model = get_peft_model(model, LoraConfig(r=method.r, target_modules=list(method.target_modules)))
            for p in model.parameters():
                p.requires_grad_(False)
            return model
        model = create_arrow_model(model, [str(p) for p in info.paths], arrow_config(method, len(info.names)),
                                   general_adapter_paths=list(method.general_adapters) or None)
        for p in model.parameters():
            p.requires_grad_(False)
        _attach_audit(model, info.names)
        return model

    def remove(self, model):
        base = model.unload()
        for p in base.parameters():
            p.requires_grad_(False)
        return base

    def save(self, model, method, folder):
        from ...io import write_json

        info = method.library_info
        write_json(Path(folder) / ROUTER_JSON, {"library": str(info.folder), "adapters": info.names,
                                                "library_sha256": fingerprint(info)})

    def load(self, base_model, method, folder):
        import json

        saved = json.loads((Path(folder) / ROUTER_JSON).read_text(encoding="utf-8"))
        if saved.get("library_sha256") != fingerprint(method.library_info):
            raise ValueError(f"{Path(folder) / ROUTER_JSON}: the library {method.library_info.folder} changed after "
                             "this router was built on it (its weights or routes differ); build it again")
        return self.apply(base_model, method).eval()

    def count_active(self, model, method, trainable):
        return trainable, method.r * method.top_k

    def question_routing(self, records, prompt_mask):
        return question_usage(records, prompt_mask)

    def audit(self, model, method, routes, items):
        from ..routing import routing_state

        return audit_adapters(routes, items, routing_state(model).library_names)

    def parametric_preset(self, name):
        import re

        found = re.fullmatch(r"arrow-(\d+)x", name)
        return {"name": "arrow", "n_adapters": int(found.group(1))} if found and int(found.group(1)) >= 1 else None


register_family(ArrowFamily())

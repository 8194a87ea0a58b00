"""Adapter methods: building, training hooks, saving and loading, behind one registry.

Every method family registers a :class:`~medpeft.adapters.registry.MethodFamily` entry
(registry.py); the functions here, and the rest of the pipeline, only ask the registry.
Built-in families (each one module or folder and one registration):

* ``peft_lora``: ``lora``, ``dora`` through HF ``peft``;   * ``full``: full fine-tuning;
* ``birg/``: BiRG-LoRA and the rank-wise control;          * ``moe/``: the LoRA mixtures of experts;
* ``library/``: a per-route LoRA library (and the routers' shared layer); the routers over it:
  ``arrow/`` (peft's Arrow), ``meteora/``, ``lora_mixer/``, ``medadapter/`` (candidate verification).

``birg`` and ``moe`` inject their own layers (inject.py), since ``peft`` has no supported
plug-in API for new layer types.

A trained run's ``adapter/`` folder describes itself: ``medpeft_adapter.json`` holds the
family and the full method config next to the family's weight files, so the folder loads
without the run's config and a mismatched or unknown method is a clear error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..errors import ConfigError, MedpeftError
from ..io import atomic_dir, write_json
# The built-in families register themselves on import, in the order of the preset catalogue.
from . import peft_lora  # noqa: F401,I001
from . import full  # noqa: F401
from . import birg  # noqa: F401
from . import moe  # noqa: F401
from . import library  # noqa: F401
from . import meteora  # noqa: F401
from . import lora_mixer  # noqa: F401
from . import arrow  # noqa: F401
from . import medadapter  # noqa: F401
from .registry import (MethodFamily, Preset, catalogue, family_of, method_from_dict, method_label, preset_config,
                       register_family, unregister_family)
from .routing import routing_state, set_routing

ADAPTER_DIR = "adapter"
ADAPTER_META = "medpeft_adapter.json"  # not peft's adapter_config.json: a schema peft cannot read
META_VERSION = 1

__all__ = ["apply_method", "reads_tags", "save_trained", "save_assembled", "load_trained", "read_adapter_method", "set_routing",
           "routing_state", "family_of", "register_family", "unregister_family", "MethodFamily", "Preset",
           "catalogue", "preset_config", "method_from_dict", "method_label", "ADAPTER_DIR", "ADAPTER_META"]


def apply_method(model: nn.Module, method) -> nn.Module:
    """Make ``model`` trainable with ``method``; returns the model to train."""
    return family_of(method).apply(model, method)


def reads_tags(method) -> bool:
    """Whether the method's outputs depend on the clinical tags (tag perturbation applies)."""
    return family_of(method).reads_tags(method)


def save_trained(model: nn.Module, method, run_dir: Path, *, built=None) -> Path:
    """Save the trained weights and the method to ``run_dir/adapter`` atomically. ``method`` is
    the config's; ``built`` the method as resolved for the run (:meth:`MethodFamily.resolve`),
    which the family saves with (default: ``method``)."""
    final = Path(run_dir) / ADAPTER_DIR
    family = family_of(method)
    with atomic_dir(final) as tmp:
        family.save(model, built if built is not None else method, tmp)
        _write_meta(tmp, family, method)
    return final


def save_assembled(method, built, parts: list, run_dirs: dict[str, Path], run_dir: Path) -> Path:
    """The adapter folder of a method made of parts (:meth:`MethodFamily.parts`), atomically."""
    final = Path(run_dir) / ADAPTER_DIR
    family = family_of(method)
    with atomic_dir(final) as tmp:
        family.assemble(built, parts, run_dirs, tmp)
        _write_meta(tmp, family, method)
    return final


def _write_meta(folder: Path, family: MethodFamily, method) -> None:
    write_json(folder / ADAPTER_META, {"medpeft_adapter": META_VERSION, "family": family.name,
                                       "method": dataclasses.asdict(method)})


def read_adapter_method(run_dir: Path, expected=None):
    """The method config an adapter folder was trained with (validated), from its own files;
    ``expected`` (e.g. the run config's method) must equal it. Cheap: no weights are read.

    Folders written before ``medpeft_adapter.json`` existed (``medpeft_method.json``) are read
    from their old files: our own adapters kept the config in ``adapter_config.json``, peft's
    took it from the run's config (``expected``).
    """
    folder = Path(run_dir) / ADAPTER_DIR
    if not folder.is_dir():
        raise MedpeftError(f"{run_dir}: no trained adapter (folder '{ADAPTER_DIR}' is missing); train it first")
    meta_path = folder / ADAPTER_META
    if not meta_path.is_file() and (folder / LEGACY_META).is_file():
        method = _legacy_method(folder, expected)
    elif not meta_path.is_file():
        raise MedpeftError(f"{meta_path}: missing; the folder was not written by medpeft")
    else:
        meta = _read_json(meta_path)
        if not isinstance(meta, dict) or not isinstance(meta.get("method"), dict):
            raise MedpeftError(f"{meta_path}: field 'method' must be the method's config (a mapping)")
        version = meta.get("medpeft_adapter")
        if not isinstance(version, int) or not 1 <= version <= META_VERSION:
            raise MedpeftError(f"{meta_path}: field 'medpeft_adapter': format version {version!r} is not one this "
                               f"medpeft reads (1..{META_VERSION}); a newer medpeft wrote it?")
        method = _method_from(meta["method"], meta_path)
        if meta.get("family") != family_of(method).name:
            raise MedpeftError(f"{meta_path}: field 'family': {meta.get('family')!r}, but method "
                               f"{method.name!r} belongs to family {family_of(method).name!r}")
    if expected is not None and method != expected:
        ours, theirs = dataclasses.asdict(method), dataclasses.asdict(expected)
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise MedpeftError(f"{meta_path}: the adapter was trained as method {method.name!r}, which "
                           f"differs from the config's method {expected.name!r} in {', '.join(keys)}")
    return method


def load_trained(base_model: nn.Module, run_dir: Path, expected=None) -> nn.Module:
    """The base model with the trained adapter of ``run_dir`` applied (eval mode).

    The method comes from the adapter folder (:func:`read_adapter_method`); ``expected``
    must equal it.
    """
    from safetensors import SafetensorError

    method = read_adapter_method(run_dir, expected)
    folder = Path(run_dir) / ADAPTER_DIR
    family = family_of(method)
    try:
        method = family.resolve(method, Path(run_dir))
    except MedpeftError as err:  # e.g. a router whose library is gone or changed
        raise MedpeftError(f"{folder}: {err}") from None
    try:
        return family.load(base_model, method, folder)
    except MedpeftError as err:  # e.g. a router's library that does not fit this base model
        raise MedpeftError(f"{folder}: {err}") from None
    except (ValueError, RuntimeError, OSError, KeyError, SafetensorError) as err:  # unreadable or misfit files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedpeftError(f"{folder}: cannot load the adapter into this base model: {first}") from None


LEGACY_META = "medpeft_method.json"  # before medpeft_adapter.json: the method name only


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedpeftError(f"{path}: not valid JSON ({err})") from None


def _method_from(data: dict, path: Path):
    try:
        return method_from_dict(data)
    except ConfigError as err:
        raise MedpeftError(f"{path}: {err}") from None


def _legacy_method(folder: Path, expected):
    legacy = _read_json(folder / LEGACY_META)
    name = legacy.get("method") if isinstance(legacy, dict) else None
    old_config = folder / "adapter_config.json"
    saved = _read_json(old_config) if old_config.is_file() else {}
    if isinstance(saved, dict) and isinstance(saved.get("method"), dict):  # medpeft's own injected adapters
        return _method_from(saved["method"], old_config)
    if expected is None or expected.name != name:
        raise MedpeftError(f"{folder / LEGACY_META}: an adapter folder of an older medpeft (method {name!r}); "
                           "evaluate it through its run folder, whose config.yaml names the method")
    return expected

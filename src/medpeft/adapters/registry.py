"""The method registry: one entry per method family holds everything the pipeline asks of it.

A *family* is a set of methods sharing one implementation (``birg`` and ``rankwise``; the
LoRA mixtures of experts; ``lora`` and ``dora`` through ``peft``; ``full``). Its entry is a
:class:`MethodFamily` subclass registered once with :func:`register_family`; training,
evaluation, checkpointing, parameter accounting, the audit, the CLI, the report and the
benchmarks ask the registry and never name a method. Adding a family is one folder under
``adapters/`` (config, layer, losses, audit) plus its registration (docs/methods.md, "How
to add a method").

Presets (``method: {preset: NAME}``) are named settings of a method, each built from a base
(another preset, or the method's schema defaults) and the keys it changes; ablations are
presets of the same method, not copies. An *alias* is another name of a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ConfigError
from ..schema import from_dict, require

# The linear layers adapters wrap by default (every attention and MLP projection of a
# Llama/Qwen-style decoder), as peft's ``target_modules``.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_PRESET = "lora-r16"  # the method of a config without a ``method:`` section

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .audit_tools import AuditResult


@dataclass(frozen=True)
class Preset:
    """A named method setting: ``base``'s keys (or the schema defaults), updated with ``overrides``.

    ``method`` is the method name the preset configures (the config's ``method.name``).
    ``table``: a row of the papers' tables (the default rows of ``medpeft params``);
    ``benchmark``: timed by default in ``benchmarks/``.
    """

    name: str
    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    base: str | None = None
    about: str = ""
    table: bool = False
    benchmark: bool = False


@dataclass
class Part:
    """One independent training of a method made of several (:meth:`MethodFamily.parts`)."""

    name: str  # its folder under ``run_dir/parts``
    method: Any  # the method config it trains (a plain preset's, e.g. LoRA r8)
    items: list  # its training items
    about: dict = field(default_factory=dict)  # what the adapter folder records about it


class MethodFamily:
    """Everything the pipeline asks of a method family. Subclass, fill in, register.

    Class attributes describe the family; methods have working defaults for an unrouted
    method that adds no auxiliary losses and no training state. ``method`` arguments are
    instances of :attr:`schema` (the validated ``method:`` config section).
    """

    name: str = ""  # family id, e.g. "birg"
    methods: Mapping[str, str] = {}  # method name (config ``method.name``) -> family label in reports
    schema: type = object  # dataclass of the ``method:`` section; its first field is ``name``
    presets: tuple[Preset, ...] = ()
    aliases: Mapping[str, str] = {}  # other name -> preset name
    routed: bool = False  # per-question routing (a RoutingState; audit)
    # Auxiliary losses that depend on the weights only: computed once per optimizer step (on
    # its first micro-batch) with weight 1, instead of per micro-batch weighted by its share.
    parameter_losses: frozenset[str] = frozenset()
    # Every parameter of the model trains (full fine-tuning), not only added ones.
    trains_base_weights: bool = False
    # Rows of the papers' parameter tables that are not presets (``accounting``'s
    # ``library-<N>x-<preset>`` form, e.g. an adapter library), shown by ``medpeft params``.
    table_rows: tuple[str, ...] = ()

    # -- config ---------------------------------------------------------------------------
    def validate(self, method, prefix: str = "method") -> None:
        """Check values across keys (e.g. ``kappa <= r``); raise ConfigError naming the key."""

    def reads_tags(self, method) -> bool:
        """Whether outputs depend on the clinical tags (so tag perturbation can change them)."""
        return False

    def identity_at_init(self, method) -> bool:
        """Whether a freshly built adapter leaves the base model's outputs unchanged (B = 0 etc.)."""
        return True

    # -- building -------------------------------------------------------------------------
    def apply(self, model: "nn.Module", method) -> "nn.Module":
        """Make ``model`` trainable with ``method``; returns the model to train."""
        raise NotImplementedError

    def remove(self, model: "nn.Module") -> "nn.Module":
        """Undo :meth:`apply`: the bare base model, every weight frozen (benchmarks reuse it)."""
        raise NotImplementedError

    def parametric_preset(self, name: str) -> dict[str, Any] | None:
        """A method section for a preset name outside the catalogue that the family reads as
        parameters (``lora-r8``: LoRA of rank 8), or None."""
        return None

    def count_active(self, model: "nn.Module", method, trainable: int) -> tuple[int, int]:
        """(active parameters, active rank) of a built model: what one question's forward uses."""
        return trainable, int(getattr(method, "r", 0))

    # -- runs that read other runs, or are made of several -----------------------------------
    def depends_on(self, method) -> tuple[str, ...]:
        """Suite cells (preset names) this method reads, e.g. a router's adapter library; the
        suite must train them first (a cell named like a path is a run folder instead)."""
        return ()

    def resolve(self, method, run_dir: Path):
        """The method as the run in ``run_dir`` builds it (e.g. a router's library located
        next to the run, its size read from the library). The config keeps ``method`` as
        written; only building and loading see the resolved one."""
        return method

    def training_free(self, method) -> bool:
        """Whether the method has nothing to train (e.g. Arrow routing over a trained library):
        training writes its adapter folder without an optimizer loop."""
        return False

    def fit(self, model: "nn.Module", method, train_set: list, tokenizer, cfg) -> dict | None:
        """Training that is not the answer-loss loop (e.g. a verifier fitted on candidates):
        fit ``model`` (built by :meth:`apply`) on ``train_set`` and return what ``summary.json``
        adds, or None to train with the loop."""
        return None

    def trains_with_loop(self, method) -> bool:
        """Whether training runs the answer-loss loop (not training-free, no own :meth:`fit`)."""
        return not self.training_free(method) and type(self).fit is MethodFamily.fit

    def parts(self, method, train_set: list) -> "list[Part] | None":
        """Independent trainings the method is made of: each part is trained under the run's
        budget into ``run_dir/parts/<name>`` (resumable one by one), then :meth:`assemble`
        writes the adapter. None: one training of ``method`` itself."""
        return None

    def assemble(self, method, parts: "list[Part]", run_dirs: dict[str, Path], folder: Path) -> None:
        """Write the adapter folder from the trained parts (their run folders by part name)."""
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------
    def loss_weights(self, method) -> dict[str, float]:
        """Weight of every auxiliary loss the family defines (0 = off), by term name."""
        return {}

    def aux_losses(self, model: "nn.Module", method) -> dict[str, "torch.Tensor"]:
        """The unweighted auxiliary losses of the last forward pass: exactly the terms of
        non-zero weight (parameter losses only when the routing state asks for them)."""
        return {}

    def micro_batch_update(self, model: "nn.Module"):
        """What a micro-batch's forward leaves to apply once the optimizer step is done (e.g. new
        entries of an expert memory queue), or None. The trainer collects these from every
        micro-batch of the step -- on every process -- and passes them, in micro-batch order,
        to :meth:`apply_step_updates`, so the state stays identical on every rank."""
        return None

    def apply_step_updates(self, model: "nn.Module", updates: list) -> None:
        """Apply one step's :meth:`micro_batch_update` results (micro-batch order)."""

    def training_state(self, model: "nn.Module") -> dict[str, "torch.Tensor"]:
        """Tensors besides the trainable weights that a resumed run needs (checkpointed)."""
        return {}

    def load_training_state(self, model: "nn.Module", tensors: dict[str, "torch.Tensor"]) -> None:
        if tensors:
            raise ValueError(f"method family {self.name!r} keeps no training state, got {sorted(tensors)[:3]}")

    # -- saving ---------------------------------------------------------------------------
    def save(self, model: "nn.Module", method, folder: Path) -> None:
        """Write the trained weights into ``folder`` (which exists and is empty)."""
        raise NotImplementedError

    def load(self, base_model: "nn.Module", method, folder: Path) -> "nn.Module":
        """The base model with the weights :meth:`save` wrote in ``folder`` applied."""
        raise NotImplementedError

    # -- audit (routed families) ----------------------------------------------------------
    def question_routing(self, records: dict[str, dict[str, "torch.Tensor"]],
                         prompt_mask: "torch.Tensor") -> dict[str, dict[str, "torch.Tensor"]]:
        """Per-question routing values ``{module: {key: [B, ...]}}`` from one batch's records."""
        return records

    def audit(self, model: "nn.Module", method, routes: dict[str, dict[str, "torch.Tensor"]],
              items: list) -> "AuditResult":
        """What the routing did on ``items`` (``routes`` from :meth:`question_routing`)."""
        raise NotImplementedError


_FAMILIES: dict[str, MethodFamily] = {}
_METHODS: dict[str, MethodFamily] = {}  # method name -> family
_PRESETS: dict[str, Preset] = {}
_ALIASES: dict[str, str] = {}


def register_family(family: MethodFamily) -> MethodFamily:
    """Add a family; its method, preset and alias names must be new, its presets valid."""
    if not family.name or not family.methods or not dataclasses.is_dataclass(family.schema):
        raise ValueError(f"{type(family).__name__}: a family needs a name, method names and a dataclass schema")
    if family.name in _FAMILIES:
        raise ValueError(f"method family {family.name!r} is already registered")
    names = [*family.methods, *(p.name for p in family.presets), *family.aliases]
    taken = [n for n in names if n in _METHODS or n in _PRESETS or n in _ALIASES]
    if taken or len(set(family.methods)) != len(family.methods) or \
            len({p.name for p in family.presets} | set(family.aliases)) != len(family.presets) + len(family.aliases):
        raise ValueError(f"method family {family.name!r}: names already taken or repeated: {taken or names}")
    for preset in family.presets:
        if preset.method not in family.methods:
            raise ValueError(f"preset {preset.name!r} configures {preset.method!r}, not a method of {family.name!r}")
        if preset.name in family.methods and preset.method != preset.name:  # method name `m` implies preset `m`
            raise ValueError(f"preset {preset.name!r} is named like a method but configures {preset.method!r}")
    for alias in family.aliases:
        if alias in family.methods:
            raise ValueError(f"alias {alias!r} is named like a method")
    own = {p.name: p for p in family.presets}
    for preset in family.presets:  # bases must not loop
        seen, current = {preset.name}, preset
        while current.base is not None and current.base in own:
            if current.base in seen:
                raise ValueError(f"preset {preset.name!r}: its bases loop ({' -> '.join([*seen, current.base])})")
            seen.add(current.base)
            current = own[current.base]
    if family.routed and type(family).audit is MethodFamily.audit:
        raise ValueError(f"method family {family.name!r} is routed but has no audit (implement MethodFamily.audit)")
    _FAMILIES[family.name] = family
    _METHODS.update({m: family for m in family.methods})
    _PRESETS.update({p.name: p for p in family.presets})
    _ALIASES.update(family.aliases)
    try:
        for preset in family.presets:
            if preset.base is not None and resolve_preset(preset.base).method not in family.methods:
                raise ValueError(f"preset {preset.name!r}: base {preset.base!r} is not a preset of {family.name!r}")
            preset_config(preset.name)  # every preset builds and validates
        for alias, target in family.aliases.items():
            if target not in _PRESETS:
                raise ValueError(f"alias {alias!r} names {target!r}, which is not a preset")
    except (ValueError, ConfigError):
        unregister_family(family.name)
        raise
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests that register one of their own clean up with this)."""
    family = _FAMILIES.pop(name)
    for m in family.methods:
        _METHODS.pop(m, None)
    for p in family.presets:
        _PRESETS.pop(p.name, None)
    for a in family.aliases:
        _ALIASES.pop(a, None)


def families() -> list[MethodFamily]:
    return list(_FAMILIES.values())


def method_names() -> list[str]:
    return list(_METHODS)


def family_of(method: Any) -> MethodFamily:
    """The family of a method config (or of a method name)."""
    name = method if isinstance(method, str) else getattr(method, "name", None)
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def method_label(name: str) -> str:
    """The report's family label of a method name (the name itself when unknown, e.g. 'base')."""
    family = _METHODS.get(name)
    return family.methods[name] if family else name


def catalogue() -> list[str]:
    """Every preset, in registration order (aliases excluded: they name a preset listed here)."""
    return list(_PRESETS)


def table_presets() -> list[str]:
    """The presets that are rows of the papers' tables."""
    return [name for name, p in _PRESETS.items() if p.table]


def table_rows() -> list[str]:
    """Every row of the papers' parameter tables: the table presets, then the families' other rows."""
    return [*table_presets(), *(row for f in _FAMILIES.values() for row in f.table_rows)]


def benchmark_presets() -> list[str]:
    """The presets the benchmarks time by default."""
    return [name for name, p in _PRESETS.items() if p.benchmark]


def aliases() -> dict[str, str]:
    return dict(_ALIASES)


def describe_presets() -> list[dict[str, Any]]:
    """One row per preset: its method, family and label, base, the keys it changes, other names."""
    rows = []
    for name, p in _PRESETS.items():
        family = _METHODS[p.method]
        rows.append({"preset": name, "method": p.method, "family": family.name, "label": family.methods[p.method],
                     "base": p.base, "changes": dict(p.overrides), "about": p.about,
                     "aliases": [a for a, target in _ALIASES.items() if target == name]})
    return rows


def resolve_preset(name: str) -> Preset:
    """The preset called ``name`` (following an alias)."""
    name = _ALIASES.get(name, name)
    if name not in _PRESETS:
        raise ConfigError(f"config key 'method.preset' must be one of {', '.join([*_PRESETS, *_ALIASES])}, "
                          f"got {name!r}")
    return _PRESETS[name]


def _parametric(name: str) -> dict[str, Any] | None:
    for family in _FAMILIES.values():
        data = family.parametric_preset(name)
        if data is not None:
            return data
    return None


def is_preset(name: str) -> bool:
    """A catalogue preset, an alias, or a name a family reads as parameters (``lora-r8``)."""
    return name in _PRESETS or name in _ALIASES or _parametric(name) is not None


def base_values(preset: Preset) -> dict[str, Any]:
    """The keys a preset starts from: its base preset's, or the schema defaults of its method."""
    if preset.base is not None:
        return preset_dict(preset.base)
    return dataclasses.asdict(_METHODS[preset.method].schema(name=preset.method))


def preset_dict(name: str) -> dict[str, Any]:
    """The full method section a preset stands for (every key of its schema)."""
    if name not in _PRESETS and name not in _ALIASES and (data := _parametric(name)) is not None:
        return {**dataclasses.asdict(_METHODS[data["name"]].schema(name=data["name"])), **data}
    preset = resolve_preset(name)
    return {**base_values(preset), **preset.overrides, "name": preset.method}


def preset_config(name: str):
    """The validated method config of a preset."""
    return method_from_dict({"preset": name})


def method_from_dict(data: Any, prefix: str = "method"):
    """Build and validate a ``method:`` section.

    ``{preset: P, **keys}``: the preset's keys updated with ``keys`` (the preset names the
    method). A method ``name`` that is itself a preset (``rankwise``) implies it.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix}' must be a mapping, got {data!r}")
    data = dict(data)
    preset = data.pop("preset", None)
    for key, value in (("preset", preset), ("name", data.get("name"))):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"config key '{prefix}.{key}' must be str, got {value!r}")
    if preset is None and data.get("name") is not None and is_preset(data["name"]):
        preset = data["name"]
    if preset is not None:
        expanded = preset_dict(preset)
        if data.get("name") not in (None, expanded["name"], preset):
            raise ConfigError(f"config key '{prefix}.name' is {data['name']!r}, but '{prefix}.preset' {preset!r} is a "
                              f"preset of method {expanded['name']!r}; give one of them")
        data = {**expanded, **data, "name": expanded["name"]}
    name = data.get("name", preset_dict(DEFAULT_PRESET)["name"])
    if name not in _METHODS:
        raise ConfigError(f"config key '{prefix}.name' must be one of {', '.join(_METHODS)}, got {name!r}")
    family = _METHODS[name]
    method = from_dict(family.schema, data, prefix)
    check_common_keys(method, prefix)
    family.validate(method, prefix)
    return method


def check_common_keys(method, prefix: str = "method") -> None:
    """Keys shared by convention across families: rank ``r`` >= 1, ``alpha`` > 0, ``dropout``
    in [0, 1), a non-empty ``target_modules``, and loss weights (fields ``l_<term>``) >= 0."""
    import math

    values = dataclasses.asdict(method)
    if "r" in values:
        require(values["r"] >= 1, f"{prefix}.r", f"must be >= 1, got {values['r']}")
    if "alpha" in values:
        require(math.isfinite(values["alpha"]) and values["alpha"] > 0, f"{prefix}.alpha",
                f"must be a finite number > 0, got {values['alpha']}")
    if "dropout" in values:
        require(0 <= values["dropout"] < 1, f"{prefix}.dropout", f"must be in [0, 1), got {values['dropout']}")
    if "target_modules" in values:
        require(bool(values["target_modules"]), f"{prefix}.target_modules", "must name at least one module")
    for key, value in values.items():
        if key.startswith("l_") and isinstance(value, float):
            require(math.isfinite(value) and value >= 0, f"{prefix}.{key}",
                    f"is a loss weight and must be >= 0, got {value}")

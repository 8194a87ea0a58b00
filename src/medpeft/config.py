"""Run configs: YAML files validated against dataclasses, overridable with ``key=value``.

Validation happens at load: an unknown key, a wrong type or a missing required field
raises :class:`ConfigError` with a one-line message naming the dotted key. The method
section is validated against the schema of the method it names (``method.name``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUILTIN_CONFIGS = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny", a hub id or a local folder
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    device: str | None = None  # default: cuda if available
    attn_implementation: str | None = "sdpa"


@dataclass
class LoraMethod:
    """``lora`` and ``dora`` (through ``peft``): rank, scale ``alpha/r``, targets."""

    name: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class FullMethod:
    """Full fine-tuning: every weight trainable (the plasticity upper bound)."""

    name: str = "full"


@dataclass
class BirgMethod:
    """``birg`` and ``rankwise``: rank-gated LoRA (adapters/birg.py has the formulas)."""

    name: str = "birg"
    r: int = 16  # R, rank atoms per module
    kappa: int = 4  # active atoms per question (top-k)
    alpha: float = 32.0
    tau: float = 0.5  # softmax temperature of the gate
    dropout: float = 0.05
    hidden_gate: bool = True  # a_h(h_x) branch
    clinical_gate: bool = True  # a_s, a_o, a_so branches
    injection: bool = True  # rho(x); false = rho fixed to 1
    l_ent: float = 0.01
    l_bal: float = 0.001
    l_orth: float = 0.1
    l_axis: float = 0.5
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class MoeMethod:
    """LoRA mixtures of experts (adapters/moe.py has the formulas)."""

    name: str = "moelora"
    n_experts: int = 4  # routed (specialist) experts per module; route router: 0 = one per specialty
    top_k: int = 2  # topk router
    ranks: list[int] = field(default_factory=lambda: [8])  # specialist i has rank ranks[i % len]
    alpha: float = 16.0
    alpha_ratio: float = 0.0  # > 0: alpha_i = alpha_ratio * r_i (Med-MoE-LoRA: 2)
    n_anchor: int = 0  # always-on base experts
    anchor_rank: int = 8
    router: str = "topk"  # topk | soft | route
    tau: float = 1.0  # soft router temperature (initial value when learned)
    learn_tau: bool = False
    n_min: int | None = None  # Med-MoE-LoRA layer schedule N_l (overrides n_experts)
    n_max: int | None = None
    gamma: float = 1.0
    dropout: float = 0.05
    l_balance: float = 0.0  # Switch load balance (topk)
    l_var: float = 0.0  # variance of batch-mean gates across experts (Med-MoE-LoRA L_aux)
    l_anchor: float = 0.0  # ||B_a A_a||^2 of anchors
    l_con: float = 0.0  # contrastive expert loss (MoELoRA / SparseDoctor)
    gate_contrast: bool = False  # SparseDoctor: the contrastive term also supervises the router
    con_temperature: float = 0.1
    queue_size: int = 0  # SparseDoctor expert memory queue (entries per module)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


METHOD_SCHEMAS: dict[str, type] = {"lora": LoraMethod, "dora": LoraMethod, "full": FullMethod,
                                   "birg": BirgMethod, "rankwise": BirgMethod,
                                   "moelora": MoeMethod, "sparsedoctor": MoeMethod, "medmoe": MoeMethod,
                                   "moe-vanilla": MoeMethod, "multilora": MoeMethod}

# Named presets: the paper's rows and ablations are settings of a few methods, not copies.
# ``method: {preset: NAME, ...}`` starts from the preset; keys given beside it win. A method
# ``name`` that is itself a preset (``rankwise``) implies it.
PRESETS: dict[str, dict[str, Any]] = {
    "lora-r4": {"name": "lora", "r": 4, "alpha": 8.0},
    "lora-r16": {"name": "lora", "r": 16, "alpha": 32.0},
    "lora-r24": {"name": "lora", "r": 24, "alpha": 48.0},
    "dora-r24": {"name": "dora", "r": 24, "alpha": 48.0},
    "full": {"name": "full"},
    "birg": {"name": "birg"},
    # the paper's generic rank-wise control: same rank-16/top-4 adapter, hidden branch only,
    # no injection, no orthogonality or axis losses
    "rankwise": {"name": "rankwise", "clinical_gate": False, "injection": False, "l_orth": 0.0, "l_axis": 0.0},
    "birg-clinical-only": {"name": "birg", "hidden_gate": False},
    "birg-hidden-only": {"name": "birg", "clinical_gate": False},
    "birg-no-injection": {"name": "birg", "injection": False},
    "birg-top2": {"name": "birg", "kappa": 2},
    "birg-top4": {"name": "birg", "kappa": 4},
    "birg-top8": {"name": "birg", "kappa": 8},
    "birg-no-orth": {"name": "birg", "l_orth": 0.0},
    "birg-no-axis": {"name": "birg", "l_axis": 0.0},
    # LoRA mixtures of experts
    "moelora": {"name": "moelora", "n_experts": 4, "top_k": 2, "ranks": [8], "alpha": 16.0, "l_con": 0.1},
    "sparsedoctor": {"name": "sparsedoctor", "n_experts": 4, "top_k": 2, "ranks": [8], "alpha": 16.0,
                     "l_con": 0.1, "gate_contrast": True, "queue_size": 1024},
    "moe-vanilla": {"name": "moe-vanilla", "n_experts": 4, "top_k": 2, "ranks": [8], "alpha": 16.0,
                    "l_balance": 0.01},
    "medmoe": {"name": "medmoe", "router": "soft", "learn_tau": True, "ranks": [8, 16, 32], "alpha_ratio": 2.0,
               "n_anchor": 1, "anchor_rank": 8, "n_min": 2, "n_max": 8, "gamma": 2.0, "l_var": 0.01,
               "l_anchor": 0.01},
    "medmoe-uniform": {"name": "medmoe", "router": "soft", "learn_tau": True, "ranks": [8, 16, 32],
                       "alpha_ratio": 2.0, "n_anchor": 1, "anchor_rank": 8, "n_min": 4, "n_max": 4, "gamma": 1.0,
                       "l_var": 0.01, "l_anchor": 0.01},
    "medmoe-bottom-heavy": {"name": "medmoe", "router": "soft", "learn_tau": True, "ranks": [8, 16, 32],
                            "alpha_ratio": 2.0, "n_anchor": 1, "anchor_rank": 8, "n_min": 8, "n_max": 2,
                            "gamma": 2.0, "l_var": 0.01, "l_anchor": 0.01},
    "medmoe-asymmetric": {"name": "medmoe", "router": "soft", "learn_tau": True, "ranks": [8, 16, 32],
                          "alpha_ratio": 2.0, "n_anchor": 1, "anchor_rank": 8, "n_min": 2, "n_max": 8,
                          "gamma": 2.0, "l_var": 0.01, "l_anchor": 0.01},
    "multilora": {"name": "multilora", "router": "route", "n_experts": 0, "ranks": [8], "alpha": 16.0},
}


@dataclass
class SourceConfig:
    """One benchmark source: a local file/folder in native format, or the hub copy."""

    benchmark: str
    path: str | None = None
    name: str | None = None  # display name in results; default = benchmark
    hub: bool = False
    hub_id: str | None = None
    hub_config: str | None = None
    split: str | None = None
    answer_file: str | None = None  # CMB answer key
    ground_truth: str | None = None  # PubMedQA test_ground_truth.json
    cop_base: int | None = None  # MedMCQA: 1 original release (default for files), 0 hub copy
    encoding: str = "utf-8"
    skip_invalid: bool = False
    limit: int | None = None  # seeded subset of this many items (e.g. MedQA test700)
    subset_seed: int = 0
    per_route: int | None = None  # route-balanced: this many items per specialty route
    routes: list[str] | None = None
    exclude: list[str] = field(default_factory=list)  # eval-set names this source must not overlap
    text_only_tags: bool = False

    @property
    def display_name(self) -> str:
        return self.name or self.benchmark


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    max_length: int = 768


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 8  # effective batch: examples per optimizer step
    micro_batch_size: int = 4  # examples per forward/backward (gradient accumulation)
    lr: float = 1e-4
    lr_schedule: str = "linear"  # linear | cosine | constant (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 100  # checkpoint period in optimizer steps (0 = only at the end)
    log_every: int = 10
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (regional compilation): true | false | auto (= on CUDA).
    # Costs a one-off compile (1-5 minutes for an 8B model) and pays back within tens of steps.
    compile: Any = "auto"


@dataclass
class EvalConfig:
    scorer: str = "letters"  # letters | generate
    batch_size: int = 16
    max_new_tokens: int = 10
    # Experimental: the generate scorer decodes with a static KV cache and a compiled
    # decoding step (transformers' CompileConfig; CUDA graphs on a GPU). Same tokens as the
    # default (tested on CPU); its GPU speed is not measured yet (docs/performance.md).
    compile_decode: bool = False
    benchmarks: list[SourceConfig] = field(default_factory=list)
    # Weak-axis perturbation: re-evaluate with the tags of this share of items replaced by a
    # random other value, once per perturbation seed (tag-routed methods only).
    perturb_rates: list[float] = field(default_factory=list)
    perturb_seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    # Presets trained side by side under the same budget and data (each in output_dir/<preset>,
    # its method section replaced by the preset); empty = train the one 'method' below.
    methods: list[str] = field(default_factory=list)
    # Training seeds; more than one trains every method once per seed (output_dir/<preset>/seed-<s>).
    seeds: list[int] = field(default_factory=list)
    # Further grid axes: dotted config key -> list of values, e.g. {model.name: [A, B]} or
    # {data.train: [[...cmb source...], [...cmexam source...]]}; one cell per combination,
    # each in output_dir/<cell> (see grid_cells).
    grid: Any = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = field(default_factory=LoraMethod)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "method.router": ("topk", "soft", "route"),
    "model.dtype": ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
    "train.lr_schedule": ("linear", "cosine", "constant"),
    "train.compile": ("auto", True, False),
    "eval.scorer": ("letters", "generate"),
}


# ----------------------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, naming the dotted key of any problem."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix + '.' if prefix else ''}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            if cls is RunConfig and name == "method":
                kwargs[name] = _method_from_dict(data[name])
            else:
                kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}'")
        if key in CHOICES and name in kwargs and kwargs[name] not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(str(c).lower() for c in CHOICES[key])}, got {kwargs[name]!r}")
    return cls(**kwargs)


def expand_preset(data: dict) -> dict:
    """``{preset: P, **keys}`` -> the preset's keys updated with ``keys``; the preset names the method."""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is None and data.get("name") in PRESETS:
        preset = data["name"]
    if preset is None:
        return data
    if preset not in PRESETS:
        raise ConfigError(f"config key 'method.preset' must be one of {', '.join(PRESETS)}, got {preset!r}")
    return {**PRESETS[preset], **data, "name": PRESETS[preset]["name"]}


def _method_from_dict(data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'method' must be a mapping, got {data!r}")
    data = expand_preset(data)
    name = data.get("name", "lora")
    if name not in METHOD_SCHEMAS:
        raise ConfigError(f"config key 'method.name' must be one of {', '.join(METHOD_SCHEMAS)}, got {name!r}")
    return from_dict(METHOD_SCHEMAS[name], data, "method")


def register_method(name: str, schema: type) -> None:
    """Later method families add their schema here (one config class per method)."""
    METHOD_SCHEMAS[name] = schema


# ----------------------------------------------------------------------------- loading

def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.steps=20`` -> (["train", "steps"], 20); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=20)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override key '{'.'.join(path[:i + 1])}' is not an index of that list")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override key '{'.'.join(path[:i + 1])}' does not name a config section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override key '{'.'.join(path)}' is not an index of that list")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a built-in config (``quickstart``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = BUILTIN_CONFIGS / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    known = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a built-in config ({known})")


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    raw: dict = {}
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config sections")
        _resolve_paths(raw, path.parent)
    raw = apply_overrides(raw, overrides or [])
    _resolve_paths(raw, Path.cwd())  # paths given as overrides are relative to the working folder
    cfg = from_dict(RunConfig, raw)
    if not isinstance(cfg.grid, dict) or not all(isinstance(k, str) and isinstance(v, list) and v
                                                 for k, v in cfg.grid.items()):
        raise ConfigError("config key 'grid' must map dotted config keys to non-empty lists of values")
    for preset in cfg.methods:
        if preset not in PRESETS:
            raise ConfigError(f"config key 'methods' names {preset!r}, not a preset ({', '.join(PRESETS)})")
    return cfg


def _slug(value: Any) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_")[:40]


def grid_cells(name_or_path: str, overrides: list[str] | None = None) -> list[tuple[str, RunConfig]]:
    """One config per combination of the ``grid`` axes (just ``[("", cfg)]`` without a grid).

    A cell's folder name joins ``<last key part>-<value>`` (scalar values) or
    ``<last key part>-<index>`` (lists and mappings, e.g. training sources).
    """
    import itertools

    overrides = list(overrides or [])
    cfg = load_config(name_or_path, overrides)
    if not cfg.grid:
        return [("", cfg)]
    keys = list(cfg.grid)
    cells = []
    for combo in itertools.product(*(list(enumerate(cfg.grid[k])) for k in keys)):
        parts, cell_overrides = [], []
        for key, (index, value) in zip(keys, combo):
            leaf = key.rsplit(".", 1)[-1]
            parts.append(f"{leaf}-{_slug(value) if isinstance(value, (str, int, float)) else index}")
            cell_overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
        label = "+".join(parts)
        cell = load_config(name_or_path, overrides + cell_overrides + ["grid={}"])
        cells.append((label, dataclasses.replace(cell, output_dir=str(Path(cfg.output_dir) / label))))
    return cells


def method_variants(cfg: RunConfig) -> list[RunConfig]:
    """One config per (method preset, seed): same budget and data.

    ``methods`` empty: the config's own method; ``seeds`` with more than one value: one run
    per seed in ``seed-<s>`` below the method's folder.
    """
    variants = []
    if not cfg.methods:
        variants.append(dataclasses.replace(cfg, methods=[]))
    for preset in cfg.methods:
        data = expand_preset({"preset": preset})
        method = from_dict(METHOD_SCHEMAS[data["name"]], data, "method")
        variants.append(dataclasses.replace(cfg, methods=[], method=method,
                                            output_dir=str(Path(cfg.output_dir) / preset)))
    if len(cfg.seeds) <= 1:
        if cfg.seeds:
            variants = [dataclasses.replace(v, train=dataclasses.replace(v.train, seed=cfg.seeds[0])) for v in variants]
        return [dataclasses.replace(v, seeds=[]) for v in variants]
    return [dataclasses.replace(v, seeds=[], output_dir=str(Path(v.output_dir) / f"seed-{seed}"),
                                train=dataclasses.replace(v.train, seed=seed))
            for v in variants for seed in cfg.seeds]


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative data paths in a config file are relative to that file (``pkg:`` = shipped examples)."""
    sections = [raw.get("data", {}).get("train", []) if isinstance(raw.get("data"), dict) else [],
                raw.get("eval", {}).get("benchmarks", []) if isinstance(raw.get("eval"), dict) else []]
    for sources in sections:
        for src in sources if isinstance(sources, list) else []:
            if not isinstance(src, dict):
                continue
            for key in ("path", "answer_file", "ground_truth"):
                value = src.get(key)
                if isinstance(value, str) and not value.startswith("pkg:"):
                    src[key] = str(resolve_data_path(value, base))


def resolve_data_path(value: str, base: Path | None = None) -> Path:
    if value.startswith("pkg:"):
        return Path(__file__).parent / "data" / "examples" / value[4:]
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else (base / path)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)

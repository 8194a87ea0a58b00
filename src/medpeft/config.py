"""Run configs: YAML files validated against dataclasses, overridable with ``key=value``.

Validation happens at load, before any model or data is read and before anything is
written: an unknown key, a wrong type, a missing required field or an inconsistent value
raises :class:`ConfigError` with a one-line message naming the dotted key. The method
section is validated by the method registry against the schema of the family its
``method.name`` belongs to (``adapters/registry.py``).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .adapters.registry import DEFAULT_PRESET, is_preset, method_from_dict, preset_config
from .errors import ConfigError
from .schema import from_dict, require, require_choice
from .tagger import CONFIG_FILE as TAGGER_CONFIG_FILE, WEIGHTS_FILE as TAGGER_WEIGHTS_FILE, TaggerSettings

BUILTIN_CONFIGS = Path(__file__).parent / "configs"


RETENTION_BENCHMARKS = ("mmlu", "gsm8k")  # general knowledge and reasoning: what fine-tuning must not lose


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny", a hub id or a local folder
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    device: str | None = None  # default: cuda if available
    attn_implementation: str | None = "sdpa"
    # Import and run Python code shipped with the model (transformers' trust_remote_code).
    # Off: such a model is refused with one line, never silently run or asked about on stdin.
    trust_remote_code: bool = False


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
    max_new_tokens: int | None = None  # a summarisation set's generation limit (default eval.summary_max_new_tokens)
    weight: float = 1.0  # training sources: sampling weight (examples per epoch = weight x the source's size)
    protocol: str | None = None  # evaluation sets: this set's protocol (default eval.protocol)
    # evaluation sets: a knowledge-retention set (the report's forgetting table tests that
    # fine-tuning is not worse than the base model on it); default: MMLU and GSM8K sets
    retention: bool | None = None

    @property
    def is_retention(self) -> bool:
        return self.retention if self.retention is not None else self.benchmark in RETENTION_BENCHMARKS

    @property
    def display_name(self) -> str:
        return self.name or self.benchmark


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    max_length: int = 768
    # A learned text-only tagger folder (`medpeft tagger train`, docs/tags.md): it tags the items
    # of every source (training and evaluation) that metadata does not tag, instead of the
    # keyword rules. A run refuses a tagger trained on one of its evaluation sets.
    tagger: str | None = None


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
    # A one-off compile that pays back within tens of steps (docs/performance.md).
    compile: Any = "auto"


@dataclass
class EvalConfig:
    scorer: str = "letters"  # letters | generate
    batch_size: int = 16
    max_new_tokens: int = 10
    summary_max_new_tokens: int = 512  # summarisation sets (a source's max_new_tokens overrides it)
    # Experimental: the generate scorer decodes with a static KV cache and a compiled
    # decoding step (transformers' CompileConfig; CUDA graphs on a GPU). Same tokens as the
    # default (tested on CPU); its GPU speed is not measured yet (docs/performance.md).
    compile_decode: bool = False
    benchmarks: list[SourceConfig] = field(default_factory=list)
    # The evaluation protocol (docs/evaluation.md): medpeft | lm-eval | opencompass-cmb | cot; a
    # source's own 'protocol' overrides it. The results in eval/ are under it.
    protocol: str = "medpeft"
    # Further protocols scored into eval/protocol-<name>/ (the sets each defines; the others are
    # listed as skipped), for the report's protocol table and `medpeft compare` across protocols.
    extra_protocols: list[str] = field(default_factory=list)
    apply_chat_template: bool = False  # lm-eval protocol: its --apply_chat_template (the leaderboard: off)
    cot_max_new_tokens: int = 512  # cot protocol: room to reason and write the final line
    calibration_bins: int = 15  # equal-width confidence bins of the expected calibration error
    # Option-order robustness: 'cyclic' re-scores every multiple-choice item under each cyclic
    # rotation of its options (eval/robustness.json); 'none' skips it.
    permute_options: str = "none"
    # Non-inferiority margin (percentage points) of the retention sets against the base model
    retention_margin: float = 2.0
    # Weak-axis perturbation: re-evaluate with the tags of this share of items replaced by a
    # random other value, once per perturbation seed (tag-routed methods only).
    perturb_rates: list[float] = field(default_factory=list)
    perturb_seeds: list[int] = field(default_factory=lambda: [0])
    # Suites: also score the bare base model on the same sets (output_dir/base, the report's
    # "Base model" row). A suite-level key: the cells' configs hold false.
    base: bool = False


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    # Presets trained side by side under the same budget and data (each in output_dir/<preset>,
    # its method section replaced by the preset); empty = train the one 'method' below.
    methods: list[str] = field(default_factory=list)
    # Keys changed for one preset of 'methods' in this config's cells: {preset: {key: value}},
    # e.g. {lora-library: {min_items: 3}}; the cell keeps the preset's name.
    method_overrides: Any = field(default_factory=dict)
    # Training seeds; more than one trains every method once per seed (output_dir/<preset>/seed-<s>).
    seeds: list[int] = field(default_factory=list)
    # Further grid axes: dotted config key -> list of values, e.g. {model.name: [A, B]} or
    # {data.train: [[...cmb source...], [...cmexam source...]]}; one cell per combination,
    # each in output_dir/<cell> (see grid_cells).
    grid: Any = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = field(default_factory=lambda: preset_config(DEFAULT_PRESET))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
    "train.lr_schedule": ("linear", "cosine", "constant"),
    "train.compile": ("auto", True, False),
    "eval.scorer": ("letters", "generate"),
    "eval.permute_options": ("none", "cyclic"),
}


MIN_MAX_LENGTH = 64  # tokens of prompt + answer


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config key 'model.device' must be a torch device such as cpu, cuda or cuda:1, "
                          f"got {device!r}") from None
    require(dev.type != "meta", "model.device", "cannot be meta (a device without data)")
    require(dev.type != "cuda" or torch.cuda.is_available(), "model.device",
            f"is {device!r}, but no CUDA device is available here")
    require(dev.type != "cuda" or dev.index is None or dev.index < torch.cuda.device_count(), "model.device",
            f"is {device!r}, but this machine has {torch.cuda.device_count()} CUDA devices")


def run_config_from_dict(raw: dict) -> RunConfig:
    """Build and validate a run config (the method section through the method registry)."""
    cfg = from_dict(RunConfig, raw, special={"method": lambda value, key: method_from_dict(value, key)})
    validate_run_config(cfg)
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    """Values that types alone do not check (the method's own are checked by its family)."""
    values = {"model.dtype": cfg.model.dtype, "train.lr_schedule": cfg.train.lr_schedule,
              "train.compile": cfg.train.compile, "eval.scorer": cfg.eval.scorer,
              "eval.permute_options": cfg.eval.permute_options}
    for key, value in values.items():
        require_choice(value, CHOICES[key], key)
    tc = cfg.train
    require(tc.steps >= 1, "train.steps", f"must be >= 1, got {tc.steps}")
    require(tc.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {tc.micro_batch_size}")
    require(tc.batch_size >= 1 and tc.batch_size % tc.micro_batch_size == 0, "train.batch_size",
            f"({tc.batch_size}) must be a multiple of 'train.micro_batch_size' ({tc.micro_batch_size})")
    require(math.isfinite(tc.lr) and tc.lr > 0, "train.lr", f"must be a finite number > 0, got {tc.lr}")
    require(math.isfinite(tc.max_grad_norm) and tc.max_grad_norm >= 0, "train.max_grad_norm",
            f"must be a finite number >= 0 (0 = no clipping), got {tc.max_grad_norm}")
    require(math.isfinite(tc.weight_decay) and tc.weight_decay >= 0, "train.weight_decay",
            f"must be a finite number >= 0, got {tc.weight_decay}")
    require(tc.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {tc.warmup_steps}")
    require(tc.save_every >= 0, "train.save_every", f"must be >= 0, got {tc.save_every}")
    require(tc.log_every >= 1, "train.log_every", f"must be >= 1, got {tc.log_every}")
    if cfg.data.tagger is not None:
        require((Path(cfg.data.tagger) / TAGGER_CONFIG_FILE).is_file(), "data.tagger",
                f"names {cfg.data.tagger!r}, which holds no {TAGGER_CONFIG_FILE} (write a tagger with 'medpeft tagger "
                "train')")
    require(cfg.data.max_length >= MIN_MAX_LENGTH, "data.max_length",
            f"must be >= {MIN_MAX_LENGTH} (shorter windows cut every prompt down to its options), "
            f"got {cfg.data.max_length}")
    require(cfg.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {cfg.eval.batch_size}")
    require(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {cfg.eval.max_new_tokens}")
    require(cfg.eval.summary_max_new_tokens >= 1, "eval.summary_max_new_tokens",
            f"must be >= 1, got {cfg.eval.summary_max_new_tokens}")
    from .protocols import protocol_names
    protocols = protocol_names()

    require_choice(cfg.eval.protocol, protocols, "eval.protocol")
    for i, name in enumerate(cfg.eval.extra_protocols):
        require_choice(name, protocols, f"eval.extra_protocols.{i}")
    require(len(set(cfg.eval.extra_protocols)) == len(cfg.eval.extra_protocols), "eval.extra_protocols",
            f"names a protocol twice: {cfg.eval.extra_protocols}")
    for i, src in enumerate(cfg.eval.benchmarks):
        if src.protocol is not None:
            require_choice(src.protocol, protocols, f"eval.benchmarks.{i}.protocol")
    for i, src in enumerate(cfg.data.train):
        require(src.protocol is None, f"data.train.{i}.protocol", "is an evaluation-set key (training has no protocol)")
        require(src.retention is None, f"data.train.{i}.retention", "is an evaluation-set key")
    require(math.isfinite(cfg.eval.retention_margin) and 0 < cfg.eval.retention_margin < 100, "eval.retention_margin",
            f"must be a margin in percentage points in (0, 100), got {cfg.eval.retention_margin}")
    require(cfg.eval.cot_max_new_tokens >= 1, "eval.cot_max_new_tokens", f"must be >= 1, got {cfg.eval.cot_max_new_tokens}")
    require(2 <= cfg.eval.calibration_bins <= 1000, "eval.calibration_bins",
            f"must be in 2..1000, got {cfg.eval.calibration_bins}")
    require(all(0 < r <= 1 for r in cfg.eval.perturb_rates), "eval.perturb_rates",
            f"must be shares in (0, 1], got {cfg.eval.perturb_rates}")
    for section, sources in (("data.train", cfg.data.train), ("eval.benchmarks", cfg.eval.benchmarks)):
        for i, src in enumerate(sources):
            for key in ("limit", "per_route"):
                value = getattr(src, key)
                require(value is None or value >= 1, f"{section}.{i}.{key}", f"must be >= 1, got {value}")
    names = [src.display_name for src in cfg.data.train]
    for i, src in enumerate(cfg.data.train):  # weights are applied by source name
        require(src.weight == 1 or names.count(src.display_name) == 1, f"data.train.{i}.weight",
                f"two training sources are named {src.display_name!r}: give the weighted one its own 'name'")
    _check_device(cfg.model.device)
    out = Path(cfg.output_dir)
    require(not out.exists() or out.is_dir(), "output_dir", f"{str(out)!r} is a file, not a folder")
    from .data import BENCHMARKS, SUMMARY_BENCHMARKS

    for section, sources in (("data.train", cfg.data.train), ("eval.benchmarks", cfg.eval.benchmarks)):
        for i, src in enumerate(sources):
            require_choice(src.benchmark, tuple(BENCHMARKS), f"{section}.{i}.benchmark")
            require(src.weight > 0 and (section == "data.train" or src.weight == 1), f"{section}.{i}.weight",
                    f"a training source's sampling weight > 0, got {src.weight}" if section == "data.train"
                    else "is a training-source key (evaluation sets are scored whole)")
            require(src.max_new_tokens is None or (src.max_new_tokens >= 1 and src.benchmark in SUMMARY_BENCHMARKS),
                    f"{section}.{i}.max_new_tokens", f"a generation limit >= 1 of a summarisation set "
                    f"({', '.join(SUMMARY_BENCHMARKS)}), got {src.max_new_tokens} for {src.benchmark!r}")
            try:
                codecs.lookup(src.encoding)
            except LookupError:
                raise ConfigError(f"config key '{section}.{i}.encoding' names no known text encoding: "
                                  f"{src.encoding!r}") from None
            require(src.cop_base in (None, 0, 1), f"{section}.{i}.cop_base", f"must be 0 or 1, got {src.cop_base}")
    if not isinstance(cfg.grid, dict) or not all(isinstance(k, str) and isinstance(v, list) and v
                                                 for k, v in cfg.grid.items()):
        raise ConfigError("config key 'grid' must map dotted config keys to non-empty lists of values")
    for key in cfg.grid:  # axes that another setting would silently override
        root = key.split(".")[0]
        require(root not in ("output_dir", "methods", "seeds", "grid"), f"grid.{key}",
                "cannot be a grid axis (it names the cells' folders or the other grid settings)")
        require(not (cfg.methods and root == "method"), f"grid.{key}",
                "is replaced by each preset of 'methods'; give the variants as presets instead")
        require(not (len(cfg.seeds) > 1 and key == "train.seed"), f"grid.{key}", "is replaced by 'seeds'")
    require(len(set(cfg.methods)) == len(cfg.methods), "methods", f"names a preset twice: {cfg.methods}")
    require(len(set(cfg.seeds)) == len(cfg.seeds), "seeds", f"names a seed twice: {cfg.seeds}")
    for key, seeds in (("train.seed", [cfg.train.seed]), ("seeds", cfg.seeds), ("eval.perturb_seeds", cfg.eval.perturb_seeds)):
        require(all(0 <= s < 2**63 for s in seeds), key, f"must be in 0..2^63-1, got {seeds}")
    require(not cfg.eval.perturb_rates or cfg.eval.perturb_seeds, "eval.perturb_seeds",
            "must name at least one seed when eval.perturb_rates is set")
    for preset in cfg.methods:
        if not is_preset(preset):
            from .adapters.registry import catalogue

            raise ConfigError(f"config key 'methods' names {preset!r}, not a preset ({', '.join(catalogue())})")
    overrides = cfg.method_overrides
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ConfigError("config key 'method_overrides' must map presets of 'methods' to mappings of method keys")
    for preset, keys in overrides.items():
        # a preset not listed is kept for when it is (e.g. 'methods' overridden on the command line)
        require(is_preset(preset), f"method_overrides.{preset}", "names no preset (medpeft methods lists them)")
        require("preset" not in keys and "name" not in keys, f"method_overrides.{preset}",
                "changes keys of the preset; it cannot rename it")
    for preset in overrides:
        cell_method(cfg, preset)  # its keys must be keys of the method
    for i, preset in enumerate(cfg.methods):  # cells a method reads (a router's library) are trained first
        from .adapters.registry import family_of

        method = cell_method(cfg, preset)
        for needed in family_of(method).depends_on(method):
            require(needed in cfg.methods[:i] or (Path(cfg.output_dir) / needed).is_dir(), "methods",
                    f"{preset!r} reads the cell {needed!r} (its method.library), which must be listed before it")


# ----------------------------------------------------------------------------- loading

class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


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
        if path == ["method", "preset"] and isinstance(raw.get("method"), dict):
            raw["method"].pop("name", None)  # the new preset names the method (the file's other keys stay)
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
    if path.is_dir():
        raise ConfigError(f"config {name_or_path!r} is a folder; give a YAML file")
    if path.exists():
        return path
    builtin = BUILTIN_CONFIGS / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    known = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a built-in config ({known})")


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping (``what`` names its keys in the error), each key
    given once; a file that is not UTF-8 or not YAML is one error naming it."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {what}")
    return raw


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    raw: dict = {}
    if name_or_path:
        path = resolve_config_path(name_or_path)
        raw = read_yaml_mapping(path, "config sections")
        _resolve_paths(raw, path.parent)
    raw = apply_overrides(raw, overrides or [])
    _resolve_paths(raw, Path.cwd())  # paths given as overrides are relative to the working folder
    return run_config_from_dict(raw)


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
        if any(label == other for other, _ in cells):
            raise ConfigError(f"config key 'grid': two cells would share the folder {label!r} (values that differ "
                              "only in characters a folder name drops); make the values distinct")
        cell = load_config(name_or_path, overrides + cell_overrides + ["grid={}"])
        cells.append((label, dataclasses.replace(cell, output_dir=str(Path(cfg.output_dir) / label))))
    return cells


def cell_method(cfg: RunConfig, preset: str):
    """The method of the cell of ``preset`` in ``cfg.methods``: the preset with the config's
    ``method_overrides`` for it."""
    keys = cfg.method_overrides.get(preset, {}) if isinstance(cfg.method_overrides, dict) else {}
    return method_from_dict({"preset": preset, **keys}, f"method_overrides.{preset}" if keys else "method")


def method_variants(cfg: RunConfig) -> list[RunConfig]:
    """One config per (method preset, seed): same budget and data.

    ``methods`` empty: the config's own method; ``seeds`` with more than one value: one run
    per seed in ``seed-<s>`` below the method's folder.
    """
    variants = []
    if not cfg.methods:
        variants.append(dataclasses.replace(cfg, methods=[], method_overrides={}))
    for preset in cfg.methods:
        method = cell_method(cfg, preset)
        variants.append(dataclasses.replace(cfg, methods=[], method_overrides={}, method=method,
                                            output_dir=str(Path(cfg.output_dir) / preset)))
    variants = [dataclasses.replace(v, eval=dataclasses.replace(v.eval, base=False)) for v in variants]
    if len(cfg.seeds) <= 1:
        if cfg.seeds:
            variants = [dataclasses.replace(v, train=dataclasses.replace(v.train, seed=cfg.seeds[0])) for v in variants]
        return [dataclasses.replace(v, seeds=[]) for v in variants]
    return [dataclasses.replace(v, seeds=[], output_dir=str(Path(v.output_dir) / f"seed-{seed}"),
                                train=dataclasses.replace(v.train, seed=seed))
            for v in variants for seed in cfg.seeds]


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative data paths in a config file are relative to that file (``pkg:`` = shipped examples)."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    _resolve_source_paths(data.get("train", []), base)
    _resolve_source_paths(raw.get("eval", {}).get("benchmarks", []) if isinstance(raw.get("eval"), dict) else [], base)
    if isinstance(data.get("tagger"), str):
        data["tagger"] = str(resolve_data_path(data["tagger"], base))


def _resolve_source_paths(sources: Any, base: Path) -> None:
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


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """The dotted keys whose values differ between two run configs."""
    def flat(value, prefix=""):
        if isinstance(value, dict):
            out = {}
            for key, inner in value.items():
                out.update(flat(inner, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: value}

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- tagger configs

@dataclass
class TaggerConfig:
    """``medpeft tagger train CONFIG``: the sources a learned tagger is fitted on (docs/tags.md)."""

    output: str  # the tagger folder to write (tagger.json + weights.safetensors); relative to the working folder
    sources: list[SourceConfig] = field(default_factory=list)  # metadata-labelled training sources
    # evaluation sets the tagger must never see: sources (as in eval.benchmarks), and run configs
    # whose eval.benchmarks are all excluded; by id and normalized question text
    exclude: list[SourceConfig] = field(default_factory=list)
    exclude_runs: list[str] = field(default_factory=list)
    model: TaggerSettings = field(default_factory=TaggerSettings)


def load_tagger_config(name_or_path: str, overrides: list[str] | None = None) -> TaggerConfig:
    """Read and validate a tagger config; relative data paths are relative to the file, the
    ``output`` folder (like a run's ``output_dir``) to the working folder."""
    path = Path(name_or_path)
    if path.is_dir():
        raise ConfigError(f"tagger config {name_or_path!r} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"tagger config {name_or_path!r}: no such file")
    raw = read_yaml_mapping(path, "tagger keys (output, sources, exclude, model)")

    def resolve(raw: dict, base: Path) -> None:
        _resolve_source_paths(raw.get("sources"), base)
        _resolve_source_paths(raw.get("exclude"), base)
        if isinstance(raw.get("exclude_runs"), list):
            raw["exclude_runs"] = [str(resolve_data_path(v, base)) if isinstance(v, str) else v
                                   for v in raw["exclude_runs"]]

    resolve(raw, path.parent)
    raw = apply_overrides(raw, overrides or [])
    resolve(raw, Path.cwd())
    cfg = from_dict(TaggerConfig, raw)
    m = cfg.model
    require(bool(cfg.sources), "sources", "is empty: name at least one metadata-labelled training source")
    from .data import BENCHMARKS

    for section, sources in (("sources", cfg.sources), ("exclude", cfg.exclude)):
        for i, src in enumerate(sources):
            require_choice(src.benchmark, tuple(BENCHMARKS), f"{section}.{i}.benchmark")
            require(src.limit is None or src.limit >= 1, f"{section}.{i}.limit", f"must be >= 1, got {src.limit}")
            require(not src.exclude and src.per_route is None, f"{section}.{i}",
                    "takes no 'exclude' or 'per_route' (list evaluation sets under the top-level 'exclude')")
            # a hub copy's default split is medpeft's evaluation split (e.g. MedMCQA validation)
            require(section == "exclude" or not src.hub or src.split is not None, f"{section}.{i}.split",
                    "must be given for a hub source (e.g. train): the default split is the evaluation split")
    for i, run in enumerate(cfg.exclude_runs):
        require(Path(run).is_file(), f"exclude_runs.{i}", f"names {run!r}, which is no file")
    for key in ("word_ngrams", "char_ngrams"):
        value = getattr(m, key)
        require(len(value) == 2 and 1 <= value[0] <= value[1] <= 6, f"model.{key}",
                f"must be [low, high] with 1 <= low <= high <= 6, got {value}")
    require_choice(m.stop_words, ("english", "none"), "model.stop_words")
    require(m.min_df >= 1, "model.min_df", f"must be >= 1, got {m.min_df}")
    require(m.max_features is None or m.max_features >= 1, "model.max_features", f"must be >= 1, got {m.max_features}")
    require(math.isfinite(m.C) and m.C > 0, "model.C", f"must be a finite number > 0, got {m.C}")
    require(m.max_iter >= 1, "model.max_iter", f"must be >= 1, got {m.max_iter}")
    require(0 <= m.min_confidence <= 1, "model.min_confidence", f"must be a probability in [0, 1], got {m.min_confidence}")
    require(0 <= m.held_out < 1, "model.held_out", f"must be a share in [0, 1), got {m.held_out}")
    require(0 <= m.seed < 2**63, "model.seed", f"must be in 0..2^63-1, got {m.seed}")
    out = Path(cfg.output)
    require(not out.exists() or out.is_dir(), "output", f"{str(out)!r} is a file, not a folder")
    tagger_files = {TAGGER_CONFIG_FILE, TAGGER_WEIGHTS_FILE}
    held = {p.name for p in out.iterdir()} if out.is_dir() else set()
    require(not held or held <= tagger_files, "output",
            f"{str(out)!r} holds files other than a tagger's ({', '.join(sorted(held - tagger_files))}); "
            "a tagger replaces only an earlier tagger")
    existing = next(p for p in [out, *out.resolve().parents] if p.exists())  # before minutes of fitting
    require(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK), "output",
            f"{str(out)!r} cannot be written ({existing} is {'not a folder' if not existing.is_dir() else 'not writable'})")
    return cfg

"""A library folder on disk: one peft LoRA folder per route plus ``library.json``.

::

    adapter/
      library.json              routes axis, adapters (folder, route value, training items), r, alpha, targets
      <route>/adapter_config.json, adapter_model.safetensors    peft's own format

Each route folder loads with ``PeftModel.from_pretrained(base, "adapter/<route>")``, so
peft's Arrow and other tools read the library; medpeft stacks them into library layers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import MedpeftError

LIBRARY_JSON = "library.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PREFIX = "base_model.model."  # peft's key prefix in adapter_model.safetensors


@dataclass
class LibraryInfo:
    folder: Path
    routes: str  # the route axis
    names: list[str]  # adapter folders, in adapter order
    values: list[str]  # their route values
    n_items: list[int]
    r: int
    alpha: float
    target_modules: list[str]

    @property
    def paths(self) -> list[Path]:
        return [self.folder / n for n in self.names]


def write_library_json(folder: Path, routes: str, adapters: list[dict], r: int, alpha: float,
                       target_modules: list[str]) -> None:
    from ...io import write_json

    write_json(Path(folder) / LIBRARY_JSON, {"routes": routes, "adapters": adapters, "r": r, "alpha": alpha,
                                             "target_modules": sorted(target_modules)})


def copy_peft_adapter(src: Path, dst: Path) -> None:
    """A trained peft adapter folder's files into the library (``dst`` is created)."""
    dst.mkdir()
    for name in PEFT_FILES:
        if not (src / name).is_file():
            raise MedpeftError(f"{src / name}: missing; the part's adapter is incomplete (train it again)")
        shutil.copyfile(src / name, dst / name)


def read_library(folder: Path) -> LibraryInfo:
    """The library in ``folder`` (a run's ``adapter/``), checked to be one library: every adapter
    present, of the rank, scale and targets ``library.json`` says. One line naming the file."""
    path = Path(folder) / LIBRARY_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        adapters = meta["adapters"]
        names, values = [a["name"] for a in adapters], [str(a["route"]) for a in adapters]
        info = LibraryInfo(Path(folder), str(meta["routes"]), names, values, [int(a["n_items"]) for a in adapters],
                           int(meta["r"]), float(meta["alpha"]), list(meta["target_modules"]))
    except FileNotFoundError:
        raise MedpeftError(f"{path}: missing; {folder} is not an adapter library (train a lora-library run)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MedpeftError(f"{path}: not a library description ({type(err).__name__}: {err})") from None
    if not names:
        raise MedpeftError(f"{path}: field 'adapters' is empty")
    for name in names:
        config_path = info.folder / name / "adapter_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MedpeftError(f"{config_path}: unreadable peft config ({type(err).__name__})") from None
        targets = config.get("target_modules")
        targets = sorted(targets) if isinstance(targets, list) else targets
        if config.get("r") != info.r or float(config.get("lora_alpha", -1)) != info.alpha or \
                targets != sorted(info.target_modules):
            raise MedpeftError(f"{config_path}: adapter {name!r} has rank {config.get('r')}, alpha "
                               f"{config.get('lora_alpha')}, targets {targets}; the library's are r={info.r}, "
                               f"alpha={info.alpha}, targets {sorted(info.target_modules)}: a library of mismatched "
                               "adapters")
        if not (info.folder / name / "adapter_model.safetensors").is_file():
            raise MedpeftError(f"{info.folder / name / 'adapter_model.safetensors'}: missing")
    return info


def fingerprint(info: LibraryInfo) -> str:
    """SHA-256 of the library's description and weights: a router records the library it was
    built on, and a changed library is refused instead of silently mixing two."""
    digest = hashlib.sha256((info.folder / LIBRARY_JSON).read_bytes())
    for path in info.paths:
        with open(path / "adapter_model.safetensors", "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_stacked(info: LibraryInfo, device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A_cat [K r, in], B_cat [out, K r])}``: the adapters' weights stacked in
    adapter order, by the module name in the base model (peft's key prefix removed)."""
    from safetensors.torch import load_file

    per_module: dict[str, list] = {}
    for k, path in enumerate(info.paths):
        file = path / "adapter_model.safetensors"
        weights = load_file(str(file), device=str(device))
        seen = set()
        for key, value in weights.items():
            if not key.startswith(_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise MedpeftError(f"{file}: tensor {key!r} is not a LoRA weight of peft's format")
            module, part = key[len(_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            slot = per_module.setdefault(module, [[None] * len(info.paths), [None] * len(info.paths)])
            slot[0 if part == "lora_A" else 1][k] = value
            seen.add(module)
        if k and seen != set(per_module):
            raise MedpeftError(f"{file}: adapter {info.names[k]!r} wraps other modules than adapter "
                               f"{info.names[0]!r}: a library of mismatched adapters")
    out = {}
    for module, (a_list, b_list) in per_module.items():
        if any(t is None for t in a_list + b_list):
            raise MedpeftError(f"{info.folder}: module {module!r} lacks a LoRA weight in some adapter")
        if any(t.shape != a_list[0].shape for t in a_list) or any(t.shape != b_list[0].shape for t in b_list):
            raise MedpeftError(f"{info.folder}: module {module!r} has LoRA weights of different shapes across "
                               "adapters: a library of mismatched ranks")
        out[module] = (torch.cat(a_list, 0), torch.cat(b_list, 1))
    return out


def export_peft(folder: Path, name: str, module_weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                peft_config) -> None:
    """Write one adapter (``{module: (A [r, in], B [out, r])}``) as a peft folder ``folder/name``."""
    from safetensors.torch import save_file

    dst = Path(folder) / name
    dst.mkdir()
    tensors = {}
    for module, (a, b) in module_weights.items():
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config.save_pretrained(str(dst))


def locate(library: str, run_dir: Path) -> Path:
    """The run folder ``library`` names for the run in ``run_dir``: a path (it contains ``/``)
    as given, else the suite cell of that name next to the run (``<suite>/<cell>``, or for a
    seeded run ``<suite>/<preset>/seed-N``, ``<suite>/<cell>/seed-N``: the same seed)."""
    if "/" in library or library.startswith((".", "~")):
        return Path(library).expanduser()
    run_dir = Path(run_dir)
    if run_dir.name.startswith("seed-"):
        return run_dir.parent.parent / library / run_dir.name
    return run_dir.parent / library

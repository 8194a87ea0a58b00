"""The ``method:`` sections of the adapter library and of the routers that read one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...schema import require
from ..registry import DEFAULT_TARGETS

ROUTE_AXES = ("specialty", "operation", "pair")  # tag routes; or "metadata:<field>"
SMALL_ROUTES = ("error", "merge")
MERGED_ROUTE = "other"  # the route small routes are merged into


@dataclass
class LibraryMethod:
    """``lora-library``: one peft LoRA per route, each trained on its route's items under the run's budget."""

    name: str = "lora-library"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    routes: str = "specialty"  # specialty | operation | pair | metadata:<field>
    min_items: int = 8  # a route with fewer training items is an error or merged (small_routes)
    small_routes: str = "merge"  # merge (into the route "other", reported) | error
    max_adapters: int = 16  # more routes than this is an error (merge, or choose coarser routes)


@dataclass
class RouterMethod:
    """What every router over a library shares: where the library is and its shape.

    ``library``: a run folder of a trained ``lora-library`` or the name of that cell in the
    same suite (the folder next to this run's, same seed). ``n_adapters``: 0 = as many as the
    library holds; a number must equal it (``medpeft params`` counts routers with it).
    """

    name: str = ""
    library: str = "lora-library"
    n_adapters: int = 0
    r: int = 8  # the library's rank and targets (checked against the library on load)
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def validate_library(method: LibraryMethod, prefix: str) -> None:
    axis = method.routes
    require(axis in ROUTE_AXES or (axis.startswith("metadata:") and len(axis) > len("metadata:")),
            f"{prefix}.routes", f"must be one of {', '.join(ROUTE_AXES)} or metadata:<field>, got {axis!r}")
    require(method.small_routes in SMALL_ROUTES, f"{prefix}.small_routes",
            f"must be one of {', '.join(SMALL_ROUTES)}, got {method.small_routes!r}")
    require(method.min_items >= 1, f"{prefix}.min_items", f"must be >= 1, got {method.min_items}")
    require(method.max_adapters >= 1, f"{prefix}.max_adapters", f"must be >= 1, got {method.max_adapters}")


def validate_router(method: RouterMethod, prefix: str) -> None:
    require(bool(method.library.strip()), f"{prefix}.library", "must name a library run folder or suite cell")
    require(method.n_adapters >= 0, f"{prefix}.n_adapters", f"must be >= 0 (0 = the library's size), got "
            f"{method.n_adapters}")


def validate_temperature(value: float, key: str) -> None:
    require(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")


def validate_gate(method, prefix: str) -> None:
    """A router's per-token mixture: ``top_k >= 1`` adapters, ``temperature > 0``."""
    require(method.top_k >= 1, f"{prefix}.top_k", f"must be >= 1, got {method.top_k}")
    validate_temperature(method.temperature, f"{prefix}.temperature")

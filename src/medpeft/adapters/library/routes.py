"""Routes of an adapter library: which adapter a question belongs to, and the library's parts."""

from __future__ import annotations

import re
from collections import Counter

from ...errors import MedpeftError
from ...tags import OPERATIONS, SPECIALTIES
from .config import MERGED_ROUTE, LibraryMethod

_UNSAFE = re.compile(r"[^A-Za-z0-9_+-]+")


def route_of(item, routes: str) -> str | None:
    """The route value of a tagged item: its specialty, operation, ``specialty+operation``, or a
    metadata field's value (None when the item lacks it)."""
    tags = item.tags
    if routes == "specialty":
        return tags.specialty
    if routes == "operation":
        return tags.operation
    if routes == "pair":
        return f"{tags.specialty}+{tags.operation}"
    value = item.record.metadata.get(routes.split(":", 1)[1])
    return None if value is None or str(value).strip() == "" else str(value).strip()


def tag_route_values(routes: str) -> list[str] | None:
    """Every value a tag route can take, in tag-table order (None for metadata routes)."""
    if routes == "specialty":
        return list(SPECIALTIES)
    if routes == "operation":
        return list(OPERATIONS)
    if routes == "pair":
        return [f"{s}+{o}" for s in SPECIALTIES for o in OPERATIONS]
    return None


def route_index_table(routes: str, names: list[str]) -> list[int] | None:
    """For a tag route: the adapter index of each (specialty id * len(OPERATIONS) + operation id)
    cell; a value the library has no adapter for goes to ``other`` if present, else -1."""
    if tag_route_values(routes) is None:
        return None
    index = {n: i for i, n in enumerate(names)}
    fallback = index.get(MERGED_ROUTE, -1)
    table = []
    for s in SPECIALTIES:
        for o in OPERATIONS:
            value = {"specialty": s, "operation": o, "pair": f"{s}+{o}"}[routes]
            table.append(index.get(value, fallback))
    return table


def folder_name(value: str, taken: set[str]) -> str:
    """A file-system- and module-name-safe name for a route value (unique among ``taken``)."""
    base = _UNSAFE.sub("_", value).strip("_") or "route"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def library_routes(method: LibraryMethod, train_set: list, source: str | None = None) -> list[tuple[str, list]]:
    """``(route value, items)`` per adapter, largest first: routes with fewer than ``min_items``
    items are an error or merged into ``other`` (``small_routes``), never dropped. Errors name
    ``source`` (default: the training sets' names)."""
    if source is None:
        names = sorted({getattr(t, "set_name", "") for t in train_set} - {""})
        source = f"training set {', '.join(names)}" if names else "the training set"
    groups: dict[str, list] = {}
    missing = []
    for item in train_set:
        value = route_of(item, method.routes)
        if value is None:
            missing.append(item.record.id)
            continue
        groups.setdefault(value, []).append(item)
    if missing:
        field_name = method.routes.split(":", 1)[-1]
        raise MedpeftError(f"{source}: record {missing[0]!r} has no metadata field {field_name!r} "
                           f"(config key 'method.routes' is {method.routes!r}; {len(missing)} records lack it)")
    if not groups:
        raise MedpeftError(f"{source}: no training items to build a library from")
    small = sorted(v for v, items in groups.items() if len(items) < method.min_items)
    if small and method.small_routes == "error":
        counts = Counter({v: len(groups[v]) for v in small})
        worst = ", ".join(f"{v!r} ({n})" for v, n in counts.most_common()[::-1][:3])
        raise MedpeftError(f"{source}: route(s) {worst} have fewer than method.min_items={method.min_items} "
                           "training items; set method.small_routes: merge, lower method.min_items, or choose "
                           "coarser method.routes")
    if small:
        merged = [item for v in small for item in groups.pop(v)]
        groups[MERGED_ROUTE] = groups.get(MERGED_ROUTE, []) + merged
        if len(groups[MERGED_ROUTE]) < method.min_items:
            raise MedpeftError(f"{source}: the small routes {', '.join(small[:4])} merged into {MERGED_ROUTE!r} hold "
                               f"{len(groups[MERGED_ROUTE])} items, fewer than method.min_items={method.min_items}")
    if len(groups) > method.max_adapters:
        raise MedpeftError(f"{source}: {len(groups)} routes of {method.routes!r} exceed method.max_adapters="
                           f"{method.max_adapters}; raise it, raise method.min_items with small_routes: merge, or "
                           "choose coarser routes")
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))

"""Subsets the protocol needs: seeded subsets and route-balanced training sets.

Both are deterministic functions of (records, seed): the same inputs give the same ids
on every machine (``random.Random`` with an integer seed is platform independent).
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import Callable, Iterable, Sequence

from ..errors import MedpeftError
from .record import QARecord


def seeded_subset(records: Sequence[QARecord], n: int, seed: int) -> list[QARecord]:
    """``n`` records drawn without replacement, kept in their original order (e.g. MedQA test700)."""
    if n >= len(records):
        return list(records)
    keep = set(random.Random(seed).sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in keep]


def normalized_question(record: QARecord) -> str:
    """Question text with width, case, whitespace and punctuation folded, for leakage checks."""
    text = unicodedata.normalize("NFKC", record.question).lower()
    return re.sub(r"[\W_]+", "", text)


def exclude_overlap(records: Sequence[QARecord], held_out: Iterable[QARecord]) -> tuple[list[QARecord], int]:
    """Drop records sharing an id or a normalized question text with ``held_out``; return (kept, n_dropped)."""
    held = list(held_out)
    ids = {r.id for r in held}
    texts = {normalized_question(r) for r in held}
    kept = [r for r in records if r.id not in ids and normalized_question(r) not in texts]
    return kept, len(records) - len(kept)


def route_balanced(
    records: Sequence[QARecord],
    route_of: Callable[[QARecord], str],
    per_route: int,
    seed: int,
    routes: Sequence[str] | None = None,
) -> list[QARecord]:
    """``per_route`` records from each route (e.g. 7 specialties x 600 = the paper's 4,200).

    ``routes`` defaults to every route seen except ``unknown``. A route with fewer than
    ``per_route`` records is an error naming it, since a silently smaller route would
    break the matched protocol. The result is shuffled with the same seed.
    """
    by_route: dict[str, list[QARecord]] = {}
    for r in records:
        by_route.setdefault(route_of(r), []).append(r)
    wanted = list(routes) if routes is not None else sorted(k for k in by_route if k != "unknown")
    short = {k: len(by_route.get(k, [])) for k in wanted if len(by_route.get(k, [])) < per_route}
    if short:
        detail = ", ".join(f"{k}: {n}" for k, n in short.items())
        raise MedpeftError(f"route-balanced subset needs {per_route} items per route; too few in {detail}")
    rng = random.Random(seed)
    chosen: list[QARecord] = []
    for k in wanted:
        chosen.extend(rng.sample(by_route[k], per_route))
    rng.shuffle(chosen)
    return chosen

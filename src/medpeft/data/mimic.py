"""Clinical-Sum from a local MIMIC-III copy: a deterministic builder of summarisation pairs.

Med-MoE-LoRA's Clinical-Sum is "a sampled subset of the MIMIC-III dataset"; its exact
sample is not released. This builder makes a documented, reproducible one from a user's
credentialed ``NOTEEVENTS.csv`` (never downloaded, never shipped):

* ``radiology``: radiology reports (``CATEGORY`` = Radiology) with a ``FINDINGS:`` and an
  ``IMPRESSION:`` section: source = the findings, summary = the impression (the standard
  radiology summarisation task);
* ``discharge``: discharge summaries (``CATEGORY`` = Discharge summary) holding the chosen
  section (default ``Brief Hospital Course``): summary = that section, source = the rest of
  the note without it.

Only the columns ``ROW_ID``, ``CATEGORY``, ``ISERROR`` and ``TEXT`` are read (notes marked as
errors are skipped). Two passes over the file: the first lists the eligible ``ROW_ID``s,
``n`` of them are drawn with ``seed`` (sorted), the second extracts them. The output is the
generic summarisation JSONL (``{id, text, summary, metadata}``, docs/data.md) plus
``<out>.meta.json`` with the settings, the source file's size and the counts.
"""

from __future__ import annotations

import csv
import random
import re
import sys
from pathlib import Path
from typing import Iterator

from ..errors import DataError

COLUMNS = ("ROW_ID", "CATEGORY", "ISERROR", "TEXT")
KINDS = {"radiology": "Radiology", "discharge": "Discharge summary"}
_HEADING = re.compile(r"^\s*([A-Z][A-Za-z /&-]{2,60}):", re.M)  # a section heading at the start of a line


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # notes are long
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(path, "file", None, "no rows (empty file)") from None
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(path, "line 1", missing[0], "missing column (expected MIMIC-III's NOTEEVENTS.csv header)")
        where = {c: header.index(c) for c in COLUMNS}
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataError(path, f"line {lineno}", None, f"{len(row)} cells, the header has {len(header)}")
            yield lineno, {c: row[i] for c, i in where.items()}  # the documented columns only


def sections(text: str) -> dict[str, str]:
    """A note's sections by heading (``FINDINGS``, ``Brief Hospital Course``...), upper-cased keys."""
    marks = list(_HEADING.finditer(text))
    return {m.group(1).strip().upper(): text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))]
            .strip() for i, m in enumerate(marks)}


def _pair(kind: str, text: str, section: str) -> tuple[str, str] | None:
    found = sections(text)
    if kind == "radiology":
        source, summary = found.get("FINDINGS", ""), found.get("IMPRESSION", "")
    else:
        summary = found.get(section.upper(), "")
        marks = [m for m in _HEADING.finditer(text) if m.group(1).strip().upper() == section.upper()]
        if not marks:
            return None
        start = marks[0].start()
        later = [m.start() for m in _HEADING.finditer(text) if m.start() > marks[0].end()]
        source = (text[:start] + (text[later[0]:] if later else "")).strip()
    if not source.strip() or not summary.strip():
        return None
    return " ".join(source.split()), " ".join(summary.split())


def build_clinical_sum(noteevents: str | Path, out: str | Path, *, kind: str = "radiology", n: int = 1000,
                       seed: int = 0, section: str = "Brief Hospital Course") -> dict:
    """Write ``out`` (JSONL) and ``out.meta.json``; returns the metadata (settings and counts)."""
    from ..io import write_json, write_jsonl

    path = Path(noteevents)
    if kind not in KINDS:
        raise DataError(path, "source", "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    if not path.is_file():
        raise DataError(path, "source", "path", "no such file")
    if n < 1:
        raise DataError(path, "source", "n", f"must be >= 1, got {n}")
    eligible: list[int] = []
    seen_rows = 0
    for lineno, row in _rows(path):
        seen_rows += 1
        if row["CATEGORY"].strip() != KINDS[kind] or row["ISERROR"].strip() == "1":
            continue
        if _pair(kind, row["TEXT"], section) is not None:
            try:
                eligible.append(int(row["ROW_ID"]))
            except ValueError:
                raise DataError(path, f"line {lineno}", "ROW_ID", f"{row['ROW_ID']!r} is not a number") from None
    if not eligible:
        raise DataError(path, "file", "TEXT", f"no {KINDS[kind]} notes with the sections this builder needs")
    chosen = set(sorted(random.Random(seed).sample(sorted(eligible), min(n, len(eligible)))))
    records = []
    for _, row in _rows(path):
        rid = row["ROW_ID"].strip()
        if rid.isdigit() and int(rid) in chosen and row["CATEGORY"].strip() == KINDS[kind]:
            source, summary = _pair(kind, row["TEXT"], section)
            records.append({"id": f"mimic3-{rid}", "text": source, "summary": summary,
                            "metadata": {"note_type": kind, "section": "IMPRESSION" if kind == "radiology"
                                         else section}})
    records.sort(key=lambda r: int(r["id"].split("-")[1]))
    out = Path(out)
    write_jsonl(out, records)
    meta = {"builder": "medpeft.data.mimic.build_clinical_sum", "source": str(path.resolve()),
            "source_bytes": path.stat().st_size, "kind": kind, "section": section if kind == "discharge" else None,
            "seed": seed, "n_requested": n, "rows_read": seen_rows, "eligible": len(eligible),
            "written": len(records), "columns_read": list(COLUMNS)}
    write_json(out.with_name(out.name + ".meta.json"), meta)
    return meta

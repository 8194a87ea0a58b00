"""Low-level readers: bytes -> rows with their location, with errors that name file and line.

Benchmarks ship as JSON, JSON lines or CSV; every reader yields ``(where, row)`` where
``where`` is ``"line N"`` (1-based, as an editor shows it) or ``"record 'KEY'"``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Decode a whole file, naming the file and byte offset when the encoding is wrong."""
    data = path.read_bytes()
    if encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        encoding = "utf-8-sig"  # tolerate a BOM, common in CSVs saved by Excel
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            path, f"line {line}", None,
            f"cannot decode byte {err.start} as {encoding} ({err.reason}); "
            "re-save the file as UTF-8 or set the source's 'encoding'",
        ) from None


def iter_jsonl(path: Path, encoding: str = "utf-8", errors: list | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``("line N", obj)`` for each non-blank line; bad JSON goes to ``errors`` or raises."""
    # split on "\n" only: str.splitlines() also splits on U+2028 & co., which occur inside JSON strings
    for lineno, line in enumerate(read_text(path, encoding).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            exc = DataError(path, f"line {lineno}", None, f"invalid JSON ({err.msg} at column {err.colno})")
            if errors is None:
                raise exc from None
            errors.append(exc)


def iter_json_records(path: Path, encoding: str = "utf-8", errors: list | None = None) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file holding a list (``record N``) or a dict by key (``record 'KEY'``);
    a ``.jsonl`` file is read line by line instead."""
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, encoding, errors)
        return
    text = read_text(path, encoding)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, f"line {err.lineno}", None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(obj, list):
        for i, rec in enumerate(obj):
            yield f"record {i}", rec
    elif isinstance(obj, dict):
        for key, rec in obj.items():
            yield f"record '{key}'", {"__key__": key, **rec} if isinstance(rec, dict) else rec
    else:
        raise DataError(path, "top level", None, "expected a JSON list or object of records")


def iter_csv(path: Path, header: bool = True, encoding: str = "utf-8") -> Iterator[tuple[str, Any]]:
    """Yield ``("line N", row)``: a dict keyed by the header, or a list when ``header=False``.

    A ``.jsonl`` file is accepted too (one row per line, as a dict or a list), the form in
    which CSV rows are often redistributed.
    """
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, encoding)
        return
    text = read_text(path, encoding)
    reader = csv.reader(io.StringIO(text, newline=""))
    names: list[str] | None = None
    for row in reader:
        lineno = reader.line_num  # physical line where the row ends; good enough to find it
        if not any(cell.strip() for cell in row):
            continue
        if header and names is None:
            names = row
            continue
        if names is not None:
            if len(row) != len(names):
                raise DataError(path, f"line {lineno}", None, f"{len(row)} columns, header has {len(names)}")
            yield f"line {lineno}", dict(zip(names, row))
        else:
            yield f"line {lineno}", row

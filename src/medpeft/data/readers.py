"""Low-level readers: bytes -> rows with their location, with errors that name file and line.

Benchmarks ship as JSON, JSON lines or CSV; every reader yields ``(where, row)`` where
``where`` is ``"line N"`` (1-based, as an editor shows it) or ``"record 'KEY'"``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

# Real clinical notes and abstracts exceed the csv module's default field limit (128 KiB).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json`` object hook: a key given twice is an error (json would keep only the last)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


class Unparsable(ValueError):
    """JSON that parses to something Python cannot hold (integers beyond 4300 digits, nesting deeper
    than the recursion limit)."""


def parse_json(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys in any object (:class:`DuplicateKey`) and
    reports unparsable values as :class:`Unparsable`."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, DuplicateKey):
        raise
    except RecursionError:
        raise Unparsable("nested too deeply") from None
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise Unparsable(str(err).split(";")[0]) from None


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Decode a whole file, naming the file and byte offset when the encoding is wrong."""
    if path.is_dir():
        raise DataError(path, "file", None, "is a folder, expected a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(path, "file", None, f"cannot read it ({err.strerror or err})") from None
    if encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        encoding = "utf-8-sig"  # tolerate a BOM, common in CSVs saved by Excel
    try:
        return data.decode(encoding)
    except LookupError:
        raise DataError(path, "file", "encoding", f"unknown text encoding {encoding!r}") from None
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            path, f"line {line}", None,
            f"cannot decode byte {err.start} as {encoding} ({err.reason}); "
            "re-save the file as UTF-8 or give its encoding (the source's 'encoding'; medpeft tag: --encoding)",
        ) from None


def iter_jsonl(path: Path, encoding: str = "utf-8", errors: list | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``("line N", obj)`` for each non-blank line; bad JSON goes to ``errors`` or raises."""
    # split on "\n" only: str.splitlines() also splits on U+2028 & co., which occur inside JSON strings
    for lineno, line in enumerate(read_text(path, encoding).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", parse_json(line)
        except json.JSONDecodeError as err:
            exc = DataError(path, f"line {lineno}", None, f"invalid JSON ({err.msg} at column {err.colno})")
            if errors is None:
                raise exc from None
            errors.append(exc)
        except DuplicateKey as err:
            exc = DataError(path, f"line {lineno}", err.key, "the key appears twice in one object")
            if errors is None:
                raise exc from None
            errors.append(exc)
        except Unparsable as err:
            exc = DataError(path, f"line {lineno}", None, f"unreadable JSON value ({err})")
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
    if not text.strip():
        raise DataError(path, "file", None, "no records (empty file)")
    try:
        obj = parse_json(text)
    except Unparsable as err:
        raise DataError(path, "file", None, f"unreadable JSON value ({err})") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines under a .json name (MedMCQA)
            yield from iter_jsonl(path, encoding, errors)
            return
        raise DataError(path, f"line {err.lineno}", None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    except DuplicateKey as err:  # e.g. a PMID given twice: the second record would replace the first
        raise DataError(path, "file", err.key, "the key appears twice in one JSON object (JSON would keep only "
                                               "the last)") from None
    if isinstance(obj, list):
        for i, rec in enumerate(obj):
            yield f"record {i}", rec
    elif isinstance(obj, dict):
        for key, rec in obj.items():
            yield f"record '{key}'", {**rec, "__key__": key} if isinstance(rec, dict) else rec
    else:
        raise DataError(path, "top level", None, "expected a JSON list or object of records")


def iter_csv(path: Path, header: bool = True, encoding: str = "utf-8",
             errors: list | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``("line N", row)``: a dict keyed by the header, or a list when ``header=False``.
    A row with the wrong number of columns goes to ``errors`` (``--skip-invalid``) or raises.

    A ``.jsonl`` file is accepted too (one row per line, as a dict or a list), the form in
    which CSV rows are often redistributed.
    """
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, encoding, errors)
        return
    text = read_text(path, encoding)
    reader = csv.reader(io.StringIO(text, newline=""))
    names: list[str] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(path, f"line {reader.line_num}", None, f"malformed CSV ({err})") from None
        lineno = reader.line_num  # physical line where the row ends; good enough to find it
        if not any(cell.strip() for cell in row):
            continue
        if header and names is None:
            repeated = sorted({n for n in row if n.strip() and row.count(n) > 1})
            if repeated:
                raise DataError(path, f"line {lineno}", repeated[0], "the column name appears twice in the header")
            names = row
            continue
        if names is not None:
            if len(row) != len(names):
                exc = DataError(path, f"line {lineno}", None, f"{len(row)} columns, header has {len(names)}")
                if errors is None:
                    raise exc
                errors.append(exc)
                continue
            yield f"line {lineno}", dict(zip(names, row))
        else:
            yield f"line {lineno}", row

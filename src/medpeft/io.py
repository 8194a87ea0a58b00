"""Atomic file writes and JSON-lines helpers.

A killed run must never leave a half-written file that a later step trusts, so every
file is written to a temporary name in the same folder, flushed, fsynced and then
renamed over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if err.filename is None:  # e.g. ENOSPC from write/fsync: name the file being written
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2, sort_keys=False)
        fh.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomically write one JSON object per line."""
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


_HELD_LOCKS: dict[Path, list] = {}  # run folder -> [open lock file, depth]: re-entrant within a process


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``run_dir``'s lock: one process writes a run folder at a time.

    An advisory ``flock`` on ``run_dir/.medpeft.lock``, taken without waiting (a second
    writer fails at once) and released by the operating system when the holder exits, so a
    killed run never leaves the folder locked. Re-entrant within a process. Where ``fcntl``
    does not exist (Windows) there is no lock.
    """
    from .errors import MedpeftError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    from .distributed import processes

    if not processes().is_main:  # the main process of a multi-process run holds it for the run
        yield
        return
    run_dir = Path(run_dir).resolve()
    held = _HELD_LOCKS.get(run_dir)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".medpeft.lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise MedpeftError(f"{run_dir} is in use by {owner}; wait for it to finish or choose another "
                           "output_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"medpeft process {os.getpid()}")
    fh.flush()
    _HELD_LOCKS[run_dir] = [fh, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[run_dir]
        fh.close()  # releases the flock


def atomic_dir(final: str | os.PathLike) -> "AtomicDir":
    """Build a folder under a temporary name and rename it into place on success."""
    return AtomicDir(Path(final))


class AtomicDir:
    """Context manager yielding a temporary folder that replaces ``final`` on exit."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        mask = _umask()  # files written inside by other libraries (safetensors: 0600) get normal permissions
        for path in self.tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        old = self.final.with_name(f".{self.final.name}.old")
        if self.final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old.exists():
            shutil.rmtree(old)

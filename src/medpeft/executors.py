"""Suites fanned out as jobs: every cell is ``medpeft suite CONFIG --only-cell LABEL`` run by
``submitit`` -- its local executor (one cell per device or group of devices on this
machine) or its Slurm executor (one job per cell).

The job engine is submitit's; what is ours is the order: a cell starts once the cells it
reads (a router's adapter library) are done; a cell whose dependency failed is not run; a
failed cell is reported with its log and the others go on. Each job runs the same function
as the sequential suite (:func:`medpeft.pipeline.run_suite_cell`), so the cells' files, and
the report written from them, are the ones a sequential run writes. Finished cells are
reused and interrupted ones resumed, as in a sequential suite.

submitit hands each job a pickled callable in ``<jobs folder>``: here always a
``CommandFunction`` (a command line) that medpeft itself wrote there.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MedpeftError

log = logging.getLogger(__name__)
EXECUTORS = ("sequential", "local", "slurm")


@dataclass
class ExecutorSettings:
    """How cells are run: ``kind`` (sequential | local | slurm) and its resources."""

    kind: str = "sequential"
    devices: list[str] = field(default_factory=list)  # local: device ids ("0", "1", ...) or "cpu" workers
    gpus_per_cell: int = 1  # local and slurm: devices per cell (more than one: torchrun inside the job)
    partition: str | None = None  # slurm
    time_min: int = 24 * 60  # wall-clock limit per cell (slurm, and the local executor's timeout)
    cpus_per_cell: int | None = None  # slurm
    mem_gb: int | None = None  # slurm
    slurm_args: dict[str, str] = field(default_factory=dict)  # extra sbatch options (e.g. account, qos)
    poll_s: float = 2.0

    def check(self) -> None:
        if self.kind not in EXECUTORS:
            raise MedpeftError(f"--executor {self.kind!r}: choose one of {', '.join(EXECUTORS)}")
        if self.gpus_per_cell < 1:
            raise MedpeftError(f"--gpus-per-cell must be >= 1, got {self.gpus_per_cell}")
        if self.time_min < 1:
            raise MedpeftError(f"--time must be >= 1 minute, got {self.time_min}")
        if self.kind == "local":
            if not self.devices:
                raise MedpeftError("--executor local needs --devices (e.g. --devices 0,1,2,3, or cpu,cpu for "
                                   "two CPU workers)")
            for d in self.devices:
                if d != "cpu" and not d.isdigit():
                    raise MedpeftError(f"--devices {','.join(self.devices)}: {d!r} is neither a GPU index nor 'cpu'")
            gpus = [d for d in self.devices if d != "cpu"]
            if gpus and len(gpus) < len(self.devices):
                raise MedpeftError(f"--devices {','.join(self.devices)}: GPU indices and cpu workers are not mixed "
                                   "(a cell's command is set before it gets a slot)")
            if gpus and len(gpus) % self.gpus_per_cell:
                raise MedpeftError(f"--devices lists {len(gpus)} GPUs, not a multiple of --gpus-per-cell "
                                   f"{self.gpus_per_cell}")
        if self.kind == "slurm" and not self.partition:
            raise MedpeftError("--executor slurm needs --partition")

    def slots(self) -> list[tuple[int, ...]]:
        """Local executor: the device groups cells run on at the same time (``()`` = a CPU worker)."""
        if self.kind != "local":
            return []
        cpus = [() for d in self.devices if d == "cpu"]
        gpus = [int(d) for d in self.devices if d != "cpu"]
        return cpus + [tuple(gpus[i:i + self.gpus_per_cell]) for i in range(0, len(gpus), self.gpus_per_cell)]


@dataclass
class CellOutcome:
    label: str
    ok: bool
    log: Path | None = None
    reason: str = ""


def cell_command(config: str, overrides: list[str], label: str, *, processes: int = 1,
                 skip_invalid: bool = False) -> list[str]:
    """The command line of one cell's job (``torchrun`` around it for a multi-GPU cell)."""
    path = Path(config)
    config = str(path.resolve()) if path.exists() else config  # jobs may start in another folder
    medpeft = ["-m", "medpeft", "suite", config, *overrides, "--only-cell", label]
    if skip_invalid:
        medpeft.append("--skip-invalid")
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                *medpeft]
    return [sys.executable, *medpeft]


def make_executor(settings: ExecutorSettings, folder: Path):
    """The submitit executor of ``settings`` writing its job files and logs in ``folder``."""
    import submitit

    if settings.kind == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=settings.time_min)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=str(folder))
    except RuntimeError as err:  # submitit: no srun on this machine
        raise MedpeftError(f"--executor slurm: {err} (submit from a Slurm login node)") from None
    params = {"partition": settings.partition, "time": settings.time_min, "nodes": 1, "ntasks_per_node": 1,
              "gpus_per_node": settings.gpus_per_cell, "job_name": "medpeft-cell"}
    if settings.cpus_per_cell:
        params["cpus_per_task"] = settings.cpus_per_cell
    if settings.mem_gb:
        params["mem"] = f"{settings.mem_gb}GB"
    if settings.slurm_args:
        params["additional_parameters"] = dict(settings.slurm_args)
    executor.update_parameters(**params)
    return executor


def fan_out(commands: dict[str, list[str]], needs: dict[str, list[str]], settings: ExecutorSettings,
            folder: Path, executor=None) -> dict[str, CellOutcome]:
    """Run every cell's command as a job, in dependency order; returns each cell's outcome.

    Local: at most one job per device slot at a time, each with only its devices visible.
    Slurm: every ready cell is submitted at once (the scheduler queues them).
    """
    from submitit.helpers import CommandFunction

    folder.mkdir(parents=True, exist_ok=True)
    executor = executor or make_executor(settings, folder)
    slots = settings.slots()
    free = list(slots)
    pending = list(commands)
    running: dict[str, tuple] = {}
    outcomes: dict[str, CellOutcome] = {}
    cwd = os.getcwd()
    while pending or running:
        for label in list(pending):
            failed_need = next((n for n in needs.get(label, []) if n in outcomes and not outcomes[n].ok), None)
            if failed_need is not None:
                outcomes[label] = CellOutcome(label, False, None, f"not run: it reads {failed_need}, which failed")
                pending.remove(label)
                continue
            if not all(n in outcomes for n in needs.get(label, [])):
                continue
            if settings.kind == "local":
                if not free:
                    break
                slot = free.pop(0)
                executor.update_parameters(gpus_per_node=len(slot), visible_gpus=slot)
            else:
                slot = None
            job = executor.submit(CommandFunction(commands[label], cwd=cwd, verbose=True))
            log.info("cell %s: job %s (%s)", label, job.job_id, shlex.join(commands[label]))
            print(f"cell {label}: job {job.job_id}" + (f" on devices {list(slot) or 'cpu'}" if slot is not None
                                                        else ""), file=sys.stderr)
            running[label] = (job, slot)
            pending.remove(label)
        for label, (job, slot) in list(running.items()):
            if not job.done():
                continue
            del running[label]
            if slot is not None:
                free.append(slot)
            try:
                job.result()
                outcomes[label] = CellOutcome(label, True, Path(job.paths.stderr))
            except Exception as err:  # noqa: BLE001 -- submitit's FailedJobError / UncompletedJobError
                lines = [l for l in str(err).strip().splitlines() if l.strip()]
                reason = next((l for l in reversed(lines) if "medpeft: error:" in l), lines[-1] if lines else "failed")
                outcomes[label] = CellOutcome(label, False, Path(job.paths.stderr), reason.strip())
        if pending and not running and not any(  # nothing can start: a dependency missing from the suite
                all(n in outcomes for n in needs.get(label, [])) for label in pending):
            for label in pending:
                outcomes[label] = CellOutcome(label, False, None, "not run: the cells it reads are not in this suite")
            pending = []
        if running:
            time.sleep(settings.poll_s)
    return {label: outcomes[label] for label in commands}

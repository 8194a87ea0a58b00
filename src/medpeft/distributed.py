"""The processes of one run (``torchrun`` / ``accelerate launch``): who writes, how they meet.

medpeft runs one process per device when launched by ``torchrun`` or ``accelerate launch``
(``WORLD_SIZE`` > 1). :func:`init_from_environment` starts the process group through
``accelerate``'s :class:`~accelerate.PartialState` (NCCL on GPUs, gloo on CPU) and reads
accelerate's FSDP plugin settings. Everything else asks :func:`processes` who it is:

* every rank reads the config and the data and builds the same model (cheap next to
  training, and it keeps every rank's view identical; :meth:`Processes.agree` checks that);
* only the main process writes files (config, metrics, TensorBoard, checkpoints, adapter,
  predictions) and shows progress; the others wait at :meth:`Processes.barrier` where they
  next read what it wrote;
* a failure on any rank is reported once and ends every rank (:func:`report_failure`).

Gradients of a step are summed over ranks by :meth:`Processes.sum_` (see ``train.py`` for
why a step-level reduction and not DDP's per-backward one).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

ERROR_KEY = "medpeft/error/"  # + rank: the one-line error of a failed rank, in the launcher's store


@dataclass
class Processes:
    """This process's place in the run: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # None: medpeft's default device (single process)
    fsdp: bool = False  # accelerate's FSDP plugin is on (ACCELERATE_USE_FSDP): train with FSDP2
    fsdp_settings: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In-place sum over ranks of ``tensors`` (one coalesced all-reduce per dtype)."""
        if not self.distributed or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, by rank (tensors inside travel as CPU tensors).

        Objects are pickled by ``torch.distributed`` between the processes of this run only,
        never read from a file.
        """
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def agree(self, value, what: str) -> None:
        """Every rank must hold the same ``value`` (e.g. a hash of its training data): if one
        differs, the run stops on every rank rather than training on mixed views."""
        if not self.distributed:
            return
        values = self.gather(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            from .errors import MedpeftError

            raise MedpeftError(f"the processes of this run see different {what} (rank {differ[0]} differs from "
                               "rank 0): every rank must read the same files")

    def shard(self, n: int) -> list[int]:
        """The indices ``rank, rank + world, ...`` of ``n`` units of work this rank takes."""
        return list(range(self.rank, n, self.world))


_CURRENT = Processes()


def processes() -> Processes:
    """This process's :class:`Processes` (a single process unless :func:`init_from_environment` ran)."""
    return _CURRENT


def launched_world_size() -> int:
    """The number of processes ``torchrun`` / ``accelerate launch`` started (1 if neither)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _fsdp_settings() -> dict:
    """accelerate's FSDP plugin, as ``accelerate launch --config_file`` passes it (env vars)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return {}
    return {"version": int(os.environ.get("FSDP_VERSION", "1")),
            "reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true"),
            "cpu_offload": os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("1", "true")}


def init_from_environment() -> Processes:
    """Start the process group when launched with several processes; a no-op otherwise.

    DeepSpeed launches (``ACCELERATE_USE_DEEPSPEED``) are refused with one line: medpeft's
    loop reduces gradients itself and would fight the ZeRO engine (docs/training.md)."""
    global _CURRENT
    from .errors import MedpeftError

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        raise MedpeftError("accelerate config: distributed_type DEEPSPEED is not supported by medpeft's training "
                           "loop; use configs/accelerate/fsdp2.yaml (sharded, the ZeRO-3 equivalent) or ddp.yaml")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", ""):
        raise MedpeftError(f"accelerate config: mixed_precision {precision!r} is not applied by medpeft; set it to "
                           "'no' and choose the precision with model.dtype (bf16: bf16 weights, fp32 adapters)")
    if launched_world_size() <= 1:
        return _CURRENT
    from accelerate import PartialState

    settings = _fsdp_settings()
    if settings and settings["version"] != 2:
        raise MedpeftError("accelerate config: fsdp_version 1 is not supported; set fsdp_config.fsdp_version: 2 "
                           "(configs/accelerate/fsdp2.yaml)")
    state = PartialState(cpu=not torch.cuda.is_available())
    device = torch.device(state.device.type, state.device.index) if state.device.type == "cuda" \
        else torch.device("cpu")
    _CURRENT = Processes(rank=state.process_index, world=state.num_processes, device=device,
                         fsdp=bool(settings), fsdp_settings=settings)
    if not _CURRENT.is_main:  # one set of warnings and progress bars per run
        logging.getLogger("medpeft").setLevel(logging.ERROR)
    return _CURRENT


def finish() -> None:
    """Tear the process group down after a successful run (so no rank aborts at exit)."""
    global _CURRENT
    if _CURRENT.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _CURRENT = Processes()


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # torch has no public getter of the launcher's store


def report_failure(message: str, say, grace_s: float = 5.0) -> None:
    """Show this rank's one-line error (``say()``) unless a lower rank failed too, and record it.

    Several ranks failing alike (a bad config: every rank fails) show it once (the lowest
    failed rank); a rank failing alone (a file only it could not read) shows its own. Rank 0
    shows first and then records (so the launcher cannot end it before it has said why);
    another rank records, waits ``grace_s`` for a lower rank's record, and shows its own if
    none came. The ranks still running are blocked in a collective; the launcher ends them
    once this process exits (or their collective fails and :func:`failed_elsewhere` is
    true), so nothing hangs.
    """
    proc = processes()
    if launched_world_size() > 1 and not torch.distributed.is_initialized():
        if os.environ.get("RANK", "0") == "0":  # before the group is up: the launch's settings, alike on every rank
            say()
        else:
            time.sleep(grace_s)  # leave rank 0 the time to say it before the launcher ends the others
        return
    if not proc.distributed:
        say()
        return
    try:
        store = _store()
        if proc.is_main:
            say()
            store.set(f"{ERROR_KEY}{proc.rank}", message)
            return
        store.set(f"{ERROR_KEY}{proc.rank}", message)
        lower = [f"{ERROR_KEY}{r}" for r in range(proc.rank)]
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:  # let ranks failing alike record theirs
            if any(store.check([key]) for key in lower):
                return
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 -- the store went away with the launcher: say it here
        pass
    say()


def failed_elsewhere() -> bool:
    """Whether another rank recorded an error (a collective of this rank then fails too:
    the error was shown by that rank, so this one exits quietly)."""
    proc = processes()
    if not proc.distributed:
        return False
    try:
        store = _store()
        return any(store.check([f"{ERROR_KEY}{r}"]) for r in range(proc.world) if r != proc.rank)
    except Exception:  # noqa: BLE001
        return False


def exit_now(code: int) -> None:
    """Leave without tearing down the process group (its destructors can block on peers that
    are gone)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["Processes", "processes", "init_from_environment", "finish", "report_failure", "failed_elsewhere",
           "exit_now", "launched_world_size"]

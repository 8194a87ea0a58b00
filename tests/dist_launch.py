"""medpeft's CLI under ``torchrun``, with the faults the multi-process tests need (test-only).

* ``MEDPEFT_TEST_STOP_AFTER=N``: every rank stops dead after its N-th optimizer step (a
  preempted job: whatever was checkpointed stays, nothing else is written).
* ``MEDPEFT_TEST_RANK_OVERRIDE=R:key=value``: rank R alone gets one more config override
  (a node that sees another copy of a file).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/dist_launch.py <medpeft arguments>``.
"""

import os
import sys

from medpeft import train as train_module
from medpeft.cli import main

stop_after = int(os.environ.get("MEDPEFT_TEST_STOP_AFTER", "0"))
if stop_after:
    real_step, calls = train_module.training_step, [0]

    def stopping_step(*args, **kwargs):
        if calls[0] == stop_after:
            sys.stdout.flush()
            os._exit(75)
        calls[0] += 1
        return real_step(*args, **kwargs)

    train_module.training_step = stopping_step

argv = sys.argv[1:]
rank_override = os.environ.get("MEDPEFT_TEST_RANK_OVERRIDE")
if rank_override:
    rank, override = rank_override.split(":", 1)
    if os.environ.get("RANK") == rank:
        argv.append(override)
sys.exit(main(argv))

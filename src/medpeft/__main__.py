"""``python -m medpeft`` (what ``accelerate launch -m medpeft`` and ``torchrun -m medpeft`` run)."""

import sys

from .cli import main

sys.exit(main())

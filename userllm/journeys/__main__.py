"""``python -m userllm.journeys`` (see :mod:`userllm.journeys.run`)."""

from ..cli import run_cli
from .run import main

raise SystemExit(run_cli(main))

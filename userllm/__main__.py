"""``python -m userllm COMMAND ...``: a shortcut to the stage entry points.

    python -m userllm pretrain ...   = python -m userllm.pretrain ...
    python -m userllm train ...      = python -m userllm.train ...
    python -m userllm evaluate RUN   = python -m userllm.evaluate RUN
"""

from __future__ import annotations

import importlib
import sys

from .cli import run_cli

COMMANDS = ("pretrain", "train", "evaluate")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"userllm.{argv[0]}")
    return run_cli(module.main, argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m userllm.explore``: the exploration experiment (see :mod:`userllm.explore`)."""

from __future__ import annotations

from typing import Sequence

from ..cli import run_cli, user_errors
from ..config import parse_config
from .config import ExploreConfig


def main(argv: Sequence[str] | None = None) -> int:
    from .run import run

    cfg = parse_config(argv, cls=ExploreConfig)
    with user_errors():                # library code's ValueError / TypeError about bad input: one line
        run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

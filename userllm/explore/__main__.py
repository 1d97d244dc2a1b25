"""``python -m userllm.explore``: the exploration experiment (see :mod:`userllm.explore`)."""

from __future__ import annotations

from typing import Sequence

from ..cli import run_cli
from ..config import parse_config
from ..errors import UserError
from .config import ExploreConfig


def main(argv: Sequence[str] | None = None) -> int:
    from .run import run

    cfg = parse_config(argv, cls=ExploreConfig, prog="python -m userllm.explore",
                       description=ExploreConfig.__doc__)
    try:
        run(cfg)
    except (ValueError, TypeError) as exc:  # model code's errors about bad input: one line, exit status 2
        raise UserError(str(exc)) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

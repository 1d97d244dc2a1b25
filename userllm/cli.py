"""Shared plumbing for the ``python -m userllm.*`` entry points."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from .errors import UserError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit status 2.

    Ctrl-C exits with 130 and a one-line message. Any other exception is a bug and propagates with
    its traceback.
    """
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)

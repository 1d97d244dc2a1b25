"""The command-line layer shared by the ``python -m userllm.*`` entry points.

Only this layer turns errors into one-line exits: :func:`run_cli` prints a :class:`UserError` as
``error: ...`` with its exit status (2, or the error's own ``exit_code``), and :func:`user_errors` turns
the ``ValueError`` / ``TypeError`` that library code raises for a bad argument into a UserError at the
call sites where the argument came from the user. :class:`ArgumentParser` raises UserError instead of
exiting and says every option's default once. :func:`select_kernels` routes the fused ops for a run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator, Sequence

from .errors import UserError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and its exit status
    (2 unless the error says otherwise, e.g. 3 for a diverged training run).

    Ctrl-C exits with 130 and a one-line message. Any other exception is a bug and propagates with
    its traceback.
    """
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


@contextlib.contextmanager
def user_errors(where: str = "") -> Iterator[None]:
    """Turn ``ValueError`` / ``TypeError`` raised inside into a :class:`UserError` (prefixed by ``where``)."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}{': ' if where else ''}{exc}") from exc


class HelpFormatter(argparse.HelpFormatter):
    """Says each option's default once: appended unless the help already names it; booleans on/off;
    nothing for a None default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or action.default is argparse.SUPPRESS or not action.option_strings:
            return help_text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction)):
            return f"{help_text} (default: {'on' if action.default else 'off'})"
        if action.default is None or action.default == [] or action.default == "":
            return help_text
        return f"{help_text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UserError (exit 2 via run_cli, no traceback) instead of exiting itself, with
    :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message}\n{self.format_usage().strip()}")


def select_kernels(cfg, device) -> str:
    """Route the three ops: the reference ops unless --fused-kernels; then Triton on CUDA, native on CPU.

    Returns a one-line description of the path taken (printed once by rank 0).
    """
    from .kernels import select_backend

    return select_backend(cfg.fused_kernels, device)

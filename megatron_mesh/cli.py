"""What every tool in tools/ shares: how it reports a user's error, and its standard flags.

A tool's ``main(argv=None)`` is wrapped by ``@cli.tool``: a ``MeshError`` (a bad config, file or
flag: ``megatron_mesh.errors``) prints ``error: <message>`` on stderr and exits with status 2,
argparse's own status for a bad command line; any other exception is a bug and keeps its
traceback (status 1). A tool's own check of its flags calls ``cli.fail``, the same line and
status.

``add_output`` / ``add_input`` / ``add_force`` give ``--output`` / ``--input`` / ``--force`` one
attribute name in every tool (``args.output``, ``args.input``, ``args.force``), whatever older
spelling (``--out``, ``--load``, ...) a tool also accepts.

Plain Python only, and nothing of the package imported at module level: tools load this module
before parsing (tools/_bootstrap.py), and ``--help`` must not pay for torch and megatron-core.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, NoReturn, Optional, TypeVar

USAGE_ERROR = 2
"""The exit status of a user's error (argparse exits with it on a bad command line)."""

Main = TypeVar("Main", bound=Callable[..., Optional[int]])


class ErrorExit(SystemExit):
    """The exit after ``error: <message>`` went to stderr: status ``USAGE_ERROR``. Its ``str()``
    is that line, so a caller running a tool's ``main`` in-process (a test) can read it."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.code = USAGE_ERROR  # Python's exit handler then prints nothing more


def _announced(message: str) -> ErrorExit:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return ErrorExit(message)


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with status 2."""
    raise _announced(message)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a ``MeshError``. Read from ``sys.modules``: a process that never imported
    megatron_mesh.errors raised none, and importing the package here would cost seconds."""
    errors = sys.modules.get("megatron_mesh.errors")
    return errors is not None and isinstance(err, errors.MeshError)


def tool(main: Main) -> Main:
    """Decorate a tool's ``main(argv=None)``: a MeshError becomes ``fail(message)``; every other
    exception propagates unchanged, with its traceback."""

    @functools.wraps(main)
    def shell(argv=None):
        try:
            return main(argv)
        except Exception as err:
            if not is_user_error(err):
                raise
            raise _announced(str(err)) from err

    return shell  # type: ignore[return-value]


def add_output(parser: argparse.ArgumentParser, *aliases: str, **options) -> argparse.Action:
    """``--output`` (and ``aliases``, e.g. ``--out``), read as ``args.output``."""
    return parser.add_argument("--output", *aliases, dest="output", **options)


def add_input(parser: argparse.ArgumentParser, *aliases: str, **options) -> argparse.Action:
    """``--input`` (and ``aliases``, e.g. ``--load``), read as ``args.input``."""
    return parser.add_argument("--input", *aliases, dest="input", **options)


def add_force(parser: argparse.ArgumentParser, what: str = "--output directory") -> argparse.Action:
    """``--force``, read as ``args.force``: replace a non-empty output."""
    return parser.add_argument("--force", action="store_true", help=f"replace a non-empty {what}")

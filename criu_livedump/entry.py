"""The ``criu-livedump`` command's entry point: what a dump does before its command line is
parsed, then :func:`criu_livedump.cli.main`.

A dump leaves the caller's session first (:func:`criu_livedump.linux.sched.own_session`): a
session is a scheduling group (autogroup), and the caller's may hold the very threads the dump
races, a busy target started from the same shell, where the interpreter's start and the imports
of click and the library (a tenth of a second of CPU) shared its CPUs with them. The session's
nice is the default capture nice for a target at the caller's own nice
(:func:`criu_livedump.request.capture_nice`); ``dump`` sets the exact one once its request is
parsed, a tenth of a second later.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn


def main() -> NoReturn:
    """Console-script entry point."""
    if command(sys.argv[1:]) == "dump":
        _own_session()
    from criu_livedump.cli import main as cli_main

    cli_main()


def command(args: Sequence[str]) -> str | None:
    """The subcommand *args* name: their first word that is no option (the group's options are
    flags, none takes a value: tests/test_cli.py checks it)."""
    return next((a for a in args if not a.startswith("-")), None)


def _own_session() -> None:
    from criu_livedump.linux.sched import own_session
    from criu_livedump.request import capture_nice

    try:
        nice = capture_nice(None, os.getpriority(os.PRIO_PROCESS, 0))
    except OSError:
        return
    own_session(nice.nice)

"""The orchestrator's exception hierarchy: every failure a user can cause is a LivedumpError.

Messages are one line and name the culprit (a process, a file, a CRIU command). A *hint*, when
one is known, says what to do about it; only :mod:`criu_livedump.cli` prints messages and hints
and turns the exception type into an exit status.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: The hint for anything that fails for lack of privilege.
PRIVILEGE_HINT = "live dumps need root or CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE"


class LivedumpError(Exception):
    """Root of every error the orchestrator raises.

    :param message: one line naming the object and the problem.
    :param hint: optional advice printed after the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class CriuNotFoundError(LivedumpError):
    """No CRIU binary where the tool looked."""

    def __init__(self, searched: Sequence[str]) -> None:
        super().__init__(
            "CRIU not found (looked in: " + ", ".join(searched) + ")",
            hint="run `make setup`, or name a binary with --criu PATH or the CRIU variable",
        )
        self.searched = list(searched)


class CriuUnusableError(LivedumpError):
    """A CRIU binary exists but cannot be used (not executable, wrong program, check fails)."""

    def __init__(self, path: str, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {problem}", hint=hint)
        self.path = path
        self.problem = problem


class CriuError(LivedumpError):
    """A CRIU command failed.

    :param argv: the command line that was run.
    :param returncode: its exit status (negative: killed by that signal).
    :param log_tail: the last lines of CRIU's log, for the user.
    :param log_path: where the whole log is, when it was kept.
    :param cause: the log's line that explains the failure (snapshot/failures.py), when known;
        else the last Error line of *log_tail* is shown.
    :param pid: the process the failure is about, and *uid* its uid.
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        log_tail: str = "",
        *,
        log_path: str | None = None,
        hint: str | None = None,
        cause: str | None = None,
        pid: int | None = None,
        uid: int | None = None,
    ) -> None:
        action = argv[1] if len(argv) > 1 else argv[0] if argv else "criu"
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        last = _last_error_line(log_tail) if cause is None else cause
        detail = f": {last}" if last else ""
        who = "" if pid is None else f" on process {pid}" + ("" if uid is None else f" (uid {uid})")
        super().__init__(f"criu {action} failed ({how}){who}{detail}", hint=hint)
        self.argv = list(argv)
        self.pid = pid
        self.uid = uid
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_path = log_path


#: What begins each line of CRIU's log: the time since its start, ``(00.211066) ``; the words
#: CRIU prints for its user (``pr_msg()``) have none.
CRIU_LOG_STAMP = re.compile(r"^\(\d+\.\d+\)\s+")


def _last_error_line(log_tail: str) -> str:
    """The most telling line of a CRIU log: the last ``Error`` line, else the first line CRIU
    wrote for its user (``pr_msg()``: no timestamp, e.g. ``CRIU needs to have the
    CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability``), else the last line.

    CRIU's closing summary (``Dumping FAILED.``, from criu/cr-dump.c) says nothing about the
    cause; an ``Error`` line before it (``No space left on device``) is preferred.
    """
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln]
    specific = [ln for ln in errors if not ln.endswith("FAILED.")]
    if specific or errors:
        return (specific or errors)[-1]
    said = [ln for ln in lines if not CRIU_LOG_STAMP.match(ln)]
    return said[0] if said else lines[-1] if lines else ""


class PermissionDeniedError(LivedumpError):
    """The caller lacks a privilege the operation needs."""

    def __init__(self, message: str, *, hint: str | None = PRIVILEGE_HINT) -> None:
        super().__init__(message, hint=hint)


class TargetError(LivedumpError):
    """The target process is missing, vanished or cannot be inspected.

    :param pid: the target.
    :param problem: what is wrong with it.
    """

    def __init__(self, pid: int, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"process {pid}: {problem}", hint=hint)
        self.pid = pid
        self.problem = problem


class TargetDiedError(TargetError):
    """The target ended while it was being inspected or dumped; no core is written.

    :param how: how it ended ("killed by signal 9 (SIGKILL)"), when that could be read.
    """

    def __init__(self, pid: int, how: str | None = None, *, during: str = "the dump") -> None:
        super().__init__(pid, f"died during {during}" + (f" ({how})" if how else ""))
        self.how = how


class RequestError(LivedumpError):
    """An option, SPEC word or flag value is invalid (the message names it and the valid range)."""


class BlockerError(LivedumpError):
    """The target holds something CRIU cannot dump; refused before anything is frozen.

    :param pid: the target.
    :param blocker: one sentence naming the blocker.
    """

    def __init__(self, pid: int, blocker: str, *, hint: str | None = None) -> None:
        super().__init__(f"process {pid}: cannot be dumped: {blocker}", hint=hint)
        self.pid = pid
        self.blocker = blocker


class CloneRefusedError(BlockerError):
    """The clone method cannot snapshot this target; found at the clone itself rather than by
    :func:`criu_livedump.snapshot.choose` (the target changed in between, or a caller of the
    clone module skipped the refusals). Same wording and status as every other refusal.

    :param pid: the target.
    :param reason: one sentence saying why.
    """

    def __init__(self, pid: int, reason: str) -> None:
        super().__init__(pid, f"--method clone: {reason}")
        self.reason = reason


class SnapshotError(LivedumpError):
    """A snapshot method failed after its refusals passed; the target has been left running."""


class CloneError(SnapshotError):
    """The clone snapshot failed; the target has been left running and no clone is alive."""


class CloneImagesError(CloneError):
    """The clone's image set cannot be rewritten (a file missing or not what CRIU writes)."""


class ScratchError(LivedumpError):
    """The scratch directory for CRIU's images cannot be created or has no room."""

    def __init__(self, path: str, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {problem}", hint=hint)
        self.path = path
        self.problem = problem


class DestinationError(LivedumpError):
    """The core's destination (a file, a core_pattern, a pipe handler) cannot be used."""


class ConvertFailedError(LivedumpError):
    """The conversion child failed; the message is the converter's own one line."""


class CoreWriteError(ConvertFailedError):
    """The core's file could not be written while CRIU's pages streamed into it (its
    filesystem full or failing): the same failure, and status, as the conversion's write."""


class EnvironmentUnfitError(LivedumpError):
    """This host cannot take live dumps at all (``criu-livedump check`` fails)."""


class PageStreamError(SnapshotError):
    """CRIU's page stream (``--page-server`` over our socket) broke or could not be written."""

    def __init__(
        self, problem: str, *, hint: str | None = None, ended: bool = False, output: bool = False
    ) -> None:
        super().__init__(f"CRIU's page stream: {problem}", hint=hint)
        self.problem = problem
        #: CRIU's end closed early: CRIU's own failure says more
        self.ended = ended
        #: writing the output failed (*problem* names it)
        self.output = output

"""Start test programs that are always reaped, and wait until they say they are ready.

Each target is started by tests/procs.py's :func:`procs.popen`: it leads a process group of its
own (so closing it kills whatever it forked) and gets SIGKILL when the thread that started it
dies (PR_SET_PDEATHSIG), so a killed pytest leaves nothing behind. :meth:`Target.close` kills
the group and reaps the target; the ``targets`` fixture of tests/conftest.py closes every
target a test started.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import procs

from harness.errors import HarnessError
from harness.procstate import (
    MapEntry,
    RseqArea,
    read_maps,
    read_rseq_areas,
    thread_ids,
    thread_states,
)


class Target:
    """A test program started by :func:`start_target`; :meth:`close` kills and reaps it."""

    def __init__(self, proc: subprocess.Popen[bytes], argv: Sequence[str], ready_line: bytes):
        self.proc = proc
        self.argv = list(argv)
        self.pid = proc.pid
        #: the line the program printed when ready, e.g. b"ready 0x7f.. 0x7f.."
        self.ready_line = ready_line
        #: /proc/PID/maps; refreshed by :func:`harness.kernel.kernel_core` just before its dump
        self.maps: list[MapEntry] = read_maps(self.pid)
        #: rseq registration of every thread, read before any dump
        self.rseq: dict[int, RseqArea] = {}
        #: wait status once the process is reaped
        self.status: int | None = None

    def tids(self) -> list[int]:
        """Current thread ids, main thread first."""
        return thread_ids(self.pid)

    @property
    def coredump_filter(self) -> int:
        """The target's /proc/PID/coredump_filter."""
        return int(Path(f"/proc/{self.pid}/coredump_filter").read_text(), 16)

    @coredump_filter.setter
    def coredump_filter(self, value: int) -> None:
        Path(f"/proc/{self.pid}/coredump_filter").write_text(f"{value:#x}\n")

    def alive(self) -> bool:
        return self.status is None and self.proc.poll() is None

    def reaped(self, status: int) -> None:
        """Record that the caller reaped the process with waitpid (so Popen does not)."""
        self.status = status
        self.proc.returncode = (
            -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        )

    def close(self) -> None:
        """Kill the target's process group and reap the target (idempotent).

        The group is killed only while the target is unreaped: until then its pid, and so its
        group id, cannot be reused by an unrelated process.
        """
        if self.status is None and self.proc.returncode is None:
            procs.kill_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_target(
    binary: str | os.PathLike[str],
    *args: str | os.PathLike[str],
    ready: bytes = b"ready",
    timeout: float = 30.0,
    rseq: bool = True,
    cwd: str | os.PathLike[str] | None = None,
    settle: bool = False,
) -> Target:
    """Start *binary* in a process group of its own and wait for a line starting with *ready*.

    The target dies with the calling thread (PR_SET_PDEATHSIG): start it from the thread that
    outlives it, not from a short-lived worker thread.

    :param rseq: read every thread's rseq registration (see :attr:`Target.rseq`) once ready
        (and settled, with *settle*).
    :param settle: then wait, up to *timeout* seconds, until every thread sleeps (state ``S``):
        a program prints "ready" just before it blocks, and on a loaded machine a thread may
        still be on its way to its blocking call when the dumps start.
    :raises HarnessError: the program exited or stayed silent for *timeout* seconds; it is
        killed and reaped before the error propagates.
    :raises AssertionError: *settle* and a thread did not sleep within *timeout* seconds.
    """
    argv = [os.fspath(binary), *(os.fspath(a) for a in args)]
    proc = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=cwd)
    try:
        line = _wait_for_line(proc, ready, timeout)
        target = Target(proc, argv, line)
        if settle:
            procs.wait_for(
                lambda: set(thread_states(proc.pid).values()) == {"S"},
                timeout,
                f"{argv[0]}: every thread asleep",
            )
        if rseq:  # after settling: a thread on its way to its blocking call may not have
            # registered its rseq area yet (address 0), and its cpu bytes would go untolerated
            target.rseq = read_rseq_areas(proc.pid)
        return target
    except BaseException:
        procs.kill_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        raise


def _wait_for_line(proc: subprocess.Popen[bytes], ready: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(ready):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"{proc.args!r}: no {ready!r} line within {timeout} s")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
                raise HarnessError(
                    f"{proc.args!r}: exited ({proc.returncode}) before printing {ready!r}"
                )
            buf += chunk

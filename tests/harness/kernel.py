"""The reference: the kernel's own core of a target, taken with SIGABRT.

core_pattern is changed only under tests/syslock.py's lock and restored in its ``finally``.
Where the kernel writes the core is a :class:`CoreDestination`: a directory
(:class:`CoreDirectory`) or a ``|handler`` pipe (:class:`CorePipe`). :func:`kernel_core` takes
the core of a target this process started and reaps it; :func:`kernel_core_of` that of a
process it cannot wait for (a container's).
"""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path
from typing import Protocol

import procs
from syslock import core_pattern

from harness.errors import HarnessError
from harness.launcher import Target
from harness.procstate import read_maps


class CoreDestination(Protocol):
    """Where the kernel writes a core: the core_pattern to set, and how to find its core."""

    def pattern(self) -> str:
        """The value for /proc/sys/kernel/core_pattern."""
        ...

    def collect(self, pid: int) -> Path:
        """The core the kernel wrote for *pid*, once the process is reaped.

        :raises HarnessError: it is not there.
        """
        ...


class CoreDirectory:
    """Cores written by the kernel itself as ``DIRECTORY/kcore.PID`` (core_pattern ``%p``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).resolve()
        if "%" in str(self.directory) or " " in str(self.directory):
            raise HarnessError(f"{self.directory}: unusable in core_pattern")

    def pattern(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        return f"{self.directory}/kcore.%p"

    def collect(self, pid: int) -> Path:
        path = self.directory / f"kcore.{pid}"
        if not path.is_file():
            raise HarnessError(f"{path}: the kernel reported a core but it is not there")
        return path


class CorePipe:
    """Cores piped by the kernel to a handler (core_pattern ``|HANDLER %P``) that writes them to
    ``DIRECTORY/handler.PID`` (PID as seen from here), renamed into place once whole.

    For a process whose own mount namespace would take a file pattern as one of its own paths
    (a container's), and for testing ``|handler`` destinations. The kernel waits only until the
    handler closes its stdin, so :meth:`collect` waits (bounded) for the renamed file.
    """

    def __init__(self, directory: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.directory = Path(directory).resolve()
        self.handler = self.directory / "handler"
        self.timeout = timeout
        if "%" in str(self.directory) or " " in str(self.directory):
            raise HarnessError(f"{self.directory}: unusable in core_pattern")

    def pattern(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        # one part file per process: cores of several processes may arrive at once
        self.handler.write_text('#!/bin/sh\ncat > "$0.$1.part" && mv "$0.$1.part" "$0.$1"\n')
        self.handler.chmod(0o755)
        return f"|{self.handler} %P"

    def collect(self, pid: int) -> Path:
        path = Path(f"{self.handler}.{pid}")
        procs.wait_for(path.exists, self.timeout, f"the kernel's core of {pid} in {path}")
        return path


def kernel_core(target: Target, destination: str | os.PathLike[str] | CoreDestination) -> Path:
    """Let the kernel dump *target* (SIGABRT, RLIMIT_CORE unlimited) to *destination*.

    core_pattern is set under the system-settings lock and restored afterwards. *target* is
    reaped; its maps are refreshed just before the signal.

    :param destination: a directory (cores named ``kcore.PID``) or a :class:`CoreDestination`.
    :returns: the path of the kernel's core.
    :raises HarnessError: the destination is unusable, or the process did not die of SIGABRT
        with a core.
    """
    if isinstance(destination, (str, os.PathLike)):
        destination = CoreDirectory(destination)
    pattern = destination.pattern()
    pid = target.pid
    target.maps = read_maps(pid)
    with core_pattern(pattern):
        resource.prlimit(pid, resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
        os.kill(pid, signal.SIGABRT)
        _, status = os.waitpid(pid, 0)
        target.reaped(status)
    if not os.WIFSIGNALED(status) or os.WTERMSIG(status) != signal.SIGABRT:
        raise HarnessError(f"pid {pid}: did not die of SIGABRT (status {status:#x})")
    if not os.WCOREDUMP(status):
        raise HarnessError(f"pid {pid}: killed by SIGABRT but the kernel wrote no core")
    return destination.collect(pid)


def kernel_core_of(pid: int, destination: CoreDestination) -> Path:
    """The kernel's core of *pid*, a process this one cannot wait for (SIGABRT).

    core_pattern stays set until *destination* has the core; RLIMIT_CORE is left as it is (a
    pipe ignores it, and raising another process's hard limit needs CAP_SYS_RESOURCE).

    :raises AssertionError: the core did not arrive in time (see the destination).
    """
    with core_pattern(destination.pattern()):
        os.kill(pid, signal.SIGABRT)
        return destination.collect(pid)

"""Processes the tests start, and bounded waits on them (issue 11).

Every process started through :func:`popen` or :func:`run` leads its own process group and is
SIGKILLed by the kernel when the pytest process dies (``PR_SET_PDEATHSIG``). :func:`run` sends
a command's output to files, never to pipes, so a grandchild it left behind (a CRIU whose tool
was killed) cannot block the test on a pipe it inherited; on its timeout the whole process
group is killed and the test fails saying which command did not finish. The conftest makes
pytest a child subreaper and kills, after every test, whatever that test left among its
children (orphaned grandchildren come back to pytest): :func:`reap_leftovers`.

Waits are bounded and fail with what did not happen: :func:`wait_for`, :func:`readline`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

#: include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: Seconds a CLI command may take before the test gives up on it (a dump of a small target
#: takes about a second; this covers a machine loaded by other test suites many times over).
RUN_TIMEOUT = 300.0

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this process when its parent (the test) dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper() -> None:
    """Make orphaned descendants of this process its children (for :func:`reap_leftovers`)."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)


def popen(argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
    """:class:`subprocess.Popen` in a process group of its own that dies with the test."""
    kwargs.setdefault("process_group", 0)
    kwargs.setdefault("preexec_fn", die_with_parent)
    return subprocess.Popen([os.fspath(a) for a in argv], **kwargs)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL *proc*'s whole process group (it leads one, see :func:`popen`) and reap it.

    Only while *proc* is not reaped: its pid, zombie or not, then still names its group. Once
    reaped, the number is free, and with pid_max 32768 and several test suites running it is
    soon another process's, maybe another group's leader: it is never signalled then.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()  # started without a group of its own (not by popen()): itself at least
    proc.wait()


def wait_exit(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """Wait up to *timeout* seconds for *proc* to exit, without reaping it (its zombie keeps
    its pid and process group id ours, see :func:`kill_group`); whether it exited."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ)
            return bool(sel.select(timeout))
    finally:
        os.close(pidfd)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = RUN_TIMEOUT,
    text: bool = False,
    env: dict[str, str] | None = None,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """Run *argv* to its end with its output in files; fail the test after *timeout* seconds.

    Whatever is left in the command's process group when it ends is killed.

    :param check: fail the test, with the command's stderr, when it exits non-zero.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, **kwargs)
        try:
            ended = wait_exit(proc, timeout)
        finally:
            kill_group(proc)  # helpers it left in its group, or itself on timeout
        if not ended:
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
            raise AssertionError(
                f"{os.fspath(argv[0])} {' '.join(os.fspath(a) for a in argv[1:3])}..."
                f" did not finish within {timeout:.0f} s; its stderr: {tail}"
            )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(os.fspath(a) for a in argv)} failed ({proc.returncode}): "
            + stderr[-2000:].decode(errors="replace")
        )
    if text:
        return subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            stdout.decode(errors="replace"),
            stderr.decode(errors="replace"),
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(predicate: Callable[[], T], timeout: float, what: str, step: float = 0.01) -> T:
    """Poll *predicate* until it returns something true; return that.

    :raises AssertionError: "*what* did not happen within *timeout* s".
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(step)


def readline(stream: IO[Any] | None, timeout: float, what: str) -> str:
    """One line from a child's pipe (text or bytes), as text, waiting at most *timeout* s.

    Reads the descriptor directly, a byte at a time, so nothing is left in a Python buffer
    for later plain reads to miss.

    :raises AssertionError: no whole line within *timeout* s, or end of file first.
    """
    assert stream is not None
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"{what}: no line within {timeout:g} s (got {line!r})")
            byte = os.read(fd, 1)
            if not byte:
                raise AssertionError(f"{what}: end of output before a line (got {line!r})")
            line += byte
    return line.decode(errors="replace")


def reaped(pid: int) -> bool:
    """Whether *pid* is gone: reaped here if it is our zombie, else no longer in /proc."""
    try:
        return os.waitpid(pid, os.WNOHANG) != (0, 0)
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")


def children(pid: int) -> dict[int, str]:
    """``{pid: state}`` of every process whose parent is *pid* (zombies included)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            out[int(entry)] = fields[0]
    return out


@contextlib.contextmanager
def paused_at(
    argv: Sequence[str | os.PathLike[str]],
    env: dict[str, str],
    step: str,
    timeout: float = 60.0,
    **kwargs: Any,
) -> Iterator[subprocess.Popen[str]]:
    """A tool started with a test hook in *env* that stops it at *step* (it prints ``paused
    STEP`` on stderr and sleeps), yielded once so stopped (*kwargs* go to :func:`popen`); on
    exit it is SIGKILLed (itself, not its process group: its helpers do their part, as after
    the OOM killer) and reaped.

    :raises AssertionError: it printed another line first, or none within *timeout* s.
    """
    tool = popen(
        argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs
    )
    try:
        line = readline(tool.stderr, timeout, f"{argv[0]}, to pause at {step}")
        assert line.strip() == f"paused {step}", line
        yield tool
    finally:
        tool.kill()
        tool.wait()
        if tool.stderr is not None:
            tool.stderr.close()


def reap_leftovers(before: set[int]) -> list[str]:
    """Kill (with their process groups) and reap our children not in *before*.

    :returns: a description of each live process that had to be killed.
    """
    own_group = os.getpgid(0)
    killed = []

    def running() -> dict[int, str]:
        new = {p: s for p, s in children(os.getpid()).items() if p not in before}
        return {p: s for p, s in new.items() if s not in ("Z", "X")}

    # a process the test has just SIGKILLed takes a moment to die: only what still runs after
    # that moment was left running
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not running(), 2, "the test's processes ending")
    for pid, state in children(os.getpid()).items():
        if pid in before:
            continue
        if state not in ("Z", "X"):
            with contextlib.suppress(OSError):
                killed.append(f"{pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgid = os.getpgid(pid)
                if pgid != own_group:
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return killed


#: include/uapi/linux/capability.h
CAP_SYS_NICE = 23
CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """Whether this process holds capability *cap* in its effective set (CapEff of
    /proc/self/status). Root here usually lacks CAP_SYS_RESOURCE; a kernel usermode helper, or
    another host's root, holds it, and CRIU then reads every uid's limits."""
    with open("/proc/self/status", encoding="ascii") as f:
        eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    return bool(eff >> cap & 1)

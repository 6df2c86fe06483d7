"""The conversion child: everything after the target resumes runs here, at the asked priorities.

:func:`run_conversion` forks a child that first applies nice (setpriority), I/O priority
(ioprio_set) and oom_score_adj to itself, as the kernel livedump patch's worker would run at
the requested priorities, then converts the images into the destination (a core file, stdout,
or a core_pattern pipe handler). The child reports its result as one JSON line on a pipe;
converter exceptions never cross the process boundary as objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from converters.arch import host
from converters.errors import UnsupportedArchError
from criu_livedump.errors import ConvertFailedError, LivedumpError
from criu_livedump.linux.sched import autogroup_nice
from criu_livedump.progress import Progress
from criu_livedump.request import IoClass, IoPrio

#: Test hook: when set to a directory, the child writes ``child.pid`` there after applying its
#: priorities and waits for a file named ``go`` before converting, so that tests can read its
#: priorities from /proc while it runs.
PAUSE_ENV = "CRIU_LIVEDUMP_TEST_PAUSE_DIR"
PAUSE_LIMIT = 120.0

# include/uapi/linux/ioprio.h
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13

_libc = ctypes.CDLL(None, use_errno=True)


def _ioprio_nr(index: int) -> int:
    try:
        numbers = host().syscalls
    except UnsupportedArchError as e:
        raise LivedumpError(f"ioprio_set: unknown syscall number: {e}") from None
    return (numbers.ioprio_set, numbers.ioprio_get)[index]


def ioprio_get(pid: int = 0) -> int:
    """ioprio_get(IOPRIO_WHO_PROCESS, pid): the raw value (class << 13 | level).

    :raises OSError: the syscall failed.
    """
    ret = int(_libc.syscall(_ioprio_nr(1), IOPRIO_WHO_PROCESS, pid))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioprio_get: {os.strerror(err)}")
    return ret


def ioprio_set(value: int, pid: int = 0) -> None:
    """ioprio_set(IOPRIO_WHO_PROCESS, pid, value).

    :raises OSError: the syscall failed (EPERM for the real-time class without CAP_SYS_NICE).
    """
    ret = int(_libc.syscall(_ioprio_nr(0), IOPRIO_WHO_PROCESS, pid, value))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioprio_set: {os.strerror(err)}")


@dataclass(frozen=True)
class Priorities:
    """What the conversion (and, for nice and ioprio, CRIU) runs at; None leaves it alone."""

    nice: int | None = None
    io: IoPrio | None = None
    oom_score_adj: int | None = None

    def ioprio_value(self) -> int | None:
        """The ioprio_set() value, keeping this process's class when the request kept it."""
        if self.io is None:
            return None
        current = IoClass(ioprio_get() >> IOPRIO_CLASS_SHIFT)
        return self.io.value(current)

    def apply_scheduling(self) -> None:
        """Apply nice and I/O priority to the calling (single-threaded) process."""
        if self.nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, self.nice)
        value = self.ioprio_value()
        if value is not None:
            ioprio_set(value)

    def apply_all(self) -> None:
        """:meth:`apply_scheduling`, then oom_score_adj (fs/proc/base.c oom_score_adj_write)."""
        self.apply_scheduling()
        if self.oom_score_adj is not None:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(self.oom_score_adj))

    def as_dict(self) -> dict[str, Any]:
        return {
            "nice": self.nice,
            "ioprio": None if self.io is None else self.ioprio_value(),
            "oom_score_adj": self.oom_score_adj,
        }


class SinkKind(IntEnum):
    FILE = 1
    STDOUT = 2
    PIPE = 3


@dataclass(frozen=True)
class SinkSpec:
    """Where the core goes, described so the child can open it.

    :param path: for FILE, the core's path (created 0600, O_EXCL|O_NOFOLLOW, temp + rename).
    :param uid: owner of the file (the target's fsuid; root for a forced non-dumpable target).
    :param argv: for PIPE, the core_pattern handler's argv (run as the kernel runs it: cwd /,
        a minimal environment, the core on stdin).
    """

    kind: SinkKind
    path: Path | None = None
    uid: int | None = None
    gid: int | None = None
    argv: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == SinkKind.FILE:
            return str(self.path)
        if self.kind == SinkKind.STDOUT:
            return "-"
        return "|" + " ".join(self.argv)


#: The environment the kernel gives core_pattern pipe helpers (fs/coredump.c, umh).
PIPE_ENV = {"HOME": "/", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "TERM": "linux"}


@dataclass(frozen=True)
class ConversionOutcome:
    """What the child reported."""

    path: str | None
    size: int
    truncated: bool
    #: bytes actually written: a file's holes are not, a stream's zeros are
    warnings: tuple[str, ...]
    seconds: float
    child_pid: int
    handler_status: int | None = None
    bytes_written: int = 0


def run_conversion(
    images_dir: Path,
    pid: int,
    sink: SinkSpec,
    options: Any,
    priorities: Priorities,
    *,
    stdout_fd: int | None = None,
    progress: Progress | None = None,
) -> ConversionOutcome:
    """Convert process *pid* of *images_dir* into *sink* in a forked child at *priorities*.

    :param options: a :class:`converters.options.ConvertOptions`.
    :param stdout_fd: where ``SinkKind.STDOUT`` writes (default: fd 1).
    :param progress: counts the core's bytes as the child writes them.
    :raises ConvertFailedError: the conversion or the write failed (the converter's message).
    :raises LivedumpError: the priorities could not be applied.
    """
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child; its effects are tested
        os.close(rfd)
        code = 1
        try:
            code = _child_main(
                images_dir, pid, sink, options, (priorities, progress), stdout_fd, wfd
            )
        except BaseException:
            with contextlib.suppress(BaseException):
                _send(wfd, {"ok": False, "error": "internal error: " + _one_line_traceback()})
        finally:
            os._exit(code)
    os.close(wfd)
    started = time.monotonic()
    try:
        with os.fdopen(rfd, "rb") as r:
            raw = r.read()
        _, status = os.waitpid(child, 0)
    except BaseException:
        # Ctrl-C or anything else: the child must not outlive us.
        _kill_and_reap(child)
        raise
    seconds = time.monotonic() - started
    try:
        report = json.loads(raw.decode() or "null")
    except ValueError:
        report = None
    if not isinstance(report, dict):
        how = _describe_status(status)
        raise ConvertFailedError(f"conversion child {child} died ({how}) without a report")
    if not report.get("ok"):
        raise ConvertFailedError(str(report.get("error", "conversion failed")))
    return ConversionOutcome(
        path=report.get("path"),
        size=int(report.get("size", 0)),
        truncated=bool(report.get("truncated", False)),
        warnings=tuple(report.get("warnings", ())),
        seconds=float(report.get("seconds", seconds)),
        child_pid=child,
        handler_status=report.get("handler_status"),
        bytes_written=int(report.get("bytes_written", 0)),
    )


def _kill_and_reap(child: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _one_line_traceback() -> str:
    lines = traceback.format_exc().strip().splitlines()
    return lines[-1] if lines else "unknown"


def _send(fd: int, report: dict[str, Any]) -> None:
    data = (json.dumps(report) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _child_main(
    images_dir: Path,
    pid: int,
    sink_spec: SinkSpec,
    options: Any,
    runs_at: tuple[Priorities, Progress | None],
    stdout_fd: int | None,
    report_fd: int,
) -> int:
    """The child's whole life; returns its exit status."""
    priorities, progress = runs_at
    # A Ctrl-C at the terminal reaches the whole process group; the parent decides for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(
        signal.SIGPIPE, signal.SIG_DFL if sink_spec.kind == SinkKind.STDOUT else signal.SIG_IGN
    )
    try:
        priorities.apply_all()
    except OSError as e:
        why = e.strerror or "refused"
        _send(
            report_fd, {"ok": False, "error": f"cannot apply priorities to the conversion: {why}"}
        )
        return 1
    _test_pause()

    from converters import write_core
    from converters.errors import ConversionError
    from converters.sinks import FileSink, Sink, StreamSink

    handler: subprocess.Popen[bytes] | None = None
    report: dict[str, Any]
    try:
        sink: Sink
        if sink_spec.kind == SinkKind.FILE:
            assert sink_spec.path is not None
            streamed = getattr(options, "streamed", None)  # the pages are in its file already
            adopt = None if streamed is None else streamed.core
            sink = FileSink(sink_spec.path, 0o600, sink_spec.uid, sink_spec.gid, adopt=adopt)
        elif sink_spec.kind == SinkKind.STDOUT:
            sink = StreamSink(1 if stdout_fd is None else stdout_fd, "<stdout>")
        else:
            handler = _start_handler(sink_spec.argv)
            assert handler.stdin is not None
            sink = StreamSink(handler.stdin.fileno(), sink_spec.describe())
        counter = None if progress is None else progress.written
        result = write_core(images_dir, pid, sink, options, counter)
        holes = result.hole_bytes if sink_spec.kind == SinkKind.FILE else 0
        report = {
            "ok": True,
            "path": str(result.path) if result.path else None,
            "size": result.size,
            "bytes_written": result.size - holes,
            "truncated": result.truncated,
            "warnings": list(result.warnings),
            "seconds": result.seconds,
        }
    except ConversionError as e:
        report = {"ok": False, "error": str(e)}
    except LivedumpError as e:
        report = {"ok": False, "error": e.message}
    except OSError as e:
        report = {"ok": False, "error": f"{sink_spec.describe()}: {e.strerror or e}"}
    if handler is not None:
        report["handler_status"] = _finish_handler(handler, report)
    _send(report_fd, report)
    return 0 if report["ok"] else 1


def _start_handler(argv: tuple[str, ...]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=PIPE_ENV,
            close_fds=True,
        )
    except OSError as e:
        raise LivedumpError(
            f"core_pattern handler {argv[0]}: cannot run it: {os.strerror(e.errno or 0)}"
        ) from e


def _finish_handler(handler: subprocess.Popen[bytes], report: dict[str, Any]) -> int:
    """Close the handler's stdin (end of core) and wait for it, as wait_for_dump_helpers()
    lets the helper finish reading."""
    if handler.stdin is not None:
        try:
            handler.stdin.close()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
    status = handler.wait()
    if status != 0:
        report.setdefault("warnings", []).append(
            f"core_pattern handler {handler.args[0]!s} exited with status {status}"  # type: ignore[index]
        )
    return status


def _test_pause() -> None:
    """The :data:`PAUSE_ENV` hook (tests only)."""
    directory = os.environ.get(PAUSE_ENV)
    if not directory:
        return
    hook = Path(directory)
    tmp = hook / "child.pid.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(hook / "child.pid")
    deadline = time.monotonic() + PAUSE_LIMIT
    while not (hook / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def scheduling_preexec(priorities: Priorities) -> Callable[[], None] | None:
    """A preexec_fn giving CRIU the same nice and I/O priority as the conversion, and the nice
    to its autogroup: snapshot/criu.py starts CRIU in a session of its own, and with
    CONFIG_SCHED_AUTOGROUP a session's tasks share one group's CPU time, whatever their nice,
    against each other session's (kernel/sched/autogroup.c; the group is CRIU's alone)."""
    if priorities.nice is None and priorities.io is None:
        return None
    nice = priorities.nice

    def preexec() -> None:
        priorities.apply_scheduling()
        if nice is not None:
            autogroup_nice(nice)

    return preexec

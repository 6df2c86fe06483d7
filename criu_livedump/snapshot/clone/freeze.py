"""The clone snapshot's freeze: every thread of the target stopped, saved and resumed, and
nothing done while it is stopped that could be done before or after (issue 12).

Before the freeze, :meth:`AllThreads.seize` attaches to every thread with PTRACE_SEIZE, which does
not stop it; whatever /proc can tell is read before that (thread names) or from the clone
after it (process group and session). The freeze's steps, each timed (:class:`FreezeSteps`):

- stop: PTRACE_INTERRUPT every thread, then collect the stops, in one call into the ptrace
  batch helper (:func:`criu_livedump.linux.ptrace.stop_all`), so that every thread heads for
  its stop at once; a thread born meanwhile is seized and stopped in turn, until the target's
  thread count is that of the stopped threads (none can be born once all are stopped);
- save: the general registers, one FP regset (XSAVE: the FXSAVE area is part of it, and
  :mod:`converters.arch` derives the rest), the blocked-signal mask and the pending signals of
  every thread, in one call; a thread our interrupt made fail with EINTR is set to restart
  unless a signal it does not block is pending (then the EINTR is the program's own);
- fork: the caller's (:mod:`criu_livedump.snapshot.clone.inject`);
- resume: PTRACE_DETACH every thread, in one call.

The tracer runs under SCHED_FIFO meanwhile (:func:`criu_livedump.linux.sched.realtime`), so
that the threads it wakes do not preempt it one by one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from converters.arch import Arch, host
from criu_livedump.errors import CloneRefusedError, TargetError
from criu_livedump.linux import ptrace
from criu_livedump.linux.procfs import read_status, task_ids
from criu_livedump.linux.ptrace import PtraceError

__all__ = ["AllThreads", "FreezeSteps", "ThreadNames", "ThreadState", "ns_id", "read_names"]

#: listings of /proc/PID/task before the freeze, at most, while threads keep appearing
_SEIZE_ROUNDS = 3


@dataclass(frozen=True)
class ThreadState:
    """One thread of the target as it was at the freeze.

    :ivar regs: the general registers exactly as ptrace returned them (for a thread inside an
        interrupted syscall: the pc after the syscall, the result the -ERESTART* code).
    :ivar fpstate: the architecture's FP regsets (:attr:`converters.arch.base.Arch.fp_regsets`):
        the first one the CPU has, empty for the others (derived from it).
    :ivar sigmask: blocked signals, bit N-1 for signal N.
    """

    tid: int
    regs: bytes
    fpstate: tuple[bytes, ...]
    sigmask: int
    comm: str
    #: a signal the thread does not block is pending for it (its EINTR, if any, is real)
    signal_pending: bool = False
    #: its id in the target's own PID namespace (last NSpid entry)
    ns_tid: int = 0
    #: the architecture's other regsets (:attr:`converters.arch.base.Arch.thread_regsets`)
    other: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class FreezeSteps:
    """How long each step of the freeze took, in seconds (see the module docstring)."""

    stop: float = 0.0
    save: float = 0.0
    fork: float = 0.0
    resume: float = 0.0
    #: the tracer ran under SCHED_FIFO
    realtime: bool = False
    #: when the freeze began, CLOCK_MONOTONIC seconds (the clock a target's own timing uses)
    started: float = 0.0

    @property
    def total(self) -> float:
        """The whole freeze."""
        return self.stop + self.save + self.fork + self.resume

    def microseconds(self) -> dict[str, int]:
        """``{step: microseconds}``, in the order of the steps."""
        return {k: round(getattr(self, k) * 1e6) for k in ("stop", "save", "fork", "resume")}


class ThreadNames(NamedTuple):
    """What /proc tells of a thread while it runs, read before the freeze."""

    comm: str
    #: its id in its own PID namespace (the innermost NSpid entry)
    ns_tid: int


def read_names(pid: int, tid: int, *, nested: bool = True) -> ThreadNames:
    """The name and namespace id of thread *tid* of *pid* (``""`` and *tid* when it is gone);
    /proc/TID/status, for the id, is read only when the target's PID namespace is *nested*."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().rstrip("\n")
        if not nested:
            return ThreadNames(comm, tid)
        return ThreadNames(comm, ns_id(read_status(f"/proc/{pid}/task/{tid}/status"), "NSpid", tid))
    except (FileNotFoundError, ProcessLookupError):  # gone, or exiting (ESRCH from proc)
        return ThreadNames("", tid)


def ns_id(status: Mapping[str, str], key: str, default: int) -> int:
    """The innermost entry of an NS* line of /proc status (the id in the task's own PID
    namespace, fs/proc/array.c: task_state())."""
    ids = status.get(key, "").split()
    return int(ids[-1]) if ids else default


def _arch() -> Arch:
    return host()


@dataclass
class AllThreads:
    """The threads of process *pid*: seized, stopped, saved, resumed (see the module docstring).

    After a failure the caller calls :meth:`release`, which detaches whatever is still seized.
    """

    pid: int
    timeout: float
    #: threads seized and not yet detached, in the order they were seized
    seized: list[int] = field(default_factory=list)
    #: threads found only once the freeze had begun
    late: list[int] = field(default_factory=list)
    _known: set[int] = field(default_factory=set)
    _buffers: ptrace.SaveBuffers | None = None
    _saved: ptrace.Saved | None = None
    _index: dict[int, int] = field(default_factory=dict)
    #: the FP regsets after the first, for threads the first is missing from (ENODEV)
    _fp_fallback: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    _other: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    _marks: dict[str, float] = field(default_factory=dict)
    _deadline: float = 0.0

    def seize(self) -> None:
        """Before the freeze: PTRACE_SEIZE every thread, the running target untouched.

        :raises CloneRefusedError: a thread cannot be traced (EPERM).
        :raises TargetError: the process has no thread left.
        """
        self._deadline = time.monotonic() + self.timeout
        for _ in range(_SEIZE_ROUNDS):
            if not self._seize_new():
                break
        if not self.seized:
            raise TargetError(self.pid, "exited before it could be frozen")
        # room for a few threads born before the freeze begins
        capacity = len(self.seized) + max(16, len(self.seized) // 8)
        self._buffers = ptrace.SaveBuffers(capacity, _arch().fp_regsets[0])

    def stop(self) -> None:
        """Step stop: every seized thread, and every thread born meanwhile, stopped.

        :raises PtraceError: a thread did not stop in time
            (:class:`~criu_livedump.linux.ptrace.StopTimeoutError`) or a request failed.
        :raises TargetError: every thread exited.
        """
        self._marks["stop"] = time.monotonic()
        batch = list(self.seized)
        left = max(self._deadline - time.monotonic(), 0.0)
        self._stop_from(batch, ptrace.stop_all(batch, left))

    def _stop_from(self, batch: list[int], stopped: list[bool]) -> None:
        """The rest of step stop once *batch* was interrupted (*stopped*: whether each thread
        stopped or exited): threads born meanwhile seized and stopped in turn."""
        while True:
            gone = {tid for tid, ok in zip(batch, stopped, strict=True) if not ok}
            self.seized = [t for t in self.seized if t not in gone]
            if not self.seized:
                raise TargetError(self.pid, "exited before it could be frozen")
            if self._thread_count() == len(self.seized):
                break
            batch = self._seize_new()
            self.late.extend(batch)
            if not batch:
                break
            stopped = ptrace.stop_all(batch, max(self._deadline - time.monotonic(), 0.0))
        self._marks["save"] = time.monotonic()

    def save(self) -> None:
        """Step save: registers, FP state and signal mask of every stopped thread; a thread our
        interrupt made fail with EINTR is set to restart instead (before anything else can go
        wrong: from here on a failure resumes the threads as they are)."""
        arch = _arch()
        saved = ptrace.save_all(self.seized, arch.fp_regsets[0], self._buffers)
        self._saved = saved
        self._index = {tid: i for i, tid in enumerate(saved.tids)}
        if len(arch.fp_regsets) > 1:
            for i in saved.fp_missing():
                tid = saved.tids[i]
                self._fp_fallback[tid] = ptrace.get_regsets(tid, arch.fp_regsets[1:])
        if arch.thread_regsets:
            for tid in saved.tids:
                self._other[tid] = ptrace.get_regsets(tid, arch.thread_regsets)
        eintr = -errno.EINTR
        restart: dict[int, bytes] = {}
        for i, tid in enumerate(saved.tids):
            regs = saved.regs(i)
            if arch.syscall_result(regs) != eintr or arch.syscall_nr(regs) is None:
                continue
            fixed = arch.resume_regs(regs, self.signal_pending(tid))
            if arch.pc(fixed) != arch.pc(regs):
                restart[tid] = fixed
        ptrace.set_regs_all(restart)
        self._marks["fork"] = time.monotonic()

    def resume(self) -> None:
        """Step resume: detach every thread (one killed meanwhile is no error)."""
        self._marks["resume"] = time.monotonic()
        ptrace.detach_all(self.seized)
        self.seized = []
        self._marks["end"] = time.monotonic()

    def release(self) -> None:
        """After a failure: detach whatever is still seized; never raises."""
        with contextlib.suppress(OSError):
            ptrace.detach_all(self.seized)
        self.seized = []

    def steps(self, *, realtime: bool) -> FreezeSteps:
        """The time each step took (after :meth:`resume`)."""
        m = self._marks
        return FreezeSteps(
            stop=m["save"] - m["stop"],
            save=m["fork"] - m["save"],
            fork=m["resume"] - m["fork"],
            resume=m["end"] - m["resume"],
            realtime=realtime,
            started=m["stop"],
        )

    @staticmethod
    def stop_together(groups: Sequence[AllThreads]) -> None:
        """Step stop for the processes of a tree at once: every seized thread of every one of
        them interrupted in one batch (so that all head for their stops together), then each
        process's threads born meanwhile, as :meth:`stop` does."""
        start = time.monotonic()
        tids = [t for g in groups for t in g.seized]
        left = max(min(g._deadline for g in groups) - start, 0.0)
        stopped = ptrace.stop_all(tids, left)
        at = 0
        for g in groups:
            n = len(g.seized)
            g._marks["stop"] = start
            g._stop_from(list(g.seized), stopped[at : at + n])
            at += n

    # --- what was saved -------------------------------------------------------------------------

    def regs(self, tid: int) -> bytes:
        """The general registers *tid* stopped with (before any EINTR restart)."""
        assert self._saved is not None, "save() first"
        return self._saved.regs(self._index[tid])

    def sigmask(self, tid: int) -> int:
        """The blocked-signal mask of *tid*."""
        assert self._saved is not None, "save() first"
        return self._saved.sigmask(self._index[tid])

    def signal_pending(self, tid: int) -> bool:
        """A signal *tid* does not block is queued for it or for its process."""
        assert self._saved is not None, "save() first"
        i = self._index[tid]
        return bool(self._saved.pending(i) & ~self._saved.sigmask(i))

    def threads(self, names: Mapping[int, ThreadNames]) -> tuple[ThreadState, ...]:
        """Every saved thread, by tid, named from *names* (read before the freeze) or, for a
        thread missing there, from /proc now."""
        saved = self._saved
        assert saved is not None, "save() first"
        n_fp = len(_arch().fp_regsets)
        out = []
        for i, tid in enumerate(saved.tids):
            if tid in self._fp_fallback:
                fpstate = (b"", *self._fp_fallback[tid])
            else:
                fpstate = (saved.fp(i), *(b"",) * (n_fp - 1))
            comm, ns_tid = names[tid] if tid in names else read_names(self.pid, tid)
            mask = saved.sigmask(i)
            pending = bool(saved.pending(i) & ~mask)
            other = self._other.get(tid, ())
            out.append(ThreadState(tid, saved.regs(i), fpstate, mask, comm, pending, ns_tid, other))
        return tuple(sorted(out, key=lambda t: t.tid))

    # --- helpers --------------------------------------------------------------------------------

    def _seize_new(self) -> list[int]:
        """Seize the threads /proc lists that were not seen yet; returns those seized."""
        new = [t for t in task_ids(self.pid) if t not in self._known]
        self._known.update(new)
        if not new:
            return []
        done = []
        for tid, err in zip(new, ptrace.seize_all(new), strict=True):
            if err == errno.ESRCH:  # exited meanwhile
                continue
            if err == errno.EPERM:
                raise CloneRefusedError(self.pid, f"cannot ptrace thread {tid}: {os.strerror(err)}")
            if err:
                raise PtraceError("SEIZE", tid, err)
            done.append(tid)
        self.seized.extend(done)
        return done

    def _thread_count(self) -> int:
        try:
            return int(read_status(f"/proc/{self.pid}/status").get("Threads", "0"))
        except FileNotFoundError as e:
            raise TargetError(self.pid, "exited during the clone snapshot") from e

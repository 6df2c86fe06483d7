"""The clone snapshot: freeze the target for the time a fork takes, and let CRIU dump the fork.

Steps (issue 5):

1. PTRACE_SEIZE every thread while it runs, then stop them all and save each one's registers,
   XSAVE area, blocked and pending signals (:mod:`criu_livedump.snapshot.clone.freeze`).
2. In one thread, inject ``clone(flags=0)``: a copy-on-write copy of the process with no exit
   signal, so the target never gets SIGCHLD for it and a plain ``waitpid(-1)`` never reaps it.
3. The clone is auto-attached (PTRACE_O_TRACECLONE) with PTRACE_O_EXITKILL inherited at birth,
   so it dies with this process and never runs a user instruction.
4. Restore the injecting thread and detach every thread: the target runs on.
5. In the clone: ``close_range(0, ~0U, 0)``, ``setsid()``, and mappings CRIU refuses (io_uring
   rings, SysV shared memory) are copied to a side file and unmapped.

Between 3 and 4, while the target is still frozen, the pages a fork does not copy
(MADV_DONTFORK, MADV_WIPEONFORK) are read from the target into a side file
(:mod:`criu_livedump.snapshot.clone.fork_lost`). Nothing else happens while it is frozen: what
/proc can tell is read before (thread names, a syscall instruction to inject) or from the clone
after (process group and session), and the clone's own first stop is awaited once the target
runs again. The freeze is reported in its four steps (:class:`FreezeSteps`).

:meth:`Clone.release_for_criu` then leaves the clone asleep for ``criu dump -t CLONE``,
and :meth:`Clone.kill` makes sure, whatever happened, that the clone is gone (reaped
from the target by one more injected ``wait4``) and the target runs.

Registers are injected the way CRIU's compel does it (compel/src/lib/infect.c:
``compel_execute_syscall()``, ``parasite_run()``, ``restore_thread_ctx()``; compel/arch/x86/src/
lib/infect.c: ``parasite_setup_regs()`` sets orig_ax to -1 so no syscall-restart logic runs,
``compel_get_task_regs()`` turns an interrupted syscall back into its restart), except that we
never write code into the target: the ``syscall`` instruction is the one at rip-2 when the thread
sits in a syscall, else one found in the vDSO, and PTRACE_SYSCALL stops us at its exit where
compel traps on an ``int3`` of its own.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from converters.arch import Arch, host
from converters.arch.base import pause_interrupted
from criu_livedump.errors import CloneError, CloneRefusedError, LivedumpError, TargetError
from criu_livedump.linux import ptrace
from criu_livedump.linux.procfs import (
    MapsEntry,
    SmapsEntry,
    read_maps,
    read_stat,
    read_status,
    smaps_entries,
    task_ids,
)
from criu_livedump.linux.ptrace import Event, Opt, PtraceError
from criu_livedump.linux.sched import realtime
from criu_livedump.snapshot.clone import fork_lost
from criu_livedump.snapshot.clone.freeze import (
    AllThreads,
    FreezeSteps,
    ThreadNames,
    ThreadState,
    ns_id,
    read_names,
)
from criu_livedump.target import traced

log = logging.getLogger(__name__)

#: Test hook: when set to a step name, the snapshot stops there (printing ``paused STEP`` on
#: stderr) so that a test can kill the tool at that point.
PAUSE_ENV: Final = "CRIU_LIVEDUMP_CLONE_PAUSE"
#: The steps :data:`PAUSE_ENV` accepts, in order.
PAUSE_STEPS: Final = ("seized", "dontfork", "cloned", "detached", "prepared", "released")


_ALL_SIGNALS: Final = (1 << 64) - 1
_WNOHANG: Final = 1
_NO_SUSPEND: Final = Opt(0)


def _arch() -> Arch:
    """This host's architecture: registers, syscall numbers and the syscall instruction."""
    return host()


@dataclass(frozen=True)
class SideMapping:
    """A mapping CRIU refuses, copied out of the clone and unmapped there before CRIU ran.

    :ivar area: its line of the clone's /proc/PID/maps (name ``/SYSV0000abcd (deleted)``).
    :ivar kind: ``"sysv"`` or ``"io_uring"``.
    :ivar data_file: where its bytes are (``end - start`` bytes at *data_offset*); None when the
        bytes could not be read (the range becomes a hole).
    """

    area: MapsEntry
    kind: str
    data_file: Path | None
    data_offset: int


@dataclass(frozen=True)
class ReapPlan:
    """What reaping a dead clone from inside its target needs (the target waits for the
    clone by the id its own namespace gives it)."""

    pid: int
    clone_pid: int
    clone_ns_pid: int
    tid: int
    syscall_ip: int
    suspend: Opt


@dataclass
class Clone:
    """A stopped copy-on-write clone of a target, and the target's state at the clone.

    Use it as a context manager (or call :meth:`kill`) so that the clone never outlives it.
    """

    pid: int
    clone_pid: int
    threads: tuple[ThreadState, ...]
    freeze_seconds: float
    pgid: int
    sid: int
    side_mappings: tuple[SideMapping, ...] = ()
    #: MADV_DONTFORK / MADV_WIPEONFORK areas whose pages were copied from the frozen target
    fork_lost: tuple[fork_lost.ForkLostArea, ...] = ()
    #: the target's /proc/PID/smaps, read just before the freeze
    smaps: tuple[SmapsEntry, ...] = ()
    #: the thread the clone was made from (its comm and TLS are the clone's)
    injector_tid: int = 0
    #: the target's and the clone's ids in the target's own PID namespace (those CRIU's
    #: images and the kernel's core use; ``pgid``, ``sid`` and each thread's ``ns_tid`` are too)
    ns_pid: int = 0
    clone_ns_pid: int = 0
    #: how long each step of the freeze took (:attr:`freeze_seconds` is their sum)
    freeze_steps: FreezeSteps = field(default_factory=FreezeSteps)
    _pidfd: int = field(default=-1, repr=False)
    _held: bool = field(default=True, repr=False)
    _syscall_ip: int = field(default=0, repr=False)
    #: Opt.SUSPEND_SECCOMP when the target runs under seccomp, for every injected syscall
    _suspend: Opt = field(default=Opt(0), repr=False)
    _dead: bool = field(default=False, repr=False)
    #: (pid, write end of its pipe) of the watchdog that kills the clone should we die
    _watchdog: tuple[int, int] = field(default=(0, -1), repr=False)

    def release_for_criu(self) -> None:
        """Detach from the clone, leaving it asleep in ``pause()`` for ``criu dump -t CLONE``.

        Not a SIGSTOP: a group stop is reported to the real parent, the target, as SIGCHLD
        (kernel/signal.c: ``do_notify_parent_cldstop()`` ignores the exit signal). The clone
        instead enters ``pause()`` with every signal blocked (its mask was the injecting
        thread's, all blocked, at the fork): only SIGKILL or CRIU's own PTRACE_INTERRUPT end it,
        and CRIU then sees an ordinary interrupted syscall it restarts or kills.

        :raises CloneError: the clone vanished, or its seccomp filter does not let it sleep.
        """
        if not self._held:
            return
        cpid = self.clone_pid
        try:
            # seccomp suspended for the injection only: the clone's own filters judge its pause()
            ptrace.set_options(cpid, Opt.TRACESYSGOOD | Opt.EXITKILL)
            if self._suspend:
                _check_pause_allowed(cpid, self._syscall_ip)
            regs = _syscall_regs(ptrace.get_regs(cpid), self._syscall_ip, _arch().syscalls.pause)
            ptrace.set_regs(cpid, regs)
            ptrace.syscall(cpid)
            _, status = ptrace.wait(cpid)
            if ptrace.stop_event(status) == Event.STOP:  # the trial's interrupt, on the way out
                ptrace.syscall(cpid)
                _, status = ptrace.wait(cpid)
            _check_stopped(cpid, status)
            if not ptrace.is_syscall_stop(status):
                raise CloneError(f"clone {cpid}: unexpected stop {status:#x} before its pause()")
            ptrace.detach(cpid)  # at pause()'s entry: the detached clone runs the syscall itself
        except PtraceError as e:
            raise CloneError(f"clone {cpid} of process {self.pid}: {e}") from e
        self._held = False
        _hook("released")

    def send_kill(self) -> None:
        """SIGKILL the clone CRIU has let go, and return: its teardown (the page tables of its
        copy of the target's memory: 20 ms a GiB here) runs beside what comes next, and
        :meth:`kill` reaps it later. Does nothing to a clone still held; never raises."""
        if self._dead or self._held or self._pidfd < 0:
            return
        with contextlib.suppress(OSError):  # gone already: kill() says so if it matters
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def kill(self) -> None:
        """Kill the clone and reap it from the target; idempotent, never raises.

        Whatever state the clone is in (held by us, in CRIU's hands, dumped and let go, killed),
        it is gone afterwards. Its zombie belongs to the target (exit signal 0: a plain wait
        there never sees it), so one thread of the target is briefly seized to ``wait4()`` it.
        """
        if self._dead:
            return
        self._dead = True
        try:
            if self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            elif self._held:
                # no pidfd yet, but traced by us: its pid cannot be reused before we reap it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.clone_pid, signal.SIGKILL)
            if self._held:
                # Tracer's wait: the tracee's exit is reported to us, then it is left to the
                # real parent (kernel/exit.c: wait_task_zombie(), EXIT_TRACE).
                with contextlib.suppress(ChildProcessError):
                    _wait_exit(self.clone_pid)
                self._held = False
            _wait_zombie(self.clone_pid, timeout=5.0)
            _reap_in_target(self.reap_plan())
        except (PtraceError, OSError, LivedumpError) as e:
            log.warning("clone %d of process %d: cleanup: %s", self.clone_pid, self.pid, e)
        finally:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            self._dismiss_watchdog()

    def reap_plan(self) -> ReapPlan:
        """What reaping the clone in the target needs."""
        return ReapPlan(
            self.pid,
            self.clone_pid,
            self.clone_ns_pid or self.clone_pid,
            self.injector_tid,
            self._syscall_ip,
            self._suspend,
        )

    def _dismiss_watchdog(self) -> None:
        """Tell the watchdog the clone is dealt with (one byte, then EOF) and reap it."""
        wpid, wfd = self._watchdog
        self._watchdog = (0, -1)
        if wfd >= 0:
            with contextlib.suppress(OSError):
                os.write(wfd, b"x")
            os.close(wfd)
        if wpid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(wpid, 0)

    def __enter__(self) -> Clone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def clone_snapshot(pid: int, *, timeout: float = 10.0, side_dir: Path | None = None) -> Clone:
    """Steps 0-5: a stopped, prepared copy-on-write clone of process *pid*, target running
    (:func:`prepare`, then :func:`freeze`).

    :param timeout: seconds to wait for the target's threads to stop.
    :param side_dir: where the bytes of mappings CRIU refuses are copied (without *side_dir*
        such mappings are refused).
    :raises CloneRefusedError: the target is traced, or runs under seccomp and this process
        cannot suspend it (:func:`ptrace.seccomp_suspension_refusal`).
    :raises TargetError: the target vanished.
    :raises CloneError: anything else; the target is left running and no clone is alive.
    """
    return freeze(prepare(pid, side_dir), timeout=timeout)


class ForkHook(Protocol):
    """Work done inside the freeze around the injected clone, with *call* running syscalls
    in the stopped injecting thread (``call(nr, *args) -> result``)."""

    def before_fork(self, call: Callable[..., int], injector: int) -> None:
        """Every thread stopped and saved, the clone not made yet; *injector* is the thread
        the clone is made from (the clone inherits its rseq registration)."""

    def after_fork(self, call: Callable[..., int]) -> None:
        """The clone made, every thread still stopped."""


@dataclass
class Prepared:
    """Step 0, done while the target runs: its refusals checked again, its smaps read (which
    walks every page table), the side file for the pages a fork does not copy allocated, the
    names of its threads and where a syscall instruction is read."""

    pid: int
    side_dir: Path | None
    smaps: tuple[SmapsEntry, ...]
    copier: fork_lost.Copier | None
    #: the ptrace option the injection needs (seccomp suspended), see :func:`_check_target`
    suspend: Opt
    #: comm and namespace id of each thread, by tid
    names: dict[int, ThreadNames] = field(default_factory=dict)
    #: a syscall instruction in the vDSO (or elsewhere), for an injector outside any syscall
    fallback_ip: int | None = None
    #: what runs around the injected clone while the target is frozen (method precopy's)
    fork_hook: ForkHook | None = None

    def close(self) -> None:
        """Release the side file's mapping (idempotent)."""
        if self.copier is not None:
            self.copier.close()


def prepare(pid: int, side_dir: Path | None = None) -> Prepared:
    """Step 0 for process *pid*; see :class:`Prepared`.

    :raises CloneRefusedError: the target is traced, or runs under seccomp and this process
        cannot suspend it.
    :raises TargetError: the target vanished.
    """
    try:
        ptrace.check_helper()
    except ptrace.HelperMissingError as e:
        raise CloneError(f"process {pid}: the clone method cannot run: {e.strerror}") from e
    suspend = _check_target(pid)
    smaps = tuple(smaps_entries(pid))
    copier = fork_lost.prepare(pid, smaps, side_dir) if side_dir is not None else None
    nested = len(read_status(f"/proc/{pid}/status").get("NStgid", "").split()) > 1
    names = {tid: read_names(pid, tid, nested=nested) for tid in task_ids(pid)}
    return Prepared(pid, side_dir, smaps, copier, suspend, names, _syscall_fallback(pid))


@dataclass
class _Freeze:
    """A freeze in progress (steps 1-4): what must be undone should it fail."""

    pid: int
    suspend: Opt
    threads: AllThreads
    fallback_ip: int | None = None
    injector: int = 0
    saved: bytes | None = None
    restore: bytes | None = None
    mask: int = 0
    clone_pid: int = 0
    clone_ns_pid: int = 0
    pidfd: int = -1
    syscall_ip: int = 0
    watchdog: tuple[int, int] = (0, -1)


def freeze(prepared: Prepared, *, timeout: float = 10.0) -> Clone:
    """Steps 1-5: freeze the target, clone it, let it run on; then prepare the clone.

    :raises TargetError: the target vanished.
    :raises CloneError: anything else; the target is left running and no clone is alive.
    """
    clones, _ = freeze_tree([prepared], timeout=timeout)
    return clones[0]


def freeze_tree(
    prepared: Sequence[Prepared], *, timeout: float = 10.0
) -> tuple[list[Clone], FreezeSteps]:
    """Steps 1-5 for every process of a tree at one instant: every thread of every process
    stopped and saved before the first clone is injected, every process resumed after the
    last one is; then each clone prepared. Returns the clones (in *prepared*'s order) and the
    tree's freeze, split into its steps (for one process: that process's own).

    :raises TargetError: a process vanished.
    :raises CloneError: anything else; every process is left running and no clone is alive.
    """
    states = [
        _Freeze(p.pid, p.suspend, AllThreads(p.pid, timeout), p.fallback_ip) for p in prepared
    ]
    clones: list[Clone] = []
    try:
        for state in states:
            state.threads.seize()
        steps = _stop_and_clone(states, prepared)
        for state, one in zip(states, prepared, strict=True):
            clones.append(_adopt(state, one, steps))
    except BaseException as e:
        # Step 7: whatever failed, every process runs on and no clone outlives us.
        for one in prepared:
            one.close()
        for clone in clones:
            clone.kill()
        for state in states[len(clones) :]:
            _undo(state)
        pid = states[len(clones)].pid if len(clones) < len(states) else states[0].pid
        _raise_as_clone_error(pid, e)
        raise
    return clones, steps


def _stop_and_clone(states: Sequence[_Freeze], prepared: Sequence[Prepared]) -> FreezeSteps:
    """The freeze itself, under SCHED_FIFO: stop all, save all, clone each (its fork-lost pages
    copied), resume all; each step timed over the whole tree."""
    with realtime() as boosted:
        marks = [time.monotonic()]
        AllThreads.stop_together([state.threads for state in states])
        marks.append(time.monotonic())
        for state in states:
            state.threads.save()
        _hook("seized")
        marks.append(time.monotonic())
        for state, one in zip(states, prepared, strict=True):
            _make_clone(state, one.fork_hook)
            if one.copier is not None:
                one.copier.copy()
        _hook("cloned")
        marks.append(time.monotonic())
        for state in states:
            state.threads.resume()
        marks.append(time.monotonic())
    if len(states) == 1:
        return states[0].threads.steps(realtime=boosted)
    stop, save, fork, resume = (b - a for a, b in itertools.pairwise(marks))
    return FreezeSteps(stop, save, fork, resume, realtime=boosted, started=marks[0])


def _adopt(state: _Freeze, prepared: Prepared, steps: FreezeSteps) -> Clone:
    """After the freeze (*steps*): the clone held (pidfd, ptrace options, watchdog), its
    fork-lost pages collected, then prepared for CRIU (step 5)."""
    pid, cpid = state.pid, state.clone_pid
    state.pidfd = os.pidfd_open(cpid)
    _adopt_clone(cpid, state.suspend)
    clone_status = read_status(f"/proc/{cpid}/status")
    state.clone_ns_pid = ns_id(clone_status, "NSpid", cpid)
    reap = ReapPlan(pid, cpid, state.clone_ns_pid, state.injector, state.syscall_ip, state.suspend)
    state.watchdog = _start_watchdog(reap, state.pidfd)
    _hook("detached")
    lost = prepared.copier.finish() if prepared.copier is not None else ()
    snap = Clone(
        pid=pid,
        clone_pid=cpid,
        threads=state.threads.threads(prepared.names),
        freeze_seconds=steps.total,
        # the clone's, as the fork left them: the target's at the freeze
        pgid=ns_id(clone_status, "NSpgid", 0),
        sid=ns_id(clone_status, "NSsid", 0),
        fork_lost=lost,
        smaps=prepared.smaps,
        injector_tid=state.injector,
        ns_pid=ns_id(read_status(f"/proc/{pid}/status"), "NStgid", pid),
        clone_ns_pid=state.clone_ns_pid,
        freeze_steps=steps,
        _pidfd=state.pidfd,
        _syscall_ip=state.syscall_ip,
        _suspend=state.suspend,
        _watchdog=state.watchdog,
    )
    state.clone_pid = 0  # the Clone owns it now
    try:
        snap.side_mappings = _prepare_clone(snap, prepared.side_dir)
        _hook("prepared")
    except BaseException as e:
        snap.kill()
        if isinstance(e, PtraceError):
            raise CloneError(f"clone {snap.clone_pid} of process {pid}: {e}") from e
        raise
    return snap


def _make_clone(state: _Freeze, hook: ForkHook | None = None) -> None:
    """Step fork, inside the freeze: the clone injected into one thread (the leader when it is
    alive: the clone carries its comm and TLS), *hook* run around it in the same thread."""
    pid, threads = state.pid, state.threads
    state.injector = injector = pid if pid in threads.seized else threads.seized[0]
    state.saved = saved = threads.regs(injector)
    state.mask = threads.sigmask(injector)
    ip = _syscall_at_pc(pid, saved) or state.fallback_ip
    if ip is None:
        raise CloneError(f"process {pid}: no syscall instruction found in its executable mappings")
    state.syscall_ip = ip
    state.restore = _arch().resume_regs(saved, threads.signal_pending(injector))
    if hook is not None:
        with _frozen_calls(state) as call:
            hook.before_fork(call, injector)
        _hook("dontfork")  # the injector's registers and mask its own again
    state.clone_pid = _inject_clone(injector, saved, state.restore, state.mask, ip, state.suspend)
    if hook is not None:
        with _frozen_calls(state) as call:
            hook.after_fork(call)


@contextlib.contextmanager
def _frozen_calls(state: _Freeze) -> Iterator[Callable[..., int]]:
    """``call(nr, *args)`` running syscalls in the frozen target's injecting thread, every
    signal blocked meanwhile (compel's parasite_run()); its registers and mask restored after."""
    tid, saved, ip = state.injector, state.saved, state.syscall_ip
    assert saved is not None and state.restore is not None
    ptrace.set_options(tid, Opt.TRACESYSGOOD | state.suspend)
    ptrace.set_sigmask(tid, _ALL_SIGNALS)
    try:
        yield lambda nr, *args: _run_syscall(tid, _syscall_regs(saved, ip, nr, *args))[0]
    finally:
        ptrace.set_regs(tid, state.restore)
        ptrace.set_sigmask(tid, state.mask)
        ptrace.set_options(tid, Opt(0))


def _undo(state: _Freeze) -> None:
    """After a failed freeze: the injector's registers back, every thread detached, the clone
    (if any) killed and reaped."""
    if state.saved is not None and state.injector in state.threads.seized:
        with contextlib.suppress(PtraceError):
            ptrace.set_regs(state.injector, state.restore or state.saved)
            ptrace.set_sigmask(state.injector, state.mask)
            ptrace.set_options(state.injector, Opt(0))
    state.threads.release()
    if state.clone_pid:
        failed = Clone(
            state.pid, state.clone_pid, (), 0.0, 0, 0, _pidfd=state.pidfd, _watchdog=state.watchdog
        )
        failed.injector_tid = state.injector
        failed._syscall_ip = state.syscall_ip
        failed._suspend = state.suspend
        with contextlib.suppress(OSError):
            status = read_status(f"/proc/{state.clone_pid}/status")
            failed.clone_ns_pid = ns_id(status, "NSpid", state.clone_pid)
        failed.kill()


def _raise_as_clone_error(pid: int, e: BaseException) -> None:
    """Translate a ptrace or OS failure of the freeze; anything else is left to the caller."""
    if isinstance(e, ptrace.StopTimeoutError):
        raise CloneError(f"thread {e.tid}: did not stop in time (uninterruptible sleep?)") from e
    if isinstance(e, PtraceError):
        if e.errno == errno.ESRCH and not Path(f"/proc/{pid}").exists():
            raise TargetError(pid, "exited during the clone snapshot") from e
        raise CloneError(f"process {pid}: clone snapshot failed: {e}") from e
    if isinstance(e, OSError):  # the side file (fork_lost), pidfd_open
        where = f"{e.filename}: " if e.filename else ""
        raise CloneError(f"process {pid}: clone snapshot failed: {where}{e.strerror}") from e


# --- step 0: refusals ---------------------------------------------------------------------------


def _check_target(pid: int) -> Opt:
    """Refuse, before anything is frozen, what the clone method cannot handle.

    :returns: the ptrace option the injection needs: :attr:`Opt.SUSPEND_SECCOMP` for a target
        under seccomp, whose filter may forbid clone, close_range or any other injected
        syscall (Docker's and Podman's default profiles, Kubernetes' RuntimeDefault), else none.
    """
    try:
        status = read_status(f"/proc/{pid}/status")
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError as e:
        raise TargetError(pid, "no such process") from e
    if status.get("State", "").startswith(("Z", "X")):
        raise TargetError(pid, "is a zombie")
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        raise CloneRefusedError(pid, traced(pid, tracer).detail)
    if pid == os.getpid() or os.getpid() in tids:
        raise CloneRefusedError(pid, "a process cannot snapshot itself")
    for tid in tids:
        with contextlib.suppress(FileNotFoundError):
            st = read_status(f"/proc/{pid}/task/{tid}/status")
            if st.get("Seccomp", "0") != "0":
                why_not = ptrace.seccomp_suspension_refusal()
                if why_not is not None:
                    raise CloneRefusedError(pid, why_not)
                return Opt.SUSPEND_SECCOMP
    return Opt(0)


# --- step 1: seize and save (freeze.py) ---------------------------------------------------------


def _wait_stopped(tid: int, deadline: float) -> bool:
    """Wait for *tid*'s PTRACE_EVENT_STOP; False when the thread exited instead.

    A signal-delivery stop that comes first is passed on (PTRACE_CONT with the signal), as the
    thread would have received it anyway; the pending interrupt stops it right after.
    """
    while True:
        got, status = ptrace.wait(tid, _WNOHANG)
        if got == 0:
            if time.monotonic() > deadline:
                raise CloneError(f"thread {tid}: did not stop in time (uninterruptible sleep?)")
            time.sleep(0.0001)
            continue
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return False
        sig = os.WSTOPSIG(status)
        if ptrace.stop_event(status) == Event.STOP:
            return True
        if sig != signal.SIGTRAP:
            ptrace.cont(tid, sig)
        else:
            ptrace.cont(tid)


# --- step 2: registers and injection ------------------------------------------------------------


def _syscall_at_pc(pid: int, regs: bytes) -> int | None:
    """Inside the freeze: the syscall instruction just before the pc of a thread that sits in a
    syscall, or None."""
    arch = _arch()
    insn = arch.syscall_insn
    at = arch.pc(regs) - len(insn)
    if arch.syscall_nr(regs) is None or at < 0:
        return None
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            if os.pread(fd, len(insn), at) == insn:
                return at
    finally:
        os.close(fd)
    return None


def _syscall_fallback(pid: int) -> int | None:
    """Before the freeze: a syscall instruction in the vDSO, else in any executable mapping, for
    an injecting thread that does not sit in a syscall."""
    arch = _arch()
    maps = read_maps(pid)
    ordered = [m for m in maps if m.name == "[vdso]"] + [
        m for m in maps if "x" in m.perms and m.name not in ("[vdso]", "[vsyscall]")
    ]
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for m in ordered:
            if "x" not in m.perms:
                continue
            with contextlib.suppress(OSError):
                chunk = os.pread(fd, min(m.end - m.start, 1 << 20), m.start)
                i = arch.find_syscall_insn(chunk)
                if i >= 0:
                    return m.start + i
    finally:
        os.close(fd)
    return None


def _run_syscall(tid: int, regs: bytes, *, expect_clone: bool = False) -> tuple[int, int]:
    """Run the syscall set up in *regs* (pc at a syscall instruction) in stopped *tid*.

    :returns: ``(the syscall's result at its exit, new child pid or 0)``.
    """
    ptrace.set_regs(tid, regs)
    ptrace.syscall(tid)
    _expect_syscall_stop(tid)  # entry
    child = 0
    ptrace.syscall(tid)
    while True:
        _, status = ptrace.wait(tid)
        _check_stopped(tid, status)
        event = ptrace.stop_event(status)
        if expect_clone and event in (Event.CLONE, Event.FORK):
            child = ptrace.get_event_msg(tid)
            # The child inherited EXITKILL at birth; the target must not keep it.
            ptrace.set_options(tid, Opt.TRACESYSGOOD)
            ptrace.syscall(tid)
            continue
        if ptrace.is_syscall_stop(status):
            break
        raise CloneError(f"thread {tid}: unexpected stop {status:#x} during an injected syscall")
    return _arch().syscall_result(ptrace.get_regs(tid)), child


def _check_stopped(tid: int, status: int) -> None:
    if not os.WIFSTOPPED(status):
        raise CloneError(f"thread {tid}: exited during an injected syscall (status {status:#x})")


def _expect_syscall_stop(tid: int) -> None:
    _, status = ptrace.wait(tid)
    _check_stopped(tid, status)
    if not ptrace.is_syscall_stop(status):
        raise CloneError(f"thread {tid}: unexpected stop {status:#x} before an injected syscall")


def _syscall_regs(base: bytes, ip: int, nr: int, *args: int) -> bytes:
    return _arch().syscall_regs(base, ip, nr, args)


def _inject_clone(
    tid: int, saved: bytes, restore: bytes, sigmask: int, syscall_ip: int, suspend: Opt
) -> int:
    """Steps 2-3: fork the target from stopped thread *tid*; the clone is left traced, on its
    way to its first stop (:func:`_adopt_clone` waits for it once the target runs again).

    EXITKILL is on the target's thread only from before the clone exists until its registers
    are its own again, so that the child inherits it at birth (kernel/ptrace.c:
    ``ptrace_init_task()``); should this process die in that window, the target dies rather
    than running on with injected registers. *suspend* (seccomp) is inherited the same way and
    kept on the clone for its preparation (step 5), then dropped before it is released.
    """
    ptrace.set_options(
        tid, Opt.TRACESYSGOOD | Opt.TRACECLONE | Opt.TRACEFORK | Opt.EXITKILL | suspend
    )
    # No signal handler may run while our registers are in place (compel's parasite_run()).
    ptrace.set_sigmask(tid, _ALL_SIGNALS)
    try:
        # clone(flags = 0: no CLONE_VM, exit signal 0; newsp 0: same stack; no tids; no tls)
        ret, child = _run_syscall(
            tid,
            _syscall_regs(saved, syscall_ip, _arch().syscalls.clone, 0, 0, 0, 0, 0),
            expect_clone=True,
        )
    finally:
        ptrace.set_regs(tid, restore)
        ptrace.set_sigmask(tid, sigmask)
        ptrace.set_options(tid, Opt(0))
    if ret < 0 or not child:
        raise CloneError(
            f"thread {tid}: injected clone failed: {os.strerror(-ret) if ret < 0 else ret}"
        )
    return child


def _adopt_clone(child: int, suspend: Opt) -> None:
    """After the freeze: the clone's first stop (a traced child stops before its first user
    instruction, kernel/ptrace.c: ``ptrace_init_task()``), then its own options."""
    _, status = ptrace.wait(child)
    if not os.WIFSTOPPED(status):
        raise CloneError(f"clone {child}: did not start stopped (status {status:#x})")
    ptrace.set_options(child, Opt.TRACESYSGOOD | Opt.EXITKILL | suspend)


def _check_pause_allowed(cpid: int, ip: int) -> None:
    """Try the clone's ``pause()`` under its own seccomp filters while it is still traced.

    Released, the clone sleeps in pause() for CRIU under its filters again. A filter that fails
    pause() (SECCOMP_RET_ERRNO, or RET_TRACE with no tracer asking for it) would return the
    clone to the target's code with nobody holding it. Here it is still ours: it enters
    pause() and is interrupted right away (PTRACE_INTERRUPT), so an allowed pause() exits with
    -ERESTARTNOHAND (kernel/signal.c: sys_pause()); any other result is the filter's, and a
    filter that kills ends the clone, not the target.

    The clone is left at the trial's syscall-exit stop, its interrupt's stop perhaps pending.

    :raises CloneError: the filter forbids pause(); the clone is left stopped, for :meth:`kill`.
    """
    ptrace.set_regs(cpid, _syscall_regs(ptrace.get_regs(cpid), ip, _arch().syscalls.pause))
    ptrace.syscall(cpid)
    _expect_syscall_stop(cpid)  # entry; the filter runs after it (kernel/entry/common.c)
    ptrace.syscall(cpid)
    ptrace.interrupt(cpid)
    _, status = ptrace.wait(cpid)
    _check_stopped(cpid, status)
    result = _arch().syscall_result(ptrace.get_regs(cpid))
    if not ptrace.is_syscall_stop(status) or not pause_interrupted(result):
        what = os.strerror(-result) if ptrace.is_syscall_stop(status) else f"stop {status:#x}"
        raise CloneError(
            f"clone {cpid}: its seccomp filter does not let it sleep in pause() ({what}), so it"
            " cannot be left for CRIU"
        )


# --- step 5: prepare the clone ------------------------------------------------------------------


def _clone_syscall(snap: Clone, nr: int, *args: int) -> int:
    base = ptrace.get_regs(snap.clone_pid)
    ret, _ = _run_syscall(snap.clone_pid, _syscall_regs(base, snap._syscall_ip, nr, *args))
    return ret


def _side_kind(name: str) -> str | None:
    if name.startswith("/SYSV"):
        return "sysv"
    if name == "anon_inode:[io_uring]":
        return "io_uring"
    return None


def _prepare_clone(snap: Clone, side_dir: Path | None) -> tuple[SideMapping, ...]:
    """Step 5: drop the clone's files and session, move CRIU-refused mappings out of it."""
    cpid = snap.clone_pid
    ret = _clone_syscall(snap, _arch().syscalls.close_range, 0, 0xFFFFFFFF, 0)
    if ret < 0:
        raise CloneError(f"clone {cpid}: close_range failed: {os.strerror(-ret)}")
    ret = _clone_syscall(snap, _arch().syscalls.setsid)
    if ret < 0:
        raise CloneError(f"clone {cpid}: setsid failed: {os.strerror(-ret)}")
    side = [m for m in read_maps(cpid) if _side_kind(m.name)]
    if not side:
        return ()
    if side_dir is None:
        raise CloneError(
            f"process {snap.pid}: maps {side[0].name}, which needs a side directory to copy it to"
        )
    out: list[SideMapping] = []
    path = side_dir / f"side-{snap.pid}.bin"
    mem = os.open(f"/proc/{cpid}/mem", os.O_RDONLY)
    try:
        with open(path, "wb") as f:
            for area in side:
                kind = _side_kind(area.name)
                assert kind is not None
                offset = f.tell()
                data_file: Path | None = path
                try:
                    _copy_range(mem, f.fileno(), area.start, area.end - area.start)
                except OSError as e:
                    log.warning(
                        "clone %d: %s at %#x unreadable (%s): hole", cpid, area.name, area.start, e
                    )
                    f.truncate(offset)
                    f.seek(offset)
                    data_file = None
                out.append(SideMapping(area, kind, data_file, offset))
    finally:
        os.close(mem)
    for m in out:
        ret = _clone_syscall(snap, _arch().syscalls.munmap, m.area.start, m.area.end - m.area.start)
        if ret < 0:
            raise CloneError(f"clone {cpid}: munmap of {m.area.name} failed: {os.strerror(-ret)}")
    return tuple(out)


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        chunk = os.pread(src_fd, min(1 << 20, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, "short read")
        os.write(dst_fd, chunk)
        done += len(chunk)


# --- step 7: cleanup ----------------------------------------------------------------------------


def _proc_state(pid: int) -> str:
    try:
        return read_stat(f"/proc/{pid}/stat").state
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def _wait_exit(tid: int) -> None:
    while True:
        _, status = ptrace.wait(tid)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return


def _wait_zombie(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _proc_state(pid) not in ("Z", "X", ""):
        if time.monotonic() > deadline:
            raise CloneError(f"clone {pid}: still alive after SIGKILL")
        time.sleep(0.0005)


def _ppid(pid: int) -> int:
    try:
        return int(read_status(f"/proc/{pid}/status").get("PPid", "0"))
    except FileNotFoundError:
        return 0


def _reap_in_target(plan: ReapPlan) -> None:
    """Make the target ``wait4(CLONE, NULL, __WALL | WNOHANG, NULL)`` its clone's zombie.

    One thread is seized for the duration of one syscall (seccomp suspended if the target runs
    under it); the others run on.
    """
    pid, clone_pid, tid = plan.pid, plan.clone_pid, plan.tid
    if _proc_state(clone_pid) == "" or _ppid(clone_pid) != pid:
        return  # already reaped (the target waits with __WALL), or not ours
    if not tid or not Path(f"/proc/{pid}/task/{tid}").exists():
        tids = task_ids(pid)
        if not tids:
            return
        tid = tids[0]
    try:
        with injecting(pid, tid, suspend=plan.suspend, syscall_ip=plan.syscall_ip) as call:
            wait_for = plan.clone_ns_pid
            ret = call(_arch().syscalls.wait4, wait_for, 0, ptrace.WALL | _WNOHANG, 0)
    except _ThreadGone:
        return
    if ret != wait_for:
        log.warning("process %d: reaping clone %d: wait4 returned %d", pid, clone_pid, ret)


class _ThreadGone(CloneError):
    """The thread chosen to run an injected syscall exited before it stopped."""


@contextlib.contextmanager
def injecting(
    pid: int, tid: int, *, suspend: Opt = _NO_SUSPEND, syscall_ip: int = 0
) -> Iterator[Callable[..., int]]:
    """Stop thread *tid* of running *pid* and yield ``call(nr, *args) -> result`` that runs
    syscalls in it; on leaving, its registers and signal mask are restored and it is detached.

    One thread is seized for the duration; the others run on. *suspend* is
    :attr:`Opt.SUSPEND_SECCOMP` for a target under seccomp (see :func:`check_injectable`).

    :raises CloneError: no syscall instruction to run, or the thread died meanwhile.
    """
    ptrace.seize(tid)
    try:
        ptrace.interrupt(tid)
        if not _wait_stopped(tid, time.monotonic() + 10.0):
            raise _ThreadGone(f"thread {tid}: exited before it stopped for an injected syscall")
        saved = ptrace.get_regs(tid)
        mask = ptrace.get_sigmask(tid)
        ip = syscall_ip or _syscall_at_pc(pid, saved) or _syscall_fallback(pid)
        if ip is None:
            raise CloneError(f"process {pid}: no syscall instruction to inject")
        restore = _arch().resume_regs(saved, False)
        ptrace.set_options(tid, Opt.TRACESYSGOOD | suspend)
        ptrace.set_sigmask(tid, _ALL_SIGNALS)

        def call(nr: int, *args: int) -> int:
            return _run_syscall(tid, _syscall_regs(saved, ip, nr, *args))[0]

        try:
            yield call
        finally:
            ptrace.set_regs(tid, restore)
            ptrace.set_sigmask(tid, mask)
            ptrace.set_options(tid, Opt(0))
    finally:
        with contextlib.suppress(PtraceError):
            ptrace.detach(tid)


def check_injectable(pid: int) -> Opt:
    """Refuse a target no syscall can be injected into (gone, a zombie, traced, ourselves).

    :returns: the ptrace option injected syscalls need (:attr:`Opt.SUSPEND_SECCOMP` or none).
    """
    return _check_target(pid)


# --- the watchdog -------------------------------------------------------------------------------


def _start_watchdog(plan: ReapPlan, pidfd: int) -> tuple[int, int]:
    """Fork a watchdog that kills and reaps the clone if this process dies without doing it.

    Once released for CRIU the clone is no longer traced by us, so PTRACE_O_EXITKILL no longer
    ties it to our life: were we SIGKILLed then, it would sleep in ``pause()`` for ever as the
    target's child. The watchdog holds the read end of a pipe whose only write end is ours
    (non-inheritable, so CRIU never holds it; the conversion child is forked only after
    :meth:`Clone.kill`): EOF without the byte :meth:`Clone.kill` sends means we
    died. It then kills the clone through its pidfd (no pid reuse) and reaps it in the target.
    It runs in its own session, so a signal to our process group (Ctrl-C, ``kill -- -PGID``)
    leaves it to clean up after us.

    :returns: (watchdog pid, write end of its pipe).
    """
    return fork_guard(lambda rfd: _watchdog(rfd, plan, pidfd), keep=(pidfd,))


def fork_guard(run: Callable[[int], None], *, keep: Sequence[int] = ()) -> tuple[int, int]:
    """Fork a helper that outlives us to clean up: it runs ``run(rfd)`` in its own session
    (a signal to our process group leaves it be), its standard streams on /dev/null and every
    other descriptor but *keep* closed, *rfd* the read end of a pipe whose only write end is
    ours: EOF there without a byte written first means we died.

    :returns: (helper pid, write end of its pipe).
    """
    rfd, wfd = os.pipe()
    try:
        child = os.fork()
    except OSError:
        os.close(rfd)
        os.close(wfd)
        raise
    if child == 0:  # pragma: no cover - runs in the forked helper
        try:
            os.close(wfd)
            _detach_helper({rfd, *keep})
            run(rfd)
        finally:
            os._exit(0)
    os.close(rfd)
    return child, wfd


def _detach_helper(keep: set[int]) -> None:  # pragma: no cover - forked child
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in {0, 1, 2, *keep}:
            with contextlib.suppress(OSError):
                os.close(int(name))


def _watchdog(rfd: int, plan: ReapPlan, pidfd: int) -> None:  # pragma: no cover - forked child
    if os.read(rfd, 1):
        return  # the tool dealt with the clone
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(PtraceError, OSError, LivedumpError):
        _wait_zombie(plan.clone_pid, timeout=5.0)
        _reap_in_target(plan)


def _hook(step: str) -> None:
    if os.environ.get(PAUSE_ENV) == step:
        print(f"paused {step}", file=sys.stderr, flush=True)
        time.sleep(3600)

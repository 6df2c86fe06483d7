"""The calling thread's scheduling policy, raised for a block (sched(7))."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["autogroup_nice", "own_session", "realtime"]

log = logging.getLogger(__name__)


@contextmanager
def realtime(priority: int = 1) -> Iterator[bool]:
    """Run the calling thread under ``SCHED_FIFO`` *priority* for the block, then put its policy
    back; yields whether it could (``CAP_SYS_NICE`` and an RT budget in its cgroup).

    Every thread a tracer wakes (PTRACE_INTERRUPT, PTRACE_DETACH) would otherwise preempt it
    on its own CPU, one after the other, for as long as it takes to reach its stop (CFS's
    wake-up preemption, kernel/sched/fair.c: ``check_preempt_wakeup_fair()``): for a thousand
    threads that is most of a freeze (issue 12). ``SCHED_RESET_ON_FORK``: nothing forked
    meanwhile inherits the policy. A caller already under a real-time policy keeps it.
    """
    policy = os.sched_getscheduler(0)
    param = os.sched_getparam(0)
    if policy & ~os.SCHED_RESET_ON_FORK in (os.SCHED_FIFO, os.SCHED_RR):
        yield True
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
        raised = True
    except OSError as e:
        log.debug("SCHED_FIFO refused: %s", e.strerror)
        raised = False
    try:
        yield raised
    finally:
        if raised:
            os.sched_setscheduler(0, policy, param)


#: include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1


def autogroup_nice(nice: int) -> bool:
    """Give the calling process's autogroup the nice *nice* (/proc/self/autogroup,
    kernel/sched/autogroup.c proc_sched_autogroup_set_nice()). With CONFIG_SCHED_AUTOGROUP a
    session's tasks form one group that shares the CPUs with each other session's, and a task's
    own nice counts only inside its group: call it only in a session made for the purpose.

    :returns: False where there are no autogroups, or the nice is refused (below 0 without
        CAP_SYS_NICE).
    """
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        return False
    return True


#: the process :func:`own_session` left waiting for this one (what the caller sees)
_waiting: list[int] = []


def own_session(nice: int) -> None:
    """Run at *nice* (where setpriority(2) lets it), in a session of its own where there are
    autogroups: fork. The parent stays in the caller's session and process group (what Ctrl-C
    and a kill of the group reach), forwards SIGINT, SIGTERM and SIGHUP to the child and exits
    with its status (or dies of its signal); it never returns. The child returns, leading a
    session of its own whose autogroup has *nice* (:func:`autogroup_nice`), and is killed if
    the parent dies. Called again in that child, it only gives itself, its group and the parent
    waiting for it *nice*.
    """
    for pid in (0, *_waiting):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, nice)
    if _waiting:
        autogroup_nice(nice)
        return
    if not os.path.exists("/proc/self/autogroup"):
        return
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the prctl
            os._exit(128 + signal.SIGKILL)
        os.setsid()
        autogroup_nice(nice)
        _waiting[:] = [parent]
        return

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: so is this process, as the caller would have seen it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(128 - code if code < 0 else code)

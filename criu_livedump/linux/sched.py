"""The calling thread's scheduling policy, raised for a block (sched(7))."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["realtime"]

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

"""criu_livedump.linux.sched: the tracer's SCHED_FIFO for the freeze, put back after it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from criu_livedump.linux.sched import realtime


def _in_thread(body: Callable[[], None]) -> None:
    """Run *body* in a thread of its own: a policy is per thread, the test's stays untouched."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if errors:
        raise errors[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE")
def test_fifo_for_the_block_then_the_policy_back() -> None:
    def body() -> None:
        before = os.sched_getscheduler(0)
        with realtime() as raised:
            assert raised
            assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
        assert os.sched_getscheduler(0) == before

    _in_thread(body)


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_RR needs CAP_SYS_NICE")
def test_a_real_time_caller_keeps_its_policy() -> None:
    def body() -> None:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(7))
        with realtime() as raised:
            assert raised
            assert os.sched_getscheduler(0) == os.SCHED_RR
            assert os.sched_getparam(0).sched_priority == 7
        assert os.sched_getscheduler(0) == os.SCHED_RR

    _in_thread(body)


def test_policy_back_after_an_exception() -> None:
    def body() -> None:
        before = os.sched_getscheduler(0)
        with pytest.raises(KeyError), realtime():
            raise KeyError("x")
        assert os.sched_getscheduler(0) == before

    _in_thread(body)

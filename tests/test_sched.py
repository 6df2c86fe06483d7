"""criu_livedump.linux.sched: the tracer's SCHED_FIFO for the freeze, put back after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from criu_livedump.linux.sched import realtime
from tests import procs


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


#: A process that calls own_session(5), then says its pid, session and autogroup, and either
#: exits 7 or (with "wait") sleeps until a signal ends it.
_OWN_SESSION = """
import os, sys, time
from criu_livedump.linux.sched import own_session
own_session(5)
with open("/proc/self/autogroup") as f:
    group = f.read().split()[-1]
print(os.getpid(), os.getsid(0), group, flush=True)
if sys.argv[1:] == ["wait"]:
    time.sleep(60)
sys.exit(7)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="no autogroups")
def test_own_session_runs_on_in_a_session_of_its_own() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _OWN_SESSION],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 7, proc.stderr  # the parent exits with the child's status
    pid, sid, nice = proc.stdout.split()
    assert pid == sid != str(os.getsid(0))  # the child leads a session of its own
    assert nice == "5"


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="no autogroups")
def test_own_session_called_again_only_renices_the_group() -> None:
    """The entry point makes the session before the request is parsed; ``dump`` then gives it
    the exact nice: no second fork."""
    script = _OWN_SESSION.replace(
        "own_session(5)\n",
        "own_session(5)\nown_session(7)\nprint(os.getpriority(os.PRIO_PROCESS, os.getppid()))\n",
    )
    script = script.replace("print(os.getpid(),", "print(os.getppid(), os.getpid(),")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 7, err
    waiter_nice, ppid, pid, sid, nice = out.split()
    assert pid == sid and nice == "7" and waiter_nice == "7"  # the waiting parent too
    assert ppid == str(proc.pid)  # forked once: its parent is the command itself


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="no autogroups")
def test_own_session_forwards_a_signal_and_dies_of_it() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWN_SESSION, "wait"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = procs.readline(proc.stdout, 60, "own_session's child")
        pid = int(line.split()[0])  # the child runs: its parent waits
        assert pid != proc.pid
        proc.send_signal(signal.SIGTERM)  # to the parent only, as a kill of its pid would
        assert proc.wait(timeout=60) == -signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the child got it and died of it (reaped by its parent)
    finally:
        proc.kill()
        proc.wait()

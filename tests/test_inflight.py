"""Syscalls in flight survive a live dump (issue 7): no spurious EINTR, no short sleep.

``tests/programs/inflight.c`` blocks one thread in each of read() on a pipe, nanosleep(),
epoll_wait() and poll() without timeout, FUTEX_WAIT and accept(), and its main thread in read()
of stdin. The target is dumped several times through the CLI; then every call is completed from
outside (``go`` on stdin, a TCP connect) and the program reports, per call, how many EINTRs it saw.

The clone method must leave every call alone. ``criu dump --leave-running`` cannot: compel
(compel/arch/x86/src/lib/infect.c: ``compel_get_task_regs()``) turns a syscall stopped with
-ERESTART_RESTARTBLOCK (nanosleep, and poll, whose sys_poll() always arms a restart block) into
-EINTR, because the parasite's own syscalls may overwrite the thread's restart block; and
fs/eventpoll.c: ``ep_poll()`` returns -EINTR to any wake-up by a pending job-control event, which
the seize's PTRACE_INTERRUPT is. The criu test asserts exactly that documented behaviour (see
docs/RELIABILITY.md), so that a CRIU which stops doing it makes the test fail and the
documentation be updated.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest

pytestmark = [pytest.mark.live]

EXE = Path(sys.executable).parent / "criu-livedump"
DUMPS = 3
UNLIMITED = ("--core-limit", "unlimited")
CALLS = ("read", "nanosleep", "epoll_wait", "poll", "futex", "accept", "read(stdin)")
#: Calls that ``criu dump --leave-running`` interrupts with EINTR (see the module docstring).
CRIU_EINTR = ("nanosleep", "epoll_wait", "poll")


class Inflight:
    """The running inflight program: its pid, its listening port, its stdin."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port

    def finish(self) -> tuple[int, dict[str, str]]:
        """Complete every blocked call; return the exit status and ``{call: report}``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10):
            pass
        out, _ = self.proc.communicate(timeout=30)
        results: dict[str, str] = {}
        for line in out.decode().splitlines():
            word, _, rest = line.partition(" ")
            call, _, detail = rest.partition(":")
            results[call] = "ok" if word == "ok" else detail.strip()
        return self.proc.returncode, results


@pytest.fixture
def inflight(programs: dict[str, Path], request: pytest.FixtureRequest) -> Iterator[Inflight]:
    """The running program: one thread in each call, or as many as the parameter says."""
    copies = str(getattr(request, "param", 1))
    proc = subprocess.Popen(
        [programs["inflight"], copies], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == [b"ready"], line
        yield Inflight(proc, int(line[1]))
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def dump_repeatedly(target: Inflight, method: str, tmp_path: Path) -> None:
    for i in range(DUMPS):
        core = tmp_path / f"core.{i}"
        proc = procs.run(
            [str(EXE), "dump", str(target.pid), "-o", str(core), "--method", method, *UNLIMITED],
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"({method})" in proc.stderr
        assert core.stat().st_size > 0
        core.unlink()
        state = Path(f"/proc/{target.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state not in ("T", "t"), state


#: 167 threads in each call: 1003 threads, as a server's pools have (issue 12)
@pytest.mark.parametrize("inflight", [1, 167], indirect=True, ids=["7-threads", "1003-threads"])
def test_clone_method_leaves_every_call_alone(inflight: Inflight, tmp_path: Path) -> None:
    dump_repeatedly(inflight, "clone", tmp_path)
    status, results = inflight.finish()
    assert results == dict.fromkeys(CALLS, "ok"), results
    assert status == 0


def test_criu_method_interrupts_the_documented_calls(inflight: Inflight, tmp_path: Path) -> None:
    """CRIU's --leave-running hands nanosleep, poll and epoll_wait one EINTR per dump; every
    other call survives. Asserted as documented, not hidden: a change here means a CRIU that
    behaves differently, and docs/RELIABILITY.md must follow."""
    dump_repeatedly(inflight, "criu", tmp_path)
    status, results = inflight.finish()
    assert status == 1
    expected = dict.fromkeys(CALLS, "ok")
    expected["epoll_wait"] = expected["poll"] = f"{DUMPS} x EINTR"
    # the sleeper re-arms a fresh 1 s sleep in a loop: a dump may fall between two sleeps
    n = int(results["nanosleep"].split()[0]) if results["nanosleep"] != "ok" else 0
    assert 1 <= n <= DUMPS, results
    assert results["nanosleep"] == f"{n} x EINTR"
    expected["nanosleep"] = results["nanosleep"]
    assert results == expected
    assert set(CRIU_EINTR) == {c for c, r in results.items() if r != "ok"}


def test_untouched_program_reports_ok(inflight: Inflight) -> None:
    """The control: without dumps the program reports nothing (the checks can fail only
    because of the dump)."""
    status, results = inflight.finish()
    assert results == dict.fromkeys(CALLS, "ok")
    assert status == 0


def test_program_reports_an_eintr(inflight: Inflight) -> None:
    """The detector works: a SIGSTOP/SIGCONT cycle (which interrupts epoll_wait by
    signal(7)) is reported by the program."""
    os.kill(inflight.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{inflight.pid}/stat")
    for _ in range(1000):
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
            break
        time.sleep(0.01)
    os.kill(inflight.pid, signal.SIGCONT)
    status, results = inflight.finish()
    assert status == 1
    assert results["epoll_wait"] == "1 x EINTR"

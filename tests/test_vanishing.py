"""A target that dies at each stage of a dump (issue 11): one sentence, never an exception's text.

Each case runs :func:`criu_livedump.dump.live_dump` in this process on a real target and
SIGKILLs the target at one stage, by wrapping the function that stage calls (fault injection by
monkeypatching). Before the snapshot is complete the dump must fail with
:class:`TargetDiedError` ("process N: died during the dump (killed by signal 9 (SIGKILL))"),
leaving no core and no scratch; once the snapshot is complete, a core of the state at the
freeze may be written instead. Both are one line for the user; nothing else is allowed.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procs
import pytest
from conftest import StartTarget
from harness.launcher import Target

from converters.options import UNLIMITED
from criu_livedump import dump
from criu_livedump.errors import TargetDiedError, TargetError
from criu_livedump.linux.pidfd import Pidfd, describe_wait_status
from criu_livedump.request import DumpRequest, Method
from criu_livedump.target import facts as target_facts

#: (method, "module:function" the stage calls, whether the snapshot is complete there)
STAGES = [
    ("criu", "criu_livedump.target:inspect", False),
    ("criu", "criu_livedump.snapshot:choose", False),
    ("criu", "criu_livedump.dump:criu_credentials", False),
    ("criu", "criu_livedump.snapshot.criu:dump", False),
    ("criu", "criu_livedump.snapshot.leave_running:open_mapped_files", True),
    ("criu", "criu_livedump.dump:with_dump_time_facts", True),
    ("clone", "criu_livedump.snapshot.clone.inject:prepare", False),
    ("clone", "criu_livedump.snapshot.clone.inject:freeze_tree", False),
    ("clone", "criu_livedump.snapshot.clone.method:open_mapped_files", True),
    ("clone", "criu_livedump.snapshot.criu:dump", True),
    ("clone", "criu_livedump.dump:with_dump_time_facts", True),
]


def _kill(target: Target) -> None:
    """SIGKILL the target and wait until it is a zombie (our child: not reaped until close)."""
    os.kill(target.pid, signal.SIGKILL)
    procs.wait_for(
        lambda: Path(f"/proc/{target.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
        30,
        f"process {target.pid} becoming a zombie",
    )


def _killing_before(
    fn: Callable[..., Any], target: Target, fired: list[bool]
) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        fired.append(True)
        _kill(target)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.live
@pytest.mark.parametrize(
    ("method", "stage", "complete"), STAGES, ids=[f"{m}-{s.split(':')[1]}" for m, s, _ in STAGES]
)
def test_target_dies_at_each_stage(
    programs: dict[str, Path],
    targets: StartTarget,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    stage: str,
    complete: bool,
) -> None:
    target = targets(programs["threads"], "3", rseq=False)
    module, name = stage.split(":")
    where = importlib.import_module(module)
    fired: list[bool] = []
    monkeypatch.setattr(where, name, _killing_before(getattr(where, name), target, fired))
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    request = DumpRequest(
        core_limit=UNLIMITED, output=str(out / "core"), scratch=scratch, method=Method(method)
    )
    try:
        report = dump.live_dump(target.pid, request)
        assert fired, f"{stage} is no longer called by a dump: update STAGES"
    except TargetDiedError as e:
        assert fired, f"{stage} is no longer called by a dump: update STAGES"
        assert str(e) == (
            f"process {target.pid}: died during the dump (killed by signal 9 (SIGKILL))"
        )
        assert os.listdir(out) == []
        print(f"{method} {stage}: {e}")
    else:
        assert complete, f"the dump succeeded although the target died at {stage}"
        assert report.core_path == str(out / "core")
        print(f"{method} {stage}: core written")
    assert os.listdir(scratch) == []
    assert not target.alive()


def test_unreadable_proc_file_is_a_sentence(tmp_path: Path) -> None:
    """A /proc value that does not parse (an exiting process reads an empty coredump_filter)
    is a sentence naming the process, never the parser's text."""
    me = os.getpid()
    err = target_facts._unreadable(me, ValueError("invalid literal for int() with base 16: ''"))
    assert isinstance(err, TargetError)
    assert "invalid literal" not in err.message and err.message.startswith(f"process {me}: ")
    gone = subprocess.Popen(["true"])
    gone.wait()
    err = target_facts._unreadable(gone.pid, ValueError("invalid literal"))
    assert err.message == f"process {gone.pid}: exited while being inspected"


def test_how_a_process_that_is_not_our_child_ended() -> None:
    """The wait status of a grandchild, reaped by its own parent: PIDFD_INFO_EXIT (Linux 6.15),
    else unknown (None); of a zombie child: /proc/PID/stat's exit_code."""
    shell = procs.popen(
        ["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    try:
        grandchild = int(procs.readline(shell.stdout, 30, "the shell"))
        with Pidfd(grandchild) as pidfd:
            assert not pidfd.exited()
            os.kill(grandchild, signal.SIGKILL)
            procs.wait_for(pidfd.exited, 30, f"process {grandchild} ending")
            procs.wait_for(lambda: not os.path.exists(f"/proc/{grandchild}"), 30, "the reap")
            status = pidfd.wait_status()
            if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) >= (6, 15):
                assert describe_wait_status(status) == "killed by signal 9 (SIGKILL)"
    finally:
        procs.kill_group(shell)
    child = procs.popen([sys.executable, "-c", "raise SystemExit(3)"])
    with Pidfd(child.pid) as pidfd:
        procs.wait_for(pidfd.exited, 30, f"process {child.pid} ending")
        assert describe_wait_status(pidfd.wait_status()) == "exited with status 3"
    child.wait()


FREEZER = Path("/sys/fs/cgroup/freezer")


def test_a_pending_sigkill_counts_as_dying() -> None:
    """A process SIGKILLed whose threads have not taken the signal yet (held here by the cgroup
    v1 freezer, which SIGKILL does not thaw; on a loaded machine, a thread waiting for a CPU)
    is seen dying: a failure judged then waits for its end instead of quoting its own cause."""
    if not (FREEZER / "freezer.state").exists() and not (FREEZER / "tasks").exists():
        pytest.skip("no cgroup v1 freezer here")
    group = FREEZER / f"livedump-test-{os.getpid()}"
    group.mkdir()
    proc = procs.popen(["sleep", "600"])
    try:
        (group / "tasks").write_text(str(proc.pid))
        (group / "freezer.state").write_text("FROZEN")
        procs.wait_for(
            lambda: (group / "freezer.state").read_text().strip() == "FROZEN", 60, "the freeze"
        )
        with Pidfd(proc.pid) as pidfd:
            assert not pidfd._killed()
            os.kill(proc.pid, signal.SIGKILL)
            assert pidfd._killed()  # frozen, so it cannot have taken the signal
            assert not pidfd.exited()
            (group / "freezer.state").write_text("THAWED")
            assert pidfd.exited(grace=60)
            assert describe_wait_status(pidfd.wait_status()) == "killed by signal 9 (SIGKILL)"
    finally:
        (group / "freezer.state").write_text("THAWED")
        procs.kill_group(proc)
        procs.wait_for(lambda: not (group / "tasks").read_text().strip(), 60, "an empty group")
        group.rmdir()

"""The clone method under seccomp: the target's filters are suspended for the injected syscalls
only (PTRACE_O_SUSPEND_SECCOMP), so a filter that kills on clone(2) does not kill the target.

``clone_seccomp kill-clone`` installs SECCOMP_RET_KILL_PROCESS for clone and clone3. The control
shows the filter is real: the same injection without the suspension kills the process with
SIGSYS. The dump is compared with the kernel's own core of the same process, and a tool without
CAP_SYS_ADMIN is refused in one line whose hint names only a method that accepts the target.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import procs
import pytest
from conftest import StartTarget
from harness.compare import compare_cores
from harness.corefile import CoreView
from harness.gdb import gdb_backtraces
from harness.kernel import kernel_core

from criu_livedump.dump import live_dump
from criu_livedump.errors import CloneError, TargetError
from criu_livedump.linux.ptrace import Opt
from criu_livedump.request import build_request
from criu_livedump.snapshot.clone import inject as clone

pytestmark = [pytest.mark.live]

TOOL = Path(sys.executable).parent / "criu-livedump"


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _filters(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp_filters:"):
            return int(line.split()[1])
    raise AssertionError("no Seccomp_filters line")


def test_the_filter_kills_an_injected_clone_without_the_suspension(
    programs: dict[str, Path], targets: StartTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: were seccomp not suspended, the injected clone() would kill the target."""
    target = targets(programs["clone_seccomp"], "kill-clone", rseq=False)
    # no core from this death, whatever core_pattern says (1 disables pipe handlers too)
    resource.prlimit(target.pid, resource.RLIMIT_CORE, (1, 1))
    monkeypatch.setattr(clone, "_check_target", lambda pid: Opt(0))
    with pytest.raises((CloneError, TargetError)) as raised:
        clone.clone_snapshot(target.pid)

    def exited() -> int:
        """Its wait status once it is gone (never 0: that would be a plain exit(0))."""
        pid, status = os.waitpid(target.pid, os.WNOHANG)
        return status if pid else 0

    status = procs.wait_for(exited, 30, f"the target's death after: {raised.value}")
    target.reaped(status)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


@pytest.mark.skipif(os.geteuid() != 0, reason="suspending seccomp needs CAP_SYS_ADMIN")
def test_clone_dumps_a_target_whose_filter_kills_clone(
    programs: dict[str, Path], targets: StartTarget, tmp_path: Path
) -> None:
    target = targets(programs["clone_seccomp"], "kill-clone")
    assert _filters(target.pid) == 1
    ours = tmp_path / "ours"
    request = build_request(
        output=str(ours), signal=int(signal.SIGABRT), core_limit="unlimited", method="clone"
    )
    report = live_dump(target.pid, request)
    assert report.method == "clone"
    # the target lives on, under its filter, and our tracing left nothing behind
    time.sleep(0.2)
    assert _state(target.pid) == "S"
    assert "TracerPid:\t0" in Path(f"/proc/{target.pid}/status").read_text()
    assert _filters(target.pid) == 1
    kernel = kernel_core(target, tmp_path / "kernel")
    with CoreView(ours) as o, CoreView(kernel) as k:
        diffs = compare_cores(o, k, maps=target.maps, rseq=target.rseq)
    assert diffs == []
    binary = programs["clone_seccomp"]
    assert gdb_backtraces(binary, ours) == gdb_backtraces(binary, kernel)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop a capability")
def test_without_cap_sys_admin_clone_is_refused_with_a_true_hint(
    programs: dict[str, Path], targets: StartTarget, tmp_path: Path
) -> None:
    """Without CAP_SYS_ADMIN the filters cannot be suspended; CRIU (which suspends them itself
    through the same option, compel/src/lib/infect.c) cannot dump it either, so no hint names
    it."""
    target = targets(programs["clone_seccomp"], "kill-clone", rseq=False)
    argv = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"]
    argv += [str(TOOL), "dump", str(target.pid), "--method", "clone", "-o", str(tmp_path / "c")]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: process {target.pid}: cannot be dumped: --method clone: it runs under seccomp,"
        " whose filters must be suspended for injected code, which needs CAP_SYS_ADMIN, and this"
        " tool lacks it",
    ]
    assert _state(target.pid) == "S"
    assert not (tmp_path / "c").exists()
    # check --pid says the same for both methods, one line each
    argv = [*argv[:4], str(TOOL), "check", "--pid", str(target.pid), "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 8, proc.stderr
    data = json.loads(proc.stdout)
    refusal = (
        "it runs under seccomp, whose filters must be suspended for injected code, which needs"
        " CAP_SYS_ADMIN, and this tool lacks it"
    )
    assert data["method_clone"] == {"can": False, "refusals": [refusal], "auto": False}
    assert data["method_criu"] == {"can": False, "refusals": [refusal], "auto": False}


@pytest.mark.skipif(os.geteuid() != 0, reason="suspending seccomp needs CAP_SYS_ADMIN")
def test_a_filter_that_fails_pause_stops_the_clone_before_it_is_released(
    programs: dict[str, Path], targets: StartTarget, tmp_path: Path
) -> None:
    """The clone sleeps in pause() for CRIU under its own filters; one that fails pause() with
    EPERM would let the released clone run the target's code. The clone tries pause() while
    still held, so the dump fails in one line, the target runs on and no clone is left."""
    target = targets(programs["clone_seccomp"], "errno-pause", rseq=False)
    argv = [str(TOOL), "dump", str(target.pid), "--method", "clone", "--core-limit", "unlimited"]
    argv += ["-o", str(tmp_path / "c")]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 9, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: clone ")
    assert line.endswith(
        ": its seccomp filter does not let it sleep in pause() (Operation not permitted), so it"
        " cannot be left for CRIU"
    )
    assert not (tmp_path / "c").exists()
    assert _state(target.pid) == "S"
    assert "TracerPid:\t0" in Path(f"/proc/{target.pid}/status").read_text()
    kids = Path(f"/proc/{target.pid}/task/{target.pid}/children").read_text().split()
    assert kids == []

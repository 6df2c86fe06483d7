"""Acceptance of issue 18: a live core of any process of a real Podman container.

Two containers, both under Podman's default seccomp profile: one whose service (the threads
program) is the container's main process, PID 1 of its namespace, and one whose service runs
under ``sh -c``, process 2 there. Each is dumped with ``auto``, ``clone`` and ``criu`` (one
container per method: a ``criu`` dump leaves a private page in the target that a later dump
would see), the container runs on, and the core equals the kernel's own core of the same
process, taken afterwards through a ``|`` core_pattern handler, by the kernel-comparison
suite's comparison and gdb's backtraces. The kernel names pids as the namespace does, so does
the core. A PID namespace's init ignores SIGABRT; its core comes from a seccomp kill
(:func:`podman.seccomp_abort`), so SIGSYS is the signal both cores carry.

The in-flight test runs tests/programs/inflight.c as a container's main process: dumps through
the clone leave every blocked call alone (no EINTR, no short sleep).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest
from harness.compare import compare_cores
from harness.corefile import CoreView
from harness.gdb import gdb_backtraces
from harness.kernel import CorePipe, kernel_core_of
from harness.procstate import MapEntry, RseqArea, read_maps, read_rseq_areas
from podman import (
    PODMAN,
    RUN_OPTIONS,
    container,
    init_pid,
    kernel_core_of_init,
    podman,
    require_podman,
    rootfs,
)
from procs import wait_for
from programs import build as programs_build

pytestmark = [pytest.mark.live]

TOOL = Path(sys.executable).parent / "criu-livedump"
METHODS = ("auto", "clone", "criu")
#: the service's command line, and the signal the kernel's core of it carries
KINDS = {
    "main-process": (["/threads", "3"], signal.SIGSYS),
    "under-sh": (["/bin/sh", "-c", "/threads 3; :"], signal.SIGABRT),
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_podman()
    files = {
        "/bin/sh": Path("/bin/sh"),
        "/threads": programs_build.build("threads"),
        "/inflight": programs_build.build("inflight"),
    }
    return rootfs(tmp_path_factory.mktemp("rootfs"), files)


def _ns_ids(pid: int, key: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"process {pid}: no {key}")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _dump(pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOOL), "dump", str(pid), "--core-limit", "unlimited", "--json", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@dataclass
class Dumped:
    """One container's service, dumped by one method, then by the kernel."""

    kind: str
    method: str
    pid: int
    ns_pid: int
    ns_tids: list[int]
    report: dict[str, object]
    ours: Path
    kernel: Path
    maps: list[MapEntry]
    rseq: dict[int, RseqArea]
    ran_on: bool


@pytest.fixture(scope="module", params=[(k, m) for k in KINDS for m in METHODS], ids="-".join)
def dumped(
    request: pytest.FixtureRequest, image_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dumped]:
    kind, method = request.param
    argv, sig = KINDS[kind]
    tmp = tmp_path_factory.mktemp(f"{kind}-{method}")
    with container("--rootfs", str(image_root), *argv) as name:
        wait_for(lambda: "ready" in podman("logs", name).stdout.split(), 60, f"{name} ready")
        init = init_pid(name)
        pid = init
        if kind == "under-sh":
            pid = int(Path(f"/proc/{init}/task/{init}/children").read_text().split()[0])
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        ns_tids = sorted(_ns_ids(t, "NSpid")[-1] for t in tids)
        ns_pid = _ns_ids(pid, "NStgid")[-1]
        rseq = read_rseq_areas(pid)
        proc = _dump(pid, "--method", method, "--signal", str(int(sig)), "-o", str(tmp / "ours"))
        assert proc.returncode == 0, proc.stderr
        running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        ran_on = running == "true" and _state(pid) == "S"
        maps = read_maps(pid)
        pipe = CorePipe(tmp / "kernel")
        if kind == "main-process":
            kernel = kernel_core_of_init(pid, pipe)
        else:
            kernel = kernel_core_of(pid, pipe)
        yield Dumped(
            kind, method, pid, ns_pid, ns_tids, json.loads(proc.stdout), tmp / "ours", kernel,
            maps, rseq, ran_on,
        )  # fmt: skip


def test_the_container_runs_on(dumped: Dumped) -> None:
    assert dumped.ran_on
    assert dumped.report["method"] == ("clone" if dumped.method == "auto" else dumped.method)


def test_pids_are_the_namespace_ids(dumped: Dumped) -> None:
    with CoreView(dumped.ours) as ours, CoreView(dumped.kernel) as kernel:
        assert sorted(t.pid for t in ours.threads) == dumped.ns_tids
        assert sorted(t.pid for t in kernel.threads) == dumped.ns_tids
        for key in ("pr_pid", "pr_ppid", "pr_pgrp", "pr_sid"):
            assert ours.prpsinfo[key] == kernel.prpsinfo[key], key
    assert ours.prpsinfo["pr_pid"] == dumped.ns_pid
    assert (dumped.ns_pid == 1) == (dumped.kind == "main-process")


def test_core_equals_the_kernels(dumped: Dumped) -> None:
    with CoreView(dumped.ours) as ours, CoreView(dumped.kernel) as kernel:
        diffs = compare_cores(ours, kernel, maps=dumped.maps, rseq=dumped.rseq)
    assert diffs == [], f"{len(diffs)} differences:\n" + "\n".join(diffs)


def test_gdb_backtraces_equal(dumped: Dumped) -> None:
    binary = programs_build.build("threads")

    assert gdb_backtraces(binary, dumped.ours) == gdb_backtraces(binary, dumped.kernel)


# --- in flight ------------------------------------------------------------------------------


CALLS = ("read", "nanosleep", "epoll_wait", "poll", "futex", "accept", "read(stdin)")


def test_calls_in_flight_in_a_container_survive_clone_dumps(
    image_root: Path, tmp_path: Path
) -> None:
    """tests/test_inflight.py inside a container, as its main process: three dumps (``auto``,
    which takes the clone), then every blocked call is completed (``go`` on its stdin, a TCP
    connection made inside its network namespace) and reports no EINTR and no short sleep."""
    name = f"criu-livedump-inflight-{tmp_path.name[-12:]}"
    argv = [*PODMAN, "run", "-i", "--name", name, *RUN_OPTIONS, "--rootfs", str(image_root)]
    proc = subprocess.Popen(
        [*argv, "/inflight"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        ready = procs.readline(proc.stdout, 60, "inflight ready in the container").split()
        assert ready[:1] == ["ready"], ready
        pid = init_pid(name)
        for i in range(3):
            dump = _dump(pid, "-o", str(tmp_path / f"core.{i}"))
            assert dump.returncode == 0, dump.stderr
            assert json.loads(dump.stdout)["method"] == "clone"
            assert _state(pid) == "S"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        connect = f"import socket; socket.create_connection(('127.0.0.1', {ready[1]}), timeout=10)"
        subprocess.run(
            ["nsenter", f"--target={pid}", "--net", "--", sys.executable, "-c", connect],
            check=True,
            timeout=60,
        )
        out, _ = proc.communicate(timeout=60)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
        proc.kill()
        proc.wait()
    results = {}
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        call, _, detail = rest.partition(":")
        results[call] = "ok" if word == "ok" else detail.strip()
    assert results == dict.fromkeys(CALLS, "ok"), results
    assert proc.returncode == 0


# --- check --pid and refusals -------------------------------------------------------------------


def _check(pid: int, *wrapper: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wrapper, str(TOOL), "check", "--pid", str(pid), "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


#: the tool without CAP_SYS_ADMIN (root otherwise)
NO_SYS_ADMIN = ("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--")


def test_check_and_refusals_for_container_processes(image_root: Path, tmp_path: Path) -> None:
    """``check --pid`` says both methods can dump either process of a container (auto: clone).
    Without CAP_SYS_ADMIN the tool cannot even inspect it, and says so in one line."""
    with container("--rootfs", str(image_root), "/bin/sh", "-c", "/threads 2; :") as name:
        wait_for(lambda: "ready" in podman("logs", name).stdout.split(), 60, f"{name} ready")
        init = init_pid(name)
        service = int(Path(f"/proc/{init}/task/{init}/children").read_text().split()[0])
        for pid, init_of_ns in ((init, True), (service, False)):
            proc = _check(pid)
            assert proc.returncode == 0, proc.stderr
            data = json.loads(proc.stdout)
            assert data["process"]["pid_namespace_init"] is init_of_ns
            assert data["process"]["seccomp"] == 2
            assert data["method_clone"] == {"can": True, "refusals": [], "auto": True}
            assert data["method_criu"] == {"can": True, "refusals": [], "auto": False}

        # without CAP_SYS_ADMIN even inspecting it fails (setns() into its namespaces), in one
        # line with a true hint, before anything is frozen
        for argv in (
            [*NO_SYS_ADMIN, str(TOOL), "check", "--pid", str(service)],
            [*NO_SYS_ADMIN, str(TOOL), "dump", str(service), "-o", str(tmp_path / "core")],
        ):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            assert out.returncode == 4, out.stderr
            assert out.stderr.splitlines()[-2:] == [
                f"error: process {service}: entering its uts namespace to inspect it needs"
                " CAP_SYS_ADMIN",
                "hint: run as root with CAP_SYS_ADMIN",
            ]
        assert not (tmp_path / "core").exists()
        assert _state(service) == "S"

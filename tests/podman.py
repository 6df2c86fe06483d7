"""Real Podman containers for the tests, built without any registry, always removed.

Podman runs here only as ``podman --runtime runc --cgroup-manager cgroupfs`` with lowered
rlimits (crun fails on this cgroup v1 hybrid; raised rlimits are refused to a root without
CAP_SYS_RESOURCE). A container's root filesystem is a directory assembled from host binaries
and the libraries they load (:func:`rootfs`), run with ``--rootfs`` (no image), or a tarball
given to ``podman import``. The kernel's core of a container's process comes through a ``|``
core_pattern handler (:class:`harness.kernel.CorePipe`: a file pattern would name a path
inside the container); a container's main process needs :func:`kernel_core_of_init`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.kernel import CoreDestination
from syslock import core_pattern

from converters.arch import x86_64
from criu_livedump.linux import ptrace
from criu_livedump.linux.ptrace import Opt
from criu_livedump.snapshot.clone import inject

RUNC = Path("/usr/sbin/runc")
PODMAN = ("podman", "--runtime", str(RUNC), "--cgroup-manager", "cgroupfs")
RUN_OPTIONS = ("--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
TIMEOUT = 60.0


def podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` (with this host's runtime options); fail the test on an error."""
    proc = subprocess.run(
        [*PODMAN, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def require_podman() -> None:
    """Skip, saying why, where Podman cannot run at all."""
    if os.geteuid() != 0:
        pytest.skip("needs root: podman containers and core_pattern")
    if shutil.which("podman") is None or not RUNC.exists():
        pytest.skip("podman or runc is not installed (make setup installs them)")
    probe = podman("info", check=False)
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        pytest.skip(f"podman cannot run here: {lines[-1] if lines else probe.returncode}")


_LDD_PATH = re.compile(r"(/\S+) \(0x[0-9a-f]+\)$")


def _libraries(binary: Path) -> set[Path]:
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return {Path(m.group(1)) for line in out.splitlines() if (m := _LDD_PATH.search(line.strip()))}


def rootfs(directory: Path, files: dict[str, Path]) -> Path:
    """A root filesystem in *directory*: each ``{path inside: host file}`` of *files* and every
    library those files load, at the paths the host has them.

    :returns: *directory*.
    """
    for sub in ("etc", "proc", "sys", "dev", "run", "tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    wanted = {inside.lstrip("/"): host for inside, host in files.items()}
    for host in files.values():
        for lib in _libraries(host):
            wanted.setdefault(str(lib).lstrip("/"), lib)
    for inside, host in wanted.items():
        dest = directory / inside
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(host), dest)
    return directory


@contextlib.contextmanager
def container(*run_args: str, prefix: str = "criu-livedump-test") -> Iterator[str]:
    """``podman run -d RUN_ARGS`` under a fresh name; the container is removed on exit."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    try:
        podman("run", "-d", "--name", name, *RUN_OPTIONS, *run_args)
        yield name
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def init_pid(name: str) -> int:
    """The host pid of the container's main process (PID 1 inside)."""
    return int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)


def kernel_core_of_init(pid: int, destination: CoreDestination) -> Path:
    """The kernel's own core of *pid*, the init of a PID namespace, which ignores SIGABRT:
    :func:`seccomp_abort` under *destination*'s core_pattern (see
    :func:`harness.kernel.kernel_core_of` for any other process)."""
    with core_pattern(destination.pattern()):
        seccomp_abort(pid)
        return destination.collect(pid)


# --- the kernel's core of a PID namespace's init -------------------------------------------------

#: arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/linux/prctl.h, seccomp.h, filter.h
_SYS_PRCTL, _SYS_SECCOMP = 157, 317
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_BPF_RET_K = 0x06
_SECCOMP_RET_KILL_PROCESS = 0x80000000
#: struct sock_fprog {u16 len; struct sock_filter *filter} and one struct sock_filter
_FPROG = struct.Struct("<H6xQ")
_FILTER = struct.Struct("<HBBI")
#: below the thread's stack pointer and its 128-byte red zone (x86-64 psABI)
_SCRATCH_BELOW_SP = 512


def seccomp_abort(pid: int) -> None:
    """Make the init of a PID namespace dump core as it is, from outside.

    The init ignores every signal it has no handler for, even from an ancestor namespace,
    SIGKILL and SIGSTOP aside (kernel/signal.c: sig_task_ignored(), get_signal(): its
    SIGNAL_UNKILLABLE), so SIGABRT gives no core. A seccomp kill does: its main thread, blocked
    in a restartable syscall, gets a one-instruction filter (SECCOMP_RET_KILL_PROCESS for
    everything) through injected prctl(PR_SET_NO_NEW_PRIVS) and seccomp() calls, and then
    restarts its syscall, which kills the process with SIGSYS and a core
    (kernel/seccomp.c: __seccomp_filter() calls syscall_rollback(), so the registers are those
    of the syscall entry: the same rip, rax the syscall number). The filter's bytes are written
    below the stack pointer and put back before the thread runs again.
    """
    tid = pid
    ptrace.seize(tid)
    try:
        ptrace.interrupt(tid)
        if not inject._wait_stopped(tid, time.monotonic() + TIMEOUT):
            raise AssertionError(f"process {pid} exited before it could be stopped")
        saved = ptrace.get_regs(tid)
        mask = ptrace.get_sigmask(tid)
        regs = x86_64.unpack_regs(saved)
        assert regs["orig_rax"] < 1 << 63, "the init's main thread is not blocked in a syscall"
        ip = inject._syscall_at_pc(pid, saved)
        assert ip is not None, "no syscall instruction before the main thread's pc"
        scratch = (regs["rsp"] - _SCRATCH_BELOW_SP) & ~15
        blob = _FPROG.pack(1, scratch + _FPROG.size) + _FILTER.pack(
            _BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS
        )
        ptrace.set_options(tid, Opt.TRACESYSGOOD | Opt.SUSPEND_SECCOMP)
        ptrace.set_sigmask(tid, (1 << 64) - 1)
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        try:
            old = os.pread(fd, len(blob), scratch)
            os.pwrite(fd, blob, scratch)
            try:
                for nr, args in (
                    (_SYS_PRCTL, (_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)),
                    (_SYS_SECCOMP, (_SECCOMP_SET_MODE_FILTER, 0, scratch)),
                ):
                    call = x86_64.syscall_regs(saved, ip, nr, args)
                    ret, _ = inject._run_syscall(tid, call)
                    assert ret == 0, f"injected syscall {nr}: {os.strerror(-ret)}"
            finally:
                os.pwrite(fd, old, scratch)
        finally:
            os.close(fd)
        ptrace.set_regs(tid, x86_64.resume_regs(saved))
        ptrace.set_sigmask(tid, mask)
        ptrace.set_options(tid, Opt(0))
    finally:
        with contextlib.suppress(ptrace.PtraceError):
            ptrace.detach(tid)

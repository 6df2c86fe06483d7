"""target.inspect() on real processes: facts read back as set, each CRIU blocker found, and the
kernel's ptrace rules. Every process started here is killed in a finally."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from programs import build as programs_build

from criu_livedump.errors import BlockerError, PermissionDeniedError, TargetError
from criu_livedump.request import UNLIMITED
from criu_livedump.target import (
    GHOST_LIMIT,
    BlockerKind,
    CallerCreds,
    Ids,
    TargetFacts,
    caller_creds,
    check_blockers,
    check_ptrace_allowed,
    inspect,
)

CRIU = Path("/usr/local/sbin/criu")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
NOBODY = 65534


def build(name: str) -> Path:
    """tests/programs/blockers/NAME.c, built when stale."""
    return programs_build.build(f"blockers/{name}")


@contextmanager
def running(argv: Sequence[str], **kw: object) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Start *argv* in its own process group, wait for its first stdout line, kill the group."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,  # type: ignore[call-overload]
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", f"{argv[0]} did not start: {line}"
        yield proc, line
    finally:
        with_suppress_kill(proc.pid)
        proc.wait()


def with_suppress_kill(pgid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


SLEEPER = ["sh", "-c", "echo ready; exec sleep 600"]


# --- facts -----------------------------------------------------------------------------------


def test_facts_of_a_plain_process(tmp_path: Path) -> None:
    threads = (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
        "print('ready', flush=True); time.sleep(600)\n"
    )
    with running([sys.executable, "-c", threads], cwd=tmp_path) as (proc, _):
        f = inspect(proc.pid)
        assert f.pid == proc.pid
        assert f.ns_pid == proc.pid
        assert f.nstgid == (proc.pid,)
        assert f.ppid == os.getpid()
        assert f.exe == os.path.realpath(sys.executable)
        assert f.cmdline == (sys.executable, "-c", threads)
        assert f.uids == Ids(*os.getresuid(), os.getuid())
        assert f.gids == Ids(*os.getresgid(), os.getgid())
        assert f.dumpable == 1
        assert f.cwd == str(tmp_path)
        assert f.root == "/"
        assert f.same_mnt_ns
        assert len(f.threads) == 4
        assert f.threads[0] == proc.pid
        assert f.state in ("S", "R")
        assert f.tracer_pid == 0
        assert f.seccomp == 0
        assert f.nodename == os.uname().nodename
        assert 0 <= f.cpu < (os.cpu_count() or 1)
        assert f.rss > 1 << 20
        assert f.tree == (proc.pid,)
        assert f.blockers == ()
        assert check_blockers(f) == ()
        assert f.comm == Path(sys.executable).name[:15]


@pytest.mark.parametrize(
    ("limits", "expected"),
    [((0, 0), (0, 0)), ((4096, 8192), (4096, 8192)), ((-1, -1), (UNLIMITED, UNLIMITED))],
)
def test_rlimit_core(limits: tuple[int, int], expected: tuple[int, int]) -> None:
    soft, hard = (resource.RLIM_INFINITY if x == -1 else x for x in limits)
    if hard == resource.RLIM_INFINITY and resource.getrlimit(resource.RLIMIT_CORE)[1] != hard:
        pytest.skip("cannot raise the hard core limit here")

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))

    with running(SLEEPER, preexec_fn=set_limit) as (proc, _):
        f = inspect(proc.pid)
        assert (f.core_soft, f.core_hard) == expected


def test_coredump_filter_read_back() -> None:
    with running(SLEEPER) as (proc, _):
        Path(f"/proc/{proc.pid}/coredump_filter").write_text("0x7f")
        assert inspect(proc.pid).coredump_filter == 0x7F


def test_traced_target_is_a_blocker() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    ptrace_seize, ptrace_detach = 0x4206, 17
    with running(SLEEPER) as (proc, _):
        if libc.ptrace(ptrace_seize, proc.pid, None, None) != 0:
            pytest.skip(f"cannot seize: {os.strerror(ctypes.get_errno())}")
        try:
            f = inspect(proc.pid)
            assert f.tracer_pid == os.getpid()
            (b,) = f.refusals
            assert b.kind == BlockerKind.TRACED
            with pytest.raises(BlockerError, match=f"being traced by process {os.getpid()}"):
                check_blockers(f)
        finally:
            libc.ptrace(ptrace_detach, proc.pid, None, None)


@needs_root
def test_nodename_of_another_uts_namespace() -> None:
    script = "hostname other-uts-host; echo ready; exec sleep 600"
    with running(["unshare", "--uts", "sh", "-c", script]) as (proc, _):
        assert inspect(proc.pid).nodename == "other-uts-host"


# --- errors ----------------------------------------------------------------------------------


def test_no_such_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(TargetError, match=f"process {proc.pid}: no such process"):
        inspect(proc.pid)


def test_zombie_is_refused() -> None:
    proc = subprocess.Popen(["true"])
    try:
        for _ in range(1000):
            if Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "Z":
                break
            time.sleep(0.01)
        with pytest.raises(TargetError, match="is a zombie"):
            inspect(proc.pid)
    finally:
        proc.wait()


def test_kernel_thread_is_refused() -> None:
    with pytest.raises(TargetError, match="process 2: is a kernel thread"):
        inspect(2)


def test_thread_id_is_refused() -> None:
    script = (
        "import threading, time, os\n"
        "threading.Thread(target=lambda: (print('ready', threading.get_native_id(), flush=True),"
        " time.sleep(600)), daemon=True).start()\ntime.sleep(600)\n"
    )
    with running([sys.executable, "-c", script]) as (proc, line):
        tid = int(line[1])
        with pytest.raises(TargetError, match=f"is a thread of process {proc.pid}"):
            inspect(tid)


# --- blockers --------------------------------------------------------------------------------


def test_io_uring() -> None:
    with running([str(build("io_uring"))]) as (proc, _):
        f = inspect(proc.pid)
        kinds = {b.kind for b in f.blockers}
        assert kinds == {BlockerKind.IO_URING}
        assert all(b.refuse for b in f.blockers)
        with pytest.raises(BlockerError) as e:
            check_blockers(f)
        assert str(e.value).startswith(f"process {proc.pid}: cannot be dumped: fd 3 is an io_uring")
        assert "which CRIU 4.2 cannot checkpoint" in str(e.value)


def test_sysv_shm_in_the_host_ipc_namespace() -> None:
    with running([str(build("sysv_shm"))]) as (proc, line):
        f = inspect(proc.pid)
        (b,) = f.blockers
        assert b.kind == BlockerKind.SYSV_SHM
        assert b.refuse
        assert f"segment {line[1]} " in b.detail
        assert "host IPC namespace" in b.detail
        with pytest.raises(BlockerError, match="SysV shared memory"):
            check_blockers(f)


@needs_root
def test_sysv_shm_in_its_own_ipc_namespace_is_fine() -> None:
    with running(["unshare", "--ipc", str(build("sysv_shm"))]) as (proc, _):
        assert inspect(proc.pid).blockers == ()


@needs_root
def test_pid_namespace_member_but_not_its_init() -> None:
    with running([str(build("pidns"))]) as (_, line):
        init, member = int(line[1]), int(line[2])
        f = inspect(member)
        assert f.nstgid == (member, 2)
        assert f.ns_pid == 2
        # not a blocker: CRIU dumps it from inside its namespace
        assert f.blockers == ()
        assert f.in_child_pid_ns and not f.pid_ns_init
        g = inspect(init)
        assert g.nstgid == (init, 1)
        assert g.blockers == ()
        assert g.in_child_pid_ns and g.pid_ns_init
        assert not inspect(os.getpid()).in_child_pid_ns


@needs_root
def test_session_led_from_outside_the_pid_namespace() -> None:
    """Without setsid() in the namespace, its processes keep a session whose leader they cannot
    see: getsid() is 0 for them and CRIU refuses them (tests/test_foreign_session.py)."""
    with running([str(build("pidns")), "foreign"]) as (_, line):
        init, member = int(line[1]), int(line[2])
        g = inspect(init)
        assert [b.kind for b in g.blockers] == [BlockerKind.FOREIGN_SESSION]
        with pytest.raises(BlockerError, match="its session leader is outside its PID namespace"):
            check_blockers(g)
        f = inspect(member)
        assert [b.kind for b in f.blockers] == [BlockerKind.FOREIGN_SESSION]


def _deleted_file_option(pid: int, fd: int) -> str:
    ino = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    mnt = next(
        int(ln.split()[1])
        for ln in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
        if ln.startswith("mnt_id:")
    )
    return f"--external=file[{mnt:x}:{ino:x}]"


def test_deleted_files_above_the_ghost_limit() -> None:
    with (
        tempfile.TemporaryDirectory(dir="/var/tmp") as d,
        running([str(build("deleted_file")), d]) as (proc, line),
    ):
        f = inspect(proc.pid)
        assert {b.kind for b in f.blockers} == {BlockerKind.DELETED_FILE}
        by_what = {b.detail.split(" is the deleted file ")[0]: b for b in f.blockers}
        # the big open file and the big mapping; the 4 KiB one is below the limit
        assert len(f.blockers) == 2
        fd_blocker = by_what[f"fd {line[1]}"]
        assert fd_blocker.criu_options == (_deleted_file_option(proc.pid, int(line[1])),)
        assert f"{d}/big-open of {2 << 20} bytes" in fd_blocker.detail
        assert f"ghost limit of {GHOST_LIMIT} bytes" in fd_blocker.detail
        (map_blocker,) = (b for b in f.blockers if b is not fd_blocker)
        assert map_blocker.detail.startswith("the mapping at 0x")
        assert f"{d}/big-mapped" in map_blocker.detail
        assert not any(b.refuse for b in f.blockers)
        assert check_blockers(f) == fd_blocker.criu_options + map_blocker.criu_options


def test_unix_socket_peer_outside_the_tree() -> None:
    with running([str(build("unix_peer")), "outside"]) as (proc, line):
        stream_fd, dgram_fd = int(line[2]), int(line[3])
        f = inspect(proc.pid, tree=True)
        assert [b.kind for b in f.blockers] == [BlockerKind.EXTERNAL_UNIX] * 2
        stream_ino = os.stat(f"/proc/{proc.pid}/fd/{stream_fd}").st_ino
        dgram_ino = os.stat(f"/proc/{proc.pid}/fd/{dgram_fd}").st_ino
        assert check_blockers(f) == (
            f"--external=unix[{stream_ino}]",
            f"--external=unix[{dgram_ino}]",
        )
        assert (
            f"fd {stream_fd} is a stream unix socket (inode {stream_ino})" in f.blockers[0].detail
        )


def test_unix_socket_peer_is_a_child() -> None:
    with running([str(build("unix_peer")), "child"]) as (proc, line):
        peer = int(line[1])
        assert len(inspect(proc.pid).blockers) == 2  # the child is outside a target-only dump
        f = inspect(proc.pid, tree=True)
        assert f.tree == (proc.pid, peer)
        assert f.blockers == ()


@needs_root
def test_unix_socket_peers_in_another_network_namespace() -> None:
    with running(["unshare", "--net", str(build("unix_peer")), "outside"]) as (proc, _):
        f = inspect(proc.pid)
        assert [b.kind for b in f.blockers] == [BlockerKind.EXTERNAL_UNIX] * 2


# --- CRIU agrees -----------------------------------------------------------------------------


def _criu_dump(pid: int, options: Sequence[str]) -> tuple[int, str]:
    images = Path(tempfile.mkdtemp(prefix="target-test-", dir="/var/tmp"))
    try:
        argv = [str(CRIU), "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log"]
        argv += ["--leave-running", "--shell-job", *options]
        rc = subprocess.run(argv, capture_output=True, check=False).returncode
        log = (images / "dump.log").read_text(errors="replace")
        return rc, log
    finally:
        shutil.rmtree(images, ignore_errors=True)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]


@pytest.mark.live
@pytest.mark.skipif(not (ROOT and CRIU.exists()), reason="needs root and CRIU")
@pytest.mark.parametrize("program", ["deleted_file", "unix_peer"])
def test_criu_fails_without_the_options_and_dumps_with_them(program: str) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        argv = [str(build(program)), d] if program == "deleted_file" else [str(build(program))]
        with running(argv) as (proc, _):
            options = check_blockers(inspect(proc.pid))
            assert options
            rc, log = _criu_dump(proc.pid, [])
            assert rc != 0, "CRIU dumped without the options: the blocker is not one"
            assert _state(proc.pid) in ("S", "R")
            rc, log = _criu_dump(proc.pid, options)
            assert rc == 0, log[-2000:]
            assert _state(proc.pid) in ("S", "R")


# --- dumpability and ptrace rules ------------------------------------------------------------


def test_non_dumpable_target() -> None:
    with running([str(build("nondumpable"))]) as (proc, _):
        f = inspect(proc.pid)
        assert f.dumpable == 0
        with pytest.raises(PermissionDeniedError) as e:
            check_ptrace_allowed(f)
        assert str(e.value) == (
            f"process {proc.pid} (nondumpable) is not dumpable: its core dumps are disabled;"
            " use --force to dump it anyway (the core will be owned by root, mode 0600)"
        )
        if ROOT:
            check_ptrace_allowed(f, force=True)


def _caller(uid: int, gid: int, caps: int = 0, user_ns: int | None = None) -> CallerCreds:
    ns = caller_creds().user_ns if user_ns is None else user_ns
    return CallerCreds(
        pid=os.getpid(),
        uids=Ids(uid, uid, uid, uid),
        gids=Ids(gid, gid, gid, gid),
        cap_prm=caps,
        cap_eff=caps,
        user_ns=ns,
    )


@needs_root
def test_target_owned_by_another_uid() -> None:
    with running(SLEEPER, user=NOBODY, group=NOBODY) as (proc, _):
        f = inspect(proc.pid)
        assert f.uids == Ids(NOBODY, NOBODY, NOBODY, NOBODY)
        assert f.dumpable == 1
        check_ptrace_allowed(f)  # root: CAP_SYS_PTRACE
        check_ptrace_allowed(f, caller=_caller(NOBODY, NOBODY))  # same ids, no extra caps
        with pytest.raises(PermissionDeniedError) as e:
            check_ptrace_allowed(f, caller=_caller(1000, 1000))
        assert str(e.value).endswith(
            f"runs as uid {NOBODY}/{NOBODY}/{NOBODY} gid {NOBODY}/{NOBODY}/{NOBODY}; attaching to"
            " it as uid 1000 gid 1000 needs CAP_SYS_PTRACE"
        )
        check_ptrace_allowed(f, caller=_caller(1000, 1000, caps=1 << 19))


def _fake(**changes: object) -> TargetFacts:
    with running(SLEEPER) as (proc, _):
        f = inspect(proc.pid)
    return dataclasses.replace(f, **changes)  # type: ignore[arg-type]


def test_target_with_more_capabilities_than_the_caller() -> None:
    f = _fake(uids=Ids(5, 5, 5, 5), gids=Ids(5, 5, 5, 5), cap_prm=1 << 12)
    with pytest.raises(PermissionDeniedError, match="has capabilities the caller lacks"):
        check_ptrace_allowed(f, caller=_caller(5, 5))
    check_ptrace_allowed(f, caller=_caller(5, 5, caps=1 << 12))


def test_mixed_saved_uid_needs_cap_sys_ptrace() -> None:
    f = _fake(uids=Ids(5, 5, 0, 5), gids=Ids(5, 5, 5, 5), cap_prm=0)
    with pytest.raises(PermissionDeniedError, match="runs as uid 5/5/0"):
        check_ptrace_allowed(f, caller=_caller(5, 5))


def test_caller_cannot_dump_itself() -> None:
    f = dataclasses.replace(_fake(), pid=os.getpid())
    with pytest.raises(PermissionDeniedError, match="is this tool itself"):
        check_ptrace_allowed(f)


@needs_root
def test_target_in_a_child_user_namespace() -> None:
    argv = ["unshare", "--user", "--map-root-user", *SLEEPER]
    with running(argv) as (proc, _):
        f = inspect(proc.pid)
        assert f.user_ns != caller_creds().user_ns
        check_ptrace_allowed(f)  # CAP_SYS_PTRACE in an ancestor namespace
        # the owner of the namespace (root made it) has every capability in it
        check_ptrace_allowed(f, caller=_caller(0, 0))
        with pytest.raises(PermissionDeniedError):
            check_ptrace_allowed(f, caller=_caller(1000, 1000))


@needs_root
def test_file_from_outside_its_mount_namespace_is_declared_external() -> None:
    """stdin opened before the target entered a mount namespace of its own: CRIU cannot place
    that mount ("Can't lookup mount") unless the file is declared external."""
    script = "print('ready', flush=True); import time; time.sleep(600)"
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script]
    with running(argv) as (proc, _):
        f = inspect(proc.pid)
        (b,) = [b for b in f.blockers if b.detail.startswith("fd 0 ")]
        ino = os.stat(f"/proc/{proc.pid}/fd/0").st_ino
        fdinfo = Path(f"/proc/{proc.pid}/fdinfo/0").read_text()
        mnt = int(next(ln for ln in fdinfo.splitlines() if ln.startswith("mnt_id:")).split()[1])
        assert b.kind == BlockerKind.FOREIGN_MOUNT
        assert b.criu_options == (f"--external=file[{mnt:x}:{ino:x}]",)
        assert b.detail.startswith(f"fd 0 is /dev/null on mount {mnt}, which its mount namespace")
        assert b.criu_options[0] in check_blockers(f)

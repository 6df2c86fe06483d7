"""``criu-livedump dump`` on real processes: the target keeps running, the core is the kernel's,
options and limits act as the kernel patch's, refusals happen before anything is frozen."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import procs
import pytest
from harness.compare import compare_cores
from harness.corefile import CoreView
from harness.gdb import gdb_backtraces, gdb_lwps
from harness.kernel import kernel_core
from harness.launcher import start_target
from programs import build as programs_build
from syslock import core_pattern

from criu_livedump import conversion_child as job
from criu_livedump.cli import ExitStatus
from criu_livedump.linux.procfs import read_stat

pytestmark = [pytest.mark.live]

EXE = Path(sys.executable).parent / "criu-livedump"
REAL_CRIU = "/usr/local/sbin/criu"
PAGE = os.sysconf("SC_PAGE_SIZE")
#: one name per test run: suites of other checkouts may run beside this one
TEST_USER = f"cld-dumptest{os.getpid()}"


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU dump)")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return procs.run([str(EXE), *args], env={**os.environ, **(env or {})})


def report(proc: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def tids(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def recording_criu(tmp_path: Path) -> Path:
    """A --criu that records its own nice and ioprio (criu-calls), its autogroup's nice
    (criu-autogroup) and the nice of the process it is to dump (criu-dumped), then runs the
    real CRIU."""
    path = tmp_path / "criu-recorder"
    path.write_text(
        "#!/bin/bash\n"
        f'echo "$1 $(cut -d" " -f19 /proc/$$/stat) $(ionice -p $$)" >> {tmp_path}/criu-calls\n'
        f'[ "$1" = dump ] && cut -d" " -f3 /proc/$$/autogroup >> {tmp_path}/criu-autogroup\n'
        'prev=; for a in "$@"; do [ "$prev" = -t ] && t=$a; prev=$a; done\n'
        f'[ -n "$t" ] && cut -d" " -f19 /proc/$t/stat >> {tmp_path}/criu-dumped\n'
        f'exec {REAL_CRIU} "$@"\n'
    )
    path.chmod(0o755)
    return path


def criu_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "criu-calls"
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The demo program (4 threads), RLIMIT_CORE unlimited, cwd in tmp_path."""
    binary = programs_build.build("demo")
    proc = subprocess.Popen(
        [binary],
        stdout=subprocess.PIPE,
        cwd=tmp_path,
        preexec_fn=lambda: resource.setrlimit(  # noqa: PLW1509
            resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        ),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"ready")
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def set_core_limit(pid: int, soft: int, hard: int = resource.RLIM_INFINITY) -> None:
    resource.prlimit(pid, resource.RLIMIT_CORE, (soft, hard))


# --- the main promise ---------------------------------------------------------------------------


def test_dump_leaves_target_running_and_gdb_sees_every_thread(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    before = tids(demo.pid)
    core = tmp_path / "out" / "demo.core"
    core.parent.mkdir()
    data = report(cli("dump", str(demo.pid), "-o", str(core), "--json"))
    assert demo.poll() is None
    assert state(demo.pid) in ("S", "R")
    assert tids(demo.pid) == before
    assert data["core_path"] == str(core)
    assert data["size"] == core.stat().st_size > 0
    assert isinstance(data["frozen_time_us"], int) and data["frozen_time_us"] > 0
    assert data["images_dir"] is None
    st = core.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert len(gdb_lwps(programs_build.build("demo"), core)) == len(before)
    # scratch removed: nothing of ours left in the scratch locations
    assert not [
        p
        for p in Path("/dev/shm").glob("criu-livedump.*")
        if p.stat().st_uid == 0 and str(demo.pid) in "".join(os.listdir(p))
    ]


def test_clone_freeze_reported_in_its_steps(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """The clone's freeze in --json (its steps, and when it began, on the clock the target's
    own timing uses) and in one -v line."""
    core = tmp_path / "demo.core"
    before = time.monotonic_ns()
    proc = cli("-v", "dump", str(demo.pid), "-o", str(core), "--method", "clone", "--json")
    after = time.monotonic_ns()
    data = report(proc)
    steps = data["freeze_steps_us"]
    assert isinstance(steps, dict) and set(steps) == {"stop", "save", "fork", "resume"}
    assert all(isinstance(us, int) and us > 0 for us in steps.values()), steps
    frozen = data["frozen_time_us"]
    assert isinstance(frozen, int) and abs(sum(steps.values()) - frozen) <= len(steps)
    start = data["freeze_start_monotonic_ns"]
    assert isinstance(start, int) and before < start < start + frozen * 1000 < after
    info = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("info:")]
    assert any(" ms: stop " in ln and ", resume " in ln for ln in info), info


@pytest.mark.kernel
def test_core_matches_the_kernels(tmp_path: Path) -> None:
    """Same threads, registers, PT_LOADs, bytes and gdb backtraces as the kernel's own core."""
    binary = programs_build.build("threads")
    target = start_target(binary, "8", settle=True)
    try:
        ours = tmp_path / "ours.core"
        data = report(
            cli(
                "dump",
                str(target.pid),
                "core_limit=unlimited",
                "--signal",
                "6",
                "-o",
                str(ours),
                "--json",
            )
        )
        assert data["core_path"] == str(ours)
        kernel = kernel_core(target, tmp_path / "kernel")
        with CoreView(ours) as mine, CoreView(kernel) as theirs:
            assert compare_cores(mine, theirs, maps=target.maps, rseq=target.rseq) == []
        assert gdb_backtraces(binary, ours) == gdb_backtraces(binary, kernel)
    finally:
        target.close()


def test_keep_images(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    data = report(
        cli(
            "dump",
            str(demo.pid),
            "-o",
            str(tmp_path / "c"),
            "--keep-images",
            "--scratch",
            str(tmp_path),
            "--json",
        )
    )
    images = Path(str(data["images_dir"]))
    assert images.parent.parent == tmp_path
    assert stat.S_IMODE(images.parent.stat().st_mode) == 0o700
    assert (images / "pstree.img").is_file()
    sidecar = json.loads((images / "livedump.json").read_text())
    assert sidecar["coredump_filter"] == int(
        Path(f"/proc/{demo.pid}/coredump_filter").read_text(), 16
    )
    assert sidecar["core_limit"] == -1
    assert sidecar["signal"] == 0
    assert sidecar["version"] == 2
    assert sidecar["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert "pid" not in sidecar  # written and never read before version 2
    assert set(sidecar["times"]) == {str(t) for t in tids(demo.pid)} | {"children"}


def test_scratch_removed_without_keep(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    report(
        cli("dump", str(demo.pid), "-o", str(tmp_path / "c"), "--scratch", str(scratch), "--json")
    )
    assert list(scratch.iterdir()) == []


def test_stdout_output(demo: subprocess.Popen[bytes]) -> None:
    proc = cli("dump", str(demo.pid), "-o", "-")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:4] == b"\x7fELF"
    assert b"core written to -" in proc.stderr


def test_existing_destination_refused(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    existing = tmp_path / "core"
    existing.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    for dest in (existing, link):
        proc = cli("dump", str(demo.pid), "-o", str(dest), "--criu", str(recording_criu(tmp_path)))
        assert proc.returncode == ExitStatus.STORAGE
        assert proc.stderr.decode().startswith(f"error: {dest}: already exists")
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "elsewhere").exists()
    assert criu_calls(tmp_path) == []


# --- RLIMIT_CORE --------------------------------------------------------------------------------


def test_core_limit_zero_writes_nothing_and_never_starts_criu(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    set_core_limit(demo.pid, 0)
    out = tmp_path / "c"
    proc = cli("dump", str(demo.pid), "-o", str(out), "--criu", str(recording_criu(tmp_path)))
    assert proc.returncode == 0
    assert "no core written: the core limit (0 bytes) is below one page" in proc.stderr.decode()
    assert not out.exists()
    assert criu_calls(tmp_path) == []


def test_core_limit_small_truncates(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    set_core_limit(demo.pid, 16 * PAGE)
    out = tmp_path / "c"
    data = report(cli("dump", str(demo.pid), "-o", str(out), "--json"))
    assert data["truncated"] is True
    # RLIMIT_CORE counts bytes written, not holes skipped (fs/coredump.c dump_emit() checks the
    # limit, dump_skip_to() does not): the file may be longer, but holds at most the limit.
    assert 0 < out.stat().st_blocks * 512 <= 17 * PAGE
    assert out.read_bytes()[:4] == b"\x7fELF"


def test_core_limit_spec_overrides_target(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    set_core_limit(demo.pid, 0)
    data = report(
        cli("dump", str(demo.pid), "core_limit=unlimited", "-o", str(tmp_path / "c"), "--json")
    )
    assert data["truncated"] is False
    assert data["size"] == (tmp_path / "c").stat().st_size > 16 * PAGE
    # and the flag wins over the SPEC word
    data = report(
        cli(
            "dump",
            str(demo.pid),
            "core_limit=unlimited",
            "--core-limit",
            "8k",
            "-o",
            str(tmp_path / "d"),
            "--json",
        )
    )
    assert data["truncated"] is True
    assert (tmp_path / "d").stat().st_blocks * 512 <= 8192 + PAGE


def test_core_limit_above_hard_needs_cap_sys_resource(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    if procs.has_capability(procs.CAP_SYS_RESOURCE):
        pytest.skip("the caller has CAP_SYS_RESOURCE")
    set_core_limit(demo.pid, PAGE * 4, PAGE * 8)
    proc = cli("dump", str(demo.pid), "core_limit=unlimited", "-o", str(tmp_path / "c"))
    assert proc.returncode == ExitStatus.PERMISSION
    assert "needs CAP_SYS_RESOURCE" in proc.stderr.decode()


# --- priorities ---------------------------------------------------------------------------------


def _paused_dump(
    pid: int, tmp_path: Path, *args: str, wrap: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run a dump whose conversion child waits at the test hook; read its priorities, the nice
    of every thread of the tool's own process then, its report and its stderr (with ``-v``).
    *wrap* runs the tool under another program (setpriv)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    criu = recording_criu(tmp_path)
    proc = procs.popen(
        [
            *wrap,
            str(EXE),
            "-v",
            "dump",
            str(pid),
            *args,
            "-o",
            str(tmp_path / "core"),
            "--criu",
            str(criu),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, job.PAUSE_ENV: str(hook)},
    )
    try:

        def paused() -> bool:
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode() if proc.stderr else "")
            return (hook / "child.pid").exists()

        procs.wait_for(paused, 120, "the conversion child pausing at the hook")
        child = int((hook / "child.pid").read_text())
        tool = next(p for p in procs_below(proc.pid) if p != child and _is_tool(p))
        seen: dict[str, Any] = {
            "child": child,
            "nice": read_stat(f"/proc/{child}/stat").nice,
            "tool_nice": {read_stat(f"/proc/{tool}/task/{t}/stat").nice for t in tids(tool)},
            "ioprio": job.ioprio_get(child),
            "oom_score_adj": int(Path(f"/proc/{child}/oom_score_adj").read_text()),
        }
        (hook / "go").touch()
        out, err = proc.communicate(timeout=procs.RUN_TIMEOUT)
    finally:
        procs.kill_group(proc)
    assert proc.returncode == 0, err.decode()
    seen["report"] = json.loads(out)
    seen["stderr"] = err.decode()
    assert seen["report"]["conversion_pid"] == seen["child"]
    return seen


def procs_below(pid: int) -> list[int]:
    """*pid* and its descendants (the tool under a wrapper that exec'd it is *pid* itself)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return found


def _is_tool(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "criu-livedump" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    return False


def test_spec_priorities_on_conversion_child_and_criu(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    seen = _paused_dump(demo.pid, tmp_path, "sched_prio=5", "io_prio=3", "oom_adj=5")
    assert seen["nice"] == 5
    assert seen["tool_nice"] == {5}
    assert (seen["report"]["nice"], seen["report"]["nice_source"]) == (5, "requested")
    assert seen["ioprio"] == (2 << 13) | 3  # best-effort (the class kept), level 3
    assert seen["oom_score_adj"] == 5 * 1000 // 17
    # CRIU ran with the same nice and I/O priority
    assert [c for c in criu_calls(tmp_path) if c.startswith("dump")] == [
        "dump 5 best-effort: prio 3"
    ]


def test_flag_priorities_win_over_spec(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    seen = _paused_dump(
        demo.pid,
        tmp_path,
        "sched_prio=5",
        "io_prio=3",
        "oom_adj=5",
        "--sched-prio",
        "19",
        "--io-prio",
        "idle",
        "--oom-adj",
        "score:700",
    )
    assert seen["nice"] == 19
    assert seen["tool_nice"] == {19}
    assert seen["ioprio"] == 3 << 13
    assert seen["oom_score_adj"] == 700
    assert [c for c in criu_calls(tmp_path) if c.startswith("dump")] == ["dump 19 idle"]


def test_without_sched_prio_the_capture_runs_below_the_target(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    if not procs.has_capability(procs.CAP_SYS_NICE):
        pytest.skip("lowering a nice needs CAP_SYS_NICE")
    os.setpriority(os.PRIO_PROCESS, demo.pid, 3)  # its main thread: the process's nice in /proc
    seen = _paused_dump(demo.pid, tmp_path)
    assert seen["nice"] == 3 - 10
    assert seen["tool_nice"] == {3 - 10}
    assert (seen["report"]["nice"], seen["report"]["nice_source"]) == (-7, "default")
    assert [c.split()[1] for c in criu_calls(tmp_path) if c.startswith("dump")] == ["-7"]
    # the clone CRIU dumped ran its parasite at it too; the target itself keeps its own
    assert seen["report"]["method"] == "clone"
    assert (tmp_path / "criu-dumped").read_text().split() == ["-7"]
    if Path("/proc/self/autogroup").exists():  # CONFIG_SCHED_AUTOGROUP: CRIU's session's too
        assert (tmp_path / "criu-autogroup").read_text().split() == ["-7"]
    assert os.getpriority(os.PRIO_PROCESS, demo.pid) == 3
    # io_prio and oom_adj not asked for: left alone
    assert seen["oom_score_adj"] == int(Path("/proc/self/oom_score_adj").read_text())


def test_without_cap_sys_nice_the_capture_runs_at_the_callers_nice(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    no_nice = ("setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--")
    seen = _paused_dump(demo.pid, tmp_path, wrap=no_nice)
    assert seen["nice"] == own_nice
    assert seen["tool_nice"] == {own_nice}
    assert (seen["report"]["nice"], seen["report"]["nice_source"]) == (own_nice, "own")
    assert "running it below the target's needs CAP_SYS_NICE" in seen["stderr"]
    assert [c.split()[1] for c in criu_calls(tmp_path) if c.startswith("dump")] == [str(own_nice)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sched_prio=20"], "sched_prio=20"),
        (["io_prio=8"], "io_prio=8"),
        (["oom_adj=16"], "oom_adj=16"),
        (["core_limit=lots"], "core_limit=lots"),
        (["colour=blue"], "colour=blue"),
        (["--sched-prio", "x"], "--sched-prio x"),
        (["--io-prio", "rt:9"], "--io-prio rt:9"),
        (["--oom-adj", "score:2000"], "--oom-adj score:2000"),
        (["--coredump-filter", "0x400"], "--coredump-filter 0x400"),
        (["--pre-dump", "-1"], "--pre-dump -1"),
    ],
)
def test_invalid_values_refused_before_criu(
    demo: subprocess.Popen[bytes], tmp_path: Path, args: list[str], message: str
) -> None:
    proc = cli("dump", str(demo.pid), *args, "--criu", str(recording_criu(tmp_path)))
    assert proc.returncode == ExitStatus.USAGE
    (line, *_) = proc.stderr.decode().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert criu_calls(tmp_path) == []


def test_coredump_filter_recorded_and_overridden(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    Path(f"/proc/{demo.pid}/coredump_filter").write_text("0x3f")
    data = report(
        cli(
            "dump",
            str(demo.pid),
            "-o",
            str(tmp_path / "a"),
            "--keep-images",
            "--scratch",
            str(tmp_path),
            "--json",
        )
    )
    sidecar = json.loads((Path(str(data["images_dir"])) / "livedump.json").read_text())
    assert sidecar["coredump_filter"] == 0x3F
    # 0x0 dumps no anonymous memory at all: the core shrinks to headers, notes and the vDSO.
    small = report(
        cli("dump", str(demo.pid), "--coredump-filter", "0", "-o", str(tmp_path / "b"), "--json")
    )
    assert int(str(small["size"])) < int(str(data["size"]))


# --- core_pattern -------------------------------------------------------------------------------


def test_core_pattern_relative(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    with core_pattern("core.%p.%e"):
        data = report(cli("dump", str(demo.pid), "--json"))
    expected = tmp_path / f"core.{demo.pid}.demo"
    assert data["core_path"] == str(expected)
    assert expected.is_file()


def test_core_pattern_uses_pid(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    with core_pattern("core", uses_pid=1):
        report(cli("dump", str(demo.pid), "--json"))
    assert (tmp_path / f"core.{demo.pid}").is_file()


def test_core_pattern_absolute_with_specifiers(
    demo: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    out = tmp_path / "cores"
    out.mkdir()
    with core_pattern(f"{out}/%e-%p-%u-%g-%s-%%"):
        report(cli("dump", str(demo.pid), "--signal", "3", "--json"))
    assert [p.name for p in out.iterdir()] == [f"demo-{demo.pid}-0-0-3-%"]


def test_core_pattern_pipe(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    handler = tmp_path / "handler.sh"
    handler.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {tmp_path}/argv\n'
        f"pwd > {tmp_path}/cwd\n"
        f"cat > {tmp_path}/stdin\n"
    )
    handler.chmod(0o755)
    # A small limit does not apply to pipes (only the value 1 does).
    set_core_limit(demo.pid, 2 * PAGE)
    with core_pattern(f"|{handler} %p %e %s"):
        data = report(cli("dump", str(demo.pid), "--json"))
    assert (tmp_path / "argv").read_text().split("\n")[:-1] == [str(demo.pid), "demo", "0"]
    assert (tmp_path / "cwd").read_text() == "/\n"
    received = (tmp_path / "stdin").read_bytes()
    assert received[:4] == b"\x7fELF"
    assert len(received) == data["size"] > 2 * PAGE
    assert data["handler_status"] == 0


def test_core_pattern_pipe_limit_one(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    handler = tmp_path / "handler.sh"
    handler.write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    handler.chmod(0o755)
    set_core_limit(demo.pid, 1)
    with core_pattern(f"|{handler}"):
        proc = cli("dump", str(demo.pid), "--criu", str(recording_criu(tmp_path)))
    assert proc.returncode == 0
    assert "disables core_pattern pipe handlers" in proc.stderr.decode()
    assert not (tmp_path / "ran").exists()
    assert criu_calls(tmp_path) == []


def test_core_pattern_pidfd_refused(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    with core_pattern("|/bin/true %F"):
        proc = cli("dump", str(demo.pid), "--criu", str(recording_criu(tmp_path)))
    assert proc.returncode != 0
    assert "%F" in proc.stderr.decode() and "not supported" in proc.stderr.decode()
    assert criu_calls(tmp_path) == []


# --- who may dump what --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_user() -> Iterator[pwd.struct_passwd]:
    """A system user for the test, removed afterwards unless it existed before."""
    try:
        yield pwd.getpwnam(TEST_USER)
        return
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
        check=True,
    )
    try:
        yield pwd.getpwnam(TEST_USER)
    finally:
        subprocess.run(["userdel", TEST_USER], check=False, capture_output=True)


def test_target_of_another_uid(test_user: pwd.struct_passwd, tmp_path: Path) -> None:
    binary = programs_build.build("demo")
    tmp_path.chmod(0o755)
    proc = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={test_user.pw_uid}",
            f"--regid={test_user.pw_gid}",
            "--clear-groups",
            "--",
            str(binary),
        ],
        stdout=subprocess.PIPE,
        cwd="/",
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        before = tids(proc.pid)
        out = tmp_path / "core"
        data = report(cli("dump", str(proc.pid), "core_limit=unlimited", "-o", str(out), "--json"))
        assert proc.poll() is None and state(proc.pid) in ("S", "R")
        st = out.stat()
        assert (st.st_uid, st.st_gid) == (test_user.pw_uid, test_user.pw_gid)
        assert stat.S_IMODE(st.st_mode) == 0o600
        with open("/proc/self/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
        if not eff >> 24 & 1:
            assert data["criu_ran_as"] == (
                f"uid {test_user.pw_uid} gid {test_user.pw_gid} with ambient capabilities"
                " (--unprivileged)"
            )
        assert len(gdb_lwps(binary, out)) == len(before)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def blocker_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    binary = programs_build.build(f"blockers/{request.param}")
    target = start_target(binary, rseq=False)
    try:
        yield target.pid
    finally:
        target.close()


@pytest.mark.parametrize("blocker_target", ["io_uring", "sysv_shm"], indirect=True)
def test_blockers_refused_before_freezing(blocker_target: int, tmp_path: Path) -> None:
    proc = cli(
        "dump",
        str(blocker_target),
        "-o",
        str(tmp_path / "c"),
        "--method",
        "criu",
        "--criu",
        str(recording_criu(tmp_path)),
    )
    assert proc.returncode == ExitStatus.BLOCKED
    (line,) = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: process {blocker_target}: cannot be dumped: ")
    assert criu_calls(tmp_path) == []
    assert state(blocker_target) in ("S", "R")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("method", ["clone", "auto"])
@pytest.mark.parametrize("blocker_target", ["io_uring", "sysv_shm"], indirect=True)
def test_clone_dumps_what_criu_refuses(
    blocker_target: int, method: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    core = tmp_path / "c"
    proc = cli(
        "dump", str(blocker_target), "-o", str(core), "--method", method, "--core-limit",
        "unlimited", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["method"] == "clone"
    assert state(blocker_target) in ("S", "R")
    with CoreView(core) as view:
        names = [f.name for f in view.files]
    sysv = request.node.callspec.params["blocker_target"] == "sysv_shm"
    wanted = "/SYSV" if sysv else "anon_inode:[io_uring]"
    assert any(n.startswith(wanted) for n in names), names
    if sysv:
        # sysv_shm.c fills its 64 KiB segment with 0x5a: those bytes are in the core
        with CoreView(core) as view:
            (seg,) = [f for f in view.files if f.name.startswith("/SYSV")]
            assert view.read(seg.start, 1 << 16) == b"\x5a" * (1 << 16)


@pytest.mark.parametrize("blocker_target", ["nondumpable"], indirect=True)
def test_nondumpable_needs_force(blocker_target: int, tmp_path: Path) -> None:
    proc = cli(
        "dump",
        str(blocker_target),
        "-o",
        str(tmp_path / "c"),
        "--criu",
        str(recording_criu(tmp_path)),
    )
    assert proc.returncode == ExitStatus.PERMISSION
    assert "is not dumpable" in proc.stderr.decode()
    assert criu_calls(tmp_path) == []
    data = report(
        cli(
            "dump",
            str(blocker_target),
            "core_limit=unlimited",
            "--force",
            "-o",
            str(tmp_path / "c"),
            "--json",
        )
    )
    st = (tmp_path / "c").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert data["size"] == st.st_size


def test_no_such_process(tmp_path: Path) -> None:
    proc = cli("dump", "999999999", "-o", str(tmp_path / "c"))
    assert proc.returncode in (ExitStatus.TARGET, ExitStatus.USAGE)
    assert proc.stderr.decode().startswith("error: ")


def test_stopped_target_stays_stopped(demo: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """A target the user stopped is not resumed by the dump (only a stop we caused is undone)."""
    os.kill(demo.pid, signal.SIGSTOP)
    try:
        procs.wait_for(lambda: state(demo.pid) == "T", 30, "the SIGSTOPped target in state T")
        report(cli("dump", str(demo.pid), "-o", str(tmp_path / "c"), "--json"))
        assert state(demo.pid) == "T"
    finally:
        os.kill(demo.pid, signal.SIGCONT)


@pytest.fixture
def process_tree() -> Iterator[tuple[int, list[int]]]:
    """A shell with two sleeping children: (shell pid, children pids)."""
    shell = subprocess.Popen(
        ["bash", "-c", "sleep 300 & sleep 301 & wait"], stdin=subprocess.DEVNULL
    )
    try:
        path = Path(f"/proc/{shell.pid}/task/{shell.pid}/children")
        children: list[int] = []
        children = procs.wait_for(
            lambda: c if len(c := [int(x) for x in path.read_text().split()]) == 2 else [],
            30,
            "the shell's two children",
        )
        yield shell.pid, children
    finally:
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)
        shell.kill()
        shell.wait()


@pytest.mark.parametrize("method", ["auto", "clone"])
def test_tree_writes_a_core_per_process(
    process_tree: tuple[int, list[int]], tmp_path: Path, method: str
) -> None:
    """auto: CRIU's own tree dump (one uid, nothing it refuses); clone: one clone per process,
    the tree's freeze reported once, in its steps."""
    shell, children = process_tree
    out = tmp_path / "core"
    data = report(cli("dump", str(shell), "--tree", "-o", str(out), "--core-limit", "unlimited",
                      "--json", "--method", method))  # fmt: skip
    assert data["method"] == ("criu" if method == "auto" else "clone")
    if method == "clone":
        assert set(data["freeze_steps_us"]) == {"stop", "save", "fork", "resume"}  # type: ignore[arg-type]
        assert all(c["freeze_steps_us"] == {} for c in data["children"])  # type: ignore[union-attr, index]
    got = {c["pid"]: c["core_path"] for c in data["children"]}  # type: ignore[union-attr]
    assert got == {c: f"{out}.{c}" for c in children}
    for c in children:
        info = subprocess.run(
            ["gdb", "-batch", "-nx", "-ex", "info proc", "--core", f"{out}.{c}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert "sleep 30" in info.stdout
    assert state(shell) in ("S", "R") and all(state(c) in ("S", "R") for c in children)


def test_without_tree_only_the_target(process_tree: tuple[int, list[int]], tmp_path: Path) -> None:
    shell, _ = process_tree
    out = tmp_path / "core"
    data = report(cli("dump", str(shell), "-o", str(out), "--core-limit", "unlimited", "--json"))
    assert data["children"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["core"]


def test_tree_refuses_stdout(process_tree: tuple[int, list[int]]) -> None:
    shell, _ = process_tree
    proc = cli("dump", str(shell), "--tree", "-o", "-", "--core-limit", "unlimited")
    assert proc.returncode == ExitStatus.USAGE
    assert proc.stderr.decode().startswith("error: --tree writes one core per process")

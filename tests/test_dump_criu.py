"""The CRIU runner: command lines, the pre-dump chain, stats-dump, and the target left running
whatever CRIU does (fake CRIU scripts stand in for failures real CRIU does not produce on cue)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest

from criu_livedump import conversion_child as job
from criu_livedump.errors import CriuError, TargetDiedError
from criu_livedump.request import DumpRequest, IoClass, IoPrio
from criu_livedump.snapshot import criu
from criu_livedump.snapshot.leave_running import pre_dump_rounds

LIVE = [
    "--leave-running",
    "--tcp-close",
    "--skip-in-flight",
    "--shell-job",
    "--file-locks",
    "--network-lock",
    "skip",
]
FAKE = criu.Criu(Path("/fake/criu"), "test")


def test_dump_argv_always_live_options() -> None:
    argv = criu.dump_argv(FAKE, 42, Path("/s/1"), extra_args=["--x"])
    assert argv == [
        "/fake/criu",
        "dump",
        "-t",
        "42",
        "-D",
        "/s/1",
        "-o",
        "dump.log",
        "-v3",
        *LIVE,
        "--x",
    ]
    assert "--tcp-established" not in argv


def test_criu_logs_debug_lines_when_the_library_does() -> None:
    logger = logging.getLogger("criu_livedump")
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert criu.DumpJob(pid=9, scratch=Path("/s")).verbosity == 3
        logger.setLevel(logging.DEBUG)
        (cmd,) = criu.plan_rounds(FAKE, criu.DumpJob(pid=9, scratch=Path("/s")))
        assert "-v4" in cmd
    finally:
        logger.setLevel(level)


def test_version_asked_once_per_binary_until_it_changes(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "criu"

    def install(ver: str) -> None:
        fake.write_text(f'#!/bin/sh\necho x >> "{calls}"\necho "Version: {ver}"\n')
        fake.chmod(0o755)

    install("4.2.1")
    binary = criu.Criu(fake, "test")
    assert [criu.version(binary) for _ in range(3)] == ["4.2.1"] * 3
    assert calls.read_text().count("x") == 1
    install("4.1.10")  # replaced (an upgrade under a running service)
    assert criu.version(binary) == "4.1.10"
    assert calls.read_text().count("x") == 2


def test_dump_argv_never_tcp_established() -> None:
    with pytest.raises(ValueError, match="never used"):
        criu.dump_argv(FAKE, 42, Path("/s"), extra_args=["--tcp-established"])


def test_pre_dump_chain_commands() -> None:
    cmds = criu.plan_rounds(FAKE, criu.DumpJob(pid=9, scratch=Path("/s"), pre_dump_rounds=2))
    assert [c[1] for c in cmds] == ["pre-dump", "pre-dump", "dump"]
    assert [c[c.index("-D") + 1] for c in cmds] == ["/s/1", "/s/2", "/s/3"]
    assert all("--track-mem" in c for c in cmds)
    prev = [c[c.index("--prev-images-dir") + 1] if "--prev-images-dir" in c else None for c in cmds]
    assert prev == [None, "../1", "../2"]
    assert [c[c.index("-o") + 1] for c in cmds] == ["pre-dump.log", "pre-dump.log", "dump.log"]


def test_no_pre_dump_no_track_mem() -> None:
    (cmd,) = criu.plan_rounds(FAKE, criu.DumpJob(pid=9, scratch=Path("/s")))
    assert "--track-mem" not in cmd
    assert "--prev-images-dir" not in cmd


def test_wrapper_prefixes_every_round() -> None:
    cmds = criu.plan_rounds(
        FAKE, criu.DumpJob(pid=9, scratch=Path("/s"), pre_dump_rounds=1, wrapper=("w", "--"))
    )
    assert all(c[:3] == ["w", "--", "/fake/criu"] for c in cmds)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = procs.popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_state(pid: int, wanted: str) -> None:
    for _ in range(1000):
        if state(pid) == wanted:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached state {wanted}")


def test_ensure_running_continues_a_stopped_target(sleeper: subprocess.Popen[bytes]) -> None:
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_state(sleeper.pid, "T")
    assert criu.ensure_running(sleeper.pid, was_stopped=False) is True
    wait_state(sleeper.pid, "S")


def test_ensure_running_leaves_a_user_stop_alone(sleeper: subprocess.Popen[bytes]) -> None:
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_state(sleeper.pid, "T")
    assert criu.ensure_running(sleeper.pid, was_stopped=True) is False
    assert state(sleeper.pid) == "T"


def fake_criu(tmp_path: Path, body: str) -> criu.Criu:
    """A CRIU stand-in: records its argv, then runs *body* with $ARGS, $PID and $DIR set."""
    path = tmp_path / "criu"
    path.write_text(
        "#!/bin/bash\n"
        f'ARGS="$*"; echo "$ARGS" >> {tmp_path}/calls\n'
        "while [ $# -gt 0 ]; do\n"
        "  case $1 in -t) PID=$2; shift;; -D) DIR=$2; shift;; esac; shift\n"
        "done\n" + body
    )
    path.chmod(0o755)
    return criu.Criu(path, "test")


#: The fake CRIU stops the target and waits until the stop has landed, as the real one has
#: seized and stopped every thread before it can die (a signal is delivered asynchronously).
STOP_TARGET = (
    'kill -STOP "$PID"\n'
    'until grep -q "^State:[[:space:]]*T" "/proc/$PID/status"; do sleep 0.01; done\n'
)


def test_criu_failure_leaves_target_running(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """CRIU dies after stopping the target: the error names the log's Error line, and the
    target runs again."""
    binary = fake_criu(
        tmp_path,
        STOP_TARGET + 'echo "(00.1) Error (criu/cr-dump.c:1): fake failure" > "$DIR/dump.log"\n'
        "exit 1\n",
    )
    with pytest.raises(CriuError) as info:
        criu.dump(binary, criu.DumpJob(pid=sleeper.pid, scratch=tmp_path / "s"))
    assert str(info.value) == (
        "criu dump failed (exit status 1): Error (criu/cr-dump.c:1): fake failure"
    )
    assert info.value.log_path == str(tmp_path / "s" / "1" / "dump.log")
    wait_state(sleeper.pid, "S")


def test_criu_killed(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    binary = fake_criu(tmp_path, STOP_TARGET + "kill -KILL $$\n")
    with pytest.raises(CriuError, match=r"killed by signal 9"):
        criu.dump(binary, criu.DumpJob(pid=sleeper.pid, scratch=tmp_path / "s"))
    wait_state(sleeper.pid, "S")


def test_criu_timeout(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """The time limit kills CRIU and every process of its group (a helper here)."""
    binary = fake_criu(tmp_path, f"sleep 600 & echo $! > {tmp_path}/helper\nexec sleep 600\n")
    with pytest.raises(CriuError, match=r"killed by signal 9.*did not finish within 1 s"):
        criu.dump(binary, criu.DumpJob(pid=sleeper.pid, scratch=tmp_path / "s", timeout=1))
    helper = int((tmp_path / "helper").read_text())
    procs.wait_for(lambda: procs.reaped(helper), 10, f"CRIU's helper {helper} ending")
    assert sleeper.poll() is None


def test_target_gone_under_a_hanging_criu(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """The dumped process dies and CRIU hangs: CRIU is killed after its grace, and the error
    says the process died and how (read from its zombie here: it is our child)."""
    binary = fake_criu(tmp_path, 'kill -KILL "$PID"\nexec sleep 600\n')
    with pytest.raises(TargetDiedError) as info:
        criu.dump(binary, criu.DumpJob(pid=sleeper.pid, scratch=tmp_path / "s", timeout=600))
    assert str(info.value) == (
        f"process {sleeper.pid}: died during the dump (killed by signal 9 (SIGKILL))"
    )


def test_pre_dump_rounds_run_in_order(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """The chain as CRIU would be asked for it (dirty tracking is absent here, so a fake CRIU
    stands in; it writes no stats-dump, which is a warning, not a failure)."""
    binary = fake_criu(tmp_path, "exit 0\n")
    with caplog.at_level(logging.WARNING):
        result = criu.dump(
            binary, criu.DumpJob(pid=sleeper.pid, scratch=tmp_path / "s", pre_dump_rounds=2)
        )
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["pre-dump", "pre-dump", "dump"]
    assert "--prev-images-dir ../2" in calls[2]
    assert result.images_dir == tmp_path / "s" / "3"
    assert result.rounds == 3
    assert result.stats == criu.DumpStats()
    assert "cannot read CRIU's statistics" in caplog.text


def test_no_pre_dump_without_dirty_tracking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = fake_criu(tmp_path, 'case "$ARGS" in *--feature*) exit 1;; esac\n')
    with caplog.at_level(logging.WARNING):
        assert pre_dump_rounds(DumpRequest(pre_dump=3), binary, 1 << 30) == 0
        assert pre_dump_rounds(DumpRequest(), binary, 1 << 30) == 0
    assert "--pre-dump 3 ignored: no memory dirty tracking" in caplog.text
    with_tracking = fake_criu(tmp_path, "exit 0\n")
    assert pre_dump_rounds(DumpRequest(pre_dump=3), with_tracking, 0) == 3
    assert pre_dump_rounds(DumpRequest(), with_tracking, 1 << 30) == 1
    assert pre_dump_rounds(DumpRequest(), with_tracking, 1 << 20) == 0
    assert pre_dump_rounds(DumpRequest(pre_dump=0), with_tracking, 1 << 30) == 0


def test_stats_come_from_stats_dump(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    from converters.images import read_stats

    result = criu.dump(criu.find(), criu.DumpJob(pid=sleeper.pid, scratch=tmp_path / "s"))
    theirs = read_stats(result.images_dir / criu.STATS_DUMP)
    assert result.stats.frozen_time == theirs["frozen_time"] > 0
    assert result.stats.pages_written == theirs["pages_written"]
    (result.images_dir / criu.STATS_DUMP).write_bytes(b"garbage")
    assert criu.read_stats(result.images_dir / criu.STATS_DUMP) == criu.DumpStats()
    assert state(sleeper.pid) in ("S", "R")  # not left stopped (R: just resumed, not yet asleep)


def test_ioprio_roundtrip_in_child() -> None:
    """ioprio_set/get via ctypes, in a child so this process keeps its own priority."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = False
        try:
            job.Priorities(io=IoPrio(IoClass.IDLE, 0)).apply_scheduling()
            ok = job.ioprio_get() == (IoClass.IDLE << 13)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_scratch_filled_before_criu_could_log_why(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """CRIU's log shares the scratch filesystem: when that fills up, the log can end in the
    middle of a line with no Error line at all. The failure still says the filesystem is full."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        binary = fake_criu(
            tmp_path,
            STOP_TARGET + 'printf "(00.03) page-xfer: \\tp 0x7f00 - 0x7f" > "$DIR/dump.log"\n'
            'cat /dev/zero > "$DIR/pages-1.img" 2>/dev/null\n'
            "exit 1\n",
        )
        with pytest.raises(CriuError) as info:
            criu.dump(binary, criu.DumpJob(pid=sleeper.pid, scratch=small / "s"))
        assert str(info.value) == (
            f"criu dump failed (exit status 1): (its log was cut short: no space left on {small})"
        )
        assert info.value.hint == f"{small} is full; choose another --scratch DIR"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    wait_state(sleeper.pid, "S")


def test_tree_member_gone_under_a_hanging_criu(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """CRIU collects the target's whole tree: a member that dies under a hanging CRIU ends the
    dump the same way, and the error names that member and the tree's root."""
    member = procs.popen(["sleep", "600"])
    try:
        binary = fake_criu(tmp_path, f"kill -KILL {member.pid}\nexec sleep 600\n")
        job = criu.DumpJob(pid=sleeper.pid, scratch=tmp_path / "s", tree=(member.pid,))
        with pytest.raises(TargetDiedError) as info:
            criu.dump(binary, job)
        assert str(info.value) == (
            f"process {member.pid}: died during the dump of process {sleeper.pid}'s tree"
            " (killed by signal 9 (SIGKILL))"
        )
        assert sleeper.poll() is None
    finally:
        procs.kill_group(member)


def test_default_timeout_grows_with_the_target() -> None:
    assert criu.default_timeout(0) == criu.BASE_TIMEOUT
    assert criu.default_timeout(8 << 30) == criu.BASE_TIMEOUT + 8 * criu.TIMEOUT_PER_GIB

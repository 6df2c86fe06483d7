"""Faults during a live dump (issue 7, "the target is never harmed").

Each case dumps ``tests/programs/heartbeat.c`` (a mutator thread under load, a heartbeat thread
that measures its own freezes, a fixed region whose checksum the process computes itself) through
the CLI and breaks something on the way: CRIU SIGKILLed at chosen lines of its log, the target
SIGKILLed mid-dump, the scratch filesystem full, the output filesystem full, the tool itself
SIGKILLed while it holds or has released the clone. Afterwards, every time: the target runs (no
thread in state T/t, no tracer, its cgroup not frozen, its heartbeat beats), its memory checksum
and mappings are unchanged, the tool said one ``error:`` line and exited non-zero, nothing is
left at the destination, and the scratch directory is gone (or kept and named with
``--keep-images``).

CRIU is broken on cue by ``fault_criu()``: a wrapper that runs the real CRIU with its ``dump.log``
replaced by a FIFO it reads in small pieces (shrunk to one page, so CRIU is at most
:data:`LEAD` bytes of log ahead of the line that fired), and kills CRIU, or the target, as soon
as a given line appears. No timing decides where CRIU is killed: each point is followed by more
log than that lead (the target maps :data:`AREAS` areas, one log line each after "Dumping mm"),
which ``test_fault_points_are_mid_dump`` checks on a whole dump.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest
from harness.procstate import thread_states

pytestmark = [pytest.mark.live]

EXE = Path(sys.executable).parent / "criu-livedump"
REAL_CRIU = "/usr/local/sbin/criu"
UNLIMITED = ("--core-limit", "unlimited")
CLONE_DUMP = (str(EXE), "dump", "--method", "clone", *UNLIMITED)
#: CRIU's parasite blob (criu/parasite-syscall.c maps it from a memfd of this name).
PARASITE = "/memfd:CRIUMFD"


# --- the target ---------------------------------------------------------------------------------


class Heartbeat:
    """The running heartbeat program and its line protocol."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def checksum(self) -> str:
        return self.ask("sum").split()[1]

    def gap(self) -> tuple[int, int]:
        """(longest gap in µs, beats) since the last :meth:`reset`."""
        _, us, beats = self.ask("gap").split()
        return int(us), int(beats)

    def reset(self) -> None:
        assert self.ask("reset") == "ok"

    def maps(self) -> list[str]:
        """Its mappings (address range, permissions, name), CRIU's parasite blob left out."""
        out = []
        for line in Path(f"/proc/{self.pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            name = parts[5] if len(parts) > 5 else ""
            if not name.startswith(PARASITE):
                out.append(f"{parts[0]} {parts[1]} {name}")
        return out

    def parasite_left(self) -> bool:
        return PARASITE in Path(f"/proc/{self.pid}/maps").read_text()

    def close(self) -> None:
        procs.kill_group(self.proc)
        for f in (self.proc.stdin, self.proc.stdout):
            # a command left in stdin's buffer of a killed heartbeat cannot be flushed
            with contextlib.suppress(BrokenPipeError):
                if f is not None:
                    f.close()


def start_heartbeat(binary: Path, *args: str) -> Heartbeat:
    proc = procs.popen(
        [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    hb = Heartbeat(proc)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
    except BaseException:
        hb.close()
        raise
    return hb


#: One-page areas the target maps (heartbeat's AREAS): CRIU lists each after "Dumping mm", so
#: that point is followed by enough log (see :data:`LEAD`).
AREAS = 256


@pytest.fixture
def heartbeat(programs: dict[str, Path]) -> Iterator[Heartbeat]:
    hb = start_heartbeat(programs["heartbeat"], "1024", "4096", str(AREAS))
    try:
        yield hb
    finally:
        hb.close()


def cgroup_frozen(pid: int) -> bool:
    """Whether the cgroup v2 freezer holds *pid*'s cgroup (CRIU is never asked to use it)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            freeze = Path("/sys/fs/cgroup" + line[3:].rstrip("/")) / "cgroup.freeze"
            with contextlib.suppress(FileNotFoundError):
                return freeze.read_text().strip() != "0"
    return False


def assert_running(hb: Heartbeat) -> None:
    """The target runs: alive, untraced, no thread stopped, not frozen, and its heartbeat beats."""
    assert hb.proc.poll() is None, f"target exited with {hb.proc.returncode}"
    status = Path(f"/proc/{hb.pid}/status").read_text()
    assert "TracerPid:\t0\n" in status
    states = thread_states(hb.pid)
    assert not [t for t, s in states.items() if s in ("T", "t")], states
    assert not cgroup_frozen(hb.pid)
    hb.reset()
    procs.wait_for(lambda: hb.gap()[1] >= 5, 60, "five beats of the heartbeat thread")


def assert_one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def run_tool(
    pid: int, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return procs.run(
        [str(EXE), "dump", str(pid), *UNLIMITED, *args],
        text=True,
        env={**os.environ, **(env or {})},
    )


#: What the wrapper reads of CRIU's log at a time.
READ = 512
#: How far CRIU's log can be past a line that fired when CRIU is stopped: the rest of the read
#: that held the line, and a one-page pipe that CRIU fills before its next line blocks it.
LEAD = READ + 4096

_FAULT_CRIU = """#!{python}
# Runs the real CRIU with dump.log as a one-page FIFO read {read} bytes at a time. On the first
# line matching $FAULT_PATTERN it reads no more: it kills CRIU ($FAULT_ACTION=kill-criu, and
# waits for it to be dead) or the target ($FAULT_ACTION=kill-target, pid $FAULT_TARGET), and
# writes that line to $FAULT_MARKER; CRIU, meanwhile, is blocked by its log {lead} bytes past the
# line at most. Then it reads on, puts the log back as a regular file and exits as CRIU did
# (killed by the same signal).
import fcntl, os, re, signal, subprocess, sys

args = sys.argv[1:]
if "-D" not in args:  # criu --version, criu check
    os.execv({criu!r}, [{criu!r}, *args])
# -v4: each fault point needs more log behind it than CRIU can be ahead of this reader
# (test_fault_points_are_mid_dump); the tool asks for -v3 unless it logs debug itself
args = ["-v4" if a[:2] == "-v" and a[2:].isdigit() else a for a in args]
log = os.path.join(args[args.index("-D") + 1], args[args.index("-o") + 1])
pattern = re.compile(os.environ["FAULT_PATTERN"].encode())
os.mkfifo(log, 0o600)
# the page stream's socket (--ps-socket FD) goes on to CRIU
fds = [int(args[args.index("--ps-socket") + 1])] if "--ps-socket" in args else []
proc = subprocess.Popen([{criu!r}, *args], pass_fds=fds)
with open(os.environ["FAULT_MARKER"] + ".pids", "w") as f:
    f.write(f"{{os.getpid()}} {{proc.pid}}")
fd = os.open(log, os.O_RDONLY)
fcntl.fcntl(fd, 1031, 4096)  # F_SETPIPE_SZ
buf, fired = b"", False
while chunk := os.read(fd, {read}):
    buf += chunk
    if not fired and pattern.search(buf[-len(chunk) - 512 :]):
        fired = True
        if os.environ.get("FAULT_ACTION", "kill-criu") == "kill-criu":
            proc.kill()
            proc.wait()
        else:
            os.kill(int(os.environ["FAULT_TARGET"]), signal.SIGKILL)
        with open(os.environ["FAULT_MARKER"], "w") as f:
            f.write(buf.decode(errors="replace").rstrip().splitlines()[-1])
proc.wait()
with open(log + ".tmp", "wb") as f:
    f.write(buf)
os.replace(log + ".tmp", log)
if proc.returncode < 0:
    os.kill(os.getpid(), -proc.returncode)
sys.exit(proc.returncode)
"""


def fault_criu(tmp_path: Path) -> Path:
    path = tmp_path / "criu-fault"
    path.write_text(_FAULT_CRIU.format(python=sys.executable, criu=REAL_CRIU, read=READ, lead=LEAD))
    path.chmod(0o755)
    return path


def fault_env(tmp_path: Path, pattern: str, action: str, target: int) -> dict[str, str]:
    return {
        "FAULT_PATTERN": pattern,
        "FAULT_ACTION": action,
        "FAULT_TARGET": str(target),
        "FAULT_MARKER": str(tmp_path / "fired"),
    }


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(scratch parent, output directory), both empty."""
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    return scratch, out


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A *size* tmpfs mounted at *path* for the duration of the block."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- CRIU killed mid-dump -----------------------------------------------------------------------

#: Lines of CRIU's dump.log (criu 4.2, -v4) where it is killed, and what CRIU was doing there.
#: Each is followed by more than :data:`LEAD` bytes of log (test_fault_points_are_mid_dump), so
#: CRIU is blocked on the FIFO, still at that stage, when the kill lands; the last stages (file
#: locks, pstree, inventory, unfreeze, stats) write too little log to be hit this way.
CRIU_POINTS = {
    "criu": [
        "Seized task",  # target seized, nothing injected yet
        "Putting parasite blob",  # parasite being set up in the target
        "Dumping pages",  # parasite running in the target, pages going out
        "Dumping mm",  # parasite cured, target still seized
    ],
    "clone": ["Seized task", "Dumping pages", "Dumping mm"],
}
#: Points where CRIU's parasite is in the target (see test_criu_killed_mid_dump).
PARASITE_POINTS = ("Putting parasite blob", "Dumping pages")
CRIU_CASES = [(m, p) for m, points in CRIU_POINTS.items() for p in points]


@pytest.mark.parametrize(("method", "point"), CRIU_CASES)
def test_criu_killed_mid_dump(
    heartbeat: Heartbeat, tmp_path: Path, dirs: tuple[Path, Path], method: str, point: str
) -> None:
    scratch, out = dirs
    checksum, maps = heartbeat.checksum(), heartbeat.maps()
    proc = run_tool(
        heartbeat.pid,
        "--method",
        method,
        "-o",
        str(out / "core"),
        "--scratch",
        str(scratch),
        "--criu",
        str(fault_criu(tmp_path)),
        env=fault_env(tmp_path, point, "kill-criu", heartbeat.pid),
    )
    assert (tmp_path / "fired").exists(), f"{point!r} never appeared in CRIU's log: {proc.stderr}"
    error = assert_one_error(proc)
    killed = proc.returncode == 3 and "killed by signal 9" in error
    assert os.listdir(out) == []
    assert os.listdir(scratch) == []
    if method == "criu" and point in PARASITE_POINTS and not _main_thread_answers(heartbeat):
        # Documented CRIU behaviour: killed while its parasite is in the target, CRIU may leave
        # a thread to hit the parasite's trap with no tracer: the kernel kills it with SIGTRAP.
        # The tool tells that death when it came before the failure was judged, else CRIU's.
        assert heartbeat.proc.wait(timeout=60) == -signal.SIGTRAP
        died = f"process {heartbeat.pid}: died during the dump (killed by signal 5 (SIGTRAP))"
        assert killed or (proc.returncode == 5 and error == f"error: {died}"), proc.stderr
        print(f"{method} {point}: target killed by SIGTRAP (documented); the tool said {error}")
        return
    assert killed, proc.stderr
    assert_running(heartbeat)
    assert heartbeat.checksum() == checksum
    assert heartbeat.maps() == maps
    # CRIU killed with its parasite mapped leaves the blob in the target (documented).
    print(f"{method} {point}: parasite blob left: {heartbeat.parasite_left()}")
    if method == "clone":
        assert not heartbeat.parasite_left()
    assert procs.children(heartbeat.pid) == {}
    assert os.listdir(out) == []
    assert os.listdir(scratch) == []


def _main_thread_answers(hb: Heartbeat) -> bool:
    """Whether the target's main thread answers a request, or dies first. CRIU's parasite runs
    in the main thread (compel infects the thread group leader), so a main thread that answers
    has left the parasite's code and its trap behind."""
    try:
        return hb.ask("mut").startswith("mut ")
    except BrokenPipeError:
        return False


@pytest.mark.parametrize("method", list(CRIU_POINTS))
def test_fault_points_are_mid_dump(
    heartbeat: Heartbeat, dirs: tuple[Path, Path], method: str
) -> None:
    """The premise of test_criu_killed_mid_dump, on a whole dump of the same target: every
    point is followed by more than :data:`LEAD` bytes of log, so a CRIU stopped there by the
    wrapper is still at that stage, and cannot have finished, when it is killed."""
    scratch, out = dirs
    args = ["--method", method, "-o", str(out / "core"), "--scratch", str(scratch)]
    proc = run_tool(heartbeat.pid, *args, "--keep-images")
    assert proc.returncode == 0, proc.stderr
    (log,) = scratch.rglob("dump.log")
    text = log.read_bytes()
    after = {
        p: len(text) - text.find(p.encode()) for p in CRIU_POINTS[method] if p.encode() in text
    }
    for kept in scratch.iterdir():
        shutil.rmtree(kept)
    print(f"{method}: log bytes after each point: {after} (lead {LEAD})")
    assert set(after) == set(CRIU_POINTS[method]), f"points missing from CRIU's log: {after}"
    assert all(n > 2 * LEAD for n in after.values()), after


# --- the target exits mid-dump ------------------------------------------------------------------


def _clones_alive(exe: Path, target: int) -> list[int]:
    """Live processes running *exe* that are the dead *target*'s clones: its children, or
    orphans given to us (pytest is a child subreaper, see conftest)."""
    pids = []
    for pid, state in {**procs.children(target), **procs.children(os.getpid())}.items():
        with contextlib.suppress(OSError):
            if pid != target and state not in "ZX" and os.readlink(f"/proc/{pid}/exe") == str(exe):
                pids.append(pid)
    return pids


def _gone(pid: int) -> bool:
    """Whether *pid* no longer runs (gone, or a zombie: pytest reaps its orphans at teardown)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def _group_left(pgid: int) -> list[int]:
    """Live processes of process group *pgid*."""
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] not in "ZX":
                    left.append(int(entry))
    return left


def _died_line(proc: subprocess.CompletedProcess[str], pid: int) -> None:
    """One line, exit 5: the target died during the dump, killed by SIGKILL."""
    error = assert_one_error(proc)
    assert error == f"error: process {pid}: died during the dump (killed by signal 9 (SIGKILL))"
    assert proc.returncode == 5, proc.stderr


def test_target_killed_while_criu_dumps_it(
    heartbeat: Heartbeat, tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    """The real CRIU, seizing and dumping the target, sees it SIGKILLed: CRIU 4.2.1 can then
    wait for the target's zombie threads for good. The tool kills CRIU's group after a short
    grace and says the target died."""
    scratch, out = dirs
    proc = run_tool(
        heartbeat.pid,
        "--method",
        "criu",
        "-o",
        str(out / "core"),
        "--scratch",
        str(scratch),
        "--criu",
        str(fault_criu(tmp_path)),
        env=fault_env(tmp_path, "Dumping pages", "kill-target", heartbeat.pid),
    )
    assert (tmp_path / "fired").exists()
    _died_line(proc, heartbeat.pid)
    assert heartbeat.proc.wait(timeout=10) == -signal.SIGKILL
    wrapper, real = (int(x) for x in (tmp_path / "fired.pids").read_text().split())
    assert _gone(real) and _gone(wrapper) and _group_left(wrapper) == []
    assert os.listdir(out) == []
    assert os.listdir(scratch) == []


#: A CRIU stand-in that SIGKILLs the process it is asked to dump (unless $SPARE_DUMPED is set)
#: and $ALSO_KILL, if set, then hangs, as CRIU 4.2.1 can in wait4() on a target SIGKILLed under
#: it; a helper of its own sleeps beside it. It writes "its pid, its helper's pid" to $MARKER once
#: the kill is sent.
_HANGING_CRIU = """#!/bin/bash
[ "$1" = dump ] || exit 1  # `criu check --feature ...`: no such feature
while [ $# -gt 0 ]; do case $1 in -t) PID=$2; shift;; esac; shift; done
sleep 600 &
[ -n "$SPARE_DUMPED" ] || ALSO_KILL="$PID $ALSO_KILL"
kill -KILL $ALSO_KILL
echo "$$ $!" > "$MARKER.tmp" && mv "$MARKER.tmp" "$MARKER"
exec sleep 600
"""
#: Seconds `dump` may take to end once the target is dead (the issue's acceptance bound).
AFTER_DEATH = 30


def _dump_with_hanging_criu(
    pid: int, tmp_path: Path, dirs: tuple[Path, Path], env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """`dump PID ARGS` with :data:`_HANGING_CRIU` (told *env*), which must end within
    :data:`AFTER_DEATH` s of its kill; afterwards CRIU and its helper are gone (by pid and by
    process group) and nothing is left in the output and scratch directories."""
    scratch, out = dirs
    stand_in, marker = tmp_path / "criu-hang", tmp_path / "criu-pids"
    stand_in.write_text(_HANGING_CRIU)
    stand_in.chmod(0o755)
    argv = [str(EXE), "dump", str(pid), *UNLIMITED, *args, "-o", str(out / "core")]
    argv += ["--scratch", str(scratch), "--criu", str(stand_in)]
    env = {**os.environ, "MARKER": str(marker), **env}
    with (tmp_path / "stderr").open("w+") as err:
        tool = procs.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            procs.wait_for(marker.exists, 120, "the stand-in CRIU killing the target")
            try:
                tool.wait(timeout=AFTER_DEATH)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"dump still runs {AFTER_DEATH} s after the target died"
                ) from None
        finally:
            procs.kill_group(tool)
        err.seek(0)
        result = subprocess.CompletedProcess(argv, tool.returncode, "", err.read())
    criu_pid, helper = (int(x) for x in marker.read_text().split())
    assert _gone(criu_pid) and _gone(helper) and _group_left(criu_pid) == []
    assert os.listdir(out) == []
    assert os.listdir(scratch) == []
    return result


@pytest.mark.parametrize("method", ["criu", "clone"])
def test_target_killed_by_a_hanging_criu(
    programs: dict[str, Path],
    heartbeat: Heartbeat,
    tmp_path: Path,
    dirs: tuple[Path, Path],
    method: str,
) -> None:
    """The target dies and CRIU hangs: `dump` ends within 30 s of the death with one line,
    CRIU and its helper are gone (by pid and by process group), nothing is written, and under
    clone the clone does not survive."""
    env = {"ALSO_KILL": str(heartbeat.pid)}
    result = _dump_with_hanging_criu(heartbeat.pid, tmp_path, dirs, env, "--method", method)
    _died_line(result, heartbeat.pid)
    assert _clones_alive(programs["heartbeat"], heartbeat.pid) == []


@pytest.mark.parametrize("method", ["criu", "clone"])
def test_tree_member_killed_by_a_hanging_criu(
    tmp_path: Path, dirs: tuple[Path, Path], method: str
) -> None:
    """``--tree``: a process of the tree other than its root dies and CRIU (under clone: the
    root's clone's CRIU, which does not see that process) hangs. `dump` ends within 30 s with
    one line naming that process and the tree, writes no core (not even the root's), leaves no
    CRIU, scratch or clone, and the root runs on."""
    # the root: a sleep with a child sleep (the shell's pid, after exec); the root never waits
    # for its child, so the child's death leaves it running
    shell = procs.popen(
        ["sh", "-c", "sleep 600 & echo $!; exec sleep 600"], stdout=subprocess.PIPE, text=True
    )
    try:
        member = int(procs.readline(shell.stdout, 60, "the shell starting its child"))
        exe = Path(shutil.which("sleep") or "sleep").resolve()
        for pid in (shell.pid, member):
            procs.wait_for(
                lambda p=pid: os.readlink(f"/proc/{p}/exe") == str(exe),  # type: ignore[misc]
                60,
                f"process {pid} executing {exe}",
            )
        env = {"SPARE_DUMPED": "1", "ALSO_KILL": str(member)}
        args = ("--tree", "--method", method)
        result = _dump_with_hanging_criu(shell.pid, tmp_path, dirs, env, *args)
        error = assert_one_error(result)
        assert error == (
            f"error: process {member}: died during the dump of process {shell.pid}'s tree"
            " (killed by signal 9 (SIGKILL))"
        ), result.stderr
        assert result.returncode == 5, result.stderr
        assert shell.poll() is None
        assert set(thread_states(shell.pid).values()) <= {"S", "R"}
        assert _clones_alive(exe, shell.pid) == []
    finally:
        procs.kill_group(shell)
        if shell.stdout is not None:
            shell.stdout.close()


def test_whole_dump_timeout(heartbeat: Heartbeat, tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    """A CRIU that hangs for another reason meets --timeout: exit 3, one line naming the limit,
    CRIU's group gone, the target running and untouched."""
    scratch, out = dirs
    stand_in = tmp_path / "criu-stall"
    stand_in.write_text(
        f'#!/bin/sh\n[ "$1" = dump ] || exit 1\necho $$ > {tmp_path}/criu-pid\nexec sleep 600\n'
    )
    stand_in.chmod(0o755)
    proc = run_tool(
        heartbeat.pid,
        "--method",
        "criu",
        "--timeout",
        "2",
        "-o",
        str(out / "core"),
        "--scratch",
        str(scratch),
        "--criu",
        str(stand_in),
    )
    error = assert_one_error(proc)
    assert proc.returncode == 3 and "did not finish within 2 s (the --timeout)" in error, error
    criu_pid = int((tmp_path / "criu-pid").read_text())
    assert _gone(criu_pid) and _group_left(criu_pid) == []
    assert_running(heartbeat)
    assert os.listdir(out) == [] and os.listdir(scratch) == []


def test_target_killed_while_criu_dumps_its_clone(
    programs: dict[str, Path], heartbeat: Heartbeat, tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    """The snapshot was complete when the target died: its core is written (the state at the
    freeze), and the orphaned clone does not survive."""
    scratch, out = dirs
    proc = run_tool(
        heartbeat.pid,
        "--method",
        "clone",
        "-o",
        str(out / "core"),
        "--scratch",
        str(scratch),
        "--criu",
        str(fault_criu(tmp_path)),
        env=fault_env(tmp_path, "Dumping pages", "kill-target", heartbeat.pid),
    )
    assert (tmp_path / "fired").exists()
    assert proc.returncode == 0, proc.stderr
    assert heartbeat.proc.wait(timeout=10) == -signal.SIGKILL
    assert os.listdir(out) == ["core"]
    assert (out / "core").read_bytes()[:4] == b"\x7fELF"
    assert os.listdir(scratch) == []
    assert _clones_alive(programs["heartbeat"], heartbeat.pid) == []


# --- full filesystems ---------------------------------------------------------------------------


#: the clone without --keep-images streams its pages into the core: its scratch holds only
#: CRIU's small images, and a full scratch is tests/test_stream.py's success case
@pytest.mark.parametrize(
    ("method", "keep"),
    [("criu", False), ("criu", True), ("clone", True)],
    ids=["criu-remove", "criu-keep-images", "clone-keep-images"],
)
def test_scratch_full(
    heartbeat: Heartbeat, tmp_path: Path, dirs: tuple[Path, Path], method: str, keep: bool
) -> None:
    _, out = dirs
    checksum = heartbeat.checksum()
    with small_tmpfs(tmp_path / "small") as small:
        args = ["--method", method, "-o", str(out / "core"), "--scratch", str(small)]
        proc = run_tool(heartbeat.pid, *args, *(["--keep-images"] if keep else []))
        assert_one_error(proc)
        assert proc.returncode == 3, proc.stderr
        assert f"hint: {small} is full" in proc.stderr
        left = os.listdir(small)
        if keep:
            assert len(left) == 1 and f"images kept in {small / left[0]}" in proc.stderr
        else:
            assert left == []
    assert_running(heartbeat)
    assert heartbeat.checksum() == checksum
    assert procs.children(heartbeat.pid) == {}
    assert os.listdir(out) == []


@pytest.mark.parametrize("method", ["criu", "clone"])
def test_output_full(
    heartbeat: Heartbeat, tmp_path: Path, dirs: tuple[Path, Path], method: str
) -> None:
    scratch, _ = dirs
    checksum = heartbeat.checksum()
    with small_tmpfs(tmp_path / "small") as small:
        args = ["--method", method, "-o", str(small / "core"), "--scratch", str(scratch)]
        proc = run_tool(heartbeat.pid, *args)
        error = assert_one_error(proc)
        assert proc.returncode == 7, proc.stderr
        assert "No space left on device" in error
        assert os.listdir(small) == []  # no partial core, no temporary file
    assert_running(heartbeat)
    assert heartbeat.checksum() == checksum
    assert procs.children(heartbeat.pid) == {}
    assert os.listdir(scratch) == []


# --- the tool itself killed ---------------------------------------------------------------------


def _wait_no_children(pid: int) -> dict[int, str]:
    """Wait for the clone to be gone and reaped, and the reaper (the watchdog's one injected
    wait4) to have let go of the target; return the children left."""
    deadline = time.monotonic() + 60  # a bound, not a timing: the machine may be loaded
    while True:
        left = procs.children(pid)
        traced = "TracerPid:\t0\n" not in Path(f"/proc/{pid}/status").read_text()
        if (not left and not traced) or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


@pytest.mark.parametrize("step", ["detached", "prepared", "released"])
def test_tool_killed_holding_the_clone(heartbeat: Heartbeat, tmp_path: Path, step: str) -> None:
    """SIGKILL of the tool after the target was let go: the watchdog kills the clone and reaps
    it from the target (no sleeping clone, no zombie)."""
    from criu_livedump.snapshot.clone import inject as clone

    tool = procs.popen(
        [*CLONE_DUMP, str(heartbeat.pid), "-o", str(tmp_path / "core"), "--scratch", str(tmp_path)],
        env={**os.environ, clone.PAUSE_ENV: step},
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert tool.stderr is not None
        assert procs.readline(tool.stderr, 120, "the tool").strip() == f"paused {step}"
        assert len(procs.children(heartbeat.pid)) == 1  # the clone
        tool.kill()
    finally:
        tool.kill()
        tool.wait()
        if tool.stderr is not None:
            tool.stderr.close()
    assert _wait_no_children(heartbeat.pid) == {}
    assert_running(heartbeat)


def test_tool_killed_while_criu_dumps_the_clone(heartbeat: Heartbeat, tmp_path: Path) -> None:
    fake = tmp_path / "criu-stall"
    marker = tmp_path / "criu-pid"
    fake.write_text(
        f"#!/bin/sh\necho $$ > {marker}.tmp && mv {marker}.tmp {marker}\nexec sleep 600\n"
    )
    fake.chmod(0o755)
    tool = subprocess.Popen(
        [
            *CLONE_DUMP,
            str(heartbeat.pid),
            "-o",
            str(tmp_path / "core"),
            "--criu",
            str(fake),
            "--scratch",
            str(tmp_path),
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stalled = 0
    try:
        procs.wait_for(marker.exists, 120, "the tool starting the stand-in CRIU")
        stalled = int(marker.read_text())
        assert len(procs.children(heartbeat.pid)) == 1  # the clone, waiting for CRIU
        tool.kill()
        tool.wait()
        assert _wait_no_children(heartbeat.pid) == {}
        assert_running(heartbeat)
    finally:
        tool.kill()
        tool.wait()
        if stalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled, signal.SIGKILL)


# --- the heartbeat: the target's own measure of its freeze --------------------------------------


@pytest.mark.parametrize("method", ["criu", "clone"])
def test_heartbeat_freeze_reported(
    heartbeat: Heartbeat, dirs: tuple[Path, Path], method: str
) -> None:
    """Longest gap between two 1 ms heartbeats during each dump, as the target saw it, next to
    the freeze the tool reported (printed, not asserted: timings are not test outcomes)."""
    scratch, out = dirs
    checksum = heartbeat.checksum()
    seen = []
    for i in range(3):
        heartbeat.reset()
        proc = run_tool(
            heartbeat.pid,
            "--method",
            method,
            "-o",
            str(out / f"core.{i}"),
            "--scratch",
            str(scratch),
        )
        assert proc.returncode == 0, proc.stderr
        gap_us, beats = heartbeat.gap()
        assert beats > 0
        reported = re.search(r"frozen ([0-9.]+) ms", proc.stderr)
        assert reported is not None, proc.stderr
        seen.append(f"target saw {gap_us / 1000:.1f} ms, tool reported {reported.group(1)} ms")
        (out / f"core.{i}").unlink()
    print(f"{method}: " + "; ".join(seen))
    assert_running(heartbeat)
    assert heartbeat.checksum() == checksum
    assert os.listdir(scratch) == []


# --- who may dump what --------------------------------------------------------------------------


def test_symlink_planted_during_the_dump_is_not_followed(
    heartbeat: Heartbeat, tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    """The destination is checked before CRIU runs; a symlink planted there *while* CRIU runs
    (after that check) must still not be followed: the core is created O_EXCL|O_NOFOLLOW."""
    scratch, out = dirs
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    planter = tmp_path / "criu-planter"
    planter.write_text(f'#!/bin/sh\nln -s {victim} {out / "core"}\nexec {REAL_CRIU} "$@"\n')
    planter.chmod(0o755)
    for method in ("criu", "clone"):
        (out / "core").unlink(missing_ok=True)
        proc = run_tool(
            heartbeat.pid,
            "--method",
            method,
            "-o",
            str(out / "core"),
            "--scratch",
            str(scratch),
            "--criu",
            str(planter),
        )
        assert_one_error(proc)
        assert victim.read_text() == "keep me"
        assert (out / "core").is_symlink()
        assert os.listdir(out) == ["core"]  # no temporary file left beside it
        assert os.listdir(scratch) == []
    assert_running(heartbeat)


def test_scratch_is_private_and_unguessable(tmp_path: Path) -> None:
    from criu_livedump import scratch

    made = {scratch.create(tmp_path) for _ in range(20)}
    assert len(made) == 20
    for path in made:
        assert (path.stat().st_mode & 0o777) == 0o700
        suffix = path.name.removeprefix(scratch.PREFIX)
        assert len(suffix) >= 8 and suffix not in {str(os.getpid()), str(int(time.time()))}
        scratch.remove(path)
    assert os.listdir(tmp_path) == []


#: one name per test run: suites of other checkouts may run beside this one
UNPRIV_USER = f"cld-faults{os.getpid()}"
#: The venv's interpreter lives under /root, which other users cannot enter; the system python
#: (same 3.11 ABI) runs the source tree and the venv's site-packages, both world-readable.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def unprivileged() -> Iterator[tuple[int, int, Path]]:
    """(uid, gid, a directory it can reach) of a system user created for the test; the user and
    the directory are deleted afterwards (pytest's tmp_path sits below a 0700 directory)."""
    import pwd
    import tempfile

    site = next((Path(sys.prefix) / "lib").glob("python3*/site-packages"))
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import click, google.protobuf, elftools"],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot import the venv's packages")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", UNPRIV_USER],
        check=True,
        capture_output=True,
    )
    base = Path(tempfile.mkdtemp(prefix="cld-faults."))
    try:
        entry = pwd.getpwnam(UNPRIV_USER)
        base.chmod(0o755)
        for sub in ("out", "scratch"):
            (base / sub).mkdir()
            (base / sub).chmod(0o777)
        yield entry.pw_uid, entry.pw_gid, base
    finally:
        subprocess.run(["pkill", "-KILL", "-u", UNPRIV_USER], check=False)
        subprocess.run(["userdel", UNPRIV_USER], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def _tool_as_user(uid: int, gid: int, *args: str) -> subprocess.CompletedProcess[str]:
    site = next((Path(sys.prefix) / "lib").glob("python3*/site-packages"))
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [
            *_as_user(uid, gid),
            SYSTEM_PYTHON,
            "-c",
            "from criu_livedump.entry import main; main()",
            "dump",
            *args,
            *UNLIMITED,
        ],
        env={"PYTHONPATH": f"{root}:{site}", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.mark.parametrize("method", ["criu", "clone"])
def test_unprivileged_user_refused_on_roots_process(
    heartbeat: Heartbeat, unprivileged: tuple[int, int, Path], method: str
) -> None:
    """A user without capabilities may not dump another uid's process: refused by the kernel's
    ptrace rules before anything is frozen (nothing in the scratch, no core)."""
    uid, gid, base = unprivileged
    out, scratch = base / "out", base / "scratch"
    proc = _tool_as_user(
        uid,
        gid,
        str(heartbeat.pid),
        "--method",
        method,
        "-o",
        str(out / "core"),
        "--scratch",
        str(scratch),
    )
    error = assert_one_error(proc)
    assert proc.returncode == 4, proc.stderr
    assert "needs its uid or CAP_SYS_PTRACE" in error
    assert os.listdir(out) == [] and os.listdir(scratch) == []
    assert_running(heartbeat)


@pytest.mark.parametrize("method", ["criu", "clone"])
def test_unprivileged_user_on_own_process(
    programs: dict[str, Path], unprivileged: tuple[int, int, Path], method: str
) -> None:
    """Its own process passes the ptrace rules, but CRIU needs capabilities the user lacks: one
    error line, the target runs on, no clone or core left behind."""
    uid, gid, base = unprivileged
    out, scratch = base / "out", base / "scratch"
    # its own process group, which Heartbeat.close() kills (procs.kill_group)
    proc = procs.popen(
        [*_as_user(uid, gid), str(programs["heartbeat"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    hb = Heartbeat(proc)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        result = _tool_as_user(
            uid,
            gid,
            str(hb.pid),
            "--method",
            method,
            "-o",
            str(out / "core"),
            "--scratch",
            str(scratch),
        )
        error = assert_one_error(result)
        assert result.returncode == 3, result.stderr
        assert "capability" in error
        assert _wait_no_children(hb.pid) == {}
        assert_running(hb)
        assert os.listdir(out) == [] and os.listdir(scratch) == []
    finally:
        hb.close()

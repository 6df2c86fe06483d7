"""CRIU failures name their cause (issue 17): the Error line that explains the failure, the
process and uid involved, and the hint of its known cause (snapshot/failures.py CAUSES).

Each known cause is provoked: the rlimit of another uid by real CRIU (root here lacks
CAP_SYS_RESOURCE), the full scratch by real CRIU in tests/test_faults.py, the others by a
stand-in CRIU writing the very line CRIU 4.2.1 prints (cited in CAUSES) into its log."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest

from criu_livedump.errors import CriuError
from criu_livedump.snapshot import failures

EXE = Path(sys.executable).parent / "criu-livedump"
NOBODY = 65534

#: For each known cause, the lines of a CRIU 4.2.1 log (-v4) that fail that way: what CRIU
#: printed just before, the cause's own line (as its source prints it), the summaries after.
#: ``PID`` is replaced by the dumped process.
LOGS: dict[str, list[str]] = {
    "rlimit of another uid": [
        "(00.211053) dumping /proc/PID/loginuid",
        "(00.211066) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted",
        "(00.211068) Error (criu/cr-dump.c:1584): Dump core (pid: PID) failed with -1",
    ],
    "traced task": [
        "(00.01) Error (compel/src/lib/infect.c:262): Unseizable non-zombie PID found,"
        " state S, err -1/1",
    ],
    "unsupported file": [
        "(00.05) Error (criu/files-ext.c:94): Can't dump file 5 of that type [60660]"
        " (unknown /dev/sda)",
        "(00.05) Error (criu/cr-dump.c:1495): Dump files (pid: PID) failed with -1",
    ],
    "unsupported socket": [
        "(00.05) Error (criu/sk-unix.c:881): Can't dump half of stream unix connection."
        " name: /run/x; peer name: (null)",
        "(00.05) Error (criu/cr-dump.c:1495): Dump files (pid: PID) failed with -1",
    ],
    "full scratch": [
        "(00.09) Error (criu/page-xfer.c:380): Unable to spliced out: No space left on device",
        "(00.09) Error (criu/cr-dump.c:1628): Can't dump pages (pid: PID) failed with -1",
    ],
    "PID namespace or session": [
        "(00.02) Error (criu/cr-dump.c:1528): A session leader of PID(1) is outside of its"
        " pid namespace",
    ],
    "external mount": [
        "(00.05) Error (criu/files-reg.c:1790): Can't lookup mount=1234 for fd=3 path=/srv/x",
        "(00.05) Error (criu/cr-dump.c:1495): Dump files (pid: PID) failed with -1",
    ],
    "seccomp": [
        "(00.03) Error (criu/seccomp.c:162): Can't fetch seccomp metadata on tid_real PID pos 0:"
        " Invalid argument",
    ],
    "pending SIGTRAP": [
        "(00.01) Error (compel/src/lib/infect.c:323): Can't dump the PID thread with a pending"
        " SIGTRAP.",
    ],
    "nested namespace": [
        "(00.01) Error (criu/namespaces.c:460): Can't dump nested uts namespace for PID",
    ],
    "tree changed": [
        "(00.01) Error (criu/seize.c:335): zombie PID (comm sleep) found while seizing",
    ],
    "unsupported mapping": [
        "(00.04) dumping /proc/PID/smaps",
        "(00.04) Error (criu/proc_parse.c:760): Unsupported mapping found"
        " 00007f0000000000-00007f0000001000",
    ],
    "missing privilege": [
        "(00.04) dumping /proc/PID/loginuid",
        "(00.04) Error (criu/cr-dump.c:1290): Can't dump /proc/PID/loginuid:"
        " Operation not permitted",
    ],
}
#: Error lines before the cause that explain nothing, and the closing summary after it.
PROLOGUE = [
    "(00.0001) Version: 4.2.1",
    "(00.1608) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self:"
    " Operation not permitted",
]
EPILOGUE = ["(00.2113) Error (criu/cr-dump.c:1975): Dumping FAILED."]


def test_every_known_cause_is_provoked() -> None:
    assert sorted(LOGS) == sorted(c.name for c in failures.CAUSES)
    hints = [c.hint for c in failures.CAUSES]
    assert len(set(hints)) == len(hints)


@pytest.mark.parametrize("name", sorted(LOGS))
def test_diagnose_names_the_cause(name: str) -> None:
    lines = [ln.replace("PID", "4321") for ln in PROLOGUE + LOGS[name] + EPILOGUE]
    found = failures.diagnose(lines)
    assert found is not None and found.cause is not None
    assert found.cause.name == name
    cause_line = next(ln for ln in LOGS[name] if "Error" in ln).replace("PID", "4321")
    assert found.line == cause_line.split(" ", 1)[1]
    assert found.pid == 4321


def test_diagnose_without_a_known_cause_takes_the_first_telling_error() -> None:
    lines = [*PROLOGUE, "(0.1) Error (criu/x.c:1): first", "(0.2) Error (criu/x.c:2): second"]
    found = failures.diagnose([*lines, *EPILOGUE])
    assert found is not None and found.cause is None
    assert found.line == "Error (criu/x.c:1): first"
    assert failures.diagnose(["(0.1) nothing wrong"]) is None


def _stand_in(tmp_path: Path, lines: list[str]) -> Path:
    """A CRIU that writes *lines* (PID: the dumped process) as its log and fails."""
    log = tmp_path / "log.txt"
    log.write_text("".join(ln + "\n" for ln in PROLOGUE + lines + EPILOGUE))
    path = tmp_path / "criu"
    path.write_text(
        "#!/bin/bash\n"
        '[ "$1" = dump ] || exit 1  # `criu check --feature ...`: no such feature\n'
        "while [ $# -gt 0 ]; do\n"
        "  case $1 in -t) PID=$2; shift;; -D) DIR=$2; shift;; esac; shift\n"
        "done\n"
        f'sed "s/PID/$PID/g" {log} > "$DIR/dump.log"\n'
        "exit 1\n"
    )
    path.chmod(0o755)
    return path


def _dump(pid: int, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    argv = [str(EXE), "dump", str(pid), "--core-limit", "unlimited", "-o", str(out / "core")]
    proc = procs.run([*argv, *args], text=True)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(out) == []
    return proc


def _error_and_hint(proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    hints = [ln for ln in lines if ln.startswith("hint:")]
    assert len(errors) == 1 and len(hints) == 1, proc.stderr
    return errors[0], hints[0]


@pytest.mark.parametrize("name", sorted(LOGS))
def test_each_cause_one_line_and_hint(tmp_path: Path, name: str) -> None:
    sleeper = procs.popen(["sleep", "600"])
    try:
        criu = _stand_in(tmp_path, LOGS[name])
        proc = _dump(sleeper.pid, tmp_path, "--method", "criu", "--criu", str(criu))
        error, hint = _error_and_hint(proc)
    finally:
        sleeper.kill()
        sleeper.wait()
    cause = next(c for c in failures.CAUSES if c.name == name)
    line = next(ln for ln in LOGS[name] if "Error" in ln).split(" ", 1)[1]
    assert error == (
        f"error: criu dump failed (exit status 1) on process {sleeper.pid} (uid 0):"
        f" {line.replace('PID', str(sleeper.pid))}"
    )
    assert "Dumping FAILED" not in error and "RLIMIT_NOFILE" not in error
    assert hint.startswith("hint: ")
    assert cause.pattern.search(error) is not None
    # the hint is the cause's own, filled in
    prefix = cause.hint.split("{", 1)[0]
    assert hint[len("hint: ") :].startswith(prefix)
    assert "{" not in hint


@pytest.fixture
def mixed_tree() -> Iterator[tuple[int, int]]:
    """(a root process, its child running as nobody)."""
    parent = procs.popen(
        [
            "bash",
            "-c",
            f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups sleep 600 & exec sleep 600",
        ]
    )
    try:
        kids = procs.wait_for(lambda: procs.children(parent.pid), 10, "the child of nobody")
        child = next(iter(kids))
        procs.wait_for(
            lambda: os.stat(f"/proc/{child}").st_uid == NOBODY, 10, "the child becoming nobody"
        )
        yield parent.pid, child
    finally:
        procs.kill_group(parent)


@pytest.mark.skipif(
    os.geteuid() != 0 or procs.has_capability(procs.CAP_SYS_RESOURCE),
    reason="needs root lacking CAP_SYS_RESOURCE (with it, CRIU reads every uid's limits)",
)
def test_real_criu_rlimit_of_another_uid(tmp_path: Path, mixed_tree: tuple[int, int]) -> None:
    """Root without CAP_SYS_RESOURCE: CRIU's tree dump cannot read the child's limits. The
    error names that line (not "Dumping FAILED"), the child and its uid, and the hint."""
    parent, child = mixed_tree
    # without --tree too, CRIU collects the whole tree below the process it dumps
    proc = _dump(parent, tmp_path, "--method", "criu", "--scratch", str(tmp_path))
    error, hint = _error_and_hint(proc)
    assert error.startswith(f"error: criu dump failed (exit status 1) on process {child} (uid")
    assert f"(uid {NOBODY}): Error (criu/cr-dump.c:" in error
    assert error.endswith("Can't get rlimit 0: Operation not permitted")
    assert f"cannot read the limits of process {child} of uid {NOBODY}" in hint


def test_without_an_error_line_the_message_is_what_criu_told_its_user() -> None:
    """CRIU says why it stops at once in words for its user (pr_msg(), no timestamp) and logs
    nothing at ``-v3``: those words, not its last log line, make the error."""
    out = (
        "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: \n"
        "setcap cap_checkpoint_restore+eip /usr/local/sbin/criu\n"
        "(00.000000) CRIU run id = 632d437d\n"
    )
    error = CriuError(["criu", "dump"], 1, out)
    assert error.message.endswith("CAP_CHECKPOINT_RESTORE capability:")
    assert CriuError(["criu", "dump"], 1, "(00.1) a\n(00.2) b\n").message.endswith(": (00.2) b")

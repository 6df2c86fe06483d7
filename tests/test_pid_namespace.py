"""A target that is the init of its own PID namespace: the main process of a container.

CRIU dumps the namespace with it and names every process and thread by its id *there*, which
is also what the kernel's own core of that process says (fill_prstatus() and fill_psinfo() use
task_pid_vnr() and friends from the dumping task's side). So the core says pid 1, ppid 0 and
LWP 1..N, and the conversion must look the target up by that id. A clone would be process 2 of
the namespace, which CRIU refuses ("Can't dump a pid namespace without the process init"), so
``auto`` takes ``criu`` and ``--method clone`` is refused before anything is frozen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest
from harness.corefile import CoreView
from harness.gdb import gdb_lwps

from criu_livedump.snapshot.criu import fuse_mountpoints

pytestmark = [pytest.mark.live]

TOOL = Path(sys.executable).parent / "criu-livedump"


@dataclass
class Namespaced:
    """``unshare --pid --fork`` running *argv* as PID 1 of a new namespace."""

    unshare: subprocess.Popen[str]
    init: int  #: the namespace's init, as we see it

    def ns_ids(self, pid: int, key: str = "NStgid") -> list[int]:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return [int(x) for x in line.split()[1:]]
        raise AssertionError(f"no {key} for {pid}")

    def children(self, pid: int) -> list[int]:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(x) for x in text.split()]


@pytest.fixture
def namespaced(programs: dict[str, Path]) -> Iterator[Namespaced]:
    """The threads program (3 workers) under ``sh`` as the namespace's init, which leads its
    own session (setsid), as a container's init does: sh -> threads."""
    argv = [
        "unshare", "--pid", "--fork", "--kill-child", "--",
        "setsid", "sh", "-c", f"{programs['threads']} 3; :",
    ]  # fmt: skip
    proc = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    init = 0
    try:
        assert procs.readline(proc.stdout, 60, "threads in the namespace").startswith("ready")
        (init,) = procs.wait_for(
            lambda: Namespaced(proc, 0).children(proc.pid), 30, "the namespace's init"
        )
        yield Namespaced(proc, init)
    finally:
        if init:
            os.kill(init, signal.SIGKILL)  # the namespace dies with its init
        procs.kill_group(proc)
        if init:
            procs.wait_for(lambda: procs.reaped(init), 30, f"the namespace's init {init} ending")
        if proc.stdout is not None:
            proc.stdout.close()


def dump(pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return procs.run(
        [str(TOOL), "dump", str(pid), "--core-limit", "unlimited", "--json", *args], text=True
    )


def test_the_namespace_init_is_dumped_by_criu_with_its_namespace_ids(
    namespaced: Namespaced, tmp_path: Path
) -> None:
    init = namespaced.init
    assert namespaced.ns_ids(init)[-1] == 1
    proc = dump(init, "--method", "criu", "-o", str(tmp_path / "core"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["method"] == "criu"
    core = CoreView(tmp_path / "core")
    try:
        psinfo = core.prpsinfo
        threads = sorted(t.pid for t in core.threads)
        ppids = {t.prstatus["pr_ppid"] for t in core.threads}
    finally:
        core.close()
    # the kernel's view from inside: pid 1, its parent outside the namespace, its own session
    assert (psinfo["pr_pid"], psinfo["pr_ppid"], psinfo["pr_pgrp"], psinfo["pr_sid"]) == (
        1, 0, 1, 1,
    )  # fmt: skip
    assert ppids == {0}
    assert threads == [1]  # sh has one thread
    assert os.kill(init, 0) is None  # still running


def test_tree_children_are_found_by_their_namespace_ids(
    namespaced: Namespaced, programs: dict[str, Path], tmp_path: Path
) -> None:
    init = namespaced.init
    (child,) = namespaced.children(init)
    ns_child = namespaced.ns_ids(child)[-1]
    ns_tids = sorted(
        namespaced.ns_ids(int(t), "NSpid")[-1] for t in os.listdir(f"/proc/{child}/task")
    )
    assert ns_child == 2 and len(ns_tids) == 4
    proc = dump(init, "--tree", "-o", str(tmp_path / "core"))
    assert proc.returncode == 0, proc.stderr
    (kid,) = json.loads(proc.stdout)["children"]
    assert kid["pid"] == child
    assert kid["core_path"] == f"{tmp_path / 'core'}.{child}"
    core = Path(kid["core_path"])
    view = CoreView(core)
    try:
        assert sorted(t.pid for t in view.threads) == ns_tids
        assert view.prpsinfo["pr_pid"] == 2
        assert view.prpsinfo["pr_ppid"] == 1
    finally:
        view.close()
    assert sorted(gdb_lwps(programs["threads"], core)) == ns_tids
    assert os.kill(child, 0) is None


@pytest.mark.parametrize("method", ["clone", "criu", "auto"])
@pytest.mark.parametrize("who", ["init", "member"])
def test_every_process_of_the_namespace_dumps_by_its_namespace_ids(
    namespaced: Namespaced, programs: dict[str, Path], tmp_path: Path, method: str, who: str
) -> None:
    """The init and a process that is not the init (the threads program, process 2 there):
    CRIU runs inside the namespace for the member and for any clone (a clone is never the
    init), so every core names the process, its parent and its threads as the namespace does.
    ``auto`` takes the clone."""
    init = namespaced.init
    pid = init if who == "init" else namespaced.children(init)[0]
    ns_tids = sorted(
        namespaced.ns_ids(int(t), "NSpid")[-1] for t in os.listdir(f"/proc/{pid}/task")
    )
    proc = dump(pid, "--method", method, "-o", str(tmp_path / "core"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == ("clone" if method == "auto" else method)
    with CoreView(tmp_path / "core") as core:
        ids = (core.prpsinfo["pr_pid"], core.prpsinfo["pr_ppid"])
        threads = sorted(t.pid for t in core.threads)
    assert ids == ((1, 0) if who == "init" else (2, 1))
    assert threads == ns_tids
    if who == "member":
        assert sorted(gdb_lwps(programs["threads"], tmp_path / "core")) == ns_tids
    assert os.kill(pid, 0) is None
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state in ("S", "R")


#: an empty FUSE filesystem, served in the foreground on argv[1] (mfusepy, as `serve` uses)
_FUSE_EMPTY = (
    "import sys, mfusepy; mfusepy.FUSE(mfusepy.Operations(), sys.argv[1], foreground=True)"
)


@pytest.mark.parametrize("method", ["clone", "criu"])
def test_a_fuse_mount_in_the_namespace_is_left_out(
    programs: dict[str, Path], tmp_path: Path, method: str
) -> None:
    """A FUSE mount made inside the target's own mount namespace (as inside a container):
    CRIU cannot dump it nor match it with one of its own, so it is skipped; the dump of a
    process there (sh -> FUSE server, threads) works."""
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    script = f"{sys.executable} -c '{_FUSE_EMPTY}' {mnt} & {programs['threads']} 2; :"
    argv = [
        "unshare", "--pid", "--mount", "--propagation", "private", "--fork", "--kill-child",
        "--", "setsid", "sh", "-c", script,
    ]  # fmt: skip
    proc = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert procs.readline(proc.stdout, 60, "threads in the namespace").startswith("ready")
        (init,) = procs.wait_for(lambda: Namespaced(proc, 0).children(proc.pid), 30, "its init")
        (target,) = [
            kid
            for kid in Namespaced(proc, init).children(init)
            if Path(f"/proc/{kid}/comm").read_text().strip() == "threads"
        ]
        mountinfo = Path(f"/proc/{target}/mountinfo")
        procs.wait_for(lambda: " - fuse" in mountinfo.read_text(), 30, "the FUSE mount")
        out = dump(target, "--method", method, "-o", str(tmp_path / "core"))
        assert out.returncode == 0, out.stderr
        assert f"--skip-mnt={mnt}" in json.loads(out.stdout)["criu_options"]
        assert os.kill(target, 0) is None
    finally:
        procs.kill_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def test_fuse_mountpoints_are_read_from_mountinfo() -> None:
    mountinfo = (
        "36 35 98:0 /m /mnt/a\\040b rw master:1 - fuse.sshfs host:/x rw\n"
        "37 35 98:0 / /tmp ro - tmpfs tmpfs rw\n"
        "38 35 0:9 / /c rw - fuseblk /dev/sdb rw\n"
        "39 35 0:9 / /sys/fs/fuse/connections rw - fusectl fusectl rw\n"
    )
    assert fuse_mountpoints(mountinfo) == ["/mnt/a b", "/c"]

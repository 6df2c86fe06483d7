"""``dump --tree`` through the clones (issue 17): every process of the tree frozen at one
instant, each cloned and dumped by CRIU as its own uid, one core per process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest
from harness.compare import Tolerances, compare_with, restart_diffs
from harness.corefile import CoreView
from harness.kernel import CorePipe
from harness.procstate import read_maps, read_rseq_areas, thread_states
from syslock import core_pattern
from test_dump_servers import HttpLoad, free_port, wait_listening

EXE = Path(sys.executable).parent / "criu-livedump"
NOBODY = 65534


def dump_tree(pid: int, out: Path, *args: str) -> dict[str, object]:
    proc = procs.run(
        [str(EXE), "dump", str(pid), "--tree", "--json", "-o", str(out), "--core-limit",
         "unlimited", *args],
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def globals_in(binary: Path, core: Path, *names: str) -> dict[str, int]:
    """The values of the program's globals *names* in *core*, as gdb reads them."""
    argv = ["gdb", "-batch", "-nx", str(binary), str(core)]
    for name in names:
        argv += ["-ex", f"print {name}"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    values = [int(v) for v in re.findall(r"^\$\d+ = (\d+)$", proc.stdout, re.M)]
    assert len(values) == len(names), proc.stdout + proc.stderr
    return dict(zip(names, values, strict=True))


@pytest.fixture
def sysv_pair(programs: dict[str, Path]) -> Iterator[tuple[int, int]]:
    """(parent, child of nobody) sharing a SysV segment and a pipe, both counting."""
    proc = procs.popen([str(programs["sysv_pair"]), str(NOBODY)], stdout=subprocess.PIPE, text=True)
    try:
        line = procs.readline(proc.stdout, 60, "the pair of processes starting")
        _, parent, child = line.split()
        yield int(parent), int(child)
    finally:
        procs.kill_group(proc)


def test_tree_of_sysv_and_pipe_at_one_instant(
    programs: dict[str, Path], sysv_pair: tuple[int, int], tmp_path: Path
) -> None:
    """CRIU refuses this tree (SysV, two uids without CAP_SYS_RESOURCE), so ``auto`` takes the
    clones. What each process last saw of the other's counter (through the segment, through
    the pipe) is at most that counter in the other's core: both were frozen at one instant.
    A freeze of one process after the other had run on would show it seeing the future."""
    parent, child = sysv_pair
    out = tmp_path / "core"
    data = dump_tree(parent, out)
    assert data["method"] == "clone"
    steps = data["freeze_steps_us"]
    assert isinstance(steps, dict) and set(steps) == {"stop", "save", "fork", "resume"}
    children = data["children"]
    assert isinstance(children, list)
    assert [(c["pid"], c["core_path"]) for c in children] == [(child, f"{out}.{child}")]
    assert Path(f"/proc/{child}").stat().st_uid == NOBODY
    binary = programs["sysv_pair"]
    names = ("role", "mine", "seen_shm", "seen_pipe")
    p = globals_in(binary, out, *names)
    c = globals_in(binary, Path(f"{out}.{child}"), *names)
    assert (p["role"], c["role"]) == (0, 1)
    assert p["mine"] > 0 and c["mine"] > 0 and c["seen_pipe"] > 0
    assert c["seen_shm"] <= p["mine"], (p, c)
    assert c["seen_pipe"] <= p["mine"], (p, c)
    assert p["seen_shm"] <= c["mine"], (p, c)
    # both run on
    assert procs.children(parent) and Path(f"/proc/{child}").exists()


# --- nginx: a root master and two workers of another uid -----------------------------------------


def nginx_conf(tmp_path: Path, port: int) -> Path:
    """A master (root) and two workers (nobody) answering on *port* (no file to serve: the
    workers could not read a test's private directory)."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off; master_process on; worker_processes 2; user nobody nogroup;\n"
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
        "events { worker_connections 64; }\n"
        "http { access_log off; keepalive_requests 100000;\n"
        f"  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;\n"
        f"  scgi_temp_path {tmp_path}/scgi;\n"
        f"  server {{ listen 127.0.0.1:{port}; location / {{ return 200 'hello'; }} }} }}\n"
    )
    return conf


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[str, int, int, list[int]]]:
    """(binary, port, master, workers) of an nginx running as root with workers of nobody."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx is not installed")
    port = free_port()
    (tmp_path / "nginx").mkdir()
    conf = nginx_conf(tmp_path / "nginx", port)
    proc = procs.popen([binary, "-c", str(conf), "-e", str(tmp_path / "nginx" / "error.log")],
                       stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_listening(port, proc)

        def workers() -> list[int]:
            kids = [p for p in procs.children(proc.pid) if os.stat(f"/proc/{p}").st_uid == NOBODY]
            return sorted(kids) if len(kids) == 2 else []

        yield binary, port, proc.pid, procs.wait_for(workers, 60, "nginx's two workers")
    finally:
        procs.kill_group(proc)


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx as root with workers of nobody")
def test_nginx_tree_under_load(nginx: tuple[str, int, int, list[int]], tmp_path: Path) -> None:
    """``dump MASTER --tree`` while clients keep requesting: every request succeeds, three
    cores are written (CRIU's tree dump would fail: two uids, no CAP_SYS_RESOURCE)."""
    _, port, master, workers = nginx
    out = tmp_path / "core"
    # with CAP_SYS_RESOURCE, CRIU's own tree dump would work and auto would take it
    method = ["--method", "clone"] if procs.has_capability(procs.CAP_SYS_RESOURCE) else []
    with HttpLoad(port, "/index.html") as load:
        load.wait_for(100)
        data = dump_tree(master, out, *method)
        after = load.done
        load.wait_for(after + 100)
    assert load.errors == []
    assert data["method"] == "clone"
    children = data["children"]
    assert isinstance(children, list)
    assert sorted(c["pid"] for c in children) == workers
    for pid in (master, *workers):
        core = out if pid == master else Path(f"{out}.{pid}")
        assert core.stat().st_size > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx as root with workers of nobody")
def test_nginx_tree_cores_equal_the_kernels(
    nginx: tuple[str, int, int, list[int]], tmp_path: Path
) -> None:
    """An idle nginx tree: each of the three cores of ``dump MASTER --tree`` equals the
    kernel's core of that process (the kernel-comparison comparator), SIGABRT queued while
    all three are stopped, so that none reacts to another's end first."""
    _, _, master, workers = nginx
    pids = (master, *workers)
    maps = {pid: read_maps(pid) for pid in pids}
    rseq = {pid: read_rseq_areas(pid) for pid in pids}
    out = tmp_path / "core"
    # the clones explicitly: CRIU's own tree dump (auto's choice where it can work, that is
    # with CAP_SYS_RESOURCE) wakes the workers' epoll_wait, and they move on before SIGABRT
    dump_tree(master, out, "--signal", str(int(signal.SIGABRT)), "--method", "clone")
    ours = {pid: out if pid == master else Path(f"{out}.{pid}") for pid in pids}
    dest = CorePipe(tmp_path / "kernel")
    with core_pattern(dest.pattern()):
        # all three stopped first (the master before its workers, whose stops send it
        # SIGCHLD), then SIGABRT queued, then continued, workers first: each dequeues its
        # SIGABRT (lower than SIGCHLD) before running a line, whatever the scheduler does
        for group in ((master,), tuple(workers)):
            for pid in group:
                os.kill(pid, signal.SIGSTOP)
            procs.wait_for(
                lambda g=group: all(set(thread_states(p).values()) == {"T"} for p in g),  # type: ignore[misc]
                30,
                "nginx stopped",
            )
        for pid in pids:
            os.kill(pid, signal.SIGABRT)
        # the workers die first, while their parent is still the (stopped) master
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        kernel = {pid: dest.collect(pid) for pid in workers}
        os.kill(master, signal.SIGCONT)
        kernel[master] = dest.collect(master)
    found = {}
    for pid in pids:
        with CoreView(ours[pid]) as a, CoreView(kernel[pid]) as b:
            diffs = compare_with(a, b, Tolerances(), maps=maps[pid], rseq=rseq[pid])
            found[pid] = diffs + restart_diffs(a, b)
    assert found == {pid: [] for pid in pids}, found

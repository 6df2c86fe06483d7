"""``dump --tree`` through the clones (issue 17): every process of the tree frozen at one
instant, each cloned and dumped by CRIU as its own uid, one core per process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest

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

"""Pages a fork does not copy, read from the frozen target
(criu_livedump/snapshot/clone/fork_lost.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from criu_livedump.linux.procfs import smaps_entries
from criu_livedump.snapshot.clone import fork_lost

PAGE = mmap.PAGESIZE

#: a MADV_DONTFORK area of 16 pages with pages 0, 1, 5 and 9..12 written (byte = page number
#: + 1), a MADV_WIPEONFORK one of 4 pages all written (0x77); prints both addresses, then
#: unmaps the first when told to on stdin
TARGET = """
import ctypes, mmap, sys
P = mmap.PAGESIZE
keep = mmap.mmap(-1, 16 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
keep.madvise(mmap.MADV_DONTFORK)
for i in (0, 1, 5, 9, 10, 11, 12):
    keep[i * P : (i + 1) * P] = bytes([i + 1]) * P
wipe = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
wipe.madvise(18)  # MADV_WIPEONFORK
wipe[:] = b"\\x77" * 4 * P
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(hex(addr(keep)), hex(addr(wipe)), flush=True)
if sys.stdin.readline() == "unmap\\n":
    keep.close()
    print("done", flush=True)
sys.stdin.readline()
"""


@contextmanager
def target() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        keep, wipe = (int(x, 16) for x in proc.stdout.readline().split())
        yield proc, keep, wipe
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def _own_runs(scan: bool) -> tuple[list[tuple[int, int]], int]:
    buf = mmap.mmap(-1, 16 * PAGE)
    for i in (0, 1, 5, 9, 10, 11, 12):
        buf[i * PAGE] = 1
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        walk = fork_lost._scan if scan else fork_lost._read_pagemap
        runs = [(lo - base, hi - base) for lo, hi in walk(fd, base, base + 16 * PAGE)]
    finally:
        os.close(fd)
    return runs, base


@pytest.mark.parametrize("scan", [True, False], ids=["PAGEMAP_SCAN", "pagemap"])
def test_page_runs(scan: bool) -> None:
    runs, _ = _own_runs(scan)
    assert runs == [(0, 2 * PAGE), (5 * PAGE, 6 * PAGE), (9 * PAGE, 13 * PAGE)]


@pytest.mark.skipif(os.geteuid() != 0, reason="reads another process's memory")
def test_copy_while_frozen_and_what_changed_is_left_out(tmp_path: Path) -> None:
    with target() as (proc, keep, wipe):
        copier = fork_lost.prepare(proc.pid, smaps_entries(proc.pid), tmp_path)
        assert copier is not None
        assert {(c.start, c.kind) for c in copier.candidates} == {
            (keep, "dontfork"),
            (wipe, "wipeonfork"),
        }
        copier.copy()
        areas = {a.kind: a for a in copier.finish()}
    data = (tmp_path / f"fork-lost-{proc.pid}.bin").read_bytes()
    d = areas["dontfork"]
    assert [(lo - keep, n) for lo, n, _ in d.runs] == [
        (0, 2 * PAGE), (5 * PAGE, PAGE), (9 * PAGE, 4 * PAGE),
    ]  # fmt: skip
    for lo, n, off in d.runs:
        page = (lo - keep) // PAGE
        assert data[off : off + n] == b"".join(
            bytes([p + 1]) * PAGE for p in range(page, page + n // PAGE)
        )
    (w,) = areas["wipeonfork"].runs
    assert w[:2] == (wipe, 4 * PAGE) and data[w[2] : w[2] + 4 * PAGE] == b"\x77" * 4 * PAGE
    assert len(data) == 11 * PAGE  # the side file keeps exactly the copied pages

    (tmp_path / "again").mkdir()
    with target() as (proc, keep, wipe):
        copier = fork_lost.prepare(proc.pid, smaps_entries(proc.pid), tmp_path / "again")
        assert copier is not None
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("unmap\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"
        copier.copy()
        assert [a.kind for a in copier.finish()] == ["wipeonfork"]


def test_nothing_to_copy(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert fork_lost.prepare(proc.pid, smaps_entries(proc.pid), tmp_path) is None
        assert list(tmp_path.iterdir()) == []
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_no_room_for_the_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A side directory without room: no copy (the core goes without those bytes, with the
    warnings a fork's view brings), never a SIGBUS from writing pages that cannot exist."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], check=True)
    try:
        with target() as (proc, _, _):
            assert fork_lost.prepare(proc.pid, smaps_entries(proc.pid), small) is None
        assert list(small.iterdir()) == []
        assert "no room in" in caplog.text
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)

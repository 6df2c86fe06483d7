"""The write tracker of method precopy (snapshot/precopy/tracker.py) on real processes: the
pages it reports are exactly those written, the target never waits, and nothing of ours stays
in the target once our descriptor is closed or we are killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from criu_livedump.errors import BlockerError
from criu_livedump.linux import PAGE_SIZE, pagemap
from criu_livedump.snapshot.precopy import tracker
from tests import procs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="injects syscalls with ptrace")

PAGES = 64
ROOT = Path(__file__).resolve().parent.parent


class Target:
    """precopy_target: *count* pages at *base*, written or read on command (and, started
    with ``dontfork``, as many MADV_DONTFORK pages at *dontfork*)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        words = procs.readline(proc.stdout, 10, "precopy_target").split()
        self.base, self.count = int(words[1], 16), int(words[2])
        self.dontfork = int(words[3], 16) if len(words) > 3 else 0

    def do(self, op: str, first: int, count: int) -> None:
        """One command; a target blocked on a protected page would not answer in time."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{op} {first} {count}\n")
        self.proc.stdin.flush()
        assert procs.readline(self.proc.stdout, 10, f"{op} {first} {count}").startswith("ok")

    def pages(self, runs: list[tuple[int, int]]) -> list[int]:
        """The page numbers of our mapping among *runs*."""
        end = self.base + self.count * PAGE_SIZE
        return [
            (a - self.base) // PAGE_SIZE
            for lo, hi in runs
            for a in range(max(lo, self.base), min(hi, end), PAGE_SIZE)
        ]

    def query(self, *, inverted: int, mask: int) -> list[int]:
        """Pages of our mapping in a PAGEMAP_SCAN category (no write-protect touched)."""
        fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        try:
            end = self.base + self.count * PAGE_SIZE
            return self.pages(
                list(pagemap.scan(fd, self.base, end, inverted=inverted, mask=mask, returned=mask))
            )
        finally:
            os.close(fd)

    def protected(self) -> list[int]:
        """Pages still write-protected: not PAGE_IS_WRITTEN (the pte's uffd-wp bit or marker,
        whatever the area's registration)."""
        return self.query(inverted=pagemap.PAGE_IS_WRITTEN, mask=pagemap.PAGE_IS_WRITTEN)

    def wp_allowed(self) -> list[int]:
        """Pages of an area registered for asynchronous write-protect."""
        return self.query(inverted=0, mask=pagemap.PAGE_IS_WPALLOWED)

    def holds_ours(self) -> bool:
        """A userfaultfd among the target's descriptors, by link or by fdinfo."""
        fdinfo = Path(f"/proc/{self.pid}/fdinfo")
        infos = [p.read_text() for p in fdinfo.iterdir()]
        return tracker.holds_userfaultfd(self.pid) or any("API:" in i for i in infos)


T = TypeVar("T", bound=Target)


@contextmanager
def started(
    programs: dict[str, Path], *args: str, pages: int = PAGES, kind: type[T] = Target
) -> Iterator[T]:
    """precopy_target of *pages* pages started with *args*, as a *kind*; killed on leaving."""
    proc = procs.popen(
        [programs["precopy_target"], str(pages), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield kind(proc)
    finally:
        procs.kill_group(proc)


def test_scan_returns_exactly_the_pages_written(programs: dict[str, Path]) -> None:
    with started(programs) as t:
        t.do("w", 0, 20)  # populated before arming; 20.. never populated
        with tracker.arm(t.pid) as tr:
            assert tr.areas and not tr.refused
            assert t.pages(tr.scan()) == []
            t.do("r", 0, PAGES)  # reading is no write
            t.do("w", 3, 2)
            t.do("w", 40, 3)  # never populated: caught through WP_UNPOPULATED
            assert t.pages(tr.scan()) == [3, 4, 40, 41, 42]
            t.do("w", 7, 1)
            t.do("w", 41, 1)
            assert t.pages(tr.scan()) == [7, 41]
            assert t.pages(tr.scan()) == []
            assert not t.holds_ours()


def test_dontneed_counts_as_written_and_a_replaced_area_is_lost(
    programs: dict[str, Path],
) -> None:
    with started(programs) as t:
        t.do("w", 0, PAGES)
        with tracker.arm(t.pid) as tr:
            t.do("d", 8, 2)  # the kernel's core then reads zeros there: a change to copy
            assert t.pages(tr.scan()) == [8, 9]
            area = next(a for a in tr.areas if a[0] <= t.base < a[1])
            t.do("w", 30, 1)
            t.do("m", 50, 1)  # a new mapping, not registered, splits the area
            tr.scan()
            assert area not in tr.areas
            assert area in tr.lost
            t.do("w", 0, PAGES)


def test_closing_clears_every_write_protect(programs: dict[str, Path]) -> None:
    with started(programs) as t:
        t.do("w", 0, 10)
        tr = tracker.arm(t.pid)
        t.do("w", 5, 1)
        assert t.protected() == [p for p in range(PAGES) if p != 5]
        assert t.wp_allowed() == list(range(PAGES))
        tr.close()
        assert t.protected() == []
        assert t.wp_allowed() == []
        t.do("w", 0, PAGES)


_TRACK = """
import sys, time
from criu_livedump.snapshot.precopy import tracker
tr = tracker.arm(int(sys.argv[1]))
print("armed", len(tr.areas), flush=True)
time.sleep(60)
"""


def test_killed_tracker_leaves_the_target_as_it_was(programs: dict[str, Path]) -> None:
    with started(programs) as t:
        t.do("w", 0, 10)
        child = procs.popen(
            [sys.executable, "-c", _TRACK, str(t.pid)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert procs.readline(child.stdout, 20, "tracker child").startswith("armed")
            assert t.protected() == list(range(PAGES))
            t.do("w", 2, 1)
        finally:
            procs.kill_group(child)
        assert child.returncode == -signal.SIGKILL  # reaped by kill_group
        assert t.protected() == []
        assert t.wp_allowed() == []
        assert not t.holds_ours()
        t.do("w", 0, PAGES)


def test_refuses_a_target_that_uses_userfaultfd(programs: dict[str, Path]) -> None:
    with started(programs, "uffd") as t:
        assert tracker.holds_userfaultfd(t.pid)
        with pytest.raises(BlockerError, match="--method precopy: it uses userfaultfd itself"):
            tracker.arm(t.pid)
        assert t.wp_allowed() == []
        t.do("w", 0, 1)

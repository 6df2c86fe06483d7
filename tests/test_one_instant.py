"""A live core is one instant of the process (issue 14's consistency acceptance).

tests/programs/seqwriter.c runs writer threads that stamp a sequence number into many pages,
never blocking, while the dump runs; each writer's position is in its registers. The core must
show every page exactly as it was at the instant its writer's registers were read: no page
newer, none older (tests/harness/instant.py). Each method is checked; a core whose pages come
from another instant than its registers (a copy without a freeze, another dump's pages) is
shown to fail the same check.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import procs
import pytest
from harness.cases import LiveDump
from harness.corefile import CoreView
from harness.instant import (
    PAGE,
    Layout,
    Writer,
    expected_stamp,
    instant_diffs,
    stamp_diffs,
    writers,
)
from harness.launcher import Target, start_target

pytestmark = [pytest.mark.live]

#: 4 writers of 32 MiB each: 128 MiB stamped while the dump runs
THREADS = 4
PAGES = 8192
#: the writers never block: spare the machine's other work
NICE = 10
WAIT = 120.0


@contextmanager
def seqwriter(programs: dict[str, Path]) -> Iterator[tuple[Target, Layout]]:
    """seqwriter started, once every writer has stamped each of its pages at least once."""
    with start_target(
        programs["seqwriter"], str(THREADS), str(PAGES), f"nice={NICE}", rseq=False
    ) as target:
        layout = Layout.parse(target.ready_line)
        last_pages = [layout.base(i + 1) - PAGE for i in range(THREADS)]
        procs.wait_for(
            lambda: all(live_reader(target.pid)(a, 8) != bytes(8) for a in last_pages),
            WAIT,
            "every writer's first sweep",
        )
        yield target, layout


def live_reader(pid: int) -> Callable[[int, int], bytes]:
    """Reads the running target's memory (/proc/PID/mem): no freeze, no instant."""

    def read(addr: int, size: int) -> bytes:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, size, addr)
        finally:
            os.close(fd)

    return read


def run_time_ns(pid: int, tid: int) -> int:
    """Time *tid* has spent on a CPU (/proc/PID/task/TID/schedstat, first field)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def wait_until_every_writer_ran(pid: int, found: list[Writer], ns: int) -> None:
    """Bounded wait until each writer has run *ns* more on a CPU: thousands of stamps."""
    start = {w.tid: run_time_ns(pid, w.tid) for w in found}
    procs.wait_for(
        lambda: all(run_time_ns(pid, w.tid) - start[w.tid] >= ns for w in found),
        WAIT,
        f"every writer running {ns} ns more",
    )


def one_instant(core: Path, layout: Layout) -> tuple[list[Writer], list[str]]:
    with CoreView(core) as view:
        found = writers(view, layout)
        return found, instant_diffs(layout, found, view.read)


@pytest.mark.parametrize("method", ["clone", "criu", "precopy"])
def test_the_core_is_one_instant(programs: dict[str, Path], tmp_path: Path, method: str) -> None:
    with seqwriter(programs) as (target, layout):
        core = LiveDump(method).dump(target.pid, tmp_path)
        found, diffs = one_instant(core, layout)
        assert diffs == [], f"--method {method}: not one instant:\n" + "\n".join(diffs)
        # the writers went on writing: the dump did not leave them stopped
        wait_until_every_writer_ran(target.pid, found, 1_000_000)
        assert target.alive()


def test_pages_of_another_instant_are_caught(programs: dict[str, Path], tmp_path: Path) -> None:
    """The registers of one dump with pages read later, by a copy without a freeze or by a
    second dump, are judged not one instant; each dump alone is."""
    for d in ("1", "2"):
        (tmp_path / d).mkdir()
    with seqwriter(programs) as (target, layout):
        first, diffs = one_instant(LiveDump("clone").dump(target.pid, tmp_path / "1"), layout)
        assert diffs == []
        wait_until_every_writer_ran(target.pid, first, 1_000_000)
        torn = instant_diffs(layout, first, live_reader(target.pid))
        assert len(torn) >= len(first) and not any("older" in d for d in torn)
        second = LiveDump("clone").dump(target.pid, tmp_path / "2")
        again, diffs = one_instant(second, layout)
        assert diffs == []
        assert all(a.stamps > f.stamps for a, f in zip(again, first, strict=True))
        with CoreView(second) as view:
            mixed = instant_diffs(layout, first, view.read)
        assert len(mixed) >= len(first) and not any("older" in d for d in mixed)


@pytest.mark.parametrize("stamps", [0, 1, 7, 8, 9, 8 * 5 + 3])
def test_the_check_of_one_writer(stamps: int) -> None:
    """stamp_diffs on a writer of 8 pages: its instant passes, with or without the pending
    store; any one page a stamp newer or older fails."""
    pages = 8
    values = [expected_stamp(stamps, k, pages) for k in range(pages)]
    assert stamp_diffs(stamps, values) == []
    pending = list(values)
    pending[stamps % pages] = stamps + 1
    assert stamp_diffs(stamps, pending) == []
    for k in range(pages):
        for delta in (pages, -pages):
            if values[k] + delta < 0 or (k == stamps % pages and delta > 0):
                continue
            changed = list(values)
            changed[k] += delta
            assert len(stamp_diffs(stamps, changed)) == 1, (k, delta)

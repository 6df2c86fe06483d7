"""A live core is one instant of the process (issue 14's consistency acceptance).

tests/programs/seqwriter.c runs writer threads that stamp a sequence number into many pages,
never blocking, while the dump runs; each writer's position is in its registers. The core must
show every page exactly as it was at the instant its writer's registers were read: no page
newer, none older (tests/harness/instant.py). Each method is checked; a core whose pages come
from another instant than its registers (a copy without a freeze, another dump's pages) is
shown to fail the same check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from harness.cases import LiveDump
from harness.corefile import CoreView
from harness.instant import (
    Layout,
    Writer,
    expected_stamp,
    instant_diffs,
    live_reader,
    seqwriter,
    stamp_diffs,
    wait_until_writers_ran,
    writers,
)

pytestmark = [pytest.mark.live]

#: 4 writers of 32 MiB each: 128 MiB stamped while the dump runs; they never block: at nice
#: 10 they spare the machine's other work
WRITERS = ("4", "8192", "nice=10")


def one_instant(core: Path, layout: Layout) -> tuple[list[Writer], list[str]]:
    with CoreView(core) as view:
        found = writers(view, layout)
        return found, instant_diffs(layout, found, view.read)


@pytest.mark.parametrize(
    ("method", "capture"), [("clone", "stream"), ("criu", "images"), ("precopy", "stream")]
)
def test_the_core_is_one_instant(tmp_path: Path, method: str, capture: str) -> None:
    with seqwriter(*WRITERS) as (target, layout):
        core = LiveDump(method, capture=capture).dump(target.pid, tmp_path)
        found, diffs = one_instant(core, layout)
        assert diffs == [], f"--method {method}: not one instant:\n" + "\n".join(diffs)
        # the writers went on writing: the dump did not leave them stopped
        wait_until_writers_ran(target.pid, [w.tid for w in found])
        assert target.alive()


#: 4 writers of 1 MiB each beside 256 MiB written once, in one VMA (adjacent anonymous
#: mappings merge): the writers' pages are under 1/32 of it, so precopy keeps the area out of
#: the fork and copies what they wrote last inside the freeze (with the writers above, the whole
#: area is written again each round and goes to the fork)
MOSTLY_STILL = ("4", "256", "nice=10", "fill=256")


def test_precopy_copying_written_pages_in_the_freeze_is_one_instant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="criu_livedump.snapshot.precopy")
    with seqwriter(*MOSTLY_STILL) as (target, layout):
        core = LiveDump("precopy", capture="stream").dump(target.pid, tmp_path)
        found, diffs = one_instant(core, layout)
        assert diffs == [], "--method precopy: not one instant:\n" + "\n".join(diffs)
        wait_until_writers_ran(target.pid, [w.tid for w in found])
    left_out = [r.getMessage() for r in caplog.records if "left out of the fork" in r.getMessage()]
    assert len(left_out) == 1 and " 0 areas left out" not in left_out[0], caplog.text


def test_pages_of_another_instant_are_caught(tmp_path: Path) -> None:
    """The registers of one dump with pages read later, by a copy without a freeze or by a
    second dump, are judged not one instant; each dump alone is."""
    for d in ("1", "2"):
        (tmp_path / d).mkdir()
    with seqwriter(*WRITERS) as (target, layout):
        first, diffs = one_instant(
            LiveDump("clone", capture="stream").dump(target.pid, tmp_path / "1"), layout
        )
        assert diffs == []
        wait_until_writers_ran(target.pid, [w.tid for w in first])
        torn = instant_diffs(layout, first, live_reader(target.pid))
        assert len(torn) >= len(first) and not any("older" in d for d in torn)
        second = LiveDump("clone", capture="stream").dump(target.pid, tmp_path / "2")
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

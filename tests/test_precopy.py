"""Method precopy (criu_livedump/snapshot/precopy/) on real processes: the rounds copy exactly
the pages written, the core equals the clone method's core of the same blocked process, the
MADV_DONTFORK flags are as they were, the fallbacks say why, and a tool killed in a round
leaves the target as it was."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import procs
import pytest
import test_precopy_tracker as tracker_test
from harness.compare import compare_cores
from harness.corefile import CoreView
from harness.procstate import read_maps, read_rseq_areas, thread_states

from criu_livedump.linux import PAGE_SIZE
from criu_livedump.linux.procfs import MapsEntry, smaps_entries
from criu_livedump.request import build_request
from criu_livedump.snapshot.clone import inject
from criu_livedump.snapshot.precopy import rounds, tracker
from criu_livedump.snapshot.precopy.method import PrecopySnapshot
from criu_livedump.target import inspect

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(os.geteuid() != 0, reason="injects syscalls with ptrace"),
]

#: 8 MiB: above method.MIN_AREA, so the area is pre-copied
PAGES = 2048
EXE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "criu-livedump"


class Target(tracker_test.Target):
    """precopy_target, with what these tests read of it besides."""

    def memory(self, addr: int, length: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb") as f:
            f.seek(addr)
            return f.read(length)

    def vmflags(self) -> dict[int, frozenset[str]]:
        return {e.start: e.vmflags for e in smaps_entries(self.pid)}

    def tracked_pages(self) -> int:
        """Pages of our area still write-protected or registered (none once we are gone)."""
        return len(self.protected()) + len(self.wp_allowed())


@contextmanager
def started(programs: dict[str, Path], *args: str, pages: int = PAGES) -> Iterator[Target]:
    with tracker_test.started(programs, *args, pages=pages, kind=Target) as t:
        yield t


def _dump(pid: int, core: Path, method: str, *extra: str) -> tuple[dict[str, object], list[str]]:
    proc = procs.run(
        [str(EXE), "-v", "dump", str(pid), "-o", str(core), "--method", method,
         "--core-limit", "unlimited", "--json", *extra],
    )  # fmt: skip
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data, stderr.splitlines()


def test_rounds_copy_exactly_the_written_pages(programs: dict[str, Path], tmp_path: Path) -> None:
    with started(programs) as t:
        t.do("w", 0, 1500)  # 1500.. never populated
        area = (t.base, t.base + PAGES * PAGE_SIZE)
        before = rounds.present(t.pid, [area])
        with tracker.arm(t.pid, [area]) as tr:
            assert tr.areas == [area]
            store = rounds.SideStore.create(t.pid, tmp_path / "side", tr.areas)
            try:
                (first,) = rounds.run_rounds(
                    tr, store, before, max_rounds=1, max_bytes=1 << 30, small=0
                )
                assert first.found == first.copied == 1500 * PAGE_SIZE
                t.do("w", 3, 2)
                t.do("w", 1800, 1)  # never populated before: caught too
                runs = tr.scan()
                assert t.pages(runs) == [3, 4, 1800]
                assert store.copy(runs) == 3 * PAGE_SIZE
                assert t.pages([(a, a + n) for a, n, _ in store.runs(*area)]) == [
                    *range(1500),
                    1800,
                ]
                side = (tmp_path / "side").read_bytes()
                for addr, length, offset in store.runs(*area):
                    assert side[offset : offset + length] == t.memory(addr, length)
            finally:
                store.close()


def test_core_equals_the_clones_and_dontfork_flags_are_restored(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    with started(programs, "dontfork") as t:
        t.do("w", 0, 1500)
        t.do("d", 10, 5)  # present, then dropped: zeros in both cores
        # the same blocked state for both dumps: in read(), stdin's lock taken
        procs.wait_for(lambda: thread_states(t.pid)[t.pid] == "S", 10, "blocked in read()")
        before = t.vmflags()
        assert "dc" not in before[t.base] and "dc" in before[t.dontfork]
        maps, rseq = read_maps(t.pid), read_rseq_areas(t.pid)
        clone, _ = _dump(t.pid, tmp_path / "clone.core", "clone")
        report, stderr = _dump(t.pid, tmp_path / "precopy.core", "precopy")
        assert t.vmflags() == before
        t.do("w", 0, PAGES)  # the target runs on, its area writable
    assert (report["method"], report["method_reason"]) == ("precopy", "requested")
    assert clone["method"] == "clone"
    steps = report["freeze_steps_us"]
    assert isinstance(steps, dict)
    assert set(steps) == {"stop", "save", "scan_copy", "madvise", "fork", "resume"}
    assert any("1 areas left out of the fork in 1 madvise ranges" in ln for ln in stderr), stderr
    stats = report["precopy"]
    assert isinstance(stats, dict) and stats["areas_left_out"] == 1
    rounds = stats["rounds"]
    assert rounds and rounds[0]["found_bytes"] >= 1495 * PAGE_SIZE  # round 1: present pages
    assert (
        stats["copied_bytes"]
        == sum(r["copied_bytes"] for r in rounds) + stats["last_written_bytes"]
    )
    assert clone["precopy"] == {}
    with CoreView(tmp_path / "precopy.core") as ours, CoreView(tmp_path / "clone.core") as ref:
        assert compare_cores(ours, ref, maps=maps, rseq=rseq) == []
        assert ours.read(t.dontfork, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
        assert ours.read(t.base + 10 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
        assert ours.read(t.base + 15 * PAGE_SIZE - 1, 2) == b"\x00\x01"


def test_fallbacks_say_why(programs: dict[str, Path], tmp_path: Path) -> None:
    with started(programs, "uffd") as t:
        t.do("w", 0, PAGES)
        report, stderr = _dump(t.pid, tmp_path / "uffd.core", "precopy")
        assert report["method"] == "clone"
        assert str(report["method_reason"]).startswith("fallback: it uses userfaultfd itself")
        warned = [ln for ln in stderr if ln.startswith("warning:")]
        assert len(warned) == 1 and "dumped as --method clone does" in warned[0], stderr
    with started(programs, pages=64) as t:
        report, _ = _dump(t.pid, tmp_path / "small.core", "precopy")
        assert report["method"] == "clone"
        assert "no private anonymous area of 4 MiB" in str(report["method_reason"])


@pytest.mark.parametrize("step", ["armed", "round-1"])
def test_killed_in_a_round_leaves_the_target_clean(
    programs: dict[str, Path], tmp_path: Path, step: str
) -> None:
    with started(programs) as t:
        t.do("w", 0, PAGES)
        tool = procs.popen(
            [str(EXE), "dump", str(t.pid), "-o", str(tmp_path / "core"), "--method", "precopy",
             "--core-limit", "unlimited", "--scratch", str(tmp_path)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, rounds.PAUSE_ENV: step},
        )  # fmt: skip
        try:
            assert procs.readline(tool.stderr, 60, f"paused {step}") == f"paused {step}\n"
            assert t.tracked_pages() > 0  # the control: tracked while the tool lives
        finally:
            procs.kill_group(tool)
        assert tool.returncode == -signal.SIGKILL
        # the dump runs in a session of its own (linux.sched.own_session), killed with the
        # command through PR_SET_PDEATHSIG: its userfaultfd goes a moment after the command
        procs.wait_for(lambda: t.tracked_pages() == 0, 10, "every write-protect cleared")
        assert not tracker.holds_userfaultfd(t.pid)
        assert not any("API:" in p.read_text() for p in Path(f"/proc/{t.pid}/fdinfo").iterdir())
        t.do("w", 0, PAGES)


def test_an_area_written_too_much_goes_to_the_fork(tmp_path: Path) -> None:
    """The last written set is copied inside the freeze only where that is quicker than the
    fork's copy of the area's page tables (rounds.PAGE_OVER_PTE); no process is touched."""
    lo, hi = 1 << 30, (1 << 30) + 64 * PAGE_SIZE
    other = (hi, hi + 64 * PAGE_SIZE)
    store = rounds.SideStore.create(0, tmp_path / "side", [(lo, hi), other])
    try:
        for slot in store.slots:
            slot.copied[:] = b"\x01" * len(slot.copied)  # every page held
        final = rounds.FinalCopy(cast(tracker.Tracker, SimpleNamespace(pid=0)), store, frozenset())
        areas: dict[tuple[int, int], list[MapsEntry]] = {(lo, hi): [], other: []}
        few = 64 // rounds.PAGE_OVER_PTE  # pages: as costly as the fork, no more
        runs = [(lo, lo + few * PAGE_SIZE), (other[0], other[0] + (few + 1) * PAGE_SIZE)]
        assert final._keep_busy(areas, runs) == runs[:1]
        assert list(areas) == [(lo, hi)]
    finally:
        store.close()


def test_a_full_scratch_falls_back_to_the_clone(
    programs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: rounds.SideStore, runs: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rounds.SideStore, "copy", full)
    with started(programs) as t:
        t.do("w", 0, PAGES)
        facts = inspect(t.pid)
        request = build_request(output=str(tmp_path / "core"), method="precopy")
        with PrecopySnapshot(facts, request, tmp_path) as snap:
            snap.prepare()  # the target is not frozen yet: nothing else to undo
            assert snap.fallback == (
                "no room for its pages in the scratch directory (No space left on device)"
            )
            assert not (tmp_path / "precopy" / f"pages-{t.pid}.bin").exists()
        assert t.tracked_pages() == 0
        t.do("w", 0, PAGES)


def test_killed_between_dontfork_and_the_clone_gives_the_flags_back(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    """Killed inside the freeze with the area MADV_DONTFORK: rounds.Restorer gives it
    MADV_DOFORK back (else every later fork of the target would lack it)."""
    with started(programs) as t:
        t.do("w", 0, PAGES)
        argv = [EXE, "dump", str(t.pid), "-o", str(tmp_path / "core"), "--method", "precopy",
                "--core-limit", "unlimited", "--scratch", str(tmp_path)]  # fmt: skip
        env = {**os.environ, inject.PAUSE_ENV: "dontfork"}
        with procs.paused_at(argv, env, "dontfork"):
            assert "dc" in t.vmflags()[t.base]  # the control: left out of the fork now
        procs.wait_for(lambda: "dc" not in t.vmflags()[t.base], 10, "MADV_DOFORK given back")
        assert t.tracked_pages() == 0
        assert not tracker.holds_userfaultfd(t.pid)
        t.do("w", 0, PAGES)

"""The ``precopy`` method (issue 14): the clone's freeze without the page-table copy of the
big areas, whose pages were copied while the target ran.

1. While the target runs (:meth:`PrecopySnapshot.prepare`): its writable private anonymous
   areas of :data:`MIN_AREA` resident bytes or more are tracked
   (:func:`~criu_livedump.snapshot.precopy.tracker.arm`) and copied in rounds into a side file
   (:func:`~criu_livedump.snapshot.precopy.rounds.run_rounds`).
2. The clone's freeze (:mod:`criu_livedump.snapshot.clone.inject`), with
   :class:`~criu_livedump.snapshot.precopy.rounds.FinalCopy` around the injected clone: the
   last written pages read (into the side file once the target runs), the areas set
   MADV_DONTFORK for the fork, MADV_DOFORK after it.
   The userfaultfd is closed once the target runs again (closing clears every write-protect,
   which takes about 100 ms per GiB: never inside the freeze).
3. CRIU dumps the small clone as for method clone; the pre-copied areas join its images as a
   fork's lost areas do (:func:`criu_livedump.snapshot.clone.images.rewrite_images`).

A target that already uses userfaultfd, a kernel without asynchronous write-protect, or a
target with no area worth pre-copying is dumped as method clone does, with one line saying so;
the report names the method that ran and why.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Final

from criu_livedump.errors import BlockerError
from criu_livedump.linux import pagemap
from criu_livedump.linux.procfs import read_maps, smaps_entries
from criu_livedump.request import DumpRequest, Method
from criu_livedump.snapshot.base import Snapshotted
from criu_livedump.snapshot.clone.method import CloneSnapshot
from criu_livedump.snapshot.criu import DumpResult
from criu_livedump.snapshot.precopy import rounds, tracker
from criu_livedump.target import TargetFacts

__all__ = ["AUTO_MIN_RSS", "MIN_AREA", "PrecopySnapshot"]

log = logging.getLogger(__name__)

#: an area is pre-copied from this many resident bytes on: below it, the page tables a fork
#: copies for it take less time than the two injected madvise calls it would cost
MIN_AREA: Final = 4 << 20
#: rounds at most, and bytes copied at most in all (times the tracked areas' resident size)
MAX_ROUNDS: Final = 8
MAX_BYTES_FACTOR: Final = 2
#: a written set this small is copied inside the freeze at once: no further round
SMALL: Final = 1 << 20
#: ``auto`` picks precopy from this resident size on. Measured here (bench/workload.c, 2
#: cores at load 15-25, freeze steps in ms), clone's fork step against precopy's scan_copy +
#: madvise + fork: 256 MiB 7.7-136 against 1.4-2.9; 1 GiB 77-372 against 1.5-8; 4 GiB 340-467
#: against 4.8-9.8 (stop and save are the same code in both). On a quiet machine the fork
#: copies page tables at 26 ms per GiB (issue 14): from 512 MiB (13 ms) that is above the
#: heartbeat's noise (3-10 ms); below it, the rounds' copy of the memory (about twice clone's
#: wall time) buys nothing one can measure. The thread count does not enter: the stop and save
#: steps, which grow with it, are the same for both methods.
AUTO_MIN_RSS: Final = 512 << 20


#: the side file cannot grow: the dump goes on as clone's, whose pages go to the core
_NO_ROOM: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM})


class PrecopySnapshot(CloneSnapshot):
    """Method clone with the big areas pre-copied while the target runs (see the module)."""

    method: ClassVar[Method] = Method.PRECOPY

    def __init__(self, facts: TargetFacts, request: DumpRequest, work: Path) -> None:
        super().__init__(facts, request, work)
        self._tracker: tracker.Tracker | None = None
        self._store: rounds.SideStore | None = None
        self._final: rounds.FinalCopy | None = None
        self._rounds: list[rounds.Round] = []
        #: why method clone's way ran instead, when it did
        self.fallback = ""
        self._small = False

    @classmethod
    def refusals(cls, facts: TargetFacts, *, tree: bool) -> tuple[str, ...]:
        reasons = list(super().refusals(facts, tree=tree))
        if tree:
            reasons.append("--tree is not supported by --method precopy")
        return tuple(reasons)

    @classmethod
    def auto_declines(cls, facts: TargetFacts) -> str | None:
        if facts.rss < AUTO_MIN_RSS:
            return (
                f"resident {facts.rss / 2**20:.0f} MiB, under the {AUTO_MIN_RSS >> 20} MiB from"
                " which precopy freezes shorter than clone"
            )
        return None

    def prepare(self) -> None:
        pid = self.facts.pid
        try:
            self._precopy()
        except BlockerError as e:
            self._drop()
            self.fallback = e.message.split(": ", 1)[-1]
        except OSError as e:
            if e.errno not in _NO_ROOM:
                raise
            self._drop()
            self.fallback = f"no room for its pages in the scratch directory ({e.strerror})"
        if self.fallback:
            # nothing big enough to pre-copy is no failure: the clone's way is the better one
            level = logging.INFO if self._small else logging.WARNING
            log.log(level, "process %d: dumped as --method clone does: %s", pid, self.fallback)
        super().prepare()
        if self._tracker is not None and self._store is not None:
            prepared = self._prepared[0]
            ok = rounds.eligible(prepared.smaps, self._tracker.areas)
            self._final = rounds.FinalCopy(self._tracker, self._store, ok)
            prepared.fork_hook = self._final

    def _precopy(self) -> None:
        """Arm the tracker on the big areas and run the rounds (step 1)."""
        pid = self.facts.pid
        if tracker.holds_userfaultfd(pid):
            self.fallback = "it uses userfaultfd itself; its writes cannot be tracked"
            return
        areas = _candidates(pid)
        if not areas:
            self.fallback = f"no private anonymous area of {MIN_AREA >> 20} MiB or more"
            self._small = True
            return
        before = rounds.present(pid, areas)
        self._tracker = tr = tracker.arm(pid, list(areas))
        for m, why in tr.refused:
            log.info("process %d: area %#x-%#x goes to the fork: %s", pid, m.start, m.end, why)
        rounds.hook("armed")
        if not tr.areas:
            self.fallback = "the kernel registered none of its areas for write-protect"
            self._drop()
            return
        side = self.work / "precopy"
        side.mkdir(mode=0o700)
        self._store = rounds.SideStore.create(pid, side / f"pages-{pid}.bin", tr.areas)
        tracked = sum(areas[a] for a in tr.areas if a in areas)
        self._rounds = rounds.run_rounds(
            tr, self._store, before, max_rounds=MAX_ROUNDS, max_bytes=MAX_BYTES_FACTOR * tracked,
            small=SMALL,
        )  # fmt: skip

    def freeze(self) -> None:
        restorer = rounds.Restorer()
        if self._final is not None and self._tracker is not None:
            ranges = rounds.joined(sorted(set(self._tracker.areas) & self._final.eligible))
            restorer = rounds.Restorer.start(self.facts.pid, ranges, self._prepared[0].suspend)
        try:
            try:
                super().freeze()
            finally:
                restorer.dismiss()
            rounds.hook("resumed")
            if self._final is not None:
                self._final.flush()
        finally:
            # the target runs again: closing clears every write-protect of ours
            t0 = time.monotonic()
            self._drop(keep_store=True)
            log.info("process %d: userfaultfd closed in %.1f ms", self.facts.pid,
                     (time.monotonic() - t0) * 1e3)  # fmt: skip
        if self._final is not None:
            clone = self._running_clones()[0]
            clone.fork_lost += self._final.areas()

    def complete(self, result: DumpResult, more: Sequence[DumpResult] = ()) -> Snapshotted:
        done = super().complete(result, more)
        final = self._final
        if final is None:
            return replace(done, method=Method.CLONE.value, method_reason=self.fallback)
        steps = self._steps
        madvise = final.madvise + final.restore
        split = {
            "stop": steps.stop,
            "save": steps.save,
            "scan_copy": final.scan_copy,
            "madvise": madvise,
            "fork": max(steps.fork - final.scan_copy - madvise, 0.0),
            "resume": steps.resume,
        }
        log.info(
            "process %d: precopy: %d rounds, %.1f MiB copied; last written set %.1f MiB;"
            " %d areas left out of the fork in %d madvise ranges; frozen %s",
            self.facts.pid, len(self._rounds), self._store_bytes() / 2**20,
            final.written / 2**20, len(final.left_out), len(final.ranges),
            ", ".join(f"{k} {v * 1e3:.1f}" for k, v in split.items()) + " ms",
        )  # fmt: skip
        stats = {
            "rounds": [
                {"found_bytes": r.found, "copied_bytes": r.copied, "ms": round(r.seconds * 1e3, 3)}
                for r in self._rounds
            ],
            "copied_bytes": self._store_bytes(),
            "last_written_bytes": final.written,
            "areas_left_out": len(final.left_out),
        }
        steps_us = {k: round(v * 1e6) for k, v in split.items()}
        return replace(done, freeze_steps_us=steps_us, precopy=stats)

    def _store_bytes(self) -> int:
        return self._store.copied_bytes if self._store is not None else 0

    def _drop(self, *, keep_store: bool = False) -> None:
        """Close the tracker (and the side file, unless the images still need it)."""
        if self._tracker is not None:
            self._tracker.close()
        if self._store is not None:
            self._store.close()
            if not keep_store:
                self._store.path.unlink(missing_ok=True)
                self._store = None

    def close(self) -> None:
        self._drop(keep_store=True)
        super().close()


def _candidates(pid: int) -> dict[tuple[int, int], int]:
    """``{(start, end): resident bytes}`` of the trackable areas of *pid* holding
    :data:`MIN_AREA` bytes or more, neither MADV_DONTFORK nor MADV_WIPEONFORK (those are the
    fork-lost copy's), nor MADV_DONTDUMP (the core holds none of it, and an area left out of
    the fork comes back into the images without that flag), nor holding guard pages (a copy
    of its pages stops at them; the fork keeps them, and CRIU records them)."""
    skip = {"dc", "wf", "dd"}
    sizes = {(e.start, e.end): e.anon_kb * 1024 for e in smaps_entries(pid) if not skip & e.vmflags}
    spans = ((m.start, m.end) for m in tracker.trackable(read_maps(pid)))
    big = {span: sizes[span] for span in spans if sizes.get(span, 0) >= MIN_AREA}
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        return {span: size for span, size in big.items() if not _guarded(fd, *span)}
    finally:
        os.close(fd)


def _guarded(pagemap_fd: int, start: int, end: int) -> bool:
    """Whether ``[start, end)`` holds MADV_GUARD_INSTALL guard pages. Before Linux 6.14 the
    kernel has no PAGE_IS_GUARD (EINVAL) and this says no (only 6.13 has guards it cannot
    report)."""
    guard = pagemap.PAGE_IS_GUARD
    try:
        return any(pagemap.scan(pagemap_fd, start, end, mask=guard, returned=guard))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False

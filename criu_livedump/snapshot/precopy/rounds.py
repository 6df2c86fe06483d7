"""Method precopy's copies: rounds while the target runs, the last one inside the freeze.

:class:`SideStore` keeps the pre-copied pages in a sparse side file on the scratch, one slot
per tracked area (the page at ``addr`` of an area is at ``slot + addr - start``), so a page
written again is copied again over its older copy, and a byte per page says what was copied.
:func:`run_rounds` copies the present pages of the tracked areas, then, round after round, the
pages written meanwhile (:meth:`~criu_livedump.snapshot.precopy.tracker.Tracker.scan`), while
the written set shrinks, within a bound in rounds and in bytes. :class:`FinalCopy` runs inside
the clone's freeze (an :class:`~criu_livedump.snapshot.clone.inject.ForkHook`): the last written
set copied, MADV_DONTFORK set on the pre-copied areas so that the fork's page-table copy skips
them, and MADV_DOFORK after the fork (only on those areas, none of which was DONTFORK before).
Their pages then join the images as those of the areas a fork does not copy
(:class:`~criu_livedump.snapshot.clone.fork_lost.ForkLostArea`).

Test hook: :data:`PAUSE_ENV` set to ``armed`` or ``round-N`` stops the tool there (after the
arming, after the copy of round N; printing ``paused STEP`` on stderr) so that a test can kill
it in that round; ``resumed`` after the freeze, the target running and still tracked. Inside
the freeze, the clone's hook (:data:`criu_livedump.snapshot.clone.inject.PAUSE_ENV`) stops at
``dontfork``: the areas MADV_DONTFORK, the clone not made yet (:class:`Restorer` undoes it
should we die there).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from converters.arch import host
from criu_livedump.errors import LivedumpError
from criu_livedump.linux import PAGE_SIZE, pagemap, ptrace
from criu_livedump.linux.procfs import MapsEntry, SmapsEntry, read_maps, read_status, task_ids
from criu_livedump.linux.ptrace import Opt
from criu_livedump.snapshot.clone import fork_lost
from criu_livedump.snapshot.clone.inject import fork_guard, injecting
from criu_livedump.snapshot.precopy.tracker import Tracker

__all__ = [
    "PAUSE_ENV",
    "Captured",
    "FinalCopy",
    "Restorer",
    "Round",
    "SideStore",
    "eligible",
    "hook",
    "joined",
    "present",
    "run_rounds",
]

log = logging.getLogger(__name__)

#: Test hook: ``armed``, ``round-N`` or ``resumed`` (see the module docstring).
PAUSE_ENV: Final = "CRIU_LIVEDUMP_PRECOPY_PAUSE"

#: include/uapi/asm-generic/mman-common.h (every architecture): madvise(2) advice
MADV_DONTFORK: Final = 10
MADV_DOFORK: Final = 11

#: A page copied inside the freeze costs about as much as this many page-table entries copied
#: by the fork, with margin: here the fork copies 1 GiB of page tables in 26 ms (issue 14) and
#: the freeze copied 122 MiB in 54 ms (2.3 GB/s, a 1 GiB workload dirtying 200 MB/s), 18 times
#: as much per byte. An area whose last written set is over 1/32 of its pages goes to the fork.
PAGE_OVER_PTE: Final = 32
#: the bounce buffer process_vm_readv(2) fills before the side file is written
_BOUNCE: Final = 16 << 20
#: UIO_MAXIOV (include/uapi/linux/uio.h)
_IOV_MAX: Final = 1024


def hook(step: str) -> None:
    """Stop here for a test when :data:`PAUSE_ENV` names *step*."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"paused {step}", file=sys.stderr, flush=True)
        time.sleep(3600)


@dataclass
class _Slot:
    start: int
    end: int
    offset: int
    #: one byte per page: 1 when the side file holds its copy
    copied: bytearray


#: a batch of pieces ``(lo, hi, slot)``, the buffer it was read into, and which were read
_Part = tuple[list[tuple[int, int, _Slot]], mmap.mmap, dict[int, bool]]


@dataclass
class Captured:
    """Pages read by :meth:`SideStore.capture`, not yet in the side file."""

    parts: list[_Part]


@dataclass
class SideStore:
    """The sparse side file of the pre-copied pages (see the module docstring)."""

    pid: int
    path: Path
    slots: list[_Slot]
    _fd: int
    _bounce: mmap.mmap
    copied_bytes: int = 0

    @classmethod
    def create(cls, pid: int, path: Path, areas: Sequence[tuple[int, int]]) -> SideStore:
        """A side file with one slot per ``(start, end)`` of *areas* (sparse: nothing taken)."""
        slots = []
        offset = 0
        for start, end in sorted(areas):
            slots.append(_Slot(start, end, offset, bytearray((end - start) // PAGE_SIZE)))
            offset += end - start
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, offset)
            bounce = mmap.mmap(-1, _BOUNCE)
        except BaseException:
            os.close(fd)
            raise
        return cls(pid, path, slots, fd, bounce)

    def copy(self, runs: Iterable[tuple[int, int]]) -> int:
        """Copy the target's pages of *runs* (``[lo, hi)``, inside the slots) into their slots;
        returns the bytes copied. A run no read reaches is marked not copied (a hole).

        :raises OSError: the side file cannot be written (ENOSPC).
        """
        done = 0
        for batch in self._batches(runs):
            done += self._write(batch, self._bounce, self._read(batch, self._bounce))
        self.copied_bytes += done
        return done

    def capture(self, runs: Iterable[tuple[int, int]]) -> Captured:
        """Read the target's pages of *runs* into memory now, to be written into their slots
        by :meth:`put` later: inside the freeze, a write to the side file could wait
        on its writeback (balance_dirty_pages(), mm/page-writeback.c: the rounds leave up to
        the whole tracked size dirty), a read of the target cannot."""
        parts: list[_Part] = []
        for batch in self._batches(runs):
            # the first batch in the bounce buffer, already faulted in by the rounds
            buf = self._bounce if not parts else mmap.mmap(-1, sum(hi - lo for lo, hi, _ in batch))
            parts.append((batch, buf, self._read(batch, buf)))
        return Captured(parts)

    def put(self, captured: Captured) -> int:
        """Write the pages :meth:`capture` read into their slots (once); returns the bytes
        written.

        :raises OSError: the side file cannot be written (ENOSPC).
        """
        done = 0
        parts, captured.parts = captured.parts, []
        for batch, buf, ok in parts:
            done += self._write(batch, buf, ok)
            if buf is not self._bounce:
                buf.close()
        self.copied_bytes += done
        return done

    def _batches(self, runs: Iterable[tuple[int, int]]) -> Iterator[list[tuple[int, int, _Slot]]]:
        """*runs* cut to the slots, in batches that fill the bounce buffer at most."""
        batch: list[tuple[int, int, _Slot]] = []
        size = 0
        for lo, hi, slot in self._pieces(runs):
            if batch and (size + hi - lo > _BOUNCE or len(batch) == _IOV_MAX):
                yield batch
                batch, size = [], 0
            batch.append((lo, hi, slot))
            size += hi - lo
        if batch:
            yield batch

    def _pieces(self, runs: Iterable[tuple[int, int]]) -> Iterable[tuple[int, int, _Slot]]:
        """*runs* cut to the slots and to the bounce buffer's size."""
        for lo, hi in runs:
            for slot in self.slots:
                a, b = max(lo, slot.start), min(hi, slot.end)
                while a < b:
                    n = min(b - a, _BOUNCE)
                    yield a, a + n, slot
                    a += n

    def _read(self, batch: list[tuple[int, int, _Slot]], buf: mmap.mmap) -> dict[int, bool]:
        return fork_lost.read_into(self.pid, buf, [(lo, hi) for lo, hi, _ in batch])

    def _write(
        self, batch: list[tuple[int, int, _Slot]], buf: mmap.mmap, ok: dict[int, bool]
    ) -> int:
        done = 0
        pos = 0
        with memoryview(buf) as view:
            for lo, hi, slot in batch:
                n = hi - lo
                first, last = (lo - slot.start) // PAGE_SIZE, (hi - slot.start) // PAGE_SIZE
                if ok[lo]:
                    os.pwrite(self._fd, view[pos : pos + n], slot.offset + lo - slot.start)
                    slot.copied[first:last] = b"\x01" * (last - first)
                    done += n
                else:
                    slot.copied[first:last] = bytes(last - first)
                pos += n
        return done

    def held(self, start: int, end: int) -> int:
        """Bytes of the slot ``[start, end)`` whose pages the side file holds."""
        slot = next(s for s in self.slots if (s.start, s.end) == (start, end))
        return slot.copied.count(1) * PAGE_SIZE

    def runs(self, start: int, end: int) -> tuple[tuple[int, int, int], ...]:
        """``(address, length, offset in the side file)`` of the pages copied in
        ``[start, end)``, which lies in one slot."""
        slot = next(s for s in self.slots if s.start <= start and end <= s.end)
        bits = slot.copied
        page, last = (start - slot.start) // PAGE_SIZE, (end - slot.start) // PAGE_SIZE
        out = []
        while page < last:
            lo = bits.find(1, page, last)
            if lo < 0:
                break
            hi = bits.find(0, lo, last)
            hi = last if hi < 0 else hi
            addr = slot.start + lo * PAGE_SIZE
            out.append((addr, (hi - lo) * PAGE_SIZE, slot.offset + lo * PAGE_SIZE))
            page = hi
        return tuple(out)

    def close(self) -> None:
        """Release the bounce buffer and the descriptor (the file stays for the images)."""
        if not self._bounce.closed:
            self._bounce.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Round:
    """One round: the bytes found written (round 1: present) and the time it took."""

    number: int
    found: int
    copied: int
    seconds: float


def run_rounds(
    tracker: Tracker,
    store: SideStore,
    before: Sequence[tuple[int, int]],
    *,
    max_rounds: int,
    max_bytes: int,
    small: int,
) -> list[Round]:
    """The copies while the target runs (see the module docstring): round 1 copies the
    pages present, the next ones the pages written since the previous scan, until the
    written set stops shrinking or is under *small* bytes, *max_rounds* rounds were run, or
    *max_bytes* bytes were copied in all. *before*: :func:`present` of the areas, read before
    the arming (see there).

    :raises TargetError: the target is gone.
    """
    rounds: list[Round] = []
    previous = None
    while len(rounds) < max_rounds:
        t0 = time.monotonic()
        runs = tracker.scan() if rounds else joined(sorted([*before, *_present(tracker)]))
        found = sum(hi - lo for lo, hi in runs)
        copied = store.copy(runs)
        r = Round(len(rounds) + 1, found, copied, time.monotonic() - t0)
        rounds.append(r)
        log.info(
            "process %d: precopy round %d: %s %.1f MiB, copied %.1f MiB in %.1f ms",
            tracker.pid, r.number, "present" if r.number == 1 else "written",
            found / 2**20, copied / 2**20, r.seconds * 1e3,
        )  # fmt: skip
        hook(f"round-{r.number}")
        if r.number > 1 and (found <= small or (previous is not None and found >= previous)):
            break
        if store.copied_bytes >= max_bytes:
            log.info("process %d: precopy stops at its bound of %d bytes", tracker.pid, max_bytes)
            break
        previous = found if r.number > 1 else None
    return rounds


def present(pid: int, areas: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Before the arming: the pages of *areas* present or swapped out, not the shared zero
    page. Once armed, PAGEMAP_SCAN reports every never-populated page as swapped (the
    write-protect marker WP_UNPOPULATED leaves is a swap-type entry, fs/proc/task_mmu.c:
    pagemap_page_category()), so swapped-out pages are read before; round 1 joins these to
    the pages present after (:func:`_present`): none populated in between is missed."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return [r for lo, hi in areas for r in fork_lost.page_runs(fd, lo, hi)]
    finally:
        os.close(fd)


def _present(tracker: Tracker) -> list[tuple[int, int]]:
    """Armed: the pages of the tracked areas present, not the shared zero page."""
    return [
        r
        for lo, hi in tracker.areas
        for r in pagemap.scan(
            tracker.pagemap,
            lo,
            hi,
            inverted=pagemap.PAGE_IS_PFNZERO,
            mask=pagemap.PAGE_IS_PFNZERO | pagemap.PAGE_IS_PRESENT,
            returned=pagemap.PAGE_IS_PRESENT,
        )
    ]


@dataclass
class FinalCopy:
    """Method precopy's part of the freeze (a :class:`ForkHook`, see the module docstring).

    :ivar eligible: the tracked areas that may be left out of the fork (none of them was
        MADV_DONTFORK or MADV_WIPEONFORK when the smaps were read before the freeze).
    """

    tracker: Tracker
    store: SideStore
    eligible: frozenset[tuple[int, int]]
    #: the current mappings of each area left out of the fork
    left_out: dict[tuple[int, int], list[MapsEntry]] = field(default_factory=dict)
    #: ``[lo, hi)`` ranges given MADV_DONTFORK (adjacent areas joined: one madvise each)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    written: int = 0
    #: the last written set, read inside the freeze, written into the side file after it
    captured: Captured | None = None
    #: seconds of each part: the last scan and copy, the DONTFORK calls, the DOFORK calls
    scan_copy: float = 0.0
    madvise: float = 0.0
    restore: float = 0.0

    def before_fork(self, call: Callable[..., int], injector: int) -> None:
        t0 = time.monotonic()
        runs = self.tracker.scan(rearm=False)
        areas = _still_mapped(self.tracker.pid, self.tracker.areas, self.eligible)
        _keep_rseq_area(self.tracker.pid, injector, areas)
        runs = self._keep_busy(areas, runs)
        self.written = sum(hi - lo for lo, hi in runs)
        self.captured = self.store.capture(runs)
        t1 = time.monotonic()
        madvise = host().syscalls.madvise
        for lo, hi in joined(sorted(areas)):
            self.ranges.append((lo, hi))
            ret = call(madvise, lo, hi - lo, MADV_DONTFORK)
            if ret < 0:
                log.info("process %d: MADV_DONTFORK %#x-%#x: %s", self.tracker.pid, lo, hi,
                         os.strerror(-ret))  # fmt: skip
                continue
            self.left_out.update({a: m for a, m in areas.items() if lo <= a[0] < hi})
        self.scan_copy, self.madvise = t1 - t0, time.monotonic() - t1

    def _keep_busy(
        self, areas: dict[tuple[int, int], list[MapsEntry]], runs: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """Drop from *areas* those whose last written set would take longer to copy than the
        fork takes to copy their page tables (:data:`PAGE_OVER_PTE`); the runs left to copy."""
        kept = []
        for area in list(areas):
            lo, hi = area
            mine = [(max(a, lo), min(b, hi)) for a, b in runs if a < hi and lo < b]
            written = sum(b - a for a, b in mine)
            # held() counts the slot's pages (2 MiB of bytes at 8 GiB): only when needed
            if written and written * PAGE_OVER_PTE > self.store.held(lo, hi):
                log.info("process %d: area %#x-%#x goes to the fork: %.1f MiB written since the"
                         " last round", self.tracker.pid, lo, hi, written / 2**20)  # fmt: skip
                del areas[area]
                continue
            kept += mine
        return kept

    def after_fork(self, call: Callable[..., int]) -> None:
        t0 = time.monotonic()
        madvise = host().syscalls.madvise
        for lo, hi in self.ranges:
            ret = call(madvise, lo, hi - lo, MADV_DOFORK)
            if ret < 0:
                log.warning("process %d: MADV_DOFORK %#x-%#x failed: %s", self.tracker.pid,
                            lo, hi, os.strerror(-ret))  # fmt: skip
        self.restore = time.monotonic() - t0

    def flush(self) -> None:
        """After the freeze: the last written set into the side file.

        :raises OSError: the side file cannot be written (ENOSPC).
        """
        if self.captured is not None:
            self.store.put(self.captured)
            self.captured = None

    def areas(self) -> tuple[fork_lost.ForkLostArea, ...]:
        """After :meth:`flush`: the areas left out of the fork, one per mapping, with their
        pages."""
        return tuple(
            fork_lost.ForkLostArea(
                m.start,
                m.end,
                m.perms,
                m.pgoff,
                "dontfork",
                self.store.runs(m.start, m.end),
                self.store.path,
            )
            for maps in self.left_out.values()
            for m in maps
        )


def _keep_rseq_area(pid: int, injector: int, areas: dict[tuple[int, int], list[MapsEntry]]) -> None:
    """Drop from *areas* the one holding *injector*'s rseq area: the clone inherits that
    registration, and the kernel writes the area on the clone's every return to user mode
    (kernel/rseq.c: rseq_fork(), __rseq_handle_notify_resume()); absent from the clone, the
    write would fault and kill it with SIGSEGV. glibc keeps the area in the thread's TLS, which
    the kernel merges with an adjacent private anonymous mapping."""
    rseq = ptrace.rseq_area(injector)
    if rseq is None:
        return
    for area in [a for a in areas if a[0] < rseq[0] + rseq[1] and rseq[0] < a[1]]:
        log.info("process %d: area %#x-%#x goes to the fork: it holds the rseq area of thread %d",
                 pid, area[0], area[1], injector)  # fmt: skip
        del areas[area]


def _still_mapped(
    pid: int, areas: Sequence[tuple[int, int]], eligible: frozenset[tuple[int, int]]
) -> dict[tuple[int, int], list[MapsEntry]]:
    """The eligible tracked *areas* that the target's private anonymous mappings still tile
    exactly (a split by mprotect is fine, a hole or another mapping is not), with them."""
    maps = read_maps(pid)
    out: dict[tuple[int, int], list[MapsEntry]] = {}
    for area in areas:
        if area not in eligible:
            continue
        start, end = area
        inside = [m for m in maps if m.start < end and start < m.end]
        pos = start
        for m in inside:
            if m.start != pos or m.end > end or m.inode != 0 or not m.perms.endswith("p"):
                break
            pos = m.end
        else:
            if pos == end:
                out[area] = inside
    return out


def joined(areas: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` ranges, adjacent or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in areas:
        if out and out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def eligible(
    smaps: Iterable[SmapsEntry], areas: Iterable[tuple[int, int]]
) -> frozenset[tuple[int, int]]:
    """The *areas* no mapping of which is MADV_DONTFORK (``dc``) or MADV_WIPEONFORK (``wf``)
    in *smaps*: MADV_DOFORK after the fork then restores exactly what was."""
    flagged = [(e.start, e.end) for e in smaps if "dc" in e.vmflags or "wf" in e.vmflags]
    return frozenset((lo, hi) for lo, hi in areas if not any(a < hi and lo < b for a, b in flagged))


@dataclass
class Restorer:
    """A process that gives MADV_DOFORK back to the pre-copied areas should we die inside the
    freeze between :class:`FinalCopy`'s MADV_DONTFORK and MADV_DOFORK (the target would run on
    with its heap left out of every fork it makes). It holds the read end of a pipe whose only
    write end is ours: EOF without :meth:`dismiss`'s byte means we died. It then injects
    ``madvise(MADV_DOFORK)`` on every range in the target (whose threads our death detached).
    DOFORK on an area that was not DONTFORK changes nothing, and none of *ranges* was
    (:func:`eligible`), so it may run whenever we die. It closes every other descriptor first,
    the userfaultfd among them."""

    pid: int = 0
    fd: int = -1

    @classmethod
    def start(cls, target: int, ranges: Sequence[tuple[int, int]], suspend: Opt) -> Restorer:
        """Fork the restorer of *ranges* of process *target*."""
        return cls(*fork_guard(lambda rfd: _restorer(rfd, target, ranges, suspend)))

    def dismiss(self) -> None:
        """The freeze is over (DOFORK done, or never needed): the restorer exits."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, b"x")
            os.close(self.fd)
            self.fd = -1
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0


def _restorer(  # pragma: no cover - forked child
    rfd: int, target: int, ranges: Sequence[tuple[int, int]], suspend: Opt
) -> None:
    if os.read(rfd, 1):
        return
    madvise = host().syscalls.madvise
    with contextlib.suppress(OSError, LivedumpError, IndexError):
        # our descriptors close before our tracees are detached (kernel/exit.c: do_exit()
        # calls exit_files() before exit_notify() -> exit_ptrace())
        tid = task_ids(target)[0]
        deadline = time.monotonic() + 10.0
        while _tracer(target, tid) and time.monotonic() < deadline:
            time.sleep(0.001)
        with injecting(target, tid, suspend=suspend) as call:
            for lo, hi in ranges:
                call(madvise, lo, hi - lo, MADV_DOFORK)


def _tracer(pid: int, tid: int) -> int:  # pragma: no cover - forked child
    return int(read_status(f"/proc/{pid}/task/{tid}/status").get("TracerPid", "0"))

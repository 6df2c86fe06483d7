"""Is a core one instant of a running process? The check for tests/programs/seqwriter.c.

Each writer thread of seqwriter keeps its whole state in registers: r12 = n, the stamps it has
written; r14 = the base of its PAGES pages; r15 = PAGES - 1. Stamp m writes m + 1 at the start
of page m % PAGES. In one instant, page k of a writer whose r12 is n therefore holds the stamp
of the last m < n with m % PAGES == k (0 when there is none), and page n % PAGES may also hold
n + 1 (stored, r12 not yet incremented). A page newer than that was copied after the registers
were read; an older one, before. Either way the core is not one instant.

The registers come from the core's NT_PRSTATUS notes (:class:`harness.corefile.CoreView`); the
pages from any reader (the core, or for the negative tests a copy taken without a freeze).
:func:`seqwriter` starts the program, :func:`live_reader` reads its memory while it runs, and
:func:`wait_until_writers_ran` waits until it has gone on writing.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import procs
from programs import build as programs_build

from harness.corefile import CoreView
from harness.errors import HarnessError
from harness.launcher import Target, start_target

PAGE = 4096
#: the stamp: an 8-byte little-endian value at the start of each page
STAMP = struct.Struct("<Q")
#: the differences listed per writer before "... and N more"
SHOWN = 5
#: seconds a wait on the writers may take (a bound, not a timing: the machine may be loaded)
WAIT = 60.0

#: reads *size* bytes of the target's memory at *addr*
Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Layout:
    """The writers' area, from seqwriter's line ``ready AREA NTHREADS PAGES``."""

    area: int
    threads: int
    pages: int

    @classmethod
    def parse(cls, ready_line: bytes) -> Layout:
        word, area, threads, pages = ready_line.decode().split()
        if word != "ready":
            raise HarnessError(f"not seqwriter's ready line: {ready_line!r}")
        return cls(int(area, 16), int(threads), int(pages))

    def base(self, index: int) -> int:
        return self.area + index * self.pages * PAGE


@dataclass(frozen=True)
class Writer:
    """One writer thread as a core's registers show it."""

    tid: int
    index: int
    #: r12: the number of stamps it had written
    stamps: int


def writers(core: CoreView, layout: Layout) -> list[Writer]:
    """Every writer of *layout* in *core*, by its r14 (its pages) and r15 (the page mask).

    :raises HarnessError: the core's threads do not hold exactly one writer per region.
    """
    found: dict[int, Writer] = {}
    for t in core.threads:
        offset = t.regs["r14"] - layout.area
        if not 0 <= offset < layout.threads * layout.pages * PAGE:
            continue
        index, rest = divmod(offset, layout.pages * PAGE)
        if rest or t.regs["r15"] != layout.pages - 1 or index in found:
            raise HarnessError(f"thread {t.pid}: r14={t.regs['r14']:#x} r15={t.regs['r15']:#x}")
        found[index] = Writer(t.pid, index, t.regs["r12"])
    if sorted(found) != list(range(layout.threads)):
        raise HarnessError(f"writers of regions {sorted(found)} of {layout.threads} in the core")
    return [found[i] for i in range(layout.threads)]


def expected_stamp(stamps: int, page: int, pages: int) -> int:
    """What *page* holds after *stamps* stamps over *pages* pages: the last m < stamps with
    m % pages == page, plus one; 0 when no stamp reached it."""
    turn, at = divmod(stamps, pages)
    last = turn * pages + page if page < at else (turn - 1) * pages + page
    return last + 1 if last >= 0 else 0


def stamp_diffs(stamps: int, values: Sequence[int]) -> list[str]:
    """How the page stamps *values* (page k's at index k) differ from one instant of a writer
    whose r12 is *stamps*; empty when they are that instant."""
    pages = len(values)
    pending = stamps % pages
    diffs = []
    for page, value in enumerate(values):
        want = expected_stamp(stamps, page, pages)
        if value == want or (page == pending and value == stamps + 1):
            continue
        when = "newer" if value > want else "older"
        diffs.append(f"page {page} holds stamp {value}, {when} than r12={stamps} ({want})")
    return diffs


def page_stamps(read: Reader, base: int, pages: int) -> list[int]:
    """The stamp at the start of each of *pages* pages from *base*."""
    data = memoryview(read(base, pages * PAGE)).cast("Q")
    return list(data[:: PAGE // STAMP.size])


def instant_diffs(layout: Layout, found: Sequence[Writer], read: Reader) -> list[str]:
    """Every page of every writer that is not of the instant its registers show, read by
    *read*; empty when the pages and the registers are one instant."""
    out = []
    for w in found:
        diffs = stamp_diffs(w.stamps, page_stamps(read, layout.base(w.index), layout.pages))
        out += [f"writer {w.tid}: {d}" for d in diffs[:SHOWN]]
        if len(diffs) > SHOWN:
            out.append(f"writer {w.tid}: ... and {len(diffs) - SHOWN} more pages")
    return out


@contextmanager
def seqwriter(*args: str) -> Iterator[tuple[Target, Layout]]:
    """seqwriter started with *args* (``NTHREADS PAGES [nice=N] [fill=MIB]``), once every
    writer has stamped each of its pages at least once; killed and reaped on exit."""
    with start_target(programs_build.build("seqwriter"), *args, rseq=False) as target:
        layout = Layout.parse(target.ready_line)
        read = live_reader(target.pid)
        last_pages = [layout.base(i + 1) - PAGE for i in range(layout.threads)]
        procs.wait_for(
            lambda: all(read(a, STAMP.size) != bytes(STAMP.size) for a in last_pages),
            WAIT,
            "every writer's first sweep",
        )
        yield target, layout


def live_reader(pid: int) -> Reader:
    """Reads the running target's memory (/proc/PID/mem): no freeze, no instant."""

    def read(addr: int, size: int) -> bytes:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, size, addr)
        finally:
            os.close(fd)

    return read


def run_time_ns(pid: int, tid: int) -> int:
    """Time thread *tid* has spent on a CPU (/proc/PID/task/TID/schedstat, first field)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def wait_until_writers_ran(pid: int, tids: Sequence[int], ns: int = 1_000_000) -> None:
    """Bounded wait until each of the writer threads *tids* has run *ns* more on a CPU (a
    millisecond is many thousands of stamps): the process goes on writing."""
    start = {tid: run_time_ns(pid, tid) for tid in tids}
    procs.wait_for(
        lambda: all(run_time_ns(pid, tid) - start[tid] >= ns for tid in tids),
        WAIT,
        f"every writer of {pid} running {ns} ns more",
    )

"""Progress of one ``dump``: events for whoever shows them, and byte counters shared with the
processes that do the work.

How to feed it. :func:`criu_livedump.dump.live_dump` takes a :class:`Progress` (default: one
that shows nothing) and passes it down. A stage calls :meth:`Progress.phase` when it begins,
:meth:`Progress.frozen` once the target runs again (with how long it was frozen), and adds bytes
as they move: :meth:`Progress.captured` for memory handed over by CRIU (the pages images
growing in scratch, or page runs received by a page server), :meth:`Progress.written` for core
bytes written (holes are not written and never counted); a stage that keeps running totals (a
page server's StreamStats: received, written) calls :meth:`Progress.captured_at_least` and
:meth:`Progress.written_at_least` with them instead. The byte counters live in an anonymous
shared mapping made before anything forks, so a forked child (the conversion child, a page
server's process) calls the same methods on its inherited copy of the object and the parent
sees the sums: no pipe, no message, no lock. Each counter must have one writer at a time (an
addition is a read then a write); a stage that both receives and writes pages (the stream) adds
to both. The events are called in the process that runs ``dump`` only. Nothing here knows of
terminals: the CLI subclasses :class:`Progress` and draws :meth:`Progress.counts` a few times a
second (criu_livedump/cli.py); the library never waits for it.
"""

from __future__ import annotations

import mmap
import struct
from enum import StrEnum
from typing import NamedTuple

__all__ = ["Counts", "Phase", "Progress"]


class Phase(StrEnum):
    """The stages of a dump, in order, as :meth:`Progress.phase` names them."""

    INSPECT = "inspecting"
    FREEZE = "freezing"
    CAPTURE = "capturing"
    WRITE = "writing the core"
    CHILDREN = "writing the children's cores"


class Counts(NamedTuple):
    """The counters' values at one instant, in bytes."""

    captured: int
    written: int


_SLOT = struct.Struct("=Q")
_CAPTURED, _WRITTEN = 0, _SLOT.size


class Progress:
    """The events of one dump; this base class records the counters and shows nothing.

    Make it before the dump forks anything (its counters are shared with the children forked
    afterwards); one object per dump.
    """

    def __init__(self) -> None:
        # MAP_SHARED | MAP_ANONYMOUS (mmap's default for fileno -1): a forked child's writes
        # land in the page the parent reads
        self._counters = mmap.mmap(-1, mmap.PAGESIZE)

    def phase(self, phase: Phase) -> None:
        """*phase* begins."""

    def frozen(self, microseconds: int) -> None:
        """The target's freeze is over (it runs again); it lasted *microseconds*."""

    def captured(self, nbytes: int) -> None:
        """*nbytes* more of the target's memory were captured (in any process)."""
        self._add(_CAPTURED, nbytes)

    def captured_at_least(self, total: int) -> None:
        """At least *total* bytes were captured in all (for a stage that sees totals, such
        as the pages images' size); never lowers the count."""
        self._raise(_CAPTURED, total)

    def written(self, nbytes: int) -> None:
        """*nbytes* more bytes of the core were written (in any process)."""
        self._add(_WRITTEN, nbytes)

    def written_at_least(self, total: int) -> None:
        """At least *total* bytes of the core were written in all (a stage's running total);
        never lowers the count."""
        self._raise(_WRITTEN, total)

    def counts(self) -> Counts:
        """The counters now (cheap: two loads from shared memory)."""
        return Counts(self._get(_CAPTURED), self._get(_WRITTEN))

    def _get(self, slot: int) -> int:
        return int(_SLOT.unpack_from(self._counters, slot)[0])

    def _raise(self, slot: int, total: int) -> None:
        if total > self._get(slot):
            _SLOT.pack_into(self._counters, slot, total)

    def _add(self, slot: int, nbytes: int) -> None:
        if nbytes:
            _SLOT.pack_into(self._counters, slot, self._get(slot) + nbytes)

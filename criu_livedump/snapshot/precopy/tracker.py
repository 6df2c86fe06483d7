"""Which pages a running target writes: userfaultfd asynchronous write-protect (issue 14).

:func:`arm` creates a userfaultfd *inside* the target (a userfaultfd tracks the memory of the
process that creates it): one thread is stopped for three injected syscalls,
``userfaultfd(O_CLOEXEC | O_NONBLOCK)``, our copy taken with pidfd_getfd(2) meanwhile, then
``close_range(fd, fd, 0)``, so the target holds it only while that thread is stopped (CRIU
refuses a process holding one). On our copy, UFFDIO_API turns on ``UFFD_FEATURE_WP_ASYNC |
UFFD_FEATURE_WP_UNPOPULATED``; every writable private anonymous area is registered in
write-protect mode and write-protected (:mod:`criu_livedump.linux.userfaultfd`).
The target then runs on and never waits on us: the kernel resolves its writes to protected
pages itself. :meth:`Tracker.scan` returns the pages written since the last scan (or the arming)
and re-arms them in the same page-table walk: PAGEMAP_SCAN with PM_SCAN_WP_MATCHING |
PM_SCAN_CHECK_WPASYNC and the pure mask category_mask = return_mask = PAGE_IS_WRITTEN (richer
masks mis-report never-populated pages as clean on kernels without commit 07b4377).
MADV_DONTNEED counts as a write.

Closing the descriptor (:meth:`Tracker.close`, or our death) releases the userfaultfd, which
clears every write-protect it set: a dying tool leaves the target as it was. The descriptor is
O_CLOEXEC but a fork inherits it: close the tracker before forking a long-lived child.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from converters.arch import host
from criu_livedump.errors import BlockerError, CloneError, TargetError
from criu_livedump.linux import pagemap, userfaultfd
from criu_livedump.linux.procfs import MapsEntry, read_maps, task_ids
from criu_livedump.linux.ptrace import Opt
from criu_livedump.snapshot.clone.inject import check_injectable, injecting

__all__ = ["Tracker", "arm", "holds_userfaultfd", "trackable"]

log = logging.getLogger(__name__)

_UFFD_LINK: Final = "anon_inode:[userfaultfd]"
#: mapping names of the kernel's special areas, never registered
_SPECIAL: Final = ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]", "[uprobes]")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class Tracker:
    """A userfaultfd of the target's, held by us, and the areas it write-protects.

    :ivar areas: ``(start, end)`` of the areas registered and write-protected.
    :ivar refused: ``(area, why)`` for the areas the kernel would not register.
    :ivar lost: ``(start, end)`` of areas whose tracking broke (see :meth:`scan`).
    """

    pid: int
    fd: int
    pagemap: int
    areas: list[tuple[int, int]] = field(default_factory=list)
    refused: list[tuple[MapsEntry, str]] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)

    def scan(self, *, rearm: bool = True) -> list[tuple[int, int]]:
        """``[lo, hi)`` runs written since the arming or the last scan, re-armed by this call
        (unless not *rearm*: the last scan, before the descriptor is closed anyway).

        An area the target unmapped or replaced meanwhile fails the scan (CHECK_WPASYNC finds
        an unregistered mapping; pages already walked were re-armed but are not returned): it
        moves from :attr:`areas` to :attr:`lost`, whose bytes only the final copy can take.

        :raises TargetError: the target is gone.
        """
        runs: list[tuple[int, int]] = []
        flags = pagemap.PM_SCAN_CHECK_WPASYNC | (pagemap.PM_SCAN_WP_MATCHING if rearm else 0)
        written = pagemap.PAGE_IS_WRITTEN
        for area in list(self.areas):
            start, end = area
            try:
                found = list(
                    pagemap.scan(
                        self.pagemap, start, end, flags=flags, mask=written, returned=written
                    )
                )
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise TargetError(self.pid, "exited while its writes were tracked") from e
                log.info("process %d: area %#x-%#x no longer tracked: %s", self.pid, *area, e)
                self.areas.remove(area)
                self.lost.append(area)
                continue
            runs.extend(found)
        return runs

    def close(self) -> None:
        """Release the userfaultfd: the kernel clears every write-protect it set."""
        for fd in (self.fd, self.pagemap):
            if fd >= 0:
                os.close(fd)
        self.fd = self.pagemap = -1

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def holds_userfaultfd(pid: int) -> bool:
    """Whether *pid* holds a userfaultfd descriptor (from /proc/PID/fd)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == _UFFD_LINK:
                return True
        except OSError:
            continue
    return False


def trackable(maps: Sequence[MapsEntry]) -> list[MapsEntry]:
    """The writable private anonymous areas of *maps* (heap and stacks included)."""
    return [
        m
        for m in maps
        if "w" in m.perms
        and m.perms.endswith("p")
        and m.inode == 0
        and (m.name in ("", "[heap]") or m.name.startswith("[stack"))
        and m.name not in _SPECIAL
    ]


def arm(pid: int, areas: Sequence[tuple[int, int]] | None = None) -> Tracker:
    """Start tracking the writes of running *pid* (see the module's docstring): *areas*
    (``(start, end)`` of whole mappings), by default all :func:`trackable` ones.

    :raises BlockerError: the target already uses userfaultfd (its areas may be
        registered with its own), or the kernel lacks asynchronous write-protect.
    :raises TargetError: the target is gone.
    """
    suspend = check_injectable(pid)
    if holds_userfaultfd(pid):
        raise _refusal(pid, "it uses userfaultfd itself; its writes cannot be tracked")
    fd = _take_userfaultfd(pid, suspend)
    tracker = Tracker(pid, fd, -1)
    try:
        try:
            userfaultfd.api(fd)
        except OSError as e:
            raise _refusal(
                pid, f"this kernel has no asynchronous userfaultfd write-protect ({e.strerror})"
            ) from e
        tracker.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        _protect(tracker, areas)
    except BaseException:
        tracker.close()
        raise
    return tracker


def _refusal(pid: int, reason: str) -> BlockerError:
    return BlockerError(
        pid, f"--method precopy: {reason}", hint="--method clone does not track writes"
    )


def _protect(tracker: Tracker, areas: Sequence[tuple[int, int]] | None) -> None:
    found = trackable(read_maps(tracker.pid))
    if areas is not None:
        wanted = set(areas)
        found = [m for m in found if (m.start, m.end) in wanted]
    for m in found:
        try:
            userfaultfd.register_wp(tracker.fd, m.start, m.end)
        except OSError as e:
            tracker.refused.append((m, e.strerror or str(e)))
            log.info("process %d: area %#x-%#x not tracked: %s", tracker.pid, m.start, m.end, e)
            continue
        try:
            userfaultfd.write_protect(tracker.fd, m.start, m.end)
        except OSError as e:
            # registered but not protected: every page reads as written, copied each round
            tracker.refused.append((m, e.strerror or str(e)))
            continue
        tracker.areas.append((m.start, m.end))


def _take_userfaultfd(pid: int, suspend: Opt) -> int:
    """A userfaultfd created in *pid* by an injected syscall, now ours and closed there."""
    sys = host().syscalls
    tids = task_ids(pid)
    if not tids:
        raise TargetError(pid, "no such process")
    pidfd = os.pidfd_open(pid)
    try:
        with injecting(pid, tids[0], suspend=suspend) as call:
            theirs = call(sys.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
            if theirs == -errno.EPERM:  # vm.unprivileged_userfaultfd=0, no CAP_SYS_PTRACE
                theirs = call(
                    sys.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK | userfaultfd.USER_MODE_ONLY
                )
            if theirs < 0:
                raise _refusal(pid, f"userfaultfd(2) failed in the target: {os.strerror(-theirs)}")
            try:
                ours = _libc.syscall(sys.pidfd_getfd, pidfd, theirs, 0)
                err = ctypes.get_errno()
            finally:
                closed = call(sys.close_range, theirs, theirs, 0)
            if ours < 0:
                raise CloneError(f"process {pid}: pidfd_getfd: {os.strerror(err)}")
    finally:
        os.close(pidfd)
    if closed < 0:
        os.close(ours)
        raise CloneError(f"process {pid}: closing its userfaultfd {theirs} failed")
    return int(ours)

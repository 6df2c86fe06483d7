"""Memory a fork does not copy, copied from the frozen target for the clone snapshot.

kernel/fork.c:dup_mmap() skips VM_DONTCOPY areas (MADV_DONTFORK) and gives VM_WIPEONFORK ones
(MADV_WIPEONFORK) fresh zero pages, so the clone shows the former as absent and the latter as
zeros, while the kernel's own core of the target holds their bytes. V8 (node, Chromium) keeps
its JavaScript heap in MADV_DONTFORK memory. For anonymous private areas of either kind, the
pages present (or swapped out) are read from the target while it is frozen into a side file;
the images of the clone then get them back (clone_images.py). The target is only read.

The copy lengthens the freeze by the time it takes, so everything that can be done before the
freeze is: :func:`prepare` takes the candidate areas from /proc/PID/smaps, read before the
freeze (it walks every page table), and maps a side file of their resident size with every
page already allocated.
:meth:`Copier.copy`, while the target is frozen, confirms each area in /proc/PID/maps, finds its
pages with the PAGEMAP_SCAN ioctl (Linux 6.7, commit 52526ca7fdb9) and copies them with
process_vm_readv(2) at memory speed (measured here: 206 MiB of a node heap in about 45 ms,
against about 130 ms into a mapping whose pages were still to be allocated).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from criu_livedump.linux import PAGE_SIZE
from criu_livedump.linux import pagemap as pagemap_scan
from criu_livedump.linux.procfs import SmapsEntry, read_maps

__all__ = ["Copier", "ForkLostArea", "page_runs", "prepare", "read_into"]

log = logging.getLogger(__name__)

# Documentation/admin-guide/mm/pagemap.rst (the fallback before Linux 6.7)
_PM_PRESENT: Final = 1 << 63
_PM_SWAPPED: Final = 1 << 62
_PM_BATCH: Final = 8192
#: UIO_MAXIOV (include/uapi/linux/uio.h)
_IOV_MAX: Final = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@dataclass(frozen=True)
class ForkLostArea:
    """One area the clone lacks the bytes of.

    :ivar kind: ``"dontfork"`` (absent from the clone) or ``"wipeonfork"`` (zeros there).
    :ivar runs: ``(address, length, offset in data_file)`` of the pages that were copied; the
        rest of the area had no page (reads as zeros, as in the kernel's core).
    """

    start: int
    end: int
    perms: str
    pgoff: int
    kind: str
    runs: tuple[tuple[int, int, int], ...]
    data_file: Path
    #: MADV_DONTDUMP too: the core holds none of its bytes (none were copied), and its VMA
    #: must say so
    dontdump: bool = False


@dataclass(frozen=True)
class _Candidate:
    start: int
    end: int
    perms: str
    kind: str
    dontdump: bool = False


@dataclass
class Copier:
    """A side file ready to take the candidate areas' pages (see :func:`prepare`)."""

    pid: int
    path: Path
    candidates: list[_Candidate]
    _fd: int
    _buf: mmap.mmap
    _areas: list[ForkLostArea] = field(default_factory=list)

    def copy(self) -> None:
        """Copy the pages of every candidate still mapped as it was (the target is frozen).

        An area that changed since :func:`prepare` is left out: the clone then shows it as a
        fork does. A run neither process_vm_readv(2) nor /proc/PID/mem can read is a hole.
        """
        current = {(m.start, m.end, m.perms): m.pgoff for m in read_maps(self.pid) if not m.inode}
        plan: list[tuple[_Candidate, int, list[tuple[int, int]]]] = []
        pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for c in self.candidates:
                pgoff = current.get((c.start, c.end, c.perms))
                if pgoff is not None:
                    runs = [] if c.dontdump else list(page_runs(pagemap, c.start, c.end))
                    plan.append((c, pgoff, runs))
        finally:
            os.close(pagemap)
        total = sum(hi - lo for _, _, runs in plan for lo, hi in runs)
        if total > len(self._buf):
            # pages faulted in since prepare(): grow the file (those pages allocate now)
            try:
                os.posix_fallocate(self._fd, 0, total)
            except OSError as e:
                log.warning(
                    "process %d: no room to copy its MADV_DONTFORK memory (%s)", self.pid, e
                )
                return
            self._buf.resize(total)
        copied = read_into(self.pid, self._buf, [r for _, _, runs in plan for r in runs])
        offset = 0
        for c, pgoff, runs in plan:
            kept = []
            for lo, hi in runs:
                if copied[lo]:
                    kept.append((lo, hi - lo, offset))
                offset += hi - lo
            self._areas.append(
                ForkLostArea(
                    c.start, c.end, c.perms, pgoff, c.kind, tuple(kept), self.path, c.dontdump
                )
            )

    def finish(self) -> tuple[ForkLostArea, ...]:
        """Release the mapping; the side file keeps exactly the copied bytes."""
        used = max((o + n for a in self._areas for _, n, o in a.runs), default=0)
        self.close()
        os.truncate(self.path, used)
        return tuple(self._areas)

    def close(self) -> None:
        if not self._buf.closed:
            self._buf.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def prepare(pid: int, smaps: Iterable[SmapsEntry], side_dir: Path) -> Copier | None:
    """Before the freeze: the anonymous private MADV_DONTFORK / MADV_WIPEONFORK areas of *pid*
    holding pages, from its *smaps*, and a side file in *side_dir* mapped with room for them,
    its pages allocated. None when there is nothing to copy."""
    found: list[_Candidate] = []
    size = 0
    for e in smaps:
        if e.inode != 0 or not e.perms.endswith("p") or e.anon_kb == 0:
            continue
        if "dc" in e.vmflags and "io" not in e.vmflags:
            dontdump = "dd" in e.vmflags  # its VMA comes back, its bytes are not dumped
            found.append(_Candidate(e.start, e.end, e.perms, "dontfork", dontdump))
            if dontdump:
                continue
        elif "wf" in e.vmflags:
            found.append(_Candidate(e.start, e.end, e.perms, "wipeonfork"))
        else:
            continue
        size += e.anon_kb * 1024
    if not found:
        return None
    size = max(size, mmap.PAGESIZE)  # room for none (DONTDUMP areas only) is still a mapping
    path = side_dir / f"fork-lost-{pid}.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        # allocated for real (a mapping of pages a full filesystem cannot back would SIGBUS
        # us when written), then mapped with its pages in place
        os.posix_fallocate(fd, 0, size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0x8000)
        buf = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise
        log.warning(
            "process %d: no room in %s for its %d bytes of MADV_DONTFORK memory (%s);"
            " the clone's core goes without them",
            pid, side_dir, size, e.strerror,
        )  # fmt: skip
        return None
    except BaseException:
        os.close(fd)
        raise
    return Copier(pid, path, found, fd, buf)


def page_runs(pagemap: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` runs of pages present or swapped out (not the shared zero page)."""
    try:
        yield from _scan(pagemap, start, end)
    except OSError as e:
        if e.errno not in (errno.ENOTTY, errno.EINVAL):
            raise
        yield from _read_pagemap(pagemap, start, end)


def _scan(pagemap: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """PAGEMAP_SCAN (Linux 6.7): the kernel returns the runs itself."""
    want = pagemap_scan.PAGE_IS_PRESENT | pagemap_scan.PAGE_IS_SWAPPED
    yield from pagemap_scan.scan(
        pagemap,
        start,
        end,
        inverted=pagemap_scan.PAGE_IS_PFNZERO,  # not the zero page
        mask=pagemap_scan.PAGE_IS_PFNZERO,
        anyof=want,
        returned=want,
    )


def _read_pagemap(pagemap: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    run_lo = None
    addr = start
    while addr < end:
        count = min(_PM_BATCH, (end - addr) // PAGE_SIZE)
        raw = os.pread(pagemap, count * 8, addr // PAGE_SIZE * 8)
        if len(raw) < 8:
            break
        for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
            page = addr + i * PAGE_SIZE
            if entry & (_PM_PRESENT | _PM_SWAPPED):
                if run_lo is None:
                    run_lo = page
            elif run_lo is not None:
                yield run_lo, page
                run_lo = None
        addr += len(raw) // 8 * PAGE_SIZE
    if run_lo is not None:
        yield run_lo, addr


def read_into(pid: int, buf: mmap.mmap, runs: list[tuple[int, int]]) -> dict[int, bool]:
    """Copy *runs* of *pid*'s memory back to back into *buf*: ``{run start: copied}``."""
    done: dict[int, bool] = {}
    if not runs:
        return done
    # the temporary c_char releases its export at once, so the mapping can be closed later
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = 0
    for i in range(0, len(runs), _IOV_MAX):
        batch = runs[i : i + _IOV_MAX]
        size = sum(hi - lo for lo, hi in batch)
        local = _Iovec(base + offset, size)
        remote = (_Iovec * len(batch))(*(_Iovec(lo, hi - lo) for lo, hi in batch))
        got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, remote, len(batch), 0)
        # partial transfers stop between iovec elements (process_vm_readv(2)): the runs past
        # *got* bytes are retried one by one
        pos = offset
        for lo, hi in batch:
            n = hi - lo
            done[lo] = got >= pos - offset + n or _read_mem(pid, buf, pos, lo, n)
            pos += n
        offset += size
    return done


def _read_mem(pid: int, buf: mmap.mmap, pos: int, addr: int, length: int) -> bool:
    """One run through /proc/PID/mem, which reaches what process_vm_readv(2) may not
    (FOLL_FORCE: PROT_NONE pages, as the kernel's own core writer reads them)."""
    try:
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        done = 0
        while done < length:
            chunk = os.pread(mem, min(1 << 20, length - done), addr + done)
            if not chunk:
                return False
            buf[pos + done : pos + done + len(chunk)] = chunk
            done += len(chunk)
        return True
    except OSError as e:
        log.warning("process %d: [%#x, %#x) unreadable (%s)", pid, addr, addr + length, e)
        return False
    finally:
        os.close(mem)

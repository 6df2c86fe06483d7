"""From one process's CRIU images to a :class:`CoreModel`: segments with the sources of their
bytes, and the notes, as fs/binfmt_elf.c:elf_core_dump() would produce them.

The model is small (no page data) and computed completely before anything is written.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import struct
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import NamedTuple

from converters import origin
from converters.arch.base import ELF_PRARGSZ, Arch, CpuLayout, PrPsInfo, PrStatus, pack_siginfo
from converters.elf import NT, PAGE_SIZE, PF, Note, Piece, Segment
from converters.errors import ImageFormatError
from converters.files import NO_ROOT, FileRoot, OpenedFile, identity_mismatch
from converters.images import (
    ANON_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    VMA_ANON_PRIVATE,
    VMA_ANON_SHARED,
    VMA_AREA_AIORING,
    VMA_AREA_MEMFD,
    VMA_AREA_REGULAR,
    VMA_AREA_SYSVIPC,
    VMA_AREA_VDSO,
    VMA_AREA_VSYSCALL,
    VMA_AREA_VVAR,
    ImageSet,
    MappedFile,
    PageIndex,
    Thread,
    Vma,
    prot_from_perms,
)
from converters.options import DEFAULT_COREDUMP_FILTER, ConvertOptions, StreamedPages
from converters.sidecar import SIDECAR_NAME, Sidecar

log = logging.getLogger(__name__)


class MMF:
    """coredump_filter bits (include/linux/sched/coredump.h, MMF_DUMP_* - MMF_DUMP_FILTER_SHIFT)."""

    ANON_PRIVATE = 1 << 0
    ANON_SHARED = 1 << 1
    MAPPED_PRIVATE = 1 << 2
    MAPPED_SHARED = 1 << 3
    ELF_HEADERS = 1 << 4
    HUGETLB_PRIVATE = 1 << 5
    HUGETLB_SHARED = 1 << 6
    DAX_PRIVATE = 1 << 7
    DAX_SHARED = 1 << 8


PF_DUMPCORE = 0x200
PF_SIGNALED = 0x400
#: more segment bytes than this cannot come from a real process (see build())
MAX_CORE_BYTES = 1 << 60


@dataclass
class CoreModel:
    pid: int
    machine: int
    segments: list[Segment]
    notes: list[Note]
    warnings: list[str] = field(default_factory=list)
    files: FileRoot | None = None

    def close(self) -> None:
        if self.files is not None:
            self.files.close()

    @property
    def data_bytes(self) -> int:
        return sum(p.length for s in self.segments for p in s.pieces if p.kind != "hole")


@dataclass
class _Proc:
    """Everything about one process that the segment and note builders share."""

    images: ImageSet
    pid: int
    vmas: list[Vma]
    index: PageIndex
    files: FileRoot
    warnings: list[str]
    shmem: dict[int, PageIndex | None] = field(default_factory=dict)
    sysv_keys: dict[int, int] = field(default_factory=dict)
    #: VMAs (by start) whose saved pages are a dumping artifact, not the process's own
    no_saved_pages: frozenset[int] = frozenset()
    #: VMAs (by start) the images lack but the process had (MADV_DONTFORK under a clone)
    absent: frozenset[int] = frozenset()
    #: ConvertOptions.mapped_fds
    mapped_fds: Mapping[int, int] = field(default_factory=dict)
    #: MADV_GUARD_INSTALL ranges (ImageSet.guards()), sorted
    guards: list[tuple[int, int]] = field(default_factory=list)
    #: the core's own file, when the saved pages were streamed into it: its runs are
    #: ``present`` pieces, already in place (ConvertOptions.streamed)
    streamed: Path | None = None
    #: where a streamed dump put shared memory objects' pages (ConvertOptions.streamed)
    spilled: StreamedPages | None = None
    #: names of mapped files not looked up, for want of a files root (see converters.origin)
    unrooted: set[str] = field(default_factory=set)
    #: identity_mismatch() verdicts by (fd, name): None for the right file
    verdicts: dict[tuple[int, str], str | None] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning("%s", message)

    def shmem_index(self, shmid: int) -> PageIndex | None:
        if shmid not in self.shmem:
            placed = None
            if self.spilled is not None and shmid in self.spilled.shmem:
                assert self.spilled.spill is not None
                placed = (self.spilled.spill, self.spilled.shmem[shmid])
            self.shmem[shmid] = self.images.shmem_index(shmid, placed)
        return self.shmem[shmid]

    def mapped(self, vma: Vma) -> MappedFile | None:
        """The file behind *vma* as the kernel names it, or None for anonymous memory.

        ``shmid`` means a files.img id for file-backed and memfd VMAs, but a shmem object id
        for shared anonymous memory and SysV segments, which have no files.img entry.
        """
        if vma.file_backed or vma.has(VMA_AREA_MEMFD):
            return self.images.mapped_file(vma)
        if vma.has(VMA_AREA_SYSVIPC):
            # d_path() of a SysV segment's shm file; the key comes from the sidecar, when the
            # orchestrator copied the segment out (CRIU keeps it only for its own IPC ns)
            key = self.sysv_keys.get(vma.shmid, 0)
            return MappedFile(f"/SYSV{key:08x}", None, 0, deleted=True, shmid=vma.shmid)
        if vma.has(VMA_ANON_SHARED):
            return MappedFile("/dev/zero", None, 0, deleted=True, shmid=vma.shmid)
        return None

    def open_mapped(self, vma: Vma, mf: MappedFile) -> OpenedFile | None:
        held = self._held_file(vma, mf)
        if held is not None:
            return self._verified(vma, mf, held, live=True)
        if mf.deleted:
            ghost = self._ghost(vma)
            if ghost is None:
                self.warn(f"{mf.name}: deleted file at {vma.start:#x}; its unsaved pages are holes")
            return ghost
        opened = self.files.open(mf.name)
        if opened == NO_ROOT:
            self.unrooted.add(mf.name)
            return None
        if isinstance(opened, str):
            self.warn(f"{mf.name}: {opened}; mapping at {vma.start:#x} written as holes")
            return None
        return self._verified(vma, mf, opened)

    def _verified(
        self, vma: Vma, mf: MappedFile, opened: OpenedFile, *, live: bool = False
    ) -> OpenedFile | None:
        """*opened* if it is the file the images record for *vma*; else None and one warning
        per file, naming its first mapping and what differs."""
        key = (opened.fd, mf.name)
        if key not in self.verdicts:
            why = self.verdicts[key] = identity_mismatch(opened, mf, live=live)
            if why is not None:
                self.warn(
                    f"{mf.name}: not the file the process mapped ({why}); mapping at"
                    f" {vma.start:#x} written as holes"
                )
        return opened if self.verdicts[key] is None else None

    def _ghost(self, vma: Vma) -> OpenedFile | None:
        """The bytes CRIU saved of *vma*'s deleted file (its ghost-file image), if it did."""
        key = f"\0ghost:{vma.shmid}"
        kept = self.files.kept(key)
        if kept is not None:
            return kept if isinstance(kept, OpenedFile) else None
        ghost = self.images.ghost_file(vma.shmid)
        if ghost is None:
            self.files.keep_reason(key, "no ghost image")
            return None
        try:
            fd = os.open(ghost.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageFormatError(str(ghost.path), os.strerror(e.errno or 0)) from e
        opened = OpenedFile(fd, ghost.size, ghost.extents)
        self.files.keep(key, opened)
        return opened

    def _held_file(self, vma: Vma, mf: MappedFile) -> OpenedFile | None:
        """The caller's descriptor of *vma*'s file, if it still names the file CRIU saw."""
        fd = self.mapped_fds.get(vma.start)
        if fd is None:
            return None
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            st = os.fstat(fd)
        except OSError:
            return None
        if link.removesuffix(" (deleted)") != mf.name:
            self.warn(f"{mf.name}: the mapping at {vma.start:#x} now maps {link}; read by name")
            return None
        return OpenedFile(fd, st.st_size, None, st.st_mode)

    def read(self, addr: int, size: int) -> bytes:
        """Best-effort read of the process's memory as the core would show it."""
        out = bytearray(size)
        for vma in self.vmas:
            if vma.end <= addr or vma.start >= addr + size:
                continue
            for run in self.sources(vma, max(addr, vma.start), min(addr + size, vma.end)):
                if run.kind == "data":
                    chunk = _pread(run, run.hi - run.lo)
                    out[run.lo - addr : run.lo - addr + len(chunk)] = chunk
        return bytes(out)

    def read_present(self, addr: int, size: int) -> bytes | None:
        """The process's memory at ``[addr, addr + size)``, or None unless every byte of it
        is in the images or the mapped files (no hole, no unmapped byte)."""
        covered = 0
        for vma in self.vmas:
            if vma.end <= addr or vma.start >= addr + size:
                continue
            for run in self.sources(vma, max(addr, vma.start), min(addr + size, vma.end)):
                if run.kind == "data":
                    covered += run.hi - run.lo
        return self.read(addr, size) if covered == size else None

    def sources(self, vma: Vma, start: int, end: int) -> Iterator[Run]:
        """Split ``[start, end)`` of *vma* by where its bytes come from."""
        runs = self._sources(vma, start, end)
        return _outside_guards(runs, self.guards) if self.guards else runs

    def _sources(self, vma: Vma, start: int, end: int) -> Iterator[Run]:
        saved: list[Run] = []
        shm: PageIndex | None = None
        mf = self.mapped(vma)
        if mf is not None and mf.shmid is not None:
            shm = self.shmem_index(mf.shmid)
        elif mf is not None and vma.shared and not mf.name.startswith("/"):
            # anon_inode mappings (io_uring rings): the clone method saves their bytes as a
            # shmem pagemap keyed by the files.img id
            shm = self.shmem_index(vma.shmid)
        if shm is not None:
            base = vma.pgoff - vma.start
            for lo, hi, path, off in shm.segments(start + base, end + base):
                saved.append(Run(lo - base, hi - base, "data", path, None, off))
        elif vma.start not in self.no_saved_pages:
            for lo, hi, path, off in self.index.segments(start, end):
                saved.append(Run(lo, hi, "data", path, None, off))
        opened: OpenedFile | None = None  # where unsaved pages read from
        file_end = end
        # Unsaved shmem pages read as zeros. The kernel faults them in (shmem has a ->fault)
        # and writes zero pages; we leave holes: the same bytes, and an image claiming a huge
        # shared mapping cannot make us write unbounded zeros.
        if shm is None and mf is not None and vma.file_backed:
            opened = self.open_mapped(vma, mf)
            if opened is not None:
                # pages past the end of the file would SIGBUS: the kernel leaves holes there
                file_end = vma.start + max(_page_up(opened.size) - vma.pgoff, 0)
        base = vma.start - vma.pgoff  # the address of file offset 0
        pos = start
        for run in saved:
            if run.lo > pos:
                yield from _gap(pos, run.lo, opened, base, file_end)
            yield run
            pos = run.hi
        if pos < end:
            yield from _gap(pos, end, opened, base, file_end)


class Run(NamedTuple):
    """``[lo, hi)`` of a VMA: ``data`` from *path* or *fd* at *offset*, or a ``hole``."""

    lo: int
    hi: int
    kind: str
    path: Path | None
    fd: int | None
    offset: int


def _outside_guards(runs: Iterator[Run], guards: list[tuple[int, int]]) -> Iterator[Run]:
    """Runs read from a mapped file become holes over guard ranges: the kernel's
    get_dump_page() fails on a guard marker (mm/gup.c) and dump_user_range() skips the page.
    Saved pages never fall there (CRIU's pagemap has none), nor do other holes need cutting."""
    for run in runs:
        if run.kind != "data" or run.fd is None:
            yield run
            continue
        pos = run.lo
        i = max(bisect_right(guards, (run.lo, 1 << 64)) - 1, 0)
        while i < len(guards) and guards[i][0] < run.hi:
            g_lo, g_hi = max(guards[i][0], pos), min(guards[i][1], run.hi)
            if g_lo < g_hi:
                if g_lo > pos:
                    yield run._replace(lo=pos, hi=g_lo, offset=run.offset + pos - run.lo)
                yield Run(g_lo, g_hi, "hole", None, None, 0)
                pos = g_hi
            i += 1
        if pos < run.hi:
            yield run._replace(lo=pos, offset=run.offset + pos - run.lo)


def _gap(lo: int, hi: int, opened: OpenedFile | None, base: int, file_end: int) -> Iterator[Run]:
    """Unsaved pages ``[lo, hi)``: from the mapped file (at address *base* + offset) up to
    *file_end*, holes past it or without a file."""
    if opened is None:
        yield Run(lo, hi, "hole", None, None, 0)
        return
    mid = min(max(file_end, lo), hi)
    if mid > lo:
        if opened.extents is None:
            yield Run(lo, mid, "data", None, opened.fd, lo - base)
        else:
            yield from _extent_runs(lo, mid, opened.fd, opened.extents, base)
    if hi > mid:
        yield Run(mid, hi, "hole", None, None, 0)


def _extent_runs(
    lo: int, hi: int, fd: int, extents: tuple[tuple[int, int, int], ...], base: int
) -> Iterator[Run]:
    """``[lo, hi)`` of a file stored piecewise: data where an extent covers it, holes (the
    file's own holes, zeros) elsewhere."""
    pos = lo
    first = max(bisect_right(extents, (lo - base, 1 << 64)) - 1, 0)
    for off, length, at in extents[first:]:
        a, b = max(base + off, pos), min(base + off + length, hi)
        if a >= hi:
            break
        if b <= a:
            continue
        if a > pos:
            yield Run(pos, a, "hole", None, None, 0)
        yield Run(a, b, "data", None, fd, at + (a - base - off))
        pos = b
    if pos < hi:
        yield Run(pos, hi, "hole", None, None, 0)


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _pread(run: Run, size: int) -> bytes:
    if run.fd is not None:
        return os.pread(run.fd, size, run.offset)
    assert run.path is not None
    with run.path.open("rb") as f:
        f.seek(run.offset)
        return f.read(size)


# --- which VMAs get bytes ---------------------------------------------------------------------


def vma_dump_size(p: _Proc, vma: Vma, mm_filter: int) -> int:
    """How many bytes of *vma* the kernel dumps: fs/coredump.c:vma_dump_size() on what CRIU saw.

    ``vma->anon_vma`` is not in the images; a private VMA with pages in the pagemap has one
    (CRIU saves exactly the anonymous pages), which is the case that matters.
    """
    if vma.start in p.absent:
        return 0
    # always_dump_vma(): the gate (vsyscall) VMA and special mappings with a name (vdso, vvar)
    if vma.has(VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL):
        return vma.size
    if vma.dontdump:
        return 0
    # is_vm_hugetlb_page(): whole or nothing, by the hugetlb bits alone
    if vma.hugetlb:
        bit = MMF.HUGETLB_SHARED if vma.shared else MMF.HUGETLB_PRIVATE
        return vma.size if mm_filter & bit else 0
    mf = p.mapped(vma)
    if vma.shared:
        return vma.size if mm_filter & _shared_filter_bit(vma, mf) else 0
    return _private_dump_size(p, vma, mf, mm_filter)


def _shared_filter_bit(vma: Vma, mf: MappedFile | None) -> int:
    """The filter bit of a shared VMA: anonymous if its file has no name left."""
    unlinked = (
        mf is None or mf.deleted or vma.has(VMA_ANON_SHARED | VMA_AREA_MEMFD | VMA_AREA_SYSVIPC)
    )
    return MMF.ANON_SHARED if unlinked else MMF.MAPPED_SHARED


def _private_dump_size(p: _Proc, vma: Vma, mf: MappedFile | None, mm_filter: int) -> int:
    """vma_dump_size() for a private, non-hugetlb VMA: whole when it has anonymous pages or a
    file the filter dumps, else the ELF header page of a mapped ELF file (MMF_DUMP_ELF_HEADERS)."""
    has_anon = (
        vma.start not in p.no_saved_pages
        and next(p.index.segments(vma.start, vma.end), None) is not None
    )
    if has_anon and mm_filter & MMF.ANON_PRIVATE:
        return vma.size
    if not vma.file_backed:
        return 0
    if mm_filter & MMF.MAPPED_PRIVATE:
        return vma.size
    if not (mm_filter & MMF.ELF_HEADERS and vma.pgoff == 0 and vma.prot & PROT_READ):
        return 0
    if mf is not None and mf.mode & 0o111:
        return PAGE_SIZE
    # dump_vma_snapshot(): libraries need not be executable; look for the ELF magic
    return PAGE_SIZE if p.read(vma.start, 4) == b"\x7fELF" else 0


def _segment(p: _Proc, vma: Vma, dump_size: int) -> Segment:
    flags = (
        (PF.R if vma.prot & PROT_READ else 0)
        | (PF.W if vma.prot & PROT_WRITE else 0)
        | (PF.X if vma.prot & PROT_EXEC else 0)
    )
    pieces: list[Piece] = []
    if dump_size:
        if vma.has(VMA_AREA_VVAR | VMA_AREA_VSYSCALL):
            # get_dump_page() cannot pin these special pages: the kernel leaves holes
            runs: Iterator[Run] = iter(
                [Run(vma.start, vma.start + dump_size, "hole", None, None, 0)]
            )
        else:
            runs = p.sources(vma, vma.start, vma.start + dump_size)
        for run in runs:
            kind = run.kind
            if kind == "data" and p.streamed is not None and run.path == p.streamed:
                kind = "present"  # streamed into the core: offset is where it already is
            piece = Piece(kind, run.hi - run.lo, run.path, run.offset, run.fd)
            last = pieces[-1] if pieces else None
            if (
                last
                and last.kind == piece.kind
                and (
                    piece.kind == "hole"
                    or (
                        (last.path, last.fd) == (piece.path, piece.fd)
                        and last.offset + last.length == piece.offset
                    )
                )
            ):
                pieces[-1] = Piece(
                    last.kind, last.length + piece.length, last.path, last.offset, last.fd
                )
            else:
                pieces.append(piece)
    return Segment(vma.start, vma.size, int(flags), dump_size, pieces)


# --- vvar as the kernel lists it ----------------------------------------------------------------


@cache
def _own_special_mappings() -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("["):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    found.setdefault(parts[5], (lo, hi))
    except OSError:
        pass
    return found


def _own_vdso() -> bytes | None:
    own = _own_special_mappings().get("[vdso]")
    if own is None:
        return None
    return ctypes.string_at(own[0], own[1] - own[0])


def split_vvar(p: _Proc) -> list[Vma]:
    """CRIU 4.x records ``[vvar]`` and ``[vvar_vclock]`` as one VMA; the kernel has two since
    Linux 6.13 (commit e93d2521b27f "x86/vdso: Split virtual clock pages into dedicated
    mapping"), and the images do not say which kernel wrote them.

    When the saved vDSO is byte-identical to this host's, the images come from this kernel and
    its split applies; otherwise the merged VMA stays, with a warning.
    """
    own = _own_special_mappings()
    vvar, vclock = own.get("[vvar]"), own.get("[vvar_vclock]")
    out: list[Vma] = []
    for vma in p.vmas:
        if not vma.has(VMA_AREA_VVAR) or vvar is None or vclock is None:
            out.append(vma)
            continue
        head, tail = vvar[1] - vvar[0], vclock[1] - vclock[0]
        if vma.size != head + tail:
            out.append(vma)
            continue
        vdso = next((v for v in p.vmas if v.has(VMA_AREA_VDSO)), None)
        mine = _own_vdso()
        if vdso is None or mine is None or p.read(vdso.start, vdso.size) != mine:
            p.warn("images come from another kernel: [vvar] and [vvar_vclock] kept as one segment")
            out.append(vma)
            continue
        out.append(replace(vma, end=vma.start + head))
        out.append(replace(vma, start=vma.start + head))
    return out


# --- notes ----------------------------------------------------------------------------------------


def _sigmask(signals: object) -> int:
    mask = 0
    for s in getattr(signals, "signals", []):
        raw = bytes(s.siginfo)
        if len(raw) >= 4:
            (signo,) = struct.unpack_from("<i", raw)
            if 1 <= signo <= 64:
                mask |= 1 << (signo - 1)
    return mask


#: sigmask(SIGKILL) | sigmask(SIGSTOP): set_current_blocked() never blocks them
_UNBLOCKABLE = (1 << (9 - 1)) | (1 << (19 - 1))
_SIGSET = struct.Struct("<Q")
#: pselect6's 6th argument: struct {const sigset_t *p; size_t size;} (fs/select.c)
_SIGSET_ARG = struct.Struct("<QQ")


def _sighold(p: _Proc, t: Thread, gregs: bytes, blocked: int) -> int:
    """The blocked mask the kernel's core shows for *t*: fill_prstatus() reads
    current->blocked, which a thread sleeping in rt_sigsuspend, ppoll, pselect6 or
    epoll_pwait(2) has replaced with its temporary mask argument, while CRIU saves what
    PTRACE_GETSIGMASK answers: the saved mask under TIF_RESTORE_SIGMASK (kernel/ptrace.c
    ptrace_request()). The temporary mask is read back from the argument's memory (a thread
    that rewrote that memory while asleep is not told apart); *blocked*, with a warning, when
    that memory is not in the images."""
    found = t.arch.wait_sigmask(gregs, p.read)
    if found is None:
        return blocked
    addr, indirect = found
    if indirect and addr:
        pair = _argument(p, t, addr, _SIGSET_ARG.size)
        if pair is None:
            return blocked
        addr, size = _SIGSET_ARG.unpack(pair)
        if size != _SIGSET.size:  # refused by set_user_sigmask(): no temporary mask
            return blocked
    raw = _argument(p, t, addr, _SIGSET.size) if addr else None  # NULL: no temporary mask
    return blocked if raw is None else int(_SIGSET.unpack(raw)[0]) & ~_UNBLOCKABLE


def _argument(p: _Proc, t: Thread, addr: int, size: int) -> bytes | None:
    """The bytes a syscall argument of *t* points to, or None with a warning when they are not
    in the images."""
    raw = p.read_present(addr, size)
    if raw is None:
        p.warn(
            f"thread {t.tid}: the sigmask argument of its wait is not in the images "
            f"(at {addr:#x}); pr_sighold shows the saved mask"
        )
    return raw


def build_notes(
    p: _Proc,
    threads: list[Thread],
    mm: object,
    signal: int,
    ppid: int,
    layout: CpuLayout,
    sidecar: Sidecar,
) -> list[Note]:
    """Notes in fill_note_info()'s order: the first thread's PRSTATUS, PRPSINFO, SIGINFO,
    AUXV, FILE and FP state, then each other thread's PRSTATUS and FP state, then the
    architecture's extra notes (elf_coredump_extra_notes_write())."""
    proc = p.images.process(p.pid)
    main = next((t for t in threads if t.tid == p.pid), threads[0])
    ordered = [main] + [t for t in threads if t is not main]
    tc = main.core.tc
    shared_pending = _sigmask(tc.signals_s) if tc.HasField("signals_s") else 0

    def prstatus(t: Thread) -> bytes:
        th = t.core.thread_core if t.core.HasField("thread_core") else None
        blocked = (
            int(th.blk_sigset)
            if th is not None and th.HasField("blk_sigset")
            else int(tc.blk_sigset)
        )
        pending = _sigmask(th.signals_p) if th is not None and th.HasField("signals_p") else 0
        gregs = t.arch.core_gregs(t.core, p.read)
        return PrStatus(
            si_signo=signal,
            pr_cursig=signal,
            pr_sigpend=pending | shared_pending,
            pr_sighold=_sighold(p, t, gregs, blocked),
            pr_pid=t.tid,
            pr_ppid=ppid,
            pr_pgrp=proc.pgid,
            pr_sid=proc.sid,
            pr_reg=gregs,
            times=sidecar.times(t.tid),
        ).pack()

    def fpnotes(t: Thread) -> list[Note]:
        return t.arch.thread_notes(t.core, layout)

    notes = [Note(b"CORE", NT.PRSTATUS, prstatus(main))]
    notes.append(
        Note(b"CORE", NT.PRPSINFO, _prpsinfo(p, main, mm, proc.pgid, proc.sid, ppid, signal))
    )
    notes.append(Note(b"CORE", NT.SIGINFO, pack_siginfo(signal)))
    notes.append(Note(b"CORE", NT.AUXV, _auxv(mm)))
    notes.append(Note(b"CORE", NT.FILE, _nt_file(p)))
    notes.extend(fpnotes(main))
    for t in ordered[1:]:
        notes.append(Note(b"CORE", NT.PRSTATUS, prstatus(t)))
        notes.extend(fpnotes(t))
    notes.extend(main.arch.process_notes(layout))
    return notes


def _prpsinfo(
    p: _Proc, main: Thread, mm: object, pgrp: int, sid: int, ppid: int, signal: int
) -> bytes:
    """fill_psinfo(): psargs are the first 79 bytes of the argument area, NULs as spaces."""
    tc = main.core.tc
    th = main.core.thread_core if main.core.HasField("thread_core") else None
    arg_start = int(getattr(mm, "mm_arg_start", 0))
    arg_end = int(getattr(mm, "mm_arg_end", 0))
    n = max(0, min(arg_end - arg_start, ELF_PRARGSZ - 1))
    psargs = p.read(arg_start, n).replace(b"\0", b" ") if n else b""
    uid = gid = 0
    creds = th.creds if th is not None and th.HasField("creds") else p.images.task_creds(p.pid)
    if creds is not None:
        uid, gid = int(creds.uid), int(creds.gid)
    nice = int(th.sched_nice) if th is not None and th.HasField("sched_nice") else 0
    if not -20 <= nice <= 19:  # MIN_NICE..MAX_NICE; pr_nice is a char
        raise ImageFormatError(
            str(p.images.directory / f"core-{main.tid}.img"), f"sched_nice {nice} out of range"
        )
    flags = int(tc.flags) | PF_DUMPCORE | (PF_SIGNALED if signal else 0)
    return PrPsInfo(
        pr_state=0,  # the dumping thread is running: "R"
        pr_sname=b"R",
        pr_zomb=0,
        pr_nice=nice,
        pr_flag=flags,
        pr_uid=uid,
        pr_gid=gid,
        pr_pid=p.pid,
        pr_ppid=ppid,
        pr_pgrp=pgrp,
        pr_sid=sid,
        pr_fname=str(tc.comm).encode()[:15],
        pr_psargs=psargs,
    ).pack()


def _auxv(mm: object) -> bytes:
    """fill_auxv_note(): saved_auxv up to and including AT_NULL."""
    raw = [int(v) for v in getattr(mm, "mm_saved_auxv", [])]
    out: list[int] = []
    for i in range(0, len(raw) - 1, 2):
        out += [raw[i], raw[i + 1]]
        if raw[i] == 0:
            break
    else:
        out += [0, 0]
    return struct.pack(f"<{len(out)}Q", *(v & 0xFFFFFFFFFFFFFFFF for v in out))


def _nt_file(p: _Proc) -> bytes:
    """fill_files_note(): count, page size, (start, end, pgoff in pages) per file-backed VMA,
    then their NUL-terminated paths (d_path(), so unlinked files end in " (deleted)")."""
    entries: list[tuple[int, int, int]] = []
    names: list[bytes] = []
    for vma in p.vmas:
        mf = p.mapped(vma)
        if mf is None:
            if vma.has(VMA_AREA_AIORING):
                name = "/[aio] (deleted)"
            elif vma.hugetlb and vma.has(VMA_ANON_PRIVATE):
                # private anonymous hugetlb has a file (vm_file) the kernel lists
                name = ANON_HUGEPAGE + " (deleted)"
            else:
                continue
        else:
            name = mf.name + (" (deleted)" if mf.deleted else "")
        entries.append((vma.start, vma.end, vma.pgoff // PAGE_SIZE))
        names.append(name.encode(errors="surrogateescape") + b"\0")
    head = struct.pack("<QQ", len(entries), PAGE_SIZE)
    body = b"".join(struct.pack("<QQQ", *e) for e in entries)
    return head + body + b"".join(names)


# --- the whole model ------------------------------------------------------------------------------


def build(images: ImageSet, pid: int, options: ConvertOptions, sidecar: Sidecar) -> CoreModel:
    """The complete :class:`CoreModel` of process *pid*.

    :raises ConversionError: missing or malformed images.
    """
    proc = images.process(pid)
    mm = images.mm(pid)
    warnings: list[str] = []
    files, not_read_why = origin.files_for(images, options, sidecar)
    try:
        streamed = options.streamed
        index = images.page_index(pid, None if streamed is None else streamed.pages_file)
        p = _Proc(images, pid, images.vmas(pid, mm), index, files, warnings)
        p.streamed = None if streamed is None else streamed.core
        p.spilled = streamed
        p.mapped_fds = options.mapped_fds
        p.guards = images.guards(pid, mm)
        threads = [images.thread_core(tid) for tid in proc.threads]
        mm_filter = _first(
            options.coredump_filter, sidecar.coredump_filter, DEFAULT_COREDUMP_FILTER
        )
        signal = _first(options.signal, sidecar.signal, 0)
        ppid = _first(sidecar.ppid if proc.ppid == 0 else None, proc.ppid, 0)
        arch = threads[0].arch
        _check_page_size(mm, arch, images.directory / f"mm-{pid}.img")
        layout = _layout(arch, sidecar, images.directory)
        p.sysv_keys = dict(sidecar.sysv_keys)
        p.no_saved_pages = _no_saved_pages(sidecar, p.vmas)
        _fork_excluded(p, sidecar)
        if arch.name == platform.machine():  # another machine's images: another kernel's
            p.vmas = split_vvar(p)
        segments = [_segment(p, vma, vma_dump_size(p, vma, mm_filter)) for vma in p.vmas]
        total = sum(s.filesz for s in segments)
        if total > MAX_CORE_BYTES:
            # no address space holds this much (x86_64 user space is at most 2^57 bytes); the
            # offsets would overflow lseek() and the u64 p_offset fields
            raise ImageFormatError(
                str(images.directory / f"mm-{pid}.img"),
                f"VMAs to dump total {total} bytes, more than any address space",
            )
        notes = build_notes(p, threads, mm, signal, ppid, layout, sidecar)
        if p.unrooted:
            p.warn(origin.summary(len(p.unrooted), not_read_why))
    except BaseException:
        files.close()
        raise
    return CoreModel(pid, arch.e_machine, segments, notes, warnings, files)


def _fork_excluded(p: _Proc, sidecar: Sidecar) -> None:
    """Put back, without bytes, the MADV_DONTFORK VMAs a clone snapshot could not see, and say
    which MADV_WIPEONFORK VMAs read as zeros (sidecar ``dontfork``/``wipeonfork``)."""
    added: list[Vma] = []
    for area in sidecar.dontfork:
        start, end = area.start, area.end
        if not start < end < 1 << 64:
            continue
        if start % PAGE_SIZE or end % PAGE_SIZE:
            continue
        if any(v.start < end and start < v.end for v in p.vmas + added):
            continue
        prot = prot_from_perms(area.perms)
        flags = MAP_PRIVATE | MAP_ANONYMOUS
        added.append(Vma(start, end, 0, 0, prot, flags, VMA_AREA_REGULAR | VMA_ANON_PRIVATE, 0))
        if area.has_bytes:
            p.warn(
                f"[{start:#x}, {end:#x}) is MADV_DONTFORK: absent from the clone snapshot,"
                " written without bytes (use --method criu for them)"
            )
    for lo, hi in sidecar.wipeonfork:
        p.warn(f"[{lo:#x}, {hi:#x}) is MADV_WIPEONFORK: the clone snapshot sees it as zeros")
    if added:
        p.absent = frozenset(v.start for v in added)
        p.vmas = sorted(p.vmas + added, key=lambda v: v.start)


def _no_saved_pages(sidecar: Sidecar, vmas: list[Vma]) -> frozenset[int]:
    """Starts of private file VMAs the sidecar says had no anonymous pages in the target
    (clone snapshots: CRIU's own syscall patch leaves a COW page in the clone)."""
    exact = {(v.start, v.end): v for v in vmas if v.file_backed and not v.shared}
    return frozenset(vma.start for r in sidecar.no_saved_pages if (vma := exact.get(r)))


def _first(*values: int | None) -> int:
    for v in values:
        if v is not None:
            return v
    raise AssertionError("no default")


#: AT_PAGESZ (include/uapi/linux/auxvec.h): the page size of the kernel that ran the process
AT_PAGESZ = 6


def _check_page_size(mm: object, arch: Arch, path: Path) -> None:
    """Refuse images of a kernel whose pages are not :data:`PAGE_SIZE` bytes (an arm64 kernel
    with 16 or 64 KiB pages): CRIU records the page size nowhere but in the saved auxv.

    :raises ImageFormatError: AT_PAGESZ is another size.
    """
    raw = [int(v) for v in getattr(mm, "mm_saved_auxv", [])]
    for i in range(0, len(raw) - 1, 2):
        if raw[i] == AT_PAGESZ and raw[i + 1] != PAGE_SIZE:
            raise ImageFormatError(
                str(path),
                f"{arch.name} page size {raw[i + 1]} (AT_PAGESZ) is not supported"
                f" (supported: {PAGE_SIZE})",
            )


def _layout(arch: Arch, sidecar: Sidecar, directory: Path) -> CpuLayout:
    try:
        return arch.cpu_layout(sidecar.cpu_layout)
    except ValueError as e:
        raise ImageFormatError(str(directory / SIDECAR_NAME), f"cpu_layout {e}") from e

"""Reading a CRIU image directory: the one module that imports pycriu.

An image file is ``[IMG_COMMON|IMG_SERVICE magic] magic (u32 each) { u32 size; message }*``
(criu/include/magic.h, Documentation "Images"). We parse messages with pycriu's generated
protobuf classes directly rather than through ``pycriu.images.load``, which converts every entry
into a dict: a pagemap of a large process has hundreds of thousands of entries.

Every malformed input becomes an :class:`~converters.errors.ImageFormatError` naming the file;
protobuf's and pycriu's own exceptions never leave this module.

Image-format variants (issue 19): every one CRIU has written since 3.11, and the older ones
CRIU 4.2 itself still reads, read as CRIU reads them. pycriu is 4.2's; protobuf decodes by
field number and keeps absent optional fields distinguishable (``HasField``), so an older
entry decodes with the newer classes. Unit tests: tests/test_image_variants.py (named by
release); real images: tests/releases/ (4.1.1, 3.17.1's layout).

==================  ==============================================  ===========================
CRIU (commit)       what it wrote                                   read here as
==================  ==============================================  ===========================
< 1.4 (6b70e4ad8)   remap_file_path_entry without remap_type: top   GHOST if remap_id's top bit
                    bit of remap_id set for a ghost file            is set, else LINKED
any                 inventory img_version 1 (no IMG_COMMON word)    both magic layouts
                    or 2; CRIU refuses any other                    (:func:`_check_magic`); other
                                                                    versions refused
< 3.3 (0ce86c360)   ghost file: the bytes right after the entry     one extent (:func:`_read_ghost`)
>= 3.3              from 3 pages: chunks (offset, length, bytes)    extents; gaps are holes
< 3.4 (fe6fa3bec)   regular files in reg-files.img, no files.img    ``REG`` file entries
                                                                    (:func:`_file_entries`)
< 3.5 (9bc9fcb0c)   pagemap_entry: in_parent, no flags              :func:`pagemap_entry_run`
3.5 .. 4.1.x        pagemap_entry page count u32 in field 2         field 2 when 5 is unset
>= 4.2 (afb2e6c3f)  page count u64 in field 5, field 2 left 0       field 5
3.11 .. 3.13        no memfd: a shared memfd mapping is anonymous   as shared anonymous memory;
                    shared memory (VMA_ANON_SHARED); its name is    NT_FILE says "/dev/zero
                    not in the images                               (deleted)" (not recoverable)
>= 3.14 (c1e72aa9,  memfd.img inodes, MEMFD file entries            :meth:`ImageSet.mapped_file`
e3a5d097)
< 3.19 (dfa541095)  memfd_inode_entry without mode                  mode unknown (0): unchecked
older (7b18c13c,    reg_file_entry without build_id                 build-id not checked
3.15)
>= 4.0 (6e491a19a)  x86 xsave.cet (CET, supervisor state)           ignored: no user XSTATE part
>= 4.2 (9c0f725a6)  VMA_AREA_GUARD entries after the VMAs: guard     not VMAs; file bytes under
                    ranges overlapping real VMAs                    them are holes (guards())
>= 4.2 (7bf402f6b)  VMA_AREA_UPROBES vma, bytes not dumped (only    holes (the kernel writes
                    with --allow-uprobes)                           the XOL page: not in images)
< 2.0 (dde0df460)   creds in creds-PID.img, none in thread_core     :meth:`ImageSet.task_creds`
==================  ==============================================  ===========================

Unchanged since before 3.11 as far as the converter reads them: pstree_entry, mm_entry
(mm_saved_auxv a repeated uint64 since 808b8f2f0), vma_entry, core_entry's thread_info_x86,
task_core_entry and thread_core_entry (per-thread blk_sigset and creds since 2.0), the
PE_PARENT/PE_LAZY/PE_PRESENT values (fixed in 3.5, 48675a3c7), pages-N.img. Every x86 release
keeps at most 44 auxv words (criu/arch/x86/include/asm/types.h AT_VECTOR_SIZE): 22 pairs, what
Linux 6.18 gives a glibc program before AT_NULL; a longer auxv is cut there, and NT_AUXV gets
the AT_NULL CRIU's copy lacks.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from converters.arch import Arch, by_criu_mtype
from converters.elf import PAGE_SIZE
from converters.errors import ImageFormatError, MissingImageError

if TYPE_CHECKING:
    from google.protobuf.message import Message


class _Pycriu(NamedTuple):
    images: Any  # pycriu.images
    pb: Any  # pycriu.images.pb: the generated protobuf classes
    decode_error: type[Exception]  # google.protobuf.message.DecodeError


@cache
def _pycriu() -> _Pycriu:
    """pycriu and protobuf, imported on first use: a quarter of ``dump``'s start-up, which reads
    images only once CRIU has run, and imports these in a thread meanwhile (:func:`preload`)."""
    import pycriu.images as pyimages
    from google.protobuf.message import DecodeError
    from pycriu.images import pb as generated

    return _Pycriu(pyimages, generated, DecodeError)


class _Deferred:
    """A name of :func:`_pycriu`'s, looked up (and imported the first time) at each use."""

    def __init__(self, part: str) -> None:
        self._part = part

    def __getattr__(self, name: str) -> Any:
        return getattr(getattr(_pycriu(), self._part), name)


pyimages: Any = _Deferred("images")
pb: Any = _Deferred("pb")


def preload() -> None:
    """Import pycriu and protobuf now (``dump`` runs this in a thread while CRIU runs)."""
    _pycriu()


@cache
def _magic() -> dict[str, int]:
    magic: dict[str, int] = pyimages.magic.by_name
    return magic


_U32 = struct.Struct("<I")
#: No sane image entry is larger than this (CRIU's own limit for an entry is far smaller).
_MAX_ENTRY = 64 << 20
#: pid_t is a signed 32-bit int
_PID_MAX = 0x7FFFFFFF
#: A chain of pre-dump parents longer than this is a loop or an absurd image set.
MAX_PARENT_DEPTH = 64

_REMAP_GHOST_BIT = 1 << 31

# criu/include/image.h: VMA_AREA_* status bits
VMA_AREA_REGULAR = 1 << 0
VMA_AREA_STACK = 1 << 1
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_HEAP = 1 << 5
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_SOCKET = 1 << 11
VMA_AREA_VVAR = 1 << 12
VMA_AREA_AIORING = 1 << 13
VMA_AREA_MEMFD = 1 << 14
#: not a VMA: a range of MADV_GUARD_INSTALL guard pages inside a real one, listed after the
#: real VMAs since CRIU 4.2 (commit 9c0f725a6, where PAGEMAP_SCAN reports PAGE_IS_GUARD)
VMA_AREA_GUARD = 1 << 16

# criu/include/pagemap.h
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# <sys/mman.h>
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
#: include/uapi/asm-generic/mman.h; CRIU keeps the mmap flags of every VMA
MAP_HUGETLB = 0x40000
#: d_path() of the hugetlbfs file behind MAP_ANONYMOUS|MAP_HUGETLB (mm/mmap.c ksys_mmap_pgoff()
#: -> hugetlb_file_setup(HUGETLB_ANON_FILE)), which CRIU records as anonymous memory
ANON_HUGEPAGE = "/anon_hugepage"
MADV_DONTDUMP = 16


def read_entries(path: Path, magic: str, message: type[Message]) -> list[Any]:
    """Parse every entry of image *path*, checking that its magic is *magic*.

    :raises MissingImageError: the file does not exist.
    :raises ImageFormatError: wrong magic, truncated or undecodable entries.
    """
    return list(_iter_entries(path, magic, [message]))


def _iter_entries(path: Path, magic: str, messages: list[type[Message]]) -> Iterator[Any]:
    """Yield entries; ``messages[i]`` parses entry *i*, the last class parses the rest."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise MissingImageError(str(path)) from e
    except IsADirectoryError as e:
        raise ImageFormatError(str(path), "is a directory, not an image") from e
    except OSError as e:
        raise ImageFormatError(str(path), os.strerror(e.errno or 0)) from e
    pos = _check_magic(path, data, magic)
    index = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageFormatError(str(path), f"truncated entry header at byte {pos}")
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        if size > _MAX_ENTRY or pos + size > len(data):
            raise ImageFormatError(
                str(path), f"entry {index} claims {size} bytes, past the end of the file"
            )
        msg: Any = messages[min(index, len(messages) - 1)]()
        try:
            msg.ParseFromString(data[pos : pos + size])
            # proto2 required fields: a message missing one is corrupt, not merely sparse
            if not msg.IsInitialized():
                missing = ", ".join(msg.FindInitializationErrors())
                raise ImageFormatError(str(path), f"entry {index} lacks required {missing}")
        except _pycriu().decode_error as e:
            raise ImageFormatError(str(path), f"entry {index} is corrupt ({e})") from e
        except (RuntimeError, ValueError) as e:  # pure-python protobuf raises these too
            raise ImageFormatError(str(path), f"entry {index} is corrupt ({e})") from e
        pos += size
        index += 1
        yield msg


def _read_message(
    path: Path, f: BinaryIO, pos: int, message: type[Message], what: str
) -> tuple[Any, int]:
    """The length-prefixed protobuf *message* at *pos* of open image *f*, and where it ends."""
    f.seek(pos)
    head = f.read(4)
    if len(head) < 4:
        raise ImageFormatError(str(path), f"truncated {what} header at byte {pos}")
    (size,) = _U32.unpack(head)
    raw = f.read(size) if size <= _MAX_ENTRY else b""
    if len(raw) != size:
        raise ImageFormatError(str(path), f"{what} claims {size} bytes, past the end of the file")
    msg: Any = message()
    try:
        msg.ParseFromString(raw)
        if not msg.IsInitialized():
            missing = ", ".join(msg.FindInitializationErrors())
            raise ImageFormatError(str(path), f"{what} lacks required {missing}")
    except (_pycriu().decode_error, RuntimeError, ValueError) as e:
        raise ImageFormatError(str(path), f"{what} is corrupt ({e})") from e
    return msg, pos + 4 + size


def _read_ghost(path: Path, f: BinaryIO) -> GhostFile | None:
    total = os.fstat(f.fileno()).st_size
    pos = _check_magic(path, f.read(8), "GHOST_FILE")
    gfe, pos = _read_message(path, f, pos, pb.ghost_file_entry, "ghost file entry")
    if not stat.S_ISREG(gfe.mode):
        return None  # a ghost directory, fifo or symlink: nothing a mapping reads
    if not gfe.chunks:
        return GhostFile(path, total - pos, ((0, total - pos, pos),))
    file_size = int(gfe.size)
    extents: list[tuple[int, int, int]] = []
    end = 0
    while pos < total:
        chunk, data = _read_message(path, f, pos, pb.ghost_chunk_entry, f"chunk at byte {pos}")
        off, length = int(chunk.off), int(chunk.len)
        if off < end or off + length > file_size or data + length > total:
            raise ImageFormatError(
                str(path), f"chunk at byte {pos} ({length} bytes at {off}) is out of place"
            )
        extents.append((off, length, data))
        end = off + length
        pos = data + length
    return GhostFile(path, file_size, tuple(extents))


def _check_magic(path: Path, data: bytes, magic: str) -> int:
    want = _magic()[magic]
    if len(data) < 4:
        raise ImageFormatError(str(path), "truncated: no image magic")
    (first,) = _U32.unpack_from(data, 0)
    if first in (_magic()["IMG_COMMON"], _magic()["IMG_SERVICE"]):
        if len(data) < 8:
            raise ImageFormatError(str(path), "truncated: no image magic")
        (second,) = _U32.unpack_from(data, 4)
        got, pos = second, 8
    else:
        got, pos = first, 4
    if got != want:
        name = pyimages.magic.by_val.get(got, f"0x{got:08x}")
        raise ImageFormatError(str(path), f"wrong magic {name}, expected {magic}")
    return pos


def prot_from_perms(perms: str) -> int:
    """PROT_* of a /proc/PID/maps permission string (``rw-p``)."""
    return (
        (PROT_READ if "r" in perms else 0)
        | (PROT_WRITE if "w" in perms else 0)
        | (PROT_EXEC if "x" in perms else 0)
    )


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vma:
    """One VMA as CRIU recorded it (images/vma.proto ``vma_entry``)."""

    start: int
    end: int
    pgoff: int
    shmid: int
    prot: int
    flags: int
    status: int
    madv: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return bool(self.flags & MAP_SHARED)

    @property
    def hugetlb(self) -> bool:
        return bool(self.flags & MAP_HUGETLB)

    @property
    def dontdump(self) -> bool:
        return bool(self.madv & (1 << MADV_DONTDUMP))

    def has(self, status_bit: int) -> bool:
        return bool(self.status & status_bit)

    @property
    def file_backed(self) -> bool:
        return self.has(VMA_FILE_PRIVATE | VMA_FILE_SHARED)


@dataclass(frozen=True)
class MappedFile:
    """What a file-backed VMA maps: path as the target saw it, and inode facts."""

    name: str
    size: int | None
    mode: int
    deleted: bool = False
    #: shmem pagemap id for memfd/shared-anon objects whose pages CRIU saved itself
    shmid: int | None = None
    #: the ELF file's GNU build-id as CRIU recorded it (since 3.16, criu/files-reg.c:
    #: store_validation_data_build_id()): the note's descriptor bytes, zero-padded to whole
    #: uint32 words; None when CRIU recorded none (not ELF, no note, older CRIU, or
    #: ``--file-validation filesize``)
    build_id: bytes | None = None
    #: the mount the file was opened on, recorded by CRIU only when the dumped tree has a mount
    #: namespace of its own (criu/files-reg.c:dump_one_reg_file(), ``root_ns_mask &
    #: CLONE_NEWNS``): the name is then a path of that namespace, not of CRIU's
    mnt_id: int | None = None


@dataclass(frozen=True)
class GhostFile:
    """A deleted file's bytes as CRIU copied them into ``ghost-file-ID.img``
    (criu/files-reg.c:dump_ghost_file()): a GhostFileEntry, then either the whole content, or,
    from 3 pages up, chunks (GhostChunkEntry: offset, length, then the bytes) with the file's
    holes left out.

    :param extents: ``(file offset, length, offset in path)``, sorted; the rest reads as zeros.
    """

    path: Path
    size: int
    extents: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Thread:
    tid: int
    core: Any  # pb.core_entry
    #: the architecture of the thread's registers (core_entry.mtype)
    arch: Arch


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]


@dataclass
class PageIndex:
    """The pages CRIU saved for one address space (or shmem object), sorted by address.

    Runs are kept in parallel integer arrays (a pagemap can hold a million entries);
    :meth:`segments` walks a range in O(log n + runs). Runs whose bytes are in the parent image
    directory (pre-dump chains) defer to :attr:`parent`.
    """

    source: str
    pages_file: Path
    starts: array[int] = field(default_factory=lambda: array("Q"))
    ends: array[int] = field(default_factory=lambda: array("Q"))
    #: offset in :attr:`pages_file`, or -1 for a run that lives in the parent
    offsets: array[int] = field(default_factory=lambda: array("q"))
    parent: PageIndex | None = None

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, Path, int]]:
        """Yield ``(lo, hi, pages_file, file_offset)`` for saved bytes in ``[start, end)``.

        Addresses not yielded were not saved (never touched, or file-backed and unmodified).
        """
        i = max(bisect_right(self.starts, start) - 1, 0)
        n = len(self.starts)
        while i < n:
            run_start, run_end = self.starts[i], self.ends[i]
            if run_start >= end:
                break
            lo, hi = max(start, run_start), min(end, run_end)
            if lo < hi:
                off = self.offsets[i]
                if off >= 0:
                    yield lo, hi, self.pages_file, off + (lo - run_start)
                elif self.parent is not None:
                    yield from self.parent.segments(lo, hi)
            i += 1


@dataclass
class ImageSet:
    """An opened CRIU image directory (only the images a core needs are read)."""

    directory: Path
    processes: list[Process]
    files: dict[int, Any]
    memfd_inodes: dict[int, Any]
    ghost_ids: frozenset[int]
    #: files.img id -> remap id of its ghost-file image (remap_type GHOST)
    ghost_remaps: dict[int, int] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: Path) -> ImageSet:
        """Read pstree, files, memfd inodes and remaps of *directory*.

        :raises ConversionError: (subclasses) for a missing or malformed image.
        """
        if not directory.is_dir():
            raise MissingImageError(str(directory), "an images directory")
        pstree = read_entries(directory / "pstree.img", "PSTREE", pb.pstree_entry)
        if not pstree:
            raise ImageFormatError(str(directory / "pstree.img"), "no process in the tree")
        processes = _processes(directory / "pstree.img", pstree)
        _check_inventory(directory / "inventory.img")
        files = {int(fe.id): fe for fe in _file_entries(directory)}
        memfd = {
            int(me.inode_id): me
            for me in _optional_entries(
                directory / "memfd.img", "MEMFD_INODE", pb.memfd_inode_entry
            )
        }
        ghosts, remaps = _remaps(directory / "remap-fpath.img")
        return cls(directory, processes, files, memfd, ghosts, remaps)

    def process(self, pid: int) -> Process:
        for p in self.processes:
            if p.pid == pid:
                return p
        raise MissingImageError(str(self.directory / "pstree.img"), f"process {pid}")

    # -- per process ---------------------------------------------------------------------------

    def mm(self, pid: int) -> Any:
        path = self.directory / f"mm-{pid}.img"
        entries = read_entries(path, "MM", pb.mm_entry)
        if len(entries) != 1:
            raise ImageFormatError(str(path), f"{len(entries)} entries, expected 1")
        return entries[0]

    def vmas(self, pid: int, mm: Any) -> list[Vma]:
        path = self.directory / f"mm-{pid}.img"
        vmas = []
        prev_end = 0
        for i, v in enumerate(mm.vmas):
            if v.status & VMA_AREA_GUARD:
                continue  # see guards()
            vma = Vma(
                start=int(v.start),
                end=int(v.end),
                pgoff=int(v.pgoff),
                shmid=int(v.shmid),
                prot=int(v.prot),
                flags=int(v.flags),
                status=int(v.status),
                madv=int(v.madv) if v.HasField("madv") else 0,
            )
            if vma.start % PAGE_SIZE or vma.end % PAGE_SIZE or vma.end <= vma.start:
                raise ImageFormatError(str(path), f"vma {i} [{vma.start:#x}, {vma.end:#x}) invalid")
            if vma.start < prev_end:
                raise ImageFormatError(str(path), f"vma {i} at {vma.start:#x} overlaps vma {i - 1}")
            if vma.pgoff % PAGE_SIZE:
                raise ImageFormatError(str(path), f"vma {i} pgoff {vma.pgoff:#x} not page aligned")
            prev_end = vma.end
            vmas.append(vma)
        return vmas

    def task_creds(self, pid: int) -> Any | None:
        """The creds_entry of creds-PID.img, where CRIU < 2.0 kept a task's credentials
        (dde0df460 moved them into thread_core; criu/cr-restore.c:rst_prep_creds_from_img()
        still reads it), or None."""
        entries = _optional_entries(self.directory / f"creds-{pid}.img", "CREDS", pb.creds_entry)
        return entries[0] if entries else None

    def guards(self, pid: int, mm: Any) -> list[tuple[int, int]]:
        """The MADV_GUARD_INSTALL ranges CRIU >= 4.2 lists among the VMAs (VMA_AREA_GUARD
        entries, which overlap the real VMAs they sit in), sorted.

        :raises ImageFormatError: a range that is not page aligned or empty.
        """
        out = []
        for i, v in enumerate(mm.vmas):
            if v.status & VMA_AREA_GUARD:
                start, end = int(v.start), int(v.end)
                if start % PAGE_SIZE or end % PAGE_SIZE or end <= start:
                    raise ImageFormatError(
                        str(self.directory / f"mm-{pid}.img"),
                        f"guard vma {i} [{start:#x}, {end:#x}) invalid",
                    )
                out.append((start, end))
        return sorted(out)

    def thread_core(self, tid: int) -> Thread:
        path = self.directory / f"core-{tid}.img"
        entries = read_entries(path, "CORE", pb.core_entry)
        if len(entries) != 1:
            raise ImageFormatError(str(path), f"{len(entries)} entries, expected 1")
        core = entries[0]
        mtype = pb.core_entry.march.Name(core.mtype) if core.mtype else "UNKNOWN"
        arch = by_criu_mtype(mtype, str(path))
        if not core.HasField(arch.thread_info_field):
            raise ImageFormatError(str(path), f"no {arch.thread_info_field} (registers)")
        return Thread(tid, core, arch)

    def page_index(
        self, pid: int, placed: tuple[Path, Mapping[int, int]] | None = None
    ) -> PageIndex:
        """Process *pid*'s saved pages; with *placed* ``(file, offsets)``, the present runs'
        bytes are in that file at ``offsets[run address]`` (a streamed dump's core) instead of
        one after another in the pagemap's pages image."""
        return _load_page_index(self.directory, f"pagemap-{pid}.img", 0, placed=placed)

    def shmem_index(
        self, shmid: int, placed: tuple[Path, Mapping[int, int]] | None = None
    ) -> PageIndex | None:
        """Shared memory object *shmid*'s saved pages (*placed* as :meth:`page_index`)."""
        name = f"pagemap-shmem-{shmid}.img"
        if not (self.directory / name).exists():
            return None
        return _load_page_index(self.directory, name, 0, placed=placed)

    def ghost_file(self, file_id: int) -> GhostFile | None:
        """Where CRIU saved the bytes of deleted file *file_id*, if it did (a regular file
        under CRIU's ghost limit; larger ones are link-remapped or external).

        :raises MissingImageError: remap-fpath.img names a ghost image that is not there.
        :raises ImageFormatError: the ghost image is truncated or its chunks overlap or run
            past the file's size.
        """
        remap_id = self.ghost_remaps.get(file_id)
        if remap_id is None:
            return None
        path = self.directory / f"ghost-file-{remap_id:x}.img"
        try:
            with path.open("rb") as f:
                return _read_ghost(path, f)
        except FileNotFoundError as e:
            raise MissingImageError(str(path)) from e
        except OSError as e:
            raise ImageFormatError(str(path), os.strerror(e.errno or 0)) from e

    def foreign_mount(self) -> int | None:
        """A mount id CRIU recorded with a regular file, if it recorded any: it does only when
        the dumped tree had a mount namespace other than CRIU's (see :attr:`MappedFile.mnt_id`),
        so that the files' names are paths of that namespace."""
        for fe in self.files.values():
            if fe.HasField("reg") and fe.reg.HasField("mnt_id") and fe.reg.mnt_id >= 0:
                return int(fe.reg.mnt_id)
        return None

    def mapped_file(self, vma: Vma) -> MappedFile | None:
        """Resolve a file-backed or memfd VMA's ``shmid`` through files.img."""
        fe = self.files.get(vma.shmid)
        if fe is None:
            return None
        if fe.HasField("reg"):
            reg = fe.reg
            return MappedFile(
                name=str(reg.name),
                size=int(reg.size) if reg.HasField("size") else None,
                mode=int(reg.mode) if reg.HasField("mode") else 0,
                deleted=int(reg.id) in self.ghost_ids,
                build_id=_build_id(reg.build_id),
                mnt_id=int(reg.mnt_id) if reg.HasField("mnt_id") and reg.mnt_id >= 0 else None,
            )
        if fe.HasField("memfd"):
            inode = self.memfd_inodes.get(int(fe.memfd.inode_id))
            if inode is None:
                return None
            name = str(inode.name)
            # criu/memfd.c:memfd_dump() strips "/memfd:" from a memfd's name and keeps any
            # other shmem-like file's whole path: shared anonymous memory is "/dev/zero", shared
            # anonymous hugetlb "/anon_hugepage"
            shown = name if name.startswith("/") else f"/memfd:{name}"
            return MappedFile(
                name=shown,
                size=int(inode.size),
                mode=int(inode.mode),
                deleted=True,
                shmid=int(inode.shmid),
            )
        return None


def pagemap_entry_run(e: Any) -> tuple[int, int]:
    """``(PE_* flags, number of pages)`` of a ``pagemap_entry`` of any release (the module's
    table), as criu/pagemap.c:init_compat_pagemap_entry() reads it: ``in_parent`` adds
    PE_PARENT, no ``flags`` means PE_PRESENT, field 5 when set, else field 2 (which pycriu 4.2
    names ``compat_nr_pages``; an older entry's count decodes there).
    """
    flags = int(e.flags) if e.HasField("flags") else 0
    if e.HasField("in_parent") and e.in_parent:
        flags |= PE_PARENT
    elif not e.HasField("flags"):
        flags = PE_PRESENT
    nr = int(e.nr_pages) if e.HasField("nr_pages") else int(e.compat_nr_pages)
    return flags, nr


def pagemap_runs(path: Path) -> list[tuple[int, int, int]]:
    """``(vaddr, nr_pages, PE_* flags)`` of every entry of pagemap image *path*, in file order
    and as :func:`pagemap_entry_run` reads them (for rewriting images; the converter itself
    uses :class:`PageIndex`).

    :raises MissingImageError: the file does not exist.
    :raises ImageFormatError: wrong magic, no header, truncated or undecodable entries.
    """
    entries = _iter_entries(path, "PAGEMAP", [pb.pagemap_head, pb.pagemap_entry])
    if next(entries, None) is None:
        raise ImageFormatError(str(path), "no pagemap header")
    runs = []
    for e in entries:
        flags, nr = pagemap_entry_run(e)
        runs.append((int(e.vaddr), nr, flags))
    return runs


def _build_id(words: Any) -> bytes | None:
    """reg_file_entry.build_id (images/regfile.proto: ``repeated uint32``) as bytes.

    CRIU memcpy()s the note's bytes into the uint32 array, so the words are in the dumping
    machine's byte order: little-endian on every architecture the converter reads.
    """
    if not words:
        return None
    return struct.pack(f"<{len(words)}I", *(int(w) & 0xFFFFFFFF for w in words))


def _optional_entries(path: Path, magic: str, message: type[Message]) -> list[Any]:
    """:func:`read_entries` of an image CRIU writes only when it has something to say."""
    return read_entries(path, magic, message) if path.exists() else []


#: inventory_entry.img_version values CRIU writes (criu/include/magic.h): CRTOOLS_IMAGES_V1
#: (images without the IMG_COMMON word, before CRIU 1.x's V1_1) and CRTOOLS_IMAGES_V1_1
IMAGE_VERSIONS = (1, 2)


def _check_inventory(path: Path) -> None:
    """Refuse an image set whose version no CRIU release has written, as CRIU's own
    check_img_inventory() (criu/image.c) does. No inventory: not checked."""
    inventory = _optional_entries(path, "INVENTORY", pb.inventory_entry)
    if inventory and int(inventory[0].img_version) not in IMAGE_VERSIONS:
        raise ImageFormatError(
            str(path),
            f"image version {inventory[0].img_version} is not one CRIU writes "
            f"({', '.join(map(str, IMAGE_VERSIONS))})",
        )


def _file_entries(directory: Path) -> list[Any]:
    """files.img's entries; for images older than files.img (CRIU < 3.4, commit fe6fa3bec),
    reg-files.img's, as ``REG`` file entries. CRIU reads reg-files.img only when files.img is
    absent (criu/files-reg.c:collect_remaps_and_regfiles())."""
    if (directory / "files.img").exists():
        return read_entries(directory / "files.img", "FILES", pb.file_entry)
    regs = _optional_entries(directory / "reg-files.img", "REG_FILES", pb.reg_file_entry)
    return [pb.file_entry(id=r.id, type=pb.fd_types.Value("REG"), reg=r) for r in regs]


def _processes(path: Path, pstree: list[Any]) -> list[Process]:
    """pstree.img's entries, each id checked to fit a pid_t."""
    processes = []
    seen: set[int] = set()
    for e in pstree:
        # tuple() and max() run in C: a crafted pstree entry may list 10^6 threads
        threads = tuple(e.threads) or (int(e.pid),)
        if e.pid in seen:
            raise ImageFormatError(str(path), f"pid {e.pid} twice")
        # pid_t is an int: the notes pack these as signed 32-bit (struct elf_prstatus)
        for what, v in (("pid", e.pid), ("ppid", e.ppid), ("pgid", e.pgid), ("sid", e.sid)):
            if v > _PID_MAX:
                raise ImageFormatError(str(path), f"{what} {v} out of range")
        if (bad := max(threads)) > _PID_MAX:
            raise ImageFormatError(str(path), f"thread id {bad} out of range")
        seen.add(e.pid)
        processes.append(Process(int(e.pid), int(e.ppid), int(e.pgid), int(e.sid), threads))
    return processes


def _remaps(path: Path) -> tuple[frozenset[int], dict[int, int]]:
    """From remap-fpath.img: the files.img ids of unlinked files, and the ghost-file image id
    of each one CRIU saved."""
    ghosts: set[int] = set()
    remaps: dict[int, int] = {}
    linked, ghost = pb.remap_type.Value("LINKED"), pb.remap_type.Value("GHOST")
    for r in _optional_entries(path, "REMAP_FPATH", pb.remap_file_path_entry):
        # images/remap-file-path.proto: LINKED (0) or GHOST (1) means the file was unlinked
        # when dumped (PROCFS is a dead process's /proc entry). Before the field (CRIU < 1.4)
        # the top bit of remap_id said GHOST (criu/include/image.h REMAP_GHOST), as
        # criu/files-reg.c:collect_one_remap() still reads it.
        remap_id = int(r.remap_id)
        if r.HasField("remap_type"):
            kind = r.remap_type
        elif remap_id & _REMAP_GHOST_BIT:
            kind, remap_id = ghost, remap_id & ~_REMAP_GHOST_BIT
        else:
            kind = linked
        if kind in (linked, ghost):
            ghosts.add(int(r.orig_id))
        if kind == ghost:
            remaps[int(r.orig_id)] = remap_id
    return frozenset(ghosts), remaps


def _load_page_index(
    directory: Path,
    name: str,
    depth: int,
    chain: tuple[Path, ...] = (),
    *,
    placed: tuple[Path, Mapping[int, int]] | None = None,
) -> PageIndex:
    """The page index of pagemap image *name*, following its parent chain (*chain*: the real
    paths of the directories already on it); *placed* as :meth:`ImageSet.page_index` takes it."""
    path = directory / name
    if depth > MAX_PARENT_DEPTH:
        raise ImageFormatError(str(path), f"parent chain deeper than {MAX_PARENT_DEPTH}")
    entries = _iter_entries(path, "PAGEMAP", [pb.pagemap_head, pb.pagemap_entry])
    head = next(entries, None)
    if head is None:
        raise ImageFormatError(str(path), "no pagemap header")
    if placed is None:
        runs = _PagemapRuns(path, directory / f"pages-{head.pages_id}.img")
    else:
        runs = _PagemapRuns(path, placed[0], placed=placed[1])
    for i, e in enumerate(entries, start=1):
        runs.add(i, e)
    runs.check_pages_file()
    index = runs.sorted_index()
    if runs.needs_parent:
        index.parent = _parent_index(directory, path, depth, chain)
    return index


@dataclass
class _PagemapRuns:
    """A pagemap image's runs in file order, checked one by one."""

    path: Path
    pages_file: Path
    starts: array[int] = field(default_factory=lambda: array("Q"))
    ends: array[int] = field(default_factory=lambda: array("Q"))
    #: offset in :attr:`pages_file`, or -1 for a run in the parent
    offsets: array[int] = field(default_factory=lambda: array("q"))
    #: entry number of each run, for messages
    numbers: array[int] = field(default_factory=lambda: array("Q"))
    #: bytes of :attr:`pages_file` the runs use
    pages_bytes: int = 0
    needs_parent: bool = False
    #: where each present run is in :attr:`pages_file`, by address (a streamed core), when
    #: they are not one after another
    placed: Mapping[int, int] | None = None

    def add(self, i: int, e: Any) -> None:
        flags, nr = pagemap_entry_run(e)
        vaddr = int(e.vaddr)
        if vaddr % PAGE_SIZE:
            raise ImageFormatError(str(self.path), f"entry {i} address {vaddr:#x} not page aligned")
        # the end must fit the u64 index arrays: a run reaching 2^64 is past any address space
        if nr <= 0:
            raise ImageFormatError(str(self.path), f"entry {i} has an absurd size of {nr} pages")
        if vaddr + nr * PAGE_SIZE >= 1 << 64:
            raise ImageFormatError(
                str(self.path), f"entry {i} ({nr} pages at {vaddr:#x}) runs past the address space"
            )
        if flags & PE_PARENT:
            self.needs_parent = True
            off = -1
        elif flags & PE_PRESENT and self.placed is not None:
            off = self.placed.get(vaddr, -1)
            if off < 0 or off % PAGE_SIZE:
                raise ImageFormatError(
                    str(self.path), f"entry {i} ({vaddr:#x}) is not a run streamed into the core"
                )
            self.pages_bytes = max(self.pages_bytes, off + nr * PAGE_SIZE)
        elif flags & PE_PRESENT:
            off = self.pages_bytes
            self.pages_bytes += nr * PAGE_SIZE
            if self.pages_bytes >= 1 << 63:  # no pages file is this long (offsets are signed)
                raise ImageFormatError(
                    str(self.path), f"entry {i} puts pages past the end of {self.pages_file.name}"
                )
        else:
            return  # lazy pages not in this image set: they read as holes
        self.starts.append(vaddr)
        self.ends.append(vaddr + nr * PAGE_SIZE)
        self.offsets.append(off)
        self.numbers.append(i)

    def check_pages_file(self) -> None:
        """The pages image holds every byte the runs point at."""
        if not self.pages_bytes:
            return
        try:
            have = self.pages_file.stat().st_size
        except FileNotFoundError as e:
            raise MissingImageError(str(self.pages_file), str(self.path)) from e
        need = self.pages_bytes
        if have < need:
            raise ImageFormatError(
                str(self.path),
                f"points past the end of {self.pages_file.name} ({need} > {have} bytes)",
            )

    def sorted_index(self) -> PageIndex:
        """The runs by address; overlapping runs are an error."""
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        index = PageIndex(source=str(self.path), pages_file=self.pages_file)
        prev_end, prev_i = 0, 0
        for k in order:
            if index.starts and self.starts[k] < prev_end:
                raise ImageFormatError(
                    str(self.path), f"entry {self.numbers[k]} overlaps entry {prev_i}"
                )
            prev_end, prev_i = self.ends[k], self.numbers[k]
            index.starts.append(self.starts[k])
            index.ends.append(self.ends[k])
            index.offsets.append(self.offsets[k])
        return index


def _parent_index(directory: Path, path: Path, depth: int, chain: tuple[Path, ...]) -> PageIndex:
    """The index of the same pagemap in *directory*'s ``parent`` (a pre-dump round)."""
    parent_dir = directory / "parent"
    if not parent_dir.is_dir():
        raise MissingImageError(str(parent_dir), f"{path.name} (pages in parent)")
    # CRIU's parent is a symlink (../prev): compare real paths so that a chain looping back is
    # named as such, instead of growing parent/parent/... until the kernel's ELOOP
    here = Path(os.path.realpath(directory))
    real_parent = Path(os.path.realpath(parent_dir))
    if real_parent == here or real_parent in chain:
        raise ImageFormatError(str(path), f"parent chain loops back to {real_parent}")
    return _load_page_index(real_parent, path.name, depth + 1, (*chain, here))


# --- thin wrappers for other parts of the project ------------------------------------------------


def read_stats(path: Path) -> dict[str, int]:
    """The ``dump`` section of CRIU's ``stats-dump`` image as a dict of ints."""
    entries = read_entries(path, "STATS", pb.stats_entry)
    if not entries or not entries[0].HasField("dump"):
        raise ImageFormatError(str(path), "no dump statistics")
    d = entries[0].dump
    return {f.name: int(v) for f, v in d.ListFields()}


def load_image(path: Path) -> dict[str, Any]:
    """The whole image as pycriu's dict form (for rewriting images; not for bulk data)."""
    try:
        with path.open("rb") as f:
            return dict(pyimages.load(f))
    except FileNotFoundError as e:
        raise MissingImageError(str(path)) from e
    except Exception as e:  # pycriu raises bare Exception for unknown magic
        raise ImageFormatError(str(path), f"cannot decode: {e}") from e


def dump_image(path: Path, image: dict[str, Any]) -> None:
    """Write *image* (pycriu dict form) to *path* atomically."""
    buf = io.BytesIO()
    try:
        pyimages.dump(image, buf)
    except Exception as e:
        raise ImageFormatError(str(path), f"cannot encode: {e}") from e
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)

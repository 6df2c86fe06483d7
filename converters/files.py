"""Opening the files a process had mapped, under a files root and nowhere else, and only when
they are the files the images describe.

Images may come from elsewhere and name any path (``/etc/shadow``, ``/dev/sda``,
``/proc/kcore``, a symlink out of the root). Names are resolved by the kernel with the root as
``/`` (openat2(2) ``RESOLVE_IN_ROOT``: no symlink or ``..`` leads out of it); only regular files
are opened; devices, FIFOs and sockets are never opened at all (they are looked at through an
``O_PATH`` descriptor, which opens nothing). A checkpoint archive's ``rootfs-diff.tar`` can be laid
over the root (:class:`TarOverlay`): its regular members are read in place, nothing is extracted.

A file found is used only if it is the one the images record (:func:`identity_mismatch`): the
same size, mode and, for ELF files, GNU build-id as CRIU saw. Anything else gives holes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from converters.arch import host
from converters.archive import MAX_ENTRIES, BoundedTarInfo
from converters.images import MappedFile

#: statfs() f_type of filesystems whose "regular files" are windows onto kernel or process
#: state (include/uapi/linux/magic.h): /proc/kcore, /proc/PID/mem, sysfs attributes, ...
_PSEUDO_FS = {
    0x9FA0: "procfs",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroupfs",
    0x63677270: "cgroup2fs",
    0xCAFE4A11: "bpffs",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstorefs",
    0x1CD1: "devpts",
}


class _StatFs(ctypes.Structure):
    # struct statfs (x86_64/aarch64 glibc): f_type comes first; the rest is not needed here
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)


def pseudo_fs(target: str | int) -> str | None:
    """The name of the pseudo filesystem *target* (a path or an fd) lives on, if it does.

    A file whose filesystem cannot be determined counts as pseudo: refusing is the safe side.
    """
    buf = _StatFs()
    if isinstance(target, int):
        rc = _libc.fstatfs(target, ctypes.byref(buf))
    else:
        rc = _libc.statfs(os.fsencode(target), ctypes.byref(buf))
    if rc != 0:
        return "a filesystem that cannot be identified"
    return _PSEUDO_FS.get(buf.f_type & 0xFFFFFFFF)


@dataclass
class OpenedFile:
    """An open source of a mapped file's bytes.

    :param extents: None when offset N of the file is offset N of *fd*; otherwise the file is
        stored piecewise in *fd* (a CRIU ghost-file image, a tar member): ``(file offset,
        length, fd offset)`` sorted, and the rest of the file reads as zeros.
    :param mode: st_mode of the file, when known (0: not known).
    """

    fd: int
    size: int
    extents: tuple[tuple[int, int, int], ...] | None = None
    mode: int = 0

    def pread(self, size: int, offset: int) -> bytes:
        """Up to *size* bytes of the file at *offset* (fewer at its end)."""
        size = max(0, min(size, self.size - offset))
        if self.extents is None:
            return os.pread(self.fd, size, offset) if size else b""
        out = bytearray(size)
        for off, length, at in self.extents:
            lo, hi = max(off, offset), min(off + length, offset + size)
            if lo < hi:
                chunk = os.pread(self.fd, hi - lo, at + lo - off)
                out[lo - offset : lo - offset + len(chunk)] = chunk
        return bytes(out)


# --- identity: is this the file the images describe? ------------------------------------------

#: CRIU looks for the build-id in the first MiB only (criu/files-reg.c: BUILD_ID_MAP_SIZE)
BUILD_ID_MAP_SIZE = 1 << 20
#: NT_GNU_BUILD_ID (include/uapi/linux/elf.h); CRIU takes the first note of this type in a
#: PT_NOTE segment, whatever its owner name
NT_GNU_BUILD_ID = 3
PT_NOTE = 4
#: (e_phoff, e_phentsize, e_phnum) and (p_type, p_offset, p_filesz) offsets per ELF class
_EHDR = {1: (0x1C, 0x2A, 0x2C), 2: (0x20, 0x36, 0x38)}
_PHDR = {1: (0x00, 0x04, 0x10), 2: (0x00, 0x08, 0x20)}


def elf_build_id(read: Callable[[int, int], bytes]) -> bytes | None:
    """The GNU build-id of an ELF file read through ``read(size, offset)``, as CRIU computes it
    (criu/files-reg.c:get_build_id_64() and _32()): the descriptor of the first
    NT_GNU_BUILD_ID note of a PT_NOTE segment within the first MiB, 1 to 512 bytes; None for a
    file that is not ELF or has no such note."""
    ident = read(16, 0)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in _EHDR:
        return None
    cls, order = ident[4], "<" if ident[5] != 2 else ">"
    word, addr = (f"{order}I", f"{order}I") if cls == 1 else (f"{order}I", f"{order}Q")
    phoff_at, phentsize_at, phnum_at = _EHDR[cls]
    ehdr = read(phnum_at + 2, 0)
    if len(ehdr) < phnum_at + 2:
        return None
    (phoff,) = struct.unpack_from(addr, ehdr, phoff_at)
    (phentsize,) = struct.unpack_from(f"{order}H", ehdr, phentsize_at)
    (phnum,) = struct.unpack_from(f"{order}H", ehdr, phnum_at)
    t_at, off_at, sz_at = _PHDR[cls]
    for i in range(phnum):
        at = phoff + i * phentsize
        if phentsize < sz_at + 8 or at + phentsize > BUILD_ID_MAP_SIZE:
            break
        ph = read(phentsize, at)
        if len(ph) < phentsize or struct.unpack_from(word, ph, t_at)[0] != PT_NOTE:
            continue
        (p_offset,) = struct.unpack_from(addr, ph, off_at)
        (p_filesz,) = struct.unpack_from(addr, ph, sz_at)
        end = min(p_offset + p_filesz, BUILD_ID_MAP_SIZE)
        notes = read(max(0, end - p_offset), p_offset) if p_offset < end else b""
        found = _build_id_note(notes, order)
        if found is not None:
            return found
    return None


def _build_id_note(notes: bytes, order: str) -> bytes | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from(f"{order}III", notes, pos)
        desc_at = pos + 12 + ((namesz + 3) & ~3)
        if ntype == NT_GNU_BUILD_ID:
            if not 0 < descsz <= 512 or desc_at + descsz > len(notes):
                return None
            return notes[desc_at : desc_at + descsz]
        pos = desc_at + ((descsz + 3) & ~3)
    return None


def identity_mismatch(opened: OpenedFile, mf: MappedFile, *, live: bool = False) -> str | None:
    """What makes *opened* another file than the mapped one *mf* records, or None.

    Compared: the size (reg_file_entry.size), the mode when both are known (reg_file_entry.mode;
    the images hold no mtime), and the GNU build-id when CRIU recorded one (a file without one
    then differs too). Identical facts do not prove the same bytes, but a different library,
    or a host file of the same name that the process never saw, differs in one of them.

    :param live: *opened* is the mapping's own file (a descriptor from /proc/PID/map_files,
        which the kernel would read too, however it changed since CRIU's dump): only the
        build-id is compared, which catches a library mapped anew at the same place between
        CRIU's dump and the opening, and never a data file that grew.
    """
    diffs = []
    if not live and mf.size is not None and opened.size != mf.size:
        diffs.append(f"size {opened.size}, recorded {mf.size}")
    if not live and mf.mode and opened.mode and opened.mode != mf.mode:
        diffs.append(f"mode {opened.mode:o}, recorded {mf.mode:o}")
    if mf.build_id is not None and not diffs:
        own = elf_build_id(opened.pread)
        padded = None if own is None else own + bytes(-len(own) % 4)
        if padded != mf.build_id:
            mine = "none" if own is None else own.hex()
            diffs.append(f"build-id {mine}, recorded {mf.build_id.hex()}")
    return "; ".join(diffs) or None


# --- resolving names inside a root ------------------------------------------------------------

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    # struct open_how (include/uapi/linux/openat2.h)
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _open_in_root(root_fd: int, name: str) -> int:
    """An ``O_PATH`` descriptor of *name* resolved with *root_fd* as ``/`` (openat2(2)
    RESOLVE_IN_ROOT, Linux 5.6): symlinks and ``..`` stay inside; nothing is opened for I/O.

    :raises OSError: as openat2 fails.
    """
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    nr = host().syscalls.openat2
    fd = _libc.syscall(nr, root_fd, os.fsencode(name), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return int(fd)


@dataclass(frozen=True)
class TarMember:
    offset: int
    size: int
    mode: int


class TarOverlay:
    """The regular files of an uncompressed tar, read in place, as the files under *mount*: a
    checkpoint's ``rootfs-diff.tar`` (what the container changed in its root filesystem; with
    the names it deleted, ``deleted.files``) over ``/``, or its ``devshm-checkpoint.tar`` (the
    whole content of its /dev/shm tmpfs) over ``/dev/shm``. Links, devices and sparse members
    are never read: a name that is one of them is answered with a reason."""

    def __init__(
        self, tar: Path | None, deleted: frozenset[str] = frozenset(), mount: str = "/"
    ) -> None:
        self.tar = tar
        self.deleted = deleted
        #: the mount the tar holds whole (its names are the only files there), "/" for none
        self.mount = _normal(mount)
        self.members: dict[str, TarMember | str] = {}
        self._fd: int | None = None
        if tar is not None:
            self._index(tar)

    @classmethod
    def load(
        cls, tar: Path, deleted_list: Path | None = None, mount: str = "/"
    ) -> TarOverlay | None:
        """The overlay of *tar* and of the JSON list of deleted names *deleted_list*, either of
        which may be absent; None when both are.

        :raises OSError, tarfile.TarError, ArchiveError, ValueError: an unreadable tar or list.
        """
        deleted: frozenset[str] = frozenset()
        if deleted_list is not None and deleted_list.is_file():
            names = json.loads(deleted_list.read_text())
            if not isinstance(names, list):
                raise ValueError(f"{deleted_list.name} is not a JSON list")
            deleted = frozenset(_normal(n) for n in names if isinstance(n, str))
        has_tar = tar.is_file() and not tar.is_symlink()
        if not has_tar and not deleted:
            return None
        return cls(tar if has_tar else None, deleted, mount)

    def _index(self, tar: Path) -> None:
        with tarfile.open(tar, "r:", tarinfo=BoundedTarInfo) as tf:
            for count, m in enumerate(tf, start=1):
                if count > MAX_ENTRIES:
                    raise ValueError(f"{tar.name}: more than {MAX_ENTRIES} entries")
                name = _normal(f"{self.mount}/{m.name}")
                if m.isreg() and not m.issparse() and m.type != tarfile.CONTTYPE:
                    self.members[name] = TarMember(m.offset_data, m.size, stat.S_IFREG | m.mode)
                elif m.islnk() and isinstance(
                    target := self.members.get(_normal(f"{self.mount}/{m.linkname}")), TarMember
                ):
                    # a hard link to a regular file earlier in the tar (tar writes a file's
                    # second name so): the same bytes, never a path looked up anywhere
                    self.members[name] = target
                elif not m.isdir():
                    self.members[name] = f"not a regular file in the checkpoint's {tar.name}"

    def open(self, name: str) -> OpenedFile | str | None:
        """The member *name*, a reason it cannot be read, or None when the tar leaves the name
        to the root below."""
        member = self.members.get(name)
        if member is None:
            if name in self.deleted:
                return "deleted in the container"
            if self.mount != "/" and name.startswith(self.mount + "/"):
                return f"not in the checkpoint's copy of {self.mount}"
            return None
        if isinstance(member, str):
            return member
        if self._fd is None:
            assert self.tar is not None  # members come from it
            self._fd = os.open(self.tar, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        extents = ((0, member.size, member.offset),) if member.size else ()
        return OpenedFile(self._fd, member.size, extents, member.mode)

    @property
    def fd(self) -> int | None:
        """The tar's descriptor, once a member was opened (members share it)."""
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _normal(name: str) -> str:
    """A tar member's or a listed name as an absolute path without ``.`` or empty parts
    (``..`` stays: no name the kernel gives holds one, so such a member is never found)."""
    return "/" + "/".join(p for p in name.split("/") if p not in ("", "."))


#: FileRoot.open()'s answer for a name it has no root to look in
NO_ROOT = "not read from this host"


@dataclass
class FileRoot:
    """Opens mapped files by name: from the first of *overlays* that has an answer, then under
    *root* (None: nowhere). Caches descriptors; :meth:`close` releases them."""

    root: Path | None
    overlays: tuple[TarOverlay, ...] = ()
    _open: dict[str, OpenedFile | str] = field(default_factory=dict)
    _root_fd: int | None = None

    def open(self, name: str) -> OpenedFile | str:
        """The opened file, or a sentence saying why it cannot be used (:data:`NO_ROOT` when
        there is no root to look in)."""
        cached = self._open.get(name)
        if cached is None:
            cached = self._open[name] = self._open_uncached(name)
        return cached

    def _open_uncached(self, name: str) -> OpenedFile | str:
        if not name.startswith("/"):
            return "not an absolute path"
        if "\0" in name:  # no kernel path holds one
            return "name holds a NUL byte"
        for overlay in self.overlays:
            found = overlay.open(name)
            if found is not None:
                return found
        if self.root is None:
            return NO_ROOT
        try:
            if self._root_fd is None:
                # opened as given, not through realpath(): /proc/PID/root, a running
                # container's root, is a link that realpath() would take for "/"
                self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            path_fd = _open_in_root(self._root_fd, name)
        except OSError as e:
            return "missing" if e.errno == errno.ENOENT else os.strerror(e.errno or 0)
        try:
            return _reopen(path_fd)
        finally:
            os.close(path_fd)

    def keep(self, key: str, opened: OpenedFile) -> None:
        """Cache *opened* (not found by name: a ghost image) under *key*; :meth:`close` closes
        it with the rest. Keys start with a NUL byte, which no name holds."""
        self._open[key] = opened

    def keep_reason(self, key: str, reason: str) -> None:
        """Cache that *key* has no file, for *reason*."""
        self._open[key] = reason

    def kept(self, key: str) -> OpenedFile | str | None:
        return self._open.get(key)

    def close(self) -> None:
        shared = {o.fd for o in self.overlays}  # the overlays close their own
        for entry in self._open.values():
            if isinstance(entry, OpenedFile) and entry.fd not in shared:
                os.close(entry.fd)
        self._open.clear()
        for overlay in self.overlays:
            overlay.close()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None


def _reopen(path_fd: int) -> OpenedFile | str:
    """Open the file behind an ``O_PATH`` descriptor for reading, if it is a regular file on a
    real filesystem; the descriptor opened is checked to be that file."""
    st = os.fstat(path_fd)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    pseudo = pseudo_fs(path_fd)
    if pseudo:
        return f"on {pseudo}, not a regular file's contents"
    try:
        fd = os.open(
            f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        )
    except OSError as e:
        return os.strerror(e.errno or 0)
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
        os.close(fd)
        return "changed while being opened"
    return OpenedFile(fd, fst.st_size, None, fst.st_mode)

"""Opening the files a process had mapped, under ``--files-root`` and nowhere else.

Images may come from elsewhere and name any path (``/etc/shadow``, ``/dev/sda``,
``/proc/kcore``, a symlink out of the root). Only regular files that resolve inside the root are
opened; devices, FIFOs and sockets are never opened at all (we stat before open, then check the
opened file is the one we stat'ed).
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path

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
        stored piecewise in *fd* (a CRIU ghost-file image): ``(file offset, length, fd
        offset)`` sorted, and the rest of the file reads as zeros.
    """

    fd: int
    size: int
    extents: tuple[tuple[int, int, int], ...] | None = None


class FileRoot:
    """Opens mapped files under *root*; caches descriptors; :meth:`close` releases them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self._open: dict[str, OpenedFile | str] = {}

    def open(self, name: str) -> OpenedFile | str:
        """The opened file, or a sentence saying why it cannot be used."""
        cached = self._open.get(name)
        if cached is None:
            cached = self._open[name] = self._open_uncached(name)
        return cached

    def _open_uncached(self, name: str) -> OpenedFile | str:
        if not name.startswith("/"):
            return "not an absolute path"
        if "\0" in name:  # no kernel path holds one; os.stat() would raise ValueError
            return "name holds a NUL byte"
        candidate = os.path.realpath(os.path.join(self.root, name.lstrip("/")))
        if candidate != str(self.root) and not candidate.startswith(
            str(self.root).rstrip("/") + "/"
        ):
            return f"resolves outside the files root {self.root}"
        try:
            st = os.stat(candidate)
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return os.strerror(e.errno or 0)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        pseudo = pseudo_fs(candidate)
        if pseudo:
            return f"on {pseudo}, not a regular file's contents"
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return os.strerror(e.errno or 0)
        fst = os.fstat(fd)
        if (
            (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino)
            or not stat.S_ISREG(fst.st_mode)
            or pseudo_fs(fd)
        ):
            os.close(fd)
            return "changed while being opened"
        return OpenedFile(fd, fst.st_size)

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
        for entry in self._open.values():
            if isinstance(entry, OpenedFile):
                os.close(entry.fd)
        self._open.clear()

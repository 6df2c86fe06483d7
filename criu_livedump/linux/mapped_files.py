"""Descriptors of the files a live process maps, opened through /proc/PID/map_files.

The kernel writes a mapped file's bytes from the mapping's own file (vma->vm_file), whatever
its name now leads to: a library an upgrade replaced (the mapped one is deleted), a file of the
target's own mount namespace or chroot. Opening /proc/PID/map_files/START-END gives us that
very file; the kernel allows it to CAP_SYS_ADMIN (fs/proc/base.c:proc_map_files_get_link()).
The converter reads through these (:attr:`converters.options.ConvertOptions.mapped_fds`) when
they still name the file CRIU recorded, and by name otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
from collections.abc import Mapping

from converters.files import pseudo_fs
from criu_livedump.linux.procfs import read_maps

__all__ = ["close_mapped_files", "open_mapped_files"]

#: Mappings whose bytes CRIU saves itself (shmem, memfd, SysV) or that have no file.
_NOT_FILES = ("/memfd:", "/SYSV", "/dev/zero")


def open_mapped_files(pid: int) -> dict[int, int]:
    """``{vma start: fd}`` for every regular file *pid* maps, one descriptor per file.

    Whatever cannot be opened (no privilege, the mapping went away, not a regular file, a
    pseudo filesystem) is left out: the converter then looks the file up by name.
    """
    fds: dict[int, int] = {}
    by_inode: dict[tuple[int, int], int] = {}
    try:
        maps = read_maps(pid)
    except OSError:
        return fds
    try:
        for m in maps:
            # inode 0: no file
            if not m.inode or not m.name.startswith("/") or m.name.startswith(_NOT_FILES):
                continue
            try:
                fd = _open(f"/proc/{pid}/map_files/{m.map_files_name}")
            except OSError:
                continue
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in by_inode:
                os.close(fd)
                fds[m.start] = by_inode[key]
            elif not stat.S_ISREG(st.st_mode) or pseudo_fs(fd):
                os.close(fd)
            else:
                by_inode[key] = fds[m.start] = fd
    except BaseException:
        close_mapped_files(fds)
        raise
    return fds


def _open(path: str) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
    # a process mapping more distinct files than our soft RLIMIT_NOFILE: raise it to the hard
    # limit, which needs no privilege, and try once more
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return os.open(path, flags)


def close_mapped_files(fds: Mapping[int, int]) -> None:
    """Close what :func:`open_mapped_files` opened (shared descriptors once)."""
    for fd in set(fds.values()):
        with contextlib.suppress(OSError):
            os.close(fd)

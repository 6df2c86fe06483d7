"""The private scratch directory that holds CRIU's images between dump and conversion.

Images are about as large as the target's resident memory. tmpfs (/dev/shm) is fastest and
keeps the dump off the disks the target may be using, but it is memory: it is chosen only when
the target's RSS fits with a margin, otherwise /var/tmp.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from criu_livedump.errors import ScratchError

TMPFS_SCRATCH = Path("/dev/shm")
DISK_SCRATCH = Path("/var/tmp")
PREFIX = "criu-livedump."
#: Images take about RSS bytes plus metadata; demand this factor and slack before using tmpfs,
#: so that the dump never pushes the host into reclaim or the OOM killer.
TMPFS_FACTOR = 1.5
TMPFS_SLACK = 256 << 20


@dataclass(frozen=True)
class Space:
    """Free space of a candidate scratch location."""

    path: Path
    free: int
    fstype: str

    def as_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "free": self.free, "fstype": self.fstype}


def fstype(path: Path) -> str:
    """The filesystem type of the mount holding *path* (longest prefix in /proc/self/mounts)."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def space(path: Path) -> Space:
    """Free bytes (for an unprivileged writer) at *path*.

    :raises ScratchError: *path* does not exist or cannot be examined.
    """
    try:
        st = os.statvfs(path)
    except OSError as e:
        raise ScratchError(str(path), os.strerror(e.errno or 0)) from e
    return Space(path, st.f_bavail * st.f_frsize, fstype(path))


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tmpfs_fits(rss: int) -> bool:
    """Whether images of a target with *rss* resident bytes may go to tmpfs."""
    try:
        shm = space(TMPFS_SCRATCH)
    except ScratchError:
        return False
    if shm.fstype != "tmpfs":
        return False
    need = int(rss * TMPFS_FACTOR) + TMPFS_SLACK
    return need <= shm.free and need <= mem_available()


def choose_parent(rss: int, override: Path | None = None) -> Path:
    """Where the scratch directory goes: *override*, else tmpfs when *rss* fits, else disk."""
    if override is not None:
        return override
    return TMPFS_SCRATCH if tmpfs_fits(rss) else DISK_SCRATCH


def create(parent: Path, *, uid: int | None = None, gid: int | None = None) -> Path:
    """Create a fresh private directory (mode 0700, unguessable name) under *parent*.

    :param uid: hand the directory to this owner (CRIU may run as the target's uid).
    :raises ScratchError: *parent* is missing, not a directory, or not writable.
    """
    try:
        # Path.is_dir() raises on EACCES (an unreachable --scratch): ask stat() ourselves
        is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
    except FileNotFoundError:
        is_dir = False
    except OSError as e:
        raise ScratchError(str(parent), f"cannot use it: {e.strerror}") from e
    if not is_dir:
        raise ScratchError(str(parent), "not a directory", hint="pass an existing --scratch DIR")
    try:
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))  # mode 0700 by mkdtemp
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    except OSError as e:
        raise ScratchError(str(parent), f"cannot create a scratch directory: {e.strerror}") from e
    return path


def remove(path: Path) -> None:
    """Remove a scratch directory and everything in it (never follows symlinks out of it)."""
    shutil.rmtree(path, ignore_errors=True)


class Usage(NamedTuple):
    """What a scratch directory holds at one instant, in bytes."""

    #: blocks allocated to everything below it (what it takes from its filesystem)
    allocated: int
    #: the size of CRIU's pages images below it (the memory captured so far)
    pages: int


def usage(path: Path) -> Usage:
    """:class:`Usage` of the scratch directory *path*, read while CRIU may be writing to it:
    files that vanish or cannot be read are skipped, never an error."""
    allocated = pages = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            allocated += st.st_blocks * 512
            if name.startswith("pages-") and name.endswith(".img"):
                pages += st.st_size
    return Usage(allocated, pages)

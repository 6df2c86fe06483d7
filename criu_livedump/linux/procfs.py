"""The /proc files more than one module reads, parsed in one place (proc(5)):
/proc/PID/maps (fs/proc/task_mmu.c:show_map_vma()) and /proc/PID/status
(fs/proc/array.c:task_state() and friends)."""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["MapsEntry", "read_maps", "read_status"]


class MapsEntry(NamedTuple):
    """One line of /proc/PID/maps; *name* is "" for an anonymous mapping without one."""

    start: int
    end: int
    perms: str
    pgoff: int
    dev: str
    inode: int
    name: str

    @property
    def map_files_name(self) -> str:
        """Its entry in /proc/PID/map_files: ``%lx-%lx``, without the padding maps prints
        (fs/proc/base.c:dname_to_vma_addr() refuses a name with a leading zero)."""
        return f"{self.start:x}-{self.end:x}"


def read_maps(pid: int) -> list[MapsEntry]:
    """Every mapping of *pid*, in address order.

    :raises OSError: the process is gone or /proc is unreadable.
    """
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            lo, hi = parts[0].split("-")
            name = parts[5] if len(parts) > 5 else ""
            start, end, pgoff = int(lo, 16), int(hi, 16), int(parts[2], 16)
            out.append(MapsEntry(start, end, parts[1], pgoff, parts[3], int(parts[4]), name))
    return out


def read_status(path: str | os.PathLike[str]) -> dict[str, str]:
    """A /proc status file (``/proc/PID/status``, ``/proc/PID/task/TID/status``) as
    ``{field: value}``, values stripped.

    :raises OSError: the process is gone or /proc is unreadable.
    """
    fields: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep:
                fields[key] = value.strip()
    return fields

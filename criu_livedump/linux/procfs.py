"""The /proc files of a process, each parsed in one place (proc(5)): /proc/PID/maps and
/proc/PID/smaps (fs/proc/task_mmu.c:show_map_vma(), show_smap()), /proc/PID/status
(fs/proc/array.c:task_state() and friends) and /proc/PID/stat (fs/proc/array.c:do_task_stat()).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "MapsEntry",
    "SmapsEntry",
    "Stat",
    "read_link",
    "read_maps",
    "read_stat",
    "read_status",
    "smaps_entries",
    "task_ids",
]

_PROC = Path("/proc")


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


def read_link(path: str | os.PathLike[str]) -> str | None:
    """Where a /proc link (``fd/N``, ``exe``, ``cwd``...) points, None when it cannot be read."""
    try:
        return os.readlink(path)
    except OSError:
        return None


def task_ids(pid: int) -> list[int]:
    """The thread ids of *pid*, sorted; empty when the process is gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


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


class Stat(NamedTuple):
    """The fields of /proc/PID/stat (or /proc/PID/task/TID/stat) this tool reads; proc(5)
    numbers them from 1. Times are in clock ticks (``SC_CLK_TCK``)."""

    state: str  #: 3
    ppid: int  #: 4
    pgrp: int  #: 5
    session: int  #: 6
    utime: int  #: 14
    stime: int  #: 15
    cutime: int  #: 16
    cstime: int  #: 17
    nice: int  #: 19, of the thread-group leader (nice is per thread; this one is the process's)
    vsize: int  #: 23, bytes; 0 once exit_mm() has run
    processor: int  #: 39, task_cpu()
    exit_code: int  #: 52 (Linux 3.5), the wait status of a zombie


def read_stat(path: str | os.PathLike[str]) -> Stat:
    """A /proc stat file. The comm (field 2) may hold spaces and parentheses: the fields start
    after its last ``)``.

    :raises OSError: the process is gone or /proc is unreadable.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    rest = text[text.rindex(")") + 2 :].split()
    return Stat(
        state=rest[0],
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
        nice=int(rest[16]),
        vsize=int(rest[20]),
        processor=int(rest[36]),
        exit_code=int(rest[49]),
    )


@dataclass
class SmapsEntry:
    """One VMA of /proc/PID/smaps: its range, permissions, inode, anonymous (and swapped) size,
    and its VmFlags (``dc`` MADV_DONTFORK, ``wf`` MADV_WIPEONFORK...)."""

    start: int
    end: int
    perms: str
    inode: int
    anon_kb: int = 0
    vmflags: frozenset[str] = frozenset()


def smaps_entries(pid: int, proc: Path = _PROC) -> list[SmapsEntry]:
    """/proc/PID/smaps, one entry per VMA (empty when the process is gone)."""
    entries: list[SmapsEntry] = []
    try:
        lines = (proc / str(pid) / "smaps").read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inode = int(head[4]) if len(head) > 4 else 0
            entries.append(SmapsEntry(lo, hi, head[1], inode))
        elif entries and head[0] in ("Anonymous:", "Swap:"):
            entries[-1].anon_kb += int(head[1])
        elif entries and head[0] == "VmFlags:":
            entries[-1].vmflags = frozenset(head[1:])
    return entries

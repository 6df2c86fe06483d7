"""Facts about the target that CRIU's images lack, read from /proc right after the dump.

They travel to the converter in ``livedump.json`` (converters.options.write_sidecar): the real
parent pid (CRIU records 0 for the root of the dumped tree), per-thread CPU times for
NT_PRSTATUS (fill_prstatus() reports the group total for the leader), the boot id, and the
CPU's XSAVE layout for NT_X86_XSTATE.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from converters.arch.x86_64 import host_xsave_layout

_PROC = Path("/proc")


def _stat_fields(path: Path) -> list[str]:
    # comm may hold spaces and parentheses: split after the last ")"
    return path.read_text().rsplit(")", 1)[1].split()


def _us(ticks: str, hz: int) -> int:
    return int(ticks) * 1_000_000 // hz


def dump_time_facts(pid: int, proc: Path = _PROC) -> dict[str, Any]:
    """``ppid``, ``times``, ``boot_id`` and ``xsave_layout`` of process *pid*.

    Missing pieces (the target exited, a thread vanished) are simply left out: the converter
    falls back to zeros for them.
    """
    facts: dict[str, Any] = {"xsave_layout": host_xsave_layout().as_dict()}
    hz = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        facts["boot_id"] = (proc / "sys/kernel/random/boot_id").read_text().strip()
    try:
        fields = _stat_fields(proc / str(pid) / "stat")
    except (OSError, IndexError):
        return facts
    # stat(5): field 4 ppid; 14-17 utime, stime, cutime, cstime (clock ticks)
    facts["ppid"] = int(fields[1])
    times: dict[str, list[int]] = {
        str(pid): [_us(fields[11], hz), _us(fields[12], hz)],
        "children": [_us(fields[13], hz), _us(fields[14], hz)],
    }
    with contextlib.suppress(OSError):
        for tid in os.listdir(proc / str(pid) / "task"):
            if tid == str(pid):
                continue
            with contextlib.suppress(OSError, IndexError):
                t = _stat_fields(proc / str(pid) / "task" / tid / "stat")
                times[tid] = [_us(t[11], hz), _us(t[12], hz)]
    facts["times"] = times
    return facts


def unmodified_file_mappings(pid: int, proc: Path = _PROC) -> list[list[int]]:
    """``[start, end]`` of every private file mapping of *pid* without anonymous pages.

    For the clone method: CRIU's compel briefly writes a syscall instruction into the first
    executable VMA of the task it infects (and restores it), which leaves a copy-on-write page
    there. In the clone that page is CRIU's doing, not the target's: the converter treats
    these ranges as having no saved pages, as the kernel would for the target.
    """
    ranges: list[list[int]] = []
    current: list[int] | None = None
    private_file = False
    anon = 0
    try:
        lines = (proc / str(pid) / "smaps").read_text().splitlines()
    except OSError:
        return ranges
    for line in [*lines, "0-0 ---- 0 00:00 0"]:
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            if current is not None and private_file and anon == 0:
                ranges.append(current)
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            current = [lo, hi]
            perms, inode = head[1], int(head[4]) if len(head) > 4 else 0
            private_file = perms.endswith("p") and inode != 0
            anon = 0
        elif head and head[0] in ("Anonymous:", "Swap:"):
            anon += int(head[1])
    return ranges


def fork_excluded_mappings(pid: int, proc: Path = _PROC) -> dict[str, list[list[Any]]]:
    """The target's mappings a fork does not copy as they are, from smaps ``VmFlags``.

    MADV_DONTFORK areas (``dc``, VM_DONTCOPY) are absent from a clone; MADV_WIPEONFORK areas
    (``wf``) are present but empty (kernel/fork.c: dup_mmap()). The clone method records them so
    the converter can still list the former and say which bytes it could not see.

    :returns: ``{"dontfork": [[start, end, perms], ...], "wipeonfork": [[start, end], ...]}``
    """
    out: dict[str, list[list[Any]]] = {"dontfork": [], "wipeonfork": []}
    try:
        lines = (proc / str(pid) / "smaps").read_text().splitlines()
    except OSError:
        return out
    current: list[Any] = []
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            current = [lo, hi, head[1]]
        elif head and head[0] == "VmFlags:" and current:
            flags = set(head[1:])
            if "dc" in flags:
                out["dontfork"].append(current)
            elif "wf" in flags:
                out["wipeonfork"].append(current[:2])
    return out

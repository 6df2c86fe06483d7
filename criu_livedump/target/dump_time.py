"""Facts about the target that CRIU's images lack, read from /proc right after the dump.

They travel to the converter in ``livedump.json`` (:class:`converters.sidecar.Sidecar`): the
real parent pid (CRIU records 0 for the root of the dumped tree), per-thread CPU times for
NT_PRSTATUS (fill_prstatus() reports the group total for the leader), the boot id, and the
CPU's layout record for the architecture's FP notes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

from converters.arch import host
from converters.sidecar import Sidecar
from criu_livedump.linux.procfs import read_stat, read_status

_PROC = Path("/proc")


def _us(ticks: int, hz: int) -> int:
    return ticks * 1_000_000 // hz


def _ns_ids(status: Path, key: str) -> list[int]:
    """The NStgid or NSpid line of a /proc status file: the id in /proc's PID namespace first,
    the one in the task's own namespace last (fs/proc/array.c:task_state())."""
    value = read_status(status).get(key)
    if value is None:
        raise OSError(f"{status}: no {key} line")
    return [int(x) for x in value.split()]


def with_dump_time_facts(sidecar: Sidecar, pid: int, proc: Path = _PROC) -> Sidecar:
    """*sidecar* with the ``ppid``, CPU times, ``boot_id`` and ``cpu_layout`` of process *pid*.

    Ids are those of the target's own PID namespace, as in CRIU's images and as the kernel's
    core (written from the target's context) gives them: a thread is keyed by its last NSpid
    entry, and the parent of a namespace's init, being outside it, is 0. Missing pieces (the
    target exited, a thread vanished) are simply left out: the converter falls back to zeros
    for them.
    """
    sidecar = replace(sidecar, cpu_layout=host().cpu_layout(None).as_dict())
    hz = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        boot_id = (proc / "sys/kernel/random/boot_id").read_text().strip()
        sidecar = replace(sidecar, boot_id=boot_id)
    try:
        stat = read_stat(proc / str(pid) / "stat")
        nstgid = _ns_ids(proc / str(pid) / "status", "NStgid")
    except (OSError, IndexError, ValueError):
        return sidecar
    depth = len(nstgid) - 1
    ppid = stat.ppid
    if depth and ppid:
        try:
            parent = _ns_ids(proc / str(ppid) / "status", "NStgid")
            ppid = parent[depth] if len(parent) > depth else 0
        except (OSError, ValueError):
            ppid = 0
    times = {nstgid[-1]: (_us(stat.utime, hz), _us(stat.stime, hz))}
    with contextlib.suppress(OSError):
        for tid in os.listdir(proc / str(pid) / "task"):
            if tid == str(pid):
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                task = proc / str(pid) / "task" / tid
                t = read_stat(task / "stat")
                ns_tid = _ns_ids(task / "status", "NSpid")[-1]
                times[ns_tid] = (_us(t.utime, hz), _us(t.stime, hz))
    children = (_us(stat.cutime, hz), _us(stat.cstime, hz))
    return replace(sidecar, ppid=ppid, thread_times=times, children_times=children)

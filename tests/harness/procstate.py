"""What the harness observes of a live target before any dump: its maps, threads and rseq areas.

The rseq areas are read with ptrace (PTRACE_GET_RSEQ_CONFIGURATION); the comparator tolerates
their cpu fields, which the kernel rewrites between two dumps, and nothing else.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

# ptrace(2) requests and flags used to read each thread's rseq registration
# (include/uapi/linux/ptrace.h; PTRACE_GET_RSEQ_CONFIGURATION since Linux 5.13).
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
WALL = 0x40000000
# struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h)
_RSEQ_CONFIG = struct.Struct("<QIIII")
assert _RSEQ_CONFIG.size == 24


@dataclass(frozen=True)
class MapEntry:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    name: str


def read_maps(pid: int) -> list[MapEntry]:
    """Parse /proc/PID/maps."""
    entries = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = parts[0].split("-")
        entries.append(
            MapEntry(
                start=int(lo, 16),
                end=int(hi, 16),
                perms=parts[1],
                offset=int(parts[2], 16),
                dev=parts[3],
                inode=int(parts[4]),
                name=parts[5] if len(parts) > 5 else "",
            )
        )
    return entries


def thread_ids(pid: int) -> list[int]:
    """The thread ids of *pid*, main thread first."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    return sorted(tids, key=lambda t: t != pid)


def thread_states(pid: int) -> dict[int, str]:
    """Each thread's scheduler state letter (``S`` sleeping, ``R`` running, ...), by tid."""
    states = {}
    for tid in thread_ids(pid):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread exited meanwhile
            continue
        states[tid] = stat.rsplit(")", 1)[1].split()[0]
    return states


@dataclass(frozen=True)
class RseqArea:
    """A thread's registered ``struct rseq`` (include/uapi/linux/rseq.h)."""

    tid: int
    address: int
    size: int
    signature: int

    def volatile_ranges(self) -> list[tuple[int, int]]:
        """Address ranges the kernel rewrites whenever the thread is scheduled.

        cpu_id_start and cpu_id (offsets 0..8), node_id and mm_cid (offsets 20..28): 16 bytes,
        written by rseq_update_cpu_node_id() on every return to user space after a migration.
        """
        if not self.address:
            return []
        return [(self.address, self.address + 8), (self.address + 20, self.address + 28)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, tid: int, addr: int, data: int | ctypes.Array[ctypes.c_char]) -> int:
    ptr = ctypes.cast(data, ctypes.c_void_p) if isinstance(data, ctypes.Array) else data
    ret = int(_libc.ptrace(request, tid, addr, ptr))
    if ret == -1:
        err = ctypes.get_errno()
        raise HarnessError(f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return ret


def read_rseq_areas(pid: int) -> dict[int, RseqArea]:
    """Every thread's rseq registration, read with PTRACE_GET_RSEQ_CONFIGURATION.

    Each thread is seized, interrupted, queried and detached in turn; a thread blocked in a
    restartable call (read, futex, pause) resumes that same call, as after CRIU's own seize.
    """
    areas: dict[int, RseqArea] = {}
    for tid in thread_ids(pid):
        _ptrace(PTRACE_SEIZE, tid, 0, 0)
        try:
            _ptrace(PTRACE_INTERRUPT, tid, 0, 0)
            _, status = os.waitpid(tid, WALL)
            if not os.WIFSTOPPED(status):
                raise HarnessError(f"thread {tid} did not stop for ptrace (status {status:#x})")
            buf = ctypes.create_string_buffer(_RSEQ_CONFIG.size)
            got = _ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, _RSEQ_CONFIG.size, buf)
            address, size, sig, _flags, _pad = _RSEQ_CONFIG.unpack(buf.raw[: _RSEQ_CONFIG.size])
            if got < _RSEQ_CONFIG.size:
                raise HarnessError(f"thread {tid}: short rseq configuration ({got} bytes)")
            areas[tid] = RseqArea(tid=tid, address=address, size=size, signature=sig)
        finally:
            _ptrace(PTRACE_DETACH, tid, 0, 0)
    return areas

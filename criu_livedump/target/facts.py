"""What the target process is, read from /proc before anything freezes it.

:func:`inspect` gathers the facts the rest of the tool decides on (credentials, dumpability,
RLIMIT_CORE, coredump_filter, cwd and root for core_pattern, namespaces) and the blockers
(:mod:`criu_livedump.target.blockers`) of the target and, when asked, of its tree.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from converters.options import UNLIMITED
from criu_livedump.errors import LivedumpError, PermissionDeniedError, TargetError
from criu_livedump.linux import pidfd
from criu_livedump.linux.namespaces import CLONE_NEWUTS, in_namespace, ns_ino
from criu_livedump.linux.procfs import read_link, read_stat, read_status
from criu_livedump.target.blockers import Blocker, find_blockers

__all__ = ["Ids", "TargetFacts", "ids", "inspect", "threads_of"]


class Ids(NamedTuple):
    """The four ids of a credential, in /proc/PID/status order."""

    real: int
    effective: int
    saved: int
    fs: int


@dataclass(frozen=True)
class TargetFacts:
    """Everything about the target that the dump decides on, read at one moment.

    ``pid`` is the thread-group id as the caller sees it; ``ns_pid`` the same process in its own
    PID namespace (the last NStgid entry). ``dumpable`` is the kernel's __get_dumpable() value
    (0 off, 1 user, 2 root-only); ``dumpable_source`` says how it was learned: ``pidfd``
    (PIDFD_GET_INFO, exact) or ``proc-owner`` (the owner of /proc/PID, which
    fs/proc/base.c:task_dump_owner() makes root when the mm is not SUID_DUMP_USER; a root-owned
    target then reads as dumpable whatever its flag). Limits use :data:`UNLIMITED`.
    """

    pid: int
    ns_pid: int
    nstgid: tuple[int, ...]
    ppid: int
    comm: str
    exe: str | None
    cmdline: tuple[str, ...]
    uids: Ids
    gids: Ids
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    dumpable: int
    dumpable_source: str
    core_soft: int
    core_hard: int
    coredump_filter: int
    cwd: str
    root: str
    same_mnt_ns: bool
    rss: int
    threads: tuple[int, ...]
    state: str
    tracer_pid: int
    #: the highest seccomp mode among its threads (0 none, 1 strict, 2 filter)
    seccomp: int
    nodename: str
    cpu: int
    user_ns: int
    tree: tuple[int, ...] = ()
    blockers: tuple[Blocker, ...] = field(default=())
    #: its nice value (of its main thread), which the capture's default priority is set below
    nice: int = 0

    @property
    def criu_options(self) -> tuple[str, ...]:
        """The CRIU options every workable blocker asks for, in order, without repeats."""
        seen: dict[str, None] = {}
        for b in self.blockers:
            for opt in b.criu_options:
                seen.setdefault(opt, None)
        return tuple(seen)

    @property
    def in_child_pid_ns(self) -> bool:
        """It lives in a PID namespace below this process's (a container's process)."""
        return len(self.nstgid) > 1

    @property
    def pid_ns_init(self) -> bool:
        """It is the init (PID 1) of such a namespace: a container's main process."""
        return self.in_child_pid_ns and self.ns_pid == 1

    @property
    def refusals(self) -> tuple[Blocker, ...]:
        """The blockers no CRIU option works around."""
        return tuple(b for b in self.blockers if b.refuse)


# --- /proc readers ---------------------------------------------------------------------------


def _proc(pid: int, name: str = "") -> Path:
    return Path(f"/proc/{pid}/{name}" if name else f"/proc/{pid}")


def ids(text: str) -> Ids:
    """The ``Uid:``/``Gid:`` value of a /proc status file."""
    real, eff, saved, fs = (int(x) for x in text.split())
    return Ids(real, eff, saved, fs)


def _limit(text: str) -> int:
    return UNLIMITED if text == "unlimited" else int(text)


def _core_limits(pid: int) -> tuple[int, int]:
    for line in _proc(pid, "limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line[len("Max core file size") :].split()[:2]
            return _limit(soft), _limit(hard)
    raise TargetError(pid, "no core file size in /proc/PID/limits")  # pragma: no cover


def threads_of(pid: int) -> tuple[int, ...]:
    """The thread ids of *pid*, sorted (just *pid* when they cannot be listed)."""
    try:
        return tuple(sorted(int(t) for t in os.listdir(_proc(pid, "task"))))
    except OSError:
        return (pid,)


def _seccomp(pid: int, threads: tuple[int, ...], status: dict[str, str]) -> int:
    """The highest seccomp mode among the threads (a filter may cover some threads only)."""
    modes = [int(status.get("Seccomp", "0"))]
    for tid in threads:
        if tid != pid:
            with contextlib.suppress(OSError):
                modes.append(int(read_status(_proc(pid, f"task/{tid}/status")).get("Seccomp", "0")))
    return max(modes)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in threads_of(pid):
        with contextlib.suppress(OSError):
            kids.extend(int(x) for x in _proc(pid, f"task/{tid}/children").read_text().split())
    return kids


def _descendants(pid: int) -> tuple[int, ...]:
    seen: list[int] = [pid]
    i = 0
    while i < len(seen):
        for kid in _children(seen[i]):
            if kid not in seen:
                seen.append(kid)
        i += 1
    return tuple(seen)


def _dumpable(pid: int, euid: int, egid: int) -> tuple[int, str]:
    """__get_dumpable() of the target: exact through its pidfd (Linux 6.16+), else from /proc
    ownership."""
    value = pidfd.dumpable(pid)
    if value is not None:
        return value, "pidfd"
    st = os.stat(_proc(pid))
    # task_dump_owner(): a non-dumpable mm makes /proc/PID root's (of the mm's user namespace).
    return (1 if (st.st_uid, st.st_gid) == (euid, egid) else 0), "proc-owner"


def _nodename(pid: int) -> str:
    """utsname()->nodename of the target's UTS namespace, for core_pattern's %h."""
    if ns_ino(pid, "uts") == ns_ino("self", "uts"):
        return os.uname().nodename
    return in_namespace(pid, "uts", CLONE_NEWUTS, lambda: os.uname().nodename)


# --- the public face -------------------------------------------------------------------------


def _exited(pid: int) -> bool:
    """Whether *pid* is gone, a zombie, or exiting (its memory already released: a process in
    exit reads an empty coredump_filter, the cause of a ValueError here)."""
    try:
        stat = read_stat(_proc(pid, "stat"))
    except (OSError, IndexError, ValueError):
        return True
    # vsize is 0 once exit_mm() has run (fs/proc/array.c)
    return stat.state in ("Z", "X") or stat.vsize == 0


def _unreadable(pid: int, e: OSError | ValueError) -> LivedumpError:
    """The one sentence for a /proc file of *pid* that could not be read or parsed."""
    if _exited(pid):
        return TargetError(pid, "exited while being inspected")
    if isinstance(e, PermissionError):
        return PermissionDeniedError(f"process {pid}: cannot read {e.filename}")
    if isinstance(e, OSError):
        return TargetError(pid, f"cannot read {e.filename or '/proc'} ({e.strerror})")
    return TargetError(pid, "its /proc files hold something this tool cannot parse")


def _user_process(pid: int) -> tuple[dict[str, str], bytes]:
    """The status and raw cmdline of *pid*, refused unless it is a live user process.

    :raises TargetError: no such process, a thread, a zombie, a kernel thread.
    """
    try:
        status = read_status(_proc(pid, "status"))
        cmdline_raw = _proc(pid, "cmdline").read_bytes()
    except FileNotFoundError:
        raise TargetError(pid, "no such process") from None
    except OSError as e:
        raise TargetError(pid, f"cannot read /proc ({e.strerror})") from e
    if int(status.get("Tgid", pid)) != pid:
        raise TargetError(pid, f"is a thread of process {status['Tgid']}; name the process")
    if status.get("State", "?")[:1] in ("Z", "X"):
        raise TargetError(pid, "is a zombie; there is no memory left to dump")
    if int(status.get("Kthread", "0")) or (not cmdline_raw and int(status.get("PPid", 0)) == 2):
        raise TargetError(pid, "is a kernel thread")
    return status, cmdline_raw


def inspect(pid: int, *, tree: bool = False) -> TargetFacts:
    """Read the target's facts and blockers from /proc (nothing is stopped or changed).

    :param tree: the dump will include the target's descendants: their blockers count too,
        and unix peers among them are inside.
    :raises TargetError: no such process, a zombie, a kernel thread, or /proc unreadable.
    """
    status, cmdline_raw = _user_process(pid)
    state = status.get("State", "?")[:1]
    try:
        stat = read_stat(_proc(pid, "stat"))
        core_soft, core_hard = _core_limits(pid)
        coredump_filter = int(_proc(pid, "coredump_filter").read_text().strip(), 16)
    except (OSError, ValueError) as e:
        raise _unreadable(pid, e) from e
    threads = threads_of(pid)
    exe = read_link(_proc(pid, "exe"))
    if exe is None and not cmdline_raw:
        raise TargetError(pid, "has no user memory (a kernel thread or exiting)")
    uids, gids = ids(status["Uid"]), ids(status["Gid"])
    nstgid = tuple(int(x) for x in status.get("NStgid", str(pid)).split())
    dumpable, source = _dumpable(pid, uids.effective, gids.effective)
    members = _descendants(pid) if tree else (pid,)
    rss_kb = status.get("VmRSS", "0 kB").split()[0]
    cwd = read_link(_proc(pid, "cwd"))
    root = read_link(_proc(pid, "root"))
    if cwd is None or root is None:
        raise PermissionDeniedError(
            f"process {pid} ({status.get('Name', '?')}, uid {uids.real}): cannot read its cwd"
            " and root in /proc; inspecting it needs its uid or CAP_SYS_PTRACE"
        )
    return TargetFacts(
        pid=pid,
        ns_pid=nstgid[-1],
        nstgid=nstgid,
        ppid=int(status.get("PPid", "0")),
        comm=status.get("Name", ""),
        exe=exe,
        cmdline=tuple(a.decode(errors="surrogateescape") for a in cmdline_raw.split(b"\0")[:-1]),
        uids=uids,
        gids=gids,
        cap_inh=int(status.get("CapInh", "0"), 16),
        cap_prm=int(status.get("CapPrm", "0"), 16),
        cap_eff=int(status.get("CapEff", "0"), 16),
        cap_bnd=int(status.get("CapBnd", "0"), 16),
        cap_amb=int(status.get("CapAmb", "0"), 16),
        dumpable=dumpable,
        dumpable_source=source,
        core_soft=core_soft,
        core_hard=core_hard,
        coredump_filter=coredump_filter,
        cwd=cwd,
        root=root,
        same_mnt_ns=ns_ino(pid, "mnt") == ns_ino("self", "mnt"),
        rss=int(rss_kb) * 1024,
        threads=threads,
        state=state,
        tracer_pid=int(status.get("TracerPid", "0")),
        seccomp=_seccomp(pid, threads, status),
        nodename=_nodename(pid),
        cpu=stat.processor,  # the %C of core_pattern
        user_ns=ns_ino(pid, "user"),
        tree=members,
        blockers=find_blockers(pid, members, status),
        nice=stat.nice,
    )

"""Why a CRIU dump failed: the Error line of its log that explains it, the process involved,
and a hint from the one table of causes a user meets (CAUSES).

CRIU's log (``-v3``, or ``-v4``) ends in summaries that name no cause (``Dumping FAILED.``,
``Dump core (pid: N) failed with -1``) and may begin with Error lines that stopped nothing
(``rlimit: Can't setup RLIMIT_NOFILE for self``, criu/util.c, printed whenever CRIU lacks
CAP_SYS_RESOURCE). The line that explains a failure is the first Error line of a known cause,
else the first Error line that is neither.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from criu_livedump.errors import CRIU_LOG_STAMP
from criu_livedump.linux.procfs import read_status


@dataclass(frozen=True)
class Cause:
    """One known cause of a failed dump.

    :param name: a short name (tests and logs).
    :param pattern: what CRIU's Error line says (its source is cited in CAUSES); a group
        named ``pid`` is the process involved.
    :param hint: what the user can do; ``{pid}``, ``{uid}`` and ``{scratch}`` are filled in.
    """

    name: str
    pattern: re.Pattern[str]
    hint: str


def _cause(name: str, pattern: str, hint: str) -> Cause:
    return Cause(name, re.compile(pattern), hint)


#: Every known cause, each with the CRIU 4.2.1 source of its line.
CAUSES: tuple[Cause, ...] = (
    # criu/cr-dump.c dump_task_rlimits(): prlimit() on a process of another uid needs
    # CAP_SYS_RESOURCE (kernel/sys.c check_prlimit_permission)
    _cause(
        "rlimit of another uid",
        r"Can't get rlimit \d+: Operation not permitted",
        "CRIU, lacking CAP_SYS_RESOURCE, cannot read the limits of process {pid} of uid {uid};"
        " use --method clone (with --tree: one clone per process, each dumped as its uid)",
    ),
    # compel/src/lib/infect.c compel_wait_task(): PTRACE_SEIZE refused (another tracer)
    _cause(
        "traced task",
        r"Unseizable non-zombie (?P<pid>\d+) found",
        "process {pid} is traced by another program (gdb, strace); detach it first",
    ),
    # criu/files-ext.c dump_unsupp_fd(), criu/files-reg.c (ghost limit)
    _cause(
        "unsupported file",
        r"Can't dump file \d+ of that type|Can't dump ghost file",
        "process {pid} holds a file CRIU cannot dump; close it, or try --method clone",
    ),
    # criu/sk-unix.c, criu/sk-inet.c: socket kinds and states CRIU refuses
    _cause(
        "unsupported socket",
        r"Unsupported (type \(\d+\) on socket|socket family|proto)|Can't dump \d+ inet socket"
        r"|Can't dump half of stream unix|Can't dump name-less external socket"
        r"|Can't dump corked dgram socket",
        "process {pid} holds a socket CRIU cannot dump; try --method clone, which drops the"
        " clone's sockets",
    ),
    # the scratch filesystem filled up (page-xfer, image writes)
    _cause(
        "full scratch",
        r"No space left on device",
        "{scratch} is full; choose another --scratch DIR",
    ),
    # criu/cr-dump.c dump_task_ids(), criu/pstree.c, criu/namespaces.c
    _cause(
        "PID namespace or session",
        r"session leader of (?:zombie process )?(?P<pid>\d+)\(\d+\) is outside of its pid namespace"
        r"|The root process (?P<root>\d+) is not a session leader"
        r"|Can't find a session leader|Can't dump a pid namespace without the process init",
        "process {pid}'s session or PID namespace reaches outside the dumped tree; dump it"
        " alone with --method clone",
    ),
    # criu/files-reg.c check_path_remap(), criu/mount.c, criu/filesystems.c
    _cause(
        "external mount",
        r"Can't lookup mount=\d+ for fd=\d+|is autodetected external mount"
        r"|is a fuse mount but not external",
        "process {pid} uses a mount CRIU cannot place (a bind mount from outside its mount"
        " namespace, or FUSE); try --method clone",
    ),
    # criu/seccomp.c, criu/cr-check.c: filters CRIU cannot read or suspend
    _cause(
        "seccomp",
        r".*seccomp metadata on tid_real (?P<pid>\d+)|seccomp",
        "process {pid}'s seccomp filters cannot be dumped here (CRIU needs"
        " PTRACE_O_SUSPEND_SECCOMP and PTRACE_SECCOMP_GET_FILTER, as root)",
    ),
    # compel/src/lib/infect.c: a breakpoint's SIGTRAP pending
    _cause(
        "pending SIGTRAP",
        r"Can't dump the (?P<pid>\d+) thread with a pending SIGTRAP",
        "thread {pid} has a debugger's SIGTRAP pending; let the debugger deliver it first",
    ),
    # criu/cr-dump.c: nested namespaces, SysV outside the IPC namespace
    _cause(
        "nested namespace",
        r"Can't dump nested \w+ namespace for (?P<pid>\d+)|doesn't live in IPC ns",
        "process {pid} is in a namespace nested in its tree's; dump it alone",
    ),
    # criu/seize.c, compel: the tree changed while CRIU froze it
    _cause(
        "tree changed",
        r"zombie (?P<pid>\d+) \(comm .*\) found while seizing|Task pid reused while suspending",
        "the tree changed while CRIU froze it (process {pid}); retry the dump",
    ),
    # criu/proc_parse.c: mappings CRIU refuses (vsyscall-like, high memory)
    _cause(
        "unsupported mapping",
        r"Unsupported mapping found|Can't dump high memory region",
        "process {pid} maps memory CRIU cannot dump; try --method clone",
    ),
    # any privilege CRIU missed (last: more specific causes first)
    _cause(
        "missing privilege",
        r"Operation not permitted",
        "CRIU lacked a privilege; see `criu-livedump check`",
    ),
)

#: Error lines that stop nothing (criu/util.c rlimit_unlimit_nofile()).
_HARMLESS = re.compile(r"Can't setup RLIMIT_NOFILE for self")
#: Summaries CRIU prints after the cause (criu/cr-dump.c).
_SUMMARY = re.compile(r"FAILED\.$|failed with -?\d+$|Can't dump threads$")
#: Where a later summary names the process (``Dump core (pid: 8230) failed with -1``).
_PID_IN_SUMMARY = re.compile(r"\(pid: (\d+)\)")
#: Lines of the process being dumped just before the cause (parasite, /proc reads).
_PID_IN_CONTEXT = re.compile(r"pie: (\d+):|/proc/(\d+)/| (\d+) has \d+ sched policy")
_FULL = next(c for c in CAUSES if c.name == "full scratch")


@dataclass(frozen=True)
class Diagnosis:
    """What a failed CRIU's log says: its explaining line, the cause, the process."""

    line: str
    cause: Cause | None = None
    pid: int | None = None
    uid: int | None = None

    def hint(self, scratch: Path) -> str | None:
        if self.cause is None:
            return None
        pid = "?" if self.pid is None else str(self.pid)
        uid = "?" if self.uid is None else str(self.uid)
        return self.cause.hint.format(pid=pid, uid=uid, scratch=scratch)


def diagnose(lines: Iterable[str], *, full: bool = False) -> Diagnosis | None:
    """The diagnosis of CRIU's log *lines*, or None when it has no Error line.

    :param full: the scratch filesystem is full (a full scratch is the cause even if CRIU's
        log, which shares it, was cut before it could say so).
    """
    errors: list[str] = []
    context_pid: int | None = None
    chosen: tuple[int, Cause | None, int | None] | None = None  # index, cause, context pid
    for raw in lines:
        line = raw.strip()
        if "Error" not in line:
            if chosen is None and (m := _PID_IN_CONTEXT.search(line)):
                context_pid = int(next(g for g in m.groups() if g))
            continue
        if _HARMLESS.search(line):
            continue
        errors.append(line)
        if chosen is None or chosen[1] is None:
            cause = next((c for c in CAUSES if c.pattern.search(line)), None)
            if cause is not None or (chosen is None and not _SUMMARY.search(line)):
                chosen = (len(errors) - 1, cause, context_pid)
    if chosen is None:
        if not errors:
            return Diagnosis("", _FULL) if full else None
        chosen = (0, None, context_pid)
    index, cause, context = chosen
    line = CRIU_LOG_STAMP.sub("", errors[index])
    if full and cause is None:
        cause = _FULL
    pid = _pid_of(line, cause, errors[index:], context)
    return Diagnosis(line, cause, pid, _uid_of(pid))


def _pid_of(line: str, cause: Cause | None, later: list[str], context: int | None) -> int | None:
    """The process of a failure: named by its line, else by CRIU's summary after it, else
    the process CRIU's log was busy with just before."""
    if cause is not None and (m := cause.pattern.search(line)):
        named = [int(v) for v in m.groupdict().values() if v]
        if named:
            return named[0]
    summaries = (_PID_IN_SUMMARY.search(e) for e in later)
    return next((int(m.group(1)) for m in summaries if m), context)


def _uid_of(pid: int | None) -> int | None:
    """The real uid of process *pid*, while it lives (CRIU leaves its targets running)."""
    if pid is None:
        return None
    try:
        return int(read_status(f"/proc/{pid}/status")["Uid"].split()[0])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def read_log(path: Path) -> list[str]:
    """The lines of CRIU's log at *path* that matter to diagnose(): Error lines and the
    context before them; a last line CRIU could not finish (full scratch) is dropped."""
    try:
        data = path.read_bytes().decode(errors="replace")
    except OSError:
        return []
    lines = data.splitlines()
    if lines and not data.endswith("\n"):
        lines.pop()
    return lines

"""The kernel's ptrace access rules, applied to the caller before anything freezes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from criu_livedump.errors import PermissionDeniedError, TargetError
from criu_livedump.linux.caps import CAP, has_cap
from criu_livedump.linux.namespaces import ns_ino
from criu_livedump.linux.procfs import read_status
from criu_livedump.target.facts import Ids, TargetFacts, ids, threads_of

__all__ = [
    "CallerCreds",
    "caller_creds",
    "check_ptrace_allowed",
    "check_requester_may_dump",
    "pid_ns_visible",
    "requester_creds",
]

# include/uapi/linux/nsfs.h
_NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2)
_NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4)


@dataclass(frozen=True)
class CallerCreds:
    """The credentials ptrace access is judged on (the process that will run CRIU)."""

    pid: int
    uids: Ids
    gids: Ids
    cap_prm: int
    cap_eff: int
    user_ns: int
    #: the inode of its PID namespace (0: not known, no visibility rule applied)
    pid_ns: int = 0


def _has_cap_in_user_ns(pid: int, cap: int, caller: CallerCreds) -> bool:
    """kernel/capability.c:ns_capable() for the caller against the target's user namespace.

    Walks from the target's user namespace towards the caller's with NS_GET_PARENT: the caller
    has *cap* there if it has it in its own namespace and that is an ancestor, or if it owns
    (by euid) the child namespace of its own on that path, as security/commoncap.c:cap_capable()
    grants. A namespace that is not a descendant of the caller's gives no capability.
    """
    own_has = bool(caller.cap_eff >> cap & 1)
    try:
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return own_has and caller.user_ns == ns_ino(pid, "user")
    try:
        while True:
            if os.fstat(fd).st_ino == caller.user_ns:
                return own_has
            try:
                parent = fcntl.ioctl(fd, _NS_GET_PARENT)
            except OSError:
                return False  # the initial namespace, or one outside the caller's reach
            try:
                if os.fstat(parent).st_ino == caller.user_ns:
                    buf = bytearray(4)
                    fcntl.ioctl(fd, _NS_GET_OWNER_UID, buf, True)
                    if struct.unpack("=I", buf)[0] == caller.uids.effective:
                        return True
            except OSError:
                pass
            os.close(fd)
            fd = parent
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def caller_creds() -> CallerCreds:
    """The credentials of this process, as ptrace access checks see them."""
    status = read_status(Path("/proc/self/status"))
    return CallerCreds(
        pid=os.getpid(),
        uids=ids(status["Uid"]),
        gids=ids(status["Gid"]),
        cap_prm=int(status["CapPrm"], 16),
        cap_eff=int(status["CapEff"], 16),
        user_ns=ns_ino("self", "user"),
        pid_ns=ns_ino("self", "pid"),
    )


def requester_creds(pid: int, uid: int, gid: int) -> CallerCreds:
    """The credentials a request to the service is judged on.

    *uid* and *gid* are what the kernel reported with the request, never anything the requester
    said: the FUSE request header's ids (fs/fuse/dev.c:fuse_fill_in_header() copies
    current_fsuid()/current_fsgid()) or SO_PEERCRED's (net/core/sock.c:cred_to_ucred(): the
    euid/egid at connect()). All four ids are set to them, so the real-id comparison of
    :func:`check_ptrace_allowed` is the fsuid comparison of PTRACE_MODE_FSCREDS. Capabilities
    and namespaces come from /proc/*pid* (a thread id is fine); the capabilities count only
    while that process still has those ids (else it changed credentials since, and gets none).

    :raises TargetError: the requesting process is gone (its pid is unknown: 0).
    """
    try:
        status = read_status(Path(f"/proc/{pid}/status")) if pid > 0 else {}
    except OSError:
        status = {}
    if "Tgid" not in status:
        raise TargetError(pid, "the requesting process is gone")
    same = ids(status["Uid"]).fs == uid and ids(status["Gid"]).fs == gid
    prm, eff = (int(status[k], 16) if same else 0 for k in ("CapPrm", "CapEff"))
    return CallerCreds(
        pid=int(status["Tgid"]),
        uids=Ids(uid, uid, uid, uid),
        gids=Ids(gid, gid, gid, gid),
        cap_prm=prm,
        cap_eff=eff,
        user_ns=ns_ino(pid, "user"),
        pid_ns=ns_ino(pid, "pid"),
    )


def pid_ns_visible(pid: int, requester: CallerCreds) -> bool:
    """Whether *pid* lives in the requester's PID namespace or one below it: the processes a
    requester can name at all (kernel/pid.c: a pid has numbers only in its own namespace and
    its ancestors; fs/proc shows a process only to those). Walked with NS_GET_PARENT from the
    target's namespace up, as kernel/pid_namespace.c:pidns_get_parent() allows."""
    if not requester.pid_ns:
        return True
    return _ns_has_ancestor(f"/proc/{pid}/ns/pid", requester.pid_ns)


def _ns_has_ancestor(path: str, ancestor: int) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        while os.fstat(fd).st_ino != ancestor:
            try:
                parent = fcntl.ioctl(fd, _NS_GET_PARENT)
            except OSError:
                return False
            os.close(fd)
            fd = parent
        return True
    finally:
        os.close(fd)


def check_requester_may_dump(facts: TargetFacts, requester: CallerCreds) -> None:
    """Whether a request's sender may have *facts*' process dumped by the service.

    This is kernel/ptrace.c:ptrace_may_access(task, PTRACE_MODE_ATTACH_FSCREDS), the check
    fs/proc/base.c:proc_mem_open() makes (through mm_access()) before /proc/PID/mem hands out a
    process's memory: a live dump reads all of it and stops the target for a moment, so ATTACH,
    not READ (READ is for /proc/PID/maps-like facts), and FSCREDS because the request is a
    file write judged on the writer's filesystem ids, which is how a /proc/PID file of the
    livedump patch is checked (the patch's own source is not at hand: this is the mode its
    /proc/PID/mem sibling uses). Beyond ptrace_may_access(), the target must be visible in the
    requester's PID namespace, and a requester never dumps itself (it waits in the write).
    A non-dumpable target needs CAP_SYS_PTRACE, as in the kernel (no tool-side --force).

    :raises TargetError: not visible to the requester (as if it did not exist).
    :raises PermissionDeniedError: the rule that failed, in one sentence.
    """
    if not pid_ns_visible(facts.pid, requester):
        raise TargetError(facts.pid, "no such process")
    if requester.pid == facts.pid:
        raise PermissionDeniedError(
            f"process {facts.pid} ({facts.comm}) is the process making the request; it cannot"
            " be dumped while it waits for the answer",
            hint="ask from another process",
        )
    check_ptrace_allowed(facts, force=True, caller=requester)


def check_ptrace_allowed(
    facts: TargetFacts, *, force: bool = False, caller: CallerCreds | None = None
) -> None:
    """Refuse, before CRIU starts, a target the caller may not ptrace-attach to.

    The rules are kernel/ptrace.c:__ptrace_may_access() for PTRACE_MODE_ATTACH_REALCREDS (what
    PTRACE_SEIZE uses): the caller's real uid and gid must equal the target's real, effective
    and saved ones, else it needs CAP_SYS_PTRACE in the target's user namespace; a target whose
    mm is not SUID_DUMP_USER needs CAP_SYS_PTRACE as well; and
    security/commoncap.c:cap_ptrace_access_check() wants the target's permitted capabilities
    to be a subset of the caller's unless the caller has CAP_SYS_PTRACE. Yama, if enabled,
    adds its own scope (kernel.yama.ptrace_scope). Beyond the kernel, a non-dumpable target is
    refused unless *force*: its owner asked for no cores.

    :param caller: the credentials CRIU will run with; this process's when None.
    :raises PermissionDeniedError: one sentence naming the rule that failed.
    """
    me = caller_creds() if caller is None else caller
    pid = facts.pid
    if me.pid == pid or pid in threads_of(me.pid):
        raise PermissionDeniedError(
            f"process {pid}: is this tool itself; it cannot freeze itself", hint=None
        )
    if facts.dumpable != 1 and not force:
        how = "root-only (setuid or capability change)" if facts.dumpable == 2 else "disabled"
        raise PermissionDeniedError(
            f"process {pid} ({facts.comm}) is not dumpable: its core dumps are {how};"
            " use --force to dump it anyway (the core will be owned by root, mode 0600)",
            hint=None,
        )
    same_ns = me.user_ns == facts.user_ns

    def ptrace_cap() -> bool:
        if same_ns:
            return has_cap(me.cap_eff, CAP.SYS_PTRACE)
        return _has_cap_in_user_ns(pid, CAP.SYS_PTRACE, me)

    t_uids, t_gids = facts.uids, facts.gids
    same_ids = all(u == me.uids.real for u in t_uids[:3]) and all(
        g == me.gids.real for g in t_gids[:3]
    )
    if not same_ids and not ptrace_cap():
        raise PermissionDeniedError(
            f"process {pid} ({facts.comm}) runs as uid {t_uids.real}/{t_uids.effective}/"
            f"{t_uids.saved} gid {t_gids.real}/{t_gids.effective}/{t_gids.saved}; attaching to"
            f" it as uid {me.uids.real} gid {me.gids.real} needs CAP_SYS_PTRACE"
        )
    if facts.dumpable != 1 and not ptrace_cap():
        raise PermissionDeniedError(
            f"process {pid} ({facts.comm}) is not dumpable; attaching to it needs CAP_SYS_PTRACE"
        )
    # cap_ptrace_access_check(): a subset of permitted caps only counts within one user ns.
    extra = facts.cap_prm & ~me.cap_prm
    if (extra or not same_ns) and not ptrace_cap():
        what = (
            f"has capabilities the caller lacks (permitted {facts.cap_prm:#x} vs {me.cap_prm:#x})"
            if extra
            else "lives in another user namespace"
        )
        raise PermissionDeniedError(
            f"process {pid} ({facts.comm}) {what}; attaching to it needs CAP_SYS_PTRACE"
        )
    _check_yama(facts, me, ptrace_cap)


def _check_yama(facts: TargetFacts, me: CallerCreds, ptrace_cap: Callable[[], bool]) -> None:
    """security/yama/yama_lsm.c:yama_ptrace_access_check() for PTRACE_MODE_ATTACH."""
    try:
        scope = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return
    pid = facts.pid
    if scope >= 3:
        raise PermissionDeniedError(
            f"process {pid}: kernel.yama.ptrace_scope=3 forbids every ptrace attach", hint=None
        )
    if scope == 2 and not ptrace_cap():
        raise PermissionDeniedError(
            f"process {pid}: kernel.yama.ptrace_scope=2 lets only CAP_SYS_PTRACE attach"
        )
    if scope == 1 and not ptrace_cap() and not _is_ancestor(me.pid, pid):
        raise PermissionDeniedError(
            f"process {pid}: kernel.yama.ptrace_scope=1 lets only its ancestors or"
            " CAP_SYS_PTRACE attach",
            hint="run as root, or set kernel.yama.ptrace_scope=0",
        )


def _is_ancestor(ancestor: int, pid: int) -> bool:
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            pid = int(read_status(f"/proc/{pid}/status").get("PPid", "0"))
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False

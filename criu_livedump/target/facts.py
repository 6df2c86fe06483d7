"""What the target process is, read from /proc before anything freezes it.

:func:`inspect` gathers the facts the rest of the tool decides on (credentials, dumpability,
RLIMIT_CORE, coredump_filter, cwd and root for core_pattern, namespaces) and the *blockers*:
things CRIU 4.2 cannot dump as they are. Blockers are data: some come with the CRIU options
that work around them (``--external file[...]``, ``--external unix[...]``), the rest must be
refused with one sentence before CRIU runs, because a failed CRIU attempt still freezes the
target. :func:`check_ptrace_allowed` applies the kernel's ptrace access rules to the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import os
import pickle
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar, cast

from converters.options import UNLIMITED
from criu_livedump.errors import (
    BlockerError,
    LivedumpError,
    PermissionDeniedError,
    TargetError,
)
from criu_livedump.linux.caps import CAP, has_cap
from criu_livedump.linux.procfs import read_maps, read_stat, read_status

__all__ = [
    "GHOST_LIMIT",
    "Blocker",
    "BlockerKind",
    "CallerCreds",
    "Ids",
    "TargetFacts",
    "caller_creds",
    "check_blockers",
    "check_ptrace_allowed",
    "inspect",
    "traced",
]

#: CRIU's default --ghost-limit (criu/include/cr_options.h DEFAULT_GHOST_LIMIT): deleted files
#: whose allocated size (st_blocks * 512, as files-reg.c:dump_ghost_remap() measures) exceeds
#: it make CRIU fail unless they are declared external.
GHOST_LIMIT = 1 << 20

# include/uapi/linux/nsfs.h
_NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2)
_NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4)

# include/uapi/linux/pidfd.h: PIDFD_GET_INFO (Linux 6.13, commit cdda1f26e74b "pidfd: add ioctl
# to retrieve pid info") = _IOWR(0xFF, 11, struct pidfd_info) where the
# struct is 72 bytes up to coredump_mask and its padding (Linux 6.16+).
_PIDFD_INFO = struct.Struct("=QQ11IiII")
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO.size << 16) | (0xFF << 8) | 11
_PIDFD_INFO_COREDUMP = 1 << 4
_PIDFD_COREDUMP_SKIP = 1 << 1
_PIDFD_COREDUMP_USER = 1 << 2
_PIDFD_COREDUMP_ROOT = 1 << 3
assert _PIDFD_INFO.size == 72

# include/uapi/linux/sock_diag.h, unix_diag.h, netlink.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NLMSGHDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_NLATTR = struct.Struct("=HH")
_SOCK_TYPES = {1: "stream", 2: "dgram", 5: "seqpacket"}

_CLONE_NEWUTS = 0x04000000
_CLONE_NEWNET = 0x40000000


class Ids(NamedTuple):
    """The four ids of a credential, in /proc/PID/status order."""

    real: int
    effective: int
    saved: int
    fs: int


class BlockerKind(enum.StrEnum):
    """What CRIU 4.2 cannot dump as it is."""

    IO_URING = "io_uring"
    SYSV_SHM = "sysv_shm"
    DELETED_FILE = "deleted_file"
    EXTERNAL_UNIX = "external_unix"
    TRACED = "traced"
    FOREIGN_SESSION = "foreign_session"
    FOREIGN_MOUNT = "foreign_mount"


@dataclass(frozen=True)
class Blocker:
    """One obstacle to a CRIU dump, found in /proc.

    :param kind: what it is.
    :param pid: the process (of the dumped tree) that holds it.
    :param detail: one sentence for the user, naming the fd, mapping or socket.
    :param criu_options: options that let CRIU dump anyway; empty when it must be refused.
    """

    kind: BlockerKind
    pid: int
    detail: str
    criu_options: tuple[str, ...] = ()

    @property
    def refuse(self) -> bool:
        """True when no CRIU option works around it."""
        return not self.criu_options

    def sentence(self, target: int) -> str:
        """The detail, naming the process when it is not *target* (a child in the tree)."""
        return self.detail if self.pid == target else f"process {self.pid}: {self.detail}"


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


@dataclass(frozen=True)
class CallerCreds:
    """The credentials ptrace access is judged on (the process that will run CRIU)."""

    pid: int
    uids: Ids
    gids: Ids
    cap_prm: int
    cap_eff: int
    user_ns: int


# --- /proc readers ---------------------------------------------------------------------------


def _proc(pid: int, name: str = "") -> Path:
    return Path(f"/proc/{pid}/{name}" if name else f"/proc/{pid}")


def _ids(text: str) -> Ids:
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


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _ns_ino(pid: int | str, kind: str) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return 0


def _threads(pid: int) -> tuple[int, ...]:
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
    for tid in _threads(pid):
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
    """__get_dumpable() of the target: exact through PIDFD_GET_INFO (fs/pidfs.c:pidfd_info()
    reports pidfs_coredump_mask() of a live mm since Linux 6.16), else from /proc ownership."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            buf = bytearray(_PIDFD_INFO.size)
            struct.pack_into("=Q", buf, 0, _PIDFD_INFO_COREDUMP)
            fcntl.ioctl(fd, _PIDFD_GET_INFO, buf, True)
            fields = _PIDFD_INFO.unpack(buf)
            mask, coredump_mask = fields[0], fields[14]
            if mask & _PIDFD_INFO_COREDUMP and coredump_mask:
                if coredump_mask & _PIDFD_COREDUMP_USER:
                    return 1, "pidfd"
                if coredump_mask & _PIDFD_COREDUMP_ROOT:
                    return 2, "pidfd"
                if coredump_mask & _PIDFD_COREDUMP_SKIP:
                    return 0, "pidfd"
        except OSError:
            pass
        finally:
            os.close(fd)
    st = os.stat(_proc(pid))
    # task_dump_owner(): a non-dumpable mm makes /proc/PID root's (of the mm's user namespace).
    return (1 if (st.st_uid, st.st_gid) == (euid, egid) else 0), "proc-owner"


# --- namespaces ------------------------------------------------------------------------------

_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)


def _in_namespace(pid: int, kind: str, nstype: int, fn: Callable[[], _T]) -> _T:
    """Run *fn* in a forked child that joined the target's *kind* namespace; return its result.

    A fork keeps the caller's own namespaces untouched (setns(2) is per-thread and final for
    the mount and user namespaces). The result travels back pickled through a pipe.
    """
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(rfd)
            nsfd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY)
            if _libc.setns(nsfd, nstype) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            payload = pickle.dumps(("ok", fn()))
            code = 0
        except OSError as e:
            payload = pickle.dumps(("err" if e.errno != errno.EPERM else "eperm", e.strerror))
        except BaseException:
            payload = pickle.dumps(("err", "the helper process failed"))
        with contextlib.suppress(BaseException):
            os.write(wfd, payload)
        os._exit(code)
    os.close(wfd)
    chunks = []
    with os.fdopen(rfd, "rb") as r:
        while chunk := r.read(65536):
            chunks.append(chunk)
    os.waitpid(child, 0)
    status, value = pickle.loads(b"".join(chunks)) if chunks else ("err", "child died")
    if status == "eperm":
        # kernel/nsproxy.c: setns() wants CAP_SYS_ADMIN over the namespace
        raise PermissionDeniedError(
            f"process {pid}: entering its {kind} namespace to inspect it needs CAP_SYS_ADMIN",
            hint="run as root with CAP_SYS_ADMIN",
        )
    if status != "ok":
        raise TargetError(pid, f"cannot enter its {kind} namespace ({value or 'cannot enter it'})")
    return cast(_T, value)


def _nodename(pid: int) -> str:
    """utsname()->nodename of the target's UTS namespace, for core_pattern's %h."""
    if _ns_ino(pid, "uts") == _ns_ino("self", "uts"):
        return os.uname().nodename
    return _in_namespace(pid, "uts", _CLONE_NEWUTS, lambda: os.uname().nodename)


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
        return own_has and caller.user_ns == _ns_ino(pid, "user")
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


# --- blockers --------------------------------------------------------------------------------


def _fd_mnt_id(fdinfo: Path) -> int | None:
    try:
        for line in fdinfo.read_text().splitlines():
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _is_ghost(st: os.stat_result, link: str) -> bool:
    """A deleted regular file CRIU would copy as a ghost and refuse when above the limit.

    memfd files (criu/memfd.c) and SysV segments are dumped by other means; files still linked
    elsewhere get a link-remap, not a ghost.
    """
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
        return False
    if link.startswith(("/memfd:", "/SYSV", "/dev/zero")):
        return False
    return st.st_blocks * 512 > GHOST_LIMIT


def _external_file(pid: int, what: str, link: str, mnt_id: int, st: os.stat_result) -> Blocker:
    size = st.st_blocks * 512
    return Blocker(
        BlockerKind.DELETED_FILE,
        pid,
        f"{what} is the deleted file {link} of {size} bytes, above CRIU's ghost limit of"
        f" {GHOST_LIMIT} bytes; it is declared external so CRIU does not copy it",
        # files-reg.c:dump_one_reg_file() looks the id up as "file[%x:%lx]" (hex mnt_id, inode).
        (f"--external=file[{mnt_id:x}:{st.st_ino:x}]",),
    )


def _mount_ids(pid: int) -> set[int] | None:
    """The mount ids of *pid*'s mount namespace (first column of mountinfo), None if unknown."""
    try:
        return {int(line.split()[0]) for line in _proc(pid, "mountinfo").read_text().splitlines()}
    except (OSError, ValueError, IndexError):
        return None


def _fd_blockers(pid: int, sockets: dict[int, int]) -> Iterator[Blocker]:
    """io_uring, oversized deleted files and files of mounts the target's mount namespace does
    not have among the fds; collects socket inodes -> fd."""
    fd_dir = _proc(pid, "fd")
    try:
        fds = sorted(int(x) for x in os.listdir(fd_dir))
    except OSError as e:
        raise TargetError(pid, f"cannot list its files ({e.strerror})") from e
    mounts = _mount_ids(pid)
    for fd in fds:
        link = _readlink(fd_dir / str(fd))
        if link is None:
            continue
        if link == "anon_inode:[io_uring]":
            yield Blocker(
                BlockerKind.IO_URING,
                pid,
                f"fd {fd} is an io_uring instance, which CRIU 4.2 cannot checkpoint",
            )
        elif link.startswith("socket:["):
            sockets.setdefault(int(link[8:-1]), fd)
        elif link.startswith("/"):
            try:
                st = os.stat(fd_dir / str(fd))
            except OSError:
                continue
            mnt_id = _fd_mnt_id(_proc(pid, f"fdinfo/{fd}"))
            if mnt_id is None:
                continue
            if mounts is not None and mnt_id not in mounts:
                # opened before the process entered its mount namespace (a container's
                # inherited stdio): files-reg.c:dump_one_reg_file() fails with "Can't lookup
                # mount" unless the file is declared external, which it checks first
                yield Blocker(
                    BlockerKind.FOREIGN_MOUNT,
                    pid,
                    f"fd {fd} is {link} on mount {mnt_id}, which its mount namespace does not"
                    " have; it is declared external",
                    (f"--external=file[{mnt_id:x}:{st.st_ino:x}]",),
                )
            elif _is_ghost(st, link):
                yield _external_file(pid, f"fd {fd}", link.removesuffix(" (deleted)"), mnt_id, st)


def _maps_blockers(pid: int, same_ipc_ns: bool) -> Iterator[Blocker]:
    """SysV shm in the caller's IPC namespace, io_uring rings and oversized deleted mappings."""
    try:
        maps = read_maps(pid)
    except OSError as e:
        raise TargetError(pid, f"cannot read its memory map ({e.strerror})") from e
    seen_sysv: set[str] = set()
    seen_files: set[tuple[int, int]] = set()
    uring = False
    for m in maps:
        path = m.name
        if not path:
            continue
        if path.startswith("/SYSV"):
            # criu/cr-dump.c:check_sysvipc_map_dump(): only dumpable with the IPC namespace.
            key = path.split()[0]
            if same_ipc_ns and key not in seen_sysv:
                seen_sysv.add(key)
                yield Blocker(
                    BlockerKind.SYSV_SHM,
                    pid,
                    # the inode column of a SysV mapping is the shmid (ipc/shm.c:newseg())
                    f"SysV shared memory segment {m.inode} (key 0x{key[5:]}) is attached at"
                    f" 0x{m.start:08x} in the host IPC namespace, which CRIU only dumps"
                    " together with its own IPC namespace",
                )
        elif "io_uring" in path and not uring:
            uring = True
            yield Blocker(
                BlockerKind.IO_URING,
                pid,
                f"io_uring rings are mapped at 0x{m.start:08x}, which CRIU 4.2 cannot checkpoint",
            )
        elif path.endswith(" (deleted)") and path.startswith("/"):
            mf = _proc(pid, f"map_files/{m.map_files_name}")
            try:
                fd = os.open(mf, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen_files or not _is_ghost(st, path):
                    continue
                seen_files.add((st.st_dev, st.st_ino))
                mnt_id = _fd_mnt_id(Path(f"/proc/self/fdinfo/{fd}"))
            finally:
                os.close(fd)
            if mnt_id is not None:
                what = f"the mapping at 0x{m.start:08x}"
                yield _external_file(pid, what, path.removesuffix(" (deleted)"), mnt_id, st)


def _unix_peers_query() -> dict[int, tuple[int, int]]:
    """Every unix socket of the current network namespace: inode -> (type, peer inode).

    Uses sock_diag (net/unix/diag.c, UDIAG_SHOW_PEER): /proc/net/unix does not name peers.
    """
    result: dict[int, tuple[int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_PEER, 0, 0)
        hdr = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        nl.sendto(hdr + req, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    return result
                if mtype == _NLMSG_DONE:
                    return result
                if mtype == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    raise OSError(-err, os.strerror(-err), "sock_diag")
                body = off + _NLMSGHDR.size
                _fam, stype, _state, _pad, ino, _c0, _c1 = _UNIX_DIAG_MSG.unpack_from(data, body)
                peer = 0
                a = body + _UNIX_DIAG_MSG.size
                end = off + length
                while a + _NLATTR.size <= end:
                    alen, atype = _NLATTR.unpack_from(data, a)
                    if alen < _NLATTR.size:
                        break
                    if atype & 0x3FFF == _UNIX_DIAG_PEER:
                        (peer,) = struct.unpack_from("=I", data, a + _NLATTR.size)
                    a += (alen + 3) & ~3
                result[ino] = (stype, peer)
                off += (length + 3) & ~3


def _unix_peers(pid: int) -> dict[int, tuple[int, int]]:
    if _ns_ino(pid, "net") == _ns_ino("self", "net"):
        return _unix_peers_query()
    return _in_namespace(pid, "net", _CLONE_NEWNET, _unix_peers_query)


def _unix_blockers(
    holders: dict[int, dict[int, int]], peers: dict[int, tuple[int, int]]
) -> Iterator[Blocker]:
    """Connected unix sockets whose peer no process of the dumped tree holds.

    CRIU (criu/sk-unix.c:__dump_external_socket()) refuses them unless the *local* socket's
    inode is declared ``--external unix[ino]``; then it records the peer as external.
    """
    inside = {ino for socks in holders.values() for ino in socks}
    for pid, socks in holders.items():
        for ino, fd in sorted(socks.items(), key=lambda kv: kv[1]):
            stype, peer = peers.get(ino, (0, 0))
            if peer and peer not in inside:
                kind = _SOCK_TYPES.get(stype, f"type {stype}")
                yield Blocker(
                    BlockerKind.EXTERNAL_UNIX,
                    pid,
                    f"fd {fd} is a {kind} unix socket (inode {ino}) connected to socket {peer}"
                    " outside the dumped processes; it is declared external",
                    (f"--external=unix[{ino}]",),
                )


def _session_blocker(pid: int, status: dict[str, str]) -> Blocker | None:
    """CRIU 4.2 refuses a task whose getsid() is 0 in its own PID namespace: its session
    leader lives outside that namespace (criu/cr-dump.c:dump_one_task(), "A session leader of
    ... is outside of its pid namespace"), whatever the options. That is every process of a
    container entered with ``nsenter``/``docker exec`` that did not call setsid(). The last
    NSsid entry of /proc/PID/status is the sid in the innermost namespace, 0 when invisible
    there (fs/proc/array.c:task_state())."""
    nssid = status.get("NSsid", "").split()
    if not nssid or int(nssid[-1]) != 0:
        return None
    return Blocker(
        BlockerKind.FOREIGN_SESSION,
        pid,
        "its session leader is outside its PID namespace (session id 0 there), and CRIU"
        " cannot dump such a process",
    )


def traced(pid: int, tracer: int) -> Blocker:
    """Process *pid* is traced by *tracer*: ptrace allows one tracer, so neither CRIU nor the
    clone method (both seize the target) can dump it. The one wording of this refusal."""
    return Blocker(
        BlockerKind.TRACED,
        pid,
        f"it is being traced by process {tracer}, and a process can have only one tracer",
    )


def _blockers(pid: int, tree: tuple[int, ...], status: dict[str, str]) -> tuple[Blocker, ...]:
    found: list[Blocker] = []
    for p in tree:  # the target first; one foreign session is enough to name
        try:
            member_status = status if p == pid else read_status(_proc(p, "status"))
        except OSError:
            continue  # a child that exited meanwhile
        session = _session_blocker(p, member_status)
        if session is not None:
            found.append(session)
            break
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        found.append(traced(pid, tracer))
    same_ipc = _ns_ino(pid, "ipc") == _ns_ino("self", "ipc")
    holders: dict[int, dict[int, int]] = {}
    for p in tree:
        socks: dict[int, int] = {}
        try:
            found.extend(_fd_blockers(p, socks))
            found.extend(_maps_blockers(p, same_ipc))
        except TargetError:
            if p == pid:
                raise
            continue  # a child that exited meanwhile
        holders[p] = socks
    if any(holders.values()):
        try:
            peers = _unix_peers(pid)
        except OSError as e:
            raise TargetError(pid, f"cannot list unix socket peers ({e.strerror})") from e
        found.extend(_unix_blockers(holders, peers))
    return tuple(found)


# --- the public face -------------------------------------------------------------------------


def _exited(pid: int) -> bool:
    """Whether *pid* is gone, a zombie, or exiting (its memory already released: a process in
    exit reads an empty coredump_filter, the cause of a ValueError here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return True
    # field 3 is the state, field 23 vsize: 0 once exit_mm() has run (fs/proc/array.c)
    return fields[0] in (b"Z", b"X") or fields[20] == b"0"


def _unreadable(pid: int, e: OSError | ValueError) -> LivedumpError:
    """The one sentence for a /proc file of *pid* that could not be read or parsed."""
    if _exited(pid):
        return TargetError(pid, "exited while being inspected")
    if isinstance(e, PermissionError):
        return PermissionDeniedError(f"process {pid}: cannot read {e.filename}")
    if isinstance(e, OSError):
        return TargetError(pid, f"cannot read {e.filename or '/proc'} ({e.strerror})")
    return TargetError(pid, "its /proc files hold something this tool cannot parse")


def inspect(pid: int, *, tree: bool = False) -> TargetFacts:
    """Read the target's facts and blockers from /proc (nothing is stopped or changed).

    :param tree: the dump will include the target's descendants: their blockers count too,
        and unix peers among them are inside.
    :raises TargetError: no such process, a zombie, a kernel thread, or /proc unreadable.
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
    state = status.get("State", "?")[:1]
    if state in ("Z", "X"):
        raise TargetError(pid, "is a zombie; there is no memory left to dump")
    if int(status.get("Kthread", "0")) or (not cmdline_raw and int(status.get("PPid", 0)) == 2):
        raise TargetError(pid, "is a kernel thread")
    try:
        stat = read_stat(_proc(pid, "stat"))
        core_soft, core_hard = _core_limits(pid)
        coredump_filter = int(_proc(pid, "coredump_filter").read_text().strip(), 16)
    except (OSError, ValueError) as e:
        raise _unreadable(pid, e) from e
    threads = _threads(pid)
    exe = _readlink(_proc(pid, "exe"))
    if exe is None and not cmdline_raw:
        raise TargetError(pid, "has no user memory (a kernel thread or exiting)")
    uids, gids = _ids(status["Uid"]), _ids(status["Gid"])
    nstgid = tuple(int(x) for x in status.get("NStgid", str(pid)).split())
    dumpable, source = _dumpable(pid, uids.effective, gids.effective)
    members = _descendants(pid) if tree else (pid,)
    rss_kb = status.get("VmRSS", "0 kB").split()[0]
    cwd = _readlink(_proc(pid, "cwd"))
    root = _readlink(_proc(pid, "root"))
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
        same_mnt_ns=_ns_ino(pid, "mnt") == _ns_ino("self", "mnt"),
        rss=int(rss_kb) * 1024,
        threads=threads,
        state=state,
        tracer_pid=int(status.get("TracerPid", "0")),
        seccomp=_seccomp(pid, threads, status),
        nodename=_nodename(pid),
        cpu=stat.processor,  # the %C of core_pattern
        user_ns=_ns_ino(pid, "user"),
        tree=members,
        blockers=_blockers(pid, members, status),
    )


def check_blockers(facts: TargetFacts) -> tuple[str, ...]:
    """The CRIU options the target needs; refuse the target when a blocker has none.

    :raises BlockerError: naming every blocker that cannot be worked around, in one line.
    """
    refusals = facts.refusals
    if refusals:
        raise BlockerError(facts.pid, "; ".join(b.sentence(facts.pid) for b in refusals))
    return facts.criu_options


def caller_creds() -> CallerCreds:
    """The credentials of this process, as ptrace access checks see them."""
    status = read_status(Path("/proc/self/status"))
    return CallerCreds(
        pid=os.getpid(),
        uids=_ids(status["Uid"]),
        gids=_ids(status["Gid"]),
        cap_prm=int(status["CapPrm"], 16),
        cap_eff=int(status["CapEff"], 16),
        user_ns=_ns_ino("self", "user"),
    )


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
    if me.pid == pid or pid in _threads(me.pid):
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
            pid = int(read_status(_proc(pid, "status")).get("PPid", "0"))
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False

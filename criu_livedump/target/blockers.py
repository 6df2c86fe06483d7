"""Blockers: what CRIU 4.2 cannot dump as it is, found in /proc before anything freezes.

Blockers are data: some come with the CRIU options that work around them (``--external
file[...]``, ``--external unix[...]``), the rest refuse the target with one sentence before
CRIU runs, because a failed CRIU attempt still freezes the target. Each snapshot method says
which of them it refuses (:mod:`criu_livedump.snapshot`).
"""

from __future__ import annotations

import enum
import os
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from criu_livedump.errors import BlockerError, TargetError
from criu_livedump.linux.namespaces import CLONE_NEWNET, in_namespace, ns_ino
from criu_livedump.linux.procfs import read_link, read_maps, read_status

if TYPE_CHECKING:
    from criu_livedump.target.facts import TargetFacts

__all__ = [
    "GHOST_LIMIT",
    "Blocker",
    "BlockerKind",
    "check_blockers",
    "find_blockers",
    "traced",
]

#: CRIU's default --ghost-limit (criu/include/cr_options.h DEFAULT_GHOST_LIMIT): deleted files
#: whose allocated size (st_blocks * 512, as files-reg.c:dump_ghost_remap() measures) exceeds
#: it make CRIU fail unless they are declared external.
GHOST_LIMIT = 1 << 20

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
        return {
            int(line.split()[0]) for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        }
    except (OSError, ValueError, IndexError):
        return None


def _fd_blockers(pid: int, sockets: dict[int, int]) -> Iterator[Blocker]:
    """io_uring, oversized deleted files and files of mounts the target's mount namespace does
    not have among the fds; collects socket inodes -> fd."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = sorted(int(x) for x in os.listdir(fd_dir))
    except OSError as e:
        raise TargetError(pid, f"cannot list its files ({e.strerror})") from e
    mounts = _mount_ids(pid)
    for fd in fds:
        link = read_link(fd_dir / str(fd))
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
            mnt_id = _fd_mnt_id(Path(f"/proc/{pid}/fdinfo/{fd}"))
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
            mf = Path(f"/proc/{pid}/map_files/{m.map_files_name}")
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
    if ns_ino(pid, "net") == ns_ino("self", "net"):
        return _unix_peers_query()
    return in_namespace(pid, "net", CLONE_NEWNET, _unix_peers_query)


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


def find_blockers(pid: int, tree: tuple[int, ...], status: dict[str, str]) -> tuple[Blocker, ...]:
    """The blockers of *pid* (whose /proc status is *status*) and of the rest of *tree*.

    :raises TargetError: the target's own files or mappings cannot be read.
    """
    found: list[Blocker] = []
    for p in tree:  # the target first; one foreign session is enough to name
        try:
            member_status = status if p == pid else read_status(f"/proc/{p}/status")
        except OSError:
            continue  # a child that exited meanwhile
        session = _session_blocker(p, member_status)
        if session is not None:
            found.append(session)
            break
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        found.append(traced(pid, tracer))
    same_ipc = ns_ino(pid, "ipc") == ns_ino("self", "ipc")
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


def check_blockers(facts: TargetFacts) -> tuple[str, ...]:
    """The CRIU options the target needs; refuse the target when a blocker has none.

    :raises BlockerError: naming every blocker that cannot be worked around, in one line.
    """
    refusals = facts.refusals
    if refusals:
        raise BlockerError(facts.pid, "; ".join(b.sentence(facts.pid) for b in refusals))
    return facts.criu_options

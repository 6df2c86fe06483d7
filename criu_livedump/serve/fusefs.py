"""The filesystem door of ``serve``: the livedump patch's /proc/PID/livedump, on FUSE.

``DIR/PID/livedump`` (write-only) takes a live dump when SPEC words are written to it, the
empty line included; the write returns once the snapshot is taken and the target runs on, or
fails with the errno of the refusal (:mod:`.service`). ``DIR/PID/status`` says where the last
core of PID went and how it ended. A directory is listed for each process the caller can see
(its PID namespace and those below). Opening ``livedump`` applies the access rule as
fs/proc/base.c:proc_mem_open() does for /proc/PID/mem, so a refused caller gets EACCES at
``>`` already. The caller is the FUSE request's pid, uid and gid, as the kernel fills them in
(fs/fuse/dev.c: the fsuid and fsgid), never anything written.

Built on mfusepy (ctypes over libfuse3's high-level API, multi-threaded loop: a write waiting
for its snapshot does not hold up other requests).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import mfusepy

from criu_livedump.serve.service import Requester, Service

__all__ = ["LivedumpFs", "mount"]

_FILES = ("livedump", "status")


def _caller() -> Requester:
    uid, gid, pid = mfusepy.fuse_get_context()
    return Requester(pid=pid, uid=uid, gid=gid, door="fuse")


def _fail(number: int) -> mfusepy.FuseOSError:
    return mfusepy.FuseOSError(number)


class LivedumpFs(mfusepy.Operations):  # type: ignore[misc]  # mfusepy is untyped
    """The filesystem's operations; every one decides on the FUSE request's credentials."""

    use_ns = True

    def __init__(self, service: Service) -> None:
        self.service = service
        self.mounted = False

    def init(self, path: str) -> None:
        self.mounted = True

    def _split(self, path: str) -> tuple[int | None, str | None]:
        """``(pid, file)`` of a path; ``(None, None)`` for the root; ENOENT for the rest."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return None, None
        if not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and parts[1] not in _FILES):
            raise _fail(errno.ENOENT)
        pid = int(parts[0])
        if not self.service.visible(_caller(), [pid]):
            raise _fail(errno.ENOENT)
        return pid, parts[1] if len(parts) == 2 else None

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        pid, name = self._split(path)
        if pid is None:
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        try:
            st = os.stat(f"/proc/{pid}")
        except OSError:
            raise _fail(errno.ENOENT) from None
        # /proc/PID's owner: the task's euid, root when it is not dumpable (task_dump_owner())
        common = {"st_uid": st.st_uid, "st_gid": st.st_gid, "st_mtime": st.st_mtime_ns}
        if name is None:
            return {**common, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        mode = 0o200 if name == "livedump" else 0o444
        return {**common, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": 0}

    def readdir(self, path: str, fh: Any) -> list[str]:
        pid, _ = self._split(path)
        if pid is not None:
            return [".", "..", *_FILES]
        pids = (int(n) for n in os.listdir("/proc") if n.isdigit())
        return [".", "..", *(str(p) for p in self.service.visible(_caller(), pids))]

    def open(self, path: str, fi: Any) -> int:
        pid, name = self._split(path)
        if pid is None or name is None:
            raise _fail(errno.EISDIR)
        fi.direct_io = 1  # no page cache: every read and write reaches us
        wanted = os.O_RDONLY if name == "status" else os.O_WRONLY
        if fi.flags & os.O_ACCMODE != wanted:
            raise _fail(errno.EACCES)
        number = self.service.access_errno(_caller(), pid, name)
        if number:
            raise _fail(number)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise _fail(errno.EACCES)  # nothing is made here: `> DIR/NAME` of an unknown name

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        return 0  # the shell's O_TRUNC on `>`: nothing to cut

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        pid, name = self._split(path)
        if pid is None or name != "livedump":
            raise _fail(errno.EBADF)
        try:
            words = data.decode()
        except UnicodeDecodeError:
            raise _fail(errno.EINVAL) from None
        answer = self.service.submit(_caller(), pid, words)
        if answer.errno:
            raise _fail(answer.errno)
        return len(data)

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        pid, name = self._split(path)
        if pid is None or name != "status":
            raise _fail(errno.EBADF)
        return self.service.status(pid).encode()[offset : offset + size]


def mount(service: Service, mountpoint: Path) -> None:
    """Serve the filesystem on *mountpoint* until unmounted or SIGINT/SIGTERM (foreground).

    :raises RuntimeError: it could not be mounted (mfusepy's error: fuse_main()'s status).

    allow_other lets every user in: root may always mount with it (fusermount3 wants
    ``user_allow_other`` in /etc/fuse.conf only from unprivileged mounters).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    operations = LivedumpFs(service)
    try:
        mfusepy.FUSE(
            operations,
            str(mountpoint),
            raw_fi=True,
            foreground=True,
            allow_other=True,
            fsname="livedump",
            subtype="livedump",
        )
    except RuntimeError:
        # fuse_main() returns non-zero (8 with Debian's libfuse 3.14) when SIGTERM ended its
        # loop: once mounted, that is how a service stops
        if not operations.mounted:
            raise

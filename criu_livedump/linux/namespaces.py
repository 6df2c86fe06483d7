"""Namespaces of a process: their identity (the inode of /proc/PID/ns/KIND) and running a
function inside one of them without leaving ours."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
from collections.abc import Callable
from typing import TypeVar, cast

from criu_livedump.errors import PermissionDeniedError, TargetError

__all__ = ["CLONE_NEWNET", "CLONE_NEWUTS", "in_namespace", "ns_ino"]

# include/uapi/linux/sched.h
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)


def ns_ino(pid: int | str, kind: str) -> int:
    """The inode of *pid*'s *kind* namespace (``mnt``, ``net``...), 0 when unreadable."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return 0


def in_namespace(pid: int, kind: str, nstype: int, fn: Callable[[], _T]) -> _T:
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

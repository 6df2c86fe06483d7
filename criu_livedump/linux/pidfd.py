"""Process file descriptors: watching a process that is not our child, and how it ended.

A pidfd (pidfd_open(2), Linux 5.3) names one process for good, whatever pid reuse follows, and
polls readable once the process has exited (kernel/pid.c pidfd_poll()). Only the parent may
wait for a process, so how a process that is not our child ended is read two ways:

- while it is a zombie, field 52 of /proc/PID/stat, ``exit_code`` (Linux 3.5), holds its wait
  status (fs/proc/array.c do_task_stat()); the pidfd confirms afterwards that the zombie read
  was still that process (pidfd_send_signal(2) with signal 0 fails with ESRCH once it is
  reaped, so the pid cannot have been reused in between);
- once reaped, the ``PIDFD_GET_INFO`` ioctl (Linux 6.13, commit cdda1f26e74b) with
  ``PIDFD_INFO_EXIT`` (Linux 6.15, filled by pidfs_exit() from release_task()) returns the same
  wait status.

On older kernels, or when neither is readable, the way it ended is unknown (None).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct

__all__ = ["Pidfd", "describe_wait_status"]

#: include/uapi/linux/pidfd.h: struct pidfd_info, PIDFD_INFO_SIZE_VER0 = 64 bytes:
#: mask, cgroupid (u64), pid .. fsgid (11 x u32), exit_code (s32, since Linux 6.15).
_PIDFD_INFO = struct.Struct("=QQ11Ii")
assert _PIDFD_INFO.size == 64
_PIDFD_INFO_EXIT = 1 << 3
#: _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info) (include/uapi/asm-generic/ioctl.h)
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO.size << 16) | (0xFF << 8) | 11
#: 1-based field number of exit_code in /proc/PID/stat (proc(5)).
_STAT_EXIT_CODE = 52


class Pidfd:
    """A pidfd of *pid*, closed by :meth:`close` (or as a context manager).

    :raises ProcessLookupError: no such process.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Pidfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exited(self) -> bool:
        """Whether the process has ended: its pidfd polls readable (every thread exited), or
        every thread left is a zombie (a tracer holds exited threads unreaped; the thread
        group then looks alive to poll although nothing of it can run again)."""
        if select.select([self.fd], [], [], 0)[0]:
            return True
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return not self._still_here()
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in (b"Z", b"X"):
                return False
        return self._still_here()

    def _still_here(self) -> bool:
        """Whether the pid is still this process (not reaped, so not reused)."""
        try:
            signal.pidfd_send_signal(self.fd, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def wait_status(self) -> int | None:
        """The process's wait status once it has exited, or None when it cannot be read."""
        status = self._zombie_status()
        if status is not None:
            return status
        return self._info_status()

    def _zombie_status(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                text = f.read()
            fields = text.rsplit(b")", 1)[1].split()
            state, code = fields[0], int(fields[_STAT_EXIT_CODE - 3])
        except (OSError, IndexError, ValueError):
            return None
        if state not in (b"Z", b"X") or not self._still_here():
            return None
        return code

    def _info_status(self) -> int | None:
        buf = bytearray(_PIDFD_INFO.size)
        struct.pack_into("=Q", buf, 0, _PIDFD_INFO_EXIT)
        try:
            fcntl.ioctl(self.fd, _PIDFD_GET_INFO, buf)
        except OSError as e:
            # ENOTTY/EINVAL: before Linux 6.13; ESRCH: reaped, exit info unknown (before 6.15)
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.ESRCH):
                raise
            return None
        info = _PIDFD_INFO.unpack(bytes(buf))
        if not info[0] & _PIDFD_INFO_EXIT:
            return None
        return int(info[-1])


def describe_wait_status(status: int | None) -> str | None:
    """ "killed by signal 9 (SIGKILL)", "exited with status 3", or None when unknown."""
    if status is None:
        return None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = ""
        with contextlib.suppress(ValueError):
            name = f" ({signal.Signals(sig).name})"
        core = ", core dumped" if os.WCOREDUMP(status) else ""
        return f"killed by signal {sig}{name}{core}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return None

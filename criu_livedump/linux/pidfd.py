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

:func:`dumpable` reads the same ioctl's ``PIDFD_INFO_COREDUMP`` (Linux 6.16): the process's
__get_dumpable(), exact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct

from criu_livedump.linux.procfs import read_stat, read_status

__all__ = ["Pidfd", "describe_wait_status", "dumpable"]

#: include/uapi/linux/pidfd.h: PIDFD_GET_INFO (Linux 6.13, commit cdda1f26e74b "pidfd: add
#: ioctl to retrieve pid info"); struct pidfd_info up to coredump_mask and its padding, 72 bytes
#: (PIDFD_INFO_SIZE_VER1, Linux 6.16): mask, cgroupid (u64), pid .. fsgid (11 x u32),
#: exit_code (s32, since Linux 6.15), coredump_mask (u32, since Linux 6.16), padding. A kernel
#: with a shorter struct fills only its own part (copy_struct_to_user()).
_PIDFD_INFO = struct.Struct("=QQ11IiII")
assert _PIDFD_INFO.size == 72
_EXIT_CODE, _COREDUMP_MASK = 13, 14  # field indexes
_PIDFD_INFO_EXIT = 1 << 3
_PIDFD_INFO_COREDUMP = 1 << 4
_PIDFD_COREDUMP_SKIP = 1 << 1
_PIDFD_COREDUMP_USER = 1 << 2
_PIDFD_COREDUMP_ROOT = 1 << 3
#: _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info) (include/uapi/asm-generic/ioctl.h)
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO.size << 16) | (0xFF << 8) | 11
#: 1-based field number of flags in /proc/PID/stat (proc(5)), and include/linux/sched.h's
#: PF_EXITING, set by exit_signals() as do_exit() starts.
_STAT_FLAGS = 9
_PF_EXITING = 0x00000004
#: What :meth:`Pidfd._thread_states` calls a thread inside do_exit().
_EXITING = "exiting"
#: SIGKILL's bit in a /proc status SigPnd/ShdPnd mask (fs/proc/array.c render_sigset_t()).
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _get_info(fd: int, request: int) -> tuple[int, ...]:
    """PIDFD_GET_INFO on pidfd *fd*, asking for the *request* mask.

    :raises OSError: ENOTTY/EINVAL before Linux 6.13, ESRCH once reaped (before 6.15).
    """
    buf = bytearray(_PIDFD_INFO.size)
    struct.pack_into("=Q", buf, 0, request)
    fcntl.ioctl(fd, _PIDFD_GET_INFO, buf)
    return _PIDFD_INFO.unpack(bytes(buf))


class Pidfd:
    """A pidfd of *pid*, closed by :meth:`close` (or as a context manager).

    :raises ProcessLookupError: no such process.
    """

    def __init__(self, pid: int, fd: int | None = None) -> None:
        """:param fd: a pidfd of *pid* opened elsewhere (inherited), owned from now on."""
        self.pid = pid
        self.fd = os.pidfd_open(pid) if fd is None else fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Pidfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exited(self, grace: float = 0.0) -> bool:
        """Whether the process has ended: its pidfd polls readable (every thread exited), or
        every thread left is a zombie (a tracer holds exited threads unreaped; the thread
        group then looks alive to poll although nothing of it can run again).

        :param grace: seconds to wait for the end when the process is seen dying (some of its
            threads already zombies, the others still on their way out of a SIGKILL).
        """
        if select.select([self.fd], [], [], 0)[0]:
            return True
        states = self._thread_states()
        if states is None:  # no /proc entry left
            return not self._still_here()
        if states and all(s in ("Z", "X") for s in states):
            return self._still_here()
        if grace > 0 and (any(st in ("Z", "X", _EXITING) for st in states) or self._killed()):
            return bool(select.select([self.fd], [], [], grace)[0]) or self.exited()
        return False

    def _killed(self) -> bool:
        """Whether a SIGKILL is pending for it, not yet taken by any thread: kill(2) of a
        process marks every thread (kernel/signal.c complete_signal() adds SIGKILL to each
        thread's pending set and wakes it), and on a loaded machine a thread may wait long for
        a CPU to take it, before anything else shows it dying."""
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return False
        for tid in tids:
            try:
                status = read_status(f"/proc/{self.pid}/task/{tid}/status")
                pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
            except (OSError, KeyError, ValueError):
                continue
            if pending & _SIGKILL_BIT:
                return True
        return False

    def _thread_states(self) -> list[str] | None:
        """The state letter of each of its threads (:data:`_EXITING` for a thread inside
        do_exit(): PF_EXITING in its flags, before it is a zombie; freeing gigabytes of memory
        takes it a while), or None when /proc has no entry for it."""
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return None
        states = []
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                state, flags = fields[0].decode(), int(fields[_STAT_FLAGS - 3])
            except (OSError, IndexError, ValueError):
                continue
            states.append(_EXITING if state not in ("Z", "X") and flags & _PF_EXITING else state)
        return states

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
            stat = read_stat(f"/proc/{self.pid}/stat")
        except (OSError, IndexError, ValueError):
            return None
        if stat.state not in ("Z", "X") or not self._still_here():
            return None
        return stat.exit_code

    def _info_status(self) -> int | None:
        try:
            info = _get_info(self.fd, _PIDFD_INFO_EXIT)
        except OSError as e:
            # ENOTTY/EINVAL: before Linux 6.13; ESRCH: reaped, exit info unknown (before 6.15)
            if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.ESRCH):
                raise
            return None
        if not info[0] & _PIDFD_INFO_EXIT:
            return None
        return int(info[_EXIT_CODE])


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


def dumpable(pid: int) -> int | None:
    """__get_dumpable() of process *pid* (0 off, 1 user, 2 root-only), exact: pidfd_info()
    reports pidfs_coredump_mask() of a live mm since Linux 6.16. None when the kernel (or the
    process) does not say."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        info = _get_info(fd, _PIDFD_INFO_COREDUMP)
    except OSError:
        return None
    finally:
        os.close(fd)
    coredump_mask = info[_COREDUMP_MASK]
    if not info[0] & _PIDFD_INFO_COREDUMP:
        return None
    if coredump_mask & _PIDFD_COREDUMP_USER:
        return 1
    if coredump_mask & _PIDFD_COREDUMP_ROOT:
        return 2
    if coredump_mask & _PIDFD_COREDUMP_SKIP:
        return 0
    return None

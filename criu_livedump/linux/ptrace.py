"""Thin ctypes wrappers over ptrace(2), as the clone snapshot needs them.

Each wrapper makes one request and raises :class:`PtraceError` (carrying the request, the thread
and errno) on failure. Registers travel as the regsets' bytes (PTRACE_GETREGSET), whose layout
only the architecture's module in :mod:`converters.arch` knows.

The batch functions (:func:`seize_all`, :func:`stop_all`, :func:`save_all`, :func:`detach_all`)
make one request per thread for many threads in one call into ``libptrace_batch.so.1``, built by
``make setup`` from ``ptrace_batch.c`` next to this file: from Python each request costs about a
microsecond more, which a freeze of a thousand threads pays several times over (issue 12).
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import os
import signal
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Final

from criu_livedump.linux.caps import CAP, has_cap
from criu_livedump.linux.procfs import read_status

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class Req(enum.IntEnum):
    """ptrace requests (include/uapi/linux/ptrace.h)."""

    CONT = 7
    KILL = 8
    DETACH = 17
    SYSCALL = 24
    SETOPTIONS = 0x4200
    GETEVENTMSG = 0x4201
    GETSIGINFO = 0x4202
    GETREGSET = 0x4204
    SETREGSET = 0x4205
    SEIZE = 0x4206
    INTERRUPT = 0x4207
    GETSIGMASK = 0x420A
    SETSIGMASK = 0x420B
    GET_RSEQ_CONFIGURATION = 0x420F


class Opt(enum.IntFlag):
    """PTRACE_O_* options."""

    TRACESYSGOOD = 1
    TRACEFORK = 1 << 1
    TRACEVFORK = 1 << 2
    TRACECLONE = 1 << 3
    TRACEEXEC = 1 << 4
    TRACEEXIT = 1 << 6
    EXITKILL = 1 << 20
    #: the tracee's seccomp filters do not run while it is traced with this option
    #: (kernel/seccomp.c: __secure_computing(); kernel/ptrace.c: ptrace_setoptions() allows it
    #: only to a tracer with CAP_SYS_ADMIN that is not itself under seccomp)
    SUSPEND_SECCOMP = 1 << 21


class Event(enum.IntEnum):
    """PTRACE_EVENT_* codes, found in ``status >> 16`` of a ptrace-stop."""

    FORK = 1
    VFORK = 2
    CLONE = 3
    EXEC = 4
    EXIT = 6
    STOP = 128


#: NT_PRSTATUS (include/uapi/linux/elf.h): the general registers' regset on every architecture
NT_PRSTATUS = 1
#: wait flag: wait for all children, clone or not (include/uapi/linux/wait.h)
WALL = 0x40000000
#: larger than any general-register regset (the kernel shortens the iovec to the real size)
_GREGS_BUF = 1 << 12


class _Iovec(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, type[ctypes._SimpleCData[Any]]]]] = [
        ("iov_base", ctypes.c_void_p),
        ("iov_len", ctypes.c_size_t),
    ]


class PtraceError(OSError):
    """A ptrace request failed.

    :param request: the request's name.
    :param tid: the thread it was made on.
    :param err: errno.
    """

    def __init__(self, request: str, tid: int, err: int) -> None:
        super().__init__(err, f"ptrace({request}) on thread {tid}: {os.strerror(err)}")
        self.request = request
        self.tid = tid


def _call(req: Req, tid: int, addr: int | None = None, data: int | None = None) -> int:
    ctypes.set_errno(0)
    res = int(_ptrace(int(req), tid, addr, data))
    if res == -1:
        err = ctypes.get_errno()
        if err:
            raise PtraceError(req.name, tid, err)
    return res


_NO_OPTIONS = Opt(0)


_UNDER_SECCOMP = "it runs under seccomp, whose filters must be suspended for injected code"


def seccomp_suspension_refusal() -> str | None:
    """Why this process cannot set :attr:`Opt.SUSPEND_SECCOMP` (the one wording of the refusal
    of a target under seccomp, by either method), or None when it can. CRIU
    needs the same to inject its parasite into a process under seccomp
    (compel/src/lib/infect.c: compel_interrupt_task() calls ptrace_suspend_seccomp()).

    The conditions are kernel/ptrace.c: ptrace_setoptions(): CAP_SYS_ADMIN in the initial user
    namespace, the tracer not under seccomp itself.
    """
    status = read_status("/proc/self/status")
    if not has_cap(int(status.get("CapEff", "0"), 16), CAP.SYS_ADMIN):
        return f"{_UNDER_SECCOMP}, which needs CAP_SYS_ADMIN, and this tool lacks it"
    if status.get("Seccomp", "0") != "0":
        return f"{_UNDER_SECCOMP}, which needs a tracer not under seccomp itself"
    return None


def seize(tid: int, options: Opt = _NO_OPTIONS) -> None:
    """PTRACE_SEIZE: attach without stopping the thread."""
    _call(Req.SEIZE, tid, 0, int(options))


def interrupt(tid: int) -> None:
    """PTRACE_INTERRUPT: ask a seized thread to enter a ptrace-stop (PTRACE_EVENT_STOP)."""
    _call(Req.INTERRUPT, tid, 0, 0)


def set_options(tid: int, options: Opt) -> None:
    """PTRACE_SETOPTIONS (replaces the whole option set)."""
    _call(Req.SETOPTIONS, tid, 0, int(options))


def cont(tid: int, sig: int = 0) -> None:
    """PTRACE_CONT, delivering *sig* (0: none)."""
    _call(Req.CONT, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """PTRACE_SYSCALL: continue up to the next syscall entry or exit."""
    _call(Req.SYSCALL, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    """PTRACE_DETACH, delivering *sig* (``signal.SIGSTOP`` leaves the thread group-stopped)."""
    _call(Req.DETACH, tid, 0, sig)


def get_event_msg(tid: int) -> int:
    """PTRACE_GETEVENTMSG: e.g. the new child's pid at a PTRACE_EVENT_CLONE/FORK stop."""
    msg = ctypes.c_ulong(0)
    _call(Req.GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return int(msg.value)


def get_regs(tid: int) -> bytes:
    """The general registers (PTRACE_GETREGSET NT_PRSTATUS: the arch's user_regs_struct)."""
    return get_regset(tid, NT_PRSTATUS, _GREGS_BUF)


def set_regs(tid: int, regs: bytes) -> None:
    """PTRACE_SETREGSET NT_PRSTATUS."""
    set_regset(tid, NT_PRSTATUS, regs)


def get_regset(tid: int, note: int, size: int) -> bytes:
    """PTRACE_GETREGSET: the regset's bytes, as long as the kernel says it is."""
    buf = ctypes.create_string_buffer(size)
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), size)
    _call(Req.GETREGSET, tid, int(note), ctypes.addressof(iov))
    return buf.raw[: iov.iov_len]


def set_regset(tid: int, note: int, data: bytes) -> None:
    """PTRACE_SETREGSET."""
    buf = ctypes.create_string_buffer(data, len(data))
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    _call(Req.SETREGSET, tid, int(note), ctypes.addressof(iov))


def get_regsets(tid: int, regsets: Iterable[tuple[int, int]]) -> tuple[bytes, ...]:
    """Each ``(note type, buffer size)`` regset's bytes; empty for one the CPU lacks (ENODEV,
    e.g. NT_X86_XSTATE without XSAVE)."""
    out = []
    for note, size in regsets:
        try:
            out.append(get_regset(tid, note, size))
        except PtraceError as e:
            if e.errno != errno_mod.ENODEV:
                raise
            out.append(b"")
    return tuple(out)


def get_sigmask(tid: int) -> int:
    """PTRACE_GETSIGMASK: the blocked set as a 64-bit mask (bit N-1 is signal N)."""
    mask = ctypes.c_uint64(0)
    _call(Req.GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return int(mask.value)


def set_sigmask(tid: int, mask: int) -> None:
    """PTRACE_SETSIGMASK."""
    value = ctypes.c_uint64(mask)
    _call(Req.SETSIGMASK, tid, 8, ctypes.addressof(value))


_SIGINFO = struct.Struct("<iii")
#: struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h, Linux 5.13)
_RSEQ_CONFIG = struct.Struct("<QIIII")
assert _RSEQ_CONFIG.size == 24


def get_siginfo(tid: int) -> tuple[int, int, int]:
    """PTRACE_GETSIGINFO: ``(si_signo, si_errno, si_code)``."""
    buf = ctypes.create_string_buffer(128)
    _call(Req.GETSIGINFO, tid, 0, ctypes.addressof(buf))
    signo, err, code = _SIGINFO.unpack_from(buf.raw)
    return signo, err, code


def rseq_area(tid: int) -> tuple[int, int] | None:
    """``(address, size)`` of the stopped thread *tid*'s registered rseq area, None if none."""
    buf = ctypes.create_string_buffer(_RSEQ_CONFIG.size)
    _call(Req.GET_RSEQ_CONFIGURATION, tid, _RSEQ_CONFIG.size, ctypes.addressof(buf))
    address, size, _sig, _flags, _pad = _RSEQ_CONFIG.unpack(buf.raw)
    return (address, size) if address else None


def wait(pid: int, flags: int = 0) -> tuple[int, int]:
    """waitpid(*pid*, __WALL | *flags*), retried on EINTR: ``(pid, status)``."""
    return os.waitpid(pid, WALL | flags)


def stop_event(status: int) -> int:
    """The PTRACE_EVENT_* of a stop status (0 for a plain signal-delivery stop)."""
    return (status >> 16) & 0xFF


def is_syscall_stop(status: int) -> bool:
    """A syscall-entry/exit stop under PTRACE_O_TRACESYSGOOD (SIGTRAP | 0x80)."""
    return os.WIFSTOPPED(status) and os.WSTOPSIG(status) == (signal.SIGTRAP | 0x80)


# --- many threads per call ----------------------------------------------------------------------

#: the batch helper, built by ``make setup`` (scripts/setup.sh) from ptrace_batch.c
HELPER: Final = Path(__file__).with_name("libptrace_batch.so.1")
#: when :func:`stop_all` first looks again at a thread that has not stopped yet
_STOP_POLL_S: Final = 50e-6
#: a general-register slot of :func:`save_all`: larger than any architecture's (x86_64: 216)
_GREGS_SLOT: Final = 512
_LB_STOPPED: Final = 1


class HelperMissingError(OSError):
    """``libptrace_batch.so.1`` is not built (or not loadable); ``make setup`` builds it."""

    def __init__(self, why: str) -> None:
        super().__init__(errno_mod.ENOENT, f"{HELPER}: {why}; `make setup` builds it")


class StopTimeoutError(PtraceError):
    """A seized thread did not stop in time (uninterruptible sleep?)."""


@cache
def _helper() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(HELPER), use_errno=True)
    except OSError as e:
        raise HelperMissingError("missing" if not HELPER.exists() else str(e)) from None
    ints = ctypes.POINTER(ctypes.c_int)
    sizes = ctypes.POINTER(ctypes.c_size_t)
    u64s = ctypes.POINTER(ctypes.c_uint64)
    c_long, c_int, c_size = ctypes.c_long, ctypes.c_int, ctypes.c_size_t
    for name, args in (
        ("lb_seize", [ints, c_int, c_long, ints]),
        ("lb_stop", [ints, c_int, c_long, c_long, ints, ints]),
        ("lb_save", [ints, c_int, c_long, ctypes.c_char_p, c_size, sizes, c_long,
                     ctypes.c_char_p, c_size, sizes, u64s, u64s, ints]),
        ("lb_detach", [ints, c_int, ints]),
        ("lb_set_regset", [ints, c_int, c_long, ctypes.c_char_p, c_size, ints]),
        ("lb_regset_size", [c_long, c_size]),
    ):  # fmt: skip
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_long if name == "lb_regset_size" else ctypes.c_int
    return lib


def check_helper() -> None:
    """:raises HelperMissingError: the batch helper cannot be loaded."""
    _helper()


def _tid_array(tids: Sequence[int]) -> ctypes.Array[ctypes.c_int]:
    return (ctypes.c_int * len(tids))(*tids)


def seize_all(tids: Sequence[int], options: Opt = _NO_OPTIONS) -> list[int]:
    """PTRACE_SEIZE each of *tids* (they keep running): errno per thread, 0 when seized."""
    err = (ctypes.c_int * len(tids))()
    _helper().lb_seize(_tid_array(tids), len(tids), int(options), err)
    return list(err)


def stop_all(tids: Sequence[int], timeout: float) -> list[bool]:
    """PTRACE_INTERRUPT every seized thread of *tids*, then collect each one's
    PTRACE_EVENT_STOP; a signal-delivery stop that comes first is passed on.

    :returns: per thread, True when stopped, False when it exited.
    :raises StopTimeoutError: a thread did not stop within *timeout* seconds.
    :raises PtraceError: a request failed otherwise.
    """
    state = (ctypes.c_int * len(tids))()
    failed = ctypes.c_int(0)
    res = _helper().lb_stop(
        _tid_array(tids), len(tids), int(timeout * 1e9), int(_STOP_POLL_S * 1e9), state, failed
    )
    if res == -errno_mod.ETIMEDOUT:
        raise StopTimeoutError("INTERRUPT", tids[failed.value], errno_mod.ETIMEDOUT)
    if res < 0:
        raise PtraceError("INTERRUPT", tids[failed.value], -res)
    return [s == _LB_STOPPED for s in state]


@cache
def regset_size(note: int, largest: int) -> int:
    """The size of regset *note* (at most *largest*) on this machine, every task's: the kernel
    sizes a regset once (x86's XSAVE regset: the CPU's user XSAVE size, fixed at boot). Read
    once per process from a child of ours stopped at birth; 0 where the CPU lacks it, *largest*
    when the child cannot tell."""
    size = int(_helper().lb_regset_size(note, largest))
    return largest if size < 0 else size


class SaveBuffers:
    """Room for what :func:`save_all` reads from *capacity* threads, allocated (and zeroed)
    before a freeze rather than inside it: a thousand threads' XSAVE areas are megabytes.

    :param fp_regset: ``(note type, largest size)`` of the FP regset to save.
    """

    def __init__(self, capacity: int, fp_regset: tuple[int, int]) -> None:
        self.capacity = capacity
        self.fp_note = fp_regset[0]
        self.fp_slot = max(regset_size(*fp_regset), 1)
        self.gregs = ctypes.create_string_buffer(capacity * _GREGS_SLOT)
        self.gregs_len = (ctypes.c_size_t * capacity)()
        self.fp = ctypes.create_string_buffer(capacity * self.fp_slot)
        self.fp_len = (ctypes.c_size_t * capacity)()
        self.sigmask = (ctypes.c_uint64 * capacity)()
        self.pending = (ctypes.c_uint64 * capacity)()


@dataclass(frozen=True)
class Saved:
    """What :func:`save_all` read from each thread (by its number in :attr:`tids`), kept in
    the buffers it was read into until asked."""

    tids: tuple[int, ...]
    _buf: SaveBuffers

    def regs(self, i: int) -> bytes:
        """The general registers of thread number *i* (NT_PRSTATUS)."""
        at = ctypes.addressof(self._buf.gregs) + i * _GREGS_SLOT
        return ctypes.string_at(at, self._buf.gregs_len[i])

    def fp(self, i: int) -> bytes:
        """Its FP regset, empty where the CPU lacks it (ENODEV)."""
        at = ctypes.addressof(self._buf.fp) + i * self._buf.fp_slot
        return ctypes.string_at(at, self._buf.fp_len[i])

    def sigmask(self, i: int) -> int:
        """Its blocked signals (bit N-1 for signal N)."""
        return int(self._buf.sigmask[i])

    def pending(self, i: int) -> int:
        """The signals queued for it or for its process, as a mask like :meth:`sigmask`'s."""
        return int(self._buf.pending[i])

    def fp_missing(self) -> list[int]:
        """The threads (by number) without the FP regset: the CPU lacks it."""
        return [i for i in range(len(self.tids)) if self._buf.fp_len[i] == 0]


def save_all(
    tids: Sequence[int], fp_regset: tuple[int, int], buffers: SaveBuffers | None = None
) -> Saved:
    """The general registers, the FP regset *fp_regset* ``(note type, largest size)``, the
    blocked-signal mask and the pending signals (those queued, PTRACE_PEEKSIGINFO) of every
    stopped thread of *tids*, into *buffers* when they are large enough.

    :raises PtraceError: a request failed (the thread is named).
    """
    n = len(tids)
    buf = buffers
    if buf is None or buf.capacity < n or buf.fp_note != fp_regset[0]:
        buf = SaveBuffers(n, fp_regset)
    failed = ctypes.c_int(0)
    res = _helper().lb_save(
        _tid_array(tids), n, NT_PRSTATUS, buf.gregs, _GREGS_SLOT, buf.gregs_len,
        buf.fp_note, buf.fp, buf.fp_slot, buf.fp_len, buf.sigmask, buf.pending, failed,
    )  # fmt: skip
    if res < 0:
        raise PtraceError("GETREGSET", tids[failed.value], -res)
    return Saved(tuple(tids), buf)


def set_regs_all(regs: Mapping[int, bytes]) -> None:
    """PTRACE_SETREGSET NT_PRSTATUS of each stopped thread of *regs* (``{tid: registers}``,
    all of one size).

    :raises PtraceError: a request failed (the thread is named).
    """
    if not regs:
        return
    tids = list(regs)
    size = len(regs[tids[0]])
    failed = ctypes.c_int(0)
    res = _helper().lb_set_regset(
        _tid_array(tids), len(tids), NT_PRSTATUS, b"".join(regs.values()), size, failed
    )
    if res < 0:
        raise PtraceError("SETREGSET", tids[failed.value], -res)


def detach_all(tids: Sequence[int]) -> list[int]:
    """PTRACE_DETACH each of *tids*: errno per thread, 0 when detached."""
    err = (ctypes.c_int * len(tids))()
    _helper().lb_detach(_tid_array(tids), len(tids), err)
    return list(err)

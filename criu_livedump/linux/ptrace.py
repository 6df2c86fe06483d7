"""Thin ctypes wrappers over ptrace(2) for x86_64, as the clone snapshot needs them.

Each wrapper makes one request and raises :class:`PtraceError` (carrying the request, the thread
and errno) on failure. Register layouts are the kernel's: ``struct user_regs_struct`` from
arch/x86/include/asm/user_64.h, checked for size at import.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import os
import signal
import struct
from typing import Any, ClassVar

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class Req(enum.IntEnum):
    """ptrace requests (include/uapi/linux/ptrace.h, arch/x86/include/uapi/asm/ptrace-abi.h)."""

    CONT = 7
    KILL = 8
    DETACH = 17
    GETREGS = 12
    SETREGS = 13
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


class Opt(enum.IntFlag):
    """PTRACE_O_* options."""

    TRACESYSGOOD = 1
    TRACEFORK = 1 << 1
    TRACEVFORK = 1 << 2
    TRACECLONE = 1 << 3
    TRACEEXEC = 1 << 4
    TRACEEXIT = 1 << 6
    EXITKILL = 1 << 20


class Event(enum.IntEnum):
    """PTRACE_EVENT_* codes, found in ``status >> 16`` of a ptrace-stop."""

    FORK = 1
    VFORK = 2
    CLONE = 3
    EXEC = 4
    EXIT = 6
    STOP = 128


class NT(enum.IntEnum):
    """Regset note types for PTRACE_GETREGSET (include/uapi/linux/elf.h)."""

    PRSTATUS = 1
    PRFPREG = 2
    X86_XSTATE = 0x202


#: wait flag: wait for all children, clone or not (include/uapi/linux/wait.h)
WALL = 0x40000000
#: struct user_i387_struct (NT_PRFPREG, the FXSAVE area) is 512 bytes on x86_64.
FPREGS_SIZE = 512
#: Large enough for any XSAVE area this kernel reports (AMX tile data included).
_XSTATE_BUF = 1 << 15


_REG_NAMES = (
    *("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx"),
    *("rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base"),
    *("ds", "es", "fs", "gs"),
)


class UserRegs(ctypes.Structure):
    """``struct user_regs_struct`` of x86_64 (arch/x86/include/asm/user_64.h)."""

    _fields_: ClassVar[list[tuple[str, type[ctypes.c_uint64]]]] = [
        (name, ctypes.c_uint64) for name in _REG_NAMES
    ]

    def copy(self) -> UserRegs:
        return UserRegs.from_buffer_copy(bytes(self))

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name, _ in self._fields_}

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> UserRegs:
        regs = cls()
        for name, value in values.items():
            setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
        return regs


assert ctypes.sizeof(UserRegs) == 27 * 8


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


def get_regs(tid: int) -> UserRegs:
    """PTRACE_GETREGS."""
    regs = UserRegs()
    _call(Req.GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: UserRegs) -> None:
    """PTRACE_SETREGS."""
    _call(Req.SETREGS, tid, 0, ctypes.addressof(regs))


def get_regset(tid: int, note: NT, size: int = _XSTATE_BUF) -> bytes:
    """PTRACE_GETREGSET: the regset's bytes, as long as the kernel says it is."""
    buf = ctypes.create_string_buffer(size)
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), size)
    _call(Req.GETREGSET, tid, int(note), ctypes.addressof(iov))
    return buf.raw[: iov.iov_len]


def set_regset(tid: int, note: NT, data: bytes) -> None:
    """PTRACE_SETREGSET."""
    buf = ctypes.create_string_buffer(data, len(data))
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    _call(Req.SETREGSET, tid, int(note), ctypes.addressof(iov))


def get_fpregs(tid: int) -> bytes:
    """The FXSAVE area (``struct user_i387_struct``, NT_PRFPREG)."""
    return get_regset(tid, NT.PRFPREG, FPREGS_SIZE)


def get_xstate(tid: int) -> bytes:
    """The XSAVE area (NT_X86_XSTATE); empty when the CPU has no XSAVE."""
    try:
        return get_regset(tid, NT.X86_XSTATE)
    except PtraceError as e:
        if e.errno == errno_mod.ENODEV:
            return b""
        raise


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


def get_siginfo(tid: int) -> tuple[int, int, int]:
    """PTRACE_GETSIGINFO: ``(si_signo, si_errno, si_code)``."""
    buf = ctypes.create_string_buffer(128)
    _call(Req.GETSIGINFO, tid, 0, ctypes.addressof(buf))
    signo, err, code = _SIGINFO.unpack_from(buf.raw)
    return signo, err, code


def wait(pid: int, flags: int = 0) -> tuple[int, int]:
    """waitpid(*pid*, __WALL | *flags*), retried on EINTR: ``(pid, status)``."""
    return os.waitpid(pid, WALL | flags)


def stop_event(status: int) -> int:
    """The PTRACE_EVENT_* of a stop status (0 for a plain signal-delivery stop)."""
    return (status >> 16) & 0xFF


def is_syscall_stop(status: int) -> bool:
    """A syscall-entry/exit stop under PTRACE_O_TRACESYSGOOD (SIGTRAP | 0x80)."""
    return os.WIFSTOPPED(status) and os.WSTOPSIG(status) == (signal.SIGTRAP | 0x80)

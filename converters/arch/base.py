"""What every architecture module provides (:class:`Arch`), and the note payloads whose layout
is the same on every 64-bit little-endian Linux architecture.

Sources: include/uapi/linux/elfcore.h and include/linux/elfcore.h (struct elf_prstatus,
struct elf_prpsinfo), include/uapi/asm-generic/siginfo.h (siginfo_t).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, Protocol

from converters.elf import Note

#: ``read(address, size)``: the dumped process's memory as the core shows it
ReadMemory = Callable[[int, int], bytes]


# include/linux/errno.h and include/uapi/asm-generic/errno-base.h, alike on every architecture:
# the kernel-internal restart codes a stopped syscall shows as its result, and EINTR
EINTR: Final = 4
ERESTARTSYS: Final = 512
ERESTARTNOINTR: Final = 513
ERESTARTNOHAND: Final = 514
ERESTART_RESTARTBLOCK: Final = 516


def pause_interrupted(result: int) -> bool:
    """Whether *result* is what pause() shows at its exit when a ptrace interrupt ended it
    (kernel/signal.c: sys_pause() returns -ERESTARTNOHAND), alike on every architecture."""
    return result == -ERESTARTNOHAND


class CpuLayout(Protocol):
    """Facts about the dumping CPU that an architecture's notes need (x86: the XSAVE layout).

    It travels in the sidecar as the JSON object :meth:`as_dict` returns.
    """

    def as_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Syscalls:
    """Numbers of the syscalls the clone snapshot injects into a target, and of those this
    project calls itself through libc's syscall() (no wrapper in Python)."""

    clone: int
    wait4: int
    munmap: int
    setsid: int
    close_range: int
    pause: int
    ioprio_set: int
    ioprio_get: int
    openat2: int
    userfaultfd: int
    pidfd_getfd: int
    madvise: int


@dataclass(frozen=True)
class Arch:
    """One architecture: every per-machine fact the converter and the clone snapshot use.

    Registers travel in three forms: CRIU's image entries (protobuf objects in the converter,
    ``pb2dict`` dicts when the clone rewrites images), the ptrace regset bytes of
    ``PTRACE_GETREGSET NT_PRSTATUS`` (``struct user_regs_struct``; opaque to callers, read
    through the accessors below), and the core's ``elf_gregset_t``.
    """

    #: ``uname -m``
    name: str
    #: the ELF header's e_machine
    e_machine: int
    #: CRIU's ``core_entry.march`` enum name (images/core.proto)
    criu_mtype: str
    #: the core_entry field holding this architecture's registers
    thread_info_field: str
    page_size: int
    syscalls: Syscalls
    #: the instruction that enters a syscall; the clone snapshot finds one in the target
    syscall_insn: bytes
    #: the alignment of every instruction (1: x86's variable length, 4: arm64's)
    insn_align: int

    # --- the converter: CRIU images -> core notes -------------------------------------------
    #: ``core_gregs(core_entry, read)``: the elf_gregset_t of NT_PRSTATUS, as the kernel's core
    #: shows the thread (CRIU's syscall-restart rewind undone)
    core_gregs: Callable[[Any, ReadMemory], bytes]
    #: ``thread_notes(core_entry, layout)``: the FP notes following each thread's NT_PRSTATUS
    thread_notes: Callable[[Any, CpuLayout], list[Note]]
    #: ``process_notes(layout)``: notes after every thread's (elf_coredump_extra_notes_write())
    process_notes: Callable[[CpuLayout], list[Note]]
    #: ``wait_sigmask(gregs, read)``: for a thread the core shows (*gregs*, its elf_gregset_t)
    #: interrupted in a syscall that installed a temporary blocked mask while it sleeps
    #: (rt_sigsuspend, ppoll, pselect6, epoll_pwait, epoll_pwait2), the address of that mask
    #: argument and whether it is pselect6's indirect ``{sigset ptr, size}`` pair; else None
    wait_sigmask: Callable[[bytes, ReadMemory], tuple[int, bool] | None]
    #: ``cpu_layout(recorded)``: the layout the sidecar recorded (a JSON object), or this host's
    #: when None; :raises ValueError: a malformed record
    cpu_layout: Callable[[Mapping[str, Any] | None], CpuLayout]

    # --- the clone snapshot: ptrace registers ---------------------------------------------------
    #: (note type, largest size) of the FP regsets, the most complete first: the snapshot
    #: saves per thread the first one the CPU has, the others empty (:attr:`image_thread_info`
    #: derives them from it)
    fp_regsets: tuple[tuple[int, int], ...]
    #: (note type, largest size) of the other regsets the snapshot saves per thread for
    #: :attr:`image_thread_info`: registers CRIU's thread_info holds apart from the general
    #: ones (aarch64's NT_ARM_TLS; x86_64's fs_base is a general register)
    thread_regsets: tuple[tuple[int, int], ...]
    #: program counter
    pc: Callable[[bytes], int]
    #: the syscall a thread stopped in (or at the exit of), or None
    syscall_nr: Callable[[bytes], int | None]
    #: the syscall return register, signed
    syscall_result: Callable[[bytes], int]
    #: ``syscall_regs(base, ip, nr, args)``: *base* set up to run syscall *nr* at *ip*, with no
    #: restart logic on the way out
    syscall_regs: Callable[[bytes, int, int, Sequence[int]], bytes]
    #: ``resume_regs(regs, signal_pending)``: the registers that continue a stopped thread as
    #: the kernel would after a stop with no signal handler
    resume_regs: Callable[[bytes, bool], bytes]
    #: ``image_thread_info(template, regs, fpstate, other, same_thread)``: CRIU's
    #: :attr:`thread_info_field` entry (pb2dict form) for a thread stopped with ptrace *regs*,
    #: :attr:`fp_regsets` buffers *fpstate* and :attr:`thread_regsets` buffers *other*, from
    #: *template* (CRIU's entry of the clone), whose state only CRIU can read (x86 CET) is kept
    #: when *same_thread* (the clone's)
    image_thread_info: Callable[
        [Mapping[str, Any], bytes, Sequence[bytes], Sequence[bytes], bool], dict[str, Any]
    ]

    def find_syscall_insn(self, code: bytes) -> int:
        """Offset of the first :attr:`syscall_insn` in *code* (read from an aligned address)
        that is an instruction of its own (at an :attr:`insn_align` boundary), or -1."""
        at = code.find(self.syscall_insn)
        while at >= 0 and at % self.insn_align:
            at = code.find(self.syscall_insn, at + 1)
        return at


# --- notes laid out alike on every 64-bit little-endian Linux ------------------------------------

#: struct elf_prpsinfo pr_psargs (ELF_PRARGSZ)
ELF_PRARGSZ = 80


@cache
def prstatus_struct(gregset_size: int) -> struct.Struct:
    """struct elf_prstatus around an elf_gregset_t of *gregset_size* bytes: elf_siginfo
    {si_signo, si_code, si_errno}, short pr_cursig (+2 pad), pr_sigpend, pr_sighold, pr_pid,
    pr_ppid, pr_pgrp, pr_sid, 4 x struct __kernel_old_timeval, pr_reg, int pr_fpvalid (+pad)."""
    return struct.Struct(f"<3ih2xQQ4i8q{gregset_size}si4x")


# struct elf_prpsinfo: char pr_state, pr_sname, pr_zomb, pr_nice; (4 pad) unsigned long pr_flag;
# __kernel_uid_t pr_uid, pr_gid (u32); pid_t pr_pid, pr_ppid, pr_pgrp, pr_sid;
# char pr_fname[16], pr_psargs[80]
PRPSINFO = struct.Struct("<bcbb4xQII4i16s80s")
assert PRPSINFO.size == 0x88

# siginfo_t is 128 bytes; a coredump's NT_SIGINFO is copy_siginfo_to_external() of the
# fatal signal: si_signo, si_errno, si_code then the union.
SIGINFO = struct.Struct("<3i116x")
assert SIGINFO.size == 128


@dataclass(frozen=True)
class PrStatus:
    """struct elf_prstatus (include/linux/elfcore.h), *pr_reg* already packed by the arch.

    CRIU does not save CPU times; the orchestrator records them in the sidecar (zeros
    otherwise)."""

    si_signo: int
    pr_cursig: int
    pr_sigpend: int
    pr_sighold: int
    pr_pid: int
    pr_ppid: int
    pr_pgrp: int
    pr_sid: int
    pr_reg: bytes
    pr_fpvalid: int = 1
    #: pr_utime, pr_stime, pr_cutime, pr_cstime in microseconds
    times: tuple[int, int, int, int] = (0, 0, 0, 0)

    def pack(self) -> bytes:
        tv = [x for us in self.times for x in divmod(us, 1_000_000)]
        return prstatus_struct(len(self.pr_reg)).pack(
            self.si_signo, 0, 0, self.pr_cursig, self.pr_sigpend, self.pr_sighold,
            self.pr_pid, self.pr_ppid, self.pr_pgrp, self.pr_sid, *tv, self.pr_reg,
            self.pr_fpvalid,
        )  # fmt: skip


@dataclass(frozen=True)
class PrPsInfo:
    """struct elf_prpsinfo, filled as fs/binfmt_elf.c:fill_psinfo() does."""

    pr_state: int
    pr_sname: bytes
    pr_zomb: int
    pr_nice: int
    pr_flag: int
    pr_uid: int
    pr_gid: int
    pr_pid: int
    pr_ppid: int
    pr_pgrp: int
    pr_sid: int
    pr_fname: bytes
    pr_psargs: bytes

    def pack(self) -> bytes:
        return PRPSINFO.pack(
            self.pr_state, self.pr_sname, self.pr_zomb, self.pr_nice, self.pr_flag,
            self.pr_uid, self.pr_gid, self.pr_pid, self.pr_ppid, self.pr_pgrp, self.pr_sid,
            self.pr_fname, self.pr_psargs,
        )  # fmt: skip


def pack_siginfo(signo: int, code: int = 0) -> bytes:
    return SIGINFO.pack(signo, 0, code)

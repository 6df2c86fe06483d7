"""aarch64 (arm64): every register and syscall fact of the project for 64-bit Arm, in one module.

Sources: arch/arm64/include/uapi/asm/ptrace.h (struct user_pt_regs, user_fpsimd_state,
user_hwdebug_state), arch/arm64/kernel/ptrace.c (aarch64_regsets: the notes after each
NT_PRSTATUS, in that order; fpr_get, tls_get, hw_break_get, system_call_get,
tagged_addr_ctrl_get), arch/arm64/kernel/signal.c (do_signal(): the syscall-restart rewind),
include/uapi/asm-generic/unistd.h (syscall numbers), fs/binfmt_elf.c (fill_thread_core_info());
CRIU's images/core-aarch64.proto, criu/arch/aarch64/crtools.c and
compel/arch/aarch64/src/lib/infect.c.

The restart rule differs from x86's: arm64's do_signal() rewinds an interrupted restartable
syscall (pc - 4 onto the ``svc``, x0 = orig_x0) *before* get_signal(), so both a ptrace stop
(what CRIU saves) and a core dump (which runs inside get_signal()) see the rewound registers,
and do_signal()'s forget_syscall() has set the syscall number to NO_SYSCALL (-1) for both.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from converters.arch.base import (
    EINTR,
    ERESTART_RESTARTBLOCK,
    ERESTARTNOHAND,
    ERESTARTNOINTR,
    ERESTARTSYS,
    Arch,
    CpuLayout,
    ReadMemory,
    Syscalls,
    prstatus_struct,
)
from converters.elf import NT, Note

#: EM_AARCH64 (include/uapi/linux/elf-em.h)
E_MACHINE: Final = 183
#: the page size of the kernels whose images convert: 4 KiB (Debian's, most distributions');
#: a 16/64 KiB-page kernel's images are refused by AT_PAGESZ (see converters/model.py)
PAGE_SIZE: Final = 4096

# include/uapi/linux/elf.h
NT_ARM_TLS: Final = 0x401
NT_ARM_HW_BREAK: Final = 0x402
NT_ARM_HW_WATCH: Final = 0x403
NT_ARM_SYSTEM_CALL: Final = 0x404
NT_ARM_TAGGED_ADDR_CTRL: Final = 0x409

# --- general registers ----------------------------------------------------------------------------

#: struct user_pt_regs {u64 regs[31]; u64 sp; u64 pc; u64 pstate;} = elf_gregset_t
USER_REGS: Final = (*(f"x{i}" for i in range(31)), "sp", "pc", "pstate")
USER_PT_REGS: Final = struct.Struct("<34Q")
assert USER_PT_REGS.size == 272
#: sizeof(struct elf_prstatus) on arm64
assert prstatus_struct(USER_PT_REGS.size).size == 0x188
#: svc #0 (compel's code_syscall); arm64 syscalls take x8 = number, x0..x5 = arguments
SVC_0: Final = b"\x01\x00\x00\xd4"
SYSCALL_ARGS: Final = ("x0", "x1", "x2", "x3", "x4", "x5")
_U64: Final = (1 << 64) - 1

Regs = dict[str, int]


def unpack_regs(raw: bytes) -> Regs:
    """user_pt_regs bytes (ptrace NT_PRSTATUS, elf_gregset_t) by register name."""
    return dict(zip(USER_REGS, USER_PT_REGS.unpack_from(raw), strict=True))


def pack_regs(regs: Mapping[str, int]) -> bytes:
    """user_pt_regs from registers by name (absent ones 0)."""
    return USER_PT_REGS.pack(*(regs.get(n, 0) & _U64 for n in USER_REGS))


def _signed(v: int) -> int:
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


class SYS:
    """arm64 syscall numbers (include/uapi/asm-generic/unistd.h) used here. arm64 has no
    pause(): the clone waits in ppoll(NULL, 0, NULL, NULL), as glibc's pause() does there."""

    ioprio_set: Final = 30
    ioprio_get: Final = 31
    ppoll: Final = 73
    setsid: Final = 157
    munmap: Final = 215
    clone: Final = 220
    madvise: Final = 233
    wait4: Final = 260
    userfaultfd: Final = 282
    close_range: Final = 436
    openat2: Final = 437
    pidfd_getfd: Final = 438
    restart_syscall: Final = 128
    epoll_pwait: Final = 22
    pselect6: Final = 72
    rt_sigsuspend: Final = 133
    epoll_pwait2: Final = 441


_RESTARTED: Final = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)


def core_gregs(core: Any, read: ReadMemory) -> bytes:
    """elf_gregset_t of a thread as the kernel's core shows it, from CRIU's image.

    compel_get_task_regs() on arm64 stores what PTRACE_GETREGSET NT_PRSTATUS returns, and the
    kernel's core shows the same registers (see the module's docstring): no rewind to undo.
    """
    gp = core.ti_aarch64.gpregs
    regs = dict(zip(USER_REGS[:31], (int(r) for r in gp.regs), strict=False))
    regs.update(sp=int(gp.sp), pc=int(gp.pc), pstate=int(gp.pstate))
    return pack_regs(regs)


#: The syscalls that sleep with their sigset argument as the blocked mask (kernel/signal.c
#: sigsuspend(); fs/select.c and fs/eventpoll.c set_user_sigmask()), with that argument's
#: register; pselect6's 6th points to a ``{const sigset_t *, size_t}`` pair.
_MASKED_WAITS: Final = {
    SYS.rt_sigsuspend: ("x0", False),
    SYS.ppoll: ("x3", False),
    SYS.pselect6: ("x5", True),
    SYS.epoll_pwait: ("x4", False),
    SYS.epoll_pwait2: ("x4", False),
}


def wait_sigmask(gregs: bytes, read: ReadMemory) -> tuple[int, bool] | None:
    """The temporary mask argument of a thread sleeping in a masked wait (x8 its number).

    A restartable one (-ERESTARTNOHAND) shows rewound, pc on the ``svc`` and x0 = orig_x0 (the
    module's docstring), so every argument register holds its argument; one failing with -EINTR
    (epoll_pwait) shows pc past the ``svc`` and x0 = -EINTR, its mask argument (x4) intact.
    """
    regs = unpack_regs(gregs)
    found = _MASKED_WAITS.get(regs["x8"])
    if found is None:
        return None
    rewound = read(regs["pc"], 4) == SVC_0
    interrupted = _signed(regs["x0"]) == -EINTR and read(regs["pc"] - 4, 4) == SVC_0
    if not (rewound or interrupted):
        return None
    return regs[found[0]], found[1]


# --- FP/SIMD and the other regsets of a core ------------------------------------------------------

#: struct user_fpsimd_state {__uint128_t vregs[32]; u32 fpsr, fpcr, __reserved[2];}:
#: NT_PRFPREG's payload (fpr_get() copies the whole struct)
FPSIMD: Final = struct.Struct("<64QII8x")
assert FPSIMD.size == 528
#: NT_ARM_TLS: tls_get() writes tpidr_el0, then tpidr2_el0 (SME's; zeros on a CPU without SME,
#: and CRIU does not save it): 16 bytes, measured in the 6.1 guest's core
TLS: Final = struct.Struct("<QQ")
#: struct user_hwdebug_state {u32 dbg_info; u32 pad; struct {u64 addr; u32 ctrl; u32 pad;}
#: dbg_regs[16];}: hw_break_get()/hw_watch_get() write dbg_info then ARM_MAX_BRP/WRP (16) slots
HWDEBUG_HEAD: Final = struct.Struct("<II")
HWDEBUG_SLOTS: Final = 16
HWDEBUG_SIZE: Final = HWDEBUG_HEAD.size + HWDEBUG_SLOTS * 16
assert HWDEBUG_SIZE == 264
#: NT_ARM_SYSTEM_CALL: int syscallno; NO_SYSCALL (-1) for every thread the core shows outside
#: a syscall-stop (kernel_entry sets it on every entry, do_signal()'s forget_syscall() after)
SYSTEM_CALL: Final = struct.Struct("<i")
NO_SYSCALL: Final = -1
#: NT_ARM_TAGGED_ADDR_CTRL: long, the prctl(PR_GET_TAGGED_ADDR_CTRL) value (0 unless the
#: program opted in; CRIU does not save it)
TAGGED_ADDR_CTRL: Final = struct.Struct("<q")


@dataclass(frozen=True)
class DebugLayout:
    """The dumping CPU's hardware debug resources, as ``dbg_info`` of NT_ARM_HW_BREAK and
    NT_ARM_HW_WATCH shows them: ``debug_arch << 8 | slots`` (ptrace_hbp_get_resource_info()).

    CRIU's images do not hold them; a live dump records the host's, and images from elsewhere
    get the defaults, an ARMv8.0 debug architecture with 6 breakpoints and 4 watchpoints
    (Cortex-A53/A57/A72, Neoverse N1, and the emulated guest of scripts/arm64-guest.sh).
    """

    break_info: int = 0x606
    watch_info: int = 0x604

    def as_dict(self) -> dict[str, Any]:
        return {"break_info": self.break_info, "watch_info": self.watch_info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DebugLayout:
        """:raises ValueError: not what :meth:`as_dict` writes."""
        try:
            return cls(int(d["break_info"]), int(d["watch_info"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"is not an arm64 debug layout ({type(e).__name__}: {e})") from e


def pack_fpsimd(fp: Any) -> bytes:
    """NT_PRFPREG payload from CRIU's ``user_aarch64_fpsimd_context_entry`` (vregs as 64
    u64 halves, low first, as the __uint128_t array lies in memory)."""
    vregs = [int(v) & _U64 for v in fp.vregs][:64]
    vregs += [0] * (64 - len(vregs))
    return FPSIMD.pack(*vregs, int(fp.fpsr), int(fp.fpcr))


def _hwdebug(info: int) -> bytes:
    return HWDEBUG_HEAD.pack(info, 0) + bytes(HWDEBUG_SIZE - HWDEBUG_HEAD.size)


def thread_notes(core: Any, layout: CpuLayout) -> list[Note]:
    """The notes after NT_PRSTATUS, in aarch64_regsets' order (fill_thread_core_info()): those
    of a CPU without SVE, SME, pointer authentication or MTE, whose regsets fail there and are
    left out of the core."""
    assert isinstance(layout, DebugLayout)
    ti = core.ti_aarch64
    return [
        Note(b"CORE", NT.PRFPREG, pack_fpsimd(ti.fpsimd)),
        Note(b"LINUX", NT_ARM_TLS, TLS.pack(int(ti.tls) & _U64, 0)),
        Note(b"LINUX", NT_ARM_HW_BREAK, _hwdebug(layout.break_info)),
        Note(b"LINUX", NT_ARM_HW_WATCH, _hwdebug(layout.watch_info)),
        Note(b"LINUX", NT_ARM_SYSTEM_CALL, SYSTEM_CALL.pack(NO_SYSCALL)),
        Note(b"LINUX", NT_ARM_TAGGED_ADDR_CTRL, TAGGED_ADDR_CTRL.pack(0)),
    ]


def process_notes(layout: CpuLayout) -> list[Note]:
    """arm64 writes no architecture note once per core (no elf_coredump_extra_notes_write())."""
    return []


def cpu_layout(recorded: Mapping[str, Any] | None) -> DebugLayout:
    return DebugLayout() if recorded is None else DebugLayout.from_dict(recorded)


# --- ptrace registers (the clone snapshot) --------------------------------------------------------


def pc(raw: bytes) -> int:
    return unpack_regs(raw)["pc"]


def syscall_nr(raw: bytes) -> int | None:
    """The syscall a thread stopped in: x8 holds its number when pc is just past an ``svc``
    that a restart rewound onto (user_pt_regs has no orig_x0 or syscallno; callers pair this
    with the instruction at pc)."""
    nr = unpack_regs(raw)["x8"]
    return nr if nr < 1024 else None


def syscall_result(raw: bytes) -> int:
    return _signed(unpack_regs(raw)["x0"])


def syscall_regs(base: bytes, ip: int, nr: int, args: Sequence[int]) -> bytes:
    regs = unpack_regs(base)
    regs["pc"] = ip
    regs["x8"] = nr
    for name, value in zip(SYSCALL_ARGS, args, strict=False):
        regs[name] = value
    for name in SYSCALL_ARGS[len(args) :]:
        regs[name] = 0
    return pack_regs(regs)


def resume_regs(raw: bytes, signal_pending: bool = False) -> bytes:
    """arm64 rewinds a restartable syscall before the stop (do_signal()), so the registers a
    stopped thread shows already re-enter it."""
    return raw


def image_thread_info(
    template: Mapping[str, Any],
    regs: bytes,
    fpstate: Sequence[bytes],
    other: Sequence[bytes],
    same_thread: bool,
) -> dict[str, Any]:
    """CRIU's ``thread_info_aarch64`` for a thread stopped with ptrace *regs*, NT_PRFPREG
    *fpstate* and NT_ARM_TLS *other*, from the clone's entry *template* (clear_tid_addr and PAC
    keys kept). The tls is the thread's own tpidr_el0: the template's is the clone's, which
    copy_thread() (arch/arm64/kernel/process.c) gave it from the injecting thread."""
    info = dict(template)
    tls = other[0] if other else b""
    if len(tls) >= 8:
        info["tls"] = int.from_bytes(tls[:8], "little")
    r = unpack_regs(regs)
    info["gpregs"] = {
        "regs": [r[f"x{i}"] for i in range(31)],
        "sp": r["sp"],
        "pc": r["pc"],
        "pstate": r["pstate"],
    }
    (fp,) = fpstate
    if len(fp) >= FPSIMD.size:
        *vregs, fpsr, fpcr = FPSIMD.unpack_from(fp)
        info["fpsimd"] = {"vregs": vregs, "fpsr": fpsr, "fpcr": fpcr}
    return info


ARCH: Final = Arch(
    name="aarch64",
    e_machine=E_MACHINE,
    criu_mtype="AARCH64",
    thread_info_field="ti_aarch64",
    page_size=PAGE_SIZE,
    syscalls=Syscalls(
        clone=SYS.clone,
        wait4=SYS.wait4,
        munmap=SYS.munmap,
        setsid=SYS.setsid,
        close_range=SYS.close_range,
        pause=SYS.ppoll,
        ioprio_set=SYS.ioprio_set,
        ioprio_get=SYS.ioprio_get,
        openat2=SYS.openat2,
        userfaultfd=SYS.userfaultfd,
        pidfd_getfd=SYS.pidfd_getfd,
        madvise=SYS.madvise,
    ),
    syscall_insn=SVC_0,
    insn_align=4,
    core_gregs=core_gregs,
    wait_sigmask=wait_sigmask,
    thread_notes=thread_notes,
    process_notes=process_notes,
    cpu_layout=cpu_layout,
    fp_regsets=((NT.PRFPREG, FPSIMD.size),),
    # NT_ARM_TLS: tpidr_el0, and tpidr2_el0 where the kernel has SME (tls_get())
    thread_regsets=((NT_ARM_TLS, 16),),
    pc=pc,
    syscall_nr=syscall_nr,
    syscall_result=syscall_result,
    syscall_regs=syscall_regs,
    resume_regs=resume_regs,
    image_thread_info=image_thread_info,
)

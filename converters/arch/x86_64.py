"""x86_64: every register, XSAVE, CPUID and syscall fact of the project, in one module.

Sources: arch/x86/include/asm/user_64.h (struct user_regs_struct, user_i387_struct),
arch/x86/include/asm/fpu/types.h (struct xregs_state and the XSAVE component structs),
arch/x86/kernel/fpu/xstate.c (copy_xstate_to_uabi_buf(), check_xstate_against_struct(),
dump_xsave_layout_desc()), arch/x86/entry/syscalls/syscall_64.tbl, include/linux/errno.h,
arch/x86/kernel/signal.c (arch_do_signal_or_restart()); CRIU's images/core-x86.proto,
criu/arch/x86/crtools.c and compel/arch/x86/src/lib/infect.c.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
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

#: EM_X86_64 (include/uapi/linux/elf-em.h)
E_MACHINE: Final = 62
PAGE_SIZE: Final = 4096
#: NT_X86_XSTATE; NT_X86_XSAVE_LAYOUT, written by cores since Linux 6.12 (commit ba386777a30b
#: "x86/elf: Add a new FPU buffer layout info to x86 core files")
NT_X86_XSTATE: Final = 0x202
NT_X86_XSAVE_LAYOUT: Final = 0x205

# --- general registers ----------------------------------------------------------------------------

# struct user_regs_struct, in order (arch/x86/include/asm/user_64.h). CRIU's
# user_x86_regs_entry uses the same order with "bp"/"ax"-style names.
USER_REGS: Final = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)  # fmt: skip
#: CRIU's field name for each user_regs_struct member it names differently
CRIU_REG_NAMES: Final = {
    "rbp": "bp", "rbx": "bx", "rax": "ax", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di",
    "orig_rax": "orig_ax", "rip": "ip", "eflags": "flags", "rsp": "sp",
}  # fmt: skip
USER_REGS_STRUCT: Final = struct.Struct("<27Q")
assert USER_REGS_STRUCT.size == 216
assert prstatus_struct(USER_REGS_STRUCT.size).size == 0x150
#: syscall argument registers, in order (arch/x86/entry/entry_64.S)
SYSCALL_ARGS: Final = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
SYSCALL_INSN: Final = b"\x0f\x05"
_U64: Final = (1 << 64) - 1

Regs = dict[str, int]


def unpack_regs(raw: bytes) -> Regs:
    """user_regs_struct bytes (ptrace, elf_gregset_t) by member name."""
    return dict(zip(USER_REGS, USER_REGS_STRUCT.unpack_from(raw), strict=True))


def pack_regs(regs: Mapping[str, int]) -> bytes:
    """user_regs_struct from members by name (absent ones 0)."""
    return USER_REGS_STRUCT.pack(*(regs.get(n, 0) & _U64 for n in USER_REGS))


def _signed(v: int) -> int:
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


# --- syscall restarts -----------------------------------------------------------------------------

_REWOUND: Final = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND)


class SYS:
    """x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) used here."""

    read: Final = 0
    poll: Final = 7
    munmap: Final = 11
    madvise: Final = 28
    select: Final = 23
    pause: Final = 34
    clone: Final = 56
    wait4: Final = 61
    setsid: Final = 112
    rt_sigsuspend: Final = 130
    restart_syscall: Final = 219
    epoll_wait: Final = 232
    ioprio_set: Final = 251
    ioprio_get: Final = 252
    pselect6: Final = 270
    ppoll: Final = 271
    epoll_pwait: Final = 281
    userfaultfd: Final = 323
    close_range: Final = 436
    openat2: Final = 437
    pidfd_getfd: Final = 438
    epoll_pwait2: Final = 441


#: syscalls that return -ERESTARTNOHAND when a signal interrupts them (kernel/signal.c
#: sys_pause/sys_rt_sigsuspend, fs/select.c poll/select family)
_RESTARTNOHAND: Final = {
    SYS.pause,
    SYS.rt_sigsuspend,
    SYS.poll,
    SYS.select,
    SYS.pselect6,
    SYS.ppoll,
}
#: Syscalls that fail with EINTR on *any* wake-up, even a ptrace interrupt (fs/eventpoll.c:
#: ep_poll() returns -EINTR whenever signal_pending(); signal(7) lists epoll_wait among the calls
#: a SIGSTOP/SIGCONT cycle interrupts), and the register holding their timeout (int, ms).
_EINTR_ON_INTERRUPT: Final = {SYS.epoll_wait: "r10", SYS.epoll_pwait: "r10"}


def core_gregs(core: Any, read: ReadMemory) -> bytes:
    """elf_gregset_t of a thread as the kernel's core shows it, from CRIU's image.

    CRIU's compel (compel_get_task_regs()) stores a thread interrupted in a restartable syscall
    with rip rewound onto the syscall instruction and rax = orig_rax (or __NR_restart_syscall),
    so that the restored task re-enters it. The kernel's core shows the state before that
    rewind: rip after the instruction, rax = -ERESTART*.
    """
    gp = core.thread_info.gpregs
    regs = {name: int(getattr(gp, CRIU_REG_NAMES.get(name, name))) for name in USER_REGS}
    orig = _signed(regs["orig_rax"])
    rax = regs["rax"]
    in_syscall = orig >= 0 and rax in (regs["orig_rax"], SYS.restart_syscall)
    if in_syscall and read(regs["rip"], 2) == SYSCALL_INSN:
        regs["rip"] += 2
        if rax == SYS.restart_syscall:
            # what arch_do_signal_or_restart() resumes -ERESTART_RESTARTBLOCK with; a thread
            # already in restart_syscall gets it again (each restart_block fn returns it when
            # interrupted: hrtimer_nanosleep_restart(), futex_wait_restart(), do_restart_poll())
            err = ERESTART_RESTARTBLOCK
        elif orig in _RESTARTNOHAND:
            err = ERESTARTNOHAND
        else:
            err = ERESTARTSYS
        regs["rax"] = -err & _U64
    return pack_regs(regs)


#: The syscalls that sleep with their sigset argument as the blocked mask (kernel/signal.c
#: sigsuspend(); fs/select.c and fs/eventpoll.c set_user_sigmask()), kept there while they
#: return -ERESTARTNOHAND or -EINTR (restore_saved_sigmask_unless()), with the register of that
#: argument (rdi, rsi, rdx, r10, r8, r9 = arguments 1..6): pselect6's 6th points to a
#: ``{const sigset_t *, size_t}`` pair.
_MASKED_WAITS: Final = {
    SYS.rt_sigsuspend: ("rdi", False),
    SYS.ppoll: ("r10", False),
    SYS.pselect6: ("r9", True),
    SYS.epoll_pwait: ("r8", False),
    SYS.epoll_pwait2: ("r8", False),
}


def wait_sigmask(gregs: bytes, read: ReadMemory) -> tuple[int, bool] | None:
    """The temporary mask argument of a thread sleeping in a masked wait, from the registers
    :func:`core_gregs` returns (the kernel's view: orig_rax the syscall, rax -ERESTARTNOHAND
    or -EINTR while the temporary mask is installed)."""
    regs = unpack_regs(gregs)
    found = _MASKED_WAITS.get(regs["orig_rax"])
    if found is None or -_signed(regs["rax"]) not in (EINTR, ERESTARTNOHAND):
        return None
    return regs[found[0]], found[1]


# One register read straight from the raw struct: the freeze asks these of every thread.
_REG: Final = struct.Struct("<Q")
_RIP: Final = USER_REGS.index("rip") * 8
_ORIG_RAX: Final = USER_REGS.index("orig_rax") * 8
_RAX: Final = USER_REGS.index("rax") * 8
_S64: Final = struct.Struct("<q")


def pc(raw: bytes) -> int:
    return int(_REG.unpack_from(raw, _RIP)[0])


def syscall_nr(raw: bytes) -> int | None:
    """The syscall a thread is stopped in (or at the exit of): orig_rax holds its number."""
    nr = int(_S64.unpack_from(raw, _ORIG_RAX)[0])
    return nr if nr >= 0 else None


def syscall_result(raw: bytes) -> int:
    return int(_S64.unpack_from(raw, _RAX)[0])


def syscall_regs(base: bytes, ip: int, nr: int, args: Sequence[int]) -> bytes:
    regs = unpack_regs(base)
    regs["rip"] = ip
    regs["rax"] = nr
    # As compel's parasite_setup_regs(): no restart logic may rewrite rax/rip on the way out.
    regs["orig_rax"] = _U64
    for name, value in zip(SYSCALL_ARGS, args, strict=False):
        regs[name] = value
    return pack_regs(regs)


def _rewind_restartable(regs: Regs, out: Regs, err: int) -> bool:
    """Set *out* to re-enter the syscall *regs* was interrupted in, for the -ERESTART* codes
    the kernel's own signal path restarts (arch_do_signal_or_restart() without a handler);
    False for any other *err*."""
    if err not in _REWOUND:
        return False
    out["rax"] = regs["orig_rax"]
    out["rip"] = regs["rip"] - 2
    return True


def resume_regs(raw: bytes, signal_pending: bool = False) -> bytes:
    """The registers that continue *raw* as the kernel would after a stop with no signal.

    An interrupted syscall is restarted, as arch/x86/kernel/signal.c:
    ``arch_do_signal_or_restart()`` does when no handler runs: back to the ``syscall``
    instruction, with rax the syscall number, or ``restart_syscall`` for -ERESTART_RESTARTBLOCK
    (nanosleep, futex with timeout: the kernel's per-thread restart block, untouched by an
    injected syscall, then resumes the remaining wait). The clone snapshot must do it by hand
    because the injecting thread resumes from a syscall-exit stop, where that logic does not run.

    An ``epoll_wait``/``epoll_pwait`` with no timeout that a ptrace interrupt made fail with
    EINTR is restarted too, unless a signal is pending for the thread (*signal_pending*: then the
    EINTR is the program's, as its handler runs next). With a finite timeout it keeps its EINTR:
    restarting would stretch the wait, and the program cannot tell this EINTR from a
    SIGSTOP/SIGCONT one.
    """
    regs = unpack_regs(raw)
    out = dict(regs)
    if _signed(regs["orig_rax"]) < 0:
        return raw
    err = -_signed(regs["rax"])
    if _rewind_restartable(regs, out, err):
        return pack_regs(out)
    if err == ERESTART_RESTARTBLOCK:
        out["rax"] = SYS.restart_syscall
        out["rip"] = regs["rip"] - 2
    elif err == EINTR and not signal_pending:
        timeout_reg = _EINTR_ON_INTERRUPT.get(regs["orig_rax"])
        if timeout_reg is not None and regs[timeout_reg] & 0xFFFFFFFF >= 1 << 31:
            out["rax"] = regs["orig_rax"]
            out["rip"] = regs["rip"] - 2
    return pack_regs(out)


def criu_regs(raw: bytes) -> bytes:
    """The registers CRIU's images hold for a thread stopped with *raw*.

    compel/arch/x86/src/lib/infect.c: ``compel_get_task_regs()`` rewinds a restartable syscall
    (rip - 2, rax = orig_rax). It turns -ERESTART_RESTARTBLOCK into -EINTR, which
    :func:`core_gregs` could not tell from a real EINTR; the clone snapshot's images get the
    kernel's own resumption instead (arch_do_signal_or_restart(): rip - 2, rax =
    __NR_restart_syscall), which :func:`core_gregs` turns back into -ERESTART_RESTARTBLOCK.
    """
    regs = unpack_regs(raw)
    if _signed(regs["orig_rax"]) < 0:
        return raw
    out = dict(regs)
    err = -_signed(regs["rax"])
    if not _rewind_restartable(regs, out, err) and err == ERESTART_RESTARTBLOCK:
        out["rax"] = SYS.restart_syscall
        out["rip"] = regs["rip"] - 2
    return pack_regs(out)


def image_gpregs(raw: bytes) -> dict[str, Any]:
    """CRIU's ``user_x86_regs_entry`` (pb2dict form) for a thread stopped with ptrace *raw*."""
    regs = unpack_regs(criu_regs(raw))
    out: dict[str, Any] = {CRIU_REG_NAMES.get(k, k): v for k, v in regs.items()}
    out["mode"] = "NATIVE"
    return out


# --- FXSAVE and XSAVE -----------------------------------------------------------------------------

# struct user_i387_struct (the fxsave image) = NT_PRFPREG payload
FXSAVE: Final = struct.Struct("<4HQQII128s256s96s")
assert FXSAVE.size == 512
_FXSAVE_HEAD: Final = struct.Struct("<4HQQII")
_ST_SPACE: Final = struct.Struct("<32I")  # at 32: st_space
_XMM_SPACE: Final = struct.Struct("<64I")  # at 160: xmm_space
#: offset of sw_reserved in the fxsave image; the first u64 holds XCR0 in ptrace/core XSTATE
#: buffers (USER_XSTATE_XCR0_WORD in arch/x86/include/asm/user.h)
SW_RESERVED_OFFSET: Final = 464
XSAVE_HEADER_OFFSET: Final = 512
XSAVE_HEADER: Final = struct.Struct("<QQ48x")  # xfeatures (XSTATE_BV), xcomp_bv, reserved
assert XSAVE_HEADER.size == 64
#: large enough for any XSAVE area a kernel reports to ptrace (AMX tile data included)
XSTATE_BUF_SIZE: Final = 1 << 15

# struct x86_xfeat_component (include/uapi/linux/elf.h, NT_X86_XSAVE_LAYOUT)
XFEAT_COMPONENT: Final = struct.Struct("<4I")

# XSAVE feature numbers (arch/x86/include/asm/fpu/types.h enum xfeature)
XFEATURE_FP: Final = 0
XFEATURE_SSE: Final = 1
XFEATURE_YMM: Final = 2
XFEATURE_BNDREGS: Final = 3
XFEATURE_BNDCSR: Final = 4
XFEATURE_OPMASK: Final = 5
XFEATURE_ZMM_HI256: Final = 6
XFEATURE_HI16_ZMM: Final = 7
XFEATURE_PKRU: Final = 9


@dataclass(frozen=True)
class XsaveComponent:
    """One user XSAVE component: its feature number, CRIU's user_x86_xsave_entry field, and its
    layout, whose size is the kernel struct's (check_xstate_against_struct() in xstate.c checks
    CPUID's size against the same structs)."""

    feature: int
    criu_field: str
    #: struct format character of the image's elements (``I``: u32, ``Q``: u64) and their count
    elem: str
    count: int

    @property
    def layout(self) -> struct.Struct:
        return _array(self.elem, self.count)


#: Every component CRIU 4.2 saves (criu/arch/x86/crtools.c: assign_xsave(); the image holds
#: sizeof(struct) / sizeof(element) entries, XSAVE_PB_NELEMS()).
XSAVE_COMPONENTS: Final = (
    # struct ymmh_struct { u32 ymmh_space[64]; }: 256 bytes
    XsaveComponent(XFEATURE_YMM, "ymmh_space", "I", 64),
    # struct mpx_bndreg_state { struct mpx_bndreg bndreg[4]; }: 4 x (lower, upper u64) = 64
    XsaveComponent(XFEATURE_BNDREGS, "bndreg_state", "Q", 8),
    # struct mpx_bndcsr_state: union of struct mpx_bndcsr {u64 bndcfgu, bndstatus} (16 bytes)
    # and u8 pad_to_64_bytes[64]: the component is 64 bytes, BNDCSR's 16 first
    XsaveComponent(XFEATURE_BNDCSR, "bndcsr_state", "Q", 8),
    # struct avx_512_opmask_state { u64 opmask_reg[8]; }: 64
    XsaveComponent(XFEATURE_OPMASK, "opmask_reg", "Q", 8),
    # struct avx_512_zmm_uppers_state { struct reg_256_bit zmm_upper[16]; }: 512
    XsaveComponent(XFEATURE_ZMM_HI256, "zmm_upper", "Q", 64),
    # struct avx_512_hi16_state { struct reg_512_bit hi16_zmm[16]; }: 1024
    XsaveComponent(XFEATURE_HI16_ZMM, "hi16_zmm", "Q", 128),
    # struct pkru_state { u32 pkru; u32 pad; }: 8
    XsaveComponent(XFEATURE_PKRU, "pkru", "I", 2),
)
XFEATURE_XTILE_CFG: Final = 17
XFEATURE_XTILE_DATA: Final = 18
XFEATURE_APX: Final = 19
#: features the kernel's XSAVE user buffers (ptrace, NT_X86_XSTATE) lay out when the CPU has
#: them (XFEATURE_MASK_USER_SUPPORTED, arch/x86/include/asm/fpu/xstate.h): CRIU's components,
#: and AMX tile state and APX registers, which CRIU 4.2 does not save (they read as init state)
USER_FEATURES: Final = (
    (1 << XFEATURE_FP)
    | (1 << XFEATURE_SSE)
    | sum(1 << c.feature for c in XSAVE_COMPONENTS)
    | (1 << XFEATURE_XTILE_CFG)
    | (1 << XFEATURE_XTILE_DATA)
    | (1 << XFEATURE_APX)
)
#: the features whose state CRIU's images hold
SAVED_FEATURES: Final = (
    (1 << XFEATURE_FP) | (1 << XFEATURE_SSE) | sum(1 << c.feature for c in XSAVE_COMPONENTS)
)


@cache
def _array(elem: str, count: int) -> struct.Struct:
    return struct.Struct(f"<{count}{elem}")


def _fixed(values: Any, elem: str, count: int) -> bytes:
    """*count* integers of struct type *elem* from *values*, cut or zero-padded."""
    layout = _array(elem, count)
    mask = (1 << (8 * layout.size // count)) - 1
    vals = [int(v) & mask for v in values][:count]
    return layout.pack(*vals, *([0] * (count - len(vals))))


def pack_fxsave(fp: Any) -> bytes:
    """NT_PRFPREG payload from CRIU's ``user_x86_fpregs_entry``; sw_reserved stays zero, as
    the kernel's xfpregs_get() leaves it."""
    return FXSAVE.pack(
        fp.cwd & 0xFFFF, fp.swd & 0xFFFF, fp.twd & 0xFFFF, fp.fop & 0xFFFF, fp.rip, fp.rdp,
        fp.mxcsr, fp.mxcsr_mask, _fixed(fp.st_space, "I", 32), _fixed(fp.xmm_space, "I", 64),
        bytes(96),
    )  # fmt: skip


@dataclass(frozen=True)
class XsaveLayout:
    """Where each XSAVE component sits in the standard (non-compacted) format on a CPU.

    ``components`` holds (feature, offset, size); ``xcr0`` is the user feature mask.
    """

    xcr0: int
    components: tuple[tuple[int, int, int], ...]

    @property
    def size(self) -> int:
        end = XSAVE_HEADER_OFFSET + XSAVE_HEADER.size
        for _, off, size in self.components:
            end = max(end, off + size)
        return end

    def offset(self, feature: int) -> int | None:
        return next((off for f, off, _ in self.components if f == feature), None)

    def as_dict(self) -> dict[str, Any]:
        return {"xcr0": self.xcr0, "components": [list(c) for c in self.components]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> XsaveLayout:
        """:raises ValueError: not what :meth:`as_dict` writes."""
        try:
            comps = tuple((int(a), int(b), int(c)) for a, b, c in d["components"])
            return cls(int(d["xcr0"]), comps)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"is not an XSAVE layout ({type(e).__name__}: {e})") from e

    def pack_layout_note(self) -> bytes:
        """NT_X86_XSAVE_LAYOUT payload, as dump_xsave_layout_desc() writes it (flags 0)."""
        return b"".join(XFEAT_COMPONENT.pack(f, size, off, 0) for f, off, size in self.components)


def pack_xstate(fp: Any, layout: XsaveLayout) -> bytes:
    """NT_X86_XSTATE payload: the uabi XSAVE buffer copy_xstate_to_uabi_buf() produces.

    Components absent from CRIU's image (or from xstate_bv) stay in their init state, zeros.
    """
    buf = bytearray(layout.size)
    buf[0:512] = pack_fxsave(fp)
    struct.pack_into("<Q", buf, SW_RESERVED_OFFSET, layout.xcr0)
    xs = fp.xsave if fp.HasField("xsave") else None
    saved = layout.xcr0 & SAVED_FEATURES
    xstate_bv = int(xs.xstate_bv) & saved if xs is not None else 0b11 & saved
    XSAVE_HEADER.pack_into(buf, XSAVE_HEADER_OFFSET, xstate_bv, 0)
    if xs is None:
        return bytes(buf)
    tables = {c.feature: c for c in XSAVE_COMPONENTS}
    for feature, off, size in layout.components:
        comp = tables.get(feature)
        if comp is not None and xstate_bv & (1 << feature):
            chunk = _fixed(getattr(xs, comp.criu_field), comp.elem, comp.count)[:size]
            buf[off : off + len(chunk)] = chunk
    return bytes(buf)


def thread_notes(core: Any, layout: CpuLayout) -> list[Note]:
    """NT_PRFPREG and NT_X86_XSTATE of one thread (fill_thread_core_info())."""
    assert isinstance(layout, XsaveLayout)
    ti = core.thread_info
    if not ti.HasField("fpregs"):
        return []
    return [
        Note(b"CORE", NT.PRFPREG, pack_fxsave(ti.fpregs)),
        Note(b"LINUX", NT_X86_XSTATE, pack_xstate(ti.fpregs, layout)),
    ]


def process_notes(layout: CpuLayout) -> list[Note]:
    """NT_X86_XSAVE_LAYOUT, written since Linux 6.12 (elf_coredump_extra_notes_write())."""
    assert isinstance(layout, XsaveLayout)
    if not layout.components:
        return []
    return [Note(b"LINUX", NT_X86_XSAVE_LAYOUT, layout.pack_layout_note())]


def cpu_layout(recorded: Mapping[str, Any] | None) -> XsaveLayout:
    return host_xsave_layout() if recorded is None else XsaveLayout.from_dict(recorded)


def image_fpregs(
    regsets: Sequence[bytes], criu_saved: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """CRIU's ``user_x86_fpregs_entry`` (with ``xsave``) from the XSAVE regset, or from the
    FXSAVE one on a CPU without XSAVE, or None without FPU state. The snapshot reads only the
    first regset of :data:`ARCH`'s ``fp_regsets`` the CPU has: the FXSAVE image is the legacy
    region of the XSAVE area, its first 512 bytes (Intel SDM vol. 1, 13.4.1; a live test
    compares the two regsets of one thread). CET state comes from its own regset, not from the
    XSAVE user buffer: kept from *criu_saved*."""
    xstate, fxsave = regsets
    area = xstate if len(xstate) >= 512 else fxsave
    if len(area) < 512:
        return None
    cwd, swd, twd, fop, rip, rdp, mxcsr, mxcsr_mask = _FXSAVE_HEAD.unpack_from(area, 0)
    out: dict[str, Any] = {
        "cwd": cwd, "swd": swd, "twd": twd, "fop": fop, "rip": rip, "rdp": rdp,
        "mxcsr": mxcsr, "mxcsr_mask": mxcsr_mask,
        "st_space": list(_ST_SPACE.unpack_from(area, 32)),
        "xmm_space": list(_XMM_SPACE.unpack_from(area, 160)),
    }  # fmt: skip
    if len(xstate) > XSAVE_HEADER_OFFSET:
        out["xsave"] = _image_xsave(xstate)
        cet = ((criu_saved or {}).get("xsave") or {}).get("cet")
        if cet is not None:
            out["xsave"]["cet"] = cet
    return out


def image_thread_info(
    template: Mapping[str, Any],
    regs: bytes,
    fpstate: Sequence[bytes],
    other: Sequence[bytes],
    same_thread: bool,
) -> dict[str, Any]:
    """CRIU's ``thread_info_x86`` for a thread stopped with ptrace *regs* and FP regsets
    *fpstate*, from the clone's entry *template* (no *other* regsets: fs_base and gs_base are
    general registers)."""
    info = dict(template)
    info["gpregs"] = image_gpregs(regs)
    fp = image_fpregs(fpstate, template.get("fpregs") if same_thread else None)
    if fp is not None:
        info["fpregs"] = fp
    return info


def _image_xsave(x: bytes) -> dict[str, Any]:
    """CRIU's ``user_x86_xsave_entry`` from a standard-format XSAVE buffer, each component
    where this CPU puts it (CPUID leaf 0xD: the offsets differ between CPU vendors)."""
    (xcr0,) = struct.unpack_from("<Q", x, SW_RESERVED_OFFSET)
    (bv,) = struct.unpack_from("<Q", x, XSAVE_HEADER_OFFSET)
    out: dict[str, Any] = {"xstate_bv": bv}
    layout = host_xsave_layout()
    for comp in XSAVE_COMPONENTS:
        offset = layout.offset(comp.feature)
        if xcr0 & (1 << comp.feature) and offset and len(x) >= offset + comp.layout.size:
            out[comp.criu_field] = list(comp.layout.unpack_from(x, offset))
    return out


# --- the host CPU's layout -----------------------------------------------------------------------

# void cpuid(u32 leaf, u32 subleaf, u32 out[4]) (SysV ABI: edi, esi, rdx), since Python has no
# other way to execute CPUID: push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE: Final = bytes.fromhex("534989d089f889f10fa24189004189580441894808418950" + "0c5bc3")
# u64 xgetbv0(void): xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx; ret
_XGETBV_CODE: Final = bytes.fromhex("31c90f01d048c1e22048" + "09d0c3")
#: CPUID.1:ECX.OSXSAVE
_OSXSAVE: Final = 1 << 27


@cache
def _machine_code() -> tuple[Any, Any, mmap.mmap]:
    """cpuid() and xgetbv0() callables and the executable page holding them (kept together)."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CPUID_CODE + _XGETBV_CODE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(base)
    xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + len(_CPUID_CODE))
    return cpuid, xgetbv, page


def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID *leaf*.*subleaf* on this CPU."""
    fn, _, _ = _machine_code()
    out = (ctypes.c_uint32 * 4)()
    fn(leaf, subleaf, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]


@cache
def host_xsave_layout() -> XsaveLayout:
    """This CPU's user XSAVE layout: XCR0 via XGETBV and offsets via CPUID leaf 0xD, as the
    kernel's fpu__init_system_xstate() reads them.

    Falls back to the fxsave-only layout on another machine or where the sandbox forbids it.
    """
    if platform.machine() != "x86_64":
        return XsaveLayout(0b11, ())
    try:
        _, xgetbv, _ = _machine_code()
        if not cpuid(1, 0)[2] & _OSXSAVE:
            return XsaveLayout(0b11, ())
        xcr0 = int(xgetbv()) & USER_FEATURES
        comps = []
        for feature in range(2, 64):
            if xcr0 & (1 << feature):
                size, offset, _, _ = cpuid(0xD, feature)
                comps.append((feature, offset, size))
        return XsaveLayout(xcr0, tuple(comps))
    except (OSError, ValueError):
        return XsaveLayout(0b11, ())


ARCH: Final = Arch(
    name="x86_64",
    e_machine=E_MACHINE,
    criu_mtype="X86_64",
    thread_info_field="thread_info",
    page_size=PAGE_SIZE,
    syscalls=Syscalls(
        clone=SYS.clone,
        wait4=SYS.wait4,
        munmap=SYS.munmap,
        setsid=SYS.setsid,
        close_range=SYS.close_range,
        pause=SYS.pause,
        ioprio_set=SYS.ioprio_set,
        ioprio_get=SYS.ioprio_get,
        openat2=SYS.openat2,
        userfaultfd=SYS.userfaultfd,
        pidfd_getfd=SYS.pidfd_getfd,
        madvise=SYS.madvise,
    ),
    syscall_insn=SYSCALL_INSN,
    insn_align=1,
    core_gregs=core_gregs,
    wait_sigmask=wait_sigmask,
    thread_notes=thread_notes,
    process_notes=process_notes,
    cpu_layout=cpu_layout,
    fp_regsets=((NT_X86_XSTATE, XSTATE_BUF_SIZE), (NT.PRFPREG, FXSAVE.size)),
    thread_regsets=(),
    pc=pc,
    syscall_nr=syscall_nr,
    syscall_result=syscall_result,
    syscall_regs=syscall_regs,
    resume_regs=resume_regs,
    image_thread_info=image_thread_info,
)

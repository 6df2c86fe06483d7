"""x86_64 note payloads, laid out as the kernel lays them out.

Sources: include/uapi/linux/elfcore.h and include/linux/elfcore.h (struct elf_prstatus,
elf_prpsinfo), arch/x86/include/asm/user_64.h (struct user_regs_struct, user_i387_struct),
arch/x86/include/asm/fpu/types.h (struct xregs_state), and arch/x86/kernel/fpu/xstate.c
(copy_xstate_to_uabi_buf(), dump_xsave_layout_desc()).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any

# struct user_regs_struct, in order (arch/x86/include/asm/user_64.h). CRIU's
# user_x86_regs_entry uses the same order with "bp"/"ax"-style names.
USER_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)  # fmt: skip
#: CRIU's field name for each user_regs_struct member
CRIU_REG_NAMES = {
    "rbp": "bp", "rbx": "bx", "rax": "ax", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di",
    "orig_rax": "orig_ax", "rip": "ip", "eflags": "flags", "rsp": "sp",
}  # fmt: skip
USER_REGS_STRUCT = struct.Struct("<27Q")
assert USER_REGS_STRUCT.size == 216

# struct elf_prstatus: elf_siginfo{si_signo, si_code, si_errno}, short pr_cursig (+2 pad),
# pr_sigpend, pr_sighold, pr_pid, pr_ppid, pr_pgrp, pr_sid, 4 x struct __kernel_old_timeval,
# elf_gregset_t pr_reg, int pr_fpvalid (+4 pad)
PRSTATUS = struct.Struct("<3ih2xQQ4i8q216si4x")
assert PRSTATUS.size == 0x150

# struct elf_prpsinfo: char pr_state, pr_sname, pr_zomb, pr_nice; (4 pad) unsigned long pr_flag;
# __kernel_uid_t pr_uid, pr_gid (u32 on x86_64); pid_t pr_pid, pr_ppid, pr_pgrp, pr_sid;
# char pr_fname[16], pr_psargs[80]
PRPSINFO = struct.Struct("<bcbb4xQII4i16s80s")
assert PRPSINFO.size == 0x88
ELF_PRARGSZ = 80

# siginfo_t is 128 bytes; a coredump's NT_SIGINFO is copy_siginfo_to_external() of the
# fatal signal: si_signo, si_errno, si_code then the union.
SIGINFO = struct.Struct("<3i116x")
assert SIGINFO.size == 128

# struct user_i387_struct (the fxsave image) = NT_PRFPREG payload
FXSAVE = struct.Struct("<4HQQII128s256s96s")
assert FXSAVE.size == 512
#: offset of sw_reserved in the fxsave image; the first u64 holds XCR0 in ptrace/core XSTATE
#: buffers (USER_XSTATE_XCR0_WORD in arch/x86/include/asm/user.h)
SW_RESERVED_OFFSET = 464
XSAVE_HEADER_OFFSET = 512
XSAVE_HEADER = struct.Struct("<QQ48x")  # xfeatures, xcomp_bv, reserved
assert XSAVE_HEADER.size == 64

# struct x86_xfeat_component (include/uapi/linux/elf.h, NT_X86_XSAVE_LAYOUT)
XFEAT_COMPONENT = struct.Struct("<4I")

# XSAVE feature numbers (arch/x86/include/asm/fpu/types.h enum xfeature)
XFEATURE_YMM = 2
XFEATURE_BNDREGS = 3
XFEATURE_BNDCSR = 4
XFEATURE_OPMASK = 5
XFEATURE_ZMM_HI256 = 6
XFEATURE_HI16_ZMM = 7
XFEATURE_PKRU = 9
#: features that ptrace/coredumps show user space (XFEATURE_MASK_USER_SUPPORTED minus
#: dynamic AMX state, which CRIU 4.2 does not save)
USER_FEATURES = (
    (1 << 0) | (1 << 1) | (1 << XFEATURE_YMM) | (1 << XFEATURE_BNDREGS) | (1 << XFEATURE_BNDCSR)
    | (1 << XFEATURE_OPMASK) | (1 << XFEATURE_ZMM_HI256) | (1 << XFEATURE_HI16_ZMM)
    | (1 << XFEATURE_PKRU)
)  # fmt: skip


def gpregs_tuple(gpregs: Any) -> dict[str, int]:
    """CRIU's ``user_x86_regs_entry`` as a dict keyed by user_regs_struct names."""
    return {name: int(getattr(gpregs, CRIU_REG_NAMES.get(name, name))) for name in USER_REGS}


def pack_user_regs(regs: dict[str, int]) -> bytes:
    return USER_REGS_STRUCT.pack(*(regs[n] & 0xFFFFFFFFFFFFFFFF for n in USER_REGS))


@dataclass(frozen=True)
class PrStatus:
    """struct elf_prstatus (include/linux/elfcore.h).

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
        return PRSTATUS.pack(
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


def _u32s(values: Any, count: int) -> bytes:
    vals = [int(v) & 0xFFFFFFFF for v in values][:count]
    vals += [0] * (count - len(vals))
    return struct.pack(f"<{count}I", *vals)


def _u64s(values: Any, count: int) -> bytes:
    vals = [int(v) & 0xFFFFFFFFFFFFFFFF for v in values][:count]
    vals += [0] * (count - len(vals))
    return struct.pack(f"<{count}Q", *vals)


def pack_fxsave(fp: Any) -> bytes:
    """NT_PRFPREG payload from CRIU's ``user_x86_fpregs_entry``; sw_reserved stays zero, as
    the kernel's xfpregs_get() leaves it."""
    return FXSAVE.pack(
        fp.cwd & 0xFFFF, fp.swd & 0xFFFF, fp.twd & 0xFFFF, fp.fop & 0xFFFF, fp.rip, fp.rdp,
        fp.mxcsr, fp.mxcsr_mask, _u32s(fp.st_space, 32), _u32s(fp.xmm_space, 64), bytes(96),
    )  # fmt: skip


@dataclass(frozen=True)
class XsaveLayout:
    """Where each XSAVE component sits in the standard (non-compacted) format on a CPU.

    ``components`` maps feature number to (offset, size); ``xcr0`` is the user feature mask.
    """

    xcr0: int
    components: tuple[tuple[int, int, int], ...]  # (feature, offset, size)

    @property
    def size(self) -> int:
        end = XSAVE_HEADER_OFFSET + XSAVE_HEADER.size
        for _, off, size in self.components:
            end = max(end, off + size)
        return end

    def as_dict(self) -> dict[str, Any]:
        return {"xcr0": self.xcr0, "components": [list(c) for c in self.components]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> XsaveLayout:
        comps = tuple((int(a), int(b), int(c)) for a, b, c in d["components"])
        return cls(int(d["xcr0"]), comps)

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
    xstate_bv = int(xs.xstate_bv) & layout.xcr0 if xs is not None else 0b11 & layout.xcr0
    XSAVE_HEADER.pack_into(buf, XSAVE_HEADER_OFFSET, xstate_bv, 0)
    if xs is None:
        return bytes(buf)
    sources = {
        XFEATURE_YMM: _u32s(xs.ymmh_space, 64),
        XFEATURE_BNDREGS: _u64s(xs.bndreg_state, 8),
        XFEATURE_BNDCSR: _u64s(xs.bndcsr_state, 2),
        XFEATURE_OPMASK: _u64s(xs.opmask_reg, 8),
        XFEATURE_ZMM_HI256: _u64s(xs.zmm_upper, 64),
        XFEATURE_HI16_ZMM: _u64s(xs.hi16_zmm, 128),
        XFEATURE_PKRU: _u32s(xs.pkru, 2),
    }
    for feature, off, size in layout.components:
        data = sources.get(feature)
        if data is not None and xstate_bv & (1 << feature):
            chunk = data[:size]
            buf[off : off + len(chunk)] = chunk
    return bytes(buf)


# --- the host CPU's layout -----------------------------------------------------------------------

# void cpuid(u32 leaf, u32 subleaf, u32 out[4]): push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi;
# cpuid; mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("534989d089f889f10fa2418900418958044189480841895" + "00c5bc3")
# u64 xgetbv0(void): xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx; ret
_XGETBV_CODE = bytes.fromhex("31c90f01d048c1e22048" + "09d0c3")


@cache
def _machine_code() -> tuple[Any, Any, mmap.mmap]:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CPUID_CODE + _XGETBV_CODE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(base)
    xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + len(_CPUID_CODE))
    return cpuid, xgetbv, page


def _cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    cpuid, _, _ = _machine_code()
    out = (ctypes.c_uint32 * 4)()
    cpuid(leaf, subleaf, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]


@cache
def host_xsave_layout() -> XsaveLayout:
    """This CPU's user XSAVE layout: XCR0 via XGETBV and offsets via CPUID leaf 0xD, as the
    kernel's fpu__init_system_xstate() reads them.

    Falls back to the fxsave-only layout where the CPU or the sandbox forbids it.
    """
    try:
        _, xgetbv, _ = _machine_code()
        if not (_cpuid(1, 0)[2] & (1 << 27)):  # OSXSAVE
            return XsaveLayout(0b11, ())
        xcr0 = int(xgetbv()) & USER_FEATURES
        comps = []
        for feature in range(2, 64):
            if xcr0 & (1 << feature):
                size, offset, _, _ = _cpuid(0xD, feature)
                comps.append((feature, offset, size))
        return XsaveLayout(xcr0, tuple(comps))
    except (OSError, ValueError):
        return XsaveLayout(0b11, ())

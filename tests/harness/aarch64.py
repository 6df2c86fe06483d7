"""What the core reader and the comparator know of aarch64 (arm64) cores.

Deliberately independent of ``converters.arch``: this is the reference side of a differential
test, so a mistake in the product's tables must not be repeated here.
"""

from __future__ import annotations

import struct

from harness.machine import Machine, NoteField

#: struct user_pt_regs (arch/arm64/include/uapi/asm/ptrace.h): regs[31], sp, pc, pstate
USER_REGS = (*(f"x{i}" for i in range(31)), "sp", "pc", "pstate")

# struct elf_prstatus (include/linux/elfcore.h) with arm64's elf_gregset_t (34 u64)
PRSTATUS = struct.Struct("<3ih2xQQ4i8q34Qi4x")
assert PRSTATUS.size == 0x188
#: offsetof(struct elf_prstatus, pr_reg)
PR_REG_OFFSET = 112
# struct elf_prpsinfo (include/linux/elfcore.h): __kernel_uid_t is unsigned int on arm64
PRPSINFO = struct.Struct("<cbbb4xQII4i16s80s")
assert PRPSINFO.size == 0x88

#: struct user_fpsimd_state: __uint128_t vregs[32], u32 fpsr, fpcr, __reserved[2]
FPSIMD_FIELDS = (
    *[NoteField(16 * i, 16 * i + 16, f"v{i}") for i in range(32)],
    NoteField(512, 516, "fpsr"),
    NoteField(516, 520, "fpcr"),
    NoteField(520, 528, "__reserved"),
)
#: offset of dbg_regs[0].ctrl in struct user_hwdebug_state
HWDEBUG_CTRL0 = 16
#: struct user_hwdebug_state: u32 dbg_info, pad, then 16 x {u64 addr; u32 ctrl; u32 pad}
HWDEBUG_FIELDS = (
    NoteField(0, 4, "dbg_info"),
    NoteField(4, 8, "pad"),
    *[NoteField(8 + 16 * i, 24 + 16 * i, f"dbg_regs[{i}]") for i in range(16)],
)

# include/uapi/linux/elf.h
_NT_PRFPREG = 2
_NT_ARM_TLS = 0x401
_NT_ARM_HW_BREAK = 0x402
_NT_ARM_HW_WATCH = 0x403
_NT_ARM_SYSTEM_CALL = 0x404
_NT_ARM_TAGGED_ADDR_CTRL = 0x409

#: -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK (linux/errno.h)
ERESTART = frozenset((1 << 64) - e for e in (512, 513, 514, 516))

AARCH64 = Machine(
    e_machine="EM_AARCH64",
    user_regs=USER_REGS,
    prstatus=PRSTATUS,
    pr_reg_offset=PR_REG_OFFSET,
    prpsinfo=PRPSINFO,
    # AAPCS64's callee-saved x19-x28, the frame pointer x29, and what a blocked thread cannot
    # change: pc, sp, pstate
    nonvolatile_regs=(*(f"x{i}" for i in range(19, 30)), "sp", "pc", "pstate"),
    # arm64 returns in x0 and takes the number in x8; its restart rewind (do_signal()) puts
    # orig_x0 back in x0 before both a ptrace stop and a core dump
    syscall_return_reg="x0",
    syscall_nr_reg="x8",
    erestart=ERESTART,
    # the register notes after each NT_PRSTATUS (arch/arm64/kernel/ptrace.c: aarch64_regsets,
    # those whose regset_get succeeds on a CPU without SVE, SME, PAC or MTE)
    thread_notes={
        ("CORE", _NT_PRFPREG): ("NT_PRFPREG", FPSIMD_FIELDS),
        ("LINUX", _NT_ARM_TLS): (
            "NT_ARM_TLS",
            (NoteField(0, 8, "tpidr_el0"), NoteField(8, 16, "tpidr2_el0")),
        ),
        ("LINUX", _NT_ARM_HW_BREAK): ("NT_ARM_HW_BREAK", HWDEBUG_FIELDS),
        ("LINUX", _NT_ARM_HW_WATCH): ("NT_ARM_HW_WATCH", HWDEBUG_FIELDS),
        ("LINUX", _NT_ARM_SYSTEM_CALL): ("NT_ARM_SYSTEM_CALL", (NoteField(0, 4, "syscallno"),)),
        ("LINUX", _NT_ARM_TAGGED_ADDR_CTRL): (
            "NT_ARM_TAGGED_ADDR_CTRL",
            (NoteField(0, 8, "tagged_addr_ctrl"),),
        ),
    },
    process_notes={},
    # dbg_regs[0].ctrl of NT_ARM_HW_BREAK: the compel of CRIU 4.1.1 and 4.2.1 (not 3.17.1: the
    # fixtures' kernel cores have a clear slot) stops its parasite on a hardware breakpoint in
    # the thread it runs in (compel/arch/aarch64/src/lib/infect.c:
    # ptrace_set_breakpoint()), then only disables it (ptrace_flush_breakpoints(): ctrl =
    # 4-byte length 0xf << 5 | execute | EL0 2 << 1, enable bit 0). The kernel keeps that
    # perf breakpoint registered, and hw_break_get() (arch/arm64/kernel/ptrace.c) reports its
    # ctrl, 0x1e4, from then on. Measured in the emulated guest: the main thread's slot 0 is
    # zero before `criu dump --leave-running` of CRIU 4.2.1, 0x1e4 (address 0) after.
    set_by_criu={"NT_ARM_HW_BREAK": ((HWDEBUG_CTRL0, 0xE4), (HWDEBUG_CTRL0 + 1, 0x01))},
)

"""What the core reader and the comparator know of x86_64 cores.

Deliberately independent of ``converters.arch``: this is the reference side of a differential
test, so a mistake in the product's tables must not be repeated here.
"""

from __future__ import annotations

import struct

from harness.machine import Machine, NoteField

#: struct user_regs_struct (arch/x86/include/asm/user_64.h), in order.
USER_REGS = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)

# struct elf_prstatus (include/linux/elfcore.h): siginfo head, cursig, sigpend, sighold, pids,
# four struct __kernel_old_timeval, pr_reg (user_regs_struct), pr_fpvalid.
PRSTATUS = struct.Struct("<3ih2xQQ4i8q27Qi4x")
assert PRSTATUS.size == 0x150
#: offsetof(struct elf_prstatus, pr_reg)
PR_REG_OFFSET = 112
# struct elf_prpsinfo (include/linux/elfcore.h)
PRPSINFO = struct.Struct("<cbbb4xQII4i16s80s")
assert PRPSINFO.size == 0x88

#: Names for ranges of the FXSAVE image (NT_FPREGSET, and the first 512 bytes of XSTATE)
#: and of the XSAVE header and AVX state after it (arch/x86/include/asm/fpu/types.h).
FXSAVE_FIELDS = (
    NoteField(0, 2, "fcw"),
    NoteField(2, 4, "fsw"),
    NoteField(4, 6, "ftw"),
    NoteField(6, 8, "fop"),
    NoteField(8, 16, "fpu_ip"),
    NoteField(16, 24, "fpu_dp"),
    NoteField(24, 28, "mxcsr"),
    NoteField(28, 32, "mxcsr_mask"),
    *[NoteField(32 + 16 * i, 48 + 16 * i, f"st{i}") for i in range(8)],
    *[NoteField(160 + 16 * i, 176 + 16 * i, f"xmm{i}") for i in range(16)],
    NoteField(416, 464, "fxsave_reserved"),
    NoteField(464, 512, "sw_reserved(xstate_fx_sw_bytes)"),
    NoteField(512, 520, "xsave_header.xfeatures"),
    NoteField(520, 528, "xsave_header.xcomp_bv"),
    NoteField(528, 576, "xsave_header.reserved"),
    *[NoteField(576 + 16 * i, 592 + 16 * i, f"ymmh{i}") for i in range(16)],
)

#: NT_FPREGSET and NT_X86_XSTATE (include/uapi/linux/elf.h)
_NT_FPREGSET = 2
_NT_X86_XSTATE = 0x202
#: NT_X86_XSAVE_LAYOUT (include/uapi/linux/elf.h), once per core since Linux 6.11
#: (arch/x86/kernel/fpu/xstate.c: elf_coredump_extra_notes_write())
_NT_X86_XSAVE_LAYOUT = 0x205

#: -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK (linux/errno.h)
ERESTART = frozenset((1 << 64) - e for e in (512, 513, 514, 516))

X86_64 = Machine(
    e_machine="EM_X86_64",
    user_regs=USER_REGS,
    prstatus=PRSTATUS,
    pr_reg_offset=PR_REG_OFFSET,
    prpsinfo=PRPSINFO,
    # registers a blocked thread cannot change between two dumps (callee-saved, pointers,
    # segments)
    nonvolatile_regs=(
        "rip",
        "rsp",
        "rbp",
        "rbx",
        "r12",
        "r13",
        "r14",
        "r15",
        "fs_base",
        "gs_base",
        "cs",
        "ss",
        "eflags",
    ),
    syscall_return_reg="rax",
    syscall_nr_reg="orig_rax",
    erestart=ERESTART,
    # the register notes following each NT_PRSTATUS (arch/x86/kernel/ptrace.c: x86_64_regsets)
    thread_notes={
        ("CORE", _NT_FPREGSET): ("NT_FPREGSET", FXSAVE_FIELDS),
        ("LINUX", _NT_X86_XSTATE): ("NT_X86_XSTATE", FXSAVE_FIELDS),
    },
    process_notes={("LINUX", _NT_X86_XSAVE_LAYOUT): "NT_X86_XSAVE_LAYOUT"},
    # XSTATE_BV bit 0, "x87 state in use" (Intel's init optimisation, SDM vol. 1 13.6): CRIU's
    # parasite leaves it set, its x87 registers at their init values. Measured here: a `sleep`
    # reads 0xa2 through PTRACE_GETREGSET before `criu dump --leave-running`, 0xa3 after.
    set_by_criu={"NT_X86_XSTATE": ((512, 0x01),)},
)

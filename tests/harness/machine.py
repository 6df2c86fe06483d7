"""Per-architecture facts of the core reader and the comparator: one :class:`Machine` each.

An architecture is one module (``x86_64.py``) defining a :class:`Machine`, and one row in
:data:`harness.corefile.MACHINES`, keyed by the ELF header's ``e_machine``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: the fields before the timevals in struct elf_prstatus (include/linux/elfcore.h); the same on
#: every 64-bit architecture
PRSTATUS_HEAD = (
    "si_signo",
    "si_code",
    "si_errno",
    "pr_cursig",
    "pr_sigpend",
    "pr_sighold",
    "pr_pid",
    "pr_ppid",
    "pr_pgrp",
    "pr_sid",
)
#: struct elf_prpsinfo (include/linux/elfcore.h), in order
PRPSINFO_FIELDS = (
    "pr_state",
    "pr_sname",
    "pr_zomb",
    "pr_nice",
    "pr_flag",
    "pr_uid",
    "pr_gid",
    "pr_pid",
    "pr_ppid",
    "pr_pgrp",
    "pr_sid",
    "pr_fname",
    "pr_psargs",
)
#: four struct __kernel_old_timeval (pr_utime, pr_stime, pr_cutime, pr_cstime) between the head
#: and pr_reg
_TIMEVAL_WORDS = 8


@dataclass(frozen=True)
class NoteField:
    """A named byte range of a register note, to say which field two notes differ in."""

    lo: int
    hi: int
    name: str


@dataclass(frozen=True)
class Machine:
    """One architecture's core layout and what the comparator may tolerate in its registers."""

    #: pyelftools' name of the ELF header's e_machine, e.g. ``EM_X86_64``
    e_machine: str
    #: pr_reg's registers (the arch's user_regs_struct), in order
    user_regs: tuple[str, ...]
    #: struct elf_prstatus as one struct.Struct: PRSTATUS_HEAD, timevals, pr_reg, pr_fpvalid
    prstatus: struct.Struct
    #: offsetof(struct elf_prstatus, pr_reg), for tests that edit a register in a core
    pr_reg_offset: int
    #: struct elf_prpsinfo as one struct.Struct, fields in PRPSINFO_FIELDS order
    prpsinfo: struct.Struct
    #: registers a thread blocked in the kernel cannot change between two dumps
    nonvolatile_regs: tuple[str, ...]
    #: the register a syscall returns in, and the one keeping its number for a restart
    syscall_return_reg: str
    syscall_nr_reg: str
    #: the -ERESTART* values the kernel's core shows in syscall_return_reg for an interrupted call
    erestart: frozenset[int]
    #: the register notes after each NT_PRSTATUS: (owner, type) -> (name, field table)
    thread_notes: Mapping[tuple[str, int], tuple[str, tuple[NoteField, ...]]]
    #: architecture notes written once per core, compared byte for byte: (owner, type) -> name
    process_notes: Mapping[tuple[str, int], str]
    #: bits of a register note that a CRIU dump run inside the target sets, by note name:
    #: (byte offset, mask) pairs. The kernel's core of the target after ``criu dump
    #: --leave-running`` may have them where ours, from CRIU's images of the state before, has not.
    set_by_criu: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    @property
    def syscall_regs(self) -> tuple[str, str]:
        """The registers a syscall restart rewrites (compared apart from the others)."""
        return (self.syscall_return_reg, self.syscall_nr_reg)

    def parse_prstatus(self, desc: bytes) -> tuple[dict[str, int], dict[str, int]]:
        """Split an NT_PRSTATUS into (header fields, pr_reg by register name)."""
        v = self.prstatus.unpack(desc[: self.prstatus.size])
        head = dict(zip(PRSTATUS_HEAD, v[: len(PRSTATUS_HEAD)], strict=True))
        head["pr_fpvalid"] = v[-1]
        first = len(PRSTATUS_HEAD) + _TIMEVAL_WORDS
        regs = dict(zip(self.user_regs, v[first : first + len(self.user_regs)], strict=True))
        return head, regs

    def parse_prpsinfo(self, desc: bytes) -> dict[str, Any]:
        """Fields of an NT_PRPSINFO; pr_state as an int, the names without their NUL padding."""
        v = self.prpsinfo.unpack(desc[: self.prpsinfo.size])
        info: dict[str, Any] = dict(zip(PRPSINFO_FIELDS, v, strict=True))
        info["pr_state"] = v[0][0]
        info["pr_fname"] = info["pr_fname"].rstrip(b"\0")
        info["pr_psargs"] = info["pr_psargs"].rstrip(b"\0")
        return info

    def as_after_criu(self, note: str, ours: bytes | None, kernel: bytes | None) -> bytes | None:
        """*ours* with the :attr:`set_by_criu` bits of *note* that *kernel* has set."""
        if note not in self.set_by_criu or ours is None or kernel is None:
            return ours
        fixed = bytearray(ours)
        for offset, mask in self.set_by_criu[note]:
            if offset < len(ours) and offset < len(kernel):
                fixed[offset] |= kernel[offset] & mask
        return bytes(fixed)

    def field_name(self, note: str, offset: int) -> str:
        """The name of the field of register note *note* at byte *offset*."""
        table = next((t for n, t in self.thread_notes.values() if n == note), ())
        return next((f.name for f in table if f.lo <= offset < f.hi), f"byte {offset}")

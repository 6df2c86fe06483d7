"""Per-architecture facts: one module per machine, one row per module in :data:`ARCHES`.

Nothing outside this package names a register, an XSAVE component, a CPUID leaf or a syscall
number: the converter and the clone snapshot ask the :class:`~converters.arch.base.Arch` of the
images (:func:`by_criu_mtype`) or of this host (:func:`host`).

Adding an architecture (aarch64, say) is one module and one row:

1. ``converters/arch/aarch64.py`` ending in ``ARCH = Arch(...)`` that fills every field of
   :class:`~converters.arch.base.Arch`: names (``uname -m``, ELF e_machine, CRIU's
   ``core_entry.march`` name and the core_entry field holding its registers, ``ti_aarch64``),
   page size, the :class:`~converters.arch.base.Syscalls` numbers and the syscall instruction;
   for the converter the elf_gregset_t from CRIU's registers (undoing CRIU's syscall-restart
   rewind, as arch/arm64/kernel/signal.c restarts), the per-thread notes (NT_PRFPREG with
   ``struct user_fpsimd_state``, ...), the per-process notes, and a CPU layout record (an empty
   one when the notes need none); for the clone snapshot the ptrace regsets it saves and the
   register accessors and rewrites (pc, syscall number and result, restart, CRIU's view).
   Binary layouts go in that module beside a comment citing their kernel or CRIU source, with
   a size assert each.
2. Its ``ARCH`` added to :data:`ARCHES` below.
3. tests/test_arch.py: the size asserts against the kernel's, and the module's rows in the
   tables there.
"""

from __future__ import annotations

import platform
from typing import Final

from converters.arch import aarch64, x86_64
from converters.arch.base import Arch
from converters.errors import UnsupportedArchError

#: every supported architecture
ARCHES: Final[tuple[Arch, ...]] = (x86_64.ARCH, aarch64.ARCH)


def by_criu_mtype(mtype: str, path: str) -> Arch:
    """The architecture of CRIU's ``core_entry.march`` name *mtype* (read from image *path*).

    :raises UnsupportedArchError: no module for it.
    """
    for arch in ARCHES:
        if arch.criu_mtype == mtype:
            return arch
    raise UnsupportedArchError(path, mtype, [a.criu_mtype for a in ARCHES])


def host() -> Arch:
    """This machine's architecture.

    :raises UnsupportedArchError: no module for it.
    """
    machine = platform.machine()
    for arch in ARCHES:
        if arch.name == machine:
            return arch
    raise UnsupportedArchError("this host", machine, [a.name for a in ARCHES])


__all__ = ["ARCHES", "Arch", "by_criu_mtype", "host"]

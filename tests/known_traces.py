"""Differences from the kernel's core that the container and seccomp comparisons tolerate,
each named, on top of :func:`harness.compare.compare_cores`; the kernel-comparison suite
(tests/test_kernel_compare.py) shows the same on this machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Known converter defect on CPUs with AMX: the kernel writes an NT_X86_XSTATE of the full user
#: XSAVE size (AMX tile state included) and that size in the software-reserved bytes; ours
#: stops before the dynamic AMX components.
XSTATE_AMX = ("NT_X86_XSTATE: size ours 2688 kernel 11008", "sw_reserved(xstate_fx_sw_bytes)")
#: gdb's warning about that size, on the kernel's core only.
XSTATE_WARNING = "warning: Unexpected size of section `.reg-xstate/"
#: A trace ``criu dump --leave-running`` leaves in the thread that hosted its parasite, seen by
#: the kernel's later core: CRIU puts the FPU state back through ptrace, after which XSTATE_BV
#: has the x87 bit (0x1) set.
_CRIU_X87 = re.compile(
    r"NT_X86_XSTATE: xsave_header.xfeatures differs \(bytes 512..513\): "
    r"ours ([0-9a-f]{2}) kernel ([0-9a-f]{2})$"
)


def _x87_bit_only(diff: str) -> bool:
    m = _CRIU_X87.search(diff)
    return m is not None and int(m.group(2), 16) == int(m.group(1), 16) | 1


def without_known_traces(diffs: Iterable[str], method: str) -> list[str]:
    """*diffs* of :func:`compare_cores` without the known ones above (the x87 bit only when
    CRIU dumped the target itself, ``method`` "criu")."""
    out = [d for d in diffs if not any(known in d for known in XSTATE_AMX)]
    if method == "criu":
        out = [d for d in out if not _x87_bit_only(d)]
    return out


def without_xstate_warning(backtraces: str) -> list[str]:
    """gdb's backtraces, line by line, without its XSAVE size warning."""
    return [line for line in backtraces.splitlines() if not line.startswith(XSTATE_WARNING)]

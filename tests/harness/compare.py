"""The comparator: human-readable differences between our core and the kernel's (empty: equal).

:func:`compare_cores` runs every check of :data:`CHECKS` in turn; a check is a function
``(ours, kernel, options) -> list[str]``, so a new aspect is one function and one row. What may
differ between the two dumps of one process is explicit and narrow: the bytes of [vvar] (time
data) and each thread's 16 rseq cpu bytes (:class:`Tolerances`); rax/orig_rax are compared apart
(:func:`restart_diffs`), since a restarted syscall changes them the known way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from harness.corefile import AT, NT, PF, CoreView, FileEntry, parse_auxv, parse_nt_file
from harness.procstate import MapEntry, RseqArea

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Tolerances:
    """What a case lets differ between its two cores; everything else must be equal."""

    #: skip the bytes of [vvar]/[vvar_vclock]: time data the kernel updates (vvar_ranges())
    vvar: bool = True
    #: tolerate each thread's rseq cpu_id_start/cpu_id/node_id/mm_cid (RseqArea.volatile_ranges)
    rseq_cpu: bool = True
    #: rax may differ only as a restarted syscall (restart_diffs()); False: compare it strictly
    syscall_restart: bool = True


@dataclass
class CompareOptions:
    """What the checks of :data:`CHECKS` tolerate, resolved to address ranges."""

    skip_ranges: list[tuple[int, int]] = field(default_factory=list)
    volatile_ranges: list[tuple[int, int]] = field(default_factory=list)
    max_reports_per_segment: int = 4
    #: also compare the syscall registers (rax, orig_rax) strictly
    syscall_regs: bool = False


def vvar_ranges(maps: Sequence[MapEntry] | None, kernel: CoreView) -> list[tuple[int, int]]:
    """Address ranges of [vvar] and [vvar_vclock]: data pages the two dumps legitimately differ in.

    From /proc/PID/maps when given (checked against the kernel's NT_FILE, which never lists
    these special mappings); otherwise the read-only non-file segments directly below the vDSO
    (AT_SYSINFO_EHDR), where arch/x86/entry/vdso/vma.c:map_vdso() places them.
    """
    listed = {(f.start, f.end) for f in kernel.files}
    if maps is not None:
        found = [(m.start, m.end) for m in maps if m.name in ("[vvar]", "[vvar_vclock]")]
        return [r for r in found if r not in listed]
    vdso = dict(kernel.auxv).get(AT.SYSINFO_EHDR)
    ranges: list[tuple[int, int]] = []
    edge = vdso
    while edge is not None:
        below = next((ld for ld in kernel.loads if ld.end == edge), None)
        if below is None or below.flags != PF.R or (below.vaddr, below.end) in listed:
            break
        ranges.append((below.vaddr, below.end))
        edge = below.vaddr
    return ranges


def compare_cores(
    ours: CoreView,
    kernel: CoreView,
    *,
    skip_vvar: bool = True,
    maps: Sequence[MapEntry] | None = None,
    rseq: Mapping[int, RseqArea] | None = None,
    rax: bool = False,
) -> list[str]:
    """Human-readable differences between *ours* and the *kernel* core (empty: equal).

    Compared: thread ids (ours must list the main thread first), per-thread non-volatile
    registers, NT_PRSTATUS ids and signal fields, the register notes (FPREGSET, XSTATE), the
    note type sequence, PT_LOAD (vaddr, memsz, filesz, flags), bytes of every segment the kernel
    dumped, PRPSINFO, NT_AUXV, NT_FILE and the machine's per-core notes (XSAVE_LAYOUT).

    :param skip_vvar: do not compare the bytes of [vvar]/[vvar_vclock] (see :func:`vvar_ranges`).
    :param maps: /proc/PID/maps captured before the kernel dump (:attr:`Target.maps`).
    :param rseq: rseq areas (:attr:`Target.rseq`); their 16 cpu/node bytes per thread are
        tolerated, nothing else.
    :param rax: also compare the syscall registers (see :func:`compare_syscall_regs`).
    """
    opts = CompareOptions(syscall_regs=rax)
    if skip_vvar:
        opts.skip_ranges = vvar_ranges(maps, kernel)
    if rseq:
        opts.volatile_ranges = [r for area in rseq.values() for r in area.volatile_ranges()]
    return [diff for check in CHECKS for diff in check(ours, kernel, opts)]


def compare_with(
    ours: CoreView,
    kernel: CoreView,
    tolerances: Tolerances,
    *,
    maps: Sequence[MapEntry] | None,
    rseq: Mapping[int, RseqArea],
) -> list[str]:
    """:func:`compare_cores` under a case's *tolerances*.

    With ``tolerances.syscall_restart`` the syscall registers are left to
    :func:`restart_diffs`, which the caller runs too; without, they must be equal.
    """
    return compare_cores(
        ours,
        kernel,
        skip_vvar=tolerances.vvar,
        maps=maps,
        rseq=rseq if tolerances.rseq_cpu else None,
        rax=not tolerances.syscall_restart,
    )


def compare_syscall_regs(ours: CoreView, kernel: CoreView) -> list[str]:
    """Differences in the syscall registers (rax, orig_rax), reported apart: a restarted
    syscall changes rax."""
    out = []
    for k in kernel.threads:
        o = ours.thread(k.pid)
        if o is None:
            continue
        for reg in kernel.machine.syscall_regs:
            if o.regs[reg] != k.regs[reg]:
                ours_v, kernel_v = _signed(o.regs[reg]), _signed(k.regs[reg])
                out.append(f"thread {k.pid}: {reg} ours {ours_v} kernel {kernel_v}")
    return out


def restart_diffs(ours: CoreView, kernel: CoreView) -> list[str]:
    """Syscall-register differences other than the known restart trap.

    CRIU saves rax = orig_rax for a thread stopped in a restartable syscall, where the kernel's
    core holds -ERESTART*: that, and only that, is tolerated; orig_rax must be equal. A thread
    missing from ours is a difference too.
    """
    m = kernel.machine
    ret, nr = m.syscall_return_reg, m.syscall_nr_reg
    bad = []
    for k in kernel.threads:
        o = ours.thread(k.pid)
        if o is None:
            bad.append(f"thread {k.pid}: missing in ours")
            continue
        if o.regs[nr] != k.regs[nr]:
            bad.append(f"thread {k.pid}: {nr} ours {o.regs[nr]:#x} kernel {k.regs[nr]:#x}")
        if o.regs[ret] != k.regs[ret] and not (
            o.regs[ret] == o.regs[nr] and k.regs[ret] in m.erestart
        ):
            bad.append(f"thread {k.pid}: {ret} ours {o.regs[ret]:#x} kernel {k.regs[ret]:#x}")
    return bad


def register_diffs(ours: CoreView, kernel: CoreView) -> list[str]:
    """Every general register of every thread (by TID) compared, volatile ones included: for
    a target whose threads all sit blocked in syscalls nothing may differ but the syscall
    return register, and that only as :func:`restart_diffs` tolerates."""
    m = kernel.machine
    bad = restart_diffs(ours, kernel)
    for k in kernel.threads:
        o = ours.thread(k.pid)
        if o is None:
            continue
        for reg in m.user_regs:
            if reg != m.syscall_return_reg and o.regs[reg] != k.regs[reg]:
                bad.append(f"thread {k.pid}: {reg} ours {o.regs[reg]:#x} kernel {k.regs[reg]:#x}")
    return bad


#: the notes the kernel writes first, for the dumping thread and the process
#: (fs/binfmt_elf.c:fill_note_info(), write_note_info())
KERNEL_FIRST_NOTES = (NT.PRSTATUS, NT.PRPSINFO, NT.SIGINFO, NT.AUXV, NT.FILE)
#: how many leading notes (the dumping thread's and the process notes) must match exactly
_LEADING_NOTES = 7


def note_layout_diffs(ours: CoreView, kernel: CoreView) -> list[str]:
    """The note layout: the first notes' (owner, type) equal, the kernel's first notes as the
    kernel writes them, and as many notes in ours as in the kernel's core."""
    out = []
    o_head = [(n.owner, n.type) for n in ours.notes[:_LEADING_NOTES]]
    k_head = [(n.owner, n.type) for n in kernel.notes[:_LEADING_NOTES]]
    if o_head != k_head:
        out.append(f"notes: the first {_LEADING_NOTES} differ: ours {o_head} kernel {k_head}")
    first = [n.type for n in kernel.notes[: len(KERNEL_FIRST_NOTES)]]
    if first != list(KERNEL_FIRST_NOTES):
        out.append(f"notes: the kernel's core starts with {first}, not {KERNEL_FIRST_NOTES}")
    if len(ours.notes) != len(kernel.notes):
        out.append(f"notes: ours has {len(ours.notes)}, kernel {len(kernel.notes)}")
    return out


def _signed(value: int) -> str:
    s = value - (1 << 64) if value >= 1 << 63 else value
    return f"{value:#x}" if s >= 0 else f"{value:#x} ({s})"


#: the NT_PRSTATUS header fields a blocked thread keeps between two dumps
_PRSTATUS_COMPARED = ("pr_pid", "pr_ppid", "pr_pgrp", "pr_sid", "pr_sighold", "pr_cursig")


def _compare_threads(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    out = []
    o_ids = [t.pid for t in ours.threads]
    k_ids = [t.pid for t in kernel.threads]
    if set(o_ids) != set(k_ids):
        out.append(
            f"threads: only in ours {sorted(set(o_ids) - set(k_ids))}, "
            f"only in kernel {sorted(set(k_ids) - set(o_ids))}"
        )
    if len(o_ids) != len(set(o_ids)):
        out.append(f"threads: ours lists a thread twice: {o_ids}")
    main = kernel.prpsinfo.get("pr_pid")
    if o_ids and o_ids[0] != main:
        out.append(f"threads: ours lists tid {o_ids[0]} first, not the main thread {main}")
    machine = kernel.machine
    for k in kernel.threads:
        o = ours.thread(k.pid)
        if o is None:
            continue
        for reg in machine.nonvolatile_regs:
            if o.regs[reg] != k.regs[reg]:
                out.append(f"thread {k.pid}: {reg} ours {o.regs[reg]:#x} kernel {k.regs[reg]:#x}")
        for name in _PRSTATUS_COMPARED:
            if o.prstatus[name] != k.prstatus[name]:
                out.append(
                    f"thread {k.pid}: NT_PRSTATUS {name} ours {o.prstatus[name]:#x} "
                    f"kernel {k.prstatus[name]:#x}"
                )
        for note, _ in machine.thread_notes.values():
            theirs = k.notes.get(note)
            mine = machine.as_after_criu(note, o.notes.get(note), theirs)
            out += _diff_blob(kernel, f"thread {k.pid}: {note}", note, mine, theirs)
    return out


def _check_syscall_regs(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    return compare_syscall_regs(ours, kernel) if opts.syscall_regs else []


def _diff_blob(
    kernel_core: CoreView, what: str, note: str, ours: bytes | None, kernel: bytes | None
) -> list[str]:
    if ours == kernel:
        return []
    if ours is None or kernel is None:
        return [f"{what}: {'missing in ours' if ours is None else 'missing in the kernel core'}"]
    out = []
    if len(ours) != len(kernel):
        out.append(f"{what}: size ours {len(ours)} kernel {len(kernel)}")
    fields: dict[str, list[int]] = {}
    for i in range(min(len(ours), len(kernel))):
        if ours[i] != kernel[i]:
            fields.setdefault(kernel_core.machine.field_name(note, i), []).append(i)
    for name, offs in fields.items():
        lo, hi = offs[0], offs[-1] + 1
        out.append(
            f"{what}: {name} differs (bytes {lo}..{hi}): "
            f"ours {ours[lo:hi].hex()} kernel {kernel[lo:hi].hex()}"
        )
    return out


def _note_pattern(core: CoreView) -> list[str]:
    return [f"{n.owner}/{n.type_name}" for n in core.notes]


def _compare_note_sequence(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    o, k = _note_pattern(ours), _note_pattern(kernel)
    if o == k:
        return []
    i = next((i for i, (a, b) in enumerate(zip(o, k, strict=False)) if a != b), min(len(o), len(k)))
    return [
        f"notes: sequence differs at note {i}: ours {o[i : i + 3]} kernel {k[i : i + 3]} "
        f"({len(o)} notes in ours, {len(k)} in kernel)"
    ]


def _mapping_name(kernel: CoreView, vaddr: int) -> str:
    for f in kernel.files:
        if f.start <= vaddr < f.end:
            return f" ({f.name})"
    return ""


def _compare_loads(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    out = []
    o = {ld.vaddr: ld for ld in ours.loads}
    k = {ld.vaddr: ld for ld in kernel.loads}
    if len(ours.loads) != len(kernel.loads):
        out.append(f"PT_LOAD: ours has {len(ours.loads)}, kernel {len(kernel.loads)}")
    for vaddr in sorted(set(o) | set(k)):
        name = _mapping_name(kernel, vaddr)
        if vaddr not in o:
            out.append(f"PT_LOAD {k[vaddr].describe()}{name}: missing in ours")
        elif vaddr not in k:
            out.append(f"PT_LOAD {o[vaddr].describe()}{name}: only in ours")
        elif o[vaddr].key() != k[vaddr].key():
            out.append(f"PT_LOAD{name}: ours {o[vaddr].describe()} kernel {k[vaddr].describe()}")
    if [ld.vaddr for ld in ours.loads] != sorted(ld.vaddr for ld in ours.loads):
        out.append("PT_LOAD: ours is not in address order")
    return out


def _overlaps(lo: int, hi: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(a < hi and lo < b for a, b in ranges)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _compare_bytes(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    out = []
    o_loads = {ld.vaddr: ld for ld in ours.loads}
    for k in kernel.loads:
        o = o_loads.get(k.vaddr)
        if not k.filesz or o is None or not o.filesz:
            continue  # a missing or empty segment is reported by _compare_loads
        if _overlaps(k.vaddr, k.end, opts.skip_ranges):
            continue
        n = min(k.filesz, o.filesz)
        # Only ranges that hold data in either file can differ: holes read as zeros in both.
        span = _merge(
            [(a - k.vaddr, b - k.vaddr) for a, b in kernel.data_ranges(k)]
            + [(a - o.vaddr, b - o.vaddr) for a, b in ours.data_ranges(o)]
        )
        bad: list[tuple[int, int]] = []  # (relative offset, length) runs of differing bytes
        for lo, hi in span:
            lo, hi = lo & ~(PAGE_SIZE - 1), min(hi, n)
            for pos in range(lo, hi, _CHUNK):
                size = min(_CHUNK, hi - pos)
                a = ours.pread(o.offset + pos, size)
                b = kernel.pread(k.offset + pos, size)
                if a != b:
                    bad += _diff_runs(a, b, k.vaddr + pos, opts.volatile_ranges, pos)
        if bad:
            total = sum(length for _, length in bad)
            name = _mapping_name(kernel, k.vaddr)
            head = f"bytes {k.describe()}{name}: {total} bytes differ in {len(bad)} runs"
            samples = []
            for rel, length in bad[: opts.max_reports_per_segment]:
                show = min(length, 16)
                addr = k.vaddr + rel
                samples.append(
                    f"{addr:#x}+{length:#x}: ours {ours.pread(o.offset + rel, show).hex()} "
                    f"kernel {kernel.pread(k.offset + rel, show).hex()}"
                )
            out.append(head + "; " + "; ".join(samples))
    return out


def _diff_runs(
    a: bytes, b: bytes, vaddr: int, volatile: Sequence[tuple[int, int]], rel0: int
) -> list[tuple[int, int]]:
    """Runs (relative offset, length) where *a* and *b* differ outside the volatile ranges."""
    runs: list[tuple[int, int]] = []
    for page in range(0, len(a), PAGE_SIZE):
        pa, pb = a[page : page + PAGE_SIZE], b[page : page + PAGE_SIZE]
        if pa == pb:
            continue
        start = -1
        for i in range(len(pa)):
            addr = vaddr + page + i
            differs = pa[i] != pb[i] and not any(lo <= addr < hi for lo, hi in volatile)
            if differs and start < 0:
                start = i
            elif not differs and start >= 0:
                runs.append((rel0 + page + start, i - start))
                start = -1
        if start >= 0:
            runs.append((rel0 + page + start, len(pa) - start))
    return runs


_PRPSINFO_COMPARED = (
    "pr_pid",
    "pr_ppid",
    "pr_pgrp",
    "pr_sid",
    "pr_uid",
    "pr_gid",
    "pr_fname",
    "pr_psargs",
    "pr_nice",
)


def _compare_prpsinfo(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    out = []
    for name in _PRPSINFO_COMPARED:
        a, b = ours.prpsinfo.get(name), kernel.prpsinfo.get(name)
        if a != b:
            out.append(f"NT_PRPSINFO {name}: ours {a!r} kernel {b!r}")
    return out


def _compare_auxv(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    oa, ka = ours.note(NT.AUXV), kernel.note(NT.AUXV)
    if (oa and oa.desc) == (ka and ka.desc):
        return []
    if oa is None or ka is None:
        return [f"NT_AUXV: missing in {'ours' if oa is None else 'kernel'}"]
    op, kp = parse_auxv(oa.desc), parse_auxv(ka.desc)
    pairs = [
        f"#{i} ours {a} kernel {b}" for i, (a, b) in enumerate(zip(op, kp, strict=False)) if a != b
    ]
    return [
        f"NT_AUXV: differs (size ours {len(oa.desc)} kernel {len(ka.desc)}): "
        + "; ".join(pairs[:6])
    ]


def _compare_nt_file(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    of, kf = ours.note(NT.FILE), kernel.note(NT.FILE)
    if (of and of.desc) == (kf and kf.desc):
        return []
    if of is None or kf is None:
        return [f"NT_FILE: missing in {'ours' if of is None else 'kernel'}"]
    out = []
    ops, oe = parse_nt_file(of.desc)
    kps, ke = parse_nt_file(kf.desc)
    if ops != kps:
        out.append(f"NT_FILE: page size ours {ops} kernel {kps}")
    for e in sorted(set(ke) - set(oe), key=lambda e: e.start):
        out.append(f"NT_FILE: missing in ours: {_fmt_file(e)}")
    for e in sorted(set(oe) - set(ke), key=lambda e: e.start):
        out.append(f"NT_FILE: only in ours: {_fmt_file(e)}")
    if set(oe) == set(ke) and oe != ke:
        out.append("NT_FILE: same entries in a different order")
    if set(oe) == set(ke) and oe == ke and ops == kps:
        out.append("NT_FILE: same entries, different bytes (padding or trailer)")
    return out


def _compare_arch_notes(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    """The machine's once-per-core notes (x86_64: NT_X86_XSAVE_LAYOUT), byte for byte."""
    out = []
    for (owner, ntype), name in kernel.machine.process_notes.items():
        o = [n.desc for n in ours.notes if (n.owner, n.type) == (owner, ntype)]
        k = [n.desc for n in kernel.notes if (n.owner, n.type) == (owner, ntype)]
        if o != k:
            out.append(
                f"{name}: ours {len(o)} notes ({', '.join(d.hex()[:32] for d in o)}), "
                f"kernel {len(k)} ({', '.join(d.hex()[:32] for d in k)})"
            )
    return out


def _fmt_file(e: FileEntry) -> str:
    return f"{e.start:#x}-{e.end:#x} pgoff {e.pgoff:#x} {e.name}"


Check = Callable[[CoreView, CoreView, CompareOptions], list[str]]

#: every check :func:`compare_cores` runs, in report order
CHECKS: tuple[Check, ...] = (
    _compare_threads,
    _check_syscall_regs,
    _compare_note_sequence,
    _compare_loads,
    _compare_bytes,
    _compare_prpsinfo,
    _compare_auxv,
    _compare_nt_file,
    _compare_arch_notes,
)

"""converters.arch: the ARCHES table, x86_64's layouts against the kernel's, its register
conventions, and that no other module knows an x86 register, XSAVE component or CPUID leaf."""

from __future__ import annotations

import ast
import dataclasses
import errno
import re
import types
from pathlib import Path

import pytest
from pycriu.images import pb

from converters.arch import ARCHES, aarch64, by_criu_mtype, host, x86_64
from converters.arch.base import PRPSINFO, SIGINFO, Arch, prstatus_struct
from converters.elf import PAGE_SIZE
from converters.errors import UnsupportedArchError

ROOT = Path(__file__).resolve().parent.parent
U64 = (1 << 64) - 1

# --- the table ------------------------------------------------------------------------------------


#: fields an architecture may leave empty (x86_64 has no regsets beyond the FP ones to save)
MAY_BE_EMPTY = frozenset({"thread_regsets"})


def test_rows_fill_every_field() -> None:
    assert ARCHES, "no architecture"
    for arch in ARCHES:
        for f in dataclasses.fields(Arch):
            if f.name not in MAY_BE_EMPTY:
                assert getattr(arch, f.name) not in (None, "", ()), (arch.name, f.name)
    for key in ("name", "e_machine", "criu_mtype"):
        values = [getattr(a, key) for a in ARCHES]
        assert len(set(values)) == len(values), key


def test_one_page_size() -> None:
    """The converter lays out every core with one page size: an architecture with another
    (aarch64 with 64 KiB pages) needs it threaded through converters.elf and images first."""
    assert {a.page_size for a in ARCHES} == {PAGE_SIZE}


def test_lookup() -> None:
    assert by_criu_mtype("X86_64", "core-1.img") is x86_64.ARCH
    assert by_criu_mtype("AARCH64", "core-1.img") is aarch64.ARCH
    assert host().name == "x86_64"  # the reference machine
    with pytest.raises(UnsupportedArchError) as e:
        by_criu_mtype("PPC64", "core-7.img")
    assert str(e.value) == (
        "core-7.img: architecture PPC64 is not supported (supported: X86_64, AARCH64)"
    )


# --- x86_64 layouts against the kernel's ----------------------------------------------------------

#: sizeof() of each user XSAVE component's struct in arch/x86/include/asm/fpu/types.h, which
#: arch/x86/kernel/fpu/xstate.c:check_xstate_against_struct() holds CPUID's sizes to:
#: ymmh_struct, mpx_bndreg_state, mpx_bndcsr_state (padded to 64), avx_512_opmask_state,
#: avx_512_zmm_uppers_state, avx_512_hi16_state, pkru_state (pkru + pad)
KERNEL_XSAVE_SIZES = {2: 256, 3: 64, 4: 64, 5: 64, 6: 512, 7: 1024, 9: 8}


def test_xsave_components_are_the_kernels() -> None:
    table = {c.feature: c.layout.size for c in x86_64.XSAVE_COMPONENTS}
    assert table == KERNEL_XSAVE_SIZES


def test_xsave_components_match_this_cpu() -> None:
    """Where this CPU has a component, CPUID leaf 0xD gives the kernel's size for it."""
    layout = x86_64.host_xsave_layout()
    for feature, _, size in layout.components:
        if feature in KERNEL_XSAVE_SIZES:
            assert size == KERNEL_XSAVE_SIZES[feature], feature
        else:  # AMX, APX: laid out, not saved by CRIU
            assert not x86_64.SAVED_FEATURES & (1 << feature), feature


def test_note_sizes() -> None:
    assert x86_64.USER_REGS_STRUCT.size == len(x86_64.USER_REGS) * 8 == 216
    assert prstatus_struct(216).size == 0x150  # sizeof(struct elf_prstatus) on x86_64
    assert PRPSINFO.size == 0x88
    assert SIGINFO.size == 128
    assert x86_64.FXSAVE.size == 512  # struct user_i387_struct


def test_xstate_packs_each_component_at_its_offset() -> None:
    """NT_X86_XSTATE from CRIU's fields: each component at the layout's offset, its full size
    (BNDCSR's padding, PKRU's pad word included)."""

    fp = pb.user_x86_fpregs_entry(cwd=0, swd=0, twd=0, fop=0, rip=0, rdp=0, mxcsr=0)
    fp.mxcsr_mask = 0
    fp.xsave.xstate_bv = (1 << 4) | (1 << 9)
    fp.xsave.bndcsr_state.extend(range(1, 9))
    fp.xsave.pkru.extend([0x55555554, 9])
    layout = x86_64.XsaveLayout((1 << 4) | (1 << 9) | 3, ((4, 1024, 64), (9, 2688, 8)))
    buf = x86_64.pack_xstate(fp, layout)
    assert buf[1024:1088] == b"".join(i.to_bytes(8, "little") for i in range(1, 9))
    assert buf[2688:2696] == (0x55555554).to_bytes(4, "little") + (9).to_bytes(4, "little")


# --- x86_64 register conventions (the clone snapshot's and CRIU's) --------------------------------


def _regs(**kw: int) -> bytes:
    return x86_64.pack_regs({"orig_rax": U64, **kw})


def _get(raw: bytes, name: str) -> int:
    return x86_64.unpack_regs(raw)[name]


@pytest.mark.parametrize(
    ("code", "resume_rax", "criu_rax", "criu_back"),
    [
        (x86_64.ERESTARTSYS, 0, 0, 2),
        (x86_64.ERESTARTNOHAND, 0, 0, 2),
        (x86_64.ERESTARTNOINTR, 0, 0, 2),
        (x86_64.ERESTART_RESTARTBLOCK, x86_64.SYS.restart_syscall, x86_64.SYS.restart_syscall, 2),
    ],
)
def test_restart_conventions(code: int, resume_rax: int, criu_rax: int, criu_back: int) -> None:
    regs = _regs(orig_rax=35, rax=-code & U64, rip=0x1002)
    resumed = x86_64.resume_regs(regs)
    assert _get(resumed, "rip") == 0x1000
    assert _get(resumed, "rax") == (resume_rax or 35)
    saved = x86_64.criu_regs(regs)
    assert _get(saved, "rip") == 0x1002 - criu_back
    assert _get(saved, "rax") == (criu_rax or 35) & U64


@pytest.mark.parametrize(
    ("orig", "code"),
    [
        (35, x86_64.ERESTARTSYS),  # read, futex, accept...
        (35, x86_64.ERESTART_RESTARTBLOCK),  # nanosleep
        (x86_64.SYS.restart_syscall, x86_64.ERESTART_RESTARTBLOCK),  # nanosleep interrupted again
    ],
)
def test_restart_codes_survive_the_images(orig: int, code: int) -> None:
    """What the clone's images hold (criu_regs) the converter (core_gregs) turns back into the
    registers the kernel's core shows: the pc after the syscall, rax the -ERESTART code."""
    raw = _regs(orig_rax=orig, rax=-code & U64, rip=0x1002)
    saved = x86_64.unpack_regs(x86_64.criu_regs(raw))
    gp = types.SimpleNamespace(**{x86_64.CRIU_REG_NAMES.get(k, k): v for k, v in saved.items()})
    core = types.SimpleNamespace(thread_info=types.SimpleNamespace(gpregs=gp))

    def read(addr: int, size: int) -> bytes:
        return x86_64.SYSCALL_INSN if (addr, size) == (0x1000, 2) else bytes(size)

    assert x86_64.core_gregs(core, read) == raw


def test_epoll_eintr_restarted_only_without_timeout_or_pending_signal() -> None:
    eintr = -errno.EINTR & U64
    epoll_wait = x86_64.SYS.epoll_wait
    forever = _regs(orig_rax=epoll_wait, rax=eintr, rip=0x2002, r10=U64)
    assert _get(x86_64.resume_regs(forever), "rip") == 0x2000
    assert _get(x86_64.resume_regs(forever, True), "rip") == 0x2002
    finite = _regs(orig_rax=epoll_wait, rax=eintr, rip=0x2002, r10=100)
    assert _get(x86_64.resume_regs(finite), "rip") == 0x2002
    read = _regs(orig_rax=0, rax=eintr, rip=0x2002)
    assert _get(x86_64.resume_regs(read), "rip") == 0x2002


def test_not_in_syscall_untouched() -> None:
    regs = _regs(rax=-x86_64.ERESTARTSYS & U64, rip=0x3000)
    assert x86_64.resume_regs(regs) == regs
    assert x86_64.criu_regs(regs) == regs
    assert x86_64.syscall_nr(regs) is None


def test_syscall_regs() -> None:
    base = _regs(orig_rax=7, rip=0x10, rsp=0x7000)
    regs = x86_64.syscall_regs(base, 0x4000, 61, (5, 0, -1))
    d = x86_64.unpack_regs(regs)
    assert (d["rip"], d["rax"], d["orig_rax"], d["rsp"]) == (0x4000, 61, U64, 0x7000)
    assert (d["rdi"], d["rsi"], d["rdx"]) == (5, 0, U64)
    assert x86_64.syscall_nr(regs) is None and x86_64.pc(regs) == 0x4000


def test_core_gregs_undo_criu_rewind() -> None:
    """CRIU stores a thread in a restartable syscall rewound (rip on the syscall, rax =
    orig_rax); the core shows rip after it and -ERESTARTNOHAND for pause()."""

    class Gp:
        def __getattr__(self, name: str) -> int:
            return {"orig_ax": x86_64.SYS.pause, "ax": x86_64.SYS.pause, "ip": 0x5000}.get(name, 0)

    class Ti:
        gpregs = Gp()

    class Core:
        thread_info = Ti()

    def read(addr: int, size: int) -> bytes:
        return x86_64.SYSCALL_INSN if addr == 0x5000 else bytes(size)

    regs = x86_64.unpack_regs(x86_64.core_gregs(Core(), read))
    assert regs["rip"] == 0x5002 and regs["rax"] == -x86_64.ERESTARTNOHAND & U64


# --- aarch64 -------------------------------------------------------------------------------------


def test_aarch64_note_sizes() -> None:
    """sizeof() in arch/arm64/include/uapi/asm/ptrace.h and include/linux/elfcore.h."""
    assert aarch64.USER_PT_REGS.size == 34 * 8  # struct user_pt_regs
    assert prstatus_struct(aarch64.USER_PT_REGS.size).size == 0x188  # struct elf_prstatus
    assert aarch64.FPSIMD.size == 528  # struct user_fpsimd_state
    assert aarch64.HWDEBUG_SIZE == 8 + 16 * 16  # struct user_hwdebug_state
    assert pb.core_entry.march.Value("AARCH64") and aarch64.ARCH.thread_info_field in (
        f.name for f in pb.core_entry.DESCRIPTOR.fields
    )


def _aarch64_core() -> pb.core_entry:
    core = pb.core_entry(mtype=pb.core_entry.march.Value("AARCH64"))
    ti = core.ti_aarch64
    ti.clear_tid_addr = 0
    ti.tls = 0xFFFF_8000_1234
    ti.gpregs.regs.extend(range(100, 131))
    ti.gpregs.sp, ti.gpregs.pc, ti.gpregs.pstate = 0xFFFF_F000, 0xAAAA_0004, 0x6000_0000
    ti.fpsimd.vregs.extend(range(1, 65))
    ti.fpsimd.fpsr, ti.fpsimd.fpcr = 0x10, 0x200_0000
    return core


def test_aarch64_core_gregs_are_criu_registers() -> None:
    """arm64's do_signal() rewinds a restartable syscall before both a ptrace stop and a core
    dump: CRIU's registers are the core's as they are."""
    raw = aarch64.core_gregs(_aarch64_core(), lambda a, n: bytes(n))
    regs = aarch64.unpack_regs(raw)
    assert [regs[f"x{i}"] for i in range(31)] == list(range(100, 131))
    assert (regs["sp"], regs["pc"], regs["pstate"]) == (0xFFFF_F000, 0xAAAA_0004, 0x6000_0000)


def test_aarch64_thread_notes() -> None:
    notes = aarch64.thread_notes(_aarch64_core(), aarch64.cpu_layout(None))
    assert [(n.name, n.type, len(n.desc)) for n in notes] == [
        (b"CORE", 2, 528),
        (b"LINUX", aarch64.NT_ARM_TLS, 16),
        (b"LINUX", aarch64.NT_ARM_HW_BREAK, 264),
        (b"LINUX", aarch64.NT_ARM_HW_WATCH, 264),
        (b"LINUX", aarch64.NT_ARM_SYSTEM_CALL, 4),
        (b"LINUX", aarch64.NT_ARM_TAGGED_ADDR_CTRL, 8),
    ]
    fp, tls, brk, _, sysc, _ = (n.desc for n in notes)
    assert fp[:16] == (1).to_bytes(8, "little") + (2).to_bytes(8, "little")  # v0, low half first
    assert fp[512:520] == (0x10).to_bytes(4, "little") + (0x200_0000).to_bytes(4, "little")
    assert tls == (0xFFFF_8000_1234).to_bytes(8, "little") + bytes(8)  # tpidr2_el0: no SME
    assert brk[:4] == (0x606).to_bytes(4, "little")
    assert sysc == b"\xff\xff\xff\xff"
    recorded = aarch64.cpu_layout({"break_info": 0x810, "watch_info": 0x804})
    assert aarch64.thread_notes(_aarch64_core(), recorded)[3].desc[:4] == bytes([4, 8, 0, 0])
    with pytest.raises(ValueError):
        aarch64.cpu_layout({"xcr0": 3})


def test_syscall_insn_found_on_an_instruction_boundary() -> None:
    svc = aarch64.SVC_0
    assert aarch64.ARCH.find_syscall_insn(b"\0\0" + svc + b"\0\0" + svc) == 8
    assert aarch64.ARCH.find_syscall_insn(b"\0" + svc) == -1
    assert x86_64.ARCH.find_syscall_insn(b"\x90" + x86_64.SYSCALL_INSN) == 1


def test_aarch64_syscall_regs() -> None:
    base = aarch64.pack_regs({"x0": 9, "x5": 7, "sp": 0x7000, "pc": 0x10})
    d = aarch64.unpack_regs(aarch64.syscall_regs(base, 0x4000, aarch64.SYS.wait4, (5, 0, -1)))
    assert (d["pc"], d["x8"], d["sp"]) == (0x4000, 260, 0x7000)
    assert (d["x0"], d["x1"], d["x2"], d["x5"]) == (5, 0, U64, 0)
    assert aarch64.pc(aarch64.pack_regs(d)) == 0x4000


# --- nothing outside converters/arch knows x86 --------------------------------------------------

#: identifiers (or words of string constants) that only an x86 module may use
X86_WORDS = re.compile(
    r"(?i)^(r[abcd]x|r[sd]i|r[sb]p|rip|r(?:8|9|1[0-5])|orig_r?ax|eflags|[xyz]mm\w*|\w*xfeature\w*"
    r"|\w*xsave\w*|\w*xstate\w*|\w*fxsave\w*|xcr0|pkru|bnd(?:reg|csr)\w*|opmask\w*|cpuid|xgetbv"
    r"|_*erestart\w*|restart_syscall|osxsave)$"
)
#: the sidecar's legacy key, read for files written before it was renamed
ALLOWED = {("converters/sidecar.py", "xsave_layout")}


def _words(path: Path) -> set[str]:
    """Identifiers and words of non-docstring string constants in *path* (not comments)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            words.add(node.name)
        elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
            words.add(node.arg)
        elif isinstance(node, ast.alias):
            words.update((node.asname or node.name).split("."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            words.update(re.findall(r"\w+", node.value))
    return words


def _x86_words(path: Path) -> set[str]:
    rel = str(path.relative_to(ROOT))
    return {w for w in _words(path) if X86_WORDS.match(w) and (rel, w) not in ALLOWED}


def test_scanner_finds_x86_knowledge() -> None:
    """The scan below cannot pass vacuously: on the x86 module it finds every kind of name."""
    found = {w.lower() for w in _x86_words(ROOT / "converters/arch/x86_64.py")}
    for needle in ("rax", "r15", "orig_rax", "rip", "xfeature_pkru", "xmm_space", "cpuid"):
        assert needle in found, needle
    assert any(w.startswith("erestart") for w in found)


def test_no_x86_outside_converters_arch() -> None:
    files = [
        p
        for pkg in ("converters", "criu_livedump")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "arch" not in p.relative_to(ROOT).parts[1:2]
    ]
    assert len(files) > 20
    offenders = {str(p.relative_to(ROOT)): sorted(w) for p in files if (w := _x86_words(p))}
    assert offenders == {}


# --- the temporary mask of a masked wait ---------------------------------------------------------


def test_wait_sigmask_x86_64() -> None:
    """The mask argument's register of each masked wait, only while the syscall shows the
    temporary mask installed (-ERESTARTNOHAND or -EINTR), as core_gregs() returns them."""
    nohand, eintr = -x86_64.ERESTARTNOHAND & U64, -errno.EINTR & U64
    sys = x86_64.SYS

    def ask(**regs: int) -> tuple[int, bool] | None:
        return x86_64.wait_sigmask(_regs(**regs), lambda a, n: bytes(n))

    assert ask(orig_rax=sys.rt_sigsuspend, rax=nohand, rdi=0x10) == (0x10, False)
    assert ask(orig_rax=sys.ppoll, rax=nohand, r10=0x20) == (0x20, False)
    assert ask(orig_rax=sys.pselect6, rax=eintr, r9=0x30) == (0x30, True)
    assert ask(orig_rax=sys.epoll_pwait, rax=eintr, r8=0x40) == (0x40, False)
    assert ask(orig_rax=sys.epoll_pwait2, rax=eintr, r8=0x50) == (0x50, False)
    # returned (mask restored), another syscall, no syscall
    assert ask(orig_rax=sys.ppoll, rax=1, r10=0x20) is None
    assert ask(orig_rax=sys.pause, rax=nohand, rdi=0x10) is None
    assert ask(orig_rax=U64, rax=nohand, rdi=0x10) is None


def test_wait_sigmask_aarch64() -> None:
    """arm64: rewound (pc on the svc, x0 = orig_x0) or failed with -EINTR (pc past it)."""
    svc_at = 0x4000
    sys = aarch64.SYS

    def read(addr: int, size: int) -> bytes:
        return aarch64.SVC_0 if addr == svc_at else bytes(size)

    def ask(**regs: int) -> tuple[int, bool] | None:
        return aarch64.wait_sigmask(aarch64.pack_regs(regs), read)

    eintr = -errno.EINTR & U64
    assert ask(x8=sys.rt_sigsuspend, pc=svc_at, x0=0x10) == (0x10, False)
    assert ask(x8=sys.ppoll, pc=svc_at, x3=0x20) == (0x20, False)
    assert ask(x8=sys.pselect6, pc=svc_at, x5=0x30) == (0x30, True)
    assert ask(x8=sys.epoll_pwait, pc=svc_at + 4, x0=eintr, x4=0x40) == (0x40, False)
    assert ask(x8=sys.epoll_pwait2, pc=svc_at + 4, x0=eintr, x4=0x50) == (0x50, False)
    assert ask(x8=sys.epoll_pwait, pc=svc_at + 4, x0=1, x4=0x40) is None  # returned
    assert ask(x8=sys.rt_sigsuspend, pc=0x9000, x0=0x10) is None  # not at a syscall
    assert ask(x8=sys.ppoll + 1, pc=svc_at, x3=0x20) is None


def test_aarch64_clone_threads_keep_their_own_tls() -> None:
    """A thread's tls in the clone's images is its own NT_ARM_TLS tpidr_el0 (the template's is
    the clone's, inherited from the injecting thread); the general registers come from ptrace
    and the template's other fields stay."""
    template = {"clear_tid_addr": 0x1234, "tls": 0xAAAA0000, "gpregs": {}}
    regs = aarch64.pack_regs({"x0": 7, "sp": 0xFFFF0000, "pc": 0x400000})
    tls = (0xFFFF12345670).to_bytes(8, "little") + bytes(8)
    info = aarch64.ARCH.image_thread_info(template, regs, (bytes(528),), (tls,), False)
    assert info["tls"] == 0xFFFF12345670
    assert info["clear_tid_addr"] == 0x1234
    assert info["gpregs"]["regs"][0] == 7 and info["gpregs"]["pc"] == 0x400000
    assert aarch64.ARCH.thread_regsets == ((aarch64.NT_ARM_TLS, 16),)

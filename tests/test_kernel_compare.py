"""Acceptance: our core of a live process equals the kernel's own core of the same process.

Each case starts a blocked test program, dumps it with ``criu dump --leave-running``, converts
the images with :func:`converters.convert`, then lets the kernel dump the same unchanged process
(SIGABRT) and compares the two cores field by field, with gdb's view of both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kernelcore import (
    NT,
    CoreView,
    MapEntry,
    RseqArea,
    Target,
    compare_cores,
    compare_syscall_regs,
    criu_dump,
    gdb_backtraces,
    gdb_warnings,
    kernel_core,
    start_target,
)
from programs import build as programs_build
from syslock import hugepages

import converters
from converters.options import ConvertOptions
from criu_livedump.dump import live_dump
from criu_livedump.request import build_request

pytestmark = [pytest.mark.live, pytest.mark.kernel, pytest.mark.slow]

PAGE = os.sysconf("SC_PAGE_SIZE")
#: -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK (linux/errno.h)
ERESTART = {(1 << 64) - e for e in (512, 513, 514, 516)}


@dataclass
class Case:
    """One target dumped twice: ``ours`` (CRIU + converter) and ``kernel`` (SIGABRT)."""

    name: str
    binary: Path
    pid: int
    ours: Path
    kernel: Path
    maps: list[MapEntry]
    rseq: dict[int, RseqArea]
    coredump_filter: int


CASES = {
    # program, args, coredump_filter (None: leave the kernel's default 0x33), how we dump:
    # "criu" is CRIU + converter driven by the harness; "livedump-criu" and "livedump-clone"
    # are the product's `dump` with each --method.
    "mappings-0x33": ("mappings", ["DATA", "1024"], None, "criu"),
    "mappings-0x3f": ("mappings", ["DATA", "1024"], 0x3F, "criu"),
    "mappings-0x01": ("mappings", ["DATA", "1024"], 0x01, "criu"),
    "threads-0x33": ("threads", ["12"], None, "criu"),
    "mappings-livedump-criu": ("mappings", ["DATA", "1024"], None, "livedump-criu"),
    "mappings-livedump-clone": ("mappings", ["DATA", "1024"], None, "livedump-clone"),
    "mappings-0x3f-livedump-clone": ("mappings", ["DATA", "1024"], 0x3F, "livedump-clone"),
    "threads-livedump-clone": ("threads", ["12"], None, "livedump-clone"),
    # the mapped data file replaced on disk after the start, as an upgrade replaces a library:
    # the kernel reads the mapped (now deleted) inode, not what the name leads to now. The
    # converter alone reads CRIU's copy (a ghost-file image); `dump` reads /proc/PID/map_files.
    "mappings-replaced-0x33": ("mappings", ["DATA", "1024"], None, "criu"),
    "mappings-replaced-0x3f": ("mappings", ["DATA", "1024"], 0x3F, "criu"),
    "mappings-replaced-livedump-criu": ("mappings", ["DATA", "1024"], None, "livedump-criu"),
    "mappings-replaced-livedump-clone": ("mappings", ["DATA", "1024"], None, "livedump-clone"),
    "mappings-replaced-0x3f-livedump-clone": ("mappings", ["DATA", "1024"], 0x3F, "livedump-clone"),
    # what a fork does not copy (MADV_DONTFORK: absent, MADV_WIPEONFORK: zeros): the clone
    # method copies those pages from the frozen target
    "forkmadv-livedump-clone": ("forkmadv", [], None, "livedump-clone"),
    "forkmadv-livedump-criu": ("forkmadv", [], None, "livedump-criu"),
    # hugetlb: its own filter bits (0x20 private is in the default 0x33, 0x40 shared is not)
    "hugetlb-0x33": ("hugetlb", [], None, "criu"),
    "hugetlb-0x73": ("hugetlb", [], 0x73, "criu"),
    "hugetlb-0x13-livedump-criu": ("hugetlb", [], 0x13, "livedump-criu"),
    "hugetlb-0x73-livedump-clone": ("hugetlb", [], 0x73, "livedump-clone"),
    # a container's view: its own mount namespace, the data file on a tmpfs only it can see,
    # and stdin inherited from outside (CRIU needs it declared external)
    "mappings-mntns-livedump-criu": ("mappings", ["DATA", "1024"], None, "livedump-criu"),
    "mappings-mntns-livedump-clone": ("mappings", ["DATA", "1024"], None, "livedump-clone"),
    # what --method criu refuses: the clone copies these out before CRIU runs
    "sysv-livedump-clone": ("blockers/sysv_shm", [], None, "livedump-clone"),
    "io_uring-livedump-clone": ("blockers/io_uring", [], None, "livedump-clone"),
    "io_uring-0x3f-livedump-clone": ("blockers/io_uring", [], 0x3F, "livedump-clone"),
}


def _binary(program: str, tmp: Path) -> Path:
    if "/" not in program:
        return programs_build.build(program)
    # the blocker programs live in a subdirectory the build helper does not walk
    out = tmp / Path(program).name
    source = Path(programs_build.__file__).parent / f"{program}.c"
    subprocess.run(["gcc", "-O1", "-g", "-pthread", "-o", str(out), str(source)], check=True)
    return out


def _our_core(how: str, pid: int, tmp: Path) -> Path:
    """Our core of *pid*, taken the way *how* names (see :data:`CASES`)."""
    (tmp / "ours").mkdir()
    if how == "criu":
        images = criu_dump(pid, tmp / "images")
        results = converters.convert(images, tmp / "ours", ConvertOptions(signal=signal.SIGABRT))
        assert [r.pid for r in results] == [pid]
        assert results[0].path is not None
        return results[0].path
    method = how.removeprefix("livedump-")
    out = tmp / "ours" / f"core.{pid}"
    request = build_request(
        output=str(out), signal=int(signal.SIGABRT), core_limit="unlimited", method=method
    )
    report = live_dump(pid, request)
    assert report.method == method
    assert report.core_path is not None and Path(report.core_path) == out
    return out


def _data_file(path: Path) -> Path:
    # mappings.c maps 32 pages of it: 16 private, 8 shared at page 16, 4 read-only at page 4.
    path.write_bytes(bytes((i * 7 + (i >> 12)) & 0xFF for i in range(32 * PAGE)))
    return path


def _replace(path: Path) -> None:
    """A new file of the same size under *path*; the old one lives on only in the mappings."""
    new = path.with_suffix(".new")
    new.write_bytes(bytes((i * 13 + 5) & 0xFF for i in range(path.stat().st_size)))
    new.rename(path)


def _start_in_mount_namespace(binary: Path, argv: list[str], tmp: Path) -> Target:
    """*binary* in a mount namespace of its own, its data file moved to a tmpfs mounted there
    only: the name the images record leads nowhere from here."""
    private = tmp / "private"
    private.mkdir()
    data = argv[0]
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {private} && cp {data} {private}/data && "
        f'exec {binary} {private}/data "$@"'
    )
    return start_target(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv[1:]
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Case]:
    if os.geteuid() != 0:
        pytest.skip("needs root: CRIU dump and core_pattern")
    program, args, coredump_filter, how = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    binary = _binary(program, tmp)
    argv = [str(_data_file(tmp / "data")) if a == "DATA" else a for a in args]
    with contextlib.ExitStack() as stack:
        # hugetlb pages for the whole case: the kernel's core is taken after ours
        if program == "hugetlb" and not stack.enter_context(hugepages(8)):
            pytest.skip("the kernel could not reserve 8 huge pages")
        if "-mntns" in request.param:
            target = _start_in_mount_namespace(binary, argv, tmp)
        else:
            target = start_target(binary, *argv)
        stack.callback(target.close)
        if "-replaced" in request.param:
            _replace(tmp / "data")
        if coredump_filter is not None:
            target.coredump_filter = coredump_filter
        dumped_filter = target.coredump_filter
        ours = _our_core(how, target.pid, tmp)
        kernel = kernel_core(target, tmp / "kernel")
        yield Case(
            request.param,
            binary,
            target.pid,
            ours,
            kernel,
            target.maps,
            target.rseq,
            dumped_filter,
        )


@pytest.fixture
def views(case: Case) -> Iterator[tuple[CoreView, CoreView]]:
    with CoreView(case.ours) as ours, CoreView(case.kernel) as kernel:
        yield ours, kernel


def test_cores_equal(case: Case, views: tuple[CoreView, CoreView]) -> None:
    ours, kernel = views
    diffs = compare_cores(ours, kernel, maps=case.maps, rseq=case.rseq)
    assert diffs == [], f"{case.name}: {len(diffs)} differences:\n" + "\n".join(diffs)


def test_syscall_registers_differ_only_by_restart(views: tuple[CoreView, CoreView]) -> None:
    """rax may differ only as the known trap: CRIU saves rax = orig_rax for a thread stopped in
    a restartable syscall, the kernel's core holds -ERESTART* there."""
    ours, kernel = views
    bad = []
    for k in kernel.threads:
        o = ours.thread(k.pid)
        assert o is not None
        if o.regs["orig_rax"] != k.regs["orig_rax"]:
            bad.append(f"thread {k.pid}: orig_rax ours {o.regs['orig_rax']:#x} kernel "
                       f"{k.regs['orig_rax']:#x}")  # fmt: skip
        if o.regs["rax"] != k.regs["rax"] and not (
            o.regs["rax"] == o.regs["orig_rax"] and k.regs["rax"] in ERESTART
        ):
            bad.append(f"thread {k.pid}: rax ours {o.regs['rax']:#x} kernel {k.regs['rax']:#x}")
    assert bad == [], "\n".join([*bad, "all:", *compare_syscall_regs(ours, kernel)])


def test_gdb_backtraces_equal(case: Case) -> None:
    ours = gdb_backtraces(case.binary, case.ours)
    kernel = gdb_backtraces(case.binary, case.kernel)
    assert ours == kernel


def test_gdb_warns_no_more_on_ours(case: Case) -> None:
    kernel = set(gdb_warnings(case.binary, case.kernel))
    extra = [w for w in gdb_warnings(case.binary, case.ours) if w not in kernel]
    assert extra == []


def test_note_layout_matches(views: tuple[CoreView, CoreView]) -> None:
    """Per-thread note sets and the process notes, in the kernel's order (kernel's list order
    of non-dumping threads differs, so compare the shape)."""
    ours, kernel = views
    assert [(n.owner, n.type) for n in ours.notes[:7]] == [
        (n.owner, n.type) for n in kernel.notes[:7]
    ]
    assert [n.type for n in kernel.notes[:5]] == [
        NT.PRSTATUS,
        NT.PRPSINFO,
        NT.SIGINFO,
        NT.AUXV,
        NT.FILE,
    ]
    assert len(ours.notes) == len(kernel.notes)

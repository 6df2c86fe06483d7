"""Acceptance: our core of a live process equals the kernel's own core of the same process.

Each case (a row of :data:`CASES`) starts a blocked test program, takes our core of it (CRIU +
converter, or the product's ``dump``), then lets the kernel dump the same unchanged process
(SIGABRT) and compares the two cores field by field, with gdb's view of both. How to add a case:
tests/harness/README.md. Every case runs twice: with the installed CRIU and with CRIU 4.1.1
(:data:`OLDER_CRIU`) dumping.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
from harness.cases import (
    DATA,
    CaseRun,
    CriuAndConvert,
    Direct,
    KernelCase,
    LiveDump,
    MountNamespace,
    PrecopyEveryArea,
    run_case,
)
from harness.compare import compare_with, note_layout_diffs, register_diffs, restart_diffs
from harness.corefile import CoreView
from harness.criu import criu_release
from harness.gdb import gdb_backtraces, gdb_warnings

pytestmark = [pytest.mark.live, pytest.mark.kernel, pytest.mark.slow]

MAPPINGS = ("mappings", (DATA, "1024"))
#: the clone streams its pages into the core (criu_livedump/stream.py) where it can
CLONE = LiveDump("clone", capture="stream")
CRIU = LiveDump("criu", capture="images")
PRECOPY = PrecopyEveryArea(capture="stream")

CASES = (
    # the harness's CRIU + converter, each coredump_filter a mappings target exercises
    KernelCase("mappings-0x33", *MAPPINGS),
    KernelCase("mappings-0x3f", *MAPPINGS, coredump_filter=0x3F),
    KernelCase("mappings-0x01", *MAPPINGS, coredump_filter=0x01),
    KernelCase("threads-0x33", "threads", ("12",)),
    # the product's `dump` with each --method
    KernelCase("mappings-livedump-criu", *MAPPINGS, dumper=CRIU),
    KernelCase("mappings-livedump-clone", *MAPPINGS, dumper=CLONE),
    KernelCase("mappings-0x3f-livedump-clone", *MAPPINGS, coredump_filter=0x3F, dumper=CLONE),
    KernelCase("threads-livedump-clone", "threads", ("12",), dumper=CLONE),
    # a server's thread pools (issue 12): 512 threads in futex, read, nanosleep, epoll_wait
    # and accept, every register of every thread as the kernel's core has it
    KernelCase(
        "pool-512-livedump-clone", "threads", ("512", "pool"), dumper=CLONE, every_register=True
    ),
    # the same pools, two threads each: small enough for the emulated arm64 guest, where
    # nanosleep's -ERESTART_RESTARTBLOCK restarts by arm64's own rule (do_signal())
    KernelCase(
        "pool-10-livedump-clone", "threads", ("10", "pool"), dumper=CLONE, every_register=True
    ),
    # the mapped data file replaced on disk after the start: the converter alone reads CRIU's
    # copy (a ghost-file image); `dump` reads /proc/PID/map_files
    KernelCase("mappings-replaced-0x33", *MAPPINGS, replace_data=True),
    KernelCase("mappings-replaced-0x3f", *MAPPINGS, coredump_filter=0x3F, replace_data=True),
    KernelCase("mappings-replaced-livedump-criu", *MAPPINGS, dumper=CRIU, replace_data=True),
    KernelCase("mappings-replaced-livedump-clone", *MAPPINGS, dumper=CLONE, replace_data=True),
    KernelCase(
        "mappings-replaced-0x3f-livedump-clone",
        *MAPPINGS,
        coredump_filter=0x3F,
        dumper=CLONE,
        replace_data=True,
    ),
    # what a fork does not copy (MADV_DONTFORK: absent, MADV_WIPEONFORK: zeros): the clone
    # method copies those pages from the frozen target
    KernelCase("forkmadv-livedump-clone", "forkmadv", dumper=CLONE),
    KernelCase("forkmadv-livedump-criu", "forkmadv", dumper=CRIU),
    # the MADV_DONTFORK area MADV_DONTDUMP too: in the kernel's core without its bytes
    KernelCase("forkmadv-dontdump-livedump-clone", "forkmadv", ("dontdump",), dumper=CLONE),
    # hugetlb: its own filter bits (0x20 private is in the default 0x33, 0x40 shared is not)
    KernelCase("hugetlb-0x33", "hugetlb", hugepages=8),
    KernelCase("hugetlb-0x73", "hugetlb", coredump_filter=0x73, hugepages=8),
    KernelCase(
        "hugetlb-0x13-livedump-criu", "hugetlb", coredump_filter=0x13, dumper=CRIU, hugepages=8
    ),
    KernelCase(
        "hugetlb-0x73-livedump-clone",
        "hugetlb",
        coredump_filter=0x73,
        dumper=LiveDump("clone", capture="images"),  # hugetlb memory is not streamed
        hugepages=8,
    ),
    # a container's view: its own mount namespace, the data file on a tmpfs only it can see,
    # and stdin inherited from outside (CRIU needs it declared external)
    KernelCase("mappings-mntns-livedump-criu", *MAPPINGS, dumper=CRIU, launcher=MountNamespace()),
    KernelCase("mappings-mntns-livedump-clone", *MAPPINGS, dumper=CLONE, launcher=MountNamespace()),
    # threads asleep with a temporary blocked mask (rt_sigsuspend, ppoll, pselect6,
    # epoll_pwait): the kernel's core shows it, PTRACE_GETSIGMASK the saved one
    KernelCase("sigwaits-0x33", "sigwaits"),
    KernelCase("sigwaits-livedump-criu", "sigwaits", dumper=CRIU),
    KernelCase("sigwaits-livedump-clone", "sigwaits", dumper=CLONE),
    # what --method criu refuses: the clone copies these out before CRIU runs
    KernelCase("sysv-livedump-clone", "blockers/sysv_shm", dumper=CLONE),
    KernelCase("io_uring-livedump-clone", "blockers/io_uring", dumper=CLONE),
    KernelCase(
        "io_uring-0x3f-livedump-clone", "blockers/io_uring", coredump_filter=0x3F, dumper=CLONE
    ),
)


#: --method precopy (issue 14), every area pre-copied: each filter, threads, what a fork does
#: not copy, hugetlb, a mount namespace, SysV, io_uring (skipped, naming the missing row, where
#: the product has no such method). Only the first runs again with CRIU 4.1.1: what precopy
#: adds to the images (fork-lost areas, a parent image) is the clone's, which every clone case
#: runs with both
PRECOPY_CASES = (
    KernelCase("mappings-livedump-precopy", *MAPPINGS, dumper=PRECOPY),
    KernelCase("mappings-0x3f-livedump-precopy", *MAPPINGS, coredump_filter=0x3F, dumper=PRECOPY),
    KernelCase("mappings-0x01-livedump-precopy", *MAPPINGS, coredump_filter=0x01, dumper=PRECOPY),
    KernelCase("threads-livedump-precopy", "threads", ("12",), dumper=PRECOPY),
    KernelCase("forkmadv-livedump-precopy", "forkmadv", dumper=PRECOPY),
    KernelCase(
        "hugetlb-0x73-livedump-precopy",
        "hugetlb",
        coredump_filter=0x73,
        dumper=PrecopyEveryArea(capture="images"),  # hugetlb memory is not streamed
        hugepages=8,
    ),
    KernelCase(
        "mappings-mntns-livedump-precopy", *MAPPINGS, dumper=PRECOPY, launcher=MountNamespace()
    ),
    KernelCase("sysv-livedump-precopy", "blockers/sysv_shm", dumper=PRECOPY),
    KernelCase(
        "io_uring-0x3f-livedump-precopy", "blockers/io_uring", coredump_filter=0x3F, dumper=PRECOPY
    ),
)

#: every case once more with CRIU 4.1.1 dumping: the last release before 4.2 changed the
#: pagemap entries (issue 19), built beside the installed CRIU by `make setup`
OLDER_CRIU = "4.1.1"


def _dumping_with(case: KernelCase, version: str) -> KernelCase:
    criu = str(criu_release(version))
    dumper = case.dumper
    assert isinstance(dumper, CriuAndConvert | LiveDump), f"{case.name}: which CRIU dumps?"
    return replace(case, name=f"{case.name}@criu-{version}", dumper=replace(dumper, criu=criu))


#: cases only the installed CRIU can pass: MADV_GUARD_INSTALL ranges are in the images since
#: CRIU 4.2 only (VMA_AREA_GUARD); a file-backed guard range is a hole in the kernel's core,
#: and an older CRIU's images do not say where it is
NEWER_CRIU_ONLY = (
    KernelCase("guard-0x3f", "guard", (DATA,), coredump_filter=0x3F),
    KernelCase("guard-0x3f-livedump-criu", "guard", (DATA,), coredump_filter=0x3F, dumper=CRIU),
    KernelCase("guard-0x3f-livedump-clone", "guard", (DATA,), coredump_filter=0x3F, dumper=CLONE),
    KernelCase(
        "guard-0x3f-livedump-precopy", "guard", (DATA,), coredump_filter=0x3F, dumper=PRECOPY
    ),
)

#: our core piped to a core_pattern ``|handler`` that writes it to a file, by both methods: the
#: pipe sink does not depend on the dumping CRIU, so these run with the installed one only
TO_HANDLER = (
    KernelCase(
        "mappings-handler-livedump-criu", *MAPPINGS, dumper=LiveDump("criu", to_handler=True)
    ),
    KernelCase(
        "mappings-handler-livedump-clone", *MAPPINGS, dumper=LiveDump("clone", to_handler=True)
    ),
)

ALL_CASES = (
    CASES
    + tuple(_dumping_with(c, OLDER_CRIU) for c in CASES + PRECOPY_CASES[:1])
    + PRECOPY_CASES
    + NEWER_CRIU_ONLY
    + TO_HANDLER
)

#: the programs whose cases `make test-arm64` runs in the emulated arm64 guest (``-m arm64``;
#: tests/arm64/guest-tests.sh): both methods (criu, clone; not the core_pattern handler's
#: variants) and CRIU + converter, each with the guest's CRIU
#: and started directly, at most ARM64_MAX_THREADS threads; the others stay out for TCG's
#: minutes (each case takes ~1 min there)
ARM64_PROGRAMS = frozenset({"mappings", "threads", "sigwaits"})
ARM64_MAX_THREADS = 16


def _for_arm64_guest(case: KernelCase) -> bool:
    threads = int(case.args[0]) if case.program == "threads" else 0
    dumper = case.dumper
    # precopy needs PAGEMAP_SCAN (Linux 6.7), newer than the guest's 6.1
    method_ok = isinstance(dumper, CriuAndConvert) or (
        isinstance(dumper, LiveDump)
        and dumper.method in ("criu", "clone")
        and not dumper.to_handler
    )
    return (
        method_ok
        and case.program in ARM64_PROGRAMS
        and getattr(dumper, "criu", None) is None
        and isinstance(case.launcher, Direct)
        and not case.replace_data
        and threads <= ARM64_MAX_THREADS
    )


def _params(cases: tuple[KernelCase, ...]) -> list[object]:
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.arm64] if _for_arm64_guest(c) else [])
        for c in sorted(cases, key=lambda c: c.name)
    ]


@pytest.fixture(scope="module", params=_params(ALL_CASES))
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CaseRun]:
    case: KernelCase = request.param
    criu = getattr(case.dumper, "criu", None)
    if criu is not None and not os.access(criu, os.X_OK):
        pytest.skip(f"{criu} is not built (make setup, or scripts/build-criu.sh {OLDER_CRIU})")
    with contextlib.ExitStack() as stack:
        yield run_case(case, tmp_path_factory.mktemp(case.name), stack)


@pytest.fixture
def views(run: CaseRun) -> Iterator[tuple[CoreView, CoreView]]:
    with CoreView(run.ours) as ours, CoreView(run.kernel) as kernel:
        yield ours, kernel


def test_case_names_are_unique() -> None:
    assert len({c.name for c in ALL_CASES}) == len(ALL_CASES)


def test_cores_equal(run: CaseRun, views: tuple[CoreView, CoreView]) -> None:
    ours, kernel = views
    diffs = compare_with(ours, kernel, run.case.tolerances, maps=run.maps, rseq=run.rseq)
    assert diffs == [], f"{run.case.name}: {len(diffs)} differences:\n" + "\n".join(diffs)


def test_syscall_registers_differ_only_by_restart(views: tuple[CoreView, CoreView]) -> None:
    """rax may differ only as the known trap: CRIU saves rax = orig_rax for a thread stopped in
    a restartable syscall, the kernel's core holds -ERESTART* there."""
    assert restart_diffs(*views) == []


def test_every_register_equal(run: CaseRun, views: tuple[CoreView, CoreView]) -> None:
    if not run.case.every_register:
        pytest.skip("not every thread of this program sits in a syscall")
    ours, kernel = views
    assert len(kernel.threads) > 1
    assert register_diffs(ours, kernel) == []


def test_gdb_backtraces_equal(run: CaseRun) -> None:
    assert gdb_backtraces(run.binary, run.ours) == gdb_backtraces(run.binary, run.kernel)


def test_gdb_warns_no_more_on_ours(run: CaseRun) -> None:
    kernel = set(gdb_warnings(run.binary, run.kernel))
    extra = [w for w in gdb_warnings(run.binary, run.ours) if w not in kernel]
    assert extra == []


def test_note_layout_matches(views: tuple[CoreView, CoreView]) -> None:
    """Per-thread note sets and the process notes, in the kernel's order (kernel's list order
    of non-dumping threads differs, so compare the shape)."""
    assert note_layout_diffs(*views) == []

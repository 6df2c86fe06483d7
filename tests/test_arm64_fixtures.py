"""aarch64 images convert on this (x86_64) host to the arm64 guest kernel's own core (issue 20).

Each fixture tests/arm64/CASE.tar.xz (made by tests/arm64/make-fixtures.sh in the emulated
arm64 Debian guest of scripts/arm64-guest.sh) holds one process state twice: Debian 12's CRIU
3.17.1 images of a blocked test program (``criu dump --leave-running``) and the guest kernel's
core (SIGABRT) of the same state right after, with the guest gdb's backtraces of that core.
tests/arm64/root.tar.xz holds the files they map (the programs, libc, ld.so, a data file).
The images are converted here and compared with the kernel's core by the kernel-comparison
suite's comparator; gdb-multiarch reads both cores with the same backtraces.
"""

from __future__ import annotations

import shutil
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.compare import Tolerances, compare_with, note_layout_diffs, restart_diffs
from harness.corefile import CoreView
from harness.gdb import gdb_backtraces
from harness.procstate import RseqArea

from converters import ConvertOptions, convert
from converters.images import ImageSet

ARM64 = Path(__file__).resolve().parent / "arm64"
CASES = sorted(
    p.name.removesuffix(".tar.xz") for p in ARM64.glob("*.tar.xz") if p.name != "root.tar.xz"
)
#: struct rseq's signature is not in CRIU's images; the comparator only uses address and size
_NO_SIGNATURE = 0


def test_fixtures_present() -> None:
    assert CASES == ["mappings", "threads"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest's files the cores map (tests/arm64/root.tar.xz)."""
    dest = tmp_path_factory.mktemp("arm64-root")
    _extract(ARM64 / "root.tar.xz", dest)
    return dest / "root"


def _extract(archive: Path, dest: Path) -> None:
    """Our own committed fixture, unpacked with tarfile's "data" filter where this Python has
    it (3.11.4 and later; Debian 12's python3 is 3.11.2, which has no filter argument)."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # a fixture of this repository


def _unpack(case: str, dest: Path) -> Path:
    _extract(ARM64 / f"{case}.tar.xz", dest)
    return dest / case


def _rseq(images: Path, pid: int) -> dict[int, RseqArea]:
    """Each thread's registered struct rseq, from CRIU's images (the cpu fields the kernel
    rewrites between the two dumps are tolerated)."""
    out = {}
    s = ImageSet.open(images)
    for tid in s.process(pid).threads:
        tc = s.thread_core(tid).core.thread_core
        if tc.HasField("rseq_entry") and tc.rseq_entry.rseq_abi_pointer:
            entry = tc.rseq_entry
            out[tid] = RseqArea(tid, entry.rseq_abi_pointer, entry.rseq_abi_size, _NO_SIGNATURE)
    return out


@dataclass(frozen=True)
class Case:
    dir: Path
    ours: Path
    kernel: Path
    program: Path
    pid: int


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, tmp_path: Path, root: Path) -> Case:
    """One fixture converted: its directory, our core, the kernel's, the program, the pid."""
    d = _unpack(request.param, tmp_path)
    pid = int((d / "pid").read_text())
    out = tmp_path / "ours"
    out.mkdir()
    opts = ConvertOptions(files_root=root, signal=int(signal.SIGABRT))
    (result,) = convert(d / "images", out, opts)
    assert result.pid == pid and result.path is not None
    assert result.warnings == []
    program = root / "opt/livedump" / (d / "program").read_text().strip()
    return Case(d, result.path, d / "core.kernel", program, pid)


def test_made_by_an_arm64_criu_3_17_on_4k_pages(case: Case) -> None:
    d = case.dir
    assert "3.17.1" in (d / "criu-version").read_text()
    assert (d / "pagesize").read_text().strip() == "4096"


def test_images_convert_to_the_guest_kernels_core(case: Case) -> None:
    rseq = _rseq(case.dir / "images", case.pid)
    with CoreView(case.ours) as ours, CoreView(case.kernel) as kernel:
        assert kernel.machine.e_machine == "EM_AARCH64"
        diffs = compare_with(ours, kernel, Tolerances(), maps=None, rseq=rseq)
        diffs += restart_diffs(ours, kernel) + note_layout_diffs(ours, kernel)
    assert diffs == [], "\n".join(diffs)


def test_gdb_multiarch_backtraces_equal(case: Case, root: Path) -> None:
    gdb = shutil.which("gdb-multiarch")
    assert gdb is not None, "gdb-multiarch is not installed (make setup installs it)"
    ours = gdb_backtraces(case.program, case.ours, gdb=gdb, sysroot=root)
    kernel = gdb_backtraces(case.program, case.kernel, gdb=gdb, sysroot=root)
    # the program's frames are named (libc's start_thread is "??" to the guest's gdb too)
    assert "main_blocked_in_pause () at" in kernel, kernel
    assert ours == kernel

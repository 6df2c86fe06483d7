"""What a fork does not copy (kernel/fork.c: dup_mmap()): MADV_DONTFORK areas are absent from a
child, MADV_WIPEONFORK areas are zero in it. The clone method copies their pages from the
frozen target (criu_livedump/snapshot/clone/fork_lost.py), so its core holds them as the kernel's
does
(tests/test_kernel_compare.py compares both methods with the kernel); an untouched
MADV_DONTFORK area has nothing to copy and is listed without bytes, silently."""

from __future__ import annotations

import json
from pathlib import Path

import procs
import pytest
from harness.corefile import CoreView
from harness.launcher import start_target
from programs import build as programs_build

pytestmark = [pytest.mark.live]

EXE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "criu-livedump"
LEN = 16 * 4096


def _dump(pid: int, core: Path, method: str) -> dict[str, object]:
    proc = procs.run(
        [str(EXE), "dump", str(pid), "-o", str(core), "--method", method,
         "--core-limit", "unlimited", "--json"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def _load(view: CoreView, addr: int) -> tuple[int, int]:
    (seg,) = [s for s in view.loads if s.vaddr == addr]
    return seg.memsz, seg.filesz


@pytest.mark.parametrize("method", ["clone", "criu"])
def test_dontfork_and_wipeonfork(tmp_path: Path, method: str) -> None:
    target = start_target(programs_build.build("forkmadv"), rseq=False)
    try:
        keep, wipe, empty = (int(x, 16) for x in target.ready_line.decode().split()[1:4])
        report = _dump(target.pid, tmp_path / "core", method)
    finally:
        target.close()
    assert report["warnings"] == []
    with CoreView(tmp_path / "core") as view:
        assert view.read(keep, LEN) == b"\x11" * LEN
        assert view.read(wipe, LEN) == b"\x22" * LEN
        assert _load(view, empty) == (LEN, 0)

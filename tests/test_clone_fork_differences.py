"""What a clone snapshot cannot see, by design (issue 5): MADV_DONTFORK areas are absent from
the clone, MADV_WIPEONFORK areas are zero in it (kernel/fork.c: dup_mmap()). The core still
lists the former, and the report says which bytes are missing; --method criu has them all."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from kernelcore import CoreView, start_target
from programs import build as programs_build

pytestmark = [pytest.mark.live]

EXE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "criu-livedump"
LEN = 16 * 4096


def _dump(pid: int, core: Path, method: str) -> dict[str, object]:
    proc = subprocess.run(
        [str(EXE), "dump", str(pid), "-o", str(core), "--method", method,
         "--core-limit", "unlimited", "--json"],
        capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def _load(view: CoreView, addr: int) -> tuple[int, int]:
    (seg,) = [s for s in view.loads if s.vaddr == addr]
    return seg.memsz, seg.filesz


def test_dontfork_and_wipeonfork(tmp_path: Path) -> None:
    target = start_target(programs_build.build("forkmadv"), rseq=False)
    try:
        keep, wipe = (int(x, 16) for x in target.ready_line.decode().split()[1:3])
        clone_report = _dump(target.pid, tmp_path / "clone", "clone")
        criu_report = _dump(target.pid, tmp_path / "criu", "criu")
    finally:
        target.close()
    warnings = "\n".join(clone_report["warnings"])  # type: ignore[arg-type]
    assert f"[{keep:#x}, {keep + LEN:#x}) is MADV_DONTFORK" in warnings
    assert f"[{wipe:#x}, {wipe + LEN:#x}) is MADV_WIPEONFORK" in warnings
    with CoreView(tmp_path / "clone") as view:
        # listed with its size and no bytes; the wiped area has nothing the clone could save
        assert _load(view, keep) == (LEN, 0)
        assert _load(view, wipe) == (LEN, 0)
    assert criu_report["warnings"] == []
    with CoreView(tmp_path / "criu") as view:
        assert view.read(keep, LEN) == b"\x11" * LEN
        assert view.read(wipe, LEN) == b"\x22" * LEN

"""Write tests/fuzz/regressions/: one small image set per defect the fuzzer found.

Each case is ``NAME/img`` (the images), optionally ``NAME/root`` (the files root) and
``NAME/expected.json``: ``{"outcome": "error" | "ok", "message": substring of the error,
"warning": substring of a warning, "found": what crashed before the fix}``. The sets are
minimal reconstructions of the fuzzer's cases, committed so that ``make test`` replays them
(tests/test_fuzz.py); rerun this script only to rebuild them.

Usage: ``python tests/fuzz/make_regressions.py``
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
for p in (FUZZ_DIR, FUZZ_DIR.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import images  # noqa: E402

REGRESSIONS = FUZZ_DIR / "regressions"
PAGE = images.PAGE
BASE = 0x1000_0000


def _pagemap(img: Path, pid: int, entries: list[dict[str, Any]]) -> None:
    images.write_image(img / f"pagemap-{pid}.img", "PAGEMAP", [{"pages_id": pid}, *entries])


def pagemap_end_2_64(d: Path) -> None:
    img = images.simple(d / "img")
    _pagemap(img, 100, [images._pme((1 << 64) - PAGE, 1, images.PE_LAZY)])


def pages_offset_2_63(d: Path) -> None:
    img = images.simple(d / "img")
    _pagemap(img, 100, [images._pme(0, 1 << 51, images.PE_PRESENT),
                        images._pme(1 << 63, 1, images.PE_PRESENT)])  # fmt: skip


def sidecar_signal(d: Path) -> None:
    images.simple(d / "img")
    (d / "img" / "livedump.json").write_text(json.dumps({"signal": 1 << 70}))


def sidecar_ppid(d: Path) -> None:
    images.simple(d / "img", ppid=0)
    (d / "img" / "livedump.json").write_text(json.dumps({"ppid": 1 << 40}))


def vma_2_63(d: Path) -> None:
    proc = images.Proc(100, vmas=[images.vma(BASE, BASE + (1 << 63))],
                       pages=[(BASE, images.pattern(BASE))], with_stack=False)  # fmt: skip
    images.build(d / "img", [proc])


def nul_in_file_name(d: Path) -> None:
    root = d / "root" / "lib"
    root.mkdir(parents=True)
    (root / "libx.so").write_bytes(b"\x7fELF" + bytes(PAGE - 4))
    proc = images.Proc(100, vmas=[images.file_vma(BASE, BASE + PAGE, file_id=3)])
    images.build(
        d / "img", [proc], files=[images.reg_file(3, "/lib/libx.so\0trailing", PAGE)],
        sidecar={"coredump_filter": 0x3F},
    )  # fmt: skip


def sched_nice(d: Path) -> None:
    img = images.simple(d / "img")
    core = images.core_entry(images.Proc(100), 100, 0)
    core["thread_core"]["sched_nice"] = 1_000_000
    images.write_image(img / "core-100.img", "CORE", [core])


#: name -> (builder, expected)
CASES: dict[str, tuple[Callable[[Path], None], dict[str, str]]] = {
    "pagemap-end-at-2^64": (pagemap_end_2_64, {
        "outcome": "error", "message": "pagemap-100.img: entry 1 (1 pages at 0xfffffffffffff000)"
        " runs past the address space",
        "found": "OverflowError: int too big to convert (u64 index array)"}),
    "pages-offset-past-2^63": (pages_offset_2_63, {
        "outcome": "error", "message": "pagemap-100.img: entry 1 puts pages past the end of "
        "pages-100.img",
        "found": "OverflowError: int too big to convert (signed offset array)"}),
    "sidecar-signal-2^70": (sidecar_signal, {
        "outcome": "error", "message": "livedump.json: signal 1180591620717411303424 out of range",
        "found": "struct.error: argument out of range (si_signo in NT_PRSTATUS)"}),
    "sidecar-ppid-2^40": (sidecar_ppid, {
        "outcome": "error", "message": "livedump.json: ppid 1099511627776 out of range",
        "found": "struct.error: 'i' format requires ... (pr_ppid in NT_PRSTATUS)"}),
    "vma-of-2^63-bytes": (vma_2_63, {
        "outcome": "error", "message": "mm-100.img: VMAs to dump total",
        "found": "OverflowError in lseek() / OutputError 'Invalid argument' on the core"}),
    "nul-in-mapped-file-name": (nul_in_file_name, {
        "outcome": "ok", "warning": "name holds a NUL byte",
        "found": "ValueError: embedded null byte (os.path.realpath)"}),
    "sched-nice-10^6": (sched_nice, {
        "outcome": "error", "message": "core-100.img: sched_nice 1000000 out of range",
        "found": "struct.error: byte format requires -128 <= number <= 127 (pr_nice)"}),
}  # fmt: skip


def main() -> None:
    for name, (builder, expected) in CASES.items():
        d = REGRESSIONS / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        builder(d)
        (d / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        print(d)


if __name__ == "__main__":
    main()

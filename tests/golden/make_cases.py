"""Write the golden image sets of tests/golden/ (rerun only to rebuild them).

Each case directory holds ``case.json`` (what it covers, the conversion variants, pre-dump
parent links), ``img/`` (and ``prev*/`` for a pre-dump chain) with every image as
``NAME.img.json`` in ``crit decode --pretty`` form and page data as raw ``pages-N.img``,
``root/`` with the mapped files (the ``--files-root``), and ``expected.json``, written by
tests/test_golden.py under ``GOLDEN_UPDATE=1`` and then reviewed by hand against the kernel's
rules (see each case's ``review`` notes in case.json).

Usage: ``python tests/golden/make_cases.py``
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycriu.images as pyimages

GOLDEN = Path(__file__).resolve().parent
sys.path.insert(0, str(GOLDEN.parent))

import images  # noqa: E402
from images import PAGE, Proc, file_vma, memfd_vma, pattern, vma  # noqa: E402

BASE = 0x1000_0000
#: x87, SSE and AVX (XCR0 7): the AVX state at offset 576, 256 bytes, as CPUID leaf 0xD says
XSAVE_LAYOUT = {"xcr0": 7, "components": [[2, 576, 256]]}
MADV_DONTDUMP = 16
#: a case builder fills the directory it is given and returns case.json's content
Builder = Callable[[Path], dict[str, Any]]


def private_anon(d: Path) -> dict[str, Any]:
    a, b, guard = BASE, BASE + 16 * PAGE, BASE + 32 * PAGE
    proc = Proc(
        100,
        threads=[100, 101],
        regs={
            101: {"ip": 0x401234, "sp": 0x7FFD_0000_2000, "bx": 0x1111, "fs_base": 0x7F00_0000_2000}
        },
        vmas=[
            vma(a, a + 8 * PAGE),
            vma(b, b + 4 * PAGE),  # never touched: no anon_vma in the kernel, no pages here
            vma(guard, guard + PAGE, prot=0),  # PROT_NONE guard
        ],
        pages=[(a + PAGE, pattern(a + PAGE, 2)), (a + 5 * PAGE, pattern(a + 5 * PAGE))],
    )
    images.build(d / "img", [proc])
    return {
        "covers": "private anonymous memory, an untouched VMA, a PROT_NONE guard, two threads",
        "variants": {"default": {}, "filter-0x00": {"coredump_filter": 0}},
        "review": [
            "0x33 has ANON_PRIVATE: the VMA with saved pages is dumped whole (8 pages, holes "
            "for the 5 untouched ones); the untouched VMA and the guard have no anon_vma: 0",
            "the stack VMA (argv page saved) is dumped whole",
            "filter 0x00: every p_filesz is 0",
        ],
    }


def file_private(d: Path) -> dict[str, Any]:
    root = d / "root" / "lib"
    root.mkdir(parents=True)
    data = b"".join(pattern(0x5000_0000 + i * PAGE, 1, tag=0xF11E) for i in range(6))
    (root / "data.bin").write_bytes(data)
    elf = b"\x7fELF\x02\x01\x01" + bytes(PAGE - 7) + pattern(0, 1, tag=0xE1F)
    (root / "libelf.so").write_bytes(elf)
    os.chmod(root / "libelf.so", 0o755)
    e, f, g = BASE, BASE + 16 * PAGE, BASE + 32 * PAGE
    proc = Proc(
        100,
        vmas=[
            # the ELF at offset 0, r-x, unmodified: ELF_HEADERS dumps its first page
            file_vma(e, e + 2 * PAGE, file_id=5, prot=images.PROT_R | images.PROT_X),
            # data.bin from page 1, rw, page 2 of the VMA modified (saved by CRIU)
            file_vma(f, f + 4 * PAGE, file_id=6, pgoff=PAGE, prot=images.PROT_R | images.PROT_W),
            # data.bin from page 4, read-only, 4 pages of which only 2 are inside the file
            file_vma(g, g + 4 * PAGE, file_id=6, pgoff=4 * PAGE),
        ],
        pages=[(f + 2 * PAGE, pattern(f + 2 * PAGE, 1, tag=0xD1F7))],
    )
    images.build(
        d / "img",
        [proc],
        files=[
            images.reg_file(5, "/lib/libelf.so", len(elf), 0o100755),
            images.reg_file(6, "/lib/data.bin", len(data), 0o100644),
        ],
    )
    return {
        "covers": "file-backed private mappings: modified pages, an ELF header, a mapping "
        "past the end of its file",
        "files_root": "root",
        "variants": {
            "default": {},
            "filter-0x01": {"coredump_filter": 0x01},
            "filter-0x3f": {"coredump_filter": 0x3F},
        },
        "review": [
            "0x33: libelf.so pgoff 0, readable, executable file -> ELF_HEADERS: first page "
            "(4096) from the file; data.bin rw has an anon page -> ANON_PRIVATE: whole, page 2 "
            "from pages-100.img, pages 0,1,3 from data.bin at offsets 1,2,4 pages; the "
            "read-only data.bin mapping has no anon page and is not an ELF: 0",
            "0x01: only the modified mapping is dumped (whole)",
            "0x3f: MAPPED_PRIVATE dumps every file mapping whole; the last 2 pages of the "
            "pgoff-4 mapping are past EOF (6 pages): holes, as get_dump_page() fails there",
            "NT_FILE lists all three with pgoff in pages (0, 1, 4)",
        ],
    }


def shared(d: Path) -> dict[str, Any]:
    root = d / "root"
    root.mkdir()
    (root / "shared.bin").write_bytes(pattern(0x6000_0000, 2, tag=0x5A5A))
    m, z, s = BASE, BASE + 16 * PAGE, BASE + 32 * PAGE
    proc = Proc(
        100,
        vmas=[
            memfd_vma(m, m + 4 * PAGE, file_id=4),
            vma(z, z + 2 * PAGE, flags=images.MAP_SHARED | images.MAP_ANONYMOUS,
                status=images.VMA_AREA_REGULAR | images.VMA_ANON_SHARED, shmid=88),
            file_vma(s, s + 2 * PAGE, file_id=7, shared=True,
                     prot=images.PROT_R | images.PROT_W),
        ],
    )  # fmt: skip
    images.build(
        d / "img",
        [proc],
        files=[images.memfd_file(4, 9), images.reg_file(7, "/shared.bin", 2 * PAGE)],
        memfds=[images.memfd_inode(9, "shm", 4 * PAGE, 77)],
        shmem={
            77: [(0, pattern(0, 1, tag=0x77)), (2 * PAGE, pattern(2 * PAGE, 1, tag=0x77))],
            88: [(PAGE, pattern(PAGE, 1, tag=0x88))],
        },
    )
    return {
        "covers": "a shared memfd, shared anonymous memory (/dev/zero), a shared file mapping",
        "files_root": "root",
        "variants": {
            "default": {},
            "filter-0x31": {"coredump_filter": 0x31},
            "filter-0x3f": {"coredump_filter": 0x3F},
        },
        "review": [
            "0x33: memfd and /dev/zero are unlinked shmem -> ANON_SHARED: whole, saved pages "
            "from their shmem pagemaps, the rest holes (zeros); shared.bin needs MAPPED_SHARED: 0",
            "0x31: no ANON_SHARED: memfd and /dev/zero 0",
            "0x3f: shared.bin dumped whole from the file",
            "NT_FILE: '/memfd:shm (deleted)', '/dev/zero (deleted)', '/shared.bin'",
        ],
    }


def dontdump(d: Path) -> dict[str, Any]:
    a, b = BASE, BASE + 16 * PAGE
    proc = Proc(
        100,
        vmas=[vma(a, a + 2 * PAGE, madv=1 << MADV_DONTDUMP), vma(b, b + 2 * PAGE)],
        pages=[(a, pattern(a, 2)), (b, pattern(b, 2, tag=3))],
    )
    images.build(d / "img", [proc])
    return {
        "covers": "MADV_DONTDUMP",
        "variants": {"default": {}, "filter-0x1ff": {"coredump_filter": 0x1FF}},
        "review": ["the DONTDUMP VMA is never dumped (0) even under 0x1ff; its twin is whole"],
    }


def predump_chain(d: Path) -> dict[str, Any]:
    a = BASE
    whole = [vma(a, a + 8 * PAGE)]
    images.build(
        d / "prev2",
        [Proc(100, vmas=whole, pages=[(a + 6 * PAGE, pattern(a + 6 * PAGE, 1, tag=0x22))])],
    )
    images.build(
        d / "prev",
        [
            Proc(
                100,
                vmas=whole,
                pages=[(a, pattern(a, 4, tag=0x11))],
                parent_runs=[(a + 6 * PAGE, 1)],
            )
        ],
    )
    images.build(
        d / "img",
        [
            Proc(
                100,
                vmas=whole,
                pages=[(a + PAGE, pattern(a + PAGE, 1, tag=0x33))],
                parent_runs=[(a, 1), (a + 2 * PAGE, 2), (a + 6 * PAGE, 1)],
            )
        ],
    )
    return {
        "covers": "a pre-dump chain of three image directories",
        "parents": {"img": "prev", "prev": "prev2"},
        "variants": {"default": {}},
        "review": [
            "page 0, 2, 3 from prev (tag 0x11), page 1 from img (0x33), page 6 from prev2 "
            "(0x22) through prev's in_parent entry; pages 4, 5, 7 holes"
        ],
    }


def tree(d: Path) -> dict[str, Any]:
    a = BASE
    procs = [
        Proc(100, ppid=1, comm="leader", argv=b"leader\0-x\0",
             vmas=[vma(a, a + 2 * PAGE)], pages=[(a, pattern(a, 1, tag=100))]),
        Proc(200, ppid=100, pgid=200, sid=100, comm="child-a", argv=b"child-a\0",
             vmas=[vma(a, a + 2 * PAGE)], pages=[(a + PAGE, pattern(a + PAGE, 1, tag=200))]),
        Proc(300, ppid=100, pgid=100, sid=100, comm="child-b", threads=[300, 301, 302],
             argv=b"child-b\0" + b"a" * 100 + b"\0", uid=0, gid=0,
             regs={301: {"ip": 0x402000}, 302: {"ip": 0x403000, "ax": 7}},
             vmas=[vma(a, a + PAGE)], pages=[(a, pattern(a, 1, tag=300))]),
    ]  # fmt: skip
    images.build(d / "img", procs, sidecar={"coredump_filter": 0x33})
    return {
        "covers": "a process tree: three processes, one with three threads",
        "variants": {"default": {}, "pid-300": {"pid": 300}},
        "review": [
            "one core per process; PRPSINFO pid/ppid/pgrp/sid from pstree; child-b's psargs "
            "cut at 79 bytes (ELF_PRARGSZ - 1), NULs as spaces",
            "child-b: PRSTATUS, PRPSINFO, SIGINFO, AUXV, FILE, FPREGSET, XSTATE, then "
            "PRSTATUS/FPREGSET/XSTATE for 301 and 302",
        ],
    }


def core_limit(d: Path) -> dict[str, Any]:
    a = BASE
    proc = Proc(100, vmas=[vma(a, a + 4 * PAGE)], pages=[(a, pattern(a, 4))])
    images.build(d / "img", [proc])
    return {
        "covers": "RLIMIT_CORE: below a page, mid-segment, unlimited",
        "variants": {
            "unlimited": {"core_limit": -1},
            "limit-4095": {"core_limit": 4095},
            "limit-3-pages-plus-100": {"core_limit": 3 * PAGE + 100},
            "limit-8-pages": {"core_limit": 8 * PAGE},
        },
        "review": [
            "4095 < one page: do_coredump() writes nothing",
            "3 pages + 100: headers and notes fit, then dump_emit_page() stops at the first "
            "page that would pass the limit; the file ends where the last write ended",
            "8 pages: only emitted bytes count against the limit (headers and notes, 4 + 1 "
            "data pages; untouched stack pages are dump_skip() holes): nothing is cut",
            "3 pages + 100: ~2.4 KiB of headers and notes + 2 data pages fit, the third would "
            "pass the limit: the file ends at 12288 with 8192 bytes of the first segment",
        ],
    }


CASES: dict[str, Builder] = {
    "private-anon": private_anon,
    "file-private": file_private,
    "shared": shared,
    "dontdump": dontdump,
    "predump-chain": predump_chain,
    "tree": tree,
    "core-limit": core_limit,
}


def to_json(src: Path, dst: Path) -> None:
    """Images of *src* as ``crit decode --pretty`` JSON in *dst*; pages and sidecar as they are."""
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.name.startswith("pages-") or not path.name.endswith(".img"):
            shutil.copyfile(path, dst / path.name)
            continue
        with path.open("rb") as f:
            image = pyimages.load(f, pretty=True)
        (dst / f"{path.name}.json").write_text(json.dumps(image, indent=1) + "\n")


def main() -> None:
    for name, builder in CASES.items():
        case = GOLDEN / name
        expected = case / "expected.json"
        keep = expected.read_bytes() if expected.exists() else None
        if case.exists():
            shutil.rmtree(case)
        with tempfile.TemporaryDirectory() as tmp:
            info = builder(Path(tmp))
            # pin the XSAVE layout: NT_X86_XSTATE's size and NT_X86_XSAVE_LAYOUT come from it,
            # and without a recorded one the converter uses this host CPU's
            sidecar = Path(tmp) / "img" / "livedump.json"
            facts = json.loads(sidecar.read_text()) if sidecar.exists() else {}
            sidecar.write_text(json.dumps({**facts, "xsave_layout": XSAVE_LAYOUT}))
            for sub in sorted(Path(tmp).iterdir()):
                if sub.name == "root":
                    shutil.copytree(sub, case / "root")
                else:
                    to_json(sub, case / sub.name)
        (case / "case.json").write_text(json.dumps(info, indent=1) + "\n")
        if keep is not None:
            expected.write_bytes(keep)
        print(case)


if __name__ == "__main__":
    main()

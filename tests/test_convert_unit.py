"""Converter unit tests on synthetic image sets (issue 3, "Acceptance": page-index edge cases,
parent chains, core-limit truncation; PN_XNUM, psargs, a sparse 1 TiB VMA, round trip)."""

from __future__ import annotations

import os
import struct
import subprocess
import time
import types
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import images
import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from converters import ConvertOptions, convert
from converters.arch import x86_64
from converters.errors import ImageFormatError, MissingImageError
from converters.images import MAP_HUGETLB, PageIndex
from converters.model import _sighold
from converters.model import build as build_model
from converters.sidecar import Sidecar

PAGE = images.PAGE
BASE = 0x1000_0000
NHDR = struct.Struct("<III")


def _convert(img: Path, out: Path, **opts: object) -> Path:
    out.mkdir(exist_ok=True)
    (result,) = convert(img, out, ConvertOptions(**opts))  # type: ignore[arg-type]
    assert result.path is not None
    return result.path


@dataclass
class Note:
    type: int
    name: bytes
    desc: bytes


def read_notes(core: Path) -> list[Note]:
    """Parse PT_NOTE by hand (independently of the writer and of pyelftools)."""
    with core.open("rb") as f:
        elf = ELFFile(f)
        seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE")
        f.seek(seg["p_offset"])
        raw = f.read(seg["p_filesz"])
    notes, pos = [], 0
    while pos < len(raw):
        namesz, descsz, ntype = NHDR.unpack_from(raw, pos)
        pos += NHDR.size
        name = raw[pos : pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        notes.append(Note(ntype, name, raw[pos : pos + descsz]))
        pos += (descsz + 3) & ~3
    return notes


def memory(core: Path, addr: int, size: int) -> bytes:
    """Bytes at *addr* as the core shows them (zeros past p_filesz)."""
    with core.open("rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            lo = seg["p_vaddr"]
            if lo <= addr and addr + size <= lo + seg["p_memsz"]:
                rel = addr - lo
                avail = max(0, min(size, seg["p_filesz"] - rel))
                f.seek(seg["p_offset"] + rel)
                return f.read(avail) + bytes(size - avail)
    raise AssertionError(f"{addr:#x} not in any PT_LOAD")


# --- page index ---------------------------------------------------------------------------------


def test_entries_out_of_order_and_adjacent(tmp_path: Path) -> None:
    order = [5, 1, 2, 7, 3]  # 1-2-3 adjacent, listed out of order
    proc = images.Proc(
        100,
        vmas=[images.vma(BASE, BASE + 8 * PAGE)],
        pages=[(BASE + i * PAGE, images.pattern(BASE + i * PAGE, tag=i)) for i in order],
    )
    core = _convert(images.build(tmp_path / "img", [proc]), tmp_path / "out")
    for i in range(8):
        want = images.pattern(BASE + i * PAGE, tag=i) if i in order else bytes(PAGE)
        assert memory(core, BASE + i * PAGE, PAGE) == want, f"page {i}"


def test_lazy_pages(tmp_path: Path) -> None:
    """PE_LAZY alone: bytes not in this image set (hole); PE_LAZY|PE_PRESENT: in pages-N."""
    proc = images.Proc(
        100,
        vmas=[images.vma(BASE, BASE + 4 * PAGE)],
        pages=[(BASE, images.pattern(BASE))],
        lazy_runs=[(BASE + PAGE, 2)],
        present_flags=images.PE_LAZY | images.PE_PRESENT,
    )
    core = _convert(images.build(tmp_path / "img", [proc]), tmp_path / "out")
    assert memory(core, BASE, PAGE) == images.pattern(BASE)
    assert memory(core, BASE + PAGE, 3 * PAGE) == bytes(3 * PAGE)


def test_parent_chain_recursive(tmp_path: Path) -> None:
    """in_parent runs resolve through parent/ directories, the nearest saved copy winning."""
    region = [images.vma(BASE, BASE + 4 * PAGE)]

    def level(name: str, pages: dict[int, int], parent: list[tuple[int, int]]) -> Path:
        proc = images.Proc(
            100,
            vmas=region,
            pages=[
                (BASE + i * PAGE, images.pattern(BASE + i * PAGE, tag=t)) for i, t in pages.items()
            ],
            parent_runs=[(BASE + i * PAGE, n) for i, n in parent],
        )
        return images.build(tmp_path / name, [proc])

    level("grand", {1: 0xA1, 2: 0xA2, 3: 0xA3}, [])
    level("mid", {1: 0xB1}, [(2, 2)])
    os.symlink("../grand", tmp_path / "mid" / "parent")
    top = level("top", {0: 0xC0}, [(1, 3)])
    os.symlink("../mid", top / "parent")
    core = _convert(top, tmp_path / "out")
    for i, tag in enumerate([0xC0, 0xB1, 0xA2, 0xA3]):
        assert memory(core, BASE + i * PAGE, PAGE) == images.pattern(BASE + i * PAGE, tag=tag)


@pytest.mark.parametrize("loop", ["self", "pair"])
def test_parent_loop_is_a_clear_error(tmp_path: Path, loop: str) -> None:
    proc = images.Proc(100, vmas=[images.vma(BASE, BASE + PAGE)], parent_runs=[(BASE, 1)])
    a = images.build(tmp_path / "a", [proc])
    if loop == "self":
        os.symlink(".", a / "parent")
    else:
        b = images.build(tmp_path / "b", [proc])
        os.symlink("../b", a / "parent")
        os.symlink("../a", b / "parent")
    with pytest.raises(ImageFormatError, match="parent chain loops back to") as exc:
        convert(a, tmp_path, ConvertOptions())
    assert "pagemap-100.img" in str(exc.value)
    assert not list(tmp_path.glob("core.*")) and not list(tmp_path.glob(".core*"))


def test_missing_parent_directory(tmp_path: Path) -> None:
    proc = images.Proc(100, vmas=[images.vma(BASE, BASE + PAGE)], parent_runs=[(BASE, 1)])
    img = images.build(tmp_path / "a", [proc])
    with pytest.raises(MissingImageError, match="parent"):
        convert(img, tmp_path, ConvertOptions())


def test_overlapping_entries_rejected(tmp_path: Path) -> None:
    proc = images.Proc(
        100,
        vmas=[images.vma(BASE, BASE + 4 * PAGE)],
        pages=[(BASE, images.pattern(BASE, 2)), (BASE + PAGE, images.pattern(BASE + PAGE))],
    )
    img = images.build(tmp_path / "img", [proc])
    with pytest.raises(ImageFormatError, match=r"pagemap-100\.img: entry \d overlaps entry \d"):
        convert(img, tmp_path, ConvertOptions())


@st.composite
def _runs(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Disjoint page runs (start page, nr) in random order, some adjacent."""
    out, page = [], 0
    for _ in range(draw(st.integers(0, 12))):
        page += draw(st.integers(0, 3))
        nr = draw(st.integers(1, 4))
        out.append((page, nr))
        page += nr
    return draw(st.permutations(out))


@given(_runs(), st.integers(0, 60), st.integers(0, 60))
@settings(max_examples=300, deadline=None)
def test_page_index_lookup_matches_brute_force(runs: list[tuple[int, int]], a: int, b: int) -> None:
    """PageIndex.segments() (bisect) against a per-page dictionary."""
    lo, hi = min(a, b) * PAGE, max(a, b) * PAGE
    fake = Path("/pages")
    ordered = sorted(runs)
    index = PageIndex(
        "pagemap",
        fake,
        starts=array("Q", [p * PAGE for p, _ in ordered]),
        ends=array("Q", [(p + n) * PAGE for p, n in ordered]),
        offsets=array("q", [p * 7 * PAGE for p, _ in ordered]),
    )
    want = {
        (p + k) * PAGE: (p * 7 + k) * PAGE
        for p, n in ordered
        for k in range(n)
        if lo <= (p + k) * PAGE < hi
    }
    got: dict[int, int] = {}
    prev = lo
    for s_lo, s_hi, path, off in index.segments(lo, hi):
        assert path == fake and lo <= s_lo < s_hi <= hi and s_lo >= prev
        prev = s_hi
        for addr in range(s_lo, s_hi, PAGE):
            got[addr] = off + addr - s_lo
    assert got == want


# --- core limit ---------------------------------------------------------------------------------


def _limit_fixture(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    data = bytes(range(256)) * (3 * PAGE // 256)
    (root / "lib" / "data.bin").write_bytes(data)
    proc = images.Proc(
        100,
        threads=[100, 101],
        vmas=[
            images.vma(BASE, BASE + 6 * PAGE),
            images.file_vma(BASE + 8 * PAGE, BASE + 11 * PAGE, file_id=7),
            images.vma(0x7FFF_0000_0000, 0x7FFF_0000_0000 + 3 * PAGE),  # ends in a hole
        ],
        pages=[
            (BASE + PAGE, images.pattern(BASE + PAGE, 2)),
            (BASE + 4 * PAGE, images.pattern(BASE + 4 * PAGE)),
            (0x7FFF_0000_0000, images.pattern(0x7FFF_0000_0000)),
        ],
    )
    img = images.build(
        tmp_path / "img", [proc], files=[images.reg_file(7, "/lib/data.bin", len(data))]
    )
    return img, root


def _emits(img: Path, core: Path, opts: ConvertOptions) -> list[tuple[int, int]]:
    """The (offset, length) of every dump_emit() the kernel would make for this core, in order:
    the ELF header, each program header, each note's header/name/desc (padding is a skip),
    each dumped page (holes are skips), and the last byte when the file ends in a hole."""
    full = core.stat().st_size
    out = [(0, 64)]
    with core.open("rb") as f:
        elf = ELFFile(f)
        segs = list(elf.iter_segments())
        out += [(64 + 56 * i, 56) for i in range(len(segs))]
        note = segs[0]
        f.seek(note["p_offset"])
        raw = f.read(note["p_filesz"])
    pos = 0
    base = note["p_offset"]
    while pos < len(raw):
        namesz, descsz, _ = NHDR.unpack_from(raw, pos)
        out.append((base + pos, 12))
        pos += 12
        out.append((base + pos, namesz))
        pos += (namesz + 3) & ~3
        out.append((base + pos, descsz))
        pos += (descsz + 3) & ~3
    from converters.images import ImageSet

    model = build_model(ImageSet.open(img), 100, opts, Sidecar())
    try:
        loads = [s for s in segs if s["p_type"] == "PT_LOAD"]
        for seg, mseg in zip(loads, model.segments, strict=True):
            off = seg["p_offset"]
            for piece in mseg.pieces:
                if piece.kind != "hole":
                    out += [(off + k, PAGE) for k in range(0, piece.length, PAGE)]
                off += piece.length
    finally:
        model.close()
    end = max(o + n for o, n in out)
    if end < full:
        out.append((full - 1, 1))
    return out


def _expected_size(emits: list[tuple[int, int]], limit: int) -> int:
    written = size = 0
    for off, n in emits:
        if written + n > limit:
            break
        written += n
        size = off + n
    return size


def test_core_limit_cuts_where_the_kernel_would(tmp_path: Path) -> None:
    img, root = _limit_fixture(tmp_path)
    opts = ConvertOptions(coredump_filter=0x3F, files_root=root)
    full_path = _convert(img, tmp_path / "full", coredump_filter=0x3F, files_root=root)
    full = full_path.read_bytes()
    emits = _emits(img, full_path, opts)
    assert sum(n for _, n in emits) < len(full)  # the fixture has holes inside and at the end
    limits = {PAGE, PAGE + 1, len(full), len(full) + 1, 1 << 40}
    written = 0
    for _, n in emits:
        written += n
        limits |= {written - 1, written, written + 1}
    for i, limit in enumerate(sorted(x for x in limits if x >= PAGE)):
        out = tmp_path / f"l{i}"
        path = _convert(img, out, coredump_filter=0x3F, files_root=root, core_limit=limit)
        got = path.read_bytes()
        want = _expected_size(emits, limit)
        assert len(got) == want, f"limit {limit}"
        assert got == full[:want], f"limit {limit}"


@pytest.mark.parametrize("limit", [0, 1, PAGE - 1])
def test_core_limit_below_a_page_writes_nothing(tmp_path: Path, limit: int) -> None:
    img = images.simple(tmp_path / "img")
    (out := tmp_path / "out").mkdir()
    (result,) = convert(img, out, ConvertOptions(core_limit=limit))
    assert result.path is None and list(out.iterdir()) == []
    assert any("below one page" in w for w in result.warnings)


# --- ELF edge cases -----------------------------------------------------------------------------


def test_pn_xnum(tmp_path: Path) -> None:
    """>= 65535 program headers: e_phnum = PN_XNUM, section header 0's sh_info = real count."""
    n = 65535  # + PT_NOTE + the stack = 65537 program headers
    vmas = [images.vma(BASE + 2 * i * PAGE, BASE + (2 * i + 1) * PAGE, prot=0) for i in range(n)]
    core = _convert(images.build(tmp_path / "img", [images.Proc(100, vmas=vmas)]), tmp_path / "o")
    with core.open("rb") as f:
        elf = ELFFile(f)
        assert elf["e_phnum"] == 0xFFFF
        assert elf["e_shnum"] == 1
        sh0 = elf._get_section_header(0)
        assert sh0["sh_info"] == n + 2
        assert elf.num_segments() == n + 2
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert [s["p_vaddr"] for s in loads[:3]] == [BASE, BASE + 2 * PAGE, BASE + 4 * PAGE]
        assert elf["e_shoff"] + 64 == core.stat().st_size
    head = subprocess.run(
        ["readelf", "-h", str(core)], capture_output=True, text=True, check=True
    ).stdout
    assert f"Number of program headers:         65535 ({n + 2})" in head
    progs = subprocess.run(
        ["readelf", "-l", "-W", str(core)], capture_output=True, text=True, check=True
    ).stdout
    assert progs.count("  LOAD ") == n + 1


@pytest.mark.parametrize(
    "argv",
    [b"prog\0arg\0", b"x" * 79, b"y" * 80, b"a\0" * 60, b"p\0" + b"z" * 200 + b"\0"],
)
def test_psargs(tmp_path: Path, argv: bytes) -> None:
    """fill_psinfo(): at most ELF_PRARGSZ - 1 bytes of the argument area, NULs as spaces."""
    img = images.build(
        tmp_path / "img", [images.Proc(100, argv=argv, comm="averyverylongcommandname")]
    )
    core = _convert(img, tmp_path / "out")
    prpsinfo = next(n for n in read_notes(core) if n.type == 3)
    fname, psargs = prpsinfo.desc[40:56], prpsinfo.desc[56:136]
    want = argv[:79].replace(b"\0", b" ")
    assert psargs == want.ljust(80, b"\0")
    assert fname == b"averyverylongco\0"


def test_sparse_terabyte_vma(tmp_path: Path) -> None:
    """A 1 TiB anonymous VMA with three touched pages becomes a sparse file."""
    size = 1 << 40
    big = 0x1000_0000_0000
    touched = [big, big + size // 2, big + size - PAGE]
    proc = images.Proc(
        100,
        vmas=[images.vma(big, big + size)],
        pages=[(a, images.pattern(a, tag=7)) for a in touched],
    )
    img = images.build(tmp_path / "img", [proc])
    started = time.monotonic()
    core = _convert(img, tmp_path / "out")
    elapsed = time.monotonic() - started
    print(f"1 TiB sparse VMA converted in {elapsed:.3f} s")  # figure for RELIABILITY.md
    st_ = core.stat()
    assert st_.st_size > size
    assert st_.st_blocks * 512 < 4 << 20
    for a in touched:
        assert memory(core, a, PAGE) == images.pattern(a, tag=7)
    assert memory(core, big + PAGE, PAGE) == bytes(PAGE)


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_against_the_model(tmp_path: Path) -> None:
    proc = images.Proc(
        200,
        threads=[200, 201, 202],
        regs={200: {"ip": 0x401111}, 201: {"ip": 0x402222}, 202: {"ip": 0x403333, "r12": 42}},
        auxv=[6, PAGE, 16, 0xBFEBFBFF, 25, images.STACK_START + 16, 0, 0],
        vmas=[images.vma(BASE, BASE + 2 * PAGE, prot=images.PROT_R | images.PROT_X)],
        pages=[(BASE, images.pattern(BASE))],
    )
    img = images.build(tmp_path / "img2", [proc])
    opts = ConvertOptions()
    core = _convert(img, tmp_path / "out")
    from converters.images import ImageSet

    model = build_model(ImageSet.open(img), 200, opts, Sidecar())
    model.close()
    with core.open("rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_X86_64"
        segs = list(elf.iter_segments())
        assert segs[0]["p_type"] == "PT_NOTE"
        loads = segs[1:]
        assert len(loads) == len(model.segments)
        for seg, m in zip(loads, model.segments, strict=True):
            assert seg["p_type"] == "PT_LOAD"
            assert (seg["p_vaddr"], seg["p_memsz"], seg["p_filesz"], seg["p_flags"]) == (
                m.vaddr, m.memsz, m.filesz, m.flags,
            )  # fmt: skip
            assert seg["p_offset"] % PAGE == 0
    notes = read_notes(core)
    assert [n.type for n in notes] == [n.type for n in model.notes]
    assert [n.desc for n in notes] == [n.desc for n in model.notes]
    # NT_PRSTATUS per thread, main first: pr_pid at 32, rip at 112 + 16*8
    prs = [n for n in notes if n.type == 1]
    assert [struct.unpack_from("<i", n.desc, 32)[0] for n in prs] == [200, 201, 202]
    assert [struct.unpack_from("<Q", n.desc, 112 + 16 * 8)[0] for n in prs] == [
        0x401111, 0x402222, 0x403333,
    ]  # fmt: skip
    auxv = next(n for n in notes if n.type == 6)
    assert struct.unpack(f"<{len(auxv.desc) // 8}Q", auxv.desc) == tuple(proc.auxv)
    assert memory(core, BASE, PAGE) == images.pattern(BASE)
    assert memory(core, images.STACK_START + 3 * PAGE, 9) == proc.argv[:9]


def test_file_mapping_ending_mid_page(tmp_path: Path) -> None:
    """The last page of a file mapping past EOF reads as zeros (regression: EIO before)."""
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    content = bytes(range(256)) * 20 + b"tail"  # 5124 bytes: two pages, the second partial
    (root / "lib" / "odd.so").write_bytes(content)
    proc = images.Proc(100, vmas=[images.file_vma(BASE, BASE + 2 * PAGE, file_id=5)])
    img = images.build(
        tmp_path / "img", [proc], files=[images.reg_file(5, "/lib/odd.so", len(content))]
    )
    core = _convert(img, tmp_path / "out", coredump_filter=0x3F, files_root=root)
    assert memory(core, BASE, 2 * PAGE) == content.ljust(2 * PAGE, b"\0")


def _replaced_library(tmp_path: Path) -> tuple[Path, Path, bytes, int]:
    """Images mapping *lib* (two pages), then *lib* replaced on disk: (images, lib, old bytes,
    a descriptor of the old, now deleted, file)."""
    lib = tmp_path / "lib.so"
    old = bytes(range(256)) * (2 * PAGE // 256)
    lib.write_bytes(old)
    fd = os.open(lib, os.O_RDONLY)
    (tmp_path / "new.so").write_bytes(b"\xee" * len(old))
    (tmp_path / "new.so").rename(lib)
    proc = images.Proc(100, vmas=[images.file_vma(BASE, BASE + 2 * PAGE, file_id=5)])
    img = images.build(tmp_path / "img", [proc], files=[images.reg_file(5, str(lib), len(old))])
    return img, lib, old, fd


def test_held_descriptor_reads_the_mapped_file_not_the_name(tmp_path: Path) -> None:
    """A live dump hands over /proc/PID/map_files descriptors: the kernel reads the mapped
    inode, so a library replaced on disk must not leak its new bytes into the core."""
    img, _, old, fd = _replaced_library(tmp_path)
    try:
        held = _convert(img, tmp_path / "held", coredump_filter=0x3F, mapped_fds={BASE: fd})
        by_name = _convert(img, tmp_path / "by-name", coredump_filter=0x3F)
    finally:
        os.close(fd)
    assert memory(held, BASE, 2 * PAGE) == old
    assert memory(by_name, BASE, 2 * PAGE) == b"\xee" * len(old)


def test_held_descriptor_of_another_file_is_not_used(tmp_path: Path) -> None:
    img, lib, _, fd = _replaced_library(tmp_path)
    os.close(fd)
    other = tmp_path / "other.so"
    other.write_bytes(b"\x11" * 2 * PAGE)
    fd = os.open(other, os.O_RDONLY)
    (tmp_path / "out").mkdir()
    try:
        (result,) = convert(
            img, tmp_path / "out", ConvertOptions(coredump_filter=0x3F, mapped_fds={BASE: fd})
        )
    finally:
        os.close(fd)
    assert result.path is not None
    assert memory(result.path, BASE, 2 * PAGE) == b"\xee" * 2 * PAGE
    assert result.warnings == [f"{lib}: the mapping at {BASE:#x} now maps {other}; read by name"]


# --- deleted mapped files: CRIU's ghost-file images -------------------------------------------


def _ghost_images(tmp_path: Path, *, chunks: list[tuple[int, int]] | None) -> tuple[Path, bytes]:
    """A private mapping of a 4-page file deleted before the dump, whose bytes CRIU copied
    into ghost-file-1.img (whole, or as *chunks*)."""
    content = bytes((i * 11 + (i >> 12)) & 0xFF for i in range(4 * PAGE))
    proc = images.Proc(100, vmas=[images.file_vma(BASE, BASE + 4 * PAGE, file_id=5)])
    img = images.build(
        tmp_path / "img", [proc], files=[images.reg_file(5, "/gone/lib.so", len(content))]
    )
    images.remap_ghost(img, (5, 1))
    images.ghost_image(img / "ghost-file-1.img", content, chunks=chunks)
    return img, content


def test_deleted_file_read_from_its_ghost_image(tmp_path: Path) -> None:
    img, content = _ghost_images(tmp_path, chunks=None)
    (result,) = convert(img, _out(tmp_path), ConvertOptions(coredump_filter=0x3F))
    assert result.path is not None and result.warnings == []
    assert memory(result.path, BASE, 4 * PAGE) == content


def test_deleted_file_ghost_chunks_and_holes(tmp_path: Path) -> None:
    """Chunked ghosts leave the file's holes out: those pages read as zeros, as the file's."""
    img, content = _ghost_images(tmp_path, chunks=[(0, PAGE + 100), (3 * PAGE, PAGE)])
    (result,) = convert(img, _out(tmp_path), ConvertOptions(coredump_filter=0x3F))
    assert result.path is not None and result.warnings == []
    want = content[: PAGE + 100] + bytes(2 * PAGE - 100) + content[3 * PAGE :]
    assert memory(result.path, BASE, 4 * PAGE) == want


def test_deleted_file_without_ghost_image_is_holes_with_a_warning(tmp_path: Path) -> None:
    """A LINKED remap (CRIU linked the file back instead of copying it): nothing to read."""
    img, _ = _ghost_images(tmp_path, chunks=None)
    images.write_image(
        img / "remap-fpath.img",
        "REMAP_FPATH",
        [{"orig_id": 5, "remap_id": 1, "remap_type": "LINKED"}],
    )
    (result,) = convert(img, _out(tmp_path), ConvertOptions(coredump_filter=0x3F))
    assert result.path is not None
    assert memory(result.path, BASE, 4 * PAGE) == bytes(4 * PAGE)
    assert result.warnings == [
        f"/gone/lib.so: deleted file at {BASE:#x}; its unsaved pages are holes"
    ]


def _out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


# --- hugetlb ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mm_filter", "dumped"),
    [(0x33, True), (0x13, False), (0x20, True), (0x03, False)],
)
def test_private_hugetlb_follows_its_own_filter_bit(
    tmp_path: Path, mm_filter: int, dumped: bool
) -> None:
    """is_vm_hugetlb_page(): HUGETLB_PRIVATE (0x20) alone decides, whole or nothing, whatever
    ANON_PRIVATE says; NT_FILE lists the mapping's hugetlbfs file."""
    size = 2 << 20
    flags = images.MAP_PRIVATE | images.MAP_ANONYMOUS | MAP_HUGETLB
    proc = images.Proc(
        100,
        vmas=[images.vma(BASE, BASE + size, flags=flags)],
        pages=[(BASE, images.pattern(BASE, 2))],
    )
    img = images.build(tmp_path / "img", [proc])
    core = _convert(img, tmp_path / "out", coredump_filter=mm_filter)
    with core.open("rb") as f:
        (load,) = [s for s in ELFFile(f).iter_segments() if s["p_vaddr"] == BASE]
        assert load["p_memsz"] == size
        assert load["p_filesz"] == (size if dumped else 0)
    if dumped:
        assert memory(core, BASE, 2 * PAGE) == images.pattern(BASE, 2)
    (nt_file,) = [n for n in read_notes(core) if n.type == 0x46494C45]
    assert nt_file.desc.endswith(b"/anon_hugepage (deleted)\0")


def test_dontfork_areas_the_images_lack(tmp_path: Path) -> None:
    """Sidecar ``dontfork`` (clone snapshots): an area the images lack is put back without
    bytes, named in a warning when it held bytes; one the images cover is left alone."""
    covered = BASE + 32 * PAGE
    proc = images.Proc(
        100,
        vmas=[images.vma(covered, covered + 2 * PAGE)],
        pages=[(covered, images.pattern(covered, 2))],
    )
    lost, untouched = BASE, BASE + 8 * PAGE
    img = images.build(
        tmp_path / "img",
        [proc],
        sidecar={
            "dontfork": [
                [lost, lost + 4 * PAGE, "rw-p", True],
                [untouched, untouched + 4 * PAGE, "r--p", False],
                [covered, covered + 2 * PAGE, "rw-p", True],
            ]
        },
    )
    (result,) = convert(img, _out(tmp_path), ConvertOptions())
    assert result.path is not None
    assert result.warnings == [
        f"[{lost:#x}, {lost + 4 * PAGE:#x}) is MADV_DONTFORK: absent from the clone snapshot,"
        " written without bytes (use --method criu for them)"
    ]
    with result.path.open("rb") as f:
        loads = {s["p_vaddr"]: s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"}
        assert (loads[lost]["p_memsz"], loads[lost]["p_filesz"]) == (4 * PAGE, 0)
        assert loads[lost]["p_flags"] == 6  # PF_R | PF_W
        assert (loads[untouched]["p_memsz"], loads[untouched]["p_filesz"]) == (4 * PAGE, 0)
        assert loads[covered]["p_filesz"] == 2 * PAGE
    assert memory(result.path, covered, 2 * PAGE) == images.pattern(covered, 2)


class _Memory:
    """The parts of a process's model that pr_sighold reads: memory present or not, warnings."""

    def __init__(self, pages: dict[int, bytes]) -> None:
        self.pages = pages
        self.warnings: list[str] = []

    def read(self, addr: int, size: int) -> bytes:
        return self.pages.get(addr, bytes(size))[:size]

    def read_present(self, addr: int, size: int) -> bytes | None:
        return self.pages[addr][:size] if addr in self.pages else None

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_sighold_of_masked_waits() -> None:
    """pr_sighold is the temporary mask a masked wait installed (read from the images, SIGKILL
    and SIGSTOP dropped), pselect6's through its {sigset ptr, size} pair; the saved mask with a
    warning when that memory is not in the images, and without one for a NULL mask."""
    kill_stop = (1 << 8) | (1 << 18)
    mem = _Memory(
        {
            0x1000: struct.pack("<Q", 0x4 | kill_stop),
            0x2000: struct.pack("<QQ", 0x1000, 8),
            0x3000: struct.pack("<QQ", 0, 8),
        }
    )
    thread = types.SimpleNamespace(tid=7, arch=x86_64.ARCH)
    nohand = -x86_64.ERESTARTNOHAND & ((1 << 64) - 1)

    def sighold(nr: int, **args: int) -> int:
        regs = x86_64.pack_regs({"orig_rax": nr, "rax": nohand, **args})
        return _sighold(cast("Any", mem), cast("Any", thread), regs, 0x200)

    assert sighold(x86_64.SYS.rt_sigsuspend, rdi=0x1000) == 0x4
    assert sighold(x86_64.SYS.pselect6, r9=0x2000) == 0x4
    assert sighold(x86_64.SYS.pselect6, r9=0x3000) == 0x200
    assert sighold(x86_64.SYS.ppoll, r10=0) == 0x200
    assert mem.warnings == []
    assert sighold(x86_64.SYS.rt_sigsuspend, rdi=0x5000) == 0x200
    assert sighold(x86_64.SYS.pselect6, r9=0x6000) == 0x200
    assert len(mem.warnings) == 2 and all("thread 7" in w for w in mem.warnings)
    assert sighold(x86_64.SYS.pause, rdi=0x1000) == 0x200

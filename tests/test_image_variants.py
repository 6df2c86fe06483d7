"""Every image-format variant a CRIU release since 3.11 writes (and the older ones CRIU itself
still reads), on synthetic images named for the release that writes them (issue 19).

Each test writes the same process state in one release's layout and checks the core holds the
same bytes and facts as the 4.2 layout gives; converters/images.py holds the table of variants.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import images
import pytest
from elftools.elf.elffile import ELFFile
from test_convert_unit import BASE, PAGE, _convert, _ghost_images, memory, read_notes

from converters.errors import ImageFormatError
from converters.images import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    dump_image,
    load_image,
    pagemap_runs,
)

#: (the CRIU releases that write it, the key of images.PAGEMAP_LAYOUTS)
PAGEMAP_WRITERS = [
    pytest.param("4.2", id="criu-4.2-nr_pages-field-5"),
    pytest.param("3.5-4.1", id="criu-3.5-to-4.1.1-nr_pages-field-2"),
    pytest.param("2.x", id="criu-2.x-in_parent"),
]


def _region_proc(layout: str, **kwargs: object) -> images.Proc:
    return images.Proc(
        100,
        vmas=[images.vma(BASE, BASE + 8 * PAGE)],
        pages=[(BASE, images.pattern(BASE, 3)), (BASE + 5 * PAGE, images.pattern(BASE + 5 * PAGE))],
        pagemap_layout=layout,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("layout", PAGEMAP_WRITERS)
def test_pagemap_page_counts(tmp_path: Path, layout: str) -> None:
    """Multi-page runs are read from whichever field the release put the count in."""
    core = _convert(images.build(tmp_path / "img", [_region_proc(layout)]), tmp_path / "out")
    assert memory(core, BASE, 3 * PAGE) == images.pattern(BASE, 3)
    assert memory(core, BASE + 3 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert memory(core, BASE + 5 * PAGE, PAGE) == images.pattern(BASE + 5 * PAGE)


@pytest.mark.parametrize("layout", PAGEMAP_WRITERS)
def test_pagemap_parent_runs(tmp_path: Path, layout: str) -> None:
    """A pre-dump chain in one release's layout: PE_PARENT (flags) or in_parent (2.x)."""
    proc = _region_proc(layout)
    images.build(tmp_path / "prev", [proc])
    top = images.Proc(
        100,
        vmas=proc.vmas,
        pages=[(BASE + PAGE, images.pattern(BASE + PAGE, tag=0x77))],
        parent_runs=[(BASE + 5 * PAGE, 1), (BASE + 2 * PAGE, 1)],
        pagemap_layout=layout,
    )
    img = images.build(tmp_path / "top", [top])
    os.symlink("../prev", img / "parent")
    core = _convert(img, tmp_path / "out")
    assert memory(core, BASE, PAGE) == bytes(PAGE)  # not in the top's pagemap: never saved
    assert memory(core, BASE + PAGE, PAGE) == images.pattern(BASE + PAGE, tag=0x77)
    assert memory(core, BASE + 2 * PAGE, PAGE) == images.pattern(BASE, 3)[2 * PAGE :]
    assert memory(core, BASE + 5 * PAGE, PAGE) == images.pattern(BASE + 5 * PAGE)


@pytest.mark.parametrize("layout", PAGEMAP_WRITERS[:2])
def test_pagemap_lazy_runs(tmp_path: Path, layout: str) -> None:
    """CRIU >= 3.5 marks anonymous pages PE_LAZY|PE_PRESENT; PE_LAZY alone is not here."""
    proc = _region_proc(
        layout, lazy_runs=[(BASE + 3 * PAGE, 2)], present_flags=PE_LAZY | PE_PRESENT
    )
    core = _convert(images.build(tmp_path / "img", [proc]), tmp_path / "out")
    assert memory(core, BASE, 3 * PAGE) == images.pattern(BASE, 3)
    assert memory(core, BASE + 3 * PAGE, 2 * PAGE) == bytes(2 * PAGE)


@pytest.mark.parametrize("layout", PAGEMAP_WRITERS)
def test_pagemap_runs_for_image_rewriting(tmp_path: Path, layout: str) -> None:
    """The runs clone_images reads before adding fork-lost pages, in every layout."""
    proc = _region_proc(layout, parent_runs=[(BASE + 7 * PAGE, 1)], with_stack=False)
    images.build(tmp_path / "img", [proc])
    assert pagemap_runs(tmp_path / "img" / "pagemap-100.img") == [
        (BASE, 3, PE_PRESENT),
        (BASE + 5 * PAGE, 1, PE_PRESENT),
        (BASE + 7 * PAGE, 1, PE_PARENT),
    ]


def test_pagemap_in_parent_beside_flags(tmp_path: Path) -> None:
    """criu/pagemap.c:init_compat_pagemap_entry(): in_parent adds PE_PARENT even next to flags;
    in_parent false with no flags is PE_PRESENT."""
    entries = [
        {"vaddr": BASE, "compat_nr_pages": 1, "in_parent": True, "flags": PE_LAZY},
        {"vaddr": BASE + PAGE, "compat_nr_pages": 2, "in_parent": False},
    ]
    path = tmp_path / "pagemap-1.img"
    images.write_image(path, "PAGEMAP", [{"pages_id": 1}, *entries])
    assert pagemap_runs(path) == [(BASE, 1, PE_LAZY | PE_PARENT), (BASE + PAGE, 2, PE_PRESENT)]


def test_shmem_pagemap_of_criu_4_1(tmp_path: Path) -> None:
    """pagemap-shmem-N.img uses the same entry: a CRIU 4.1 memfd's pages are found."""
    memfd_start = BASE + 0x10_0000
    proc = images.Proc(100, vmas=[images.memfd_vma(memfd_start, memfd_start + 2 * PAGE, 7)])
    img = images.build(
        tmp_path / "img",
        [proc],
        files=[images.memfd_file(7, 1)],
        memfds=[images.memfd_inode(1, "data", 2 * PAGE, 42)],
        shmem={42: [(PAGE, images.pattern(0x42))]},
        shmem_layout="3.5-4.1",
    )
    core = _convert(img, tmp_path / "out", coredump_filter=0x3F)
    assert memory(core, memfd_start, PAGE) == bytes(PAGE)
    assert memory(core, memfd_start + PAGE, PAGE) == images.pattern(0x42)


def test_guard_ranges_of_criu_4_2(tmp_path: Path) -> None:
    """CRIU 4.2 lists MADV_GUARD_INSTALL ranges as VMA_AREA_GUARD entries overlapping real
    VMAs: no program header of their own, and a file-backed range reads as a hole."""
    root = tmp_path / "root"
    root.mkdir()
    content = bytes(range(256)) * (4 * PAGE // 256)
    (root / "data").write_bytes(content)
    file_base = BASE + 0x10_0000
    proc = images.Proc(
        100,
        vmas=[
            images.vma(BASE, BASE + 4 * PAGE),
            images.file_vma(file_base, file_base + 4 * PAGE, file_id=5),
        ],
        pages=[(BASE, images.pattern(BASE))],
        guards=[(BASE + PAGE, BASE + 3 * PAGE), (file_base + PAGE, file_base + 2 * PAGE)],
    )
    img = images.build(tmp_path / "img", [proc], files=[images.reg_file(5, "/data", len(content))])
    core = _convert(img, tmp_path / "out", coredump_filter=0x3F, files_root=root)
    assert memory(core, BASE, PAGE) == images.pattern(BASE)
    assert memory(core, file_base, PAGE) == content[:PAGE]
    assert memory(core, file_base + PAGE, PAGE) == bytes(PAGE)
    assert memory(core, file_base + 2 * PAGE, 2 * PAGE) == content[2 * PAGE :]
    with ELFFile((tmp_path / "out" / "core.100").open("rb")) as elf:
        loads = [s["p_vaddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert loads.count(BASE) == 1 and loads.count(file_base) == 1


def test_reg_files_image_before_criu_3_4(tmp_path: Path) -> None:
    """Before files.img (CRIU 3.4), regular files were in reg-files.img as reg_file_entry."""
    root = tmp_path / "root"
    root.mkdir()
    content = bytes(range(256)) * (2 * PAGE // 256)
    (root / "lib.so").write_bytes(content)
    proc = images.Proc(100, vmas=[images.file_vma(BASE, BASE + 2 * PAGE, file_id=5)])
    img = images.build(tmp_path / "img", [proc])
    images.write_image(
        img / "reg-files.img", "REG_FILES", [images.reg_file(5, "/lib.so", len(content))["reg"]]
    )
    core = _convert(img, tmp_path / "out", coredump_filter=0x3F, files_root=root)
    assert memory(core, BASE, 2 * PAGE) == content


@pytest.mark.parametrize("version", [1, 2])
def test_inventory_versions_criu_writes(tmp_path: Path, version: int) -> None:
    """img_version 1 (CRTOOLS_IMAGES_V1) and 2 (V1_1, every release since 1.x) convert."""
    img = images.simple(tmp_path / "img")
    images.write_image(img / "inventory.img", "INVENTORY", [{"img_version": version}])
    core = _convert(img, tmp_path / "out")
    assert memory(core, BASE, PAGE) == images.pattern(BASE)


def test_inventory_version_no_criu_wrote(tmp_path: Path) -> None:
    img = images.simple(tmp_path / "img")
    images.write_image(img / "inventory.img", "INVENTORY", [{"img_version": 3}])
    with pytest.raises(ImageFormatError, match=r"inventory\.img: image version 3 is not one"):
        _convert(img, tmp_path / "out")


@pytest.mark.parametrize(
    "remap",
    [
        pytest.param({"remap_id": 1, "remap_type": "GHOST"}, id="criu-1.4-on-remap_type"),
        pytest.param({"remap_id": 1 | 1 << 31}, id="criu-before-1.4-top-bit"),
    ],
)
def test_ghost_remaps(tmp_path: Path, remap: dict[str, object]) -> None:
    """A deleted file's ghost copy found through remap-fpath.img in either layout."""
    img, content = _ghost_images(tmp_path, chunks=None)
    images.write_image(img / "remap-fpath.img", "REMAP_FPATH", [{"orig_id": 5, **remap}])
    core = _convert(img, tmp_path / "out", coredump_filter=0x3F)
    assert memory(core, BASE, 4 * PAGE) == content


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(None, id="criu-before-3.3-whole"),
        pytest.param([(0, PAGE), (2 * PAGE, 2 * PAGE)], id="criu-3.3-on-chunks"),
    ],
)
def test_ghost_file_layouts(tmp_path: Path, chunks: list[tuple[int, int]] | None) -> None:
    """ghost-file-N.img: the bytes after the entry (before 3.3, and small files since), or
    chunks since 3.3 (0ce86c360), the file's holes left out."""
    img, content = _ghost_images(tmp_path, chunks=chunks)
    core = _convert(img, tmp_path / "out", coredump_filter=0x3F)
    want = content if chunks is None else content[:PAGE] + bytes(PAGE) + content[2 * PAGE :]
    assert memory(core, BASE, 4 * PAGE) == want


def test_memfd_inode_without_mode_before_criu_3_19(tmp_path: Path) -> None:
    """memfd_inode_entry.mode arrived in 3.19 (dfa541095); without it the memfd still maps."""
    memfd_start = BASE + 0x10_0000
    inode = images.memfd_inode(1, "data", PAGE, 42)
    del inode["mode"]
    proc = images.Proc(100, vmas=[images.memfd_vma(memfd_start, memfd_start + PAGE, 7)])
    img = images.build(
        tmp_path / "img",
        [proc],
        files=[images.memfd_file(7, 1)],
        memfds=[inode],
        shmem={42: [(0, images.pattern(0x42))]},
    )
    core = _convert(img, tmp_path / "out", coredump_filter=0x3F)
    assert memory(core, memfd_start, PAGE) == images.pattern(0x42)


@pytest.mark.parametrize("where", ["thread_core", "creds-image"])
def test_task_credentials(tmp_path: Path, where: str) -> None:
    """NT_PRPSINFO's uid/gid: thread_core.creds since CRIU 2.0, creds-PID.img before."""
    img = images.simple(tmp_path / "img", uid=1234, gid=5678)
    if where == "creds-image":
        core = load_image(img / "core-100.img")
        creds = core["entries"][0]["thread_core"].pop("creds")
        dump_image(img / "core-100.img", core)
        images.write_image(img / "creds-100.img", "CREDS", [creds])
    core_path = _convert(img, tmp_path / "out")
    (psinfo,) = [n.desc for n in read_notes(core_path) if n.type == 3]  # NT_PRPSINFO
    assert struct.unpack_from("<II", psinfo, 16) == (1234, 5678)  # pr_uid, pr_gid

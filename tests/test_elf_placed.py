"""A streamed core's layout (converters/elf.py): segments whose pages were written at offsets
fixed in advance ("present" pieces), a reserved header area, the rest written around them. The
result reads as the kernel-layout core does: the same program headers but for p_offset, the
same notes and the same bytes at every address."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from converters.elf import PAGE_SIZE, Note, Piece, Segment, plan, write_core
from converters.errors import LayoutError
from converters.sinks import FileSink

MACHINE = 62  # EM_X86_64
NOTES = [Note(b"CORE", 1, b"\x11" * 336), Note(b"CORE", 6, b"\x22" * 300)]


def page_of(tag: int, n: int) -> bytes:
    return bytes([tag]) * (n * PAGE_SIZE)


def source(tmp_path: Path) -> tuple[Path, list[tuple[int, int, bytes]]]:
    """A pages file and the (vaddr, pages, bytes) of the segments that take their bytes there."""
    spans = [(0x400000, 2, page_of(1, 2)), (0x600000, 3, page_of(2, 3)), (0x7F0000, 1, b"")]
    path = tmp_path / "pages"
    path.write_bytes(b"".join(b for _, _, b in spans))
    return path, spans


def segments(path: Path, spans: list[tuple[int, int, bytes]], *, streamed: bool) -> list[Segment]:
    """One segment per span, then one with a hole; *streamed*: the first two are present."""
    segs, off = [], 0
    for i, (vaddr, n, data) in enumerate(spans):
        if not data:
            segs.append(Segment(vaddr, n * PAGE_SIZE, 4, 0, []))
            continue
        kind = "present" if streamed and i < 2 else "data"
        segs.append(
            Segment(vaddr, n * PAGE_SIZE, 6, len(data), [Piece(kind, len(data), path, off)])
        )
        off += len(data)
    segs.append(Segment(0x900000, 2 * PAGE_SIZE, 6, 2 * PAGE_SIZE, [Piece("hole", 2 * PAGE_SIZE)]))
    return segs


def read_core(path: Path) -> tuple[list[tuple[int, int, int, int]], dict[int, bytes], bytes]:
    """(vaddr, memsz, filesz, flags) of every PT_LOAD, their bytes by vaddr, the notes."""
    with path.open("rb") as f:
        elf = ELFFile(f)
        loads, data, notes = [], {}, b""
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                notes = seg.data()
            if seg["p_type"] == "PT_LOAD":
                loads.append((seg["p_vaddr"], seg["p_memsz"], seg["p_filesz"], seg["p_flags"]))
                data[seg["p_vaddr"]] = seg.data()
        return loads, data, notes


def test_placed_core_reads_as_the_packed_one(tmp_path: Path) -> None:
    path, spans = source(tmp_path)
    packed = FileSink(tmp_path / "packed")
    write_core(packed, MACHINE, segments(path, spans, streamed=False), NOTES, None)
    packed.commit()
    # the stream wrote the first two segments' pages at offsets decided before it began
    reserved = 4 * PAGE_SIZE
    placed = {0x400000: 5 * PAGE_SIZE, 0x600000: 9 * PAGE_SIZE}
    sink = FileSink(tmp_path / "streamed")
    assert sink.fd is not None
    os.pwrite(sink.fd, page_of(1, 2), placed[0x400000])
    os.pwrite(sink.fd, page_of(2, 3), placed[0x600000])
    size, _, truncated = write_core(
        sink,
        MACHINE,
        segments(path, spans, streamed=True),
        NOTES,
        None,
        placed=placed,
        data_offset=reserved,
    )
    sink.commit()
    assert not truncated
    assert size == (tmp_path / "streamed").stat().st_size == 12 * PAGE_SIZE + 2 * PAGE_SIZE
    assert read_core(tmp_path / "streamed") == read_core(tmp_path / "packed")


def test_last_present_piece_is_not_overwritten(tmp_path: Path) -> None:
    """A core ending in present bytes keeps its last byte (no closing zero written there)."""
    path, spans = source(tmp_path)
    segs = segments(path, spans, streamed=True)[:2]
    sink = FileSink(tmp_path / "core")
    assert sink.fd is not None
    placed = {0x400000: PAGE_SIZE, 0x600000: 3 * PAGE_SIZE}
    os.pwrite(sink.fd, page_of(1, 2), placed[0x400000])
    os.pwrite(sink.fd, page_of(2, 3), placed[0x600000])
    size, holes, _ = write_core(sink, MACHINE, segs, NOTES, None, placed=placed)
    sink.commit()
    # the offsets are the kernel's here: the same size, and holes only in the padding
    packed = FileSink(tmp_path / "packed")
    kernel = write_core(packed, MACHINE, segments(path, spans, streamed=False)[:2], NOTES, None)
    packed.commit()
    assert (size, holes, False) == kernel
    assert size == 6 * PAGE_SIZE
    _, data, _ = read_core(tmp_path / "core")
    assert data[0x600000] == page_of(2, 3)


def test_plan_refuses_what_does_not_fit(tmp_path: Path) -> None:
    path, spans = source(tmp_path)
    segs = segments(path, spans, streamed=True)
    with pytest.raises(LayoutError, match="headers and notes need 4096 bytes, 512 were reserved"):
        plan(segs, NOTES, data_offset=512)
    with pytest.raises(LayoutError, match="segment 0x600000 placed at 0x2000: unaligned or"):
        plan(segs, NOTES, placed={0x400000: PAGE_SIZE, 0x600000: 2 * PAGE_SIZE})
    with pytest.raises(LayoutError, match="unaligned"):
        plan(segs, NOTES, placed={0x400000: PAGE_SIZE + 1})
    with pytest.raises(LayoutError, match="1 placed segment"):
        plan(segs, NOTES, placed={0x500000: PAGE_SIZE})
    layout = plan(segs, NOTES, placed={0x600000: 8 * PAGE_SIZE})
    # the others follow the furthest placed segment, in order
    assert layout.offsets == [11 * PAGE_SIZE, 8 * PAGE_SIZE, 13 * PAGE_SIZE, 13 * PAGE_SIZE]
    assert plan(segs, NOTES).offsets == [PAGE_SIZE, 3 * PAGE_SIZE, 6 * PAGE_SIZE, 6 * PAGE_SIZE]

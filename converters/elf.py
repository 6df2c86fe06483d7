"""ELF core layout and the streaming writer.

The layout follows fs/binfmt_elf.c:elf_core_dump(): ELF header, program headers (PT_NOTE first,
then one PT_LOAD per VMA), the notes, padding up to a page boundary, then each segment's bytes
in order; a segment's p_offset is where its bytes start even when it has none (p_filesz 0).
With 65535 or more program headers, e_phnum is PN_XNUM and one section header carries the real
count in sh_info (fill_extnum_info()).

Writing follows fs/coredump.c: dump_emit() refuses a write that would take the bytes written so
far past RLIMIT_CORE and ends the dump there; dump_skip() seeks (holes are not counted); a dump
that ends in a hole writes one last zero byte so the file has its full size.

A streamed core (issue 13) has its pages written at offsets fixed before they arrived:
:func:`plan` then takes those offsets (``placed``) and a reserved start of the data
(``data_offset``), the other segments following the furthest placed one; the writer goes
through the segments in file order and steps over ``present`` pieces, which are already there.
Readers of a core (gdb, the kernel comparisons) go by p_offset, never by packing.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path

from converters.errors import LayoutError
from converters.sinks import Sink

#: The page of every architecture in converters.arch.ARCHES (their ``page_size``; a test holds
#: them equal): CRIU's images count in it, and the core aligns segments to it (ELF_EXEC_PAGESIZE).
PAGE_SIZE = 4096


class ET(IntEnum):
    CORE = 4


class PT(IntEnum):
    LOAD = 1
    NOTE = 4


class PF(IntFlag):
    X = 1
    W = 2
    R = 4


class NT(IntEnum):
    """Note types (include/uapi/linux/elf.h)."""

    PRSTATUS = 1
    PRFPREG = 2
    PRPSINFO = 3
    AUXV = 6
    SIGINFO = 0x53494749
    FILE = 0x46494C45


PN_XNUM = 0xFFFF
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
NHDR = struct.Struct("<III")
assert (EHDR.size, PHDR.size, SHDR.size) == (64, 56, 64)

ELF_IDENT = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, LSB, EV_CURRENT, SYSV


def _pad4(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes

    @property
    def size(self) -> int:
        return NHDR.size + _pad4(len(self.name) + 1) + _pad4(len(self.desc))


def pack_note_parts(note: Note) -> list[tuple[bytes, int]]:
    """A note as the kernel's writenote() emits it: (bytes, padding after) per dump_emit()."""
    name = note.name + b"\0"
    return [
        (NHDR.pack(len(name), len(note.desc), note.type), 0),
        (name, _pad4(len(name)) - len(name)),
        (note.desc, _pad4(len(note.desc)) - len(note.desc)),
    ]


@dataclass(frozen=True)
class Piece:
    """Part of a segment's bytes.

    kind ``data``: *length* bytes of file *path* (or *fd*) at *offset*; ``hole``: pages that
    read as zeros and are left unwritten; ``present``: bytes already written at their place in
    the sink (a streamed core's pages), stepped over and counted as written.
    """

    kind: str
    length: int
    path: Path | None = None
    offset: int = 0
    #: an already opened file (mapped files are opened once, safely, by the model)
    fd: int | None = None


@dataclass
class Segment:
    vaddr: int
    memsz: int
    flags: int
    filesz: int
    pieces: list[Piece]


@dataclass(frozen=True)
class Layout:
    phnum: int
    notes_offset: int
    notes_size: int
    data_offset: int
    offsets: list[int]
    end: int


def plan(
    segments: list[Segment],
    notes: list[Note],
    *,
    placed: Mapping[int, int] | None = None,
    data_offset: int | None = None,
) -> Layout:
    """Every file offset, computed before a byte is written (elf_core_dump()'s first pass).

    :param placed: segment vaddr -> file offset decided in advance (a streamed core); the
        other segments follow the end of the furthest placed one, in order.
    :param data_offset: where the segments' data may start (a reserved header area).
    :raises LayoutError: the headers and notes need more than *data_offset*, or placed
        segments are unaligned, before the data or overlap.
    """
    segs = len(segments) + 1
    phnum = PN_XNUM if segs >= PN_XNUM else segs
    offset = EHDR.size + segs * PHDR.size
    notes_size = sum(n.size for n in notes)
    notes_offset = offset
    offset += notes_size
    need = (offset + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if data_offset is not None and data_offset < need:
        raise LayoutError(f"headers and notes need {need} bytes, {data_offset} were reserved")
    data_offset = need if data_offset is None else data_offset
    placed = placed or {}
    pos = _check_placed(segments, placed, data_offset)
    offsets = []
    for s in segments:
        if s.vaddr in placed:
            offsets.append(placed[s.vaddr])
        else:
            offsets.append(pos)
            pos += s.filesz
    return Layout(phnum, notes_offset, notes_size, data_offset, offsets, pos)


def _check_placed(segments: list[Segment], placed: Mapping[int, int], data_offset: int) -> int:
    """The end of the placed segments' data (at least *data_offset*), once they are checked."""
    spans = sorted((placed[s.vaddr], s.filesz, s.vaddr) for s in segments if s.vaddr in placed)
    if len(spans) != len(placed):
        raise LayoutError(f"{len(placed) - len(spans)} placed segment(s) are not in the core")
    end = data_offset
    for off, size, vaddr in spans:
        if off % PAGE_SIZE or off < end:
            raise LayoutError(f"segment {vaddr:#x} placed at {off:#x}: unaligned or overlapping")
        end = off + size
    return end


def streamed_placement(segments: list[Segment], total: int) -> dict[int, int]:
    """Where each segment holding streamed pages (``present`` pieces, whose offset is where
    they already are in the file) must start, so that every present piece lies exactly at
    segment offset + its place in the segment: the ``placed`` of :func:`plan`.

    :param total: the bytes streamed into the file; the present pieces must cover them all
        (a streamed byte outside every segment would stay in the core unseen).
    :raises LayoutError: a segment's present pieces disagree on its start, or streamed bytes
        are outside the segments.
    """
    placed: dict[int, int] = {}
    covered = 0
    for seg in segments:
        pos = 0
        for piece in seg.pieces:
            if piece.kind == "present":
                start = piece.offset - pos
                if placed.setdefault(seg.vaddr, start) != start:
                    raise LayoutError(
                        f"segment {seg.vaddr:#x}: streamed pages at {piece.offset:#x} are not"
                        f" where its other pages put it ({placed[seg.vaddr]:#x})"
                    )
                covered += piece.length
            pos += piece.length
    if covered != total:
        raise LayoutError(
            f"{total - covered} of the {total} streamed bytes are outside the core's segments"
        )
    return placed


class LimitReached(Exception):
    """The next write would pass the core limit: the kernel stops the dump here."""


class Emitter:
    """dump_emit()/dump_skip() over a :class:`Sink`, with RLIMIT_CORE accounting."""

    def __init__(self, sink: Sink, limit: int | None, progress: Callable[[int], None] | None):
        self.sink = sink
        self.limit = limit
        self.pos = 0
        self.written = 0
        self.to_skip = 0
        self.holes = 0
        self.progress = progress

    def _room(self, nr: int) -> None:
        if self.limit is not None and self.written + nr > self.limit:
            raise LimitReached

    def _flush_skip(self) -> None:
        if self.to_skip:
            self.sink.hole(self.to_skip)
            self.pos += self.to_skip
            self.holes += self.to_skip
            self.to_skip = 0

    def _done(self, nr: int) -> None:
        self.pos += nr
        self.written += nr
        if self.progress:
            self.progress(nr)

    def emit(self, data: bytes) -> None:
        self._room(len(data))
        self._flush_skip()
        self.sink.write(data)
        self._done(len(data))

    def skip(self, nr: int) -> None:
        self.to_skip += nr

    def skip_to(self, pos: int) -> None:
        cur = self.pos + self.to_skip
        if pos > cur:
            self.to_skip += pos - cur

    def present(self, nr: int) -> None:
        """*nr* bytes already written at the current position: stepped over, counted as
        written, but not reported as progress (whoever wrote them reported them)."""
        self._room(nr)
        self._flush_skip()
        self.sink.hole(nr)
        self.pos += nr
        self.written += nr

    def emit_pages(self, fd: int, offset: int, length: int) -> None:
        """Page-granular copy, as dump_user_range() emits one page per dump_emit_page()."""
        if self.limit is not None:
            fit = max(self.limit - self.written, 0) // PAGE_SIZE * PAGE_SIZE
            if fit < length:
                if fit:
                    self.emit_pages(fd, offset, fit)
                raise LimitReached
        self._flush_skip()
        self.sink.copy_from(fd, offset, length)
        self._done(length)

    def finish(self) -> None:
        """Mirror do_coredump(): a trailing skip is closed by writing its last byte."""
        if self.to_skip:
            self.to_skip -= 1
            self.emit(b"\0")


def _emit_piece(out: Emitter, piece: Piece, files: dict[Path, int]) -> None:
    """One piece of a segment's bytes: a hole is skipped, data copied from its file (opened
    once per path, in *files*)."""
    if piece.kind == "hole":
        out.skip(piece.length)
        return
    if piece.kind == "present":
        out.present(piece.length)
        return
    fd = piece.fd
    if fd is None:
        assert piece.path is not None
        fd = files.get(piece.path)
        if fd is None:
            fd = files[piece.path] = os.open(piece.path, os.O_RDONLY | os.O_CLOEXEC)
    out.emit_pages(fd, piece.offset, piece.length)


def write_core(
    sink: Sink,
    machine: int,
    segments: list[Segment],
    notes: list[Note],
    limit: int | None,
    progress: Callable[[int], None] | None = None,
    *,
    placed: Mapping[int, int] | None = None,
    data_offset: int | None = None,
) -> tuple[int, int, bool]:
    """Stream a whole core into *sink*. Returns (file size, hole bytes, truncated).

    *placed* and *data_offset* as :func:`plan` takes them (a sink holding the streamed pages
    already, seekable); without them the layout is the kernel's.
    """
    layout = plan(segments, notes, placed=placed, data_offset=data_offset)
    out = Emitter(sink, limit, progress)
    files: dict[Path, int] = {}
    try:
        shnum = 1 if layout.phnum == PN_XNUM else 0
        shoff = layout.end if shnum else 0
        out.emit(
            EHDR.pack(
                ELF_IDENT, ET.CORE, machine, 1, 0, EHDR.size, shoff, 0, EHDR.size,
                PHDR.size, layout.phnum, SHDR.size if shnum else 0, shnum, 0,
            )
        )  # fmt: skip
        out.emit(PHDR.pack(PT.NOTE, 0, layout.notes_offset, 0, 0, layout.notes_size, 0, 4))
        for seg, off in zip(segments, layout.offsets, strict=True):
            out.emit(
                PHDR.pack(PT.LOAD, seg.flags, off, seg.vaddr, 0, seg.filesz, seg.memsz, PAGE_SIZE)
            )
        for note in notes:
            for data, pad in pack_note_parts(note):
                out.emit(data)
                out.skip(pad)
        out.skip_to(layout.data_offset)
        # file order; the kernel's layout is already in it (a stable sort keeps it)
        for off, seg in sorted(zip(layout.offsets, segments, strict=True), key=lambda t: t[0]):
            out.skip_to(off)
            for piece in seg.pieces:
                _emit_piece(out, piece, files)
        if shnum:
            # fill_extnum_info(): sh_info holds the real number of program headers
            segs = len(segments) + 1
            out.skip_to(layout.end)
            out.emit(SHDR.pack(0, 0, 0, 0, 0, 0, 0, segs, 0, 0))
        out.finish()
        truncated = False
    except LimitReached:
        truncated = True
    finally:
        for fd in files.values():
            os.close(fd)
    size = out.pos  # pending skips past the last write do not extend the file
    return size, out.holes, truncated

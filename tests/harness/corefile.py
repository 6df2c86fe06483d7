"""The core reader: an ELF core's PT_LOADs, its notes, and each thread's notes by TID.

ELF structure is parsed with pyelftools; the note descriptors by :class:`harness.machine.Machine`
of the core's own e_machine (never the host's). Memory is read on demand, holes included.
Constants and layouts are declared here, not imported from ``converters``: the reference side
of a differential test must not share a mistake with the product it checks.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from harness.aarch64 import AARCH64
from harness.errors import HarnessError
from harness.machine import Machine
from harness.x86_64 import X86_64

#: every architecture the reader knows, by pyelftools' e_machine name
MACHINES: dict[str, Machine] = {m.e_machine: m for m in (X86_64, AARCH64)}


class NT(IntEnum):
    """ELF core note types (include/uapi/linux/elf.h)."""

    PRSTATUS = 1
    FPREGSET = 2
    PRPSINFO = 3
    AUXV = 6
    X86_XSTATE = 0x202
    X86_XSAVE_LAYOUT = 0x205
    SIGINFO = 0x53494749
    FILE = 0x46494C45


class PF(IntEnum):
    """Program header flags."""

    X = 1
    W = 2
    R = 4


class AT(IntEnum):
    """Auxiliary vector keys the harness uses."""

    NULL = 0
    SYSINFO_EHDR = 33


_NOTE_HEADER = struct.Struct("<III")
_AUXV_PAIR = struct.Struct("<QQ")


@dataclass(frozen=True)
class Load:
    """One PT_LOAD program header."""

    vaddr: int
    memsz: int
    filesz: int
    flags: int
    offset: int

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz

    def key(self) -> tuple[int, int, int, int]:
        """What two cores must agree on (the file offset may differ)."""
        return (self.vaddr, self.memsz, self.filesz, self.flags)

    def describe(self) -> str:
        f = self.flags
        perms = ("r" if f & PF.R else "-") + ("w" if f & PF.W else "-") + ("x" if f & PF.X else "-")
        return f"{self.vaddr:#x}-{self.end:#x} {perms} filesz={self.filesz:#x}"


@dataclass(frozen=True)
class Note:
    owner: str
    type: int
    desc: bytes
    #: file offset of the descriptor (for tests that edit a core in place)
    offset: int = field(default=-1, compare=False)

    @property
    def type_name(self) -> str:
        try:
            return f"NT_{NT(self.type).name}"
        except ValueError:
            return f"{self.type:#x}"


@dataclass
class ThreadState:
    """One thread's notes: NT_PRSTATUS and the register notes following it."""

    pid: int
    regs: dict[str, int]
    prstatus: dict[str, int]
    #: the machine's register notes after NT_PRSTATUS, by name (``NT_FPREGSET``, ...)
    notes: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class FileEntry:
    """One NT_FILE entry (fs/binfmt_elf.c:fill_files_note())."""

    start: int
    end: int
    pgoff: int
    name: str


def parse_nt_file(desc: bytes) -> tuple[int, list[FileEntry]]:
    """(page size, entries) of an NT_FILE note."""
    count, page_size = struct.unpack_from("<QQ", desc)
    triples = struct.unpack_from(f"<{3 * count}Q", desc, 16)
    names = desc[16 + 24 * count :].split(b"\0")
    entries = [
        FileEntry(
            triples[3 * i],
            triples[3 * i + 1],
            triples[3 * i + 2],
            names[i].decode(errors="replace"),
        )
        for i in range(count)
    ]
    return page_size, entries


def parse_auxv(desc: bytes) -> list[tuple[int, int]]:
    """(key, value) pairs of NT_AUXV, up to and including AT_NULL."""
    pairs = []
    for key, value in _AUXV_PAIR.iter_unpack(desc[: len(desc) // 16 * 16]):
        pairs.append((key, value))
        if key == AT.NULL:
            break
    return pairs


def parse_notes(data: bytes, file_offset: int = 0) -> Iterator[Note]:
    """ELF notes of a PT_NOTE segment (4-byte aligned name and descriptor, as cores use).

    :param file_offset: where *data* starts in the file (sets :attr:`Note.offset`).
    :raises HarnessError: a descriptor runs past the segment.
    """
    pos = 0
    while pos + _NOTE_HEADER.size <= len(data):
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(data, pos)
        pos += _NOTE_HEADER.size
        name = data[pos : pos + namesz].rstrip(b"\0").decode(errors="replace")
        pos += (namesz + 3) & ~3
        desc = data[pos : pos + descsz]
        if len(desc) != descsz:
            raise HarnessError(f"note {name}/{ntype:#x} runs past its PT_NOTE segment")
        yield Note(name, ntype, bytes(desc), file_offset + pos)
        pos += (descsz + 3) & ~3


class CoreView:
    """A parsed ELF64 little-endian core (program headers and notes; memory read on demand).

    :raises HarnessError: not an ELF64 LE core of a machine in :data:`MACHINES`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        try:
            self._parse_elf()
        except BaseException:
            self._file.close()
            raise
        self.size = os.fstat(self._file.fileno()).st_size
        self.threads: list[ThreadState] = []
        self.prpsinfo: dict[str, Any] = {}
        self.auxv: list[tuple[int, int]] = []
        self.files: list[FileEntry] = []
        self._parse_notes()

    def _parse_elf(self) -> None:
        try:
            elf = ELFFile(self._file)
            machine = MACHINES.get(elf["e_machine"])
            if elf.elfclass != 64 or not elf.little_endian or machine is None:
                raise HarnessError(
                    f"{self.path}: not an ELF64 LE file of a known machine ({elf['e_machine']})"
                )
            if elf["e_type"] != "ET_CORE":
                raise HarnessError(f"{self.path}: e_type is {elf['e_type']}, not ET_CORE")
            self.machine = machine
            self.loads: list[Load] = []
            self.notes: list[Note] = []
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    self.loads.append(
                        Load(
                            seg["p_vaddr"],
                            seg["p_memsz"],
                            seg["p_filesz"],
                            seg["p_flags"],
                            seg["p_offset"],
                        )
                    )
                elif seg["p_type"] == "PT_NOTE":
                    self.notes.extend(parse_notes(seg.data(), seg["p_offset"]))
        except ELFError as e:
            raise HarnessError(f"{self.path}: {e}") from e

    def _parse_notes(self) -> None:
        """Threads by NT_PRSTATUS, each with the register notes after it; the process notes."""
        for note in self.notes:
            regnote = self.machine.thread_notes.get((note.owner, note.type))
            if note.type == NT.PRSTATUS and note.owner == "CORE":
                head, regs = self.machine.parse_prstatus(note.desc)
                self.threads.append(ThreadState(head["pr_pid"], regs, head))
            elif regnote is not None and self.threads:
                self.threads[-1].notes[regnote[0]] = note.desc
            elif note.type == NT.PRPSINFO and not self.prpsinfo:
                self.prpsinfo = self.machine.parse_prpsinfo(note.desc)
            elif note.type == NT.AUXV and not self.auxv:
                self.auxv = parse_auxv(note.desc)
            elif note.type == NT.FILE and not self.files:
                self.files = parse_nt_file(note.desc)[1]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CoreView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note(self, ntype: int) -> Note | None:
        """The first note of type *ntype*."""
        return next((n for n in self.notes if n.type == ntype), None)

    def thread(self, tid: int) -> ThreadState | None:
        return next((t for t in self.threads if t.pid == tid), None)

    def load_at(self, vaddr: int) -> Load | None:
        """The PT_LOAD containing *vaddr*."""
        return next((ld for ld in self.loads if ld.vaddr <= vaddr < ld.end), None)

    def data_ranges(self, load: Load) -> list[tuple[int, int]]:
        """Address ranges of *load* whose file bytes are not holes (SEEK_DATA/SEEK_HOLE)."""
        end = min(load.offset + load.filesz, self.size)
        return [
            (load.vaddr + s - load.offset, load.vaddr + e - load.offset)
            for s, e in _data_extents(self._file.fileno(), load.offset, end)
        ]

    def read(self, vaddr: int, size: int) -> bytes:
        """The file bytes for [vaddr, vaddr+size).

        :raises ValueError: part of the range has no file bytes (outside every PT_LOAD or
            beyond its p_filesz): the core does not say what memory held there.
        """
        out = bytearray()
        addr, left = vaddr, size
        while left > 0:
            load = self.load_at(addr)
            if load is None or addr >= load.vaddr + load.filesz:
                raise ValueError(f"{self.path}: no file bytes for address {addr:#x}")
            n = min(left, load.vaddr + load.filesz - addr)
            chunk = os.pread(self._file.fileno(), n, load.offset + addr - load.vaddr)
            if len(chunk) != n:
                raise ValueError(f"{self.path}: file ends inside the segment at {addr:#x}")
            out += chunk
            addr += n
            left -= n
        return bytes(out)

    def pread(self, offset: int, size: int) -> bytes:
        """Raw file bytes (zeros past the end of a truncated file)."""
        data = os.pread(self._file.fileno(), size, offset)
        return data + bytes(size - len(data))


def _data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """File offsets in [start, end) that hold data, per SEEK_DATA/SEEK_HOLE."""
    extents = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        extents.append((max(data, start), hole))
        pos = hole
    return extents

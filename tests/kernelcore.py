"""Differential-test harness: the kernel's own core of a process is the reference.

A test starts a program (:func:`start_target`) that blocks in a known state, has CRIU dump it
with ``--leave-running`` (:func:`criu_dump`), lets the kernel write a core of the same unchanged
process (:func:`kernel_core`) and compares the converter's core with it (:class:`CoreView`,
:func:`compare_cores`, :func:`gdb_backtraces`, :func:`gdb_warnings`).

Only x86_64 little-endian cores are parsed: the reference kernel is this machine's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import selectors
import signal
import struct
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import procs
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from syslock import core_pattern

DEFAULT_CRIU = "/usr/local/sbin/criu"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class HarnessError(Exception):
    """The harness could not set up or observe what a test asked for."""


class CriuDumpError(HarnessError):
    """``criu dump`` failed; carries argv, return code and the tail of CRIU's log."""

    def __init__(self, argv: Sequence[str], returncode: int, log_tail: str) -> None:
        super().__init__(f"criu dump exited with {returncode}:\n{log_tail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.log_tail = log_tail


class NT(IntEnum):
    """ELF core note types (include/uapi/linux/elf.h)."""

    PRSTATUS = 1
    FPREGSET = 2
    PRPSINFO = 3
    AUXV = 6
    X86_XSTATE = 0x202
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


#: struct user_regs_struct (arch/x86/include/asm/user_64.h), in order.
USER_REGS = [
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
]
#: Registers a blocked thread cannot change between two dumps (callee-saved, pointers, segments).
NONVOLATILE_REGS = [
    "rip",
    "rsp",
    "rbp",
    "rbx",
    "r12",
    "r13",
    "r14",
    "r15",
    "fs_base",
    "gs_base",
    "cs",
    "ss",
    "eflags",
]
#: Registers a syscall restart rewrites: CRIU saves rax = orig_rax, the kernel core -ERESTART*.
SYSCALL_REGS = ("rax", "orig_rax")

# struct elf_prstatus (include/linux/elfcore.h): siginfo head, cursig, sigpend, sighold, pids,
# four struct __kernel_old_timeval, pr_reg (user_regs_struct), pr_fpvalid.
_PRSTATUS = struct.Struct("<3ih2xQQ4i8q27Qi4x")
assert _PRSTATUS.size == 0x150
# struct elf_prpsinfo (include/linux/elfcore.h)
_PRPSINFO = struct.Struct("<cbbb4xQII4i16s80s")
assert _PRPSINFO.size == 0x88
_NOTE_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_AUXV_PAIR = struct.Struct("<QQ")

# ptrace(2) requests and flags used to read each thread's rseq registration.
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
WALL = 0x40000000
# struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h)
_RSEQ_CONFIG = struct.Struct("<QIIII")
assert _RSEQ_CONFIG.size == 24


# --- the target process ---------------------------------------------------------------------


@dataclass(frozen=True)
class MapEntry:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    name: str


def read_maps(pid: int) -> list[MapEntry]:
    """Parse /proc/PID/maps."""
    entries = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = parts[0].split("-")
        entries.append(
            MapEntry(
                start=int(lo, 16),
                end=int(hi, 16),
                perms=parts[1],
                offset=int(parts[2], 16),
                dev=parts[3],
                inode=int(parts[4]),
                name=parts[5] if len(parts) > 5 else "",
            )
        )
    return entries


@dataclass(frozen=True)
class RseqArea:
    """A thread's registered ``struct rseq`` (include/uapi/linux/rseq.h)."""

    tid: int
    address: int
    size: int
    signature: int

    def volatile_ranges(self) -> list[tuple[int, int]]:
        """Address ranges the kernel rewrites whenever the thread is scheduled.

        cpu_id_start and cpu_id (offsets 0..8), node_id and mm_cid (offsets 20..28): 16 bytes,
        written by rseq_update_cpu_node_id() on every return to user space after a migration.
        """
        if not self.address:
            return []
        return [(self.address, self.address + 8), (self.address + 20, self.address + 28)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, tid: int, addr: int, data: int | ctypes.Array[ctypes.c_char]) -> int:
    ptr = ctypes.cast(data, ctypes.c_void_p) if isinstance(data, ctypes.Array) else data
    ret = int(_libc.ptrace(request, tid, addr, ptr))
    if ret == -1:
        err = ctypes.get_errno()
        raise HarnessError(f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return ret


def thread_ids(pid: int) -> list[int]:
    """The thread ids of *pid*, main thread first."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    return sorted(tids, key=lambda t: t != pid)


def read_rseq_areas(pid: int) -> dict[int, RseqArea]:
    """Every thread's rseq registration, read with PTRACE_GET_RSEQ_CONFIGURATION.

    Each thread is seized, interrupted, queried and detached in turn; a thread blocked in a
    restartable call (read, futex, pause) resumes that same call, as after CRIU's own seize.
    """
    areas: dict[int, RseqArea] = {}
    for tid in thread_ids(pid):
        _ptrace(PTRACE_SEIZE, tid, 0, 0)
        try:
            _ptrace(PTRACE_INTERRUPT, tid, 0, 0)
            _, status = os.waitpid(tid, WALL)
            if not os.WIFSTOPPED(status):
                raise HarnessError(f"thread {tid} did not stop for ptrace (status {status:#x})")
            buf = ctypes.create_string_buffer(_RSEQ_CONFIG.size)
            got = _ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, _RSEQ_CONFIG.size, buf)
            address, size, sig, _flags, _pad = _RSEQ_CONFIG.unpack(buf.raw[: _RSEQ_CONFIG.size])
            if got < _RSEQ_CONFIG.size:
                raise HarnessError(f"thread {tid}: short rseq configuration ({got} bytes)")
            areas[tid] = RseqArea(tid=tid, address=address, size=size, signature=sig)
        finally:
            _ptrace(PTRACE_DETACH, tid, 0, 0)
    return areas


class Target:
    """A test program started by :func:`start_target`; :meth:`close` kills and reaps it."""

    def __init__(self, proc: subprocess.Popen[bytes], argv: Sequence[str], ready_line: bytes):
        self.proc = proc
        self.argv = list(argv)
        self.pid = proc.pid
        #: the line the program printed when ready, e.g. b"ready 0x7f.. 0x7f.."
        self.ready_line = ready_line
        #: /proc/PID/maps; refreshed by :func:`kernel_core` just before the kernel dump
        self.maps: list[MapEntry] = read_maps(self.pid)
        #: rseq registration of every thread, read before any dump
        self.rseq: dict[int, RseqArea] = {}
        #: wait status once the process is reaped
        self.status: int | None = None

    def tids(self) -> list[int]:
        """Current thread ids, main thread first."""
        return thread_ids(self.pid)

    @property
    def coredump_filter(self) -> int:
        """The target's /proc/PID/coredump_filter."""
        return int(Path(f"/proc/{self.pid}/coredump_filter").read_text(), 16)

    @coredump_filter.setter
    def coredump_filter(self, value: int) -> None:
        Path(f"/proc/{self.pid}/coredump_filter").write_text(f"{value:#x}\n")

    def alive(self) -> bool:
        return self.status is None and self.proc.poll() is None

    def reaped(self, status: int) -> None:
        """Record that the caller reaped the process with waitpid (so Popen does not)."""
        self.status = status
        self.proc.returncode = (
            -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        )

    def close(self) -> None:
        """Kill and reap the process (idempotent)."""
        if self.status is None and self.proc.returncode is None:
            procs.kill_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_target(
    binary: str | os.PathLike[str],
    *args: str | os.PathLike[str],
    ready: bytes = b"ready",
    timeout: float = 30.0,
    rseq: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> Target:
    """Start *binary* and wait until it prints a line starting with *ready*.

    :param rseq: read every thread's rseq registration (see :meth:`Target.rseq`) once ready.
    :raises HarnessError: the program exited or stayed silent for *timeout* seconds; it is
        killed and reaped before the error propagates.
    """
    argv = [os.fspath(binary), *(os.fspath(a) for a in args)]
    proc = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=cwd)
    try:
        line = _wait_for_line(proc, ready, timeout)
        target = Target(proc, argv, line)
        if rseq:
            target.rseq = read_rseq_areas(proc.pid)
        return target
    except BaseException:
        procs.kill_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        raise


def _wait_for_line(proc: subprocess.Popen[bytes], ready: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(ready):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"{proc.args!r}: no {ready!r} line within {timeout} s")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise HarnessError(
                    f"{proc.args!r}: exited ({proc.wait()}) before printing {ready!r}"
                )
            buf += chunk


# --- CRIU and the kernel ----------------------------------------------------------------------


def criu_binary() -> str:
    """The CRIU to run: $CRIU, else /usr/local/sbin/criu."""
    return os.environ.get("CRIU") or DEFAULT_CRIU


def criu_dump(pid: int, images_dir: str | os.PathLike[str]) -> Path:
    """``criu dump --leave-running`` *pid* into *images_dir*; record its coredump_filter.

    :returns: the images directory.
    :raises CriuDumpError: CRIU failed (the message ends with the tail of dump.log).
    """
    from converters.options import write_sidecar
    from criu_livedump.snapshot.criu import LIVE_OPTIONS
    from criu_livedump.target.dump_time import dump_time_facts

    images = Path(images_dir)
    images.mkdir(parents=True, exist_ok=True)
    coredump_filter = int(Path(f"/proc/{pid}/coredump_filter").read_text(), 16)
    argv = [
        criu_binary(),
        "dump",
        "-t",
        str(pid),
        "-D",
        str(images),
        # the product's options, so both dumps see the same CRIU behaviour
        *LIVE_OPTIONS,
        "-o",
        "dump.log",
        "-v4",
    ]
    proc = procs.run(argv, text=True)
    if proc.returncode != 0:
        try:
            log = (images / "dump.log").read_text(errors="replace")
        except OSError:
            log = proc.stderr
        raise CriuDumpError(argv, proc.returncode, "\n".join(log.splitlines()[-40:]))
    # the same dump-time facts the orchestrator records (criu_livedump/dump.py)
    write_sidecar(images, coredump_filter=coredump_filter, **dump_time_facts(pid))
    return images


def kernel_core(target: Target, directory: str | os.PathLike[str]) -> Path:
    """Let the kernel dump *target* (SIGABRT, RLIMIT_CORE unlimited) into *directory*.

    core_pattern is set to ``DIRECTORY/kcore.%p`` under the system-settings lock and restored
    afterwards. *target* is reaped; its maps are refreshed just before the signal.

    :returns: the path of the kernel's core.
    :raises HarnessError: the process did not die of SIGABRT with a core.
    """
    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if "%" in str(out) or " " in str(out):
        raise HarnessError(f"{out}: unusable in core_pattern")
    pid = target.pid
    target.maps = read_maps(pid)
    with core_pattern(f"{out}/kcore.%p"):
        resource.prlimit(pid, resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
        os.kill(pid, signal.SIGABRT)
        _, status = os.waitpid(pid, 0)
        target.reaped(status)
    if not os.WIFSIGNALED(status) or os.WTERMSIG(status) != signal.SIGABRT:
        raise HarnessError(f"pid {pid}: did not die of SIGABRT (status {status:#x})")
    if not os.WCOREDUMP(status):
        raise HarnessError(f"pid {pid}: killed by SIGABRT but the kernel wrote no core")
    path = out / f"kcore.{pid}"
    if not path.is_file():
        raise HarnessError(f"{path}: the kernel reported a core but it is not there")
    return path


# --- reading cores ----------------------------------------------------------------------------


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
    fpregs: bytes | None = None
    xstate: bytes | None = None


@dataclass(frozen=True)
class FileEntry:
    """One NT_FILE entry (fs/binfmt_elf.c:fill_files_note())."""

    start: int
    end: int
    pgoff: int
    name: str


def parse_prstatus(desc: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """Split an x86_64 NT_PRSTATUS into (header fields, user_regs_struct by name)."""
    v = _PRSTATUS.unpack(desc[: _PRSTATUS.size])
    head = dict(
        zip(
            [
                "si_signo",
                "si_code",
                "si_errno",
                "pr_cursig",
                "pr_sigpend",
                "pr_sighold",
                "pr_pid",
                "pr_ppid",
                "pr_pgrp",
                "pr_sid",
            ],
            v[:10],
            strict=True,
        )
    )
    head["pr_fpvalid"] = v[-1]
    regs = dict(zip(USER_REGS, v[18:45], strict=True))
    return head, regs


def parse_prpsinfo(desc: bytes) -> dict[str, Any]:
    """Fields of an x86_64 NT_PRPSINFO (struct elf_prpsinfo)."""
    v = _PRPSINFO.unpack(desc[: _PRPSINFO.size])
    names = [
        "pr_state",
        "pr_sname",
        "pr_zomb",
        "pr_nice",
        "pr_flag",
        "pr_uid",
        "pr_gid",
        "pr_pid",
        "pr_ppid",
        "pr_pgrp",
        "pr_sid",
        "pr_fname",
        "pr_psargs",
    ]
    info: dict[str, Any] = dict(zip(names, v, strict=True))
    info["pr_state"] = v[0][0]
    info["pr_fname"] = v[11].rstrip(b"\0")
    info["pr_psargs"] = v[12].rstrip(b"\0")
    return info


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
    """A parsed x86_64 ELF core (program headers and notes; memory read on demand).

    :raises HarnessError: not a 64-bit little-endian x86_64 ELF core.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _parse(self) -> None:
        try:
            elf = ELFFile(self._file)
            if elf.elfclass != 64 or not elf.little_endian or elf["e_machine"] != "EM_X86_64":
                raise HarnessError(f"{self.path}: not an x86_64 ELF64 LE file")
            if elf["e_type"] != "ET_CORE":
                raise HarnessError(f"{self.path}: e_type is {elf['e_type']}, not ET_CORE")
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
            self.phnum = elf.num_segments()
        except ELFError as e:
            raise HarnessError(f"{self.path}: {e}") from e
        self.size = os.fstat(self._file.fileno()).st_size
        self.threads: list[ThreadState] = []
        self.prpsinfo: dict[str, Any] = {}
        self.auxv: list[tuple[int, int]] = []
        self.files: list[FileEntry] = []
        self.file_page_size = 0
        for note in self.notes:
            if note.type == NT.PRSTATUS and note.owner == "CORE":
                head, regs = parse_prstatus(note.desc)
                self.threads.append(ThreadState(head["pr_pid"], regs, head))
            elif note.type == NT.FPREGSET and note.owner == "CORE" and self.threads:
                self.threads[-1].fpregs = note.desc
            elif note.type == NT.X86_XSTATE and note.owner == "LINUX" and self.threads:
                self.threads[-1].xstate = note.desc
            elif note.type == NT.PRPSINFO and not self.prpsinfo:
                self.prpsinfo = parse_prpsinfo(note.desc)
            elif note.type == NT.AUXV and not self.auxv:
                self.auxv = parse_auxv(note.desc)
            elif note.type == NT.FILE and not self.files:
                self.file_page_size, self.files = parse_nt_file(note.desc)

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

    def file_ranges(self) -> list[tuple[int, int]]:
        """Address ranges backed by file bytes (``p_filesz``); the rest of memsz is not data."""
        return [(ld.vaddr, ld.vaddr + ld.filesz) for ld in self.loads if ld.filesz]

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


# --- comparing cores --------------------------------------------------------------------------

#: Names for ranges of the FXSAVE image (NT_FPREGSET, and the first 512 bytes of XSTATE).
_FXSAVE_FIELDS = [
    (0, 2, "fcw"),
    (2, 4, "fsw"),
    (4, 6, "ftw"),
    (6, 8, "fop"),
    (8, 16, "fpu_ip"),
    (16, 24, "fpu_dp"),
    (24, 28, "mxcsr"),
    (28, 32, "mxcsr_mask"),
    *[(32 + 16 * i, 48 + 16 * i, f"st{i}") for i in range(8)],
    *[(160 + 16 * i, 176 + 16 * i, f"xmm{i}") for i in range(16)],
    (416, 464, "fxsave_reserved"),
    (464, 512, "sw_reserved(xstate_fx_sw_bytes)"),
    (512, 520, "xsave_header.xfeatures"),
    (520, 528, "xsave_header.xcomp_bv"),
    (528, 576, "xsave_header.reserved"),
    *[(576 + 16 * i, 592 + 16 * i, f"ymmh{i}") for i in range(16)],
]


def _field_name(offset: int) -> str:
    for lo, hi, name in _FXSAVE_FIELDS:
        if lo <= offset < hi:
            return name
    return f"byte {offset}"


def _diff_blob(what: str, ours: bytes | None, kernel: bytes | None) -> list[str]:
    if ours == kernel:
        return []
    if ours is None or kernel is None:
        return [f"{what}: {'missing in ours' if ours is None else 'missing in the kernel core'}"]
    out = []
    if len(ours) != len(kernel):
        out.append(f"{what}: size ours {len(ours)} kernel {len(kernel)}")
    fields: dict[str, list[int]] = {}
    for i in range(min(len(ours), len(kernel))):
        if ours[i] != kernel[i]:
            fields.setdefault(_field_name(i), []).append(i)
    for name, offs in fields.items():
        lo, hi = offs[0], offs[-1] + 1
        out.append(
            f"{what}: {name} differs (bytes {lo}..{hi}): "
            f"ours {ours[lo:hi].hex()} kernel {kernel[lo:hi].hex()}"
        )
    return out


def vvar_ranges(maps: Sequence[MapEntry] | None, kernel: CoreView) -> list[tuple[int, int]]:
    """Address ranges of [vvar] and [vvar_vclock]: data pages the two dumps legitimately differ in.

    From /proc/PID/maps when given (checked against the kernel's NT_FILE, which never lists
    these special mappings); otherwise the read-only non-file segments directly below the vDSO
    (AT_SYSINFO_EHDR), where arch/x86/entry/vdso/vma.c:map_vdso() places them.
    """
    listed = {(f.start, f.end) for f in kernel.files}
    if maps is not None:
        found = [(m.start, m.end) for m in maps if m.name in ("[vvar]", "[vvar_vclock]")]
        return [r for r in found if r not in listed]
    vdso = dict(kernel.auxv).get(AT.SYSINFO_EHDR)
    ranges: list[tuple[int, int]] = []
    edge = vdso
    while edge is not None:
        below = next((ld for ld in kernel.loads if ld.end == edge), None)
        if below is None or below.flags != PF.R or (below.vaddr, below.end) in listed:
            break
        ranges.append((below.vaddr, below.end))
        edge = below.vaddr
    return ranges


@dataclass
class CompareOptions:
    """What :func:`compare_cores` tolerates."""

    skip_ranges: list[tuple[int, int]] = field(default_factory=list)
    volatile_ranges: list[tuple[int, int]] = field(default_factory=list)
    max_reports_per_segment: int = 4


def compare_cores(
    ours: CoreView,
    kernel: CoreView,
    *,
    skip_vvar: bool = True,
    maps: Sequence[MapEntry] | None = None,
    rseq: Mapping[int, RseqArea] | None = None,
    rax: bool = False,
) -> list[str]:
    """Human-readable differences between *ours* and the *kernel* core (empty: equal).

    Compared: thread ids (ours must list the main thread first), per-thread non-volatile
    registers, the note type sequence, PT_LOAD (vaddr, memsz, filesz, flags), bytes of every
    segment the kernel dumped, NT_AUXV, NT_FILE, PRPSINFO, FPREGSET and XSTATE per thread.

    :param skip_vvar: do not compare the bytes of [vvar]/[vvar_vclock] (see :func:`vvar_ranges`).
    :param maps: /proc/PID/maps captured before the kernel dump (:attr:`Target.maps`).
    :param rseq: rseq areas (:attr:`Target.rseq`); their 16 cpu/node bytes per thread are
        tolerated, nothing else.
    :param rax: also compare rax and orig_rax (see :func:`compare_syscall_regs`).
    """
    opts = CompareOptions()
    if skip_vvar:
        opts.skip_ranges = vvar_ranges(maps, kernel)
    if rseq:
        opts.volatile_ranges = [r for area in rseq.values() for r in area.volatile_ranges()]
    diffs = _compare_threads(ours, kernel)
    if rax:
        diffs += compare_syscall_regs(ours, kernel)
    diffs += _compare_note_sequence(ours, kernel)
    diffs += _compare_loads(ours, kernel)
    diffs += _compare_bytes(ours, kernel, opts)
    diffs += _compare_process_notes(ours, kernel)
    return diffs


def compare_syscall_regs(ours: CoreView, kernel: CoreView) -> list[str]:
    """Differences in rax and orig_rax, reported apart: a restarted syscall changes rax."""
    out = []
    for k in kernel.threads:
        o = ours.thread(k.pid)
        if o is None:
            continue
        for reg in SYSCALL_REGS:
            if o.regs[reg] != k.regs[reg]:
                ours_v, kernel_v = _signed(o.regs[reg]), _signed(k.regs[reg])
                out.append(f"thread {k.pid}: {reg} ours {ours_v} kernel {kernel_v}")
    return out


def _signed(value: int) -> str:
    s = value - (1 << 64) if value >= 1 << 63 else value
    return f"{value:#x}" if s >= 0 else f"{value:#x} ({s})"


def _compare_threads(ours: CoreView, kernel: CoreView) -> list[str]:
    out = []
    o_ids = [t.pid for t in ours.threads]
    k_ids = [t.pid for t in kernel.threads]
    if set(o_ids) != set(k_ids):
        out.append(
            f"threads: only in ours {sorted(set(o_ids) - set(k_ids))}, "
            f"only in kernel {sorted(set(k_ids) - set(o_ids))}"
        )
    if len(o_ids) != len(set(o_ids)):
        out.append(f"threads: ours lists a thread twice: {o_ids}")
    main = kernel.prpsinfo.get("pr_pid")
    if o_ids and o_ids[0] != main:
        out.append(f"threads: ours lists tid {o_ids[0]} first, not the main thread {main}")
    for k in kernel.threads:
        o = ours.thread(k.pid)
        if o is None:
            continue
        for reg in NONVOLATILE_REGS:
            if o.regs[reg] != k.regs[reg]:
                out.append(f"thread {k.pid}: {reg} ours {o.regs[reg]:#x} kernel {k.regs[reg]:#x}")
        for name in ("pr_pid", "pr_ppid", "pr_pgrp", "pr_sid", "pr_sighold", "pr_cursig"):
            if o.prstatus[name] != k.prstatus[name]:
                out.append(
                    f"thread {k.pid}: NT_PRSTATUS {name} ours {o.prstatus[name]:#x} "
                    f"kernel {k.prstatus[name]:#x}"
                )
        out += _diff_blob(f"thread {k.pid}: NT_FPREGSET", o.fpregs, k.fpregs)
        out += _diff_blob(f"thread {k.pid}: NT_X86_XSTATE", o.xstate, k.xstate)
    return out


def _note_pattern(core: CoreView) -> list[str]:
    return [f"{n.owner}/{n.type_name}" for n in core.notes]


def _compare_note_sequence(ours: CoreView, kernel: CoreView) -> list[str]:
    o, k = _note_pattern(ours), _note_pattern(kernel)
    if o == k:
        return []
    i = next((i for i, (a, b) in enumerate(zip(o, k, strict=False)) if a != b), min(len(o), len(k)))
    return [
        f"notes: sequence differs at note {i}: ours {o[i : i + 3]} kernel {k[i : i + 3]} "
        f"({len(o)} notes in ours, {len(k)} in kernel)"
    ]


def _mapping_name(kernel: CoreView, vaddr: int) -> str:
    for f in kernel.files:
        if f.start <= vaddr < f.end:
            return f" ({f.name})"
    return ""


def _compare_loads(ours: CoreView, kernel: CoreView) -> list[str]:
    out = []
    o = {ld.vaddr: ld for ld in ours.loads}
    k = {ld.vaddr: ld for ld in kernel.loads}
    if len(ours.loads) != len(kernel.loads):
        out.append(f"PT_LOAD: ours has {len(ours.loads)}, kernel {len(kernel.loads)}")
    for vaddr in sorted(set(o) | set(k)):
        name = _mapping_name(kernel, vaddr)
        if vaddr not in o:
            out.append(f"PT_LOAD {k[vaddr].describe()}{name}: missing in ours")
        elif vaddr not in k:
            out.append(f"PT_LOAD {o[vaddr].describe()}{name}: only in ours")
        elif o[vaddr].key() != k[vaddr].key():
            out.append(f"PT_LOAD{name}: ours {o[vaddr].describe()} kernel {k[vaddr].describe()}")
    if [ld.vaddr for ld in ours.loads] != sorted(ld.vaddr for ld in ours.loads):
        out.append("PT_LOAD: ours is not in address order")
    return out


def _overlaps(lo: int, hi: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(a < hi and lo < b for a, b in ranges)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


_CHUNK = 1 << 20


def _compare_bytes(ours: CoreView, kernel: CoreView, opts: CompareOptions) -> list[str]:
    out = []
    o_loads = {ld.vaddr: ld for ld in ours.loads}
    for k in kernel.loads:
        o = o_loads.get(k.vaddr)
        if not k.filesz or o is None or not o.filesz:
            continue  # a missing or empty segment is reported by _compare_loads
        if _overlaps(k.vaddr, k.end, opts.skip_ranges):
            continue
        n = min(k.filesz, o.filesz)
        # Only ranges that hold data in either file can differ: holes read as zeros in both.
        span = _merge(
            [(a - k.vaddr, b - k.vaddr) for a, b in kernel.data_ranges(k)]
            + [(a - o.vaddr, b - o.vaddr) for a, b in ours.data_ranges(o)]
        )
        bad: list[tuple[int, int]] = []  # (relative offset, length) runs of differing bytes
        for lo, hi in span:
            lo, hi = lo & ~(PAGE_SIZE - 1), min(hi, n)
            for pos in range(lo, hi, _CHUNK):
                size = min(_CHUNK, hi - pos)
                a = ours.pread(o.offset + pos, size)
                b = kernel.pread(k.offset + pos, size)
                if a != b:
                    bad += _diff_runs(a, b, k.vaddr + pos, opts.volatile_ranges, pos)
        if bad:
            total = sum(length for _, length in bad)
            name = _mapping_name(kernel, k.vaddr)
            head = f"bytes {k.describe()}{name}: {total} bytes differ in {len(bad)} runs"
            samples = []
            for rel, length in bad[: opts.max_reports_per_segment]:
                show = min(length, 16)
                addr = k.vaddr + rel
                samples.append(
                    f"{addr:#x}+{length:#x}: ours {ours.pread(o.offset + rel, show).hex()} "
                    f"kernel {kernel.pread(k.offset + rel, show).hex()}"
                )
            out.append(head + "; " + "; ".join(samples))
    return out


def _diff_runs(
    a: bytes, b: bytes, vaddr: int, volatile: Sequence[tuple[int, int]], rel0: int
) -> list[tuple[int, int]]:
    """Runs (relative offset, length) where *a* and *b* differ outside the volatile ranges."""
    runs: list[tuple[int, int]] = []
    for page in range(0, len(a), PAGE_SIZE):
        pa, pb = a[page : page + PAGE_SIZE], b[page : page + PAGE_SIZE]
        if pa == pb:
            continue
        start = -1
        for i in range(len(pa)):
            addr = vaddr + page + i
            differs = pa[i] != pb[i] and not any(lo <= addr < hi for lo, hi in volatile)
            if differs and start < 0:
                start = i
            elif not differs and start >= 0:
                runs.append((rel0 + page + start, i - start))
                start = -1
        if start >= 0:
            runs.append((rel0 + page + start, len(pa) - start))
    return runs


_PRPSINFO_COMPARED = [
    "pr_pid",
    "pr_ppid",
    "pr_pgrp",
    "pr_sid",
    "pr_uid",
    "pr_gid",
    "pr_fname",
    "pr_psargs",
    "pr_nice",
]


def _compare_process_notes(ours: CoreView, kernel: CoreView) -> list[str]:
    out = []
    for name in _PRPSINFO_COMPARED:
        a, b = ours.prpsinfo.get(name), kernel.prpsinfo.get(name)
        if a != b:
            out.append(f"NT_PRPSINFO {name}: ours {a!r} kernel {b!r}")
    oa, ka = ours.note(NT.AUXV), kernel.note(NT.AUXV)
    if (oa and oa.desc) != (ka and ka.desc):
        if oa is None or ka is None:
            out.append(f"NT_AUXV: missing in {'ours' if oa is None else 'kernel'}")
        else:
            op, kp = parse_auxv(oa.desc), parse_auxv(ka.desc)
            pairs = [
                f"#{i} ours {a} kernel {b}"
                for i, (a, b) in enumerate(zip(op, kp, strict=False))
                if a != b
            ]
            out.append(
                f"NT_AUXV: differs (size ours {len(oa.desc)} kernel {len(ka.desc)}): "
                + "; ".join(pairs[:6])
            )
    of, kf = ours.note(NT.FILE), kernel.note(NT.FILE)
    if (of and of.desc) != (kf and kf.desc):
        if of is None or kf is None:
            out.append(f"NT_FILE: missing in {'ours' if of is None else 'kernel'}")
        else:
            ops, oe = parse_nt_file(of.desc)
            kps, ke = parse_nt_file(kf.desc)
            if ops != kps:
                out.append(f"NT_FILE: page size ours {ops} kernel {kps}")
            for e in sorted(set(ke) - set(oe), key=lambda e: e.start):
                out.append(f"NT_FILE: missing in ours: {_fmt_file(e)}")
            for e in sorted(set(oe) - set(ke), key=lambda e: e.start):
                out.append(f"NT_FILE: only in ours: {_fmt_file(e)}")
            if set(oe) == set(ke) and oe != ke:
                out.append("NT_FILE: same entries in a different order")
            if set(oe) == set(ke) and oe == ke and ops == kps:
                out.append("NT_FILE: same entries, different bytes (padding or trailer)")
    return out


def _fmt_file(e: FileEntry) -> str:
    return f"{e.start:#x}-{e.end:#x} pgoff {e.pgoff:#x} {e.name}"


# --- gdb --------------------------------------------------------------------------------------


def run_gdb(binary: str | os.PathLike[str], core: str | os.PathLike[str]) -> tuple[str, str]:
    """(stdout, stderr) of ``gdb -batch -nx ... 'thread apply all bt' BINARY CORE``."""
    proc = subprocess.run(
        [
            "gdb",
            "-batch",
            "-nx",
            "-ex",
            "set pagination off",
            "-ex",
            "thread apply all bt",
            os.fspath(binary),
            os.fspath(core),
        ],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C", "TERM": "dumb", "DEBUGINFOD_URLS": ""},
    )
    return proc.stdout, proc.stderr


def gdb_lwps(binary: str | os.PathLike[str], core: str | os.PathLike[str]) -> set[int]:
    """The thread ids gdb's ``info threads`` lists for *core*."""
    out = subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", "info threads", os.fspath(binary), os.fspath(core)],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C", "DEBUGINFOD_URLS": ""},
    ).stdout
    return {int(x) for x in re.findall(r"\(LWP (\d+)\)", out)}


_THREAD_HEAD = re.compile(r"^Thread \d+ (\(.*\(LWP (\d+)\).*)$")
_NEW_LWP = re.compile(r"^\[New LWP \d+\]$")


def normalise_backtraces(stdout: str) -> str:
    """gdb output made independent of thread order, everything else kept.

    The kernel lists the dumping thread first and the others in the order they reached
    coredump_task_exit(); the converter lists them by tid. So the ``[New LWP n]`` lines are
    dropped and the per-thread blocks are sorted by LWP with gdb's thread number removed.
    """
    head: list[str] = []
    blocks: list[tuple[int, list[str]]] = []
    for line in stdout.splitlines():
        if _NEW_LWP.match(line):
            continue
        m = _THREAD_HEAD.match(line)
        if m:
            blocks.append((int(m.group(2)), [f"Thread {m.group(1)}"]))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            head.append(line)
    # Blank lines separate gdb's blocks; where they fall depends on the order, so re-separate.
    parts = ["\n".join(head).strip()]
    parts += ["\n".join(block).strip() for _, block in sorted(blocks)]
    return "\n\n".join(parts) + "\n"


def gdb_backtraces(binary: str | os.PathLike[str], core: str | os.PathLike[str]) -> str:
    """``thread apply all bt`` of *core*, normalised by :func:`normalise_backtraces`."""
    return normalise_backtraces(run_gdb(binary, core)[0])


def gdb_warnings(binary: str | os.PathLike[str], core: str | os.PathLike[str]) -> list[str]:
    """What gdb complains about while loading *core*: stderr lines and ``warning:`` lines."""
    stdout, stderr = run_gdb(binary, core)
    lines = [line for line in stderr.splitlines() if line.strip()]
    lines += [line for line in stdout.splitlines() if line.lower().startswith("warning:")]
    return lines

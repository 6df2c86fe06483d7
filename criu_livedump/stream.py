"""Streamed capture (issue 13): CRIU's pages written once, straight into the core's file.

When the snapshot method's dumped process cannot change while CRIU runs (the clone, stopped and
ours), the core's layout is decided before CRIU sends a page:

- the headers and notes get a reserved area at the start of the file: their exact size needs
  CRIU's images, which it writes after the pages (criu/cr-dump.c dump_one_task() dumps the
  pages before the mm and core images), so the area is a bound from the VMA, thread and
  mapping-name counts (:func:`reserved_header`); the rest of it is a hole;
- each VMA that receives pages gets its whole size, the moment its first page arrives: the
  kernel dumps a VMA with anonymous pages whole (fs/coredump.c vma_dump_size()), and CRIU
  sends a process's pages VMA by VMA in address order (criu/mem.c generate_iovs()), so the
  streamed segments lie in address order, as the kernel lays them.

The page server (snapshot/page_server.py) splices each run to segment offset + (address - VMA
start) in a temporary file beside the output. Afterwards pagemap-PID.img lists the runs, the
converter reads them where they are (ConvertOptions.streamed), writes the headers, notes and
every other segment (file-backed pieces, the vDSO, areas the fork lost) after the streamed
ones, and checks that every streamed page is where its segment needs it
(converters/elf.py streamed_placement()); the file is then linked into place. Only CRIU's
small images go to scratch.

Readers of a core go by p_offset (gdb, the kernel comparisons' comparator), so the reserved
area and the order of the non-streamed segments (after the streamed ones, where the kernel
interleaves them by address) change no reader's view of the core.

Where the stream cannot be used, :func:`refusal` or :meth:`Capture.begin` says why, and the
dump takes CRIU's pages images as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from bisect import bisect_right
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from converters.elf import EHDR, NHDR, PAGE_SIZE, PHDR
from converters.images import PE_PRESENT, dump_image
from converters.model import MMF
from converters.options import UNLIMITED, StreamedPages
from converters.sinks import create_temp
from criu_livedump.conversion_child import SinkKind, SinkSpec
from criu_livedump.errors import CoreWriteError, LivedumpError, PageStreamError
from criu_livedump.linux.procfs import read_maps
from criu_livedump.progress import Progress
from criu_livedump.request import DumpRequest
from criu_livedump.snapshot import criu
from criu_livedump.snapshot import page_server as ps
from criu_livedump.snapshot.base import CriuTask, Snapshot, StreamFacts

log = logging.getLogger(__name__)

#: Test hook: called in the page server's thread after every run (tests trigger faults on it).
run_hook: Callable[[ps.StreamStats], None] | None = None

#: Notes of one thread, at most: NT_PRSTATUS (0x150), NT_PRFPREG (512) and NT_X86_XSTATE (the
#: CPU's XSAVE area, 11 KiB with AMX), each with its header; rounded up.
THREAD_NOTES = 16 << 10
#: NT_PRPSINFO, NT_SIGINFO, NT_AUXV (AT_VECTOR_SIZE pairs) and the architecture's process
#: notes, at most
PROCESS_NOTES = 8 << 10
#: " (deleted)" d_path() may append to an NT_FILE name
_DELETED = len(" (deleted)")


def refusal(
    method: type[Snapshot], request: DumpRequest, sink: SinkSpec, limit: int, mm_filter: int
) -> str:
    """Why this dump's pages cannot stream into its core, decided before anything is frozen
    ("" when they can, as far as is known before the dumped process is)."""
    if method.stream_refusal:
        return f"--method {method.method.value}: {method.stream_refusal}"
    if sink.kind == SinkKind.STDOUT:
        return "-o - cannot seek (the headers come first, and need the images CRIU writes last)"
    if sink.kind == SinkKind.PIPE:
        return "a core_pattern pipe handler cannot seek"
    if request.keep_images:
        return "--keep-images keeps CRIU's own pages images"
    if request.tree:
        return "--tree writes several cores"
    if limit != UNLIMITED:
        return f"the core limit ({limit} bytes) may cut the core where pages are streamed already"
    if not mm_filter & MMF.ANON_PRIVATE:
        return f"coredump_filter {mm_filter:#x} leaves anonymous private memory out"
    return ""


def capture_for(
    method: type[Snapshot], request: DumpRequest, sink: SinkSpec, limits: tuple[int, int]
) -> Capture:
    """This dump's :class:`Capture`, from what is known before anything is frozen.

    :param limits: the core limit that applies, and the target's coredump_filter (the
        request's, when it gives one, wins).
    """
    limit, target_filter = limits
    mm_filter = target_filter if request.coredump_filter is None else request.coredump_filter
    return Capture(refusal(method, request, sink, limit, mm_filter), sink)


def _aio_ring(name: str) -> bool:
    """An AIO ring: shared, yet CRIU sends its pages with the process's (criu/mem.c
    should_dump_page()), where the placer would give them a private VMA's place."""
    return name.startswith("/[aio]")


class CorePlacer:
    """Places each run of one process's pages in the core (see the module docstring); drops
    runs in VMAs whose pages the converter ignores (MADV_DONTDUMP, the method's ``ignored``).

    :param vmas: ``(start, end, dropped)`` of every VMA of the dumped process, by address.
    :param data_offset: where the first streamed segment starts.
    """

    def __init__(self, vmas: Sequence[tuple[int, int, bool]], data_offset: int) -> None:
        self.starts = [v[0] for v in vmas]
        self.ends = [v[1] for v in vmas]
        self.dropped = [v[2] for v in vmas]
        self.data_offset = self.cursor = data_offset
        #: segment offset of each VMA that received pages, by start
        self.segments: dict[int, int] = {}
        #: the kept runs, split at VMA ends: (address, pages, offset in the core)
        self.runs: list[tuple[int, int, int]] = []
        #: the pagemap id CRIU sends them under (the process's pid as CRIU sees it)
        self.image_id: int | None = None
        #: shared memory objects' runs, spilled (CRIU sends an object's pages once, whatever
        #: maps it): {shmid: [(offset in the object, pages, offset in the spill file)]}
        self.shmem: dict[int, list[tuple[int, int, int]]] = {}
        self.spilled = 0

    def place(self, run: ps.PageRun) -> Sequence[ps.Piece]:
        if run.kind == ps.ImageKind.SHMEM:
            self.shmem.setdefault(run.image_id, []).append((run.vaddr, run.nr_pages, self.spilled))
            self.spilled += run.size
            return [(run.size, ps.SPILL + self.spilled - run.size)]
        if self.image_id is None:
            self.image_id = run.image_id
        elif run.image_id != self.image_id:
            raise PageStreamError(f"pages of a second process ({run.image_id})")
        pieces: list[ps.Piece] = []
        addr, end = run.vaddr, run.vaddr + run.size
        while addr < end:  # CRIU merges the runs of adjacent VMAs (criu/page-pipe.c)
            i = bisect_right(self.starts, addr) - 1
            if i < 0 or addr >= self.ends[i]:
                raise PageStreamError(
                    f"{run.nr_pages} pages at {run.vaddr:#x}: {addr:#x} is outside the"
                    " mappings planned for"
                )
            length = min(end, self.ends[i]) - addr
            pieces.append((length, self._offset(i, addr, length)))
            addr += length
        return pieces

    def _offset(self, i: int, addr: int, length: int) -> int | None:
        """Where *length* bytes at *addr* in VMA *i* go (None: dropped); recorded as a run."""
        if self.dropped[i]:
            return None
        start = self.starts[i]
        segment = self.segments.get(start)
        if segment is None:
            segment = self.segments[start] = self.cursor
            self.cursor += self.ends[i] - start
        offset = segment + addr - start
        self.runs.append((addr, length // PAGE_SIZE, offset))
        return offset


def reserved_header(vmas: int, facts: StreamFacts) -> int:
    """A page-aligned bound of the ELF header, program headers and notes of the core: PT_NOTE,
    one PT_LOAD per VMA (those the method adds, and [vvar] split in two), each thread's notes,
    the process's, and NT_FILE with every mapping name."""
    phdrs = (vmas + facts.extra_vmas + 2) * PHDR.size
    nt_file = NHDR.size + 8 + 16 + sum(24 + len(n.encode()) + _DELETED + 1 for n in facts.names)
    notes = facts.threads * THREAD_NOTES + PROCESS_NOTES + nt_file
    need = EHDR.size + phdrs + notes
    return (need + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def plan_for(pid: int, facts: StreamFacts) -> tuple[CorePlacer | None, str]:
    """The placer for the stream of stopped process *pid* (the one CRIU dumps), or None and
    why its memory cannot stream: its VMAs from /proc/PID/maps, their flags from *facts*."""
    try:
        maps = read_maps(pid)
    except OSError as e:
        return None, f"its mappings cannot be read: {os.strerror(e.errno or 0)}"
    flags = facts.vmflags
    for m in maps:
        vmflags = flags.get(m.start, frozenset())
        if "ht" in vmflags:
            return None, f"hugetlb memory at {m.start:#x}"
        if _aio_ring(m.name):
            return None, f"an AIO ring at {m.start:#x}"
    ignored = set(facts.ignored)
    vmas = [
        (m.start, m.end, "dd" in flags.get(m.start, frozenset()) or (m.start, m.end) in ignored)
        for m in maps
    ]
    return CorePlacer(vmas, reserved_header(len(maps), facts)), ""


class Stream:
    """One dump's page stream into the temporary file of core *path*; shared memory objects'
    pages go to a spill file in *work* (the dump's scratch directory)."""

    def __init__(
        self,
        path: Path,
        work: Path,
        placer: CorePlacer,
        iov: struct.Struct,
        setup: Callable[[], None],
        progress: Progress,
    ) -> None:
        self.path = path
        self.placer = placer
        self.spill = work / "stream-shmem-pages"
        self.tmp, self.fd = create_temp(path)
        self.spill_fd = -1
        try:
            self.spill_fd = os.open(
                self.spill, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            self.server = ps.PageServer(
                placer,
                self.fd,
                str(path),
                progress=partial(_progress, progress),
                iov=iov,
                setup=setup,
                spill_fd=self.spill_fd,
            )
            self.server.__enter__()
        except BaseException:
            self.remove()
            raise

    def criu_args(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """CRIU's options and the descriptors it inherits."""
        fd = self.server.criu_fd
        return ps.criu_options(fd), (fd,)

    def failed(self, e: LivedumpError) -> LivedumpError:
        """The error to report for CRIU's failure *e*: the stream's own, when it failed first
        (the output full, the protocol broken), else *e*."""
        try:
            self.server.result()
        except PageStreamError as mine:
            if mine.output:
                return CoreWriteError(mine.problem, hint=mine.hint)
            if not mine.ended:
                return mine
        except LivedumpError:
            pass
        return e

    def finish(self, images_dir: Path) -> StreamedPages:
        """After CRIU's success: the stream's end, and the pagemap images CRIU would have
        written (pagemap-ID.img, pagemap-shmem-SHMID.img), listing what arrived.

        :raises PageStreamError: the stream failed.
        """
        stats = self.server.result()
        placer = self.placer
        log.info(
            "stream: %d runs, %d bytes written into %s, %d spilled, %d dropped",
            stats.runs, stats.written, self.tmp, placer.spilled, stats.dropped,
        )  # fmt: skip
        if placer.image_id is None:
            raise PageStreamError("CRIU sent no page of the process")
        _pagemap(images_dir, f"pagemap-{placer.image_id}.img", 1, placer.runs)
        for pages_id, (shmid, runs) in enumerate(sorted(placer.shmem.items()), start=2):
            _pagemap(images_dir, f"pagemap-shmem-{shmid}.img", pages_id, runs)
        return StreamedPages(
            core=self.tmp,
            offsets={vaddr: off for vaddr, _, off in placer.runs},
            data_offset=placer.data_offset,
            total=sum(n for _, n, _ in placer.runs) * PAGE_SIZE,
            spill=self.spill,
            shmem={
                shmid: {vaddr: off for vaddr, _, off in runs}
                for shmid, runs in placer.shmem.items()
            },
        )

    def remove(self) -> None:
        """Close our descriptors; the temporary file goes unless the core was committed."""
        for fd in (self.fd, self.spill_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.spill_fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def close(self) -> None:
        self.server.__exit__(None, None, None)
        self.remove()


def _pagemap(
    images_dir: Path, name: str, pages_id: int, runs: Sequence[tuple[int, int, int]]
) -> None:
    """Pagemap image *name* of *runs* ``(address, pages, where)``. Its pages image stays
    empty: the pages are elsewhere (the core, the spill file), and an image set read without
    the stream's offsets is refused as truncated, never read wrong."""
    (images_dir / f"pages-{pages_id}.img").touch(mode=0o600)
    entries = [
        {"vaddr": vaddr, "compat_nr_pages": 0, "nr_pages": n, "flags": PE_PRESENT}
        for vaddr, n, _ in runs
    ]
    dump_image(
        images_dir / name, {"magic": "PAGEMAP", "entries": [{"pages_id": pages_id}, *entries]}
    )


def _progress(progress: Progress, stats: ps.StreamStats) -> None:
    """After each run: the dump's counters (bytes captured and written), the test hook."""
    progress.captured_at_least(stats.received)
    progress.written_at_least(stats.written)
    if run_hook is not None:
        run_hook(stats)


class Capture:
    """How one dump's pages reach the core: ``stream`` or ``images`` (CRIU's pages images,
    then the conversion's copy), and why not streamed."""

    def __init__(self, reason: str, sink: SinkSpec) -> None:
        self.reason = reason
        self.sink = sink
        self.setup: Callable[[], None] = lambda: None
        self.progress = Progress()
        self.stream: Stream | None = None
        self.pages: StreamedPages | None = None

    def bind(self, scheduling: Callable[[], None], progress: Progress) -> None:
        """What the stream's writer runs at, *scheduling* (the request's nice and I/O
        priority, applied by the page server's thread to itself: both are per thread in Linux,
        setpriority(PRIO_PROCESS, 0) and ioprio_set(IOPRIO_WHO_PROCESS, 0) act on the caller;
        oom_score_adj is the process's, and the server's own memory is its 1 MiB buffer), and
        the dump's *progress* counters."""

        def setup() -> None:
            try:
                scheduling()
            except OSError as e:
                raise PageStreamError(
                    f"cannot apply priorities to its server: {e.strerror or 'refused'}"
                ) from None

        self.setup, self.progress = setup, progress

    @property
    def path(self) -> str:
        return "stream" if self.stream is not None else "images"

    def begin(
        self, task: CriuTask, binary: criu.Criu, work: Path
    ) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Start the stream for *task* if it can be; CRIU's further options and descriptors."""
        if not self.reason and task.stream is None:
            self.reason = "the method gave no facts for a stream"
        if self.reason:
            log.info("capture: CRIU's images, then the conversion (%s)", self.reason)
            return (), ()
        assert task.stream is not None and self.sink.path is not None
        placer, why = plan_for(task.pid, task.stream)
        try:
            iov = ps.iov_layout(criu.version(binary))
        except LivedumpError as e:
            placer, why = None, f"its version is unknown ({e.message})"
        if placer is None:
            self.reason = why
            log.info("capture: CRIU's images, then the conversion (%s)", why)
            return (), ()
        self.stream = Stream(self.sink.path, work, placer, iov, self.setup, self.progress)
        log.info("capture: streamed into %s", self.stream.tmp)
        return self.stream.criu_args()

    def failed(self, e: LivedumpError) -> LivedumpError:
        return e if self.stream is None else self.stream.failed(e)

    def finish(self, images_dir: Path) -> None:
        if self.stream is not None:
            self.pages = self.stream.finish(images_dir)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()

"""The page server (snapshot/page_server.py) against real CRIU: every page CRIU dumps arrives
once, as the entries it would have written to pagemap-N.img, with the target's bytes; a stream
CRIU does not finish and an output that fills up each end in one PageStreamError."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import procs
import pytest
from harness.criu import criu_release
from test_faults import small_tmpfs

from converters.images import PE_PRESENT, pagemap_runs
from criu_livedump.errors import CriuError, LivedumpError, PageStreamError
from criu_livedump.snapshot import criu
from criu_livedump.snapshot import page_server as ps

PAGE = 4096
PRIVATE_PAGES = 300
SHARED_PAGES = 40

#: A target whose private (argv[1] pages, else PRIVATE_PAGES) and shared anonymous areas hold
#: bytes that name their page; it prints both addresses, then sleeps.
TARGET = f"""
import ctypes, mmap, sys, time
def fill(m, tag):
    for i in range(len(m) // {PAGE}):
        m[i * {PAGE}:(i + 1) * {PAGE}] = (tag + i.to_bytes(7, "little")) * {PAGE // 8}
pages = int(sys.argv[1]) if len(sys.argv) > 1 else {PRIVATE_PAGES}
priv = mmap.mmap(-1, pages * {PAGE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
shared = mmap.mmap(-1, {SHARED_PAGES * PAGE}, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
fill(priv, b"P")
fill(shared, b"S")
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr(priv), addr(shared), flush=True)
time.sleep(600)
"""


def page_bytes(tag: bytes, i: int) -> bytes:
    return (tag + i.to_bytes(7, "little")) * (PAGE // 8)


@pytest.fixture
def target() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = procs.popen([sys.executable, "-c", TARGET], stdout=subprocess.PIPE, text=True)
    try:
        priv, _shared = procs.readline(proc.stdout, 30, "the target's addresses").split()
        yield proc, int(priv)
    finally:
        procs.kill_group(proc)
        proc.wait()


class Recorder:
    """Places every run one after the other in the output, dropping those *drop* names."""

    def __init__(self, drop: ps.ImageKind | None = None) -> None:
        self.runs: list[tuple[ps.PageRun, int | None]] = []
        self.next = 0
        self.drop = drop
        self.on_run = lambda: None

    def place(self, run: ps.PageRun) -> Sequence[ps.Piece]:
        self.on_run()
        if run.kind == self.drop:
            self.runs.append((run, None))
            return [(run.size, None)]
        offset, self.next = self.next, self.next + run.size
        self.runs.append((run, offset))
        # two pieces when it can (a run may span two segments of a core)
        head = PAGE if run.size > PAGE else run.size
        return [(head, offset), (run.size - head, offset + head)][: 2 if run.size > head else 1]


def streaming_job(server: ps.PageServer, pid: int, scratch: Path) -> criu.DumpJob:
    """CRIU's job for *pid* sending its pages to *server*."""
    return criu.DumpJob(
        pid=pid,
        scratch=scratch,
        extra_args=ps.criu_options(server.criu_fd),
        pass_fds=(server.criu_fd,),
    )


def streamed_dump(
    pid: int, images: Path, placer: ps.Placer, out_fd: int, binary: criu.Criu | None = None
) -> tuple[ps.StreamStats, criu.DumpResult]:
    binary = binary or criu.find()
    iov = ps.iov_layout(criu.version(binary))
    with ps.PageServer(placer, out_fd, "the test's output", iov=iov) as server:
        try:
            result = criu.dump(binary, streaming_job(server, pid, images))
        finally:
            server.criu_started()
        return server.result(), result


#: the installed CRIU, and 4.1.1 (page_server_iov.nr_pages a u32 before 4.2), if built
RELEASES = [None, "4.1.1"]


@pytest.mark.parametrize("release", RELEASES, ids=lambda r: f"criu-{r}" if r else "installed")
def test_pages_arrive_as_criu_writes_them(
    tmp_path: Path, target: tuple[subprocess.Popen[str], int], release: str | None
) -> None:
    binary = criu.find()
    if release is not None:
        path = criu_release(release)
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is not built (make setup, or scripts/build-criu.sh {release})")
        binary = criu.find(str(path))
    proc, priv = target
    os.kill(proc.pid, signal.SIGSTOP)  # the same pages in both dumps
    recorder = Recorder()
    with (tmp_path / "out").open("w+b") as out:
        stats, result = streamed_dump(proc.pid, tmp_path / "stream", recorder, out.fileno(), binary)
        data = out.read()
    # with --page-server the pagemap is the server's to write: nothing of it in CRIU's images
    assert not list(result.images_dir.glob("pagemap-*")) + list(result.images_dir.glob("pages-*"))
    assert stats.received == stats.written == len(data)
    mine = [r for r, _ in recorder.runs if r.kind == ps.ImageKind.PROCESS]
    assert sum(r.size for r in mine) == result.stats.pages_written * PAGE  # shmem not counted
    local = criu.dump(binary, criu.DumpJob(pid=proc.pid, scratch=tmp_path / "local"))
    assert [(r.vaddr, r.nr_pages, r.flags) for r in mine] == pagemap_runs(
        local.images_dir / f"pagemap-{proc.pid}.img"
    )
    assert all(r.flags & PE_PRESENT for r, _ in recorder.runs)
    got = {}
    for run, offset in recorder.runs:
        assert offset is not None
        tag = b"P" if run.kind == ps.ImageKind.PROCESS else b"S"
        for k in range(run.nr_pages):
            got[tag, run.vaddr + k * PAGE] = data[offset + k * PAGE : offset + (k + 1) * PAGE]
    for i in range(PRIVATE_PAGES):
        assert got[b"P", priv + i * PAGE] == page_bytes(b"P", i)
    for i in range(SHARED_PAGES):
        assert got[b"S", i * PAGE] == page_bytes(b"S", i)


def test_dropped_runs_are_not_written(
    tmp_path: Path, target: tuple[subprocess.Popen[str], int]
) -> None:
    proc, _ = target
    recorder = Recorder(drop=ps.ImageKind.SHMEM)
    with (tmp_path / "out").open("w+b") as out:
        stats, _ = streamed_dump(proc.pid, tmp_path / "s", recorder, out.fileno())
        size = os.fstat(out.fileno()).st_size
    shmem = sum(r.size for r, off in recorder.runs if off is None)
    assert shmem >= SHARED_PAGES * PAGE
    assert stats.dropped == shmem
    assert stats.written == size == stats.received - shmem


def test_criu_killed_mid_stream(tmp_path: Path, target: tuple[subprocess.Popen[str], int]) -> None:
    """CRIU dies after its first run: the stream's end is an error, not a short success.
    (CRIU killed inside its dumpee kills the dumpee: that is why only a clone streams.)"""
    proc, _ = target
    recorder = Recorder()

    def kill_criu() -> None:
        if not recorder.runs:
            for pid in procs.children(os.getpid()):
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "criu":
                        os.kill(pid, signal.SIGKILL)

    recorder.on_run = kill_criu
    with (
        (tmp_path / "out").open("w+b") as out,
        ps.PageServer(recorder, out.fileno(), "o") as server,
    ):
        with pytest.raises(LivedumpError):
            criu.dump(criu.find(), streaming_job(server, proc.pid, tmp_path / "s"))
        server.criu_started()
        with pytest.raises(PageStreamError, match="ended it before its close"):
            server.result()
    assert len(recorder.runs) == 1


def test_output_full_mid_stream(tmp_path: Path, target: tuple[subprocess.Popen[str], int]) -> None:
    """The output fills up: the stream's error names it, CRIU fails (its socket shut), and the
    target, dumped with --leave-running, runs on."""
    proc, _ = target
    with (
        small_tmpfs(tmp_path / "full", "256k") as full,
        (full / "core").open("w+b") as out,
        ps.PageServer(Recorder(), out.fileno(), "core") as server,
    ):
        with pytest.raises(CriuError):
            criu.dump(criu.find(), streaming_job(server, proc.pid, tmp_path / "s"))
        server.criu_started()
        with pytest.raises(PageStreamError, match="cannot write core: No space left on device"):
            server.result()
    assert proc.poll() is None
    assert criu.ensure_running(proc.pid) is False


def test_refuses_lazy_and_unknown_commands() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(ps.PSI.pack(ps.PS_IOV_GET, 1, 0, 1 << 8 | 1))
        with pytest.raises(PageStreamError, match="lazy pages are not served"):
            ps.receive(ours, Recorder(), -1, out_name="x")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(ps.PSI.pack(ps.PS_IOV_OPEN2, 0, 0, 5 << 8 | 9))
        with pytest.raises(PageStreamError, match="unknown image type 9"):
            ps.receive(ours, Recorder(), -1, out_name="x")


def test_a_peer_that_dies_with_our_answer_unread_is_an_early_end() -> None:
    """A unix stream peer closed with data still queued for it resets the pair (ECONNRESET on
    our next read): that is CRIU killed mid-stream too, not a raw exception."""
    ours, theirs = socket.socketpair()
    with ours:
        ours.sendall(b"an answer CRIU never reads")
        theirs.close()
        with pytest.raises(PageStreamError, match="ended it before its close"):
            ps.receive(ours, Recorder(), -1, out_name="x")

"""CRIU's page server, served in this process over a socketpair.

``criu dump --page-server --ps-socket FD`` sends every page it dumps over an already connected
socket instead of writing ``pagemap-N.img``/``pages-N.img`` (CRIU 4.2.1: criu/config.c reads
``--ps-socket``; criu/page-xfer.c connect_to_page_server() reuses the descriptor). A socketpair
means nothing else on the host can talk to the server, and each page run can be written where
it belongs (in the core) the moment it arrives, so the pages never touch scratch.

What the dumping side sends (criu/page-xfer.c, CRIU 4.2.1; each message one
``struct page_server_iov``, the server's own side in page_server_serve()):

==================  =================================  ========================================
message             when                               the server's answer
==================  =================================  ========================================
PS_IOV_PARENT       a pre-dump (check_parent_...)      int has_parent (we always say 0)
PS_IOV_OPEN2        one per process (pagemap) and per  1 byte has_parent (0: no parent images,
                    shared anonymous area (shmem)      so CRIU sends every page itself)
PS_IOV_ADD_F        one per pagemap entry; PE_* flags  none; when PE_PRESENT the run's bytes
                    in the upper 16 bits of ``cmd``    follow (nr_pages pages)
PS_IOV_FORCE_CLOSE  the end (--ps-socket)              int32 status 0; the last message
==================  =================================  ========================================

PS_IOV_ADD/HOLE/OPEN/CLOSE come from older senders and are accepted as page_server_serve()
does; PS_IOV_GET (lazy pages) is refused. The runs are exactly the entries CRIU would write to
pagemap-N.img (write_pagemap_loc() writes one entry per write_pagemap call either way).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from converters.elf import PAGE_SIZE
from converters.images import PE_LAZY, PE_PARENT, PE_PRESENT
from criu_livedump.errors import PageStreamError
from criu_livedump.snapshot.criu import version_tuple

#: struct page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id;} with its natural
#: padding after cmd (criu/page-xfer.c; the same on every 64-bit architecture CRIU runs on),
#: since CRIU 4.2 (afb2e6c3f made nr_pages a u64)
PSI = struct.Struct("<I4xQQQ")
#: the same before CRIU 4.2: {u32 cmd; u32 nr_pages; u64 vaddr; u64 dst_id;}, 24 bytes
PSI_BEFORE_4_2 = struct.Struct("<IIQQ")


def iov_layout(criu_version: str) -> struct.Struct:
    """The page_server_iov header CRIU *criu_version* (``criu --version``) sends."""
    return PSI if version_tuple(criu_version) >= (4, 2) else PSI_BEFORE_4_2


_INT = struct.Struct("<i")

PS_IOV_ADD = 1
PS_IOV_HOLE = 2
PS_IOV_OPEN = 3
PS_IOV_OPEN2 = 4
PS_IOV_PARENT = 5
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
#: encode_ps_cmd(): flags << PS_CMD_BITS | cmd
PS_CMD_BITS = 16
#: encode_pm(): id << PS_TYPE_BITS | type
PS_TYPE_BITS = 8

#: How much of the socket is read at once into the one reused buffer.
CHUNK = 1 << 20


class ImageKind(enum.IntEnum):
    """What a run's ``image_id`` names (encode_pm(): PS_TYPE_PID, PS_TYPE_SHMEM)."""

    PROCESS = 1  #: pagemap-PID.img: a process's private memory at its virtual addresses
    SHMEM = 2  #: pagemap-shmem-SHMID.img: a shared anonymous area, addresses from its start


@dataclass(frozen=True)
class PageRun:
    """One pagemap entry as it arrives: ``nr_pages`` pages at ``vaddr`` with PE_* ``flags``."""

    kind: ImageKind
    image_id: int
    vaddr: int
    nr_pages: int
    flags: int

    @property
    def size(self) -> int:
        return self.nr_pages * PAGE_SIZE

    @property
    def present(self) -> bool:
        """Whether the run's bytes follow it on the socket."""
        return bool(self.flags & PE_PRESENT)


#: Where a piece of a run goes: ``(length, offset in the output)``, or ``(length, None)`` to
#: drop it (pages the core leaves out). An offset from :data:`SPILL` on is ``offset - SPILL``
#: in the spill file instead (pages kept apart from the output, as shared memory is).
Piece = tuple[int, int | None]
SPILL = 1 << 62


class Placer(Protocol):
    """Decides, for each run, where its bytes go; raises :class:`PageStreamError` to refuse."""

    def place(self, run: PageRun) -> Sequence[Piece]:
        """Pieces covering ``run.size`` bytes in order (only called for present runs)."""
        ...


@dataclass
class StreamStats:
    """What one stream carried."""

    runs: int = 0
    received: int = 0
    written: int = 0
    dropped: int = 0


def criu_options(fd: int) -> tuple[str, ...]:
    """CRIU's options to send its pages over the connected socket *fd*."""
    return ("--page-server", "--ps-socket", str(fd))


def _decode_kind(dst_id: int) -> tuple[ImageKind, int]:
    kind = dst_id & ((1 << PS_TYPE_BITS) - 1)
    try:
        return ImageKind(kind), dst_id >> PS_TYPE_BITS
    except ValueError:
        raise PageStreamError(f"unknown image type {kind} in its stream") from None


class _Receiver:
    """The protocol loop over one connected socket (see the module's table)."""

    def __init__(
        self,
        sock: socket.socket,
        placer: Placer,
        out_fd: int,
        out_name: str,
        progress: Callable[[StreamStats], None] | None,
        iov: struct.Struct = PSI,
        spill_fd: int | None = None,
    ) -> None:
        self.sock = sock
        self.spill_fd = spill_fd
        self.iov = iov
        self.placer = placer
        self.out_fd = out_fd
        self.out_name = out_name
        self.progress = progress
        self.stats = StreamStats()
        self.buf = memoryview(bytearray(CHUNK))
        self.opened: tuple[ImageKind, int] | None = None
        self.pipe: tuple[int, int] | None = None
        self.pipe_size = 0

    def _recv_exact(self, n: int) -> memoryview:
        view = self.buf[:n]
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise _ended()
            got += k
        return view

    def _answer(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET):  # CRIU's end is closed: it died
                raise _ended() from None
            raise PageStreamError(f"cannot answer CRIU: {os.strerror(e.errno or 0)}") from None

    def run(self) -> StreamStats:
        while True:
            cmd, nr_pages, vaddr, dst_id = self.iov.unpack(self._recv_exact(self.iov.size))
            op, flags = cmd & ((1 << PS_CMD_BITS) - 1), cmd >> PS_CMD_BITS
            if op in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                self._answer(_INT.pack(0))
                return self.stats
            if op == PS_IOV_PARENT:
                _decode_kind(dst_id)
                self._answer(_INT.pack(0))
            elif op in (PS_IOV_OPEN, PS_IOV_OPEN2):
                self.opened = _decode_kind(dst_id)
                if op == PS_IOV_OPEN2:
                    self._answer(b"\0")
            elif op in (PS_IOV_ADD_F, PS_IOV_ADD, PS_IOV_HOLE):
                if op == PS_IOV_ADD:
                    flags = PE_PRESENT
                elif op == PS_IOV_HOLE:
                    flags = PE_PARENT
                self._add(vaddr, nr_pages, flags, dst_id)
            else:
                raise PageStreamError(f"unexpected command {cmd:#x} (lazy pages are not served)")

    def _add(self, vaddr: int, nr_pages: int, flags: int, dst_id: int) -> None:
        kind, image_id = _decode_kind(dst_id)
        if self.opened != (kind, image_id):
            raise PageStreamError(f"pages of an image it did not open ({kind.name} {image_id})")
        run = PageRun(kind, image_id, vaddr, nr_pages, flags)
        if not run.present:
            # PE_PARENT needs parent images (we answered none); PE_LAZY alone needs lazy pages
            raise PageStreamError(
                f"a run at {vaddr:#x} without its pages (flags {flags:#x},"
                f" {'in a parent' if flags & PE_PARENT else 'lazy' if flags & PE_LAZY else '?'})"
            )
        self.stats.runs += 1
        pieces = self.placer.place(run)
        if sum(n for n, _ in pieces) != run.size:
            raise ValueError(f"placer covered {pieces} of a {run.size}-byte run")
        for length, offset in pieces:
            self._piece(length, offset)
        if self.progress is not None:
            self.progress(self.stats)

    def _piece(self, length: int, offset: int | None) -> None:
        if offset is not None:
            self._splice(length, offset)
            return
        done = 0
        while done < length:
            k = self.sock.recv_into(self.buf, min(CHUNK, length - done))
            if k == 0:
                raise _ended()
            done += k
            self.stats.received += k
            self.stats.dropped += k

    def _splice(self, length: int, offset: int) -> None:
        out_fd = self.out_fd
        if offset >= SPILL:
            if self.spill_fd is None:
                raise ValueError(f"placer spilled {length} bytes without a spill file")
            out_fd, offset = self.spill_fd, offset - SPILL
        self._splice_to(out_fd, length, offset)

    def _splice_to(self, out_fd: int, length: int, offset: int) -> None:
        """*length* bytes from the socket to the output at *offset*, through a pipe: the pages
        never pass through Python (4 GiB to ext4 here: 7.0-8.9 s against 9.0-10.3 s with
        recv_into + pwrite)."""
        if self.pipe is None:
            self.pipe = os.pipe()
            with contextlib.suppress(OSError):  # pipe-max-size may forbid it: the default works
                fcntl.fcntl(self.pipe[1], fcntl.F_SETPIPE_SZ, CHUNK)
            self.pipe_size = fcntl.fcntl(self.pipe[1], fcntl.F_GETPIPE_SZ)
        r, w = self.pipe
        done = 0
        while done < length:
            n = os.splice(self.sock.fileno(), w, min(self.pipe_size, length - done))
            if n == 0:
                raise _ended()
            self.stats.received += n
            left = n
            while left:
                try:
                    k = os.splice(r, out_fd, left, offset_dst=offset + done)
                except OSError as e:
                    raise self._write_error(e, out_fd) from None
                left -= k
                done += k
                self.stats.written += k

    def _write_error(self, e: OSError, out_fd: int) -> PageStreamError:
        code = e.errno or errno.EIO
        full = code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        name = self.out_name if out_fd == self.out_fd else "the spill file (in scratch)"
        return PageStreamError(
            f"cannot write {name}: {os.strerror(code)}",
            output=out_fd == self.out_fd,
            hint="free space there or choose another destination" if full else None,
        )

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


def _ended() -> PageStreamError:
    return PageStreamError("CRIU ended it before its close (CRIU died or was killed)", ended=True)


def receive(
    sock: socket.socket,
    placer: Placer,
    out_fd: int,
    *,
    out_name: str,
    progress: Callable[[StreamStats], None] | None = None,
    iov: struct.Struct = PSI,
    spill_fd: int | None = None,
) -> StreamStats:
    """Serve one dump's page stream on *sock* until CRIU closes it.

    :param out_fd: where placed pieces are written (spliced at their offsets: a regular
        file, or anything ``splice(2)`` writes to at an offset).
    :param out_name: the output's name for error messages.
    :param progress: called after every run with the counts so far.
    :param iov: the dumping CRIU's page_server_iov layout (:func:`iov_layout`).
    :param spill_fd: where pieces placed from :data:`SPILL` on are written.
    :raises PageStreamError: the stream ended early, broke the protocol, or a write failed.
    """
    receiver = _Receiver(sock, placer, out_fd, out_name, progress, iov, spill_fd)
    try:
        return receiver.run()
    except ConnectionResetError:  # a peer that dies with our data unread resets the pair
        raise _ended() from None
    finally:
        receiver.close()


#: How much CRIU may send before we read (its socket's send buffer: a unix stream socket
#: counts what is in flight against the sender, net/unix/af_unix.c). The default (about 200 KiB)
#: costs one switch between CRIU and the server per 200 KiB; on a loaded host each switch waits
#: for a time slice, and 1 GiB took 13 s to stream here at load 20 (PROFILE in the closing note).
SOCKET_BUFFER = 32 << 20
#: SO_SNDBUFFORCE (include/uapi/asm-generic/socket.h): past net.core.wmem_max, with
#: CAP_NET_ADMIN
SO_SNDBUFFORCE = 32


def _widen(sock: socket.socket, option: int, force: int) -> None:
    """Give *sock* a :data:`SOCKET_BUFFER` buffer, past the sysctl limit where we may."""
    for opt in (force, option):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            return


class PageServer:
    """:func:`receive` in a thread, over a socketpair whose other end CRIU inherits.

    ``with PageServer(placer, fd, name) as ps:`` start CRIU with ``pass_fds=(ps.criu_fd,)`` and
    :func:`criu_options` ``(ps.criu_fd)``, call :meth:`criu_started` once it has, then
    :meth:`result` after CRIU ended. Leaving the block stops the thread whatever happened.
    """

    def __init__(
        self,
        placer: Placer,
        out_fd: int,
        out_name: str,
        progress: Callable[[StreamStats], None] | None = None,
        iov: struct.Struct = PSI,
        setup: Callable[[], None] | None = None,
        spill_fd: int | None = None,
    ) -> None:
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _widen(self._theirs, socket.SO_SNDBUF, SO_SNDBUFFORCE)
        self._outcome: StreamStats | BaseException | None = None
        #: run first in the server's thread (its priorities: nice and ioprio are per thread)
        self._setup = setup
        self._spill_fd = spill_fd
        self._thread = threading.Thread(
            target=self._serve,
            args=(placer, out_fd, out_name, progress, iov),
            name="criu-page-server",
            daemon=True,
        )

    @property
    def criu_fd(self) -> int:
        """CRIU's end of the pair (pass it to CRIU; :meth:`criu_started` closes our copy)."""
        return self._theirs.fileno()

    def _serve(
        self,
        placer: Placer,
        out_fd: int,
        out_name: str,
        progress: Callable[[StreamStats], None] | None,
        iov: struct.Struct,
    ) -> None:
        try:
            if self._setup is not None:
                self._setup()
            self._outcome = receive(
                self._ours,
                placer,
                out_fd,
                out_name=out_name,
                progress=progress,
                iov=iov,
                spill_fd=self._spill_fd,
            )
        except BaseException as e:  # handed to result() in the caller's thread
            self._outcome = e
            # CRIU blocks on a full socket otherwise; this makes its sends fail at once
            with contextlib.suppress(OSError):
                self._ours.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> PageServer:
        self._thread.start()
        return self

    def criu_started(self) -> None:
        """Close our copy of CRIU's end, so that CRIU's end is our stream's end."""
        self._theirs.close()

    def result(self, timeout: float = 10.0) -> StreamStats:
        """The stream's counts once CRIU has ended.

        :raises PageStreamError: the stream failed, or did not end within *timeout* seconds.
        """
        self._theirs.close()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PageStreamError(f"not closed {timeout:.0f} s after CRIU ended")
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None:
            raise PageStreamError("its server ended without a result")
        return outcome

    def __exit__(self, *exc: object) -> None:
        self._theirs.close()
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._ours.shutdown(socket.SHUT_RDWR)
            self._thread.join(10.0)
        self._ours.close()

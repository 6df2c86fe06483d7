"""Where core bytes go: a regular file (temp name, then a no-clobber rename) or a stream.

Bulk bytes move file-to-file (copy_file_range, then sendfile, then a bounded buffer); holes are
seeks in seekable sinks and zeros in streams. Nothing here knows about ELF or limits: the
writer (converters/elf.py) decides what to emit, as fs/coredump.c's dump_emit()/dump_skip() do.
"""

from __future__ import annotations

import contextlib
import errno
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from converters.errors import OutputError

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


class Sink(ABC):
    """A destination for one core."""

    name: str
    seekable: bool

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def copy_from(self, fd: int, offset: int, length: int) -> None:
        """Append *length* bytes of file *fd* starting at *offset*."""

    @abstractmethod
    def hole(self, length: int) -> None:
        """Append *length* zero bytes, as a hole where the sink allows it."""

    @abstractmethod
    def commit(self) -> Path | None:
        """Finish: the core becomes visible at its destination. Returns its path, if any."""

    @abstractmethod
    def abort(self) -> None:
        """Give up: nothing is left at the destination. Safe to call more than once."""

    def _fail(self, e: OSError) -> OutputError:
        return OutputError(self.name, os.strerror(e.errno or 0) if e.errno else str(e))


def _copy(out_fd: int, in_fd: int, offset: int, length: int, *, out_is_file: bool) -> None:
    """Move bytes kernel-side where possible; fall back to a bounded buffer."""
    end = offset + length
    if out_is_file:
        try:
            while offset < end:
                n = os.copy_file_range(in_fd, out_fd, min(end - offset, 1 << 30), offset)
                if n == 0:
                    _pad_zeros(out_fd, end - offset)
                    return
                offset += n
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
    try:
        while offset < end:
            n = os.sendfile(out_fd, in_fd, offset, min(end - offset, 1 << 30))
            if n == 0:
                _pad_zeros(out_fd, end - offset)
                return
            offset += n
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while offset < end:
        chunk = os.pread(in_fd, min(end - offset, _CHUNK), offset)
        if not chunk:
            _pad_zeros(out_fd, end - offset)
            return
        _write_all(out_fd, chunk)
        offset += len(chunk)


def _pad_zeros(out_fd: int, length: int) -> None:
    """The source ended early: the rest reads as zeros, as the tail of a file's last page does
    in memory (filemap_fault() maps it zero-filled past i_size). Pages images were checked
    against their pagemap when loaded, so only mapped files end here."""
    while length > 0:
        n = min(length, _CHUNK)
        _write_all(out_fd, _ZEROS[:n])
        length -= n


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def create_temp(path: Path, mode: int = 0o600) -> tuple[Path, int]:
    """A new file beside *path*, under a hidden temporary name (O_EXCL|O_NOFOLLOW): where a
    core is written before it is linked into place. Returns its name and a descriptor.

    :raises OutputError: it cannot be created.
    """
    # os.urandom, as secrets.token_hex does, without importing hashlib (a live dump's start-up)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return tmp, os.open(tmp, flags, mode)
    except OSError as e:
        raise OutputError(str(path), os.strerror(e.errno or 0) if e.errno else str(e)) from e


class FileSink(Sink):
    """A core file: written under a temporary name in the destination's directory, mode 0600
    (O_EXCL|O_NOFOLLOW), chowned to *uid*/*gid*, then linked into place without ever
    replacing an existing file or following a symlink there.

    :param adopt: a temporary file :func:`create_temp` made for *path* that already holds part
        of the core (a streamed dump's pages): written into, committed or removed as our own.
    """

    seekable = True

    def __init__(
        self,
        path: Path,
        mode: int = 0o600,
        uid: int | None = None,
        gid: int | None = None,
        *,
        adopt: Path | None = None,
    ) -> None:
        self.path = path
        self.name = str(path)
        self.uid, self.gid = uid, gid
        if os.path.lexists(path):
            if adopt is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(adopt)
            raise OutputError(self.name, "already exists; refusing to overwrite it")
        self.fd: int | None
        if adopt is None:
            self.tmp, self.fd = create_temp(path, mode)
            return
        self.tmp = adopt
        try:
            self.fd = os.open(adopt, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise self._fail(e) from e

    def _fd(self) -> int:
        if self.fd is None:
            raise OutputError(self.name, "already closed")
        return self.fd

    def write(self, data: bytes) -> None:
        try:
            _write_all(self._fd(), data)
        except OSError as e:
            raise self._fail(e) from e

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        try:
            _copy(self._fd(), fd, offset, length, out_is_file=True)
        except OSError as e:
            raise self._fail(e) from e

    def hole(self, length: int) -> None:
        try:
            os.lseek(self._fd(), length, os.SEEK_CUR)
        except OSError as e:
            raise self._fail(e) from e

    def commit(self) -> Path:
        fd = self._fd()
        try:
            if self.uid is not None or self.gid is not None:
                os.fchown(
                    fd, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid
                )
            # no fsync: the kernel's own core is not synced either (fs/coredump.c), nor is
            # gcore's; a 1 GiB core waited 0.6 s here for its writeback, which the page cache
            # does anyway. The link is what makes the core visible, and only once complete.
            os.close(fd)
            self.fd = None
            # link() never replaces an existing name, symlinks included (no clobber, no follow)
            os.link(self.tmp, self.path)
        except FileExistsError as e:
            self.abort()
            raise OutputError(self.name, "appeared while writing; refusing to overwrite it") from e
        except OSError as e:
            self.abort()
            raise self._fail(e) from e
        os.unlink(self.tmp)
        return self.path

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class StreamSink(Sink):
    """A pipe, socket or stdout. Holes become zeros; a regular file here is still seekable."""

    def __init__(self, stream: BinaryIO | int, name: str = "<stream>") -> None:
        self.fd = stream if isinstance(stream, int) else stream.fileno()
        self.name = name
        try:
            import stat

            self.seekable = stat.S_ISREG(os.fstat(self.fd).st_mode)
        except OSError:
            self.seekable = False

    def write(self, data: bytes) -> None:
        try:
            _write_all(self.fd, data)
        except OSError as e:
            raise self._fail(e) from e

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        try:
            _copy(self.fd, fd, offset, length, out_is_file=self.seekable)
        except OSError as e:
            raise self._fail(e) from e

    def hole(self, length: int) -> None:
        try:
            if self.seekable:
                os.lseek(self.fd, length, os.SEEK_CUR)
                return
            while length > 0:
                n = min(length, _CHUNK)
                _write_all(self.fd, _ZEROS[:n])
                length -= n
        except OSError as e:
            raise self._fail(e) from e

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        return None

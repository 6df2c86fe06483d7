"""Checkpoint archives: a CRIU image directory packed as ``.tar``, ``.tar.gz`` or ``.tar.zst``.

Podman (``podman container checkpoint --export``) and the Kubernetes kubelet checkpoint API
write the images under ``checkpoint/`` beside their own metadata; a plain ``tar -C DIR .`` has
them at the top. :func:`open_images` takes either an image directory or such an archive and
yields a directory of images.

Archives may come from elsewhere, so extraction trusts nothing in them: only regular files and
directories are accepted, and an entry with an absolute path, a ``..`` component, a link, a
device or a FIFO makes the whole archive refused. Files are created by us with
``O_EXCL|O_NOFOLLOW`` inside a private ``mkdtemp`` directory (mode 0700) in which no symlink can
exist, so nothing is ever written outside it. Sizes are bounded (total bytes, entry count, and
the metadata headers that :mod:`tarfile` would otherwise read whole into memory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from converters.errors import ArchiveError

#: at most this many entries in one archive (a CRIU image set has a few dozen files)
MAX_ENTRIES = 100_000
#: pax / GNU long-name headers larger than this are refused before tarfile reads them whole
MAX_META_BYTES = 1 << 20
#: leave this fraction of the temp filesystem free when no explicit size bound is given
_FREE_MARGIN = 0.05
_CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_META_TYPES = {
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
}
_KIND = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
}


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized metadata headers.

    tarfile reads a pax or GNU long-name header's payload into memory in one piece
    (TarInfo._proc_pax(), _proc_gnulong()); a tiny compressed archive could make that gigabytes.
    """

    def _proc_member(self, tarfile: tarfile.TarFile) -> Any:
        if self.type in _META_TYPES and self.size > MAX_META_BYTES:
            raise ArchiveError(
                str(getattr(tarfile, "name", None) or "archive"),
                f"metadata header of {self.size} bytes (limit {MAX_META_BYTES})",
            )
        return super()._proc_member(tarfile)  # type: ignore[misc]


def is_archive(path: Path) -> bool:
    """True when *path* is a regular file that looks like a tar, gzip or zstd archive."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if head.startswith((_GZIP_MAGIC, _ZSTD_MAGIC)):
        return True
    return len(head) >= 262 and head[257:262] == b"ustar"


@contextlib.contextmanager
def open_images(
    path: Path, *, tmp_dir: Path | None = None, max_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a directory of CRIU images for *path*: the directory itself, or a private
    extraction of the archive *path* (removed on exit).

    :param tmp_dir: where the private extraction directory is created (default: ``$TMPDIR``).
    :param max_bytes: refuse archives that expand to more than this; default: the free space
        of the temp filesystem, less a margin.
    :raises ArchiveError: an unreadable archive, a refused entry, too much data, or no images.
    """
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise ArchiveError(str(path), "neither an images directory nor an archive file")
    work = Path(tempfile.mkdtemp(prefix="criu-livedump-archive-", dir=tmp_dir))
    try:
        os.chmod(work, 0o700)
        limit = max_bytes if max_bytes is not None else _free_bytes(work)
        extract(path, work, limit)
        yield find_images(path, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    return int(free - st.f_blocks * st.f_frsize * _FREE_MARGIN)


def find_images(archive: Path, root: Path) -> Path:
    """The images directory inside an extracted archive: the top, ``checkpoint/``, or either
    of those under a single top-level directory (``tar czf x.tgz dir/``).

    :raises ArchiveError: no ``pstree.img`` in any of those places.
    """
    candidates = [root, root / "checkpoint"]
    tops = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    if len(tops) == 1 and not (root / "pstree.img").exists():
        candidates += [tops[0], tops[0] / "checkpoint"]
    for c in candidates:
        if (c / "pstree.img").is_file():
            return c
    raise ArchiveError(str(archive), "no CRIU images (pstree.img) at the top or under checkpoint/")


def extract(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract *archive* (tar, tar.gz or tar.zst, by content) into the empty directory *dest*.

    :raises ArchiveError: see :func:`open_images`.
    """
    try:
        with archive.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ArchiveError(str(archive), os.strerror(e.errno or 0)) from e
    if magic.startswith(_ZSTD_MAGIC):
        _extract_zstd(archive, dest, max_bytes)
        return
    mode = "r|gz" if magic.startswith(_GZIP_MAGIC) else "r|"
    try:
        with archive.open("rb") as raw:
            _extract_stream(archive, raw, mode, dest, max_bytes)
    except OSError as e:
        raise ArchiveError(str(archive), os.strerror(e.errno or 0) if e.errno else str(e)) from e


def _extract_zstd(archive: Path, dest: Path, max_bytes: int) -> None:
    """Decompress with the ``zstd`` binary, streaming its output into tarfile."""
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ArchiveError(str(archive), "is zstd-compressed but the zstd program is not installed")
    with subprocess.Popen(
        [zstd, "-dcq", "--", str(archive)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        failure: ArchiveError | None = None
        try:
            _extract_stream(archive, proc.stdout, "r|", dest, max_bytes)
        except ArchiveError as e:
            failure = e
        finally:
            # closing the pipe ends a zstd still writing (SIGPIPE: a negative status)
            proc.stdout.close()
        err = proc.stderr.read(4096).decode(errors="replace").strip().splitlines()
        if proc.wait() > 0:
            # zstd's own complaint explains a broken tar stream better than tarfile can
            why = err[-1] if err else f"exit status {proc.returncode}"
            raise ArchiveError(str(archive), f"zstd failed: {why}") from failure
        if failure is not None:
            raise failure


def _extract_stream(archive: Path, raw: IO[bytes], mode: str, dest: Path, max_bytes: int) -> None:
    total = 0
    count = 0
    try:
        with tarfile.open(fileobj=raw, mode=mode, tarinfo=BoundedTarInfo) as tf:  # type: ignore[call-overload]
            for member in tf:
                count += 1
                if count > MAX_ENTRIES:
                    raise ArchiveError(str(archive), f"more than {MAX_ENTRIES} entries")
                parts = _safe_parts(archive, member)
                if member.isdir():
                    if parts:
                        _make_dirs(archive, dest, parts, member.name)
                    continue
                if not member.isreg() or member.type == tarfile.CONTTYPE:
                    kind = _KIND.get(member.type, f"of type {member.type!r}")
                    raise ArchiveError(str(archive), f"entry {member.name!r} is {kind}; refused")
                if not parts:
                    raise ArchiveError(str(archive), f"entry {member.name!r} has no file name")
                total += member.size
                if total > max_bytes:
                    raise ArchiveError(
                        str(archive),
                        f"expands to more than {max_bytes} bytes (at entry {member.name!r})",
                    )
                parent = _make_dirs(archive, dest, parts[:-1], member.name)
                src = tf.extractfile(member)
                assert src is not None  # regular files always have a reader
                _write_file(archive, parent / parts[-1], src, member)
    except tarfile.TarError as e:
        raise ArchiveError(str(archive), f"not a readable tar archive ({e})") from e
    except EOFError as e:
        raise ArchiveError(str(archive), "truncated archive") from e
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise ArchiveError(str(archive), os.strerror(e.errno)) from e
        # zlib errors surface as OSError/zlib.error without errno in stream mode
        raise ArchiveError(str(archive), f"corrupt archive ({e})") from e
    if count == 0:
        raise ArchiveError(str(archive), "empty archive")


def _safe_parts(archive: Path, member: tarfile.TarInfo) -> list[str]:
    """The entry's path components, refusing absolute paths, ``..`` and NUL bytes."""
    name = member.name
    if "\0" in name:
        raise ArchiveError(str(archive), f"entry {name!r} has a NUL byte in its name")
    if name.startswith("/"):
        raise ArchiveError(str(archive), f"entry {name!r} has an absolute path; refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(str(archive), f"entry {name!r} climbs out with '..'; refused")
    return parts


def _make_dirs(archive: Path, dest: Path, parts: list[str], name: str) -> Path:
    """Create *parts* under *dest* (mode 0700); every existing component must be a real dir."""
    here = dest
    for part in parts:
        here = here / part
        try:
            os.mkdir(here, 0o700)
        except FileExistsError:
            # lstat: we never create symlinks, but be certain nothing else is in the way
            if not os.path.isdir(here) or os.path.islink(here):
                raise ArchiveError(
                    str(archive), f"entry {name!r} goes through a file of the same name"
                ) from None
    return here


def _write_file(archive: Path, target: Path, src: IO[bytes], member: tarfile.TarInfo) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError as e:
        raise ArchiveError(str(archive), f"entry {member.name!r} appears twice") from e
    try:
        left = member.size
        while left > 0:
            chunk = src.read(min(left, _CHUNK))
            if not chunk:
                raise ArchiveError(str(archive), f"entry {member.name!r} is truncated")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            left -= len(chunk)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ArchiveError(str(archive), "no space left to extract it") from e
        raise
    finally:
        os.close(fd)

"""Opening the files a process had mapped, under ``--files-root`` and nowhere else.

Images may come from elsewhere and name any path (``/etc/shadow``, ``/dev/sda``,
``/proc/kcore``, a symlink out of the root). Only regular files that resolve inside the root are
opened; devices, FIFOs and sockets are never opened at all (we stat before open, then check the
opened file is the one we stat'ed).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass
class OpenedFile:
    fd: int
    size: int


class FileRoot:
    """Opens mapped files under *root*; caches descriptors; :meth:`close` releases them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self._open: dict[str, OpenedFile | str] = {}

    def open(self, name: str) -> OpenedFile | str:
        """The opened file, or a sentence saying why it cannot be used."""
        cached = self._open.get(name)
        if cached is None:
            cached = self._open[name] = self._open_uncached(name)
        return cached

    def _open_uncached(self, name: str) -> OpenedFile | str:
        if not name.startswith("/"):
            return "not an absolute path"
        candidate = os.path.realpath(os.path.join(self.root, name.lstrip("/")))
        if candidate != str(self.root) and not candidate.startswith(
            str(self.root).rstrip("/") + "/"
        ):
            return f"resolves outside the files root {self.root}"
        try:
            st = os.stat(candidate)
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return os.strerror(e.errno or 0)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return os.strerror(e.errno or 0)
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            os.close(fd)
            return "changed while being opened"
        return OpenedFile(fd, fst.st_size)

    def close(self) -> None:
        for entry in self._open.values():
            if isinstance(entry, OpenedFile):
                os.close(entry.fd)
        self._open.clear()

"""userfaultfd(2) ioctls for asynchronous write-protect tracking (Linux 6.7).

With ``UFFD_FEATURE_WP_ASYNC`` (commit d61ea1cb0095) the kernel resolves a write to a protected
page itself: it clears the page's write-protect bit and lets the write complete, so no fault
handler runs and the writer never waits; PAGEMAP_SCAN (:mod:`criu_livedump.linux.pagemap`)
then reports the page as written. ``UFFD_FEATURE_WP_UNPOPULATED`` (commit 2bad466cc9d9) makes
UFFDIO_WRITEPROTECT protect pages that were never populated too (pte markers), so a first
write there is reported as well. Releasing the userfaultfd (its last descriptor closed)
unregisters its areas and clears every write-protect bit it set (fs/userfaultfd.c:
userfaultfd_release() -> userfaultfd_clear_vma() -> uffd_wp_range(..., false)).
"""

from __future__ import annotations

import fcntl
import struct
from typing import Final

__all__ = ["REQUIRED_FEATURES", "api", "register_wp", "write_protect"]

# include/uapi/linux/userfaultfd.h: UFFD_API, UFFDIO 0xAA, the ioctls _IOWR(UFFDIO, nr, struct),
# struct uffdio_api {api, features, ioctls}, struct uffdio_register {range, mode, ioctls},
# struct uffdio_writeprotect {range, mode}, struct uffdio_range {start, len}
_UFFD_API: Final = 0xAA
_API: Final = struct.Struct("<3Q")
_REGISTER: Final = struct.Struct("<4Q")
_WRITEPROTECT: Final = struct.Struct("<3Q")


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


_UFFDIO_API: Final = _iowr(0x3F, _API.size)
_UFFDIO_REGISTER: Final = _iowr(0x00, _REGISTER.size)
_UFFDIO_WRITEPROTECT: Final = _iowr(0x06, _WRITEPROTECT.size)
_REGISTER_MODE_WP: Final = 1 << 1
_WRITEPROTECT_MODE_WP: Final = 1 << 0
#: UFFD_FEATURE_WP_UNPOPULATED (1 << 13) | UFFD_FEATURE_WP_ASYNC (1 << 15)
REQUIRED_FEATURES: Final = (1 << 13) | (1 << 15)
#: userfaultfd(2) flags: UFFD_USER_MODE_ONLY (1, allowed without CAP_SYS_PTRACE whatever
#: vm.unprivileged_userfaultfd says; harmless here, asynchronous write-protect never delivers a
#: fault to a handler)
USER_MODE_ONLY: Final = 1


def api(fd: int, features: int = REQUIRED_FEATURES) -> int:
    """UFFDIO_API: enable *features*; returns the ioctls the descriptor then supports.

    :raises OSError: EINVAL when the kernel lacks a feature asked for.
    """
    buf = bytearray(_API.pack(_UFFD_API, features, 0))
    fcntl.ioctl(fd, _UFFDIO_API, buf, True)
    return int(_API.unpack(buf)[2])


def register_wp(fd: int, start: int, end: int) -> None:
    """UFFDIO_REGISTER ``[start, end)`` in write-protect mode (EINVAL: an area the kernel does
    not allow; EBUSY: registered with another userfaultfd)."""
    buf = bytearray(_REGISTER.pack(start, end - start, _REGISTER_MODE_WP, 0))
    fcntl.ioctl(fd, _UFFDIO_REGISTER, buf, True)


def write_protect(fd: int, start: int, end: int) -> None:
    """UFFDIO_WRITEPROTECT ``[start, end)`` (with WP_UNPOPULATED, never-populated pages too)."""
    buf = bytearray(_WRITEPROTECT.pack(start, end - start, _WRITEPROTECT_MODE_WP))
    fcntl.ioctl(fd, _UFFDIO_WRITEPROTECT, buf, True)

"""The PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux 6.7, commit 52526ca7fdb9, fs/proc/task_mmu.c).

The kernel walks the page tables and returns runs of pages whose categories match; with
:data:`PM_SCAN_WP_MATCHING` it also write-protects (re-arms) the pages it returns, in the same
walk, in areas registered with a userfaultfd in asynchronous write-protect mode
(:mod:`criu_livedump.linux.userfaultfd`).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from typing import Final

__all__ = [
    "PAGE_IS_GUARD",
    "PAGE_IS_PFNZERO",
    "PAGE_IS_PRESENT",
    "PAGE_IS_SWAPPED",
    "PAGE_IS_WPALLOWED",
    "PAGE_IS_WRITTEN",
    "PM_SCAN_CHECK_WPASYNC",
    "PM_SCAN_WP_MATCHING",
    "scan",
]

# include/uapi/linux/fs.h: struct pm_scan_arg (12 u64), struct page_region (3 u64),
# PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg), the PAGE_IS_* categories and PM_SCAN_* flags
_PM_SCAN_ARG: Final = struct.Struct("<12Q")
_PAGE_REGION: Final = struct.Struct("<3Q")
_PAGEMAP_SCAN: Final = (3 << 30) | (_PM_SCAN_ARG.size << 16) | (ord("f") << 8) | 16
PAGE_IS_WPALLOWED: Final = 1 << 0
PAGE_IS_WRITTEN: Final = 1 << 1
PAGE_IS_PRESENT: Final = 1 << 3
PAGE_IS_SWAPPED: Final = 1 << 4
PAGE_IS_PFNZERO: Final = 1 << 5
#: a MADV_GUARD_INSTALL guard page (Linux 6.14; an older kernel refuses the bit with EINVAL)
PAGE_IS_GUARD: Final = 1 << 8
#: write-protect the pages returned
PM_SCAN_WP_MATCHING: Final = 1 << 0
#: fail (EPERM) on an area not registered for asynchronous write-protect
PM_SCAN_CHECK_WPASYNC: Final = 1 << 1
_REGIONS: Final = 512

_libc = ctypes.CDLL(None, use_errno=True)
#: glibc declares int ioctl(): a c_long result would read -1 as 4294967295
_libc.ioctl.restype = ctypes.c_int


def scan(
    pagemap: int,
    start: int,
    end: int,
    *,
    flags: int = 0,
    inverted: int = 0,
    mask: int = 0,
    anyof: int = 0,
    returned: int,
) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` runs of ``[start, end)`` whose pages match (adjacent runs joined).

    A page matches when ``(categories ^ inverted) & mask == mask`` and, if *anyof*,
    ``(categories ^ inverted) & anyof`` is not zero; *returned* is the kernel's return_mask.

    :raises OSError: the ioctl failed (ENOTTY/EINVAL before Linux 6.7).
    """
    vec = ctypes.create_string_buffer(_PAGE_REGION.size * _REGIONS)
    arg = ctypes.create_string_buffer(_PM_SCAN_ARG.size)
    pos = start
    last: tuple[int, int] | None = None
    while pos < end:
        _PM_SCAN_ARG.pack_into(
            arg, 0,
            _PM_SCAN_ARG.size, flags, pos, end, 0,  # size, flags, start, end, walk_end
            ctypes.addressof(vec), _REGIONS, 0,  # vec, vec_len, max_pages
            inverted, mask, anyof, returned,
        )  # fmt: skip
        n = _libc.ioctl(pagemap, _PAGEMAP_SCAN, arg)
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        for i in range(n):
            lo, hi, _ = _PAGE_REGION.unpack_from(vec, i * _PAGE_REGION.size)
            if last is not None and last[1] == lo:
                last = (last[0], hi)
                continue
            if last is not None:
                yield last
            last = (lo, hi)
        walk_end = _PM_SCAN_ARG.unpack_from(arg)[4]
        if walk_end <= pos:
            break
        pos = walk_end
    if last is not None:
        yield last

"""The Linux layer: /proc readers, capabilities, ptrace, the descriptors of mapped files.

Knows nothing of targets, snapshot methods or CRIU; everything above builds on it.
"""

import ctypes
import os

#: The host's page size, for live work (/proc/PID/pagemap indexes, RLIMIT_CORE's one-page
#: minimum). The page size of a set of images is the images' own (converters.images).
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# include/uapi/linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of ``[offset, offset + length)`` of file *fd*, which then reads as
    zeros (fallocate(2) FALLOC_FL_PUNCH_HOLE); False where the filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return int(libc.fallocate(fd, mode, offset, length)) == 0

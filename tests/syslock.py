"""Serialise tests that change system-wide settings (core_pattern, sysctls).

The lock is an ``fcntl.flock`` on a file in /run/lock, so it holds across processes: a CI run
and a developer's pytest on the same machine never interleave their core_pattern changes.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_PATH = Path("/run/lock/criu-livedump-tests.lock")
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
CORE_USES_PID = Path("/proc/sys/kernel/core_uses_pid")


class _Holders:
    """flock locks belong to the open file description, so a second flock() from this process
    on a new descriptor would deadlock against the first; nested holders are counted instead."""

    count = 0


@contextmanager
def system_settings_lock(path: Path = LOCK_PATH) -> Iterator[None]:
    """Hold the exclusive, cross-process lock for system-wide test settings (re-entrant)."""
    if _Holders.count:
        _Holders.count += 1
        try:
            yield
        finally:
            _Holders.count -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _Holders.count = 1
        try:
            yield
        finally:
            _Holders.count = 0
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def core_pattern(pattern: str, uses_pid: int = 0) -> Iterator[None]:
    """Set /proc/sys/kernel/core_pattern (and core_uses_pid) under the lock; restore on exit."""
    with system_settings_lock():
        saved_pattern = CORE_PATTERN.read_text()
        saved_uses_pid = CORE_USES_PID.read_text()
        try:
            CORE_USES_PID.write_text(f"{uses_pid}\n")
            CORE_PATTERN.write_text(pattern + "\n")
            yield
        finally:
            # The pattern first: a failed core_uses_pid restore must not leave our temp path.
            CORE_PATTERN.write_text(saved_pattern)
            CORE_USES_PID.write_text(saved_uses_pid)


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextmanager
def hugepages(count: int) -> Iterator[bool]:
    """Reserve *count* default-size huge pages (vm.nr_hugepages) under the lock; restore the
    old value on exit. Yields False when the kernel could not find that many."""
    with system_settings_lock():
        saved = NR_HUGEPAGES.read_text()
        try:
            if int(saved) < count:
                NR_HUGEPAGES.write_text(f"{count}\n")
            yield int(NR_HUGEPAGES.read_text()) >= count
        finally:
            NR_HUGEPAGES.write_text(saved)

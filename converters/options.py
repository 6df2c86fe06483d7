"""What a conversion is asked to do (:class:`ConvertOptions`) and what it did (:class:`CoreResult`).

What the dump recorded beside the images is :mod:`converters.sidecar`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The kernel's default /proc/PID/coredump_filter (MMF_DUMP_FILTER_DEFAULT).
DEFAULT_COREDUMP_FILTER = 0x33
UNLIMITED = -1


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert one image set.

    :param coredump_filter: the MMF_DUMP_* bit mask; None means "from the sidecar, else 0x33".
    :param core_limit: RLIMIT_CORE semantics in bytes; :data:`UNLIMITED` for no limit,
        None for "from the sidecar, else unlimited".
    :param files_root: where mapped files are looked up by name; only regular files inside it
        are read. None: this host's ``/`` for images dumped here in its own mount namespace,
        else nowhere, or a checkpoint's container image (see :mod:`converters.origin`).
    :param signal: si_signo written to NT_PRSTATUS/NT_SIGINFO; None means "from the sidecar,
        else 0".
    :param pid: convert only this process of the tree.
    :param mapped_fds: open descriptors of mapped files by VMA start, from a live process's
        /proc/PID/map_files: read instead of looking the name up under *files_root* when the
        descriptor still names the file the images record. It is the file the kernel reads
        (vma->vm_file), also when it was deleted or replaced since, or lives in another mount
        namespace. The caller keeps ownership.
    :param checkpoint: set when the images come from a checkpoint archive: where its
        container's files are.
    :param streamed: the process's pages are already in the core being written (a streamed
        dump, issue 13): where, and the sink then adopts that file.
    """

    coredump_filter: int | None = None
    core_limit: int | None = None
    files_root: Path | None = None
    signal: int | None = None
    pid: int | None = None
    mapped_fds: Mapping[int, int] = field(default_factory=dict)
    checkpoint: CheckpointFiles | None = None
    streamed: StreamedPages | None = None


@dataclass(frozen=True)
class StreamedPages:
    """Pages CRIU streamed straight into the core's file, at offsets decided before they came.

    :param core: the core's temporary file, which holds them (and becomes the core).
    :param offsets: the file offset of each present run of the process's pagemap, by the
        run's address (the pagemap's entries are exactly the streamed runs).
    :param data_offset: the start of the segments' data: the headers and notes must fit below.
    :param total: how many bytes were streamed: the core's segments must cover every one.
    :param spill: the file shared memory objects' pages went to instead (CRIU sends them by
        object, once for all the VMAs that map it), and where each run of each object's
        pagemap is in it: ``{shmid: {offset in the object: offset in the file}}``.
    """

    core: Path
    offsets: Mapping[int, int]
    data_offset: int
    total: int
    spill: Path | None = None
    shmem: Mapping[int, Mapping[int, int]] = field(default_factory=dict)

    @property
    def pages_file(self) -> tuple[Path, Mapping[int, int]]:
        return self.core, self.offsets


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of a checkpointed container, beside its images in a checkpoint archive.

    :param image: the container image the archive names (config.dump), "" for none.
    :param image_root: that image's root filesystem, mounted from local container storage;
        None when it is not there.
    :param changes: ``rootfs-diff.tar``, what the container changed in its root filesystem
        (may not exist).
    :param deleted: ``deleted.files``, the JSON list of names it deleted (may not exist).
    :param devshm: ``devshm-checkpoint.tar``, the content of its /dev/shm (Podman; may not
        exist).
    """

    image: str
    image_root: Path | None
    changes: Path
    deleted: Path
    devshm: Path | None = None


@dataclass
class CoreResult:
    """What one process's conversion produced."""

    pid: int
    path: Path | None
    size: int = 0
    #: bytes of the core that are holes (never written, read back as zeros)
    hole_bytes: int = 0
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "path": str(self.path) if self.path else None,
            "size": self.size,
            "hole_bytes": self.hole_bytes,
            "truncated": self.truncated,
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 6),
        }

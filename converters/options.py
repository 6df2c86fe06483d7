"""What a conversion is asked to do (:class:`ConvertOptions`) and what it did (:class:`CoreResult`).

The orchestrator also leaves a sidecar file, ``livedump.json``, beside the CRIU images: facts
about the dump that CRIU's images do not record (the target's coredump_filter, RLIMIT_CORE, the
dumping host's boot id). :func:`read_sidecar` is the one reader of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.errors import ImageFormatError

SIDECAR_NAME = "livedump.json"
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
    """

    coredump_filter: int | None = None
    core_limit: int | None = None
    files_root: Path | None = None
    signal: int | None = None
    pid: int | None = None
    mapped_fds: Mapping[int, int] = field(default_factory=dict)
    checkpoint: CheckpointFiles | None = None


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of a checkpointed container, beside its images in a checkpoint archive.

    :param image: the container image the archive names (config.dump), "" for none.
    :param image_root: that image's root filesystem, mounted from local container storage;
        None when it is not there.
    :param changes: ``rootfs-diff.tar``, what the container changed in its root filesystem
        (may not exist).
    :param deleted: ``deleted.files``, the JSON list of names it deleted (may not exist).
    """

    image: str
    image_root: Path | None
    changes: Path
    deleted: Path


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


@dataclass(frozen=True)
class Sidecar:
    """Facts recorded at dump time by the orchestrator (all optional)."""

    coredump_filter: int | None = None
    core_limit: int | None = None
    signal: int | None = None
    boot_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_sidecar(images_dir: Path) -> Sidecar:
    """Read ``livedump.json`` from *images_dir*; an absent file gives an empty :class:`Sidecar`.

    :raises ImageFormatError: the file exists but is not the expected JSON object.
    """
    path = images_dir / SIDECAR_NAME
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return Sidecar()
    except OSError as e:
        raise ImageFormatError(str(path), os.strerror(e.errno or 0)) from e
    except UnicodeDecodeError as e:
        raise ImageFormatError(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ImageFormatError(str(path), f"not JSON: {e}") from e
    except RecursionError as e:  # deeply nested arrays: json's recursive decoder gives up
        raise ImageFormatError(str(path), "not JSON: nested too deeply") from e
    if not isinstance(data, dict):
        raise ImageFormatError(str(path), "not a JSON object")

    def opt_int(key: str) -> int | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ImageFormatError(str(path), f"{key} is not an integer")
        return value

    signal = opt_int("signal")
    # si_signo is an int in the notes; a real signal number is 1.._NSIG (64) on Linux
    if signal is not None and not 0 <= signal <= 64:
        raise ImageFormatError(str(path), f"signal {signal} out of range")
    if "cpu_layout" not in data and "xsave_layout" in data:  # its name before issue 10
        data["cpu_layout"] = data.pop("xsave_layout")
    boot_id = data.get("boot_id")
    return Sidecar(
        coredump_filter=opt_int("coredump_filter"),
        core_limit=opt_int("core_limit"),
        signal=signal,
        boot_id=boot_id if isinstance(boot_id, str) else None,
        extra={
            k: v
            for k, v in data.items()
            if k not in {"coredump_filter", "core_limit", "signal", "boot_id"}
        },
    )


def write_sidecar(images_dir: Path, **facts: Any) -> None:
    """Write ``livedump.json`` (used by the orchestrator after CRIU ran)."""
    tmp = images_dir / (SIDECAR_NAME + ".tmp")
    tmp.write_text(json.dumps(facts, indent=1, sort_keys=True))
    os.replace(tmp, images_dir / SIDECAR_NAME)

"""The converter's public entry points (placeholder signatures; implementation in progress)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from converters.options import ConvertOptions, CoreResult
from converters.sinks import Sink

#: progress(bytes_done, bytes_total)
Progress = Callable[[int, int], None]


def convert(
    images_dir: Path,
    out_dir: Path,
    options: ConvertOptions = ConvertOptions(),
    progress: Progress | None = None,
) -> list[CoreResult]:
    """Write ``out_dir/core.PID`` for every process in *images_dir* (or only ``options.pid``).

    :raises ConversionError: bad images or a failed write; nothing is left at the destination.
    """
    raise NotImplementedError


def write_core(
    images_dir: Path,
    pid: int,
    sink: Sink,
    options: ConvertOptions = ConvertOptions(),
    progress: Progress | None = None,
) -> CoreResult:
    """Write the core of process *pid* of *images_dir* into *sink* and commit it.

    :raises ConversionError: bad images or a failed write; the sink is aborted (no file left).
    """
    raise NotImplementedError

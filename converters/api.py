"""The converter's public entry points."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from converters import elf, model
from converters.elf import PAGE_SIZE
from converters.errors import ConversionError, LayoutError, OutputError
from converters.images import ImageSet
from converters.options import UNLIMITED, ConvertOptions, CoreResult
from converters.sidecar import read_sidecar
from converters.sinks import FileSink, Sink

#: progress(bytes_done_since_last_call)
Progress = Callable[[int], None]


def plan(images_dir: Path, options: ConvertOptions = ConvertOptions()) -> list[tuple[int, int]]:
    """(pid, bytes of data to write) per process to convert: for progress bars and `--jobs`."""
    images = ImageSet.open(images_dir)
    sidecar = read_sidecar(images_dir)
    out = []
    for pid in _pids(images, options):
        m = model.build(images, pid, options, sidecar)
        out.append((pid, m.data_bytes))
        m.close()
    return out


def _pids(images: ImageSet, options: ConvertOptions) -> list[int]:
    if options.pid is not None:
        return [images.process(options.pid).pid]
    return [p.pid for p in images.processes]


def convert(
    images_dir: Path,
    out_dir: Path,
    options: ConvertOptions = ConvertOptions(),
    progress: Progress | None = None,
) -> list[CoreResult]:
    """Write ``out_dir/core.PID`` for every process in *images_dir* (or only ``options.pid``).

    :raises ConversionError: bad images or a failed write; nothing is left at the destination
        of the core that failed (cores already completed stay).
    """
    images = ImageSet.open(images_dir)
    if not out_dir.is_dir():
        raise OutputError(str(out_dir), "not a directory")
    results = []
    for pid in _pids(images, options):
        target = out_dir / f"core.{pid}"
        results.append(
            _write(images, images_dir, pid, partial(FileSink, target), options, progress)
        )
    return results


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
    images = ImageSet.open(images_dir)
    return _write(images, images_dir, pid, lambda: sink, options, progress)


def _write(
    images: ImageSet,
    images_dir: Path,
    pid: int,
    make_sink: Callable[[], Sink],
    options: ConvertOptions,
    progress: Progress | None,
) -> CoreResult:
    started = time.monotonic()
    sidecar = read_sidecar(images_dir)
    limit = options.core_limit if options.core_limit is not None else sidecar.core_limit
    if limit is not None and limit != UNLIMITED and limit < PAGE_SIZE:
        # do_coredump(): a limit below binfmt->min_coredump (one page) means no core at all
        return CoreResult(
            pid, None, warnings=[f"core limit {limit} is below one page: no core written"]
        )
    m = model.build(images, pid, options, sidecar)
    try:
        placed, data_offset = _streamed_layout(m, options, limit)
        sink = make_sink()
        try:
            size, holes, truncated = elf.write_core(
                sink,
                m.machine,
                m.segments,
                m.notes,
                None if limit in (None, UNLIMITED) else limit,
                progress,
                placed=placed,
                data_offset=data_offset,
            )
            path = sink.commit()
        except BaseException:
            sink.abort()
            raise
    except OSError as e:  # a sink that failed outside its own translation
        raise OutputError(getattr(sink, "name", "core"), e.strerror or "write failed") from e
    finally:
        m.close()
    result = CoreResult(
        pid, path, size, holes, truncated, list(m.warnings), time.monotonic() - started
    )
    if truncated:
        result.warnings.append(f"core cut at the {limit}-byte limit")
    return result


def _streamed_layout(
    m: model.CoreModel, options: ConvertOptions, limit: int | None
) -> tuple[dict[int, int] | None, int | None]:
    """The segment offsets and data start a streamed core's pages fixed (none otherwise),
    checked against the model before anything is written.

    :raises LayoutError: the streamed pages are not where the model's layout needs them.
    """
    streamed = options.streamed
    if streamed is None:
        return None, None
    if limit not in (None, UNLIMITED):
        # the kernel would stop at the limit; streamed pages past it are in the file already
        raise LayoutError(f"a streamed core cannot be cut at a core limit ({limit} bytes)")
    placed = elf.streamed_placement(m.segments, streamed.total)
    # plan() itself checks alignment, overlaps and the reserved header area
    elf.plan(m.segments, m.notes, placed=placed, data_offset=streamed.data_offset)
    return placed, streamed.data_offset


__all__ = ["ConversionError", "convert", "plan", "write_core"]

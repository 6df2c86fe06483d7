"""CRIU image sets in, ELF core files out.

Pure conversion: nothing here touches a live process. Entry points:

- :func:`convert` writes ``core.PID`` for every process of an image directory into a folder;
- :func:`write_core` writes one process's core into a :class:`~converters.sinks.Sink` (a file
  with owner and mode, a pipe, stdout), for the live-dump orchestrator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from converters.errors import (
    ArchiveError,
    ConversionError,
    ImageFormatError,
    MissingImageError,
    OutputError,
    UnsupportedArchError,
)
from converters.options import ConvertOptions, CoreResult

if TYPE_CHECKING:
    from converters.api import convert, write_core

__all__ = [
    "ArchiveError",
    "ConversionError",
    "ConvertOptions",
    "CoreResult",
    "ImageFormatError",
    "MissingImageError",
    "OutputError",
    "UnsupportedArchError",
    "convert",
    "write_core",
]


def __getattr__(name: str) -> Any:
    """:func:`convert` and :func:`write_core` on first use: the package's light parts (errors,
    options, sidecar) serve `dump` before CRIU runs without importing pycriu and the model."""
    if name in ("convert", "write_core"):
        from converters import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

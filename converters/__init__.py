"""CRIU image sets in, ELF core files out.

Pure conversion: nothing here touches a live process. Entry points:

- :func:`convert` writes ``core.PID`` for every process of an image directory into a folder;
- :func:`write_core` writes one process's core into a :class:`~converters.sinks.Sink` (a file
  with owner and mode, a pipe, stdout), for the live-dump orchestrator.
"""

from converters.api import convert, write_core
from converters.errors import (
    ArchiveError,
    ConversionError,
    ImageFormatError,
    MissingImageError,
    OutputError,
    UnsupportedArchError,
)
from converters.options import ConvertOptions, CoreResult

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

"""The converter's exception hierarchy: every failure a user can cause is a ConversionError.

Messages name the culprit (a file, an entry) so that the CLI can print them as one line.
"""

from __future__ import annotations


class ConversionError(Exception):
    """Root of every error the converter raises on bad input or a failed write."""


class ImageFormatError(ConversionError):
    """An image file is truncated, corrupt, of the wrong magic, or internally inconsistent."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class MissingImageError(ConversionError):
    """An image the set needs (pstree, core-TID, mm-PID, pages-N, ...) is absent."""

    def __init__(self, path: str, needed_by: str = "") -> None:
        why = f" (needed by {needed_by})" if needed_by else ""
        super().__init__(f"{path}: missing image{why}")
        self.path = path
        self.needed_by = needed_by


class UnsupportedArchError(ConversionError):
    """The images describe an architecture the converter cannot write cores for."""

    def __init__(self, path: str, arch: str, supported: list[str]) -> None:
        super().__init__(
            f"{path}: architecture {arch} is not supported (supported: {', '.join(supported)})"
        )
        self.path = path
        self.arch = arch


class LayoutError(ConversionError):
    """A layout decided in advance (a streamed core, converters/elf.py plan()) cannot hold
    the core as it is."""


class OutputError(ConversionError):
    """The core file could not be created or written (exists, symlink, disk full, ...)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ArchiveError(ConversionError):
    """A checkpoint archive is unreadable or holds an entry that must not be extracted."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

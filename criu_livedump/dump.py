"""``criu-livedump dump``: the live-dump orchestrator (being written; issue 4)."""

from __future__ import annotations

from typing import IO, Any

from criu_livedump.errors import LivedumpError


def live_dump(pid: int, request: Any, *, criu_path: str | None, stdout: IO[bytes]) -> Any:
    """Not implemented yet: raises a clear error rather than pretending to dump."""
    raise LivedumpError(f"process {pid}: `dump` is not implemented yet (issue 4)")

"""Drive CRIU the way the product does: ``criu dump --leave-running`` of a live target.

Which CRIU runs is a parameter (:func:`criu_binary`: ``$CRIU``, else the one ``make setup``
builds), so a case can dump with another CRIU release than the product's default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import procs

from harness.errors import HarnessError

DEFAULT_CRIU = "/usr/local/sbin/criu"


class CriuDumpError(HarnessError):
    """``criu dump`` failed; carries argv, return code and the tail of CRIU's log."""

    def __init__(self, argv: Sequence[str], returncode: int, log_tail: str) -> None:
        super().__init__(f"criu dump exited with {returncode}:\n{log_tail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.log_tail = log_tail


def criu_binary() -> str:
    """The CRIU to run: $CRIU, else /usr/local/sbin/criu."""
    return os.environ.get("CRIU") or DEFAULT_CRIU


#: where ``scripts/build-criu.sh VERSION`` builds a release, beside the installed CRIU
RELEASES_CACHE = Path(os.environ.get("CRIU_LIVEDUMP_CACHE", "/var/cache/criu-livedump"))


def criu_release(version: str) -> Path:
    """Where CRIU *version*'s binary is once built (``make setup`` builds 4.1.1)."""
    return RELEASES_CACHE / f"criu-{version}" / "criu" / "criu"


def criu_dump(
    pid: int, images_dir: str | os.PathLike[str], *, criu: str | os.PathLike[str] | None = None
) -> Path:
    """``criu dump --leave-running`` *pid* into *images_dir*; record its dump-time facts.

    :param criu: the CRIU binary (default :func:`criu_binary`).
    :returns: the images directory.
    :raises CriuDumpError: CRIU failed (the message ends with the tail of dump.log).
    :raises AssertionError: CRIU ran longer than procs.RUN_TIMEOUT (it is killed).
    """
    from converters.sidecar import Sidecar, write_sidecar
    from criu_livedump.snapshot.criu import LIVE_OPTIONS
    from criu_livedump.target.dump_time import with_dump_time_facts

    images = Path(images_dir)
    images.mkdir(parents=True, exist_ok=True)
    coredump_filter = int(Path(f"/proc/{pid}/coredump_filter").read_text(), 16)
    argv = [
        os.fspath(criu) if criu is not None else criu_binary(),
        "dump",
        "-t",
        str(pid),
        "-D",
        str(images),
        # the product's options, so both dumps see the same CRIU behaviour
        *LIVE_OPTIONS,
        "-o",
        "dump.log",
        "-v4",
    ]
    # bounded: CRIU can wait for a killed target forever, and only killing CRIU releases it
    proc = procs.run(argv, text=True)
    if proc.returncode != 0:
        try:
            log = (images / "dump.log").read_text(errors="replace")
        except OSError:
            log = proc.stderr
        raise CriuDumpError(argv, proc.returncode, "\n".join(log.splitlines()[-40:]))
    # the same dump-time facts the orchestrator records (criu_livedump/dump.py)
    write_sidecar(images, with_dump_time_facts(Sidecar(coredump_filter=coredump_filter), pid))
    return images

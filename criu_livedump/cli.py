"""The ``criu-livedump`` command: a thin click shell over the library.

stdout carries data only (JSON, or a core with ``dump -o -``); every message goes to stderr.
:class:`LivedumpGroup` holds the one ``except`` ladder that turns library errors into
``error: <message>`` lines, hints and :class:`ExitStatus` codes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, NoReturn

import click

from converters.errors import ConversionError
from criu_livedump import __version__
from criu_livedump.errors import (
    BlockerError,
    ConvertFailedError,
    CriuError,
    CriuNotFoundError,
    CriuUnusableError,
    DestinationError,
    EnvironmentUnfitError,
    LivedumpError,
    PermissionDeniedError,
    RequestError,
    ScratchError,
    SnapshotError,
    TargetError,
)
from criu_livedump.linux.procfs import read_stat
from criu_livedump.linux.sched import own_session
from criu_livedump.progress import Counts, Phase, Progress
from criu_livedump.request import DumpRequest, Method, capture_nice
from criu_livedump.serve.client import MOUNT_PATH, SOCKET_PATH

log = logging.getLogger("criu_livedump")


class ExitStatus(IntEnum):
    """Exit codes of ``criu-livedump``."""

    OK = 0
    FAILURE = 1  #: a LivedumpError of no more specific class
    USAGE = 2  #: bad command line (click's own code) or invalid option value
    CRIU = 3  #: CRIU missing, unusable, or a CRIU command failed
    PERMISSION = 4  #: the caller lacks a privilege
    TARGET = 5  #: no such process, or it vanished
    BLOCKED = 6  #: the target holds something CRIU cannot dump (refused before freezing)
    CONVERSION = 7  #: the images could not be turned into a core
    ENVIRONMENT = 8  #: `check` found that live dumps cannot work on this host
    SNAPSHOT = 9  #: the snapshot method failed after its refusals passed; the target runs on
    STORAGE = 10  #: the scratch directory or the core's destination cannot be used
    INTERRUPTED = 130  #: Ctrl-C
    BROKEN_PIPE = 141  #: stdout closed early (128 + SIGPIPE)


#: The one table from error classes to exit statuses; the first matching class decides (a
#: subclass is covered by its parent's row: CloneRefusedError is a BlockerError, so every
#: refusal exits BLOCKED wherever it is detected). tests/test_cli.py fails on a class of
#: either hierarchy that no row covers.
STATUS_BY_ERROR: tuple[tuple[type[Exception], ExitStatus], ...] = (
    (RequestError, ExitStatus.USAGE),
    (CriuNotFoundError, ExitStatus.CRIU),
    (CriuUnusableError, ExitStatus.CRIU),
    (CriuError, ExitStatus.CRIU),
    (PermissionDeniedError, ExitStatus.PERMISSION),
    (TargetError, ExitStatus.TARGET),
    (BlockerError, ExitStatus.BLOCKED),
    (ConvertFailedError, ExitStatus.CONVERSION),
    (ConversionError, ExitStatus.CONVERSION),
    (EnvironmentUnfitError, ExitStatus.ENVIRONMENT),
    (SnapshotError, ExitStatus.SNAPSHOT),
    (ScratchError, ExitStatus.STORAGE),
    (DestinationError, ExitStatus.STORAGE),
    (LivedumpError, ExitStatus.FAILURE),
)


def status_for(error: BaseException) -> ExitStatus:
    """The exit status for a library error (see :data:`STATUS_BY_ERROR`)."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return ExitStatus.FAILURE


def _say_error(message: str, hint: str | None = None) -> None:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


class LivedumpGroup(click.Group):
    """A click group whose :meth:`invoke` is the one place errors become messages and codes."""

    def invoke(self, ctx: click.Context) -> Any:
        traceback = bool(ctx.params.get("traceback"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            if traceback:
                raise
            _say_error("interrupted")
            ctx.exit(ExitStatus.INTERRUPTED)
        except BrokenPipeError:
            # Reader went away (e.g. `| head`): stop quietly; point stdout at /dev/null so that
            # the interpreter's final flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(ExitStatus.BROKEN_PIPE)
        except (LivedumpError, ConversionError) as e:
            if traceback:
                raise
            if isinstance(e, LivedumpError):
                _say_error(e.message, e.hint)
            else:
                _say_error(str(e))
            ctx.exit(status_for(e))


@click.group(cls=LivedumpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="criu-livedump")
@click.option("--traceback", is_flag=True, help="Show the Python traceback of errors.")
@click.option("-v", "--verbose", count=True, help="More messages on stderr (-vv: debug).")
def cli(traceback: bool, verbose: int) -> None:
    """Core dumps of running processes via CRIU, the process left running."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    _setup_logging(level)


class _StderrHandler(logging.Handler):
    """Log records as ``warning: ...`` lines on the current stderr (CliRunner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in _LIVE_LINE:
                line.erase()
            click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)
        except Exception:  # logging must never raise
            self.handleError(record)


def _setup_logging(level: int) -> None:
    for name in ("criu_livedump", "converters"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [_StderrHandler()]
        logger.setLevel(level)
        logger.propagate = False


def _emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=None, sort_keys=True))


# --- check --------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--criu", "criu_path", metavar="PATH", help="The CRIU binary to use.")
@click.option(
    "--pid",
    type=click.IntRange(min=1),
    help="Also say which methods can dump this process, and why not.",
)
def check(as_json: bool, criu_path: str | None, pid: int | None) -> None:
    """Report whether live dumps can work here, one line per fact."""
    from criu_livedump.check import run_check

    report = run_check(criu_path, pid)
    if as_json:
        _emit_json(report.as_dict())
    else:
        for line in report.lines():
            click.echo(line)
    if not report.ok:
        raise EnvironmentUnfitError(
            f"live dumps cannot work here: {report.problems[0]}",
            hint=report.hint,
        )


# --- convert ------------------------------------------------------------------------------------


def _parse_with(
    parser: Callable[[str, str], int], flag: str
) -> Callable[[click.Context, click.Parameter, str | None], int | None]:
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
        if value is None:
            return None
        return parser(value, f"{flag} {value}")

    return callback


def _parse_core_limit(value: str, culprit: str) -> int:
    from criu_livedump.request import parse_size

    return parse_size(value, culprit)


def _parse_coredump_filter(value: str, culprit: str) -> int:
    from criu_livedump.request import parse_coredump_filter

    return parse_coredump_filter(value, culprit)


def _parse_signal(value: str, culprit: str) -> int:
    from criu_livedump.request import parse_signal

    return parse_signal(value, culprit)


@cli.command()
@click.argument(
    "images_dirs",
    metavar="IMAGES_DIR...",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, path_type=Path),
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory for core.PID files (a subdirectory per IMAGES_DIR when several are given).",
)
@click.option("--pid", type=click.IntRange(min=1), help="Convert only this process of the tree.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--coredump-filter",
    metavar="HEX",
    callback=_parse_with(_parse_coredump_filter, "--coredump-filter"),
    help="Override the recorded coredump_filter (default: from the images, else 0x33).",
)
@click.option(
    "--core-limit",
    metavar="BYTES|unlimited",
    callback=_parse_with(_parse_core_limit, "--core-limit"),
    help="Apply RLIMIT_CORE semantics (default: from the images, else unlimited).",
)
@click.option(
    "--files-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The dumped process's root filesystem, where mapped files are read (default: / for"
    " images dumped on this host in its mount namespace; a checkpoint's container image from"
    " local storage; else none).",
)
@click.option(
    "--signal",
    metavar="N",
    callback=_parse_with(_parse_signal, "--signal"),
    help="si_signo for the notes (default 0: no fatal signal).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def convert(
    *,
    images_dirs: tuple[Path, ...],
    out_dir: Path,
    pid: int | None,
    jobs: int,
    coredump_filter: int | None,
    core_limit: int | None,
    files_root: Path | None,
    signal: int | None,
    as_json: bool,
) -> None:
    """Convert CRIU image directories into ELF core files (core.PID per process).

    An IMAGES_DIR may also be a checkpoint archive (.tar, .tar.gz, .tar.zst, images at the top
    or under checkpoint/, as Podman and Kubernetes write them).
    """
    from converters.options import ConvertOptions

    options = ConvertOptions(
        coredump_filter=coredump_filter,
        core_limit=core_limit,
        files_root=files_root,
        signal=signal,
        pid=pid,
    )
    targets = _output_dirs(images_dirs, out_dir)
    for d in targets:
        _make_dir(d)
    outcomes = _run_conversions(list(zip(images_dirs, targets, strict=True)), options, jobs)

    failed = [o for o in outcomes if o["error"] is not None]
    if as_json:
        _emit_json({"ok": not failed, "results": outcomes})
    else:
        for o in outcomes:
            for core in o["cores"]:
                mib = core["size"] / (1 << 20)
                extra = " (truncated at the core limit)" if core["truncated"] else ""
                click.echo(
                    f"{core['path']}: {mib:.1f} MiB in {core['seconds']:.2f} s{extra}", err=True
                )
    if failed:
        if len(outcomes) == 1:
            raise ConvertFailedError(str(failed[0]["error"]))
        for o in failed:
            _say_error(str(o["error"]))
        raise ConvertFailedError(f"{len(failed)} of {len(outcomes)} image directories failed")


def _output_dirs(images_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """One output directory per image directory: *out_dir* itself for one, else a subdirectory
    named after each image directory (numbered when names repeat)."""
    if len(images_dirs) == 1:
        return [out_dir]
    seen: dict[str, int] = {}
    dirs = []
    for d in images_dirs:
        name = d.resolve().name or "images"
        seen[name] = seen.get(name, 0) + 1
        dirs.append(out_dir / (name if seen[name] == 1 else f"{name}.{seen[name]}"))
    return dirs


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DestinationError(f"{path}: cannot create output directory: {e.strerror}") from e


ProgressQueue = Any  # multiprocessing queue proxy carrying byte counts


def _convert_one(
    images_dir: Path, out_dir: Path, options: Any, progress: ProgressQueue | None
) -> dict[str, Any]:
    """Convert one directory (runs in a worker process); errors come back as data, since the
    converter's exceptions need not be picklable."""
    from converters import convert as convert_images
    from converters.errors import ConversionError
    from criu_livedump.checkpoint_rootfs import open_checkpoint

    def report(nbytes: int) -> None:
        if progress is not None:
            progress.put(nbytes)

    outcome: dict[str, Any] = {"images_dir": str(images_dir), "cores": [], "error": None}
    try:
        with open_checkpoint(images_dir, options) as (opened, completed):
            results = convert_images(opened, out_dir, completed, report if progress else None)
        outcome["cores"] = [r.as_dict() for r in results]
    except ConversionError as e:
        outcome["error"] = str(e)
    except OSError as e:  # e.g. the images directory vanished
        outcome["error"] = f"{images_dir}: {e.strerror or e}"
    return outcome


def _run_conversions(
    work: list[tuple[Path, Path]], options: Any, jobs: int
) -> list[dict[str, Any]]:
    with _progress_bar([d for d, _ in work], options) as progress:
        if jobs == 1 or len(work) == 1:
            return [_convert_one(d, o, options, progress) for d, o in work]
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(jobs, len(work)), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = [pool.submit(_convert_one, d, o, options, progress) for d, o in work]
            return [f.result() for f in futures]


@contextmanager
def _progress_bar(images_dirs: list[Path], options: Any) -> Iterator[ProgressQueue | None]:
    """A queue of byte counts drawn as one bar (bytes done / total) on stderr, or None when
    stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from converters.api import plan
    from converters.errors import ConversionError

    total = 0
    for d in images_dirs:
        try:
            total += sum(nbytes for _, nbytes in plan(d, options))
        except ConversionError:
            continue  # its conversion will report the problem
    import multiprocessing

    manager = multiprocessing.get_context("spawn").Manager()
    reports: ProgressQueue = manager.Queue()
    stop = threading.Event()

    def draw() -> None:
        with click.progressbar(length=max(total, 1), label="converting", file=sys.stderr) as bar:
            while not stop.is_set() or not reports.empty():
                try:
                    bar.update(reports.get(timeout=0.1))
                except queue.Empty:
                    continue

    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    try:
        yield reports
    finally:
        stop.set()
        drawer.join()
        manager.shutdown()


# --- dump ---------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("pid", type=click.IntRange(min=1))
@click.argument("spec", nargs=-1)
@click.option("--core-limit", metavar="BYTES|unlimited", help="Core size limit (RLIMIT_CORE).")
@click.option("--sched-prio", metavar="NICE", help="Nice value (-20..19) of CRIU and conversion.")
@click.option("--io-prio", metavar="CLASS[:LEVEL]|N", help="I/O priority: N, idle, be:N, rt:N.")
@click.option("--oom-adj", metavar="N|score:N", help="Legacy oom_adj (-17..15) or score:N.")
@click.option("-o", "--output", metavar="PATH|-", help="Write the core here (- for stdout).")
@click.option("--scratch", metavar="DIR", help="Parent directory for CRIU's images.")
@click.option("--keep-images", is_flag=True, help="Keep CRIU's images (their path is printed).")
@click.option("--coredump-filter", metavar="HEX", help="Override the target's coredump_filter.")
@click.option("--pre-dump", metavar="N", help="Pre-dump rounds (needs dirty tracking).")
@click.option("--signal", metavar="N", help="si_signo written to the notes (default 0).")
@click.option("--force", is_flag=True, help="Dump a non-dumpable target (core owned by root).")
@click.option("--tree", is_flag=True, help="Also write cores of the target's children.")
@click.option(
    "--method", metavar="|".join(Method), help="How to snapshot the target (snapshot.METHODS)."
)
@click.option(
    "--timeout",
    metavar="SECONDS",
    help="Time limit of the whole dump (default: 300 s + 60 s per GiB resident).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--criu", "criu_path", metavar="PATH", help="The CRIU binary to use.")
def dump(
    *,
    pid: int,
    spec: tuple[str, ...],
    as_json: bool,
    criu_path: str | None,
    **flags: Any,
) -> None:
    """Write a core of running process PID, which keeps running.

    SPEC words use the kernel livedump patch's syntax (core_limit=N|unlimited, sched_prio=N,
    io_prio=N, oom_adj=N); flags win over them.
    """
    from criu_livedump.request import build_request

    request = build_request(spec, **{k: v for k, v in flags.items() if v not in (None, False)})
    _run_at_capture_nice(pid, request)
    from criu_livedump.dump import live_dump

    with _dump_progress() as progress:
        report = live_dump(
            pid, request, criu_path=criu_path, stdout=_binary_stdout(), progress=progress
        )
    if as_json:
        _emit_json(report.as_dict())
    else:
        for line in report.lines():
            click.echo(line, err=True)


def _run_at_capture_nice(pid: int, request: DumpRequest) -> None:
    """This process (the freeze, the stream's writer thread, CRIU's parent) at the capture's nice
    (request.capture_nice) from here on, before the dump's heavy imports: beside a busy target
    they wait for a CPU. Where the kernel groups sessions (autogroups), the nice counts only
    inside this session's group, so the dump runs in a session of its own with that nice, a
    process waiting for it where the caller sees it (linux.sched.own_session: made by
    :mod:`criu_livedump.entry` before click was imported; given the exact nice here). live_dump
    applies the nice to CRIU and the conversion itself, and reports what this skips (a
    vanished target, a refused sched_prio) in its own words."""
    try:
        nice = capture_nice(request.sched_prio, read_stat(f"/proc/{pid}/stat").nice)
    except (OSError, ValueError):
        return
    own_session(nice.nice)


def progress_line(phase: Phase, frozen_us: int | None, counts: Counts, rate: float) -> str:
    """The progress line of a dump: its stage until the freeze is over, then the freeze, the
    bytes captured and written so far and the rate (bytes per second) at which they grow."""
    if frozen_us is not None:
        head = f"frozen {frozen_us / 1000:.1f} ms, target running"
    elif phase == Phase.CAPTURE:
        head = "target frozen while CRIU copies it"
    else:
        return f"{phase.value}..."
    return (
        f"{head}; captured {_human(counts.captured)}, written {_human(counts.written)}"
        f" at {_human(rate)}/s"
    )


def _human(n: float) -> str:
    if n < 1 << 10:
        return f"{n:.0f} B"
    if n < 1 << 20:
        return f"{n / (1 << 10):.1f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


class TerminalProgress(Progress):
    """A dump's progress as one line on a terminal, redrawn by a thread at most
    :attr:`INTERVAL` apart and on each event, ended with a newline by :meth:`close`.

    It writes with os.write on the terminal's descriptor and takes no lock that a forked
    child could inherit held: the conversion child only adds to the shared counters.
    """

    INTERVAL = 0.25
    #: the rate is measured over this many seconds of samples
    RATE_WINDOW = 1.0

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._phase = Phase.INSPECT
        self._frozen_us: int | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._drawn = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def phase(self, phase: Phase) -> None:
        with self._lock:
            self._phase = phase
            self._draw()

    def frozen(self, microseconds: int) -> None:
        with self._lock:
            self._frozen_us = microseconds
            self._draw()

    def erase(self) -> None:
        """Clear the line (a log message is about to be written; the next tick redraws)."""
        if os.getpid() == self._owner:
            with self._lock:
                if self._drawn:
                    self._write("\r\x1b[K")

    def close(self) -> None:
        """Stop redrawing; the last state stays on screen, followed by a newline."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self._drawn:
                self._draw()
                self._write("\n")

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            with self._lock:
                self._draw()

    def _rate(self, now: float, moved: int) -> float:
        self._samples.append((now, moved))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.RATE_WINDOW:
            self._samples.popleft()
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def _draw(self) -> None:
        counts = self.counts()
        rate = self._rate(time.monotonic(), max(counts))
        line = progress_line(self._phase, self._frozen_us, counts, rate)
        try:
            width = os.get_terminal_size(self._fd).columns
        except OSError:
            width = 0
        width = width or 80  # a pseudo-terminal nobody sized says 0
        self._write("\r" + line[: max(width - 1, 10)] + "\x1b[K")
        self._drawn = True

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._fd, text.encode())


#: the progress line on screen, if any (log messages erase it first)
_LIVE_LINE: list[TerminalProgress] = []


@contextmanager
def _dump_progress() -> Iterator[Progress]:
    """A :class:`TerminalProgress` on stderr when it is a terminal, else one that shows
    nothing."""
    if not sys.stderr.isatty():
        yield Progress()
        return
    sys.stderr.flush()
    line = TerminalProgress(sys.stderr.fileno())
    _LIVE_LINE.append(line)
    try:
        yield line
    finally:
        _LIVE_LINE.remove(line)
        line.close()


# --- serve, request ------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--mount",
    "mountpoint",
    metavar="DIR",
    default=MOUNT_PATH,
    show_default=True,
    help="Where the FUSE filesystem (PID/livedump, PID/status) is mounted.",
)
@click.option("--no-mount", is_flag=True, help="Serve the socket only.")
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    default=SOCKET_PATH,
    show_default=True,
    help="The request socket (systemd's, when socket-activated).",
)
@click.option("--no-socket", is_flag=True, help="Serve the filesystem only.")
@click.option("--max-dumps", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=6.0,
    show_default=True,
    help="Dumps per minute per uid (root exempt).",
)
@click.option(
    "--burst", type=click.IntRange(min=1), default=3, show_default=True, help="Dumps in a row."
)
@click.option("--criu", "criu_path", metavar="PATH", help="The CRIU binary to use.")
def serve(
    *,
    mountpoint: str,
    no_mount: bool,
    socket_path: str,
    no_socket: bool,
    max_dumps: int,
    rate: float,
    burst: int,
    criu_path: str | None,
) -> None:
    """Take live dumps for any local user, as the kernel's ptrace rules allow.

    Users write SPEC words to DIR/PID/livedump (`echo core_limit=unlimited >
    /run/livedump/PID/livedump`) or run `criu-livedump request PID [SPEC...]`. Every request
    is logged on stderr.
    """
    from criu_livedump.serve.daemon import run
    from criu_livedump.serve.service import Limits, Service

    if no_mount and no_socket:
        raise RequestError("--no-mount and --no-socket leave nothing to serve")
    logging.getLogger("criu_livedump.serve").setLevel(logging.INFO)
    service = Service(Limits(max_dumps=max_dumps, rate=rate, burst=burst), criu_path=criu_path)
    run(
        service,
        None if no_mount else Path(mountpoint),
        None if no_socket else Path(socket_path),
    )


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("pid", type=click.IntRange(min=1))
@click.argument("spec", nargs=-1)
@click.option("--socket", "socket_path", metavar="PATH", help="The service's socket.")
@click.option("--no-wait", is_flag=True, help="Return once the snapshot is taken.")
def request(pid: int, spec: tuple[str, ...], socket_path: str | None, no_wait: bool) -> None:
    """Ask `criu-livedump serve` for a live core of PID (any user may).

    Users without access to this installation run the same stdlib-only client with the
    system's python3: criu_livedump/serve/client.py (see the README).
    """
    from criu_livedump.serve import client

    argv = [str(pid), *spec, *(["--no-wait"] if no_wait else [])]
    argv += ["--socket", socket_path] if socket_path else []
    code = client.main(argv)
    if code:
        raise click.exceptions.Exit(code)


def _binary_stdout() -> IO[bytes]:
    return sys.stdout.buffer


def main() -> NoReturn:
    """Console-script entry point: the command, then :func:`leave` with its status."""
    try:
        cli.main(prog_name="criu-livedump")
    except SystemExit as e:
        leave(e.code)
    leave(0)  # pragma: no cover - click's main always exits


def leave(status: object) -> NoReturn:
    """Exit with *status* (SystemExit's: None, a number, or a message for stderr and 1) once
    the exit handlers ran and stdout and stderr are flushed, without the interpreter's teardown
    of every module a dump imported (30-40 ms after its last line, with nothing left to do:
    every file and process is closed by then)."""
    if status is None or isinstance(status, int):
        code = status or 0
    else:
        print(status, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader is gone (e.g. `| head`): as the group's handler does
        code = code or ExitStatus.BROKEN_PIPE
    except OSError as e:
        _say_error(f"cannot write stdout: {e.strerror}")
        code = code or ExitStatus.FAILURE
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)

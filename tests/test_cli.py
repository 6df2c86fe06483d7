"""The CLI shell: the except ladder, exit codes, stdout/stderr discipline, `convert` wiring."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

import procs
import pytest
from click.testing import CliRunner

import converters
import criu_livedump
from converters.errors import ConversionError, ImageFormatError
from converters.options import ConvertOptions, CoreResult
from criu_livedump import check as check_mod
from criu_livedump import entry
from criu_livedump.cli import STATUS_BY_ERROR, ExitStatus, cli, status_for
from criu_livedump.errors import (
    BlockerError,
    CloneError,
    CloneImagesError,
    CloneRefusedError,
    CriuError,
    DestinationError,
    LivedumpError,
    PermissionDeniedError,
    RequestError,
    ScratchError,
    TargetError,
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def raising(exc: BaseException) -> object:
    def fn(*args: object, **kwargs: object) -> object:
        raise exc

    return fn


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RequestError("--sched-prio 40: nice value 40 is out of range"), ExitStatus.USAGE),
        (CriuError(["criu", "dump"], 1, "Error (x.c:1): boom"), ExitStatus.CRIU),
        (PermissionDeniedError("process 1: not allowed"), ExitStatus.PERMISSION),
        (TargetError(123, "no such process"), ExitStatus.TARGET),
        (BlockerError(123, "it uses io_uring"), ExitStatus.BLOCKED),
        (LivedumpError("something else"), ExitStatus.FAILURE),
        (ImageFormatError("pstree.img", "bad magic"), ExitStatus.CONVERSION),
    ],
)
def test_error_ladder(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, error: Exception, status: ExitStatus
) -> None:
    monkeypatch.setattr(check_mod, "run_check", raising(error))
    result = runner.invoke(cli, ["check"])
    assert result.exit_code == status
    assert status_for(error) == status
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: {error}"
    hint = getattr(error, "hint", None)
    assert lines[1:] == ([f"hint: {hint}"] if hint else [])
    assert result.stdout == ""


def _subclasses(root: type[Exception]) -> list[type[Exception]]:
    found: list[type[Exception]] = []
    todo = [root]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_has_an_exit_status() -> None:
    """Each LivedumpError and ConversionError subclass, in every module of both packages, is
    covered by a row of the CLI's one table other than the root's catch-all."""
    for package in (criu_livedump, converters):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    classes = _subclasses(LivedumpError) + _subclasses(ConversionError)
    assert len(classes) > 15  # the walk found the hierarchies
    missing = []
    for cls in classes:
        row = next((c for c, _ in STATUS_BY_ERROR if issubclass(cls, c)), None)
        if row is None or (row is LivedumpError and cls is not LivedumpError):
            missing.append(f"{cls.__module__}.{cls.__qualname__}")
    assert missing == []


def test_clone_errors_have_their_own_statuses() -> None:
    assert status_for(CloneError("clone 5: gone")) == ExitStatus.SNAPSHOT
    assert status_for(CloneImagesError("core-5.img: missing")) == ExitStatus.SNAPSHOT
    assert status_for(CloneRefusedError(5, "it is traced")) == ExitStatus.BLOCKED
    assert status_for(ScratchError("/dev/shm", "full")) == ExitStatus.STORAGE
    assert status_for(DestinationError("core_pattern '': empty")) == ExitStatus.STORAGE


def test_criu_error_message_names_command_and_log_line() -> None:
    e = CriuError(["/usr/local/sbin/criu", "dump", "-t", "5"], 1, "a\nError (cr-dump.c:9): x\nb")
    assert str(e) == "criu dump failed (exit status 1): Error (cr-dump.c:9): x"
    killed = CriuError(["/usr/local/sbin/criu", "dump"], -9, "")
    assert str(killed) == "criu dump failed (killed by signal 9)"


def test_permission_hint(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_mod, "run_check", raising(PermissionDeniedError("process 1: no")))
    result = runner.invoke(cli, ["check"])
    assert result.stderr.splitlines() == [
        "error: process 1: no",
        "hint: live dumps need root or CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE",
    ]


def test_ctrl_c_exits_130(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_mod, "run_check", raising(KeyboardInterrupt()))
    result = runner.invoke(cli, ["check"])
    assert result.exit_code == ExitStatus.INTERRUPTED == 130
    assert result.stderr == "error: interrupted\n"


def test_traceback_reraises(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    error = TargetError(7, "gone")
    monkeypatch.setattr(check_mod, "run_check", raising(error))
    result = runner.invoke(cli, ["--traceback", "check"])
    assert result.exception is error


def test_unexpected_errors_are_not_swallowed(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check_mod, "run_check", raising(ZeroDivisionError()))
    result = runner.invoke(cli, ["check"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_broken_pipe_is_quiet() -> None:
    """``criu-livedump check --json | head -c1``: no traceback, no noise."""
    exe = Path(sys.executable).parent / "criu-livedump"
    script = f"'{exe}' check --json | head -c1 >/dev/null; echo ${{PIPESTATUS[0]}}"
    # A large stdout is needed for EPIPE; --json is small, so widen it with repeated calls.
    proc = procs.run(["bash", "-c", f"for i in 1 2 3; do {script}; done"], text=True)
    assert "Traceback" not in proc.stderr
    for status in proc.stdout.split():
        assert int(status) in (ExitStatus.OK, ExitStatus.BROKEN_PIPE)


@pytest.mark.parametrize(
    ("status", "code", "stderr"), [(None, 0, ""), (3, 3, ""), ("no way", 1, "no way\n")]
)
def test_leave_flushes_and_runs_exit_handlers(status: object, code: int, stderr: str) -> None:
    """The entry point's exit skips the interpreter's teardown, not what it must still do:
    buffered stdout is written, exit handlers run, the status is SystemExit's."""
    script = (
        "import atexit, sys\n"
        "from criu_livedump.cli import leave\n"
        "atexit.register(lambda: sys.stdout.write(' handler'))\n"
        "sys.stdout.write('buffered')\n"
        f"leave({status!r})\n"
    )
    proc = procs.run([sys.executable, "-c", script], text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, "buffered handler", stderr)


def test_entry_finds_the_subcommand() -> None:
    """criu_livedump.entry acts on ``dump`` before click parses anything: the subcommand is the
    first word that is no option, which holds while the group's options are all flags."""
    assert all(p.is_flag or getattr(p, "count", False) for p in cli.params), cli.params
    assert entry.command(["-vv", "--traceback", "dump", "--signal", "6", "42"]) == "dump"
    assert entry.command(["--version"]) is None
    assert entry.command(["convert", "dump"]) == "convert"


def test_unknown_subcommand(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["frobnicate"])
    assert result.exit_code == ExitStatus.USAGE
    assert "No such command" in result.stderr


# --- convert ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--coredump-filter", "0x200"], "--coredump-filter 0x200: coredump filter 0x200 is out"),
        (["--coredump-filter", "zz"], "--coredump-filter zz: coredump filter must be a hex mask"),
        (["--core-limit", "lots"], "--core-limit lots: core limit must be a byte count"),
        (["--signal", "SIGFOO"], "--signal SIGFOO: unknown signal 'SIGFOO'"),
        (["--signal", "99"], "--signal 99: signal 99 is out of range"),
    ],
)
def test_convert_bad_values(
    runner: CliRunner, tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(cli, ["convert", str(tmp_path), *args])
    assert result.exit_code == ExitStatus.USAGE
    (line, *_) = result.stderr.splitlines()
    assert line.startswith("error: " + message), line


def test_convert_missing_dir(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["convert", str(tmp_path / "nope")])
    assert result.exit_code == ExitStatus.USAGE
    assert "does not exist" in result.stderr


class FakeConvert:
    """Stands in for converters.convert: records calls, fails for directories named 'bad'."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path, ConvertOptions]] = []

    def __call__(
        self, images_dir: Path, out_dir: Path, options: ConvertOptions, progress: object = None
    ) -> list[CoreResult]:
        self.calls.append((images_dir, out_dir, options))
        if images_dir.name == "bad":
            raise ImageFormatError(str(images_dir / "pstree.img"), "wrong magic")
        path = out_dir / "core.42"
        path.write_bytes(b"x" * 10)
        return [CoreResult(pid=42, path=path, size=10, seconds=0.5)]


def test_convert_wiring(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeConvert()
    monkeypatch.setattr(converters, "convert", fake)
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "out"
    result = runner.invoke(
        cli,
        [
            "convert",
            str(images),
            "-o",
            str(out),
            "--pid",
            "42",
            "--coredump-filter",
            "3f",
            "--core-limit",
            "1M",
            "--signal",
            "SIGQUIT",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    ((images_dir, out_dir, options),) = fake.calls
    assert (images_dir, out_dir) == (images, out)
    assert options == ConvertOptions(
        coredump_filter=0x3F, core_limit=1 << 20, files_root=None, signal=3, pid=42
    )
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["results"][0]["cores"][0]["path"] == str(out / "core.42")
    assert result.stderr == ""


def test_convert_several_dirs_one_bad(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeConvert()
    monkeypatch.setattr(converters, "convert", fake)
    dirs = [tmp_path / "x" / "good", tmp_path / "bad", tmp_path / "y" / "good"]
    for d in dirs:
        d.mkdir(parents=True)
    out = tmp_path / "out"
    result = runner.invoke(cli, ["convert", *map(str, dirs), "-o", str(out)])
    assert result.exit_code == ExitStatus.CONVERSION
    assert [c[1] for c in fake.calls] == [out / "good", out / "bad", out / "good.2"]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [
        f"error: {tmp_path / 'bad' / 'pstree.img'}: wrong magic",
        "error: 1 of 3 image directories failed",
    ]
    assert result.stdout == ""  # text mode: stdout carries no data


def test_convert_single_failure_is_one_line(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(converters, "convert", FakeConvert())
    bad = tmp_path / "bad"
    bad.mkdir()
    result = runner.invoke(cli, ["convert", str(bad), "-o", str(tmp_path)])
    assert result.exit_code == ExitStatus.CONVERSION
    assert result.stderr == f"error: {bad / 'pstree.img'}: wrong magic\n"


def test_dump_rejects_bad_spec_before_anything(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["dump", "1", "nice=3"])
    assert result.exit_code == ExitStatus.USAGE
    assert result.stderr.startswith("error: ")
    assert "nice=3" in result.stderr

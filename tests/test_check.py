"""``criu-livedump check`` and CRIU discovery (criu_livedump.snapshot.criu.find / check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import procs
import pytest
from click.testing import CliRunner
from conftest import StartTarget
from syslock import system_settings_lock

from criu_livedump import check as check_mod
from criu_livedump import scratch
from criu_livedump.cli import ExitStatus, cli
from criu_livedump.errors import CriuNotFoundError, CriuUnusableError
from criu_livedump.linux import ptrace
from criu_livedump.snapshot import criu

SOFT_DIRTY_BIT = 1 << 55  # Documentation/admin-guide/mm/soft-dirty.rst


def soft_dirty_works() -> bool:
    """Independent oracle for dirty tracking: clear the soft-dirty bits of this process
    (``echo 4 > /proc/self/clear_refs``), write a page, and see whether its pagemap entry has
    bit 55. Without CONFIG_MEM_SOFT_DIRTY the bit never appears."""
    code = f"""
import mmap, ctypes, struct
m = mmap.mmap(-1, 4096)
m[0] = 1
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
open("/proc/self/clear_refs", "w").write("4")
m[0] = 2
with open("/proc/self/pagemap", "rb") as f:
    f.seek(addr // 4096 * 8)
    (entry,) = struct.unpack("<Q", f.read(8))
print(1 if entry & {SOFT_DIRTY_BIT} else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "1"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def test_check_passes_here_text(runner: CliRunner) -> None:
    with system_settings_lock():  # core_pattern is read twice: nobody may change it between
        result = runner.invoke(cli, ["check"])
        core_pattern = Path("/proc/sys/kernel/core_pattern").read_text().rstrip("\n")
    assert result.exit_code == ExitStatus.OK, result.stderr
    lines = result.stdout.splitlines()
    keys = [ln.split(":", 1)[0] for ln in lines]
    assert keys == [
        "criu",
        "criu check",
        "dirty tracking",
        "privileges",
        "core_pattern",
        "core_uses_pid",
        "scratch",
        "clone freeze",
        "CRIU's kernel probe",
    ]
    assert lines[1].startswith("criu check: passed")
    assert lines[7].startswith("clone freeze: ptrace batch helper built")
    expected = "available" if soft_dirty_works() else "unavailable"
    assert lines[2].split(": ", 1)[1].startswith(expected)
    assert lines[4] == "core_pattern: " + core_pattern
    assert not error_lines(result.stderr)


def test_check_names_a_missing_batch_helper(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the helper `make setup` builds, check says the clone method cannot run (and
    live dumps still can: --method criu)."""
    monkeypatch.setattr(ptrace, "HELPER", tmp_path / "libptrace_batch.so.1")
    ptrace._helper.cache_clear()
    try:
        result = runner.invoke(cli, ["check", "--json"])
    finally:
        ptrace._helper.cache_clear()
    assert result.exit_code == ExitStatus.OK, result.stderr
    item = json.loads(result.stdout)["clone_freeze"]
    assert item["helper_ok"] is False
    assert item["helper"] == str(tmp_path / "libptrace_batch.so.1")


def test_check_passes_here_json(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["check", "--json"])
    assert result.exit_code == ExitStatus.OK, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["problems"] == []
    assert data["criu_check"]["passed"] is True
    assert data["dirty_tracking"]["available"] is soft_dirty_works()
    assert data["dirty_tracking"]["pre_dump"] is data["dirty_tracking"]["available"]
    assert Path(data["criu"]["path"]).is_file()
    assert data["criu"]["version"] == criu.version(criu.Criu(Path(data["criu"]["path"]), "test"))
    assert data["core_uses_pid"]["value"] in ("0", "1")
    assert data["scratch"]["tmpfs"]["path"] == "/dev/shm"
    assert data["scratch"]["disk"]["free"] > 0


def test_this_machine_has_no_dirty_tracking() -> None:
    """The README's "limits on this machine" section says so; keep it honest."""
    binary = criu.find()
    assert criu.feature(binary, "mem_dirty_track") is soft_dirty_works()


def test_check_privileges_line_matches_capabilities(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["check", "--json"])
    privileges = json.loads(result.stdout)["privileges"]
    with open("/proc/self/status") as f:
        eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    assert privileges["capabilities"]["SYS_PTRACE"] is bool(eff >> 19 & 1)
    assert privileges["capabilities"]["SYS_RESOURCE"] is bool(eff >> 24 & 1)
    assert privileges["capabilities"]["CHECKPOINT_RESTORE"] is bool(eff >> 40 & 1)
    resource_note = any("CAP_SYS_RESOURCE missing" in n for n in privileges["notes"])
    assert resource_note is not bool(eff >> 24 & 1)


def test_criu_not_executable(runner: CliRunner, tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho Version: 4.2.1\n")
    fake.chmod(0o644)
    result = runner.invoke(cli, ["check", "--criu", str(fake)])
    assert result.exit_code == ExitStatus.ENVIRONMENT
    assert error_lines(result.stderr) == [
        f"error: live dumps cannot work here: {fake}: not executable"
    ]


def test_criu_missing(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["check", "--criu", str(tmp_path / "nope")])
    assert result.exit_code == ExitStatus.ENVIRONMENT
    assert error_lines(result.stderr) == [
        f"error: live dumps cannot work here: {tmp_path / 'nope'}: no such file"
    ]


def test_criu_check_fails(runner: CliRunner, tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "Version: 4.2.1"; exit 0; fi\n'
        'echo "Error (criu/cr-check.c:1): no kernel support here" >&2\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    result = runner.invoke(cli, ["check", "--criu", str(fake)])
    assert result.exit_code == ExitStatus.ENVIRONMENT
    (line,) = error_lines(result.stderr)
    assert line == (
        f"error: live dumps cannot work here: {fake}: `criu check` failed: "
        "Error (criu/cr-check.c:1): no kernel support here"
    )
    # The report itself still went to stdout, with the failed line.
    assert f"criu check: {fake}: `criu check` failed" in result.stdout


def test_criu_not_a_criu(runner: CliRunner) -> None:
    true = Path("/bin/true")
    result = runner.invoke(cli, ["check", "--criu", str(true)])
    assert result.exit_code == ExitStatus.ENVIRONMENT
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: live dumps cannot work here: {true}: not a CRIU binary")


def test_criu_not_an_executable_format(runner: CliRunner, tmp_path: Path) -> None:
    junk = tmp_path / "criu"
    junk.write_bytes(b"\x7fELF" + bytes(60))
    junk.chmod(0o755)
    result = runner.invoke(cli, ["check", "--criu", str(junk)])
    assert result.exit_code == ExitStatus.ENVIRONMENT
    (line,) = error_lines(result.stderr)
    assert line == f"error: live dumps cannot work here: {junk}: not an executable program " + (
        "(exec format error)"
    )


def test_check_json_on_failure(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["check", "--json", "--criu", str(tmp_path / "nope")])
    assert result.exit_code == ExitStatus.ENVIRONMENT
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert data["problems"] == [f"{tmp_path / 'nope'}: no such file"]


def test_check_too_old(runner: CliRunner, tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17'\n")
    fake.chmod(0o755)
    result = runner.invoke(cli, ["check", "--criu", str(fake)])
    assert result.exit_code == ExitStatus.ENVIRONMENT
    (line,) = error_lines(result.stderr)
    assert "version 3.17" in line
    assert "too old, need 4.1 or later" in line


@pytest.mark.parametrize(
    ("version", "usable", "untested"),
    [("3.17.1", False, False), ("4.0", False, False), ("4.1", True, False),
     ("4.1.1", True, False), ("4.2.1", True, False), ("4.3", True, True), ("5.0", True, True)],
)  # fmt: skip
def test_support_of_each_release(version: str, usable: bool, untested: bool) -> None:
    said = criu.support(version)
    assert (said.usable, said.untested) == (usable, untested)
    assert "4.1.1, 4.2.1" in said.text


def test_check_names_the_supported_releases(runner: CliRunner, tmp_path: Path) -> None:
    """A release newer than those tested is a warning in its line, not a refusal."""
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 4.3'\n")
    fake.chmod(0o755)
    result = runner.invoke(cli, ["check", "--json", "--criu", str(fake)])
    data = json.loads(result.stdout)
    assert data["criu"]["tested"] == ["4.1.1", "4.2.1"]
    assert data["criu"]["support"].startswith("newer than the releases tested (4.1.1, 4.2.1)")
    assert not any("version 4.3" in p for p in data["problems"])


# --- discovery order ----------------------------------------------------------------------------


def fake_criu(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "criu"
    path.write_text(f"#!/bin/sh\necho 'Version: {version}'\n")
    path.chmod(0o755)
    return path


def test_find_order(tmp_path: Path) -> None:
    explicit = fake_criu(tmp_path / "a", "4.2")
    from_env = fake_criu(tmp_path / "b", "4.2")
    on_path = fake_criu(tmp_path / "c", "4.2")
    env = {"CRIU": str(from_env), "PATH": str(on_path.parent)}
    assert criu.find(explicit, env) == criu.Criu(explicit, "given by --criu")
    assert criu.find(None, env) == criu.Criu(from_env, "from $CRIU")
    assert criu.find(None, {"PATH": str(on_path.parent)}) == criu.Criu(
        on_path, "first criu on PATH"
    )


def test_find_skips_old_criu_on_path(tmp_path: Path) -> None:
    old = fake_criu(tmp_path / "old", "3.17")
    if not criu.DEFAULT_CRIU.is_file():
        pytest.skip("no CRIU at the default location")
    found = criu.find(None, {"PATH": str(old.parent)})
    assert found.path == criu.DEFAULT_CRIU
    assert found.source == "setup's install location"
    assert found.skipped == (f"{old}: version 3.17 is older than 4.1",)


def test_find_explicit_errors(tmp_path: Path) -> None:
    with pytest.raises(CriuUnusableError, match="no such file"):
        criu.find(tmp_path / "missing", {})
    with pytest.raises(CriuUnusableError, match="not a regular file"):
        criu.find(tmp_path, {})
    with pytest.raises(CriuUnusableError, match="not executable"):
        criu.find(None, {"CRIU": "/etc/passwd"})


def test_find_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criu, "DEFAULT_CRIU", tmp_path / "none")
    with pytest.raises(CriuNotFoundError) as info:
        criu.find(None, {"PATH": str(tmp_path)})
    assert "CRIU not found" in str(info.value)
    assert info.value.hint is not None and "make setup" in info.value.hint


def test_cli_help_lists_subcommands(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("check", "convert", "dump"):
        assert f"  {name} " in result.stdout


def test_console_script_check() -> None:
    """The installed entry point, as the README runs it."""
    exe = Path(sys.executable).parent / "criu-livedump"
    proc = subprocess.run([exe, "check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("criu: ")
    assert proc.stderr == ""


# --- check --pid: which methods can dump that process ------------------------------------------


def _method_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith(("process:", "method "))]


@pytest.mark.live
def test_check_pid_of_a_plain_process(
    runner: CliRunner, programs: dict[str, Path], targets: StartTarget
) -> None:
    target = targets(programs["threads"], "2")
    result = runner.invoke(cli, ["check", "--pid", str(target.pid)])
    assert result.exit_code == ExitStatus.OK, result.stderr
    assert _method_lines(result.stdout) == [
        f"process: {target.pid} (threads)",
        "method precopy: can dump it",
        "method clone: can dump it (auto takes it)",
        "method criu: can dump it",
    ]
    data = json.loads(runner.invoke(cli, ["check", "--pid", str(target.pid), "--json"]).stdout)
    assert data["method_clone"] == {"can": True, "refusals": [], "auto": True}
    assert data["method_criu"] == {"can": True, "refusals": [], "auto": False}
    assert data["process"]["ns_pid"] == target.pid


@pytest.mark.live
def test_check_pid_of_a_traced_process_names_every_refusal(
    runner: CliRunner, programs: dict[str, Path], targets: StartTarget
) -> None:
    """A traced process: neither method can attach, each line says so, and check fails."""
    target = targets(programs["threads"], "2")
    tracer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom criu_livedump.linux import ptrace\n"
         "ptrace.seize(int(sys.argv[1]))\nprint('ok', flush=True)\ntime.sleep(60)",
         str(target.pid)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert procs.readline(tracer.stdout, 60, "the tracer attached").strip() == "ok"
        result = runner.invoke(cli, ["check", "--pid", str(target.pid), "--json"])
    finally:
        tracer.kill()
        tracer.wait()
        if tracer.stdout is not None:
            tracer.stdout.close()
    assert result.exit_code == ExitStatus.ENVIRONMENT
    data = json.loads(result.stdout)
    traced = f"it is being traced by process {tracer.pid}, and a process can have only one tracer"
    for method in ("clone", "criu"):
        assert data[f"method_{method}"]["can"] is False
        assert traced in data[f"method_{method}"]["refusals"]
    assert data["ok"] is False


def test_check_pid_of_no_process(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["check", "--pid", "4194304"])
    assert result.exit_code == ExitStatus.TARGET
    assert error_lines(result.stderr) == ["error: process 4194304: no such process"]


@pytest.mark.parametrize("where", ["/dev/shm", "/var/tmp"])
def test_criu_probe_cached_only_on_tmpfs(where: str) -> None:
    """CRIU keeps its kernel probe only in a tmpfs run directory (criu/kerndat.c): check says
    which of the two a host has."""
    item = check_mod._criu_probe_item(Path(where))
    tmpfs = scratch.fstype(Path(where)) == "tmpfs"
    assert item.data["cached"] is tmpfs and not item.fatal
    assert ("probed again" in item.text) is not tmpfs
    assert "criu_probe" in {i.key for i in check_mod.run_check().items}

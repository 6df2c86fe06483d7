"""`criu-livedump serve` with real unprivileged users (created here, removed after): each takes
live cores of its own processes through the FUSE file and the socket, where core_pattern says,
owned by them, mode 0600; is refused, the target untouched, for others' processes and its own
non-dumpable one; bad input is fuzzed; a load of requests from ten users leaves the service up
and leaks nothing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest
from syslock import core_pattern

from criu_livedump.errors import RequestError
from criu_livedump.serve.service import Limits, Requester, Service, _Refused
from criu_livedump.serve.sock import parse_request

ROOT_DIR = Path(__file__).resolve().parents[1]
CLIENT = ROOT_DIR / "criu_livedump" / "serve" / "client.py"
HELPER = Path(__file__).resolve().parent / "serve_user.py"
SYSTEM_PYTHON = "/usr/bin/python3"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, FUSE, CRIU)")
live = [pytest.mark.live, needs_root]


# --- unit: the bounds and the protocol, no processes ------------------------------------------


def test_one_dump_per_target_a_cap_and_a_rate_per_uid() -> None:
    service = Service(Limits(max_dumps=2, rate=0, burst=2))
    a, b = Requester(1, 1000, 1000, "socket"), Requester(2, 1001, 1001, "socket")
    service._reserve(a, 10)
    with pytest.raises(_Refused) as busy:
        service._reserve(b, 10)
    assert busy.value.errno == errno.EBUSY
    service._reserve(a, 11)
    with pytest.raises(_Refused) as cap:
        service._reserve(b, 12)
    assert cap.value.errno == errno.EAGAIN and "2 dumps are running" in cap.value.message
    service._release(10, "ok\n")
    service._release(11, "ok\n")
    with pytest.raises(_Refused) as rate:  # a's two tokens are spent, none come back at rate 0
        service._reserve(a, 12)
    assert rate.value.errno == errno.EAGAIN and "rate limit" in rate.value.message
    service._reserve(b, 12)  # b's own bucket
    assert service.status(12) == "running\n" and service.status(10) == "ok\n"
    service._reserve(Requester(3, 0, 0, "fuse"), 13)  # root is not rate-limited


def test_request_lines() -> None:
    assert parse_request(b'{"pid": 5, "spec": ["core_limit=1k", "sched_prio=3"]}') == (
        5,
        "core_limit=1k sched_prio=3",
    )
    assert parse_request(b'{"pid": 5}') == (5, "")
    for bad, why in [
        (b"", "not one JSON object"),
        (b"[" * 100000, "not one JSON object"),
        (b'{"pid": true}', "pid must be"),
        (b'{"pid": 0}', "pid must be"),
        (b'{"pid": 5, "spec": 3}', "spec must be"),
        (b'{"pid": 5, "output": "/etc/passwd"}', "unknown field 'output'"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_request(bad)


def test_request_without_a_service() -> None:
    """`criu-livedump request` (the standalone client behind it): one line, exit status 3."""
    from click.testing import CliRunner

    from criu_livedump.cli import cli

    result = CliRunner().invoke(cli, ["request", "1", "--socket", "/nonexistent/sock"])
    assert result.exit_code == 3
    assert result.stderr == "error: /nonexistent/sock: No such file or directory\n"


def test_words_are_the_cli_words() -> None:
    """The service parses SPEC words with request.py, nothing of its own."""
    service = Service()
    with pytest.raises(_Refused) as e:
        service._parse("core_limit=lots")
    assert e.value.errno == errno.EINVAL
    assert str(e.value).startswith("SPEC word 'core_limit=lots'")
    assert service._parse("").core_limit is None
    assert issubclass(RequestError, Exception)


# --- users, the service, targets ---------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def argv(self, *cmd: str | os.PathLike[str]) -> list[str]:
        """*cmd* run as this user (real, effective, saved and fs ids; no groups)."""
        ids = [f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return ["setpriv", *ids, "--", *(os.fspath(c) for c in cmd)]


def _useradd(name: str) -> User:
    for _ in range(100):  # /etc/passwd.lock is held by another test suite's useradd
        done = procs.run(["useradd", "--no-create-home", "--user-group", name], timeout=30)
        if done.returncode == 0:
            break
        if b"lock" not in done.stderr:
            raise AssertionError(f"useradd {name}: {done.stderr.decode(errors='replace')}")
        time.sleep(0.1)
    else:
        raise AssertionError(f"useradd {name}: /etc/passwd stayed locked")
    out = procs.run(["id", "-u", name], text=True, check=True).stdout
    grp = procs.run(["id", "-g", name], text=True, check=True).stdout
    return User(name, int(out), int(grp))


@pytest.fixture(scope="module")
def users() -> Iterator[list[User]]:
    """Ten fresh unprivileged users, removed with everything they left in /tmp's tests dirs."""
    made: list[User] = []
    try:
        if os.geteuid() != 0:
            pytest.skip("needs root to create users")
        for i in range(10):
            made.append(_useradd(f"ldsrv{os.getpid() % 100000}x{i}"))
        yield made
    finally:
        for u in made:
            procs.run(["userdel", u.name], timeout=30)


@pytest.fixture
def area() -> Iterator[Path]:
    """A directory every user can reach: the client and helper, cores/ (sticky, world-writable,
    like /tmp), the mount point and the socket."""
    top = Path(tempfile.mkdtemp(prefix="livedump-serve-"))
    try:
        top.chmod(0o755)
        for f in (CLIENT, HELPER):
            shutil.copy(f, top / f.name)
            (top / f.name).chmod(0o755)
        (top / "cores").mkdir(mode=0o1777)
        (top / "cores").chmod(0o1777)
        yield top
    finally:
        with contextlib.suppress(OSError):
            if os.path.ismount(top / "mnt"):
                subprocess.run(["umount", "-l", str(top / "mnt")], timeout=30, check=False)
        shutil.rmtree(top, ignore_errors=True)


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    mount: Path
    socket: Path
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def descendants(self) -> list[int]:
        found, todo = [], [self.proc.pid]
        while todo:
            kids = list(procs.children(todo.pop()))
            found += kids
            todo += kids
        return found

    def idle(self) -> bool:
        """No dump runs: what is left below the service is its spare worker alone."""
        return len(self.descendants()) == 1


@contextlib.contextmanager
def serving(area: Path, *flags: str) -> Iterator[Served]:
    mount, sock, log = area / "mnt", area / "sock", area / "serve.log"
    argv = [
        ROOT_DIR / ".venv" / "bin" / "criu-livedump",
        "serve",
        "--mount",
        mount,
        "--socket",
        sock,
        *flags,
    ]
    with open(log, "wb") as err:
        proc = procs.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    served = Served(proc, mount, sock, log)
    try:
        procs.wait_for(
            lambda: not served.alive() or (sock.exists() and os.path.ismount(mount)),
            30,
            "the service's socket and mount",
        )
        assert served.alive(), log.read_text()
        yield served
        assert served.alive(), log.read_text()
        proc.send_signal(signal.SIGTERM)  # a clean stop: status 0, unmounted, socket removed
        assert procs.wait_exit(proc, 30)
        assert proc.wait() == 0, log.read_text()
        assert not os.path.ismount(mount) and not sock.exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if not procs.wait_exit(proc, 30):
                procs.kill_group(proc)
        procs.kill_group(proc)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], timeout=30, check=False)


@contextlib.contextmanager
def target_of(
    user: User | None,
    cwd: Path,
    *,
    prefix: tuple[str, ...] = (),
    program: tuple[str, ...] = ("sleep", "60"),
) -> Iterator[int]:
    """A sleeping process of *user* (root for None), killed and reaped at the end."""
    cmd = [*prefix, *(user.argv(*program) if user else program)]
    proc = procs.popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        if program[0] == SYSTEM_PYTHON:
            procs.readline(proc.stdout, 30, "the target's ready line")
        procs.wait_for(lambda: _trace(proc.pid)[0] == "S", 30, "the target's sleep")
        yield proc.pid
    finally:
        procs.kill_group(proc)
        if proc.stdout:
            proc.stdout.close()


def as_user(
    user: User, *cmd: str | os.PathLike[str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return procs.run(user.argv(*cmd), text=True, timeout=timeout, cwd="/")


def helper(
    user: User, area: Path, *args: str | os.PathLike[str], timeout: float = 120
) -> dict[str, object]:
    done = as_user(user, SYSTEM_PYTHON, area / "serve_user.py", *args, timeout=timeout)
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert isinstance(value, dict)
    return value


def _trace(pid: int) -> tuple[str, str, str, str]:
    """What a freeze would change: state, tracer, and both context-switch counts."""
    status = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":\t" in line
    )
    return (
        status["State"].split()[0],
        status["TracerPid"].strip(),
        status["voluntary_ctxt_switches"].strip(),
        status["nonvoluntary_ctxt_switches"].strip(),
    )


def _core_ok(path: Path, user: User) -> None:
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode)
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    assert stat.S_IMODE(st.st_mode) == 0o600
    with open(path, "rb") as f:
        assert f.read(4) == b"\x7fELF"


# --- live: the doors ----------------------------------------------------------------------------


@pytest.mark.live
@needs_root
def test_user_takes_its_own_core_by_the_file_and_the_socket(users: list[User], area: Path) -> None:
    a = users[0]
    cores = area / "cores"
    with core_pattern(f"{cores}/core.%u.%p"), serving(area, "--burst", "5") as served:
        with target_of(a, cores) as pid:
            done = as_user(
                a,
                "bash",
                "-c",
                'echo core_limit=unlimited > "$0"',
                served.mount / str(pid) / "livedump",
            )
            assert done.returncode == 0, done.stderr
            core = cores / f"core.{a.uid}.{pid}"
            status_path = served.mount / str(pid) / "status"
            status = procs.wait_for(
                lambda: (s := as_user(a, "cat", status_path)).stdout != "running\n" and s,
                120,
                "the dump's end",
                step=0.2,
            )
            _core_ok(core, a)
            assert _trace(pid)[:2] == ("S", "0")  # it runs on, untraced
            assert status.stdout.startswith(f"ok: {core} ({core.stat().st_size} bytes, frozen ")
        with target_of(a, cores) as pid:
            done = as_user(
                a,
                SYSTEM_PYTHON,
                area / "client.py",
                str(pid),
                "core_limit=unlimited",
                "--socket",
                served.socket,
            )
            core = cores / f"core.{a.uid}.{pid}"
            assert done.returncode == 0, done.stderr
            assert done.stderr == f"core written to {core} ({core.stat().st_size} bytes)\n"
            _core_ok(core, a)
        assert sorted(p.name for p in cores.iterdir()) == sorted(
            f"core.{a.uid}.{p}" for p in _pids_in(served.log, "decision=accepted")
        )


def _pids_in(log: Path, word: str) -> list[int]:
    return [
        int(line.split(" target=")[1].split()[0])
        for line in log.read_text().splitlines()
        if word in line
    ]


@pytest.mark.live
@needs_root
def test_core_to_a_pipe_handler(users: list[User], area: Path) -> None:
    a = users[0]
    handler = area / "handler.sh"
    handler.write_text('#!/bin/sh\ncat > "$1/piped.$2.$3"\n')
    handler.chmod(0o755)
    with (
        core_pattern(f"|{handler} {area / 'cores'} %p %u"),
        serving(area) as served,
        target_of(a, area) as pid,
    ):
        done = as_user(a, SYSTEM_PYTHON, area / "client.py", str(pid), "--socket", served.socket)
        assert done.returncode == 0, done.stderr
        assert done.stderr.startswith(f"core written to |{handler} ")
        piped = area / "cores" / f"piped.{pid}.{a.uid}"
        assert [p.name for p in (area / "cores").iterdir()] == [piped.name]
        with open(piped, "rb") as f:
            assert f.read(4) == b"\x7fELF"


@pytest.mark.live
@needs_root
def test_refusals_leave_the_target_untouched(users: list[User], area: Path) -> None:
    a, b = users[0], users[1]
    cores = area / "cores"
    hidden = (
        SYSTEM_PYTHON,
        "-c",
        "import ctypes,time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0);"
        " print('ready', flush=True); time.sleep(60)",
    )  # PR_SET_DUMPABLE 0
    with (
        core_pattern(f"{cores}/core.%u.%p"),
        serving(area) as served,
        target_of(b, cores) as theirs,
        target_of(None, cores) as roots,
        target_of(a, cores, program=hidden) as own_hidden,
        target_of(a, cores, prefix=("prlimit", "--core=0:8192")) as limited,
    ):
        for pid in (theirs, roots, own_hidden):
            before = _trace(pid)
            fuse = helper(
                a, area, "write", served.mount / str(pid) / "livedump", "core_limit=unlimited\n"
            )
            assert fuse == {"result": "open:EACCES"}, pid
            sock = as_user(
                a, SYSTEM_PYTHON, area / "client.py", str(pid), "--socket", served.socket
            )
            assert sock.returncode == 1 and sock.stderr.startswith(
                "error: Permission denied: process"
            ), sock.stderr
            assert _trace(pid) == before
        assert "not dumpable" in served.log.read_text()
        # words: a bad one (EINVAL); a core limit above the hard one (EPERM, as setrlimit)
        before = _trace(limited)
        path = served.mount / str(limited) / "livedump"
        assert helper(a, area, "write", path, "core_limit=lots\n") == {"result": "EINVAL"}
        assert helper(a, area, "write", path, "core_limit=unlimited\n") == {"result": "EPERM"}
        assert helper(a, area, "write", path, "sched_prio=-5\n") == {"result": "EPERM"}
        assert _trace(limited) == before
        gone = as_user(
            a,
            SYSTEM_PYTHON,
            area / "client.py",
            str(4 * 1024 * 1024 - 1),
            "--socket",
            served.socket,
        )
        assert gone.stderr.startswith("error: No such process"), gone.stderr
        assert list(cores.iterdir()) == []
        log = served.log.read_text()
    assert "decision=accepted" not in log
    for pid in (theirs, roots, own_hidden):  # each refusal logged, at the open and the socket
        assert f"door=fuse uid={a.uid} pid=" in log
        assert f"target={pid} open=livedump decision=refused result=EACCES (process {pid}" in log
        assert f"target={pid} words='' decision=refused result=EACCES (process {pid}" in log
    assert (
        f"door=fuse uid={a.uid} pid=" in log
        and f"target={limited} words='core_limit=lots\\n' decision=refused result=EINVAL" in log
    )


# --- bad input and load -----------------------------------------------------------------------


@pytest.mark.live
@needs_root
def test_fuzzed_socket_and_words_keep_the_service_up(users: list[User], area: Path) -> None:
    a, b = users[0], users[1]
    cores = area / "cores"
    allowed = {"OK", "EINVAL", "EPERM", "EAGAIN", "EBUSY", "ESRCH", "EACCES"}
    with (
        core_pattern(f"{cores}/core.%u.%p"),
        serving(area, "--burst", "1", "--rate", "0") as served,
        target_of(a, cores) as pid,
    ):
        seen = helper(
            a,
            area,
            "fuzz",
            "20261127",
            "10000",
            served.socket,
            served.mount / str(pid) / "livedump",
            timeout=300,
        )
        assert sum(int(n) for n in seen.values()) == 10000  # type: ignore[call-overload]
        assert {k.split(":", 1)[1] for k in seen} <= allowed, (seen, _results(served.log))
        assert seen.get("socket:EINVAL", 0) > 1000 and seen.get("fuse:EINVAL", 0) > 1000, seen
        assert served.alive()
        still = as_user(b, SYSTEM_PYTHON, area / "client.py", str(pid), "--socket", served.socket)
        assert still.stderr.startswith("error: Permission denied"), still.stderr
        procs.wait_for(served.idle, 120, "the service's dumps to end")


@pytest.mark.live
@needs_root
def test_a_thousand_requests_from_ten_users(users: list[User], area: Path) -> None:
    cores = area / "cores"
    with contextlib.ExitStack() as stack:
        stack.enter_context(core_pattern(f"{cores}/core.%u.%p"))
        served = stack.enter_context(
            serving(area, "--burst", "1", "--rate", "0", "--max-dumps", "2")
        )
        targets = [stack.enter_context(target_of(u, cores)) for u in users]
        # warm up: the first requests start the threads each door keeps
        helper(users[0], area, "write", served.mount / str(targets[1]) / "livedump", "\n")
        as_user(
            users[0], SYSTEM_PYTHON, area / "client.py", str(targets[1]), "--socket", served.socket
        )
        procs.wait_for(served.idle, 120, "the warm-up's end")
        fds = served.fds()
        storms = [
            procs.popen(
                u.argv(
                    SYSTEM_PYTHON,
                    area / "serve_user.py",
                    "storm",
                    str(i),
                    "100",
                    served.socket,
                    served.mount,
                    str(targets[i]),
                    str(targets[(i + 1) % 10]),
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
            )
            for i, u in enumerate(users)
        ]
        seen: Counter[str] = Counter()
        try:
            for s in storms:
                out, err = s.communicate(timeout=240)
                assert s.returncode == 0, err
                seen.update(json.loads(out))
        finally:
            for s in storms:
                procs.kill_group(s)
        assert sum(seen.values()) == 1000
        accepted = seen["own-socket:OK"] + seen["own-fuse:OK"]
        assert 1 <= accepted <= 10, seen  # one token per uid
        assert seen["other-socket:EACCES"] == seen["other-fuse:open:EACCES"] == 200, seen
        assert seen["bad-socket:EINVAL"] == 200, seen
        assert set(seen) <= {
            f"own-{d}:{e}" for d in ("socket", "fuse") for e in ("OK", "EAGAIN", "EBUSY")
        } | {"other-socket:EACCES", "other-fuse:open:EACCES", "bad-socket:EINVAL"}, seen
        procs.wait_for(served.idle, 180, "the service's dumps to end")
        assert served.alive()
        assert served.fds() == fds
        written = sorted(p.name for p in cores.iterdir())
        assert written == sorted(
            f"core.{users[targets.index(p)].uid}.{p}" for p in _pids_in(served.log, "result=ok")
        )
        assert len(written) == accepted
        for name in written:
            uid = int(name.split(".")[1])
            _core_ok(cores / name, next(u for u in users if u.uid == uid))


def _results(log: Path) -> list[str]:
    return [
        line
        for line in log.read_text().splitlines()
        if "result=" in line and "decision" not in line
    ]


@pytest.mark.live
@needs_root
def test_a_failing_criu_or_a_full_disk_fails_that_request_only(
    users: list[User], area: Path
) -> None:
    a, b = users[0], users[1]
    small = area / "small"
    small.mkdir()
    fake = area / "criu-fails"
    fake.write_text("#!/bin/sh\necho 'Error (fake): no' >&2\nexit 1\n")
    fake.chmod(0o755)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "livedump-test", small],
        check=True,
        timeout=30,
    )
    try:
        with core_pattern(f"{small}/core.%u.%p"):
            with serving(area, "--criu", str(fake)) as served, target_of(a, area) as pid:
                done = as_user(
                    a,
                    SYSTEM_PYTHON,
                    area / "client.py",
                    str(pid),
                    "core_limit=1M",
                    "--socket",
                    served.socket,
                )
                assert done.returncode == 1 and done.stderr.startswith(
                    "error: Input/output error: criu"
                )
                assert _trace(pid)[:2] == ("S", "0")
                again = as_user(
                    a,
                    SYSTEM_PYTHON,
                    area / "client.py",
                    str(pid),
                    "core_limit=1M",
                    "--socket",
                    served.socket,
                )
                assert again.stderr.startswith("error: Input/output error: criu")  # not EBUSY
            with serving(area) as served, target_of(a, area) as pid, target_of(b, area) as other:
                full = as_user(
                    a,
                    SYSTEM_PYTHON,
                    area / "client.py",
                    str(pid),
                    "core_limit=unlimited",
                    "--socket",
                    served.socket,
                )
                assert full.returncode == 1 and "No space left on device" in full.stderr, (
                    full.stderr
                )
                assert list(small.iterdir()) == []  # nothing half-written
                assert _trace(pid)[:2] == ("S", "0")
                fits = as_user(
                    b,
                    SYSTEM_PYTHON,
                    area / "client.py",
                    str(other),
                    "core_limit=8k",
                    "--socket",
                    served.socket,
                )
                assert fits.returncode == 0, fits.stderr
                assert [p.name for p in small.iterdir()] == [f"core.{b.uid}.{other}"]
    finally:
        subprocess.run(["umount", small], timeout=30, check=False)


@needs_root
def test_systemd_socket_activation(users: list[User], area: Path) -> None:
    """With LISTEN_PID/LISTEN_FDS the service answers on fd 3 and leaves systemd's path be."""
    sock = area / "activated.sock"
    wrapper = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666); s.listen(8)\n"
        "os.dup2(s.fileno(), 3) if s.fileno() != 3 else os.set_inheritable(3, True)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.argv[2], [sys.argv[2], 'serve', '--no-mount', '--socket', '/nonexistent'])\n"
    )
    tool = ROOT_DIR / ".venv" / "bin" / "criu-livedump"
    with open(area / "serve.log", "wb") as err:
        proc = procs.popen(
            [SYSTEM_PYTHON, "-c", wrapper, sock, tool], stdin=subprocess.DEVNULL, stderr=err
        )
    try:
        procs.wait_for(sock.exists, 30, "the activated socket")
        inode = sock.stat().st_ino
        with target_of(None, area) as roots:
            done = procs.wait_for(
                lambda: (
                    (
                        d := as_user(
                            users[0],
                            SYSTEM_PYTHON,
                            area / "client.py",
                            str(roots),
                            "--socket",
                            sock,
                        )
                    ).stderr.startswith("error: Permission denied")
                    and d
                ),
                30,
                "an answer on the activated socket",
                step=0.2,
            )
            assert done.returncode == 1
        proc.send_signal(signal.SIGTERM)
        assert procs.wait_exit(proc, 30)
        assert sock.stat().st_ino == inode  # systemd's to remove
        assert not Path("/nonexistent").exists()
    finally:
        procs.kill_group(proc)


@pytest.mark.live
@needs_root
def test_a_second_request_while_a_dump_runs_is_busy(users: list[User], area: Path) -> None:
    """CRIU held at a gate keeps the first dump running: the target is EBUSY to every door,
    its status says running, and it is free again once that dump ended."""
    a = users[0]
    gate = area / "gate"
    fake = area / "criu-gated"
    fake.write_text(f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\nexit 1\n")
    fake.chmod(0o755)
    client = [SYSTEM_PYTHON, area / "client.py"]
    try:
        with (
            core_pattern(f"{area / 'cores'}/core.%u.%p"),
            serving(area, "--criu", str(fake), "--burst", "5") as served,
            target_of(a, area) as pid,
        ):
            sock = ["--socket", served.socket]
            first = procs.popen(
                a.argv(*client, str(pid), "core_limit=1M", *sock),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                procs.wait_for(
                    lambda: "decision=accepted" in served.log.read_text(), 60, "the first dump"
                )
                path = served.mount / str(pid) / "livedump"
                assert helper(a, area, "write", path, "\n") == {"result": "EBUSY"}
                busy = as_user(a, *client, str(pid), *sock)
                assert busy.stderr.startswith("error: Device or resource busy"), busy.stderr
                status = as_user(a, "cat", served.mount / str(pid) / "status")
                assert status.stdout == "running\n"
                gate.touch()
                _, err = first.communicate(timeout=120)
                assert first.returncode == 1 and err.startswith(b"error: Input/output error")
            finally:
                procs.kill_group(first)
            after = as_user(a, *client, str(pid), "core_limit=1M", *sock)
            assert after.stderr.startswith("error: Input/output error"), after.stderr
    finally:
        gate.touch()


def test_a_dump_refuses_a_pid_no_longer_the_one_decided_on() -> None:
    """``live_dump(decided=...)``: the process the service decided on ended, so *pid* may be
    another's by now; nothing is inspected or frozen."""
    from criu_livedump.dump import live_dump
    from criu_livedump.errors import TargetError
    from criu_livedump.linux.pidfd import Pidfd
    from criu_livedump.request import build_request

    gone = procs.popen(["true"], stdin=subprocess.DEVNULL)
    decided = Pidfd(gone.pid)
    try:
        assert procs.wait_exit(gone, 30)
        with pytest.raises(TargetError, match="ended before its dump began"):
            live_dump(os.getpid(), build_request(), decided=decided)
    finally:
        decided.close()
        procs.kill_group(gone)

"""Real servers on 127.0.0.1 live-dumped mid-load: no client errors, the server keeps serving,
and each core opens in gdb with all threads."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import procs
import pytest
from harness.gdb import gdb_lwps

pytestmark = [pytest.mark.live, pytest.mark.slow]

EXE = Path(sys.executable).parent / "criu-livedump"


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU dump)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    procs.wait_for(listening, 60, f"a server listening on port {port}")


def dump(pid: int, out: Path) -> dict[str, object]:
    proc = procs.run([str(EXE), "dump", str(pid), "core_limit=unlimited", "-o", str(out), "--json"])
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def tids(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


class HttpLoad:
    """Keep-alive HTTP clients in threads, recording every error, until stopped."""

    def __init__(self, port: int, path: str = "/", clients: int = 4) -> None:
        self.port, self.path = port, path
        self.errors: list[str] = []
        self.done = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> HttpLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def wait_for(self, n: int) -> None:
        procs.wait_for(lambda: self.done >= n or self.errors, 120, f"{n} HTTP responses")

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while not self.stop.is_set():
                try:
                    conn.request("GET", self.path)
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                except Exception as e:
                    with self.lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    return
                with self.lock:
                    self.done += 1
        finally:
            conn.close()


def check_dumped_under_load(pid: int, exe: str, port: int, tmp_path: Path, path: str = "/") -> None:
    with HttpLoad(port, path) as load:
        load.wait_for(200)
        before = load.done
        threads = tids(pid)
        data = dump(pid, tmp_path / "core")
        after_dump = load.done
        load.wait_for(after_dump + 200)
    assert load.errors == []
    assert load.done > after_dump >= before  # kept serving after the dump
    assert gdb_lwps(exe, tmp_path / "core") == threads
    assert data["size"] == (tmp_path / "core").stat().st_size


@pytest.fixture
def server() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = procs.popen(argv, stdin=subprocess.DEVNULL, **kw)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            procs.kill_group(proc)


def test_python_http_server_keepalive(
    server: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello\n" * 100)
    code = (
        "import http.server, functools, sys\n"
        "http.server.SimpleHTTPRequestHandler.protocol_version = 'HTTP/1.1'\n"
        "http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None\n"
        "h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), h).serve_forever()\n"
    )
    proc = server([sys.executable, "-c", code, str(port), str(tmp_path / "www")])
    wait_listening(port, proc)
    check_dumped_under_load(proc.pid, sys.executable, port, tmp_path, "/index.html")


def test_nginx_under_load(server: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello\n" * 100)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off; master_process off; pid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\n"
        "events { worker_connections 64; }\n"
        "http { access_log off; keepalive_requests 100000;\n"
        f"  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;\n"
        f"  scgi_temp_path {tmp_path}/scgi;\n"
        f"  server {{ listen 127.0.0.1:{port}; root {tmp_path}/www; }} }}\n"
    )
    proc = server([nginx, "-c", str(conf), "-e", str(tmp_path / "error.log")])
    wait_listening(port, proc)
    check_dumped_under_load(proc.pid, nginx, port, tmp_path, "/index.html")


def test_redis_under_benchmark(
    server: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    redis = shutil.which("redis-server")
    bench = shutil.which("redis-benchmark")
    cli = shutil.which("redis-cli")
    if not (redis and bench and cli):
        pytest.skip("redis is not installed")
    port = free_port()
    proc = server(
        [
            redis,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--daemonize",
            "no",
            "--logfile",
            str(tmp_path / "redis.log"),
        ]
    )
    wait_listening(port, proc)

    def commands() -> int:
        info = procs.run([cli, "-p", str(port), "info", "stats"], text=True, check=True).stdout
        return int(info.split("total_commands_processed:")[1].split()[0])

    # -l: the benchmark loops until stopped, so the load cannot end before the dump
    log = tmp_path / "bench.log"
    with log.open("wb") as f:
        load = procs.popen(
            [bench, "-p", str(port), "-l", "-c", "8", "-q", "-t", "set,get"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        # mid-load: the benchmark has written keys
        procs.wait_for(
            lambda: (
                procs.run([cli, "-p", str(port), "dbsize"], text=True, check=True).stdout.strip()
                not in ("", "0")
            ),
            60,
            "redis-benchmark writing keys",
        )
        threads = tids(proc.pid)
        dump(proc.pid, tmp_path / "core")
        served = commands()
        procs.wait_for(lambda: commands() > served + 10000, 60, "10000 more commands served")
        assert load.poll() is None, log.read_text(errors="replace")
    finally:
        procs.kill_group(load)
    text = log.read_text(errors="replace")
    assert "error" not in text.lower(), text
    pong = procs.run([cli, "-p", str(port), "ping"], text=True, check=True).stdout.strip()
    assert pong == "PONG"
    assert gdb_lwps(redis, tmp_path / "core") == threads

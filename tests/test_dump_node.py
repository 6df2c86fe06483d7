"""node: V8 keeps the JavaScript heap in MADV_DONTFORK memory, which a fork (and so a clone
snapshot) does not copy. The clone method copies it from the frozen target, so the heap's
objects are in the core under both methods, and node keeps serving while it is dumped."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest
from harness.corefile import CoreView

pytestmark = [pytest.mark.live, pytest.mark.slow]

EXE = Path(sys.executable).parent / "criu-livedump"
#: built at run time so that the text is not in the script (argv, the source) itself
SERVER = """
const parts = ["crlv", "heap", String(6 * 7)];
let keep = [];
for (let i = 0; i < 20000; i++) keep.push(parts.join("-") + ":" + i);
keep = JSON.parse(JSON.stringify(keep));  // flat one-byte strings, not ropes
require("http").createServer((req, res) => res.end(String(keep.length)))
  .listen(Number(process.argv[1]), "127.0.0.1", () => console.log("ready"));
"""
MARKER = b"crlv-heap-42:"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    exe = shutil.which("node")
    if exe is None or os.geteuid() != 0:
        pytest.skip("needs node and root")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [exe, "-e", SERVER, str(port)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc, port
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _markers(core: Path) -> int:
    """Distinct ``crlv-heap-42:N`` strings in the core's memory."""
    found: set[bytes] = set()
    with CoreView(core) as view:
        for load in view.loads:
            if load.filesz:
                data = view.read(load.vaddr, load.filesz)
                at = data.find(MARKER)
                while at >= 0:
                    end = at + len(MARKER)
                    while end < len(data) and data[end : end + 1].isdigit():
                        end += 1
                    if end > at + len(MARKER):
                        found.add(data[at:end])
                    at = data.find(MARKER, end)
    return len(found)


@pytest.mark.parametrize("method", ["clone", "criu"])
def test_the_javascript_heap_is_in_the_core(
    node: tuple[subprocess.Popen[str], int], tmp_path: Path, method: str
) -> None:
    proc, port = node
    assert _get(port) == "20000"
    out = procs.run(
        [str(EXE), "dump", str(proc.pid), "--method", method, "--core-limit", "unlimited",
         "-o", str(tmp_path / "core"), "--json"],
        text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["method"] == method
    assert not [w for w in report["warnings"] if "MADV_DONTFORK" in w], report["warnings"]
    assert proc.poll() is None and _get(port) == "20000"
    assert _markers(tmp_path / "core") == 20000

"""Inside the arm64 guest: the clone snapshot's register conventions on a real arm64 kernel.

Runs the project's own converters/arch/aarch64.py and criu_livedump/linux/ptrace.py (imported
by path: the guest has no venv, and neither module needs one) on a child blocked in read(2):
seize and interrupt it, read NT_PRSTATUS (user_pt_regs), check the restart rewind the module
relies on (pc on the ``svc #0``, x0 = the first argument again, x8 = read's number), inject a
getpid() at that ``svc`` through ``syscall_regs``, check its result, restore the registers and
detach; the child then reads a byte written to it. Prints ``probe: ok`` or raises.
Usage: python3 guest-probe.py PROJECT_DIR
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
import types
from pathlib import Path

project = Path(sys.argv[1])
sys.path.insert(0, str(project))
# converters/__init__ imports the converter (pycriu): stand in bare packages for the two
# directories, so that only the modules used here are imported
for name in ("converters", "converters.arch"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(project / name.replace(".", "/"))]
    sys.modules[name] = pkg


def load(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


arm = load("converters.arch.aarch64")
from criu_livedump.linux import ptrace  # noqa: E402

NR_READ, NR_GETPID = 63, 172  # include/uapi/asm-generic/unistd.h


def wait_stop(pid: int) -> int:
    _, status = os.waitpid(pid, os.WUNTRACED | 0x40000000)  # __WALL
    assert os.WIFSTOPPED(status), hex(status)
    return status


def main() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os._exit(len(os.read(r, 1)))
    os.close(r)
    signal.alarm(60)
    time.sleep(0.5)  # let it block in read()
    ptrace.seize(pid)
    ptrace.interrupt(pid)
    wait_stop(pid)
    saved = ptrace.get_regs(pid)
    assert len(saved) == arm.USER_PT_REGS.size, len(saved)
    regs = arm.unpack_regs(saved)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(regs["pc"])
        at_pc = mem.read(4)
    # arm64's do_signal() rewound the interrupted read before this stop
    assert at_pc == arm.SVC_0, at_pc.hex()
    assert regs["x8"] == NR_READ and regs["x0"] == r, regs
    print(f"probe: stopped in read at pc {regs['pc']:#x}, rewound onto svc #0 (x0 = fd {r})")
    ptrace.set_regs(pid, arm.syscall_regs(saved, regs["pc"], NR_GETPID, ()))
    ptrace.syscall(pid)
    wait_stop(pid)  # entry
    ptrace.syscall(pid)
    wait_stop(pid)  # exit
    result = arm.syscall_result(ptrace.get_regs(pid))
    assert result == pid, (result, pid)
    print(f"probe: injected getpid() via svc #0 / x8 returned {result}")
    ptrace.set_regs(pid, arm.resume_regs(saved, False))
    ptrace.detach(pid)
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1, hex(status)
    print("probe: ok (the child resumed its read and got the byte)")


main()

"""``criu-livedump check``: can this host take live dumps, and how.

:func:`run_check` gathers one :class:`Item` per fact (CRIU binary, ``criu check``, dirty
tracking, privileges, core_pattern, core_uses_pid, scratch space, what the clone method's freeze
needs) and, for ``--pid PID``, what
the process is and which methods can dump it, each with its refusals (the very refusals
``dump`` applies before anything freezes). Items marked fatal mean live dumps cannot work here;
the CLI prints the report and then fails with the first fatal reason.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from criu_livedump import scratch, snapshot, target
from criu_livedump.errors import BlockerError, LivedumpError
from criu_livedump.linux import ptrace
from criu_livedump.linux.caps import CAP, capabilities, has_cap
from criu_livedump.linux.sched import realtime
from criu_livedump.request import Method
from criu_livedump.snapshot import criu


@dataclass(frozen=True)
class Item:
    """One line of the report.

    :param key: stable name (JSON key).
    :param text: the line a human reads.
    :param fatal: live dumps cannot work while this holds.
    :param data: the same facts for ``--json``.
    :param hint: what to do about a fatal item.
    """

    key: str
    text: str
    fatal: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    hint: str | None = None

    @property
    def label(self) -> str:
        return _LABELS.get(self.key, self.key)


_LABELS = {
    "criu_check": "criu check",
    "dirty_tracking": "dirty tracking",
    "clone_freeze": "clone freeze",
    "criu_probe": "CRIU's kernel probe",
    **{f"method_{m.value}": f"method {m.value}" for m in snapshot.METHODS},
}
_SETUP_HINT = "run `make setup`, or name a working binary with --criu PATH"


@dataclass(frozen=True)
class Report:
    items: tuple[Item, ...]

    @property
    def problems(self) -> list[str]:
        return [i.text for i in self.items if i.fatal]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def hint(self) -> str | None:
        """The hint of the first fatal item."""
        return next((i.hint for i in self.items if i.fatal), None)

    def lines(self) -> list[str]:
        return [f"{i.label}: {i.text}" for i in self.items]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {i.key: i.data for i in self.items}
        out["ok"] = self.ok
        out["problems"] = self.problems
        return out


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _criu_items(explicit: str | None) -> list[Item]:
    try:
        binary = criu.find(explicit)
    except LivedumpError as e:
        return [
            Item("criu", str(e), True, {"path": explicit, "error": str(e)}, e.hint or _SETUP_HINT)
        ]
    info: dict[str, Any] = {"path": str(binary.path), "source": binary.source}
    if binary.skipped:
        info["skipped"] = list(binary.skipped)
    try:
        ver = criu.version(binary)
    except LivedumpError as e:
        info["error"] = str(e)
        return [Item("criu", str(e), True, info, e.hint or _SETUP_HINT)]
    info["version"] = ver
    said = criu.support(ver)
    info["support"] = said.text
    info["tested"] = list(criu.TESTED_RELEASES)
    text = f"{binary.path} version {ver} ({binary.source}): {said.text}"
    items = [Item("criu", text, not said.usable, info, _SETUP_HINT)]

    try:
        result = criu.check(binary)
    except LivedumpError as e:
        failed = {"passed": False, "message": str(e)}
        return [*items, Item("criu_check", str(e), True, failed, e.hint or _SETUP_HINT)]
    if result.passed:
        check_text = f"passed ({result.message})"
    else:
        check_text = f"{binary.path}: `criu check` failed: {result.message}"
    items.append(
        Item(
            "criu_check",
            check_text,
            not result.passed,
            {"passed": result.passed, "message": result.message},
            _SETUP_HINT,
        )
    )
    dirty = result.passed and criu.feature(binary, "mem_dirty_track")
    dirty_text = (
        "available: pre-dump rounds shorten the freeze"
        if dirty
        else "unavailable (no soft-dirty tracking): no pre-dump rounds; the target stays frozen "
        "while CRIU copies all its memory"
    )
    items.append(Item("dirty_tracking", dirty_text, False, {"available": dirty, "pre_dump": dirty}))
    return items


def _privilege_item() -> Item:
    eff = capabilities()
    euid = os.geteuid()
    have = {c.name: has_cap(eff, c) for c in CAP}
    can_cr = have["CHECKPOINT_RESTORE"] or have["SYS_ADMIN"]
    data: dict[str, Any] = {"euid": euid, "root": euid == 0, "capabilities": have}
    who = "root" if euid == 0 else f"uid {euid}"
    if not can_cr:
        return Item(
            "privileges",
            f"{who} without CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN): CRIU cannot dump; "
            "live dumps need root or CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE",
            True,
            data,
            "run as root, or grant CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE",
        )
    parts = [who, "CAP_CHECKPOINT_RESTORE" if have["CHECKPOINT_RESTORE"] else "CAP_SYS_ADMIN"]
    notes = []
    if have["SYS_PTRACE"]:
        parts.append("CAP_SYS_PTRACE")
    else:
        notes.append("CAP_SYS_PTRACE missing: only your own processes can be dumped")
    if not have["SYS_RESOURCE"]:
        notes.append(
            "CAP_SYS_RESOURCE missing: targets of other users are dumped by running CRIU as "
            "their uid with ambient capabilities and --unprivileged"
        )
    data["notes"] = notes
    text = " + ".join(parts) + ("; " + "; ".join(notes) if notes else "")
    return Item("privileges", text, False, data)


def _clone_freeze_item() -> Item:
    """What the clone method's freeze needs: the ptrace batch helper (built by setup), and
    SCHED_FIFO for the tracer, without which the freeze of many threads is longer."""
    try:
        ptrace.check_helper()
        helper = None
    except ptrace.HelperMissingError as e:
        helper = e.strerror
    with realtime() as fifo:
        pass
    data: dict[str, Any] = {"helper": str(ptrace.HELPER), "helper_ok": helper is None}
    data["sched_fifo"] = fifo
    fifo_text = "SCHED_FIFO for the tracer" if fifo else "no SCHED_FIFO (a longer freeze)"
    if helper is not None:
        return Item("clone_freeze", f"the clone method cannot run: {helper}; {fifo_text}",
                    False, data, "run `make setup`")  # fmt: skip
    return Item("clone_freeze", f"ptrace batch helper built; {fifo_text}", False, data)


#: Where CRIU keeps its kernel probe between runs (KDAT_RUNDIR, /run unless built otherwise)
CRIU_RUNDIR = Path("/run")


def _criu_probe_item(rundir: Path = CRIU_RUNDIR) -> Item:
    """Whether CRIU can keep its probe of the kernel (kerndat) between runs: criu/kerndat.c
    writes its cache only on a tmpfs, so that it goes with the kernel at a reboot; elsewhere
    every CRIU run probes again (a network namespace and a veth pair among it: 40 ms here)."""
    kind = scratch.fstype(rundir)
    data: dict[str, Any] = {"rundir": str(rundir), "fstype": kind, "cached": kind == "tmpfs"}
    if kind == "tmpfs":
        return Item("criu_probe", f"kept between runs in {rundir} (tmpfs)", False, data)
    text = (
        f"probed again by every CRIU run: {rundir} is on {kind}, not a tmpfs, where alone CRIU"
        " keeps it (40 ms a dump here; systemd mounts /run as a tmpfs)"
    )
    return Item("criu_probe", text, False, data)


def _read_sysctl(name: str) -> str:
    try:
        return Path(f"/proc/sys/kernel/{name}").read_text().rstrip("\n")
    except OSError as e:
        return f"unreadable ({e.strerror})"


def _scratch_item() -> Item:
    data: dict[str, Any] = {}
    texts = []
    fatal = True
    for label, path in (("tmpfs", scratch.TMPFS_SCRATCH), ("disk", scratch.DISK_SCRATCH)):
        try:
            sp = scratch.space(path)
        except LivedumpError as e:
            data[label] = {"path": str(path), "error": str(e)}
            texts.append(f"{path} unusable ({e})")
            continue
        writable = os.access(path, os.W_OK | os.X_OK)
        data[label] = {**sp.as_dict(), "writable": writable}
        fatal = fatal and not writable
        state = "" if writable else ", not writable"
        texts.append(f"{path} ({sp.fstype}, {_gib(sp.free)} free{state})")
    text = f"{texts[0]} when the target's RSS fits with margin, else {texts[1]}"
    return Item("scratch", text, fatal, data, "make /var/tmp or /dev/shm writable")


def _process_item(facts: target.TargetFacts) -> Item:
    what = []
    if facts.pid_ns_init:
        what.append("the init of a child PID namespace (a container's main process)")
    elif facts.in_child_pid_ns:
        what.append(f"process {facts.ns_pid} of a child PID namespace (a container's process)")
    if facts.seccomp:
        what.append("under seccomp")
    if not facts.same_mnt_ns:
        what.append("in another mount namespace")
    text = f"{facts.pid} ({facts.comm})" + (": " + ", ".join(what) if what else "")
    data = {
        "pid": facts.pid,
        "comm": facts.comm,
        "ns_pid": facts.ns_pid,
        "pid_namespace_init": facts.pid_ns_init,
        "child_pid_namespace": facts.in_child_pid_ns,
        "seccomp": facts.seccomp,
        "same_mount_namespace": facts.same_mnt_ns,
    }
    return Item("process", text, False, data)


def _method_items(pid: int) -> list[Item]:
    """What process *pid* is and, one line per method, whether it can dump it and why not.

    :raises TargetError: no such process (or not one that can be dumped at all).
    """
    facts = target.inspect(pid, tree=True)
    try:
        target.check_ptrace_allowed(facts)
        access: tuple[str, ...] = ()
    except LivedumpError as e:
        access = (e.message,)
    items = [_process_item(facts)]
    refusals = {
        m: (*access, *cls.refusals(facts, tree=False)) for m, cls in snapshot.METHODS.items()
    }
    auto = None
    if not access:
        with contextlib.suppress(BlockerError):
            auto = snapshot.choose(Method.AUTO, facts).method
    for m, why in refusals.items():
        text = f"cannot dump process {pid}: " + "; ".join(why) if why else "can dump it"
        if m == auto:
            text += " (auto takes it)"
        data = {"can": not why, "refusals": list(why), "auto": m == auto}
        items.append(Item(f"method_{m.value}", text, auto is None, data))
    return items


def run_check(criu_path: str | None = None, pid: int | None = None) -> Report:
    """Gather the report; never raises for a problem of the host (those are fatal items).

    :param pid: also say which methods can dump this process (fatal when none can).
    :raises TargetError: *pid* names no process that could be dumped.
    """
    items = _criu_items(criu_path)
    items.append(_privilege_item())
    pattern = _read_sysctl("core_pattern")
    uses_pid = _read_sysctl("core_uses_pid")
    items.append(Item("core_pattern", pattern, False, {"value": pattern}))
    items.append(Item("core_uses_pid", uses_pid, False, {"value": uses_pid}))
    items.append(_scratch_item())
    items.append(_clone_freeze_item())
    items.append(_criu_probe_item())
    if pid is not None:
        items += _method_items(pid)
    return Report(tuple(items))

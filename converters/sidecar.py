"""``livedump.json``: the facts about a dump that CRIU's images lack, in one typed, versioned
file beside the images. :func:`write_sidecar` (the orchestrator, after CRIU ran) and
:func:`read_sidecar` (the converter) are the only code that opens it.

Versions:

- 1 (no ``version`` field): the loose JSON written before issue 10. Its ``pid`` was written
  and never read, and is ignored; its ``xsave_layout`` is ``cpu_layout``.
- 2: :class:`Sidecar` as :meth:`Sidecar.to_json` writes it; an unknown field is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from converters.errors import ImageFormatError

SIDECAR_NAME: Final = "livedump.json"
VERSION: Final = 2
#: fields of version 1 files that nothing reads (see the module docstring)
_V1_IGNORED: Final = frozenset({"pid"})
_V1_RENAMED: Final = {"xsave_layout": "cpu_layout"}
#: largest pid_t (NT_PRSTATUS/NT_PRPSINFO hold it as an int)
_PID_MAX: Final = 0x7FFFFFFF
#: si_signo is an int in the notes; a real signal number is 1.._NSIG (64) on Linux
_NSIG: Final = 64
_U64: Final = (1 << 64) - 1


@dataclass(frozen=True)
class DontFork:
    """An MADV_DONTFORK area a clone snapshot could not see, the images lack it.

    :ivar has_bytes: the target had bytes there (named in a warning, as they are missing).
    """

    start: int
    end: int
    perms: str
    has_bytes: bool = True


@dataclass(frozen=True)
class Sidecar:
    """Facts recorded at dump time by the orchestrator (each optional).

    :ivar coredump_filter: the target's /proc/PID/coredump_filter.
    :ivar core_limit: RLIMIT_CORE in bytes, -1 for unlimited.
    :ivar signal: si_signo of the notes.
    :ivar ppid: the real parent (CRIU records 0 for the root of the dumped tree).
    :ivar boot_id: the dumping host's /proc/sys/kernel/random/boot_id (:mod:`converters.origin`
        tells this host's images from another's by it).
    :ivar thread_times: (utime, stime) in µs by thread id, the leader's being the group total
        (fill_prstatus()).
    :ivar children_times: (cutime, cstime) in µs.
    :ivar cpu_layout: the dumping CPU's layout record (:mod:`converters.arch`), a JSON object.
    :ivar sysv_keys: the key of each SysV segment a clone snapshot put back, by shmid.
    :ivar no_saved_pages: (start, end) of private file VMAs whose saved pages are an artifact of
        a clone snapshot (CRIU's own syscall patch), not the target's.
    :ivar dontfork: MADV_DONTFORK areas absent from a clone snapshot.
    :ivar wipeonfork: (start, end) of MADV_WIPEONFORK areas a clone snapshot sees as zeros.
    """

    coredump_filter: int | None = None
    core_limit: int | None = None
    signal: int | None = None
    ppid: int | None = None
    boot_id: str | None = None
    thread_times: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    children_times: tuple[int, int] = (0, 0)
    cpu_layout: Mapping[str, Any] | None = None
    sysv_keys: Mapping[int, int] = field(default_factory=dict)
    no_saved_pages: tuple[tuple[int, int], ...] = ()
    dontfork: tuple[DontFork, ...] = ()
    wipeonfork: tuple[tuple[int, int], ...] = ()

    def times(self, tid: int) -> tuple[int, int, int, int]:
        """pr_utime, pr_stime, pr_cutime, pr_cstime of thread *tid* in µs (zeros unknown)."""
        return (*self.thread_times.get(tid, (0, 0)), *self.children_times)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object (version :data:`VERSION`)."""
        out: dict[str, Any] = {"version": VERSION}
        for key in ("coredump_filter", "core_limit", "signal", "ppid"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.thread_times or self.children_times != (0, 0):
            times: dict[str, list[int]] = {str(t): list(v) for t, v in self.thread_times.items()}
            out["times"] = {**times, "children": list(self.children_times)}
        if self.boot_id is not None:
            out["boot_id"] = self.boot_id
        if self.cpu_layout is not None:
            out["cpu_layout"] = dict(self.cpu_layout)
        if self.sysv_keys:
            out["sysv_keys"] = {str(k): v for k, v in self.sysv_keys.items()}
        out["no_saved_pages"] = [list(r) for r in self.no_saved_pages]
        out["dontfork"] = [[d.start, d.end, d.perms, d.has_bytes] for d in self.dontfork]
        out["wipeonfork"] = [list(r) for r in self.wipeonfork]
        return out


def write_sidecar(images_dir: Path, sidecar: Sidecar) -> None:
    """Write ``livedump.json`` into *images_dir* (atomically: a reader sees all or nothing)."""
    tmp = images_dir / (SIDECAR_NAME + ".tmp")
    tmp.write_text(json.dumps(sidecar.to_json(), indent=1, sort_keys=True))
    os.replace(tmp, images_dir / SIDECAR_NAME)


def read_sidecar(images_dir: Path) -> Sidecar:
    """Read ``livedump.json`` from *images_dir*; an absent file gives an empty :class:`Sidecar`.

    :raises ImageFormatError: the file exists but is not a sidecar of a known version; the
        message names the file and the field.
    """
    path = images_dir / SIDECAR_NAME
    data = _load(path)
    if not isinstance(data, dict):
        return Sidecar()
    return _Reader(str(path), data).sidecar()


def _load(path: Path) -> object:
    """The file's JSON value, None when there is no file."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ImageFormatError(str(path), os.strerror(e.errno or 0)) from e
    except UnicodeDecodeError as e:
        raise ImageFormatError(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ImageFormatError(str(path), f"not JSON: {e}") from e
    except RecursionError as e:  # deeply nested arrays: json's recursive decoder gives up
        raise ImageFormatError(str(path), "not JSON: nested too deeply") from e
    if not isinstance(data, dict):
        raise ImageFormatError(str(path), "not a JSON object")
    return data


class _Reader:
    """One file's fields, each checked for its type and range."""

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        version = data.pop("version", 1)
        if version not in (1, VERSION) or isinstance(version, bool):
            raise ImageFormatError(
                path, f"version {version!r} is not supported (this converter reads 1 and 2)"
            )
        if version == 1:
            for old, new in _V1_RENAMED.items():
                if old in data and new not in data:
                    data[new] = data.pop(old)
            data = {k: v for k, v in data.items() if k not in _V1_IGNORED and k in _FIELDS}
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ImageFormatError(path, f"unknown field {unknown[0]!r} in version {version}")
        self.data = data

    def fail(self, key: str, problem: str) -> ImageFormatError:
        return ImageFormatError(self.path, f"{key} {problem}")

    def sidecar(self) -> Sidecar:
        fields = {k: parse(self, self.data[k]) for k, parse in _FIELDS.items() if k in self.data}
        times = fields.pop("times", None)
        if times is not None:
            fields["thread_times"], fields["children_times"] = times
        return Sidecar(**fields)

    def integer(self, key: str, value: object, lo: int = -(1 << 63), hi: int = _U64) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "is not an integer")
        if not lo <= value <= hi:
            raise self.fail(key, f"{value} out of range")
        return value

    def array(self, key: str, value: object, size: int | None = None) -> list[Any]:
        if not isinstance(value, list) or (size is not None and len(value) != size):
            what = "an array" if size is None else f"an array of {size}"
            raise self.fail(key, f"is not {what}")
        return value

    def ranges(self, key: str, value: object) -> tuple[tuple[int, int], ...]:
        out = []
        for i, r in enumerate(self.array(key, value)):
            lo, hi = self.array(f"{key}[{i}]", r, 2)
            out.append((self.integer(f"{key}[{i}]", lo, 0), self.integer(f"{key}[{i}]", hi, 0)))
        return tuple(out)


def _opt_int(lo: int, hi: int) -> Callable[[_Reader, str, object], int | None]:
    def parse(r: _Reader, key: str, value: object) -> int | None:
        return None if value is None else r.integer(key, value, lo, hi)

    return parse


def _times(r: _Reader, value: object) -> tuple[dict[int, tuple[int, int]], tuple[int, int]]:
    if not isinstance(value, dict):
        raise r.fail("times", "is not an object")
    threads: dict[int, tuple[int, int]] = {}
    children = (0, 0)
    for k, v in value.items():
        key = f"times[{k!r}]"
        u, s = (r.integer(key, x, 0) for x in r.array(key, v, 2))
        if k == "children":
            children = (u, s)
        elif isinstance(k, str) and k.isdigit():
            threads[int(k)] = (u, s)
        else:
            raise r.fail(key, "is not a thread id")
    return threads, children


def _boot_id(r: _Reader, value: object) -> str:
    if not isinstance(value, str):
        raise r.fail("boot_id", "is not a string")
    return value


def _cpu_layout(r: _Reader, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise r.fail("cpu_layout", "is not an object")
    return value


def _sysv_keys(r: _Reader, value: object) -> dict[int, int]:
    if not isinstance(value, dict):
        raise r.fail("sysv_keys", "is not an object")
    out = {}
    for k, v in value.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise r.fail(f"sysv_keys[{k!r}]", "is not a shmid")
        out[int(k)] = r.integer(f"sysv_keys[{k!r}]", v) & 0xFFFFFFFF
    return out


def _dontfork(r: _Reader, value: object) -> tuple[DontFork, ...]:
    out = []
    for i, entry in enumerate(r.array("dontfork", value)):
        key = f"dontfork[{i}]"
        items = r.array(key, entry)
        if len(items) not in (3, 4) or not isinstance(items[2], str):
            raise r.fail(key, "is not [start, end, perms] or [start, end, perms, has_bytes]")
        start, end = r.integer(key, items[0], 0), r.integer(key, items[1], 0)
        has_bytes = items[3] if len(items) == 4 else True
        if not isinstance(has_bytes, bool):
            raise r.fail(key, "has_bytes is not a boolean")
        out.append(DontFork(start, end, items[2], has_bytes))
    return tuple(out)


#: each field's parser, by its JSON key
_FIELDS: Final[dict[str, Callable[[_Reader, Any], Any]]] = {
    "coredump_filter": lambda r, v: _opt_int(0, _U64)(r, "coredump_filter", v),
    "core_limit": lambda r, v: _opt_int(-1, _U64)(r, "core_limit", v),
    "signal": lambda r, v: _opt_int(0, _NSIG)(r, "signal", v),
    "ppid": lambda r, v: _opt_int(0, _PID_MAX)(r, "ppid", v),
    "boot_id": _boot_id,
    "times": _times,
    "cpu_layout": _cpu_layout,
    "sysv_keys": _sysv_keys,
    "no_saved_pages": lambda r, v: r.ranges("no_saved_pages", v),
    "dontfork": _dontfork,
    "wipeonfork": lambda r, v: r.ranges("wipeonfork", v),
}

"""What the user asked for: the livedump SPEC words and the CLI flags, parsed and validated.

The SPEC syntax is the kernel livedump patch's (``echo "core_limit=unlimited sched_prio=19" >
/proc/PID/livedump``): ``core_limit=<n>|unlimited``, ``sched_prio=<n>`` (nice), ``io_prio=<n>``
(best-effort level, class kept) and ``oom_adj=<n>`` (the legacy /proc/PID/oom_adj scale). CLI
flags say the same things with richer syntax and win over SPEC words. :func:`build_request`
returns one frozen :class:`DumpRequest`; :func:`check_privileges` refuses what the caller's
capabilities would not allow, before anything touches the target.
"""

from __future__ import annotations

import enum
import os
import re
import signal as signal_mod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard, TypeVar

from converters.options import UNLIMITED
from criu_livedump.errors import PermissionDeniedError, RequestError
from criu_livedump.linux.caps import CAP, capabilities, has_cap

__all__ = [
    "NICE_MAX",
    "NICE_MIN",
    "OOM_ADJUST_MAX",
    "OOM_DISABLE",
    "OOM_SCORE_ADJ_MAX",
    "OOM_SCORE_ADJ_MIN",
    "UNLIMITED",
    "CaptureNice",
    "DumpRequest",
    "IoClass",
    "IoPrio",
    "Method",
    "SpecValues",
    "build_request",
    "capture_nice",
    "check_privileges",
    "oom_adj_to_score_adj",
    "parse_coredump_filter",
    "parse_io_prio",
    "parse_oom_adj",
    "parse_signal",
    "parse_size",
    "parse_spec",
]

#: Nice range (include/linux/sched/prio.h MIN_NICE / MAX_NICE).
NICE_MIN, NICE_MAX = -20, 19
#: Best-effort and real-time I/O priority levels (include/uapi/linux/ioprio.h IOPRIO_NR_LEVELS).
IOPRIO_LEVEL_MAX = 7
#: The legacy /proc/PID/oom_adj scale (include/uapi/linux/oom.h).
OOM_DISABLE, OOM_ADJUST_MIN, OOM_ADJUST_MAX = -17, -16, 15
OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_MAX = -1000, 1000
#: MMF_DUMP_FILTER_BITS is 9 (include/linux/sched/coredump.h): bits 0..8 of coredump_filter.
COREDUMP_FILTER_MAX = (1 << 9) - 1
#: Pre-dump rounds beyond this only add freezes without shrinking the final one further.
PRE_DUMP_MAX = 10
#: --timeout's upper bound in seconds (a week: beyond it a limit means nothing).
TIMEOUT_MAX = 7 * 24 * 3600
_SIZE_MAX = (1 << 63) - 1


class IoClass(enum.IntEnum):
    """I/O scheduling classes (include/uapi/linux/ioprio.h IOPRIO_CLASS_*)."""

    NONE = 0
    RT = 1
    BE = 2
    IDLE = 3


class Method(enum.StrEnum):
    """How the memory image is taken: CRIU, the clone snapshot (with pre-copy rounds), or the
    best available."""

    AUTO = "auto"
    CRIU = "criu"
    CLONE = "clone"
    PRECOPY = "precopy"


@dataclass(frozen=True)
class IoPrio:
    """An I/O priority to apply with ioprio_set(2).

    :param ioclass: the class; None keeps the process's current class, as the SPEC's
        ``io_prio=<n>`` does in the kernel patch.
    :param level: 0 (highest) .. 7; 0 and ignored for :attr:`IoClass.IDLE`.
    """

    ioclass: IoClass | None
    level: int

    def value(self, current_class: IoClass = IoClass.BE) -> int:
        """The ioprio_set(2) argument, as include/uapi/linux/ioprio.h IOPRIO_PRIO_VALUE() builds it.

        :param current_class: the class to keep when :attr:`ioclass` is None; a process that
            never set one (``IOPRIO_CLASS_NONE``) is best-effort to the scheduler.
        """
        cls = self.ioclass
        if cls is None:
            cls = IoClass.BE if current_class == IoClass.NONE else current_class
        level = 0 if cls == IoClass.IDLE else self.level
        return (int(cls) << 13) | level


@dataclass(frozen=True)
class SpecValues:
    """The SPEC words as the kernel patch reads them; None where a key was not given.

    :param core_limit: bytes, or :data:`UNLIMITED`.
    :param sched_prio: nice value.
    :param io_prio: best-effort level (the class is kept).
    :param oom_adj: legacy oom_adj value, not yet mapped to oom_score_adj.
    """

    core_limit: int | None = None
    sched_prio: int | None = None
    io_prio: int | None = None
    oom_adj: int | None = None


@dataclass(frozen=True)
class DumpRequest:
    """One validated live-dump request; flags have already overridden SPEC words.

    :param core_limit: RLIMIT_CORE semantics in bytes, :data:`UNLIMITED`, or None for "the
        target's own soft limit".
    :param sched_prio: nice value for CRIU and the conversion child; None leaves it alone.
    :param io_prio: I/O priority for the same; None leaves it alone.
    :param oom_score_adj: oom_score_adj for the conversion child (legacy oom_adj already mapped).
    :param output: a path, ``"-"`` for stdout, or None for the target's core_pattern.
    :param scratch: parent directory for CRIU's images; None chooses one.
    :param coredump_filter: MMF_DUMP_* mask; None means the target's own.
    :param pre_dump: number of pre-dump rounds; None means automatic.
    :param signal: si_signo recorded in the core (and %s); None means the dumper's default.
    :param timeout: the whole dump's time limit in seconds; None means the default, which grows
        with the target's size (:func:`criu_livedump.snapshot.criu.default_timeout`).
    """

    core_limit: int | None = None
    sched_prio: int | None = None
    io_prio: IoPrio | None = None
    oom_score_adj: int | None = None
    output: str | None = None
    scratch: Path | None = None
    keep_images: bool = False
    coredump_filter: int | None = None
    pre_dump: int | None = None
    signal: int | None = None
    force: bool = False
    tree: bool = False
    method: Method = Method.AUTO
    timeout: int | None = None


# --- numbers ---------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_SIZE_RE = re.compile(r"([0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\Z")
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def _int_in_range(text: str, lo: int, hi: int, what: str, culprit: str) -> int:
    """Parse a decimal integer in ``lo..hi`` or raise RequestError naming *culprit*."""
    if not _INT_RE.match(text.strip()):
        raise RequestError(f"{culprit}: {what} must be an integer in {lo}..{hi}")
    value = int(text)
    if not lo <= value <= hi:
        raise RequestError(f"{culprit}: {what} {value} is out of range (valid: {lo}..{hi})")
    return value


def parse_size(text: str, culprit: str) -> int:
    """Parse a core limit: bytes with an optional k/M/G/T suffix (powers of 1024), or
    ``unlimited`` (also ``infinity``, ``-1``), which gives :data:`UNLIMITED`.

    :raises RequestError: anything else, naming *culprit*.
    """
    word = text.strip()
    if word.lower() in ("unlimited", "infinity", "-1"):
        return UNLIMITED
    m = _SIZE_RE.match(word)
    if not m:
        raise RequestError(
            f"{culprit}: core limit must be a byte count (suffixes k, M, G, T) or 'unlimited'"
        )
    value = int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]
    if value > _SIZE_MAX:
        raise RequestError(f"{culprit}: core limit {word} is out of range (valid: 0..2^63-1)")
    return value


def oom_adj_to_score_adj(oom_adj: int) -> int:
    """Map a legacy oom_adj value to oom_score_adj exactly as fs/proc/base.c:oom_adj_write() does.

    OOM_ADJUST_MAX (15) maps to OOM_SCORE_ADJ_MAX (1000); everything else is scaled by
    1000/17 with C's truncation toward zero, so -17 (OOM_DISABLE) gives -1000 and 14 gives 823.

    :raises RequestError: outside -17..15 (the kernel's -EINVAL).
    """
    if not OOM_DISABLE <= oom_adj <= OOM_ADJUST_MAX:
        raise RequestError(
            f"oom_adj {oom_adj} is out of range (valid: {OOM_DISABLE}..{OOM_ADJUST_MAX})"
        )
    if oom_adj == OOM_ADJUST_MAX:
        return OOM_SCORE_ADJ_MAX
    scaled = abs(oom_adj) * OOM_SCORE_ADJ_MAX // -OOM_DISABLE
    return -scaled if oom_adj < 0 else scaled


def parse_oom_adj(text: str, culprit: str) -> int:
    """Parse ``--oom-adj``: ``N`` on the legacy -17..15 scale or ``score:N`` (-1000..1000).

    :returns: the oom_score_adj value.
    :raises RequestError: bad syntax or range, naming *culprit*.
    """
    word = text.strip()
    if word.lower().startswith("score:"):
        return _int_in_range(
            word[6:], OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_MAX, "oom_score_adj", culprit
        )
    legacy = _int_in_range(word, OOM_DISABLE, OOM_ADJUST_MAX, "legacy oom_adj", culprit)
    return oom_adj_to_score_adj(legacy)


def parse_io_prio(text: str, culprit: str) -> IoPrio:
    """Parse ``--io-prio``: ``N`` (best-effort level, class kept), ``idle``, ``be:N``, ``rt:N``.

    :raises RequestError: bad syntax or level, naming *culprit*.
    """
    word = text.strip().lower()
    if word == "idle":
        return IoPrio(IoClass.IDLE, 0)
    classes = {"be": IoClass.BE, "rt": IoClass.RT}
    name, sep, level = word.partition(":")
    if sep:
        if name not in classes:
            raise RequestError(
                f"{culprit}: unknown I/O class {name!r} (valid: N, idle, be:N, rt:N with N 0..7)"
            )
        return IoPrio(classes[name], _int_in_range(level, 0, IOPRIO_LEVEL_MAX, "level", culprit))
    if not _INT_RE.match(word):
        raise RequestError(f"{culprit}: I/O priority must be N, idle, be:N or rt:N (N 0..7)")
    return IoPrio(None, _int_in_range(word, 0, IOPRIO_LEVEL_MAX, "I/O priority level", culprit))


def parse_coredump_filter(text: str, culprit: str) -> int:
    """Parse a coredump_filter mask in hex, with or without ``0x``, as /proc/PID/coredump_filter
    prints it.

    :raises RequestError: not hex, or bits beyond MMF_DUMP_FILTER_BITS (0..0x1ff).
    """
    word = text.strip().lower().removeprefix("0x")
    if not word or any(c not in "0123456789abcdef" for c in word):
        raise RequestError(f"{culprit}: coredump filter must be a hex mask in 0x0..0x1ff")
    value = int(word, 16)
    if value > COREDUMP_FILTER_MAX:
        raise RequestError(
            f"{culprit}: coredump filter {value:#x} is out of range (valid: 0x0..0x1ff)"
        )
    return value


def parse_signal(text: str, culprit: str) -> int:
    """Parse a signal as a number (0..SIGRTMAX) or a name (``SIGQUIT``, ``quit``).

    :raises RequestError: unknown name or out-of-range number.
    """
    word = text.strip()
    hi = int(signal_mod.SIGRTMAX)
    if _INT_RE.match(word):
        return _int_in_range(word, 0, hi, "signal", culprit)
    name = word.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal_mod.Signals[name])
    except KeyError:
        raise RequestError(
            f"{culprit}: unknown signal {word!r} (valid: a name like SIGQUIT or 0..{hi})"
        ) from None


# --- SPEC ------------------------------------------------------------------------------------

_SPEC_KEYS = ("core_limit", "sched_prio", "io_prio", "oom_adj")


def parse_spec(words: Sequence[str]) -> SpecValues:
    """Parse livedump SPEC words (``key=value``; a word may hold several, space separated).

    An empty SPEC is valid and gives all-None values.

    :raises RequestError: unknown key, malformed word, repeated key, bad number or range; the
        message quotes the word and the valid range.
    """
    values: dict[str, int] = {}
    for word in (w for chunk in words for w in chunk.split()):
        culprit = f"SPEC word {word!r}"
        key, sep, text = word.partition("=")
        if not sep:
            raise RequestError(f"{culprit}: expected key=value (keys: {', '.join(_SPEC_KEYS)})")
        if key not in _SPEC_KEYS:
            raise RequestError(f"{culprit}: unknown key {key!r} (keys: {', '.join(_SPEC_KEYS)})")
        if key in values:
            raise RequestError(f"{culprit}: {key} given twice")
        if key == "core_limit":
            values[key] = parse_size(text, culprit)
        elif key == "sched_prio":
            values[key] = _int_in_range(text, NICE_MIN, NICE_MAX, "nice value", culprit)
        elif key == "io_prio":
            values[key] = _int_in_range(text, 0, IOPRIO_LEVEL_MAX, "I/O priority level", culprit)
        else:
            values[key] = _int_in_range(
                text, OOM_DISABLE, OOM_ADJUST_MAX, "legacy oom_adj", culprit
            )
    return SpecValues(**values)


# --- flags -----------------------------------------------------------------------------------

FlagValue = str | int | bool | Path | None

_FLAG_NAMES = (
    "core_limit",
    "sched_prio",
    "io_prio",
    "oom_adj",
    "output",
    "scratch",
    "keep_images",
    "coredump_filter",
    "pre_dump",
    "signal",
    "force",
    "tree",
    "method",
    "timeout",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _text(value: FlagValue) -> str:
    return str(value)


def build_request(spec_words: Sequence[str] = (), **flags: FlagValue) -> DumpRequest:
    """Combine SPEC words and CLI flags into a :class:`DumpRequest` (flags win).

    Flags (None or absent means "not given"): ``core_limit`` (bytes with k/M/G/T suffix or
    ``unlimited``), ``sched_prio`` (nice), ``io_prio`` (``N``, ``idle``, ``be:N``, ``rt:N``),
    ``oom_adj`` (``N`` legacy or ``score:N``), ``output``, ``scratch``, ``keep_images``,
    ``coredump_filter`` (hex), ``pre_dump``, ``signal``, ``force``, ``tree``, ``method``
    (auto, criu, clone), ``timeout`` (seconds).

    :raises RequestError: an unknown flag name, or any bad SPEC word or flag value.
    """
    unknown = sorted(set(flags) - set(_FLAG_NAMES))
    if unknown:
        raise RequestError(f"unknown option {_flag(unknown[0])}")
    spec = parse_spec(spec_words)
    given: Mapping[str, FlagValue] = {k: v for k, v in flags.items() if v is not None}
    spec_io = IoPrio(None, spec.io_prio) if spec.io_prio is not None else None
    spec_oom = oom_adj_to_score_adj(spec.oom_adj) if spec.oom_adj is not None else None
    # keyword arguments are evaluated in order: the first bad flag in this order is reported
    return DumpRequest(
        core_limit=_given(given, "core_limit", _core_limit_flag, spec.core_limit),
        sched_prio=_given(given, "sched_prio", _sched_prio_flag, spec.sched_prio),
        io_prio=_given(given, "io_prio", _io_prio_flag, spec_io),
        oom_score_adj=_given(given, "oom_adj", _oom_adj_flag, spec_oom),
        coredump_filter=_given(given, "coredump_filter", _coredump_filter_flag, None),
        pre_dump=_given(given, "pre_dump", _pre_dump_flag, None),
        timeout=_given(given, "timeout", _timeout_flag, None),
        signal=_given(given, "signal", _signal_flag, None),
        method=_given(given, "method", _method_flag, Method.AUTO),
        output=_given(given, "output", _output_flag, None),
        scratch=Path(_text(given["scratch"])) if "scratch" in given else None,
        keep_images=bool(given.get("keep_images", False)),
        force=bool(given.get("force", False)),
        tree=bool(given.get("tree", False)),
    )


_T = TypeVar("_T")


def _given(
    given: Mapping[str, FlagValue], name: str, parse: Callable[[FlagValue], _T], default: _T
) -> _T:
    """Flag *name* parsed, or *default* (the SPEC word's value, or none) when not given."""
    return parse(given[name]) if name in given else default


def _is_int(v: FlagValue) -> TypeGuard[int]:
    """An int given by a library caller (bool is no number here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _core_limit_flag(v: FlagValue) -> int:
    flag = _flag("core_limit")
    if _is_int(v):
        return _checked_int(v, 0, _SIZE_MAX, "core limit", flag, allow=UNLIMITED)
    return parse_size(_text(v), f"{flag} {v}")


def _sched_prio_flag(v: FlagValue) -> int:
    return _int_flag(v, NICE_MIN, NICE_MAX, "nice value", "sched_prio")


def _io_prio_flag(v: FlagValue) -> IoPrio:
    if _is_int(v):
        return IoPrio(None, _checked_int(v, 0, IOPRIO_LEVEL_MAX, "level", _flag("io_prio")))
    return parse_io_prio(_text(v), f"{_flag('io_prio')} {v}")


def _oom_adj_flag(v: FlagValue) -> int:
    if _is_int(v):
        legacy = _checked_int(v, OOM_DISABLE, OOM_ADJUST_MAX, "legacy oom_adj", "--oom-adj")
        return oom_adj_to_score_adj(legacy)
    return parse_oom_adj(_text(v), f"--oom-adj {v}")


def _coredump_filter_flag(v: FlagValue) -> int:
    if _is_int(v):
        return _checked_int(v, 0, COREDUMP_FILTER_MAX, "coredump filter", "--coredump-filter")
    return parse_coredump_filter(_text(v), f"--coredump-filter {v}")


def _pre_dump_flag(v: FlagValue) -> int:
    return _int_flag(v, 0, PRE_DUMP_MAX, "pre-dump rounds", "pre_dump")


def _timeout_flag(v: FlagValue) -> int:
    return _int_flag(v, 1, TIMEOUT_MAX, "number of seconds", "timeout")


def _signal_flag(v: FlagValue) -> int:
    if _is_int(v):
        return _checked_int(v, 0, int(signal_mod.SIGRTMAX), "signal", "--signal")
    return parse_signal(_text(v), f"--signal {v}")


def _method_flag(v: FlagValue) -> Method:
    text = _text(v).strip().lower()
    try:
        return Method(text)
    except ValueError:
        valid = ", ".join(m.value for m in Method)
        raise RequestError(f"--method {text}: unknown method (valid: {valid})") from None


def _output_flag(v: FlagValue) -> str:
    output = _text(v)
    if not output:
        raise RequestError("--output: empty path (use - for stdout)")
    return output


def _checked_int(
    value: int, lo: int, hi: int, what: str, flag: str, *, allow: int | None = None
) -> int:
    if value == allow:
        return value
    if not lo <= value <= hi:
        raise RequestError(f"{flag} {value}: {what} {value} is out of range (valid: {lo}..{hi})")
    return value


def _int_flag(value: FlagValue, lo: int, hi: int, what: str, name: str) -> int:
    flag = _flag(name)
    if _is_int(value):
        return _checked_int(value, lo, hi, what, flag)
    return _int_in_range(_text(value), lo, hi, what, f"{flag} {value}")


# --- the capture's priority -----------------------------------------------------------------

#: How far below the target's nice the capture runs when the request names no ``sched_prio``.
#: The target's threads keep running during a clone's or a streamed capture, and a busy target
#: at the same nice outnumbers CRIU and the stream's writer: 1 GiB to disk beside 4 busy
#: threads on 2 cores (the same session) took 1.7-1.9 s at its nice, 1.0-1.1 s at 5 below,
#: 0.9-1.05 s at 10 below, 0.9 s at 19 below (gcore, which stops the target, 0.8 s); its
#: heartbeat was late by 10-23 ms (the freeze included) down to 10 below, once 76 ms at 19.
CAPTURE_NICE_BELOW_TARGET = 10


@dataclass(frozen=True)
class CaptureNice:
    """The nice the capture runs at (CRIU, the stream's writer, the conversion, and the CLI's own
    process), and why: ``requested`` (``sched_prio``), ``default`` (the target's nice minus
    :data:`CAPTURE_NICE_BELOW_TARGET`, at least -20) or ``own`` (the caller's own nice, when the
    default is below it and the caller lacks CAP_SYS_NICE)."""

    nice: int
    source: str

    def describe(self) -> str:
        """One line for ``-v``."""
        if self.source == "own":
            return (
                f"capture at nice {self.nice}, the caller's own: running it below the target's"
                " needs CAP_SYS_NICE"
            )
        return f"capture at nice {self.nice} ({self.source})"


def capture_nice(
    requested: int | None, target_nice: int, *, own_nice: int | None = None, caps: int | None = None
) -> CaptureNice:
    """The one rule for the capture's nice: *requested* (``sched_prio``) wins; else the target's
    nice minus :data:`CAPTURE_NICE_BELOW_TARGET` (floored at :data:`NICE_MIN`), or the caller's
    own nice when that default is below it and the caller lacks CAP_SYS_NICE (setpriority(2)
    refuses to lower a nice without it: kernel/sys.c set_one_prio(), can_nice()).

    :param own_nice: the calling thread's nice; read with getpriority(2) when None.
    :param caps: the caller's effective capabilities; read from /proc/self/status when None.
    """
    if requested is not None:
        return CaptureNice(requested, "requested")
    default = max(NICE_MIN, target_nice - CAPTURE_NICE_BELOW_TARGET)
    own = os.getpriority(os.PRIO_PROCESS, 0) if own_nice is None else own_nice
    if default < own and not has_cap(capabilities() if caps is None else caps, CAP.SYS_NICE):
        return CaptureNice(own, "own")
    return CaptureNice(default, "default")


# --- privileges ------------------------------------------------------------------------------


def _own_oom_score_adj() -> int:
    return int(Path("/proc/self/oom_score_adj").read_text())


def check_privileges(
    request: DumpRequest,
    *,
    target_core_hard: int,
    caps: int | None = None,
    own_oom_score_adj: int | None = None,
) -> None:
    """Refuse what the caller's capabilities would not allow, like the kernel patch does.

    - nice below 0 needs CAP_SYS_NICE (the patch's rule; setpriority(2) would also honour
      RLIMIT_NICE, which the patch does not consult);
    - a core limit above the target's hard RLIMIT_CORE needs CAP_SYS_RESOURCE (as
      kernel/sys.c:do_prlimit() demands for raising a hard limit);
    - the real-time I/O class needs CAP_SYS_NICE or CAP_SYS_ADMIN (block/ioprio.c:
      ioprio_check_cap());
    - an oom_score_adj below 0 and below the caller's own needs CAP_SYS_RESOURCE
      (fs/proc/base.c:__set_oom_adj() compares with oom_score_adj_min, which /proc does not show;
      the caller's own value is the safe stand-in).

    :param target_core_hard: the target's hard RLIMIT_CORE (:data:`UNLIMITED` for none).
    :param caps: the caller's effective capabilities; read from /proc/self/status when None.
    :raises PermissionDeniedError: one sentence naming the option and the capability.
    """
    eff = capabilities() if caps is None else caps

    def has(cap: CAP) -> bool:
        return has_cap(eff, cap)

    if request.sched_prio is not None and request.sched_prio < 0 and not has(CAP.SYS_NICE):
        raise PermissionDeniedError(
            f"sched_prio={request.sched_prio}: a nice value below 0 needs CAP_SYS_NICE",
            hint="use a nice value of 0..19",
        )
    limit = request.core_limit
    if (
        limit is not None
        and target_core_hard != UNLIMITED
        and (limit == UNLIMITED or limit > target_core_hard)
        and not has(CAP.SYS_RESOURCE)
    ):
        shown = "unlimited" if limit == UNLIMITED else str(limit)
        raise PermissionDeniedError(
            f"core_limit={shown}: above the target's hard RLIMIT_CORE ({target_core_hard} bytes),"
            " which needs CAP_SYS_RESOURCE",
            hint=f"ask for at most {target_core_hard} bytes",
        )
    io = request.io_prio
    if (
        io is not None
        and io.ioclass == IoClass.RT
        and not (has(CAP.SYS_NICE) or has(CAP.SYS_ADMIN))
    ):
        raise PermissionDeniedError(
            "io_prio rt: the real-time I/O class needs CAP_SYS_NICE or CAP_SYS_ADMIN",
            hint="use be:N or idle",
        )
    adj = request.oom_score_adj
    if adj is not None and adj < 0 and not has(CAP.SYS_RESOURCE):
        own = _own_oom_score_adj() if own_oom_score_adj is None else own_oom_score_adj
        if adj < own:
            raise PermissionDeniedError(
                f"oom_score_adj {adj}: lowering it below {own} needs CAP_SYS_RESOURCE",
                hint="use an oom_adj of 0..15 (or score:0..1000)",
            )

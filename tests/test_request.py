"""SPEC words and flags: every key, every flag, every invalid value and its message."""

from __future__ import annotations

from pathlib import Path

import pytest

from criu_livedump.errors import PermissionDeniedError, RequestError
from criu_livedump.linux.caps import CAP
from criu_livedump.request import (
    UNLIMITED,
    CaptureNice,
    DumpRequest,
    IoClass,
    IoPrio,
    Method,
    SpecValues,
    build_request,
    capture_nice,
    check_privileges,
    oom_adj_to_score_adj,
    parse_spec,
)

ALL_CAPS = (1 << 41) - 1
ROOT_HERE = ALL_CAPS & ~(1 << CAP.SYS_RESOURCE)  # root on this machine lacks CAP_SYS_RESOURCE


# --- SPEC ------------------------------------------------------------------------------------


def test_empty_spec_is_valid() -> None:
    assert parse_spec([]) == SpecValues()
    assert build_request([]) == DumpRequest()


def test_every_spec_key() -> None:
    spec = parse_spec(["core_limit=unlimited", "sched_prio=19", "io_prio=7", "oom_adj=-17"])
    assert spec == SpecValues(core_limit=UNLIMITED, sched_prio=19, io_prio=7, oom_adj=-17)


def test_spec_words_may_share_one_argument() -> None:
    assert parse_spec(["core_limit=4096 sched_prio=-20"]) == SpecValues(
        core_limit=4096, sched_prio=-20
    )


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("core_limit=0", 0),
        ("core_limit=1", 1),
        ("core_limit=4k", 4096),
        ("core_limit=10M", 10 << 20),
        ("core_limit=2G", 2 << 30),
        ("core_limit=1GiB", 1 << 30),
        ("core_limit=unlimited", UNLIMITED),
    ],
)
def test_spec_core_limit(word: str, value: int) -> None:
    assert parse_spec([word]).core_limit == value


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["foo=1"], "SPEC word 'foo=1': unknown key 'foo' (keys: core_limit, sched_prio"),
        (["sched_prio"], "SPEC word 'sched_prio': expected key=value"),
        (["sched_prio=20"], "SPEC word 'sched_prio=20': nice value 20 is out of range"),
        (["sched_prio=-21"], "nice value -21 is out of range (valid: -20..19)"),
        (
            ["sched_prio=abc"],
            "SPEC word 'sched_prio=abc': nice value must be an integer in -20..19",
        ),
        (["sched_prio="], "nice value must be an integer in -20..19"),
        (
            ["io_prio=8"],
            "SPEC word 'io_prio=8': I/O priority level 8 is out of range (valid: 0..7)",
        ),
        (["io_prio=-1"], "I/O priority level -1 is out of range (valid: 0..7)"),
        (["io_prio=be:3"], "I/O priority level must be an integer in 0..7"),
        (
            ["oom_adj=16"],
            "SPEC word 'oom_adj=16': legacy oom_adj 16 is out of range (valid: -17..15)",
        ),
        (["oom_adj=-18"], "legacy oom_adj -18 is out of range (valid: -17..15)"),
        (["oom_adj=1.5"], "legacy oom_adj must be an integer in -17..15"),
        (["core_limit=lots"], "SPEC word 'core_limit=lots': core limit must be a byte count"),
        (["core_limit=-5"], "core limit must be a byte count (suffixes k, M, G, T) or 'unlimited'"),
        (["core_limit=99999999T"], "core limit 99999999T is out of range (valid: 0..2^63-1)"),
        (["sched_prio=1", "sched_prio=2"], "SPEC word 'sched_prio=2': sched_prio given twice"),
    ],
)
def test_spec_rejects(words: list[str], message: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_spec(words)
    assert message in str(e.value)


# --- oom_adj mapping -------------------------------------------------------------------------

# fs/proc/base.c:oom_adj_write(): 15 -> 1000, else adj * 1000 / 17 truncated toward zero.
OOM_TABLE = {
    -17: -1000,
    -16: -941,
    -15: -882,
    -10: -588,
    -5: -294,
    -1: -58,
    0: 0,
    1: 58,
    5: 294,
    10: 588,
    14: 823,
    15: 1000,
}


@pytest.mark.parametrize(("adj", "score"), sorted(OOM_TABLE.items()))
def test_oom_adj_mapping(adj: int, score: int) -> None:
    assert oom_adj_to_score_adj(adj) == score
    assert build_request([f"oom_adj={adj}"]).oom_score_adj == score
    assert build_request(oom_adj=str(adj)).oom_score_adj == score


def test_oom_adj_mapping_whole_range_truncates_toward_zero() -> None:
    for adj in range(-17, 15):
        expected = int(adj * 1000 / 17)  # C division truncates toward zero
        assert oom_adj_to_score_adj(adj) == expected


def test_oom_adj_mapping_rejects_out_of_range() -> None:
    with pytest.raises(RequestError, match=r"oom_adj 16 is out of range \(valid: -17..15\)"):
        oom_adj_to_score_adj(16)


# --- flags -----------------------------------------------------------------------------------


def test_flags_win_over_spec() -> None:
    req = build_request(
        ["core_limit=4096", "sched_prio=5", "io_prio=3", "oom_adj=5"],
        core_limit="1M",
        sched_prio="10",
        io_prio="idle",
        oom_adj="score:-500",
    )
    assert req.core_limit == 1 << 20
    assert req.sched_prio == 10
    assert req.io_prio == IoPrio(IoClass.IDLE, 0)
    assert req.oom_score_adj == -500


def test_spec_io_prio_keeps_the_class() -> None:
    req = build_request(["io_prio=4"])
    assert req.io_prio == IoPrio(None, 4)
    assert req.io_prio.value(IoClass.IDLE) == (3 << 13)  # idle ignores the level
    assert req.io_prio.value(IoClass.RT) == (1 << 13) | 4
    assert req.io_prio.value(IoClass.NONE) == (2 << 13) | 4  # "none" is best-effort


@pytest.mark.parametrize(
    ("text", "prio"),
    [
        ("0", IoPrio(None, 0)),
        ("7", IoPrio(None, 7)),
        ("idle", IoPrio(IoClass.IDLE, 0)),
        ("IDLE", IoPrio(IoClass.IDLE, 0)),
        ("be:0", IoPrio(IoClass.BE, 0)),
        ("be:7", IoPrio(IoClass.BE, 7)),
        ("rt:2", IoPrio(IoClass.RT, 2)),
    ],
)
def test_io_prio_flag(text: str, prio: IoPrio) -> None:
    assert build_request(io_prio=text).io_prio == prio


def test_io_prio_values() -> None:
    assert IoPrio(IoClass.BE, 7).value() == (2 << 13) | 7
    assert IoPrio(IoClass.RT, 0).value() == 1 << 13


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"core_limit": "big"}, "--core-limit big: core limit must be a byte count"),
        ({"core_limit": -2}, "--core-limit -2: core limit -2 is out of range"),
        ({"sched_prio": "20"}, "--sched-prio 20: nice value 20 is out of range (valid: -20..19)"),
        ({"sched_prio": 99}, "--sched-prio 99: nice value 99 is out of range (valid: -20..19)"),
        ({"sched_prio": "x"}, "--sched-prio x: nice value must be an integer in -20..19"),
        ({"io_prio": "8"}, "--io-prio 8: I/O priority level 8 is out of range (valid: 0..7)"),
        ({"io_prio": "be:8"}, "--io-prio be:8: level 8 is out of range (valid: 0..7)"),
        ({"io_prio": "rt:x"}, "--io-prio rt:x: level must be an integer in 0..7"),
        ({"io_prio": "xx:1"}, "--io-prio xx:1: unknown I/O class 'xx' (valid: N, idle, be:N, rt:N"),
        ({"io_prio": "fast"}, "--io-prio fast: I/O priority must be N, idle, be:N or rt:N"),
        ({"oom_adj": "16"}, "--oom-adj 16: legacy oom_adj 16 is out of range (valid: -17..15)"),
        ({"oom_adj": "score:1001"}, "oom_score_adj 1001 is out of range (valid: -1000..1000)"),
        ({"oom_adj": "score:-1001"}, "oom_score_adj -1001 is out of range (valid: -1000..1000)"),
        ({"oom_adj": "score:"}, "oom_score_adj must be an integer in -1000..1000"),
        ({"coredump_filter": "0x200"}, "coredump filter 0x200 is out of range (valid: 0x0..0x1ff)"),
        ({"coredump_filter": "xyz"}, "--coredump-filter xyz: coredump filter must be a hex mask"),
        ({"coredump_filter": ""}, "coredump filter must be a hex mask in 0x0..0x1ff"),
        ({"pre_dump": "-1"}, "--pre-dump -1: pre-dump rounds -1 is out of range (valid: 0..10)"),
        ({"pre_dump": "11"}, "pre-dump rounds 11 is out of range (valid: 0..10)"),
        ({"signal": "SIGNOPE"}, "--signal SIGNOPE: unknown signal 'SIGNOPE'"),
        ({"signal": "65"}, "--signal 65: signal 65 is out of range (valid: 0..64)"),
        ({"method": "magic"}, "--method magic: unknown method (valid: auto, criu, clone, precopy)"),
        ({"output": ""}, "--output: empty path (use - for stdout)"),
        ({"frobnicate": True}, "unknown option --frobnicate"),
    ],
)
def test_flag_rejects(flags: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError) as e:
        build_request([], **flags)  # type: ignore[arg-type]
    assert message in str(e.value)


def test_every_other_flag() -> None:
    req = build_request(
        output="-",
        scratch="/var/tmp",
        keep_images=True,
        coredump_filter="0x1ff",
        pre_dump="3",
        signal="quit",
        force=True,
        tree=True,
        method="clone",
    )
    assert req == DumpRequest(
        output="-",
        scratch=Path("/var/tmp"),
        keep_images=True,
        coredump_filter=0x1FF,
        pre_dump=3,
        signal=3,
        force=True,
        tree=True,
        method=Method.CLONE,
    )


@pytest.mark.parametrize(
    ("text", "value"), [("33", 0x33), ("0x33", 0x33), ("1FF", 0x1FF), ("0", 0)]
)
def test_coredump_filter_is_hex(text: str, value: int) -> None:
    assert build_request(coredump_filter=text).coredump_filter == value


@pytest.mark.parametrize(("text", "value"), [("SIGSEGV", 11), ("segv", 11), ("0", 0), ("6", 6)])
def test_signal_names_and_numbers(text: str, value: int) -> None:
    assert build_request(signal=text).signal == value


def test_typed_flag_values() -> None:
    req = build_request(core_limit=UNLIMITED, sched_prio=3, io_prio=2, oom_adj=15, pre_dump=0)
    assert req.core_limit == UNLIMITED
    assert req.sched_prio == 3
    assert req.io_prio == IoPrio(None, 2)
    assert req.oom_score_adj == 1000
    assert req.pre_dump == 0


def test_unset_flags_leave_spec_alone() -> None:
    req = build_request(["sched_prio=7"], sched_prio=None, core_limit=None)
    assert req.sched_prio == 7
    assert req.core_limit is None


# --- privileges ------------------------------------------------------------------------------


def test_negative_nice_needs_cap_sys_nice() -> None:
    req = build_request(["sched_prio=-1"])
    check_privileges(req, target_core_hard=UNLIMITED, caps=ALL_CAPS)
    with pytest.raises(PermissionDeniedError, match="a nice value below 0 needs CAP_SYS_NICE"):
        check_privileges(req, target_core_hard=UNLIMITED, caps=ALL_CAPS & ~(1 << CAP.SYS_NICE))
    check_privileges(build_request(["sched_prio=0"]), target_core_hard=UNLIMITED, caps=0)


NO_SYS_NICE = ALL_CAPS & ~(1 << CAP.SYS_NICE)


@pytest.mark.parametrize(
    ("requested", "target", "own", "caps", "expected"),
    [
        # the request's sched_prio wins, whatever the target's nice
        (19, -5, 0, ALL_CAPS, CaptureNice(19, "requested")),
        (3, 10, 0, NO_SYS_NICE, CaptureNice(3, "requested")),
        # else below the target's, floored at -20
        (None, 0, 0, ALL_CAPS, CaptureNice(-10, "default")),
        (None, 5, 0, ALL_CAPS, CaptureNice(-5, "default")),
        (None, -15, 0, ALL_CAPS, CaptureNice(-20, "default")),
        # without CAP_SYS_NICE: the caller's own nice where the default is below it...
        (None, 0, 0, NO_SYS_NICE, CaptureNice(0, "own")),
        (None, 12, 4, NO_SYS_NICE, CaptureNice(4, "own")),
        # ...and the default where raising its nice to it needs nothing
        (None, 15, 0, NO_SYS_NICE, CaptureNice(5, "default")),
    ],
)
def test_capture_nice(
    requested: int | None, target: int, own: int, caps: int, expected: CaptureNice
) -> None:
    assert capture_nice(requested, target, own_nice=own, caps=caps) == expected


def test_capture_nice_says_why_it_is_the_callers_own() -> None:
    line = capture_nice(None, 0, own_nice=2, caps=NO_SYS_NICE).describe()
    assert line == (
        "capture at nice 2, the caller's own: running it below the target's needs CAP_SYS_NICE"
    )


def test_core_limit_above_hard_limit_needs_cap_sys_resource() -> None:
    above = build_request(["core_limit=8192"])
    check_privileges(above, target_core_hard=8192, caps=ROOT_HERE)
    check_privileges(above, target_core_hard=UNLIMITED, caps=0)
    check_privileges(above, target_core_hard=4096, caps=ALL_CAPS)
    with pytest.raises(PermissionDeniedError) as e:
        check_privileges(above, target_core_hard=4096, caps=ROOT_HERE)
    assert str(e.value) == (
        "core_limit=8192: above the target's hard RLIMIT_CORE (4096 bytes), which needs"
        " CAP_SYS_RESOURCE"
    )
    with pytest.raises(PermissionDeniedError, match="core_limit=unlimited: above"):
        check_privileges(build_request(["core_limit=unlimited"]), target_core_hard=0, caps=0)


def test_realtime_io_class_needs_a_capability() -> None:
    req = build_request(io_prio="rt:0")
    check_privileges(req, target_core_hard=UNLIMITED, caps=1 << CAP.SYS_ADMIN)
    check_privileges(req, target_core_hard=UNLIMITED, caps=1 << CAP.SYS_NICE)
    with pytest.raises(PermissionDeniedError, match="CAP_SYS_NICE or CAP_SYS_ADMIN"):
        check_privileges(req, target_core_hard=UNLIMITED, caps=0)


def test_lowering_oom_score_adj_needs_cap_sys_resource() -> None:
    req = build_request(oom_adj="score:-100")
    check_privileges(req, target_core_hard=UNLIMITED, caps=ALL_CAPS, own_oom_score_adj=0)
    check_privileges(req, target_core_hard=UNLIMITED, caps=0, own_oom_score_adj=-200)
    with pytest.raises(PermissionDeniedError, match="below 0 needs CAP_SYS_RESOURCE"):
        check_privileges(req, target_core_hard=UNLIMITED, caps=ROOT_HERE, own_oom_score_adj=0)


def test_timeout_flag() -> None:
    assert build_request(timeout="30").timeout == 30
    assert build_request().timeout is None
    for bad, why in (("0", "out of range"), ("abc", "must be an integer"), ("-5", "out of range")):
        with pytest.raises(RequestError, match=f"--timeout {bad}: number of seconds.*{why}"):
            build_request(timeout=bad)

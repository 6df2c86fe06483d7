"""Fuzzing the image reader and converter (issue 7, "Hostile input").

Two fuzzers, both requiring every case to end in success or one ConversionError (one line,
naming a file), never another exception, a hang, or an allocation proportional to a claimed
size:

- the fast mutation fuzzer (tests/fuzz/driver.py): ``make test`` runs a few thousand cases
  with a fixed seed, ``make fuzz`` (``--fuzz-full``) 120,000; ``FUZZ_CASES=N`` sets the count.
  It runs in two worker processes under RLIMIT_AS, one second per case;
- hypothesis (structure-aware edits through pycriu's dict form): a few dozen examples per test
  in ``make test``, 2,000 under ``--fuzz-full``; ``FUZZ_EXAMPLES=N`` sets the count.

Every defect found is replayed from tests/fuzz/regressions/ (see make_regressions.py).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import images
import pycriu.images as pyimages
import pytest
from fuzz import driver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters import ConvertOptions, convert
from converters.errors import ConversionError, MissingImageError

#: the driver's own seeds module (it imports its siblings as top-level modules)
seedlib = driver.seedlib
PAGE = images.PAGE
U64 = (1 << 64) - 1
#: a case running longer than this is a hang (the budget is one second; this guards the run).
#: Counted in CPU time (ITIMER_PROF): on a machine loaded by other suites the wall clock of a
#: 1 s case can pass 10 s, and the converter waits on nothing but the CPU and local files.
HANG_SECONDS = 10
#: growth of peak RSS allowed for one case (the inputs are a few MiB at most)
RSS_BUDGET = 256 << 20
REDUCED, FULL = 30, 2_000
DRIVER_REDUCED, DRIVER_FULL = 3_000, 120_000
REGRESSIONS = Path(__file__).resolve().parent / "fuzz" / "regressions"


def _examples(fuzz_full: bool) -> int:
    if "FUZZ_EXAMPLES" in os.environ:
        return int(os.environ["FUZZ_EXAMPLES"])
    return FULL if fuzz_full or os.environ.get("FUZZ_FULL") == "1" else REDUCED


# --- the corpus -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_seeds() -> list[seedlib.Seed]:
    """Synthetic seeds, and a real CRIU dump of a tiny C program when this host can make one."""
    return seedlib.make_seeds()


@pytest.fixture(scope="module")
def corpus(fuzz_seeds: list[seedlib.Seed], tmp_path_factory: pytest.TempPathFactory) -> dict[
    str, tuple[Path, Path]
]:  # fmt: skip
    """The seeds on disk for hypothesis: ``{name: (images dir, files root)}``."""
    top = tmp_path_factory.mktemp("corpus")
    out = {}
    for seed in fuzz_seeds:
        img = driver.write_case(seed, top / seed.name)
        out[seed.name] = (img, driver.files_root(seed, top / seed.name))
    return out


# --- the fast mutation fuzzer ---------------------------------------------------------------------


def test_fuzz_driver(
    fuzz_seeds: list[seedlib.Seed], fuzz_full: bool, tmp_path: Path, capsys: Any
) -> None:
    """Thousands of mutated image sets: no crash, no hang, no MemoryError under 1 GiB."""
    full = fuzz_full or os.environ.get("FUZZ_FULL") == "1"
    cases = int(os.environ.get("FUZZ_CASES", DRIVER_FULL if full else DRIVER_REDUCED))
    crashes = driver.CRASHES_DIR if full else tmp_path / "crashes"
    totals = driver.run(cases, seed=1 if full else 0, workers=2, timeout=1.0, mem_mib=1024,
                        crashes=crashes, seeds=fuzz_seeds)  # fmt: skip
    with capsys.disabled():
        print("\n" + totals.report())
    assert totals.cases == cases
    bad = {k: totals.outcomes[k] for k in driver.FAILURES if totals.outcomes[k]}
    assert not bad, f"{bad}; cases saved in {crashes}\n{totals.report()}"
    # the mutations must reach the converter, not only its first sanity check
    assert totals.outcomes["ok"] > cases // 10 and totals.outcomes["error"] > cases // 10


def _burn(*args: object, **kwargs: object) -> None:
    while True:
        pass


def _allocate(*args: object, **kwargs: object) -> None:
    bytearray(4 << 30)


def _traceback(*args: object, **kwargs: object) -> None:
    raise KeyError("not a ConversionError")


def _two_lines(*args: object, **kwargs: object) -> None:
    raise ConversionError("pstree.img: one line\nand another")


@pytest.mark.parametrize(
    ("fake", "outcome"),
    [(_burn, "hang"), (_allocate, "memory"), (_traceback, "crash"), (_two_lines, "crash")],
)
def test_fuzz_driver_catches(
    fake: Callable[..., None], outcome: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The driver itself: a converter that spins, allocates 4 GiB, raises another exception or
    a two-line message is reported as such, and the case is saved with its traceback."""
    monkeypatch.setattr(driver, "convert", fake)  # the fork-started workers inherit it
    simple = [s for s in seedlib.synthetic_seeds(tmp_path / "seeds") if s.name == "simple"]
    totals = driver.run(2, seed=0, workers=2, timeout=0.3, crashes=tmp_path / "crashes",
                        seeds=simple)  # fmt: skip
    assert totals.outcomes == Counter({outcome: 2})
    saved = [p for p in (tmp_path / "crashes").iterdir() if p.is_dir()]
    assert len(saved) == 2
    assert all((p / "traceback.txt").read_text() for p in saved)


def _regressions() -> list[str]:
    return sorted(p.name for p in REGRESSIONS.iterdir() if (p / "expected.json").exists())


@pytest.mark.parametrize("name", _regressions())
def test_fuzz_regression(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every defect the fuzzers found stays fixed (tests/fuzz/regressions/NAME)."""
    case = REGRESSIONS / name
    expected = json.loads((case / "expected.json").read_text())
    root = case / "root" if (case / "root").is_dir() else tmp_path
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.WARNING):
        if expected["outcome"] == "error":
            with pytest.raises(ConversionError) as exc:
                convert(case / "img", out, ConvertOptions(files_root=root))
            msg = str(exc.value)
            assert expected["message"] in msg and "\n" not in msg, msg
            assert list(out.iterdir()) == []
        else:
            results = convert(case / "img", out, ConvertOptions(files_root=root))
            warnings = [w for r in results for w in r.warnings]
            assert any(expected["warning"] in w for w in warnings), warnings


def test_fuzz_million_threads(tmp_path: Path) -> None:
    """A crafted pstree entry listing 10^6 threads ends at the first missing core image
    (built here: 3 MB of varints is no fixture to commit)."""
    img = images.simple(tmp_path / "img")
    _write_pstree_threads(img / "pstree.img", [{"pid": 100, "ppid": 1, "pgid": 100, "sid": 100}],
                          1_000_000)  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MissingImageError, match=r"core-101\.img: missing image"):
        convert(img, out, ConvertOptions(files_root=tmp_path))
    assert list(out.iterdir()) == []


# --- running one case -----------------------------------------------------------------------------


class Stats:
    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: Counter[str] = Counter()
        self.slowest = 0.0
        self.rss_growth = 0

    def report(self) -> str:
        total = sum(self.outcomes.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (
            f"fuzz {self.name}: {total} cases ({parts}); slowest {self.slowest:.3f} s; "
            f"peak RSS growth {self.rss_growth >> 20} MiB"
        )


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    # "5" resets the peak RSS (Documentation/filesystems/proc.rst, clear_refs)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@contextmanager
def _hang_guard() -> Iterator[None]:
    def alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"case ran longer than {HANG_SECONDS} s of CPU time")

    old = signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, HANG_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def run_case(img: Path, out: Path, root: Path, stats: Stats) -> None:
    """Convert *img*; success or ConversionError, with no partial output on error."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    rss = _hwm()
    _reset_hwm()
    base = _hwm()
    started = time.monotonic()
    try:
        with _hang_guard():
            results = convert(img, out, ConvertOptions(files_root=root))
        stats.outcomes["converted"] += 1
        for r in results:
            assert r.path is None or r.path.parent == out
    except ConversionError as e:
        stats.outcomes[type(e).__name__] += 1
        msg = str(e)
        assert msg and "\n" not in msg, f"not one line: {msg!r}"
        leftovers = [p.name for p in out.iterdir() if not p.name.startswith("core.")]
        assert leftovers == [], f"temporary files left behind: {leftovers}"
    finally:
        stats.slowest = max(stats.slowest, time.monotonic() - started)
        growth = _hwm() - base
        stats.rss_growth = max(stats.rss_growth, growth)
        del rss
    assert growth < RSS_BUDGET, f"peak RSS grew by {growth >> 20} MiB"


# --- byte-level mutations -------------------------------------------------------------------------


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_file())


@st.composite
def byte_mutation(draw: st.DrawFn, names: list[str]) -> tuple[str, str, Any]:
    name = draw(st.sampled_from(names))
    op = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "append", "delete", "empty"]))
    if op == "flip":
        arg: Any = draw(
            st.lists(
                st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=8
            )
        )
    elif op == "truncate":
        arg = draw(st.integers(0, 1 << 16))
    elif op == "append":
        arg = draw(st.binary(min_size=1, max_size=64))
    else:
        arg = None
    return name, op, arg


def apply_bytes(d: Path, name: str, op: str, arg: Any) -> None:
    path = d / name
    if op == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if op == "flip" and data:
        for off, x in arg:
            data[off % len(data)] ^= x
    elif op == "truncate":
        del data[arg % (len(data) + 1) :]
    elif op == "append":
        data += arg
    elif op == "empty":
        data.clear()
    path.write_bytes(bytes(data))


def _fresh(src: Path, work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work, symlinks=True)
    return work


_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,
}


@pytest.mark.parametrize("base", ["rich", "simple", "real"])
def test_fuzz_bytes(
    corpus: dict[str, tuple[Path, Path]], tmp_path: Path, fuzz_full: bool, base: str, capsys: Any
) -> None:
    if base not in corpus:
        pytest.skip("no real CRIU dump on this host (needs root, gcc and CRIU)")
    src, root = corpus[base]
    names = _files(src)
    stats = Stats(f"bytes/{base}")

    @settings(max_examples=_examples(fuzz_full), **_SETTINGS)
    @given(st.lists(byte_mutation(names), min_size=1, max_size=4))
    def case(mutations: list[tuple[str, str, Any]]) -> None:
        work = _fresh(src, tmp_path / "work")
        for name, op, arg in mutations:
            if (work / name).exists():
                apply_bytes(work, name, op, arg)
        run_case(work, tmp_path / "out", root, stats)

    case()
    with capsys.disabled():
        print("\n" + stats.report())


# --- structural mutations -------------------------------------------------------------------------

_MAGIC = pyimages.magic.by_name


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return dict(pyimages.load(f))


def dump(path: Path, image: dict[str, Any]) -> None:
    buf = io.BytesIO()
    pyimages.dump(image, buf)
    path.write_bytes(buf.getvalue())


#: values that tend to break arithmetic: edges of every width, page boundaries
EDGES = [0, 1, PAGE - 1, PAGE, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 40),
         (1 << 47) - PAGE, 1 << 52, (1 << 63) - PAGE, 1 << 63, U64 - PAGE + 1, U64]  # fmt: skip
u64 = st.one_of(st.sampled_from(EDGES), st.integers(0, U64))
page_u64 = u64.map(lambda v: v & ~(PAGE - 1))
u32 = st.one_of(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))


def _pick(d: Path, prefix: str) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.startswith(prefix) and p.suffix == ".img")


Edit = Callable[[Path, st.DataObject], None]


def edit_vma(d: Path, data: st.DataObject) -> None:
    for mm_path in _pick(d, "mm-"):
        mm = load(mm_path)
        vmas = mm["entries"][0]["vmas"]
        if not vmas:
            continue
        v = vmas[data.draw(st.integers(0, len(vmas) - 1))]
        kind = data.draw(st.sampled_from(["huge", "field", "field", "swap", "dup"]))
        if kind == "huge":  # a VMA of 2^63 bytes, or up to the top of the address space
            v["start"] = data.draw(st.sampled_from([0, v["start"]]))
            v["end"] = min(v["start"] + (1 << 63), U64 - PAGE + 1)
        elif kind == "field":
            key = data.draw(st.sampled_from(["start", "end", "pgoff", "shmid", "madv"]))
            v[key] = data.draw(page_u64 if key != "madv" and data.draw(st.booleans()) else u64)
        elif kind == "swap":
            v["start"], v["end"] = v["end"], v["start"]
        else:
            vmas.append(dict(v))
        if data.draw(st.booleans()):
            for key in ("prot", "flags", "status"):
                if data.draw(st.booleans()):
                    v[key] = data.draw(u32)
        dump(mm_path, mm)


def edit_pagemap(d: Path, data: st.DataObject) -> None:
    maps = _pick(d, "pagemap-")
    path = maps[data.draw(st.integers(0, len(maps) - 1))]
    pm = load(path)
    entries = pm["entries"]
    kind = data.draw(st.sampled_from(["huge", "field", "overlap", "flags", "many", "pages_id"]))
    body = entries[1:]
    if kind == "pages_id":
        entries[0]["pages_id"] = data.draw(u32)
    elif kind == "many":  # many tiny entries: the index must stay linear
        start = data.draw(page_u64)
        entries += [
            {"vaddr": (start + 2 * i * PAGE) & U64 & ~(PAGE - 1), "compat_nr_pages": 0,
             "flags": images.PE_LAZY, "nr_pages": 1}
            for i in range(data.draw(st.integers(1, 5_000)))
        ]  # fmt: skip
    elif body:
        e = body[data.draw(st.integers(0, len(body) - 1))]
        if kind == "huge":  # a pagemap entry of 2^40 pages
            e["nr_pages"] = data.draw(st.sampled_from([1 << 40, 1 << 52, U64]))
        elif kind == "field":
            key = data.draw(st.sampled_from(["vaddr", "nr_pages", "compat_nr_pages"]))
            e[key] = data.draw(u32 if key == "compat_nr_pages" else u64)
        elif kind == "overlap":
            twin = dict(e)
            twin["vaddr"] = (e["vaddr"] + data.draw(st.sampled_from([0, PAGE, -PAGE]))) & U64
            entries.append(twin)
        else:
            e["flags"] = data.draw(st.integers(0, 7))
    dump(path, pm)


def edit_pstree(d: Path, data: st.DataObject) -> None:
    path = d / "pstree.img"
    tree = load(path)
    entries = tree["entries"]
    if not entries:
        return
    kind = data.draw(st.sampled_from(["threads", "dup", "field", "empty"]))
    if kind == "threads":  # 10^6 threads (written as raw protobuf: pycriu's dicts are slow)
        count = data.draw(st.sampled_from([0, 1000, 1_000_000]))
        _write_pstree_threads(path, entries, count)
        return
    if kind == "dup":
        entries.append(dict(entries[0]))
    elif kind == "field":
        e = entries[data.draw(st.integers(0, len(entries) - 1))]
        e[data.draw(st.sampled_from(["pid", "ppid", "pgid", "sid"]))] = data.draw(u32)
    else:
        entries.clear()
    dump(path, tree)


def _write_pstree_threads(path: Path, entries: list[dict[str, Any]], count: int) -> None:
    from pycriu.images import pb

    out = io.BytesIO()
    out.write(struct.pack("<I", _MAGIC["PSTREE"]))
    for i, e in enumerate(entries):
        msg = pb.pstree_entry(pid=e["pid"], ppid=e["ppid"], pgid=e["pgid"], sid=e["sid"])
        msg.threads.extend(range(e["pid"], e["pid"] + count) if i == 0 else e.get("threads", []))
        raw = msg.SerializeToString()
        out.write(struct.pack("<I", len(raw)) + raw)
    path.write_bytes(out.getvalue())


def edit_core(d: Path, data: st.DataObject) -> None:
    cores = _pick(d, "core-")
    path = cores[data.draw(st.integers(0, len(cores) - 1))]
    core = load(path)
    e = core["entries"][0]
    kind = data.draw(st.sampled_from(["mtype", "reg", "no_regs", "comm", "fp"]))
    if kind == "mtype":
        e["mtype"] = data.draw(st.sampled_from(["AARCH64", "ARM", "PPC64", "UNKNOWN", "X86_64"]))
    elif kind == "reg" and "thread_info" in e:
        regs = e["thread_info"]["gpregs"]
        regs[data.draw(st.sampled_from(sorted(k for k in regs if k != "mode")))] = data.draw(u64)
    elif kind == "no_regs":
        e.pop("thread_info", None)
    elif kind == "comm" and "tc" in e:
        e["tc"]["comm"] = data.draw(st.text(max_size=300))
    elif kind == "fp" and "thread_info" in e:
        fp = e["thread_info"]["fpregs"]
        key = data.draw(st.sampled_from(["st_space", "xmm_space", "padding"]))
        fp[key] = data.draw(st.lists(u32, min_size=1, max_size=200))
        if "xsave" in fp:
            fp["xsave"]["xstate_bv"] = data.draw(u64)
    dump(path, core)


def edit_mm(d: Path, data: st.DataObject) -> None:
    for path in _pick(d, "mm-"):
        mm = load(path)
        e = mm["entries"][0]
        kind = data.draw(st.sampled_from(["args", "auxv", "exe"]))
        if kind == "args":
            e["mm_arg_start"], e["mm_arg_end"] = data.draw(u64), data.draw(u64)
        elif kind == "auxv":
            n = data.draw(st.sampled_from([0, 1, 3, 10_001]))
            if n:
                e["mm_saved_auxv"] = [data.draw(u64)] * n
            else:
                e.pop("mm_saved_auxv", None)  # pycriu cannot encode an empty repeated field
        else:
            e["exe_file_id"] = data.draw(u32)
        dump(path, mm)


def edit_files(d: Path, data: st.DataObject) -> None:
    path = d / "files.img"
    if not path.exists():
        return
    files = load(path)
    regs = [f for f in files["entries"] if "reg" in f]
    if not regs:
        return
    reg = regs[data.draw(st.integers(0, len(regs) - 1))]["reg"]
    kind = data.draw(st.sampled_from(["name", "size", "mode"]))
    if kind == "name":
        reg["name"] = data.draw(
            st.one_of(
                st.sampled_from(["/etc/shadow", "/dev/sda", "/dev/zero", "/proc/kcore",
                                 "/proc/self/mem", "../../../etc/passwd", "", "relative",
                                 "/lib/../../../../etc/shadow", "/" + "a" * 5000]),
                st.text(max_size=50),
            )
        )  # fmt: skip
    elif kind == "size":
        reg["size"] = data.draw(u64)
    else:
        reg["mode"] = data.draw(u32)
    dump(path, files)


def edit_parent(d: Path, data: st.DataObject) -> None:
    """A parent chain that loops (parent -> . or ..), plus entries that need it."""
    target = data.draw(st.sampled_from([".", "..", "../" + d.name, "/", "missing"]))
    os.symlink(target, d / "parent")
    for path in _pick(d, "pagemap-"):
        pm = load(path)
        for e in pm["entries"][1:]:
            if data.draw(st.booleans()):
                e["flags"] = images.PE_PARENT
        dump(path, pm)


def edit_sidecar(d: Path, data: st.DataObject) -> None:
    value = data.draw(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
            max_leaves=8,
        )
    )
    key = data.draw(
        st.sampled_from(["coredump_filter", "core_limit", "signal", "xsave_layout", "ppid", "x"])
    )
    (d / "livedump.json").write_text(json.dumps({key: value}))


EDITS: dict[str, Edit] = {
    "vma": edit_vma,
    "pagemap": edit_pagemap,
    "pstree": edit_pstree,
    "core": edit_core,
    "mm": edit_mm,
    "files": edit_files,
    "parent": edit_parent,
    "sidecar": edit_sidecar,
}


@pytest.mark.parametrize("base", ["rich", "real"])
def test_fuzz_structure(
    corpus: dict[str, tuple[Path, Path]], tmp_path: Path, fuzz_full: bool, base: str, capsys: Any
) -> None:
    if base not in corpus:
        pytest.skip("no real CRIU dump on this host (needs root, gcc and CRIU)")
    src, root = corpus[base]
    stats = Stats(f"structure/{base}")

    @settings(max_examples=_examples(fuzz_full), **_SETTINGS)
    @given(st.lists(st.sampled_from(sorted(EDITS)), min_size=1, max_size=3), st.data())
    def case(edits: list[str], data: st.DataObject) -> None:
        work = _fresh(src, tmp_path / "work")
        for name in edits:
            if name == "parent" and (work / "parent").is_symlink():
                continue
            EDITS[name](work, data)
        run_case(work, tmp_path / "out", root, stats)

    case()
    with capsys.disabled():
        print("\n" + stats.report())

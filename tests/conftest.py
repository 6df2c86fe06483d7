"""Shared fixtures: built test programs, targets that are always reaped, command-line switches.

``--soak`` and ``--fuzz-full`` select the full-size soak and fuzz runs (``make soak`` /
``make fuzz``); ``make test`` runs them reduced.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import procs  # noqa: E402
from harness.launcher import Target, start_target  # noqa: E402
from programs import build as programs_build  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Lead a session of our own when ours is led from outside our PID namespace.

    CRIU refuses any process whose session id is 0 in its PID namespace (see
    :func:`criu_livedump.target.blockers._session_blocker`), and a test runner entered into a
    container without setsid() (CI's case) would pass that session to every target it starts.
    Leading a session here gives the targets one CRIU can dump; tests/test_foreign_session.py
    covers the other case on purpose. The parent-death signal keeps us from outliving a killed
    ``make``.

    Pytest is also made a child subreaper, so that what a test leaves behind comes back to it
    and :func:`_no_process_left` can kill it.
    """
    procs.become_subreaper()
    if os.getsid(0) != 0:
        return
    try:
        os.setsid()
    except PermissionError:  # we lead a process group: targets keep the foreign session
        config.issue_config_time_warning(
            pytest.PytestWarning(
                "the session leader is outside this PID namespace and pytest leads a process"
                " group, so it cannot setsid(): tests of --method criu will be refused"
            ),
            stacklevel=2,
        )
        return
    procs.die_with_parent()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("criu-livedump")
    group.addoption("--soak", action="store_true", help="run soak tests at full size")
    group.addoption("--fuzz-full", action="store_true", help="run the fuzzers at full size")


def pytest_runtest_setup(item: pytest.Item) -> None:
    needs = [m for m in ("live", "kernel") if item.get_closest_marker(m)]
    if needs and os.geteuid() != 0:
        pytest.skip(f"{'/'.join(needs)} test: needs root (CRIU dump, core_pattern)")


@pytest.fixture(autouse=True)
def _no_process_left() -> Iterator[None]:
    """Every process a test started dies with the test: after its teardown, whatever it left
    among our children (its own, and orphans of its grandchildren) is killed with its process
    group and reaped, with a warning naming it."""
    before = set(procs.children(os.getpid()))
    yield
    killed = procs.reap_leftovers(before)
    if killed:
        warnings.warn(f"killed processes the test left running: {', '.join(killed)}", stacklevel=1)


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True under ``--soak``: run the full-size soak."""
    return bool(request.config.getoption("--soak"))


@pytest.fixture(scope="session")
def fuzz_full(request: pytest.FixtureRequest) -> bool:
    """True under ``--fuzz-full``: run the fuzzers at full size."""
    return bool(request.config.getoption("--fuzz-full"))


@pytest.fixture(scope="session")
def programs() -> dict[str, Path]:
    """Every C program in tests/programs, built into tests/programs/bin: ``{stem: path}``."""
    return programs_build.build_all()


@pytest.fixture
def mappings_datafile(tmp_path: Path) -> Path:
    """A 32-page data file with a recognisable pattern, for ``mappings DATAFILE``."""
    page = os.sysconf("SC_PAGE_SIZE")
    path = tmp_path / "mappings.data"
    path.write_bytes(bytes((i * 7 + (i >> 12)) & 0xFF for i in range(32 * page)))
    return path


StartTarget = Callable[..., Target]


@pytest.fixture
def targets() -> Iterator[StartTarget]:
    """A :func:`harness.launcher.start_target` whose targets, each with its process group, are
    all killed and reaped at teardown."""
    started: list[Target] = []

    def start(binary: str | os.PathLike[str], *args: object, **kwargs: object) -> Target:
        target = start_target(binary, *(str(a) for a in args), **kwargs)  # type: ignore[arg-type]
        started.append(target)
        return target

    try:
        yield start
    finally:
        for target in started:
            target.close()

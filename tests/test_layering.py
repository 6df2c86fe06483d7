"""The design's direction of dependencies, enforced on the source (docs/ARCHITECTURE.md):
criu_livedump imports converters, never the reverse; inside criu_livedump, linux/ below target/
below snapshot/ below dump; pycriu is imported by exactly one module of the product; click only
by the CLI; subprocess in converters by none; no product function longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _product_imports(path: Path) -> set[str]:
    """The criu_livedump modules *path* imports, as dotted names below the package
    (``linux.procfs``; ``from criu_livedump import scratch`` gives ``scratch``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "criu_livedump":
                names.update(f"criu_livedump.{a.name}" for a in node.names)
            else:
                names.add(node.module)
    return {
        n.removeprefix("criu_livedump.")
        for n in names
        if n.startswith("criu_livedump.") and n != "criu_livedump.__version__"
    }


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("converters"), ids=lambda p: p.name)
def test_converters_know_nothing_of_the_orchestrator(path: Path) -> None:
    used = _imports(path)
    assert "criu_livedump" not in used
    assert "click" not in used
    assert "subprocess" not in used or path.name == "archive.py"  # zstd for .tar.zst


def test_pycriu_in_one_module() -> None:
    users = [
        p.relative_to(ROOT).as_posix()
        for pkg in ("converters", "criu_livedump")
        for p in _modules(pkg)
        if "pycriu" in _imports(p)
    ]
    assert users == ["converters/images.py"]


def test_click_only_in_the_cli() -> None:
    users = [p.name for p in _modules("criu_livedump") if "click" in _imports(p)]
    assert users == ["cli.py"]


def test_the_checks_see_imports() -> None:
    """Guard against a checker that finds nothing: the known imports are found."""
    assert "pycriu" in _imports(ROOT / "converters" / "images.py")
    assert "converters" in _imports(ROOT / "criu_livedump" / "dump.py")
    assert "linux.procfs" in _product_imports(ROOT / "criu_livedump" / "target" / "facts.py")
    assert "scratch" in _product_imports(ROOT / "criu_livedump" / "dump.py")


#: What each layer of criu_livedump may import from the package: each layer only what is
#: below it. errors is everyone's; request (the validated dump request) is data the snapshot
#: methods read. The modules at the top (dump, check, cli, ...) may import any layer.
_LAYERS = {
    "errors": set(),
    "linux": {"errors", "linux"},
    "target": {"errors", "linux", "target"},
    "request": {"errors", "linux"},
    "snapshot": {"errors", "linux", "target", "request", "snapshot"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT / "criu_livedump")
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize(
    "path",
    [p for p in _modules("criu_livedump") if _layer(p) in _LAYERS],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_each_layer_imports_only_what_is_below_it(path: Path) -> None:
    allowed = _LAYERS[_layer(path)]
    upward = sorted(m for m in _product_imports(path) if m.split(".")[0] not in allowed)
    assert upward == []


def test_only_the_cli_and_the_services_worker_run_a_dump() -> None:
    """`dump` and `serve` (in its worker process) take the one path; nothing else does."""
    users = [
        p.relative_to(ROOT / "criu_livedump").as_posix()
        for p in _modules("criu_livedump")
        if "dump" in _product_imports(p)
    ]
    assert users == ["cli.py", "serve/worker.py"]


def test_the_request_client_is_standalone() -> None:
    """serve/client.py runs with the system's python3 for any user: standard library only."""
    used = _imports(ROOT / "criu_livedump" / "serve" / "client.py")
    assert not used & {"criu_livedump", "converters", "click", "pycriu"}
    assert "socket" in used


def _long_functions(package: str, limit: int) -> list[str]:
    found = []
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    return found


@pytest.mark.parametrize("package", ["criu_livedump", "converters"])
def test_no_product_function_over_80_lines(package: str) -> None:
    """A function that needs more is two functions (ruff's PLR0915 counts statements; this
    counts what a reader scrolls through)."""
    assert _long_functions(package, 80) == []


def test_the_length_check_sees_functions() -> None:
    assert _long_functions("criu_livedump", 10) != []

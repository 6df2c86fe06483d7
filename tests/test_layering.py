"""The design's direction of dependencies, enforced on the source (shared/DESIGN.md):
criu_livedump imports converters, never the reverse; pycriu is imported by exactly one module
of the product; click only by the CLI; subprocess in converters by none."""

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

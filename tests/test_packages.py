"""Structure the design relies on: four packages, services that never import each other."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("lmhandler", "sandbox", "orchestrator")


def imported_top_levels(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", [*SERVICES, "protocol"])
def test_services_import_only_protocol(package: str) -> None:
    forbidden = {s for s in SERVICES if s != package}
    if package == "protocol":
        forbidden = set(SERVICES)
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_top_levels(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["protocol", "lmhandler", "lmhandler.backends"])
def test_all_names_exist_once(package: str) -> None:
    module = importlib.import_module(package)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing

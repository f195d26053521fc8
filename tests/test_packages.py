"""Structure the design relies on: one installed name, services that never import each other.

The four service folders stand at the top of the repository and install as ``rlmq.protocol``,
``rlmq.lmhandler``, ``rlmq.sandbox`` and ``rlmq.orchestrator`` (docs/architecture.md).
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("lmhandler", "sandbox", "orchestrator")
FOLDERS = ("protocol", *SERVICES)
# Every tree of Python code the repository ships or runs.
CODE_TREES = (*FOLDERS, "rlmq", "tests", "bench", "deploy")


TOOLS = ("loadtest", "fakeprovider", "eval", "serve", "facade.py")


def python_files(tree: str) -> list[Path]:
    # rlmq/ links the four folders in; walk only its own files so nothing is read twice.
    if tree == "rlmq":
        own = [p for p in (ROOT / "rlmq").iterdir() if not p.is_symlink()]
        return sorted(f for p in own for f in ([p] if p.is_file() else p.rglob("*")) if f.suffix == ".py")
    # bench/results holds unpacked baseline revisions (git-ignored): not this tree's code.
    return sorted(p for p in (ROOT / tree).rglob("*.py") if "results" not in p.relative_to(ROOT).parts)


def imported_modules(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (relative imports stay inside a package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def rlmq_package(module: str) -> str | None:
    """``rlmq.sandbox.pool`` -> ``sandbox``; ``rlmq`` itself -> ``rlmq``; None outside rlmq."""
    parts = module.split(".")
    if parts[0] != "rlmq":
        return None
    return parts[1] if len(parts) >= 2 else "rlmq"


@pytest.mark.parametrize("tree", CODE_TREES)
def test_nothing_imports_a_bare_service_name(tree: str) -> None:
    """``import protocol`` would find someone else's package (or none) once rlmq is installed."""
    for path in python_files(tree):
        bare = {m for m in imported_modules(path) if m.split(".")[0] in FOLDERS}
        assert not bare, f"{path.relative_to(ROOT)} imports {sorted(bare)}; use rlmq.<package>"


@pytest.mark.parametrize("package", FOLDERS)
def test_services_import_only_protocol(package: str) -> None:
    """Nor the tools (loadtest, fakeprovider) or the command module: only the shared vocabulary."""
    # The bare root `rlmq` is allowed: it holds nothing but the version (a worker uses its path).
    allowed = {package, "rlmq"} if package == "protocol" else {package, "protocol", "rlmq"}
    for path in python_files(package):
        used = {rlmq_package(m) for m in imported_modules(path)} - {None}
        assert used <= allowed, f"{path.relative_to(ROOT)} imports rlmq.{sorted(used - allowed)}"


def test_the_rules_see_the_tools() -> None:
    """The walk of rlmq/ reaches the tools' packages, so their imports are checked too."""
    names = {p.relative_to(ROOT).parts[1] for p in python_files("rlmq")}
    assert {f"{tool}" for tool in TOOLS} <= names


@pytest.mark.parametrize(
    "package",
    [
        "rlmq.protocol",
        "rlmq.protocol.sandbox",
        "rlmq.lmhandler",
        "rlmq.lmhandler.backends",
        "rlmq.sandbox",
        "rlmq.orchestrator",
        "rlmq.loadtest",
        "rlmq.fakeprovider",
        "rlmq.eval",
        "rlmq.serve",
        "rlmq.view",
        "rlmq.lmhandler.state",
        "rlmq.facade",
    ],
)
def test_all_names_exist_once(package: str) -> None:
    module = importlib.import_module(package)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing


def test_the_checkout_links_each_folder_into_rlmq() -> None:
    for folder in FOLDERS:
        link = ROOT / "rlmq" / folder
        assert link.is_symlink(), f"rlmq/{folder} should link to ../{folder}"
        assert link.resolve() == (ROOT / folder).resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from this checkout, the way `pip install .` builds one."""
    out = tmp_path_factory.mktemp("wheel")
    had_build = (ROOT / "build").exists()
    # --no-build-isolation: build with the setuptools the test extra installed, offline.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    if not had_build:  # setuptools builds in the checkout; leave it as we found it
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (found,) = out.glob("rlmq-*.whl")
    return found


def test_the_wheel_installs_only_the_name_rlmq(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"rlmq"}
    for folder in FOLDERS:
        assert f"rlmq/{folder}/__init__.py" in names
        assert f"rlmq/{folder}/py.typed" in names
    assert "rlmq/orchestrator/data/demo_script.json" in names


def test_a_wheel_built_from_the_sdist_is_the_same_wheel(wheel: Path, tmp_path: Path) -> None:
    """pip install from an sdist (PyPI's fallback) builds from the sdist alone: it must carry every
    module under its installed name, and nothing else at the top."""
    had_build = (ROOT / "build").exists()
    build_sdist = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    subprocess.run(
        [sys.executable, "-c", build_sdist], cwd=ROOT, check=True, capture_output=True, timeout=120
    )
    (sdist,) = tmp_path.glob("rlmq-*.tar.gz")
    out = tmp_path / "from-sdist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip_wheel, "-w", str(out), str(sdist)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    if not had_build:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (rebuilt,) = out.glob("rlmq-*.whl")

    def modules(path: Path) -> set[str]:
        return {n for n in zipfile.ZipFile(path).namelist() if ".dist-info/" not in n}

    assert modules(rebuilt) == modules(wheel)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_away_from_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Installed alone (no checkout on sys.path), the package imports by its one name and works."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # bin/ holds the console script; the only importable name is rlmq.
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "rlmq"]
    # The dependencies come from this environment; the installed tree goes first on the path.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    probe = (
        "import importlib.util as u, rlmq.protocol, rlmq.sandbox;"
        "print(rlmq.protocol.__file__);"
        "print([n for n in ('protocol', 'sandbox', 'lmhandler', 'orchestrator') if u.find_spec(n)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[0].startswith(str(target))
    assert out[1] == "[]"
    demo = subprocess.run(
        [sys.executable, "-m", "rlmq", "demo", "--tokens", "20000", "--sub-latency-ms", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.strip()

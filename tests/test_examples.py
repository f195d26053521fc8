"""Every example under examples/ runs offline, as a user would start it, and says what it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# example -> lines its output must contain
EXPECTED = {
    "python_api.py": [
        "answer: 2 of 5 reviews are positive",
        "stopped by final after 3 iterations, 8 model calls",
        "async: 2 of 5 reviews are positive / 1 of 2 reviews are positive",
    ],
    "serve_client.py": [
        "models: ['rlm', 'quick']",
        "answer: 2 of 4 reviews are positive",
        "streamed answer: 2 of 4 reviews are positive",
    ],
    "tools_and_sessions.py": [
        "answer 1: A-100 is in transit; A-102 is held at customs",
        "answer 2: 25.00 EUR on average, over 2 late orders",
        "the session made 4 model calls over 4 iterations",
    ],
}


def test_every_example_is_run_here() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_offline(name: str, tmp_path: Path) -> None:
    # From another folder, as `python path/to/example.py`: the examples find their files themselves.
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for line in EXPECTED[name]:
        assert line in lines, done.stdout
    assert "  .. depth 0: stopped (final) after 3 iterations" in lines
    assert not list(tmp_path.iterdir())  # no trajectory or other file left behind

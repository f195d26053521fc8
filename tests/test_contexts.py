"""Turning --context into the value the model sees (rlmq.orchestrator.contexts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlmq.orchestrator.contexts import ContextError, load_context


def test_context_from_file_json_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    assert load_context(str(tmp_path / "a.txt")) == "alpha"
    (tmp_path / "b.json").write_text(json.dumps(["x", "y"]))
    assert load_context(str(tmp_path / "b.json")) == ["x", "y"]
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "one.md").write_text("1")
    (docs / "sub" / "two.txt").write_text("2")
    (docs / "blob.bin").write_bytes(b"\xff\xfe\x00")
    (docs / ".hidden").write_text("secret")
    assert load_context(str(docs)) == {"one.md": "1", "sub/two.txt": "2"}
    with pytest.raises(ContextError, match="does not exist"):
        load_context(str(tmp_path / "nope.txt"))

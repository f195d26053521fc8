"""Turning ``--context`` into the value the model sees as ``context``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .errors import ContextError

__all__ = ["ContextError", "load_context"]


def load_context(spec: str) -> Any:
    """``-`` reads stdin as text; a directory becomes a dict of relative path to text (files that
    are not UTF-8 text are skipped); a ``.json`` file is parsed; any other file is text."""
    if spec == "-":
        return sys.stdin.buffer.read().decode("utf-8", errors="replace")
    path = Path(spec)
    if path.is_dir():
        docs: dict[str, str] = {}
        for file in sorted(path.rglob("*")):
            rel = file.relative_to(path)
            if not file.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            try:
                docs[str(rel)] = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # binary or unreadable: not context for a language model
        if not docs:
            raise ContextError(f"directory {path} holds no readable UTF-8 text files")
        return docs
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ContextError(f"context file {path} does not exist") from None
    except OSError as exc:
        raise ContextError(f"cannot read context file {path}: {exc.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContextError(f"{path} is not valid JSON: {exc}") from None
    return text

"""A chat completion request's body to what a run needs: the profile, the question, the context.

The last message is the question and must come from the user. The context is the body's
extension field ``context`` when present (a string, a list, a dict, or ``{"path": ...}`` naming a
file or directory under the data directory); otherwise the earlier messages: one message's text
is the context string, several are a list of their texts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rlmq.orchestrator import ContextError, load_context

from .errors import BadRequest, Forbidden
from .settings import DEFAULT_PROFILE

__all__ = ["ChatRequest", "load_path_context", "parse_chat_request"]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    question: str
    context: Any  # str | list | dict, or a ContextPath still to be read
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class ContextPath:
    path: str  # relative to the data directory, as the client gave it


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of parts of which only text parts are read."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(f"{where}: only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where}: content must be a string or a list of text parts")


def parse_chat_request(raw: bytes) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model", DEFAULT_PROFILE)
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string (a profile of this server)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    texts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role")
        texts.append(_text(message.get("content"), f"messages[{i}]"))
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must be the question, from the user")
    question = texts[-1]
    if not question.strip():
        raise BadRequest("the question (the last user message) is empty")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, Mapping) else False

    if "context" in body:
        context = _context_field(body["context"])
    else:
        earlier = [t for t in texts[:-1] if t]
        context = earlier[0] if len(earlier) == 1 else earlier if earlier else ""
    return ChatRequest(model, question, context, stream, include_usage)


def _context_field(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"path"}:
        if not isinstance(value["path"], str) or not value["path"]:
            raise BadRequest("context.path must be a non-empty string")
        return ContextPath(value["path"])
    if isinstance(value, str | list | dict):
        return value
    raise BadRequest('context must be a string, a list, an object, or {"path": "..."}')


def _inside(root: Path, path: Path) -> bool:
    return path == root or path.is_relative_to(root)


def load_path_context(data_dir: Path | None, spec: ContextPath) -> Any:
    """Read a ``{"path": ...}`` context under ``data_dir``, never outside it: absolute paths,
    ``..`` and symbolic links that lead out are refused. Blocking: run it in a thread."""
    if data_dir is None:
        raise BadRequest("this server has no data directory ([serve] data_dir): path contexts are off")
    rel = PurePosixPath(spec.path)
    if rel.is_absolute() or ".." in rel.parts or "\\" in spec.path or "\x00" in spec.path:
        raise Forbidden(f"context path {spec.path!r} is not a relative path inside the data directory")
    root = data_dir.resolve()
    target = (root / rel).resolve()  # follows links, so one that leads out is seen here
    if not _inside(root, target):
        raise Forbidden(f"context path {spec.path!r} leads outside the data directory")
    if not target.exists():
        raise BadRequest(f"context path {spec.path!r} does not exist in the data directory")
    if target.is_dir():
        return _directory(root, target, spec.path)
    try:
        return load_context(str(target))
    except ContextError as exc:
        raise BadRequest(exc.message) from None


def _directory(root: Path, directory: Path, name: str) -> dict[str, str]:
    """Like ``rlmq run --context DIR`` (relative path -> text, hidden and non-text files
    skipped), but a file whose link leads outside the data directory is skipped too."""
    docs: dict[str, str] = {}
    for file in sorted(directory.rglob("*")):
        rel = file.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not file.is_file():
            continue
        if not _inside(root, file.resolve()):
            continue
        try:
            docs[str(rel)] = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    if not docs:
        raise BadRequest(f"context directory {name!r} holds no readable UTF-8 text files")
    return docs

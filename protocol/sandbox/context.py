"""A session's ``context``: how a value travels as one blob frame and is read back in the worker.

The payload is never re-encoded between the orchestrator and the worker (the pool forwards the
frame as it came), so a 10M-token document costs one copy on each side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import msgpack

__all__ = ["CONTEXT_FORMATS", "ContextFormat", "context_shape", "decode_context", "encode_context"]


class ContextFormat(StrEnum):
    TEXT = "text"  # UTF-8 bytes -> str
    MSGPACK = "msgpack"  # a msgpack list or map -> list / dict
    JSON = "json"  # a JSON document (context_path ending in .json)


CONTEXT_FORMATS = frozenset(f.value for f in ContextFormat)


def encode_context(
    context: str | bytes | bytearray | memoryview | list[Any] | dict[Any, Any],
) -> tuple[str, Any]:
    """A context value to ``(format, payload)``; the payload is sent as one blob frame."""
    if isinstance(context, str):
        # surrogatepass: a stray surrogate in a huge document should not refuse the whole session;
        # the worker decodes with errors="replace".
        return ContextFormat.TEXT.value, context.encode("utf-8", "surrogatepass")
    if isinstance(context, bytes | bytearray | memoryview):
        return ContextFormat.TEXT.value, context
    if isinstance(context, list | tuple | dict):
        try:
            return ContextFormat.MSGPACK.value, msgpack.packb(context, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(
                f"context must be str, bytes, or a list/dict of plain values (str, numbers, lists, "
                f"dicts): {exc}"
            ) from None
    raise TypeError(f"context must be str, bytes, list or dict, not {type(context).__name__}")


def decode_context(fmt: str, payload: bytes | memoryview) -> Any:
    """The inverse of ``encode_context`` (and of a context file read as ``text`` or ``json``).

    Text that is not valid UTF-8 is decoded with replacement characters rather than refused.
    Raises ``ValueError`` for a document that cannot be parsed.
    """
    if fmt == ContextFormat.TEXT:
        return str(payload, "utf-8", "replace")
    if fmt == ContextFormat.MSGPACK:
        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise ValueError(f"context is not valid msgpack ({type(exc).__name__})") from None
    if fmt == ContextFormat.JSON:
        try:
            return json.loads(str(payload, "utf-8", "replace"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"context is not valid JSON: {exc}") from None
    raise ValueError(f"unknown context format {fmt!r}")


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif depth < 64 and isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item, depth + 1)
    elif depth < 64 and isinstance(value, dict):
        for item in value.values():
            yield from _strings(item, depth + 1)


def context_shape(value: Any) -> tuple[str, int, int]:
    """``(context_type, len(context), total characters of every str inside it)``."""
    kind = "str" if isinstance(value, str) else "list" if isinstance(value, list) else "dict"
    if not isinstance(value, str | list | dict):
        kind = type(value).__name__
    length = len(value) if isinstance(value, str | list | dict) else 0
    chars = sum(len(s) for s in _strings(value))
    return kind, length, chars

"""Readers of msgpack maps, shared by every message of both protocols (handler and sandbox).

Each reader checks one field's presence and type and raises ``DecodeError`` naming the field and
carrying the request id, so a malformed message is answered with ``bad_request`` and its id.
``bool`` is never accepted where a number is asked for, although Python counts it as an int.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import DecodeError

__all__ = ["Wire", "drop_none", "opt_float", "opt_int", "opt_string", "optional", "required", "string"]

Wire = dict[str, Any]


def required(d: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str, rid: str | None) -> Any:
    if key not in d:
        raise DecodeError(f"missing field {key!r}", request_id=rid)
    value = d[key]
    # bool is an int in Python; a wire bool is never a number.
    if isinstance(value, bool) and bool not in kinds:
        raise DecodeError(f"field {key!r} must be {what}, got bool", request_id=rid)
    if not isinstance(value, kinds):
        raise DecodeError(f"field {key!r} must be {what}, got {type(value).__name__}", request_id=rid)
    return value


def optional(d: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str, rid: str | None) -> Any:
    if d.get(key) is None:
        return None
    return required(d, key, kinds, what, rid)


def string(d: Mapping[str, Any], key: str, rid: str | None) -> str:
    value: str = required(d, key, (str,), "a string", rid)
    return value


def opt_string(d: Mapping[str, Any], key: str, rid: str | None) -> str | None:
    value: str | None = optional(d, key, (str,), "a string", rid)
    return value


def opt_int(d: Mapping[str, Any], key: str, rid: str | None, *, minimum: int = 0) -> int | None:
    value: int | None = optional(d, key, (int,), "an integer", rid)
    if value is not None and value < minimum:
        raise DecodeError(f"field {key!r} must be >= {minimum}, got {value}", request_id=rid)
    return value


def opt_float(d: Mapping[str, Any], key: str, rid: str | None) -> float | None:
    value: int | float | None = optional(d, key, (int, float), "a number", rid)
    if value is None:
        return None
    if value < 0:
        raise DecodeError(f"field {key!r} must be >= 0, got {value}", request_id=rid)
    return float(value)


def drop_none(d: Wire) -> Wire:
    return {k: v for k, v in d.items() if v is not None}

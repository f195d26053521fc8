"""Checking a TOML table against a frozen settings dataclass, the same way in every service.

Each service owns a table of the shared ``rlmq.toml`` (``[models.*]`` and ``[handler]`` for the
handler, ``[sandbox]`` for pools, ``[run]`` for orchestrators). A misspelt key or a value of the
wrong type is an error naming the key, the table and the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import RlmqError

__all__ = ["check_table", "field_kinds", "read_toml"]

Kinds = dict[str, tuple[type, ...]]


def field_kinds(cls: type, *, exclude: Iterable[str] = ()) -> Kinds:
    """The TOML value types each field of a dataclass accepts, from its annotation.

    ``int`` fields take integers, ``float`` fields integers or floats, ``bool`` booleans,
    ``tuple`` fields lists, anything else strings; ``X | None`` accepts what ``X`` accepts.
    """
    skip = set(exclude)
    kinds: Kinds = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        annotation = str(f.type)
        if annotation.startswith("int"):
            kinds[f.name] = (int,)
        elif annotation.startswith("float"):
            kinds[f.name] = (int, float)
        elif annotation.startswith("bool"):
            kinds[f.name] = (bool,)
        elif annotation.startswith("tuple"):
            kinds[f.name] = (list,)
        else:
            kinds[f.name] = (str,)
    return kinds


def check_table(
    table: Mapping[str, Any],
    kinds: Mapping[str, tuple[type, ...]],
    *,
    where: str,
    source: str,
    error: type[RlmqError],
) -> None:
    """Raise ``error`` for the first unknown key or mistyped value of ``[where]``."""
    unknown = sorted(set(table) - set(kinds))
    if unknown:
        known = ", ".join(sorted(kinds))
        raise error(f"{source}: unknown key {unknown[0]!r} in [{where}]; known keys: {known}")
    for key, value in table.items():
        accepted = kinds[key]
        # TOML booleans are Python ints; a boolean where a number belongs is a mistake.
        if isinstance(value, bool) and bool not in accepted:
            raise error(f"{source}: [{where}] {key} must be {accepted[0].__name__}, got a boolean")
        if not isinstance(value, accepted):
            got = type(value).__name__
            raise error(f"{source}: [{where}] {key} must be {accepted[0].__name__}, got {got}")


def read_toml(path: str | os.PathLike[str], *, error: type[RlmqError]) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or invalid file raises ``error``."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"config file {path} does not exist") from None
    except OSError as exc:
        raise error(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None

"""``rlmq serve``'s settings: the ``[serve]`` table of rlmq.toml and its RLM profiles.

    [serve]
    bind = "127.0.0.1:8080"       # --bind wins
    data_dir = "data"             # {"path": ...} contexts are read under it (relative: to this file)
    api_keys = ["sk-local-1"]     # bearer keys; and/or api_keys_env = "RLMQ_SERVE_KEYS" (comma-separated)
    max_body_bytes = 67108864

    [serve.profiles.fast]         # the model name "fast": the [run] settings, then these
    max_iterations = 5

The profile ``rlm`` always exists: the ``[run]`` table as it is, unless ``[serve.profiles.rlm]``
changes it. Built once at the entry point; nothing else reads the file or the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmq.orchestrator import RunSettings, load_run_settings
from rlmq.protocol import ConfigError
from rlmq.protocol.tables import check_table, field_kinds, read_toml

__all__ = ["DEFAULT_PROFILE", "ServeConfig", "ServeSettings", "load_serve_config", "parse_bind"]

DEFAULT_PROFILE = "rlm"


@dataclass(frozen=True, slots=True)
class ServeSettings:
    bind: str = "127.0.0.1:8080"
    data_dir: str = ""  # "" refuses {"path": ...} contexts
    api_keys: tuple[str, ...] = ()
    api_keys_env: str = ""  # an environment variable holding comma-separated keys
    max_body_bytes: int = 64 * 1024 * 1024  # a request body, context included
    trajectory_dir: str = ""  # "" writes none; relative: to the working directory
    shutdown_grace_s: float = 10.0  # on SIGTERM, runs in flight get this long before they are cancelled
    keepalive_s: float = 15.0  # a streamed answer sends an SSE comment after this long without news


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything ``rlmq serve`` needs, resolved: the table, the keys, the data directory (absolute,
    or None) and each profile's run settings (their differences from ``[run]``)."""

    settings: ServeSettings
    host: str
    port: int
    keys: frozenset[str]
    data_dir: Path | None
    run: RunSettings
    profiles: Mapping[str, Mapping[str, Any]]  # name -> run settings that differ from [run]
    source: str = "<memory>"

    @property
    def open_access(self) -> bool:
        return not self.keys


_KINDS = field_kinds(ServeSettings)
_RUN_KINDS = field_kinds(RunSettings)


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) to its parts."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"bind must be HOST:PORT, not {bind!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_serve_config(
    path: str | Path,
    *,
    bind: str | None = None,
    data_dir: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Read ``[serve]``, its profiles and ``[run]`` from ``path``; ``bind`` and ``data_dir`` (flags)
    win over the table; ``env`` resolves ``api_keys_env`` (the entry point's ``os.environ``)."""
    source = str(path)
    data = read_toml(path, error=ConfigError)
    table = data.get("serve", {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [serve] must be a table")
    profiles_table = table.get("profiles", {})
    if not isinstance(profiles_table, Mapping):
        raise ConfigError(f"{source}: [serve.profiles] must hold tables, one per profile")
    values = {k: v for k, v in table.items() if k != "profiles"}
    check_table(values, _KINDS, where="serve", source=source, error=ConfigError)
    if "api_keys" in values:
        keys_list = values["api_keys"]
        if not all(isinstance(k, str) and k for k in keys_list):
            raise ConfigError(f"{source}: [serve] api_keys must be a list of non-empty strings")
        values["api_keys"] = tuple(keys_list)
    if bind is not None:
        values["bind"] = bind
    if data_dir is not None:
        values["data_dir"] = data_dir
    settings = ServeSettings(**values)
    if settings.max_body_bytes < 1024:
        raise ConfigError(f"{source}: [serve] max_body_bytes must be at least 1024")
    if settings.shutdown_grace_s < 0 or settings.keepalive_s <= 0:
        raise ConfigError(f"{source}: [serve] shutdown_grace_s must be >= 0 and keepalive_s positive")
    host, port = parse_bind(settings.bind)

    keys = set(settings.api_keys)
    if settings.api_keys_env:
        raw = (env or {}).get(settings.api_keys_env, "")
        keys.update(k.strip() for k in raw.split(",") if k.strip())
    # No keys is open access: only where nobody but this machine can reach it.
    if not keys and not is_loopback(host):
        raise ConfigError(
            f"{source}: binding {settings.bind} beyond loopback needs bearer keys; set [serve] "
            "api_keys or api_keys_env (no keys means open access, allowed on loopback only)"
        )

    base = Path(source).parent
    directory = None
    if settings.data_dir:
        directory = (base / settings.data_dir).resolve()
        if not directory.is_dir():
            raise ConfigError(f"{source}: [serve] data_dir {directory} is not a directory")

    run = load_run_settings(path, {})
    profiles: dict[str, Mapping[str, Any]] = {DEFAULT_PROFILE: {}}
    for name, profile in profiles_table.items():
        where = f"serve.profiles.{name}"
        if not isinstance(profile, Mapping):
            raise ConfigError(f"{source}: [{where}] must be a table of run settings")
        check_table(profile, _RUN_KINDS, where=where, source=source, error=ConfigError)
        try:
            dataclasses.replace(run, **profile).validated()
        except ConfigError as exc:
            raise ConfigError(f"{source}: [{where}] {exc.message}") from None
        profiles[str(name)] = dict(profile)
    return ServeConfig(settings, host, port, frozenset(keys), directory, run, profiles, source)

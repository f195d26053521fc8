"""The handler's settings: frozen dataclasses built once from the TOML file and the environment.

Only ``load_config`` reads the file; the environment (for the API key variables the file names)
is an argument, handed in by the entry point (``rlmq handler`` passes ``os.environ``): no
function here reads ``os.environ`` on its own. Everything else receives a ``HandlerConfig``.
Unknown keys are errors naming the key and the file, because a misspelt ``max_concurency``
silently ignored is a production incident.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlmq.protocol import DEFAULT_MAX_MESSAGE_BYTES, ConfigError
from rlmq.protocol.tables import check_table, field_kinds, read_toml

__all__ = [
    "BACKENDS",
    "ConfigError",
    "HandlerConfig",
    "ModelConfig",
    "load_config",
    "parse_config",
]

BACKENDS = frozenset({"anthropic", "openai", "echo", "script"})
HTTP_BACKENDS = frozenset({"anthropic", "openai"})
DEFAULT_BIND = "tcp://127.0.0.1:5555"
# Tables of the shared rlmq.toml that other services read and validate.
OTHER_TABLES = frozenset({"sandbox", "run"})
# echo and script are not a provider to protect: let them run as wide as the handler allows.
OFFLINE_CONCURRENCY = 100_000


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model alias. Prices are USD per million tokens; cache prices default to the
    provider's usual multiples of the input price (read 0.1x, write 1.25x)."""

    alias: str
    backend: str
    model: str = ""
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)  # resolved from api_key_env, never logged
    max_concurrency: int = 256  # offline backends default to OFFLINE_CONCURRENCY
    rpm: int | None = None
    tpm: int | None = None
    timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    max_tokens: int = 4096
    max_retries: int = 6  # the retry budget, not this, bounds what retries add in an outage
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    price_cache_read_per_mtok: float | None = None
    price_cache_write_per_mtok: float | None = None
    cache_entries: int = 0  # response cache size; 0 turns it off
    retry_budget_ratio: float = 0.5  # retries may be at most this share of recent requests
    breaker_threshold: int = 5  # consecutive provider-down errors that open the circuit
    breaker_cooldown_s: float = 2.0  # fail fast this long, then probe (doubling up to 30 s)
    prompt_caching: bool = True  # anthropic: mark the stable prefix with cache_control
    latency_ms: float = 0.0  # echo
    path: str | None = None  # script: JSON list of strings

    def cost_usd(self, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int) -> float:
        read_price = self.price_cache_read_per_mtok
        if read_price is None:
            read_price = self.price_in_per_mtok * 0.1
        write_price = self.price_cache_write_per_mtok
        if write_price is None:
            write_price = self.price_in_per_mtok * 1.25
        plain = max(0, input_tokens - cache_read - cache_write)
        return (
            plain * self.price_in_per_mtok
            + cache_read * read_price
            + cache_write * write_price
            + output_tokens * self.price_out_per_mtok
        ) / 1_000_000


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    models: Mapping[str, ModelConfig]
    bind: str = DEFAULT_BIND
    also_bind: tuple[str, ...] = ()  # more endpoints on the same socket (`--bind` repeated)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_in_flight: int = 100_000  # beyond this, requests are refused with `overloaded`
    shutdown_grace_s: float = 10.0
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    source: str = "<memory>"


_MODEL_KINDS = field_kinds(ModelConfig, exclude=("alias", "api_key"))
_HANDLER_KINDS = field_kinds(HandlerConfig, exclude=("models", "source", "also_bind"))


def _model(alias: str, table: Any, source: str, env: Mapping[str, str]) -> ModelConfig:
    where = f"models.{alias}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [{where}] must be a table")
    check_table(table, _MODEL_KINDS, where=where, source=source, error=ConfigError)
    if "backend" not in table:
        raise ConfigError(f"{source}: [{where}] needs 'backend' (one of {', '.join(sorted(BACKENDS))})")
    backend = table["backend"]
    if backend not in BACKENDS:
        raise ConfigError(
            f"{source}: [{where}] backend {backend!r} is not one of {', '.join(sorted(BACKENDS))}"
        )
    if backend in HTTP_BACKENDS and not table.get("model"):
        raise ConfigError(f"{source}: [{where}] needs 'model', the provider's model name")
    if backend == "script" and not table.get("path"):
        raise ConfigError(f"{source}: [{where}] backend 'script' needs 'path' to a JSON list of strings")
    for key in ("max_concurrency", "max_tokens", "rpm", "tpm"):
        if key in table and table[key] < 1:
            raise ConfigError(f"{source}: [{where}] {key} must be at least 1")
    for key in ("timeout_s", "connect_timeout_s"):
        if key in table and table[key] <= 0:
            raise ConfigError(f"{source}: [{where}] {key} must be positive")
    values = dict(table)
    if backend == "script" and not Path(values["path"]).is_absolute() and source != "<memory>":
        values["path"] = str(Path(source).parent / values["path"])
    api_key = None
    if table.get("api_key_env"):
        api_key = env.get(table["api_key_env"])
        if backend == "anthropic" and not api_key:
            raise ConfigError(
                f"{source}: [{where}] reads its API key from ${table['api_key_env']}, which is not set"
            )
    values.setdefault("model", alias)
    if backend not in HTTP_BACKENDS:
        values.setdefault("max_concurrency", OFFLINE_CONCURRENCY)
    return ModelConfig(alias=alias, api_key=api_key, **values)


def parse_config(
    data: Mapping[str, Any], *, source: str = "<memory>", env: Mapping[str, str] | None = None
) -> HandlerConfig:
    """Build a ``HandlerConfig`` from an already parsed TOML document. ``env`` resolves the
    ``api_key_env`` names; ``None`` is an empty environment (no keys)."""
    env = {} if env is None else env
    unknown = sorted(set(data) - {"models", "handler", *OTHER_TABLES})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level table {unknown[0]!r}; expected [models.*], [handler], "
            + ", ".join(f"[{t}]" for t in sorted(OTHER_TABLES))
        )
    models_table = data.get("models")
    if not isinstance(models_table, Mapping) or not models_table:
        raise ConfigError(f"{source}: no models configured; add at least one [models.NAME] table")
    models = {alias: _model(alias, t, source, env) for alias, t in models_table.items()}
    handler = data.get("handler", {})
    if not isinstance(handler, Mapping):
        raise ConfigError(f"{source}: [handler] must be a table")
    check_table(handler, _HANDLER_KINDS, where="handler", source=source, error=ConfigError)
    return HandlerConfig(models=models, source=source, **handler)


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str]) -> HandlerConfig:
    """Read and validate a TOML config file; ``env`` is the environment its ``api_key_env`` names
    are looked up in (the entry point's ``os.environ``, or a test's own mapping)."""
    return parse_config(read_toml(path, error=ConfigError), source=str(path), env=env)

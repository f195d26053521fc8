"""The handler's settings: frozen dataclasses built once from the TOML file and the environment.

Only ``load_config`` reads the file; the environment (the API key variables the file names, and
``RLMQ_STATE_URL``) is an argument, handed in by the entry point (``rlmq handler`` passes
``os.environ``): no function here reads ``os.environ`` on its own. Everything else receives a
``HandlerConfig``. Unknown keys are errors naming the key and the file, because a misspelt
``max_concurency`` silently ignored is a production incident.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlmq.protocol import DEFAULT_MAX_MESSAGE_BYTES, ConfigError
from rlmq.protocol.tables import check_table, field_kinds, read_toml

__all__ = [
    "BACKENDS",
    "DEFAULT_KEY_ENV",
    "GENERIC_CONTEXT_WINDOW_TOKENS",
    "ConfigError",
    "HandlerConfig",
    "ModelConfig",
    "StateConfig",
    "default_context_window",
    "is_loopback_url",
    "load_config",
    "parse_config",
]

BACKENDS = frozenset({"anthropic", "openai", "echo", "script"})
HTTP_BACKENDS = frozenset({"anthropic", "openai"})
DEFAULT_BIND = "tcp://127.0.0.1:5555"
# Tables of the shared rlmq.toml that other services read and validate.
OTHER_TABLES = frozenset({"sandbox", "run", "serve"})
HANDLER_TABLES = frozenset({"models", "handler", "state"})
# echo and script are not a provider to protect: let them run as wide as the handler allows.
OFFLINE_CONCURRENCY = 100_000
# The variable an HTTP backend reads its key from when the config names none and talks to the
# provider's own API (no base_url). A gateway or a local server at a base_url gets no key unless
# api_key_env names one: sending the provider's key to a third party would leak it.
DEFAULT_KEY_ENV: Mapping[str, str] = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}

# Context windows (prompt tokens a model reads) by model-name prefix, most specific first. The
# default of a model the table does not know is GENERIC_CONTEXT_WINDOW_TOKENS: the window of
# most open models served locally, so a prompt a local server would silently truncate is refused
# instead; set context_window_tokens in the model's table to lift it.
GENERIC_CONTEXT_WINDOW_TOKENS = 32_768
# echo and script read anything: their window only bounds what a test sets it to.
OFFLINE_CONTEXT_WINDOW_TOKENS = 1 << 40
_WINDOWS: tuple[tuple[str, int], ...] = (
    ("claude", 200_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-5", 272_000),  # the input limit; the 400k window counts 128k of output
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4", 8_192),
    ("gpt-3.5", 16_385),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("gemini", 1_048_576),
    ("qwen3-coder", 262_144),
    ("qwen", 32_768),  # qwen2.5 and qwen3 natively; 128k only with YaRN switched on
    ("llama-4", 131_072),
    ("llama-3.1", 131_072),
    ("llama-3.2", 131_072),
    ("llama-3.3", 131_072),
    ("llama-3", 8_192),
    ("llama-2", 4_096),
    ("gemma-3n", 32_768),
    ("gemma-3", 131_072),
    ("gemma", 8_192),
    ("mistral-large", 131_072),
    ("mistral", 32_768),
    ("mixtral", 32_768),
    ("deepseek", 131_072),
)


def default_context_window(backend: str, model: str) -> int:
    """The context window of ``model`` by its family, in tokens (see the table above).

    The name is matched after any ``vendor/`` prefix (``meta-llama/Llama-3.1-8B``) and with
    ``_``, ``:`` and spaces read as ``-`` (``llama3.1:8b``, ``Llama 3.1``)."""
    if backend not in HTTP_BACKENDS:
        return OFFLINE_CONTEXT_WINDOW_TOKENS
    name = model.rsplit("/", 1)[-1].lower().replace("_", "-").replace(" ", "-").replace(":", "-")
    name = name.removeprefix("meta-").replace("llama3", "llama-3").replace("gemma3", "gemma-3")
    if name.startswith("qwen3") and "2507" in name:  # the July 2025 releases read 256k natively
        return 262_144
    for prefix, tokens in _WINDOWS:
        if name.startswith(prefix):
            return tokens
    return GENERIC_CONTEXT_WINDOW_TOKENS


def is_loopback_url(url: str | None) -> bool:
    """Whether ``url`` names this machine (localhost, 127.0.0.0/8, ::1)."""
    if not url:
        return False
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model alias. Prices are USD per million tokens; cache prices default to the
    provider's usual multiples of the input price (read 0.1x, write 1.25x)."""

    alias: str
    backend: str
    model: str = ""
    base_url: str | None = None
    # Where the key comes from; the backend's usual variable when unset and base_url is unset.
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
    # Prompt tokens the model reads at most; 0: the default of its family (default_context_window).
    # A prompt estimated over it is refused before it is sent (too_large).
    context_window_tokens: int = 0

    def __post_init__(self) -> None:
        if self.context_window_tokens <= 0:
            window = default_context_window(self.backend, self.model or self.alias)
            object.__setattr__(self, "context_window_tokens", window)

    @property
    def keyless_ok(self) -> bool:
        """A server on this machine may run without a key (llama.cpp, vLLM, Ollama)."""
        return is_loopback_url(self.base_url)

    def key_problem(self) -> str | None:
        """One line naming the unset key variable and the alias, or None when nothing is missing."""
        if self.backend not in HTTP_BACKENDS or self.api_key or not self.api_key_env:
            return None
        line = (
            f"model {self.alias!r} ({self.backend}): no API key: ${self.api_key_env} is not set; "
            f"export it, or name the variable that holds it with api_key_env in [models.{self.alias}]"
        )
        if self.keyless_ok:
            line += f" (calls go to {self.base_url} without a key)"
        return line

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


STATE_SCHEMES = ("redis", "rediss", "unix")
STATE_URL_ENV = "RLMQ_STATE_URL"  # overrides [state] url: how rlmq up hands its handlers a private Redis


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where budgets, pacing, the response cache and finished replies live.

    No ``url``: in this process (the default; nothing to install, lost with the process). A
    ``redis://HOST:PORT/DB`` url: in Redis, shared by every handler given the same url and
    surviving their restarts (docs/state.md)."""

    url: str | None = None
    key_prefix: str = "rlmq:"  # every key starts with it: several deployments may share a Redis
    timeout_s: float = 2.0  # bound on each Redis operation, queueing in a burst included
    connect_timeout_s: float = 2.0
    max_connections: int = 64  # per handler process
    cache_ttl_s: float = 86_400.0  # Redis: how long a cached response lives
    replay_ttl_s: float = 600.0  # a finished reply is replayed to a re-sent request id this long; 0: off
    replay_entries: int = 100_000  # in-process: at most this many finished replies are remembered
    closed_run_ttl_s: float = 86_400.0  # Redis: a closed run (its totals) is remembered this long
    run_ttl_s: float = 7 * 86_400.0  # Redis: an open run no call has used for this long is dropped

    @property
    def shared(self) -> bool:
        return self.url is not None

    def redacted_url(self) -> str:
        """The url without its password, fit for logs and errors."""
        if self.url is None:
            return "<in-process>"
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return parts._replace(netloc=user + netloc).geturl()


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
    # Calls that name no run (load tests, direct users): None decides by the endpoint, on for
    # loopback and ipc, off when the handler has CURVE keys (docs/security.md).
    allow_anonymous: bool | None = None
    state: StateConfig = field(default_factory=StateConfig)  # [state]: in-process unless a url is set
    source: str = "<memory>"


_MODEL_KINDS = field_kinds(ModelConfig, exclude=("alias", "api_key"))
_HANDLER_KINDS = field_kinds(HandlerConfig, exclude=("models", "source", "also_bind", "state"))
_STATE_KINDS = field_kinds(StateConfig)


def _state(table: Any, source: str, env: Mapping[str, str]) -> StateConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [state] must be a table")
    check_table(table, _STATE_KINDS, where="state", source=source, error=ConfigError)
    url = table.get("url")
    where = f"{source}: [state] url"
    if env.get(STATE_URL_ENV):  # set and not empty: it wins over the file (rlmq up's private Redis)
        url = env[STATE_URL_ENV]
        where = f"${STATE_URL_ENV} (which overrides [state] url in {source})"
        table = {**table, "url": url}
    if url is not None:
        scheme = urlsplit(url).scheme
        if scheme not in STATE_SCHEMES:
            raise ConfigError(
                f"{where} {url!r} is not a Redis url; expected redis://HOST:PORT/DB "
                "(or rediss://, unix://), or no url for in-process state"
            )
    for key in ("timeout_s", "connect_timeout_s", "cache_ttl_s", "closed_run_ttl_s", "run_ttl_s"):
        if key in table and table[key] <= 0:
            raise ConfigError(f"{source}: [state] {key} must be positive")
    if table.get("replay_ttl_s", 0) < 0:
        raise ConfigError(f"{source}: [state] replay_ttl_s must be 0 (off) or positive")
    for key in ("max_connections", "replay_entries"):
        if key in table and table[key] < 1:
            raise ConfigError(f"{source}: [state] {key} must be at least 1")
    return StateConfig(**table)


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
    for key in ("max_concurrency", "max_tokens", "rpm", "tpm", "context_window_tokens"):
        if key in table and table[key] < 1:
            raise ConfigError(f"{source}: [{where}] {key} must be at least 1")
    for key in ("timeout_s", "connect_timeout_s"):
        if key in table and table[key] <= 0:
            raise ConfigError(f"{source}: [{where}] {key} must be positive")
    values = dict(table)
    if backend == "script" and not Path(values["path"]).is_absolute() and source != "<memory>":
        values["path"] = str(Path(source).parent / values["path"])
    # A missing key does not stop the handler (its other models may serve): it is reported at
    # start and on every use (ModelConfig.key_problem), and the call fails without being sent.
    api_key = None
    if not values.get("api_key_env") and backend in HTTP_BACKENDS and not values.get("base_url"):
        values["api_key_env"] = DEFAULT_KEY_ENV[backend]
    if values.get("api_key_env"):
        api_key = env.get(values["api_key_env"]) or None
    values.setdefault("model", alias)
    if backend not in HTTP_BACKENDS:
        values.setdefault("max_concurrency", OFFLINE_CONCURRENCY)
    return ModelConfig(alias=alias, api_key=api_key, **values)


def parse_config(
    data: Mapping[str, Any], *, source: str = "<memory>", env: Mapping[str, str] | None = None
) -> HandlerConfig:
    """Build a ``HandlerConfig`` from an already parsed TOML document. ``env`` resolves the
    ``api_key_env`` names, and its ``RLMQ_STATE_URL`` (when not empty) overrides ``[state] url``;
    ``None`` is an empty environment (no keys, no override)."""
    env = {} if env is None else env
    unknown = sorted(set(data) - HANDLER_TABLES - OTHER_TABLES)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level table {unknown[0]!r}; expected [models.*], [handler], [state], "
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
    state = _state(data.get("state", {}), source, env)
    return HandlerConfig(models=models, source=source, state=state, **handler)


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str]) -> HandlerConfig:
    """Read and validate a TOML config file; ``env`` is the environment its ``api_key_env`` names
    are looked up in (the entry point's ``os.environ``, or a test's own mapping)."""
    return parse_config(read_toml(path, error=ConfigError), source=str(path), env=env)

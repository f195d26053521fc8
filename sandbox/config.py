"""The pool's settings: one frozen dataclass, built once from flags and the ``[sandbox]`` table.

Only ``load_table`` reads a file. Unknown keys are errors naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlmq.protocol.errors import ConfigError
from rlmq.protocol.tables import check_table, field_kinds, read_toml

from .runtime import DEFAULT_MAX_SUB_CALLS
from .spec import DEFAULT_MAX_BATCH, DEFAULT_PREIMPORT

__all__ = ["DEFAULT_BIND", "ISOLATIONS", "ConfigError", "PoolConfig", "build_config", "load_table"]

DEFAULT_BIND = "tcp://127.0.0.1:5556"
ISOLATIONS = ("process", "bwrap")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Everything the pool needs. Units are in the names; ``None`` for ``uid_base`` keeps the
    workers at the pool's uid (the only choice when the pool does not run as root)."""

    handler: str = ""  # the LM handler the workers send llm_query to
    bind: str = DEFAULT_BIND
    workers: int = 2  # warm workers kept READY ahead of demand
    max_sessions: int = 64  # beyond this, open is refused with `overloaded`
    exec_timeout_s: float = 120.0  # default per exec; a session may ask for another at open
    max_output_chars: int = 20_000  # per stream (stdout, stderr) per exec
    max_sub_calls_per_exec: int = DEFAULT_MAX_SUB_CALLS  # llm_query prompts + rlm_query calls per exec
    # llm_query calls of a session in flight at once: llm_query_batched sends waves of this many,
    # and the relay refuses (`overloaded`) any call past it
    max_batch: int = DEFAULT_MAX_BATCH
    memory_mb: int = 4096  # RLIMIT_AS of the code-running process
    cpu_s: int = 600  # RLIMIT_CPU over the worker's life
    fsize_mb: int = 256  # RLIMIT_FSIZE: the largest file the code may write
    nproc: int = 128  # RLIMIT_NPROC of the worker's uid, and its pids cgroup (+ a few for us)
    isolation: str = "process"  # "process" or "bwrap" (docs/security.md)
    # Workers get no network (a namespace of their own); true gives them the host's network.
    network: bool = False
    uid_base: int | None = 61000  # when root: worker n runs as a uid of [uid_base, uid_base+uid_count)
    uid_count: int = 4096
    cgroup: bool = True  # when root: a pids cgroup per worker (cgroup v1)
    tmp_size_mb: int = 512  # bwrap: size of the private /tmp (memory-backed)
    open_timeout_s: float = 30.0  # a worker must become ready and load the context within this
    idle_timeout_s: float = 3600.0  # a session with no exec for this long is closed
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3  # silent for interval x liveness: the worker is lost
    kill_grace_s: float = 3.0  # after a kill, how long the worker's nanny may take to clean up
    max_context_bytes: int = 1024 * 1024 * 1024
    python: str = ""  # the workers' interpreter; "" is the pool's own
    preimport: tuple[str, ...] = tuple(DEFAULT_PREIMPORT)

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.workers >= 0, "workers must be >= 0"),
            (self.max_sessions >= 1, "max_sessions must be >= 1"),
            (self.exec_timeout_s > 0, "exec_timeout_s must be positive"),
            (self.max_output_chars >= 100, "max_output_chars must be >= 100"),
            (self.max_sub_calls_per_exec >= 1, "max_sub_calls_per_exec must be >= 1"),
            (self.max_batch >= 1, "max_batch must be >= 1"),
            (self.memory_mb >= 256, "memory_mb must be >= 256 (the interpreter and ZeroMQ need room)"),
            (self.cpu_s >= 1, "cpu_s must be >= 1"),
            (self.fsize_mb >= 1, "fsize_mb must be >= 1"),
            (self.nproc >= 8, "nproc must be >= 8 (the worker's own threads count)"),
            (self.isolation in ISOLATIONS, f"isolation must be one of {', '.join(ISOLATIONS)}"),
            (self.uid_base is None or self.uid_base >= 1000, "uid_base must be >= 1000"),
            (self.uid_count >= 1, "uid_count must be >= 1"),
            (self.tmp_size_mb >= 1, "tmp_size_mb must be >= 1"),
            (self.open_timeout_s > 0, "open_timeout_s must be positive"),
            (self.idle_timeout_s > 0, "idle_timeout_s must be positive"),
            (self.heartbeat_interval_s > 0, "heartbeat_interval_s must be positive"),
            (self.heartbeat_liveness >= 1, "heartbeat_liveness must be >= 1"),
            (self.kill_grace_s > 0, "kill_grace_s must be positive"),
            (self.max_context_bytes >= 1, "max_context_bytes must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def heartbeat_expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness


_KINDS = field_kinds(PoolConfig)
_KINDS["uid_base"] = (int, bool)  # `uid_base = false` in TOML: keep the pool's uid


def build_config(table: Mapping[str, Any], *, source: str = "<memory>", **overrides: Any) -> PoolConfig:
    """A ``PoolConfig`` from a ``[sandbox]`` table; ``overrides`` (flags) win over the table."""
    check_table(table, _KINDS, where="sandbox", source=source, error=ConfigError)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "uid_base" and isinstance(value, bool):
            if value:
                raise ConfigError(
                    f"{source}: [sandbox] uid_base must be a uid, or false to keep the pool's uid"
                )
            value = None
        if key == "preimport":
            if not all(isinstance(m, str) for m in value):
                raise ConfigError(f"{source}: [sandbox] preimport must be a list of module names")
            value = tuple(value)
        values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PoolConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: [sandbox] {exc.message}") from None


def load_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``[sandbox]`` table of a TOML file (the shared rlmq.toml); empty if it has none."""
    table = read_toml(path, error=ConfigError).get("sandbox", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [sandbox] must be a table")
    return table


def replace(config: PoolConfig, **changes: Any) -> PoolConfig:
    return dataclasses.replace(config, **changes)

"""Run settings: one frozen dataclass, built once from flags and the ``[run]`` table of rlmq.toml."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlmq.protocol import RunLimits
from rlmq.protocol.tables import check_table, field_kinds, read_toml

from .errors import SettingsError
from .prompts import ENDINGS

__all__ = ["RunSettings", "SettingsError", "load_run_settings"]

COMPACTION_MODES = ("window", "summary")


@dataclass(frozen=True, slots=True)
class RunSettings:
    root_model: str = "root"
    sub_model: str = "sub"
    max_iterations: int = 30
    max_depth: int = 1  # 1: llm_query is a plain model call and rlm_query is off
    wall_time_s: float | None = None
    max_calls: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_cost_usd: float | None = None
    max_tokens: int | None = None  # per root-model response; None: the handler's default
    temperature: float | None = None
    exec_timeout_s: float = 120.0
    max_output_chars: int = 20_000  # of one code block's output, as the model sees it
    history_max_chars: int = 400_000  # past this, older turns are compacted
    compaction: str = "window"  # window | summary
    keep_last_turns: int = 4  # turns (assistant + observation) kept whole by compaction
    model_timeout_s: float = 600.0
    # Which endings the system prompt teaches: final (FINAL/FINAL_VAR), answer (the answer dict
    # of rlms >= 0.1.2) or both. Every ending ends the run, whatever is taught.
    endings: str = "final"
    # Host-side tools: how long one call may take (None: no limit).
    tool_timeout_s: float | None = 60.0
    # Modules the worker imports into the REPL at session open (pure helpers: their public names,
    # and the module under its last name). One it cannot import fails the session's open.
    sandbox_modules: tuple[str, ...] = ()
    # Sub-call records in the trajectory: prompts longer than this keep their head and tail
    # (half each). None: sub-calls are not recorded (the pool sends no records at all).
    record_chars: int | None = 2_000

    def __post_init__(self) -> None:
        # A TOML list, or a list given in Python, is kept as a tuple: the settings stay hashable.
        if isinstance(self.sandbox_modules, str):
            raise SettingsError("sandbox_modules must be a list of module names, not a str")
        object.__setattr__(self, "sandbox_modules", tuple(self.sandbox_modules))

    def limits(self) -> RunLimits:
        return RunLimits(
            max_calls=self.max_calls,
            max_input_tokens=self.max_input_tokens,
            max_output_tokens=self.max_output_tokens,
            max_cost_usd=self.max_cost_usd,
            deadline_s=self.wall_time_s,
        )

    def validated(self) -> RunSettings:
        if self.max_iterations < 1:
            raise SettingsError("max_iterations must be at least 1")
        if self.max_depth < 1:
            raise SettingsError("max_depth must be at least 1 (1 = no recursion)")
        if self.compaction not in COMPACTION_MODES:
            raise SettingsError(
                f"compaction must be one of {', '.join(COMPACTION_MODES)}, not {self.compaction!r}"
            )
        if self.endings not in ENDINGS:
            raise SettingsError(f"endings must be one of {', '.join(ENDINGS)}, not {self.endings!r}")
        if self.keep_last_turns < 1:
            raise SettingsError("keep_last_turns must be at least 1")
        if self.tool_timeout_s is not None and self.tool_timeout_s <= 0:
            raise SettingsError("tool_timeout_s must be positive")
        if self.record_chars is not None and self.record_chars < 0:
            raise SettingsError("record_chars must be >= 0 (or none, to record no sub-calls)")
        for name in self.sandbox_modules:
            if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
                raise SettingsError(f"sandbox_modules: {name!r} is not a module name")
        return self


_KINDS = field_kinds(RunSettings)


def settings_from_table(table: Mapping[str, Any], *, source: str = "<memory>") -> RunSettings:
    check_table(table, _KINDS, where="run", source=source, error=SettingsError)
    return RunSettings(**table)


def load_run_settings(path: str | Path | None, overrides: Mapping[str, Any]) -> RunSettings:
    """Settings from the ``[run]`` table of ``path`` (if it exists), then ``overrides`` (flags)."""
    settings = RunSettings()
    if path is not None and Path(path).exists():
        table = read_toml(path, error=SettingsError).get("run", {})
        if not isinstance(table, Mapping):
            raise SettingsError(f"{path}: [run] must be a table")
        settings = settings_from_table(table, source=str(path))
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(settings, **given).validated()

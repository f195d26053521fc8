"""Run settings from the [run] table and flags (rlmq.orchestrator.settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmq.orchestrator.settings import RunSettings, SettingsError, load_run_settings
from rlmq.protocol import ConfigError


def test_settings_from_config_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.root]\nbackend = "echo"\n[run]\nmax_iterations = 7\ncompaction = "summary"\n')
    settings = load_run_settings(config, {"max_depth": 2, "max_calls": None})
    assert (settings.max_iterations, settings.max_depth, settings.compaction) == (7, 2, "summary")
    assert settings.limits().max_calls is None
    config.write_text("[run]\nmax_iteration = 7\n")
    with pytest.raises(SettingsError, match="unknown key 'max_iteration'"):
        load_run_settings(config, {})
    with pytest.raises(SettingsError, match="max_depth"):
        load_run_settings(None, {"max_depth": 0})
    assert load_run_settings(tmp_path / "missing.toml", {}) == RunSettings()


def test_settings_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="compaction must be one of window, summary"):
        RunSettings(compaction="squash").validated()


def test_endings_choose_what_the_prompt_teaches(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[run]\nendings = "answer"\n')
    assert load_run_settings(config, {}).endings == "answer"
    assert RunSettings().endings == "final"
    with pytest.raises(SettingsError, match="endings must be one of final, answer, both"):
        RunSettings(endings="json").validated()

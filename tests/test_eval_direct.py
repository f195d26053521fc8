"""The direct baseline's prompt: the whole context, or its head and a note when it does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmq.eval import DEFAULT_CONTEXT_WINDOW_TOKENS, context_window_tokens, direct_prompt
from rlmq.lmhandler.config import default_context_window
from rlmq.protocol import ConfigError

CONTEXT = "\n".join(f"line {i:05d} of the record" for i in range(10_000))  # 250K characters


def test_a_context_that_fits_goes_whole_with_the_question_after_it() -> None:
    prompt, cut = direct_prompt(CONTEXT, "How many lines?", window_tokens=128_000, answer_tokens=4_096)
    assert cut == 0
    assert CONTEXT in prompt
    assert prompt.endswith("Question: How many lines?")
    assert "[Note" not in prompt


def test_a_context_too_long_is_cut_at_a_line_end_with_a_note() -> None:
    prompt, cut = direct_prompt(CONTEXT, "How many lines?", window_tokens=20_000, answer_tokens=4_096)
    assert len(prompt) // 4 <= 20_000 - 4_096
    kept = prompt.split("\n\n[Note")[0].removeprefix("Context:\n\n")
    assert CONTEXT.startswith(kept)
    assert kept.endswith("of the record")  # a whole line
    assert cut == (len(CONTEXT) - len(kept)) // 4
    assert "context window of 20,000 tokens" in prompt
    assert f"of {len(CONTEXT) // 4:,} tokens are shown" in prompt
    assert prompt.endswith("Question: How many lines?")


def test_the_context_window_comes_from_the_root_models_table(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text(
        '[models.root]\nbackend = "echo"\ncontext_window_tokens = 32000\n[models.sub]\nbackend = "echo"\n'
    )
    assert context_window_tokens(config, "root") == 32_000
    assert context_window_tokens(config, "sub") == DEFAULT_CONTEXT_WINDOW_TOKENS == 128_000
    assert context_window_tokens(tmp_path / "missing.toml", "root") == 128_000
    # Unset on an HTTP model: the default of its family, as the handler resolves it.
    config.write_text('[models.root]\nbackend = "anthropic"\nmodel = "claude-sonnet-4-5"\n')
    assert context_window_tokens(config, "root") == default_context_window("anthropic", "claude-sonnet-4-5")


@pytest.mark.parametrize("value", ['"big"', "-5", "500", "true"])
def test_a_context_window_that_is_no_token_count_is_a_config_error(tmp_path: Path, value: str) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text(f'[models.root]\nbackend = "echo"\ncontext_window_tokens = {value}\n')
    with pytest.raises(ConfigError, match="context_window_tokens"):
        context_window_tokens(config, "root")

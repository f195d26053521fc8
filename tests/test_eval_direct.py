"""The direct baseline: its prompt (the whole context, or its head and a note when it does not
fit), the window it is cut to, and how a call ends, against an in-process handler."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.asyncio

from rlmq.eval import DEFAULT_CONTEXT_WINDOW_TOKENS, context_window_tokens, direct_prompt
from rlmq.eval.direct import run_direct
from rlmq.lmhandler.config import default_context_window
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.orchestrator import StopReason
from rlmq.protocol import AsyncHandlerClient, ConfigError

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


async def test_a_direct_call_ends_final_or_error_as_a_run_does(actx: zmq.asyncio.Context) -> None:
    """FINAL when the model answered; ERROR, with the handler's code, when the handler refused the
    call (here a prompt over its window: the eval was told a window larger than the handler's)."""
    async with (
        running_handler({"big": echo_model(), "small": echo_model(context_window_tokens=2_000)}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        context = CONTEXT[:20_000]
        answered = await run_direct(
            client,
            context,
            "How many lines?",
            run_id="run-a",
            model="big",
            window_tokens=128_000,
            max_tokens=None,
        )
        assert answered.stop_reason is StopReason.FINAL
        assert answered.answer == f"Context:\n\n{context}\n\nQuestion: How many lines?"  # the echo
        assert (answered.cut_tokens, answered.detail, answered.usage.calls) == (0, "", 1)

        refused = await run_direct(
            client,
            context,
            "How many lines?",
            run_id="run-b",
            model="small",
            window_tokens=128_000,
            max_tokens=None,
        )
        assert refused.stop_reason is StopReason.ERROR
        assert refused.answer == ""
        assert refused.detail.startswith("too_large: the prompt for 'small'")
        assert refused.usage.closed

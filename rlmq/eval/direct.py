"""The baseline: the whole context to the root model in one call, cut to its context window."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from rlmq.lmhandler.config import OFFLINE_CONTEXT_WINDOW_TOKENS, load_config
from rlmq.orchestrator.loop import StopReason
from rlmq.protocol import AsyncHandlerClient, ConfigError, RemoteError, RunLimits, RunUsage

from .tasks import CHARS_PER_TOKEN

__all__ = [
    "DEFAULT_CONTEXT_WINDOW_TOKENS",
    "DirectResult",
    "context_window_tokens",
    "direct_prompt",
    "run_direct",
]

DEFAULT_CONTEXT_WINDOW_TOKENS = 128_000
# Room kept for the question, the instructions and the answer when the context is cut.
RESERVED_TOKENS = 1_000


def context_window_tokens(config: str | os.PathLike[str] | None, alias: str) -> int:
    """The window of model ``alias`` as the handler knows it: ``context_window_tokens`` of its
    table, else the default of its family (``rlmq.lmhandler.config.default_context_window``).
    An offline backend has no window; the eval then assumes 128,000 tokens, a common size, so a
    direct run over a scripted or echo model still shows the cut."""
    if config is None or not Path(config).exists():
        return DEFAULT_CONTEXT_WINDOW_TOKENS
    models = load_config(config, env={}).models
    model = models.get(alias)
    if model is None:
        raise ConfigError(f"{config}: no [models.{alias}] table; configured: {', '.join(models)}")
    if model.context_window_tokens >= OFFLINE_CONTEXT_WINDOW_TOKENS:
        return DEFAULT_CONTEXT_WINDOW_TOKENS
    if model.context_window_tokens <= RESERVED_TOKENS:
        raise ConfigError(
            f"{config}: [models.{alias}] context_window_tokens must be an integer above {RESERVED_TOKENS}"
        )
    return model.context_window_tokens


def direct_prompt(context: str, query: str, *, window_tokens: int, answer_tokens: int) -> tuple[str, int]:
    """The one prompt, and how many tokens of the context were cut to fit ``window_tokens``.

    The head of the context is kept (cut at a line end) and a note says what was dropped, so the
    model knows it did not see everything.
    """
    budget_chars = (window_tokens - answer_tokens - RESERVED_TOKENS) * CHARS_PER_TOKEN - len(query)
    budget_chars = max(0, budget_chars)
    note = ""
    cut_tokens = 0
    if len(context) > budget_chars:
        end = context.rfind("\n", 0, budget_chars)
        kept = context[: end if end > 0 else budget_chars]
        cut_tokens = (len(context) - len(kept)) // CHARS_PER_TOKEN
        note = (
            f"\n\n[Note: the context was cut to fit the model's context window of {window_tokens:,} "
            f"tokens: only its first {len(kept) // CHARS_PER_TOKEN:,} of {len(context) // CHARS_PER_TOKEN:,} "
            "tokens are shown above. Answer as well as you can from them.]"
        )
        context = kept
    return f"Context:\n\n{context}{note}\n\nQuestion: {query}", cut_tokens


@dataclass(frozen=True, slots=True)
class DirectResult:
    answer: str
    stop_reason: StopReason  # FINAL, or ERROR when the handler refused or the model failed
    detail: str
    usage: RunUsage
    cut_tokens: int


async def run_direct(
    client: AsyncHandlerClient,
    context: str,
    query: str,
    *,
    run_id: str,
    model: str,
    window_tokens: int,
    max_tokens: int | None,
    limits: RunLimits | None = None,
    timeout_s: float | None = None,
) -> DirectResult:
    """One ``complete`` call under its own run id, so the handler counts its tokens and cost."""
    answer_tokens = max_tokens if max_tokens is not None else 4_096
    prompt, cut = direct_prompt(context, query, window_tokens=window_tokens, answer_tokens=answer_tokens)
    # Keyed: nobody else can spend it, and a handler without anonymous access serves only keyed
    # runs. The client shows the key on the complete and the close.
    await client.run_open(run_id, limits, key=secrets.token_hex(16))
    answer, reason, detail = "", StopReason.FINAL, ""
    try:
        reply = await client.complete(
            prompt, model=model, max_tokens=max_tokens, run=run_id, timeout_s=timeout_s
        )
        answer = reply.text
    except RemoteError as exc:  # the model's failure is its score; a dead handler is not
        reason, detail = StopReason.ERROR, f"{exc.raw_code}: {exc.message}"
    finally:
        usage = await client.run_close(run_id)
    return DirectResult(answer, reason, detail, usage, cut)

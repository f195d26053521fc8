"""Offline backends for tests, demos and load tests: ``echo`` and ``script``."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

from rlmq.protocol import ConfigError, ErrorCode, Usage

from ..config import ModelConfig
from .base import Backend, BackendError, BackendRequest, Completion, estimate_tokens

__all__ = ["EchoBackend", "ScriptBackend"]


def _estimated_usage(request: BackendRequest, text: str) -> Usage:
    prompt_tokens = sum(estimate_tokens(m.content) for m in request.messages)
    return Usage(input_tokens=prompt_tokens, output_tokens=estimate_tokens(text))


class _Offline(Backend):
    """What both offline backends are: no provider behind them, an optional simulated latency,
    and an answer at once when that latency is 0."""

    def __init__(self, config: ModelConfig) -> None:
        self.model = config.model
        self.latency_s = config.latency_ms / 1000.0

    @property
    def answers_at_once(self) -> bool:
        return self.latency_s == 0

    @property
    def has_provider(self) -> bool:
        return False


class EchoBackend(_Offline):
    """Replies with the last user message verbatim after ``latency_ms``."""

    async def complete(self, request: BackendRequest) -> Completion:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        text = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        return Completion(text, self.model, _estimated_usage(request, text), "end_turn")


class ScriptBackend(_Offline):
    """Replays a JSON list of strings in order, separately for each run id."""

    def __init__(self, config: ModelConfig) -> None:
        assert config.path is not None  # checked by the config loader
        super().__init__(config)
        try:
            data = json.loads(Path(config.path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[models.{config.alias}] cannot load script {config.path}: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            raise ConfigError(f"[models.{config.alias}] script {config.path} must be a JSON list of strings")
        self.responses: list[str] = data
        self._position: defaultdict[str | None, int] = defaultdict(int)

    async def complete(self, request: BackendRequest) -> Completion:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        position = self._position[request.run]
        if position >= len(self.responses):
            raise BackendError(
                ErrorCode.SCRIPT_EXHAUSTED,
                f"script has {len(self.responses)} responses and run {request.run!r} asked for one more",
                retryable=False,
            )
        self._position[request.run] = position + 1
        text = self.responses[position]
        return Completion(text, self.model, _estimated_usage(request, text), "end_turn")

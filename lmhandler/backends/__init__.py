"""Model backends behind one small interface (``base.Backend``).

HTTP backends import their client libraries only when a model uses them.
"""

from __future__ import annotations

from ..config import ModelConfig
from .base import Backend, BackendError, BackendRequest, Completion, estimate_tokens
from .echo import EchoBackend, ScriptBackend

__all__ = [
    "Backend",
    "BackendError",
    "BackendRequest",
    "Completion",
    "EchoBackend",
    "ScriptBackend",
    "estimate_tokens",
    "make_backend",
]


def make_backend(config: ModelConfig) -> Backend:
    """The backend a model's configuration names."""
    if config.backend == "echo":
        return EchoBackend(config)
    if config.backend == "script":
        return ScriptBackend(config)
    if config.backend == "anthropic":
        from .anthropic import AnthropicBackend

        return AnthropicBackend(config)
    if config.backend == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend(config)
    raise ValueError(f"unknown backend {config.backend!r}")

"""The LM handler: the one process that holds API keys and relays every model call.

Budgets, caching, retries, pacing and usage counters are enforced here, for every orchestrator
and sandbox that shares it.
"""

from .config import ConfigError, HandlerConfig, ModelConfig, load_config, parse_config
from .server import Handler

__all__ = ["ConfigError", "Handler", "HandlerConfig", "ModelConfig", "load_config", "parse_config"]

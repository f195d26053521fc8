"""The LM handler: the one process that holds API keys and relays every model call.

Budgets, caching, retries, pacing and usage counters are enforced here, for every orchestrator
and sandbox that shares it. Rooms: ``transport`` (the ROUTER socket), ``pipeline`` (what every
``complete`` goes through), ``server`` (the ``Handler``: life cycle and the other ops),
``state`` (runs, budgets, pacing and cache: in-process, or in Redis shared by several handlers).

Errors (each carries the wire ``code`` it is answered with)::

    RlmqError (rlmq.protocol)
    ├── ConfigError                 the TOML file or a setting (rlmq.protocol's, re-exported)
    └── HandlerError                internal: the handler's own subtree
        ├── UnknownModel            unknown_model
        ├── UnknownRun              unknown_run: a run not held here, or held under another key
        ├── AnonymousRefused        unauthorized: a call without a run, where allow_anonymous is off
        ├── Overloaded              overloaded: max_in_flight requests already in flight
        ├── PromptTooLarge          too_large: the prompt is over the model's context window
        ├── RequestTimeout          timeout: no answer within the request's (or run's) time
        ├── ShuttingDown            unavailable: the handler stopped first
        ├── BudgetExceeded          budget_exceeded (accounting)
        ├── RunClosed               run_closed (accounting)
        ├── CircuitOpen             unavailable: the provider looks down (shaping)
        ├── StateUnavailable        unavailable: the shared state (Redis) did not answer in time (state)
        └── BackendError            the provider's failure mapped to a code (backends.base):
                                    rate_limited, backend_error, timeout, overloaded,
                                    unauthorized, bad_request, script_exhausted, ...
"""

from rlmq.protocol import ConfigError

from .accounting import BudgetExceeded, RunClosed
from .backends.base import BackendError
from .config import HandlerConfig, ModelConfig, StateConfig, load_config, parse_config
from .errors import (
    AnonymousRefused,
    HandlerError,
    Overloaded,
    PromptTooLarge,
    RequestTimeout,
    ShuttingDown,
    UnknownModel,
    UnknownRun,
)
from .server import Handler
from .shaping import CircuitOpen
from .state import StateUnavailable

__all__ = [
    "AnonymousRefused",
    "BackendError",
    "BudgetExceeded",
    "CircuitOpen",
    "ConfigError",
    "Handler",
    "HandlerConfig",
    "HandlerError",
    "ModelConfig",
    "Overloaded",
    "PromptTooLarge",
    "RequestTimeout",
    "RunClosed",
    "ShuttingDown",
    "StateConfig",
    "StateUnavailable",
    "UnknownModel",
    "UnknownRun",
    "load_config",
    "parse_config",
]

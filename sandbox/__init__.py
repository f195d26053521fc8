"""The sandbox pool: worker processes that run model-written Python over a session's ``context``.

    rlmq sandbox --handler ADDR [--bind ADDR] [--workers N] [--config FILE]

Orchestrators talk to the pool with ``rlmq.protocol.sandbox.AsyncSandboxClient`` (the session
protocol is in docs/protocol.md); what each isolation level protects against is in
docs/security.md.

Rooms: ``pool`` is the server (sockets, dispatch), ``sessions`` the session manager,
``supervisor`` the worker processes (no ZeroMQ), ``worker`` and ``runtime`` the worker's side.

Errors:

    RlmqError (rlmq.protocol)
    ├── ConfigError (rlmq.protocol)          settings that cannot be used as written
    ├── PoolError (sandbox.errors)           root of the pool's own errors
    │   └── PoolFailure                      becomes an error reply with its code
    │       ├── UnknownSession               unknown_session
    │       ├── SessionBusy                  session_busy
    │       ├── SessionLost                  session_lost
    │       │   └── WorkerGone               the worker exited or was killed while awaited
    │       ├── PoolExhausted                pool_exhausted (retryable)
    │       └── PoolStopping                 unavailable (retryable)
    └── SandboxError (rlmq.protocol.sandbox) what the client raises for an error reply

    raised inside the model's code (not RlmqError: they are the code's own exceptions, with
    ``.code`` and ``.retryable`` from the error as it travelled)
    ├── LLMQueryError (sandbox.runtime)      llm_query / llm_query_batched failed
    └── RLMQueryError (sandbox.runtime)      rlm_query failed or is disabled at this depth
"""

from .config import DEFAULT_BIND, ConfigError, PoolConfig, build_config, load_table
from .errors import (
    PoolError,
    PoolExhausted,
    PoolFailure,
    PoolStopping,
    SessionBusy,
    SessionLost,
    UnknownSession,
    WorkerGone,
)
from .pool import Pool
from .runtime import LLMQueryError, Repl, RLMQueryError

__all__ = [
    "DEFAULT_BIND",
    "ConfigError",
    "LLMQueryError",
    "Pool",
    "PoolConfig",
    "PoolError",
    "PoolExhausted",
    "PoolFailure",
    "PoolStopping",
    "RLMQueryError",
    "Repl",
    "SessionBusy",
    "SessionLost",
    "UnknownSession",
    "WorkerGone",
    "build_config",
    "load_table",
]

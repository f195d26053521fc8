"""The sandbox pool: worker processes that run model-written Python over a session's ``context``.

    rlmq sandbox --handler ADDR [--bind ADDR] [--workers N] [--config FILE]

Orchestrators talk to the pool with ``protocol.sandbox.AsyncSandboxClient`` (the session
protocol is in docs/protocol.md); what each isolation level protects against is in
docs/security.md.

Errors:

    RlmqError (protocol)
    ├── ConfigError (sandbox.config)     settings that cannot be used as written
    ├── PoolFailure (sandbox.pool)       a failure that becomes an error reply with its code
    │   └── WorkerGone                   the worker exited or was killed while something waited on it
    └── SandboxError (protocol.sandbox)  what the client raises for an error reply

    raised inside the model's code (not RlmqError: they are the code's own exceptions)
    ├── LLMQueryError (sandbox.runtime)  llm_query / llm_query_batched failed
    └── RLMQueryError (sandbox.runtime)  rlm_query failed or is disabled at this depth
"""

from .config import DEFAULT_BIND, ConfigError, PoolConfig, build_config, load_table
from .pool import Pool, PoolFailure, WorkerGone
from .runtime import LLMQueryError, Repl, RLMQueryError

__all__ = [
    "DEFAULT_BIND",
    "ConfigError",
    "LLMQueryError",
    "Pool",
    "PoolConfig",
    "PoolFailure",
    "RLMQueryError",
    "Repl",
    "WorkerGone",
    "build_config",
    "load_table",
]

"""The orchestrator: drives the root model through explore, decompose, aggregate, terminate.

It owns the message history, the loop and its termination, recursion (``rlm_query``), and the
trajectory. ``RLM`` depends on two small interfaces (``interfaces.ModelClient``,
``interfaces.Sandbox``): the ZeroMQ clients of ``rlmq.protocol`` in production, the in-memory
fakes of ``rlmq.orchestrator.testing`` in tests. A run that a limit or a remote error stops is a
``RunResult`` with a ``StopReason`` (and the remote ``ErrorInfo``), not an exception.

Errors it raises:

    RlmqError (rlmq.protocol)
    ├── ConfigError (rlmq.protocol)
    │   └── SettingsError      run settings (flags, the [run] table) that cannot be used
    └── RunError               base of the orchestrator's own errors
        ├── ContextError       a --context that cannot be read
        ├── NoServices         neither service addresses nor a config to start private ones
        ├── ServiceError       a local handler or pool that did not start
        ├── ChildRunFailed     a recursive run stopped without an answer (code rlm_failed):
        │                      raised to the rlm_query waiting on it, in the model's code
        ├── ToolFailed         a host-side tool raised (backend_error), timed out (timeout) or
        │                      returned what cannot be sent (internal): a ToolError in the code
        ├── BudgetSpent        the handler lost the run and nothing of a limit is left
        └── RunLost            the handler lost the run and it could not be reopened
"""

from .budget import GuardedModels, GuardedSandbox
from .contexts import load_context
from .errors import ChildRunFailed, ContextError, NoServices, RunError, ServiceError, SettingsError
from .interfaces import ModelClient, Sandbox, SandboxSession
from .local import LocalServices, local_services
from .loop import RLM, Conversation, Ending, RunCounters, RunResult, StopReason, new_run_id
from .runner import run_query
from .settings import RunSettings, load_run_settings
from .tools import ToolBox, ToolFailed
from .trajectory import Trajectory

__all__ = [
    "RLM",
    "ChildRunFailed",
    "ContextError",
    "Conversation",
    "Ending",
    "GuardedModels",
    "GuardedSandbox",
    "LocalServices",
    "ModelClient",
    "NoServices",
    "RunCounters",
    "RunError",
    "RunResult",
    "RunSettings",
    "Sandbox",
    "SandboxSession",
    "ServiceError",
    "SettingsError",
    "StopReason",
    "ToolBox",
    "ToolFailed",
    "Trajectory",
    "load_context",
    "load_run_settings",
    "local_services",
    "new_run_id",
    "run_query",
]

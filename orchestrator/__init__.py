"""The orchestrator: drives the root model through explore, decompose, aggregate, terminate.

It owns the message history, the loop and its termination, recursion (``rlm_query``), and the
trajectory. It talks to the handler and the sandbox pool only through ``protocol``.
"""

from .contexts import ContextError, load_context
from .local import LocalServices, ServiceError, local_services
from .loop import RLM, RunResult, new_run_id
from .settings import RunSettings, SettingsError, load_run_settings
from .trajectory import Trajectory

__all__ = [
    "RLM",
    "ContextError",
    "LocalServices",
    "RunResult",
    "RunSettings",
    "ServiceError",
    "SettingsError",
    "Trajectory",
    "load_context",
    "load_run_settings",
    "local_services",
    "new_run_id",
]

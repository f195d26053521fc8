"""rlmq, the one installed name: rlmq.protocol, rlmq.lmhandler, rlmq.sandbox, rlmq.orchestrator and
the tools (rlmq.loadtest, rlmq.fakeprovider, rlmq.eval, rlmq.serve) live under it; `rlmq.cli` is
the command.

``from rlmq import RLM`` is the Python surface (``rlmq.facade``). It is imported on first use,
not here: sandbox workers import ``rlmq`` for its path, and that must stay cheap and must not pull
in the orchestrator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .facade import RLM, Progress, Result, Session

__all__ = ["RLM", "Progress", "Result", "Session"]

_LAZY = {name: "rlmq.facade" for name in __all__}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value

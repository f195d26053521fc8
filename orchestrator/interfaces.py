"""What the loop needs from the outside world: a model client and a sandbox.

Two small structural interfaces (``typing.Protocol``). The ZeroMQ clients of ``rlmq.protocol``
satisfy them as they are (``AsyncHandlerClient`` is a ``ModelClient``, ``AsyncSandboxClient`` a
``Sandbox`` whose sessions are ``SandboxSession``s); ``rlmq.orchestrator.testing`` has in-memory
fakes of both, so the loop is unit-tested without processes.

Reading a session variable needs no method of its own: the loop runs ``FINAL_VAR('name')`` in the
session, which any session speaking the REPL contract of DESIGN.md section 5 understands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from rlmq.protocol import ChatMessage, CompleteReply, RunLimits, RunUsage
from rlmq.protocol.sandbox import ExecResult, Replay, SubCall

__all__ = ["ModelClient", "RlmCallback", "Sandbox", "SandboxSession"]

# Answers an ``rlm_query(prompt, context)`` of a session's code with the child run's answer.
RlmCallback = Callable[[str, Any], Awaitable[str]]


class ModelClient(Protocol):
    """Chat completions by model alias, under a run's budget. Errors are ``RlmqError``s whose
    ``code`` says what happened (``budget_exceeded``, ``timeout``, ``unknown_model``, ...)."""

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        /,
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        timeout_s: float | None = None,
        run: str | None = None,
        depth: int | None = None,
    ) -> CompleteReply: ...

    async def run_open(self, run: str, limits: RunLimits | None = None) -> RunUsage: ...

    async def run_close(self, run: str) -> RunUsage: ...

    async def usage(self, run: str) -> RunUsage: ...


class SandboxSession(Protocol):
    """A persistent namespace holding ``context`` and the REPL functions."""

    async def exec(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_sub_call: Callable[[SubCall], None] | None = None,
        record_chars: int | None = None,
        replay: Replay | None = None,
    ) -> ExecResult:
        """Run ``code``; its failures come back in the result, never as an exception.

        ``record_chars`` set: each sub-call the code makes is reported to ``on_sub_call`` (a
        ``SubCall``, prompts past ``record_chars`` cut to head and tail) before this returns.
        ``replay``: sub-calls are answered from these records (docs/trajectory.md, "Replay")."""
        ...

    async def close(self) -> None:
        """Close the session; idempotent."""
        ...


class Sandbox(Protocol):
    """Opens sessions. ``on_rlm_query`` answers the session's ``rlm_query`` calls (None: off)."""

    async def open(
        self,
        *,
        run: str,
        context: Any,
        depth: int,
        max_depth: int,
        sub_model: str,
        exec_timeout_s: float | None,
        max_output_chars: int | None,
        on_rlm_query: RlmCallback | None,
    ) -> SandboxSession: ...

"""The RLM loop: explore, decompose, aggregate, terminate.

Each iteration sends the history to the ``root`` model through the handler, runs the response's
```repl blocks in the session in order, and feeds their output back. The run ends when code calls
FINAL/FINAL_VAR, when a response without code says FINAL(...)/FINAL_VAR(...), or when a limit
stops it (iterations, depth, wall time, or the handler's run budget), always with the best
answer available and the reason.

Recursion: ``rlm_query`` in a worker comes back here through the sandbox client, and runs a child
loop at depth + 1 with its own session, under the same run id (so the same budget).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlmq.protocol import AsyncHandlerClient, ChatMessage, ErrorCode, RemoteError, RlmqError, RunUsage
from rlmq.protocol.sandbox import AsyncSandboxClient, ExecResult, Session

from .history import History
from .parsing import extract_code_blocks, find_final
from .prompts import describe_context, system_prompt
from .settings import RunSettings
from .trajectory import Trajectory

__all__ = ["RLM", "RunResult", "format_observation", "new_run_id"]

log = logging.getLogger(__name__)

NO_CODE_NUDGE = (
    "Your response had no ```repl code block and no FINAL(...). Continue with code to explore "
    "`context`, or give your answer as FINAL(answer) or FINAL_VAR(variable_name)."
)
LAST_CALL = (
    "You have used all {n} iterations. Answer now with FINAL(your best answer) or "
    "FINAL_VAR(variable_name), and no code."
)

# Why a run stopped.
FINAL = "final"
MAX_ITERATIONS = "max_iterations"
BUDGET = "budget_exceeded"
WALL_TIME = "wall_time"
ERROR = "error"


def new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class RunResult:
    answer: str
    stop_reason: str  # final | max_iterations | budget_exceeded | wall_time | error
    iterations: int
    run_id: str
    elapsed_s: float
    usage: RunUsage | None = None
    detail: str = ""  # which limit, or the error
    depth: int = 0

    @property
    def ok(self) -> bool:
        return self.stop_reason in (FINAL, MAX_ITERATIONS)


class _Stop(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def format_observation(index: int, count: int, code: str, result: ExecResult) -> str:
    """What the model is shown of one block's run."""
    label = f"[block {index + 1} of {count}]" if count > 1 else "[output]"
    parts = [label]
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append("[stderr]\n" + result.stderr.rstrip("\n"))
    if result.error is not None:
        err = result.error
        parts.append(f"[error: {err.code}] " + (err.traceback.rstrip("\n") or f"{err.type}: {err.message}"))
    if result.state_lost:
        parts.append("[the REPL was restarted: your variables are gone; `context` is loaded again]")
    if result.final is not None:
        parts.append("[FINAL was set]")
    if len(parts) == 1:
        parts.append("(no output)")
    return "\n".join(parts)


class RLM:
    """Runs queries against one handler and one sandbox pool. Reusable; runs may overlap."""

    def __init__(
        self,
        handler: AsyncHandlerClient,
        sandbox: AsyncSandboxClient,
        settings: RunSettings,
        *,
        trajectory: Trajectory | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.handler = handler
        self.sandbox = sandbox
        self.settings = settings
        self.trajectory = trajectory or Trajectory(None)
        self.on_event = on_event
        self.sub_calls = 0
        self.iterations = 0
        self.model_calls = 0  # root-model calls at every depth (the rest of a run's calls are sub-calls)
        self.asking = 0  # root-model calls in flight

    def _event(self, name: str, /, **fields: Any) -> None:
        self.trajectory.write(name, **fields)
        if self.on_event is not None:
            self.on_event(name, fields)

    async def run(self, query: str, context: Any, *, run_id: str | None = None) -> RunResult:
        """One whole run: registered with the handler, traced, and closed whatever happens."""
        run_id = run_id or new_run_id()
        started = time.monotonic()
        s = self.settings
        self._event(
            "run_start",
            run=run_id,
            query=query,
            context=describe_context(context),
            settings={k: getattr(s, k) for k in s.__dataclass_fields__},
        )
        usage: RunUsage | None = None
        answer, reason, detail, iterations = "", ERROR, "", 0
        try:
            await self.handler.run_open(run_id, s.limits())
            answer, reason, detail, iterations = await self._loop(query, context, 0, run_id, started)
        except RlmqError as exc:
            detail, iterations = exc.message, self.iterations
        except BaseException as exc:  # cancelled, interrupted, or a bug: still leave a whole trajectory
            detail, iterations = f"{type(exc).__name__}: {exc}", self.iterations
            raise
        finally:
            try:
                usage = await self.handler.run_close(run_id)
            except RlmqError as exc:
                log.warning("could not close run %s with the handler: %s", run_id, exc.message)
            elapsed = time.monotonic() - started
            self._event(
                "run_end",
                run=run_id,
                stop_reason=reason,
                detail=detail,
                answer=answer,
                iterations=iterations,
                elapsed_s=round(elapsed, 3),
                usage=usage.to_wire() if usage else None,
            )
        return RunResult(answer, reason, iterations, run_id, round(elapsed, 3), usage, detail)

    # ------------------------------------------------------------------ one depth

    async def _open_session(self, context: Any, depth: int, run_id: str, started: float) -> Session:
        s = self.settings

        async def child(prompt: str, child_context: Any) -> str:
            answer, reason, detail, _ = await self._loop(
                prompt, prompt if child_context is None else child_context, depth + 1, run_id, started
            )
            if reason not in (FINAL, MAX_ITERATIONS):
                raise RuntimeError(f"the recursive run stopped: {reason} ({detail})")
            return answer

        return await self.sandbox.open(
            run=run_id,
            context=context,
            depth=depth,
            max_depth=s.max_depth,
            sub_model=s.sub_model,
            exec_timeout_s=s.exec_timeout_s,
            max_output_chars=s.max_output_chars,
            on_rlm_query=child if depth + 1 < s.max_depth else None,
        )

    async def _ask(
        self, messages: list[ChatMessage], depth: int, run_id: str, iteration: int, purpose: str
    ) -> str:
        s = self.settings
        self.asking += 1
        try:
            reply = await self.handler.complete(
                messages,
                model=s.root_model,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                timeout_s=s.model_timeout_s,
                run=run_id,
                depth=depth,
            )
        finally:
            self.asking -= 1
        self.model_calls += 1
        self._event(
            "model_call",
            depth=depth,
            iteration=iteration,
            purpose=purpose,
            messages=[m.to_wire() for m in messages],
            response=reply.text,
            usage=reply.usage.to_wire(),
            latency_ms=reply.latency_ms,
            cached=reply.cached,
        )
        return reply.text

    async def _loop(
        self, query: str, context: Any, depth: int, run_id: str, started: float
    ) -> tuple[str, str, str, int]:
        """Run the loop at one depth: (answer, stop reason, detail, iterations)."""
        s = self.settings
        session = await self._open_session(context, depth, run_id, started)
        if depth > 0:
            self._event("child_start", depth=depth, query=query, context=describe_context(context))
        best = ""  # a prose FINAL we had to ignore is the best fallback answer
        iteration = 0
        try:
            history = History(
                system_prompt(
                    context,
                    depth=depth,
                    max_depth=s.max_depth,
                    max_output_chars=s.max_output_chars,
                    sub_model=s.sub_model,
                ),
                f"Question: {query}",
            )

            async def summarise(messages: list[ChatMessage]) -> str:
                return await self._ask(messages, depth, run_id, iteration, "compaction")

            try:
                for iteration in range(1, s.max_iterations + 1):
                    if depth == 0:
                        self.iterations = iteration
                    self._check_wall_time(started)
                    compaction = await history.compact_if_needed(
                        max_chars=s.history_max_chars,
                        keep_last_turns=s.keep_last_turns,
                        mode=s.compaction,
                        summarise=summarise,
                    )
                    if compaction is not None:
                        self._event(
                            "compaction",
                            depth=depth,
                            iteration=iteration,
                            mode=s.compaction,
                            dropped_turns=compaction.dropped_turns,
                            chars_before=compaction.chars_before,
                            chars_after=compaction.chars_after,
                            summary=compaction.summary,
                        )
                    response = await self._ask(history.messages(), depth, run_id, iteration, "iteration")
                    history.add_response(response)
                    answer, observation = await self._act(session, response, depth, iteration)
                    if answer is not None:
                        return self._finish(answer, FINAL, "", depth, iteration)
                    prose = find_final(response)
                    if prose is not None and extract_code_blocks(response):
                        best = prose.answer or best
                        self._event(
                            "final_ignored", depth=depth, iteration=iteration, final=prose.answer or prose.var
                        )
                    history.add_observation(observation)

                # Out of iterations: one last request for an answer, without code.
                history_msgs = history.messages(extra_user=LAST_CALL.format(n=s.max_iterations))
                response = await self._ask(history_msgs, depth, run_id, iteration + 1, "last_call")
                prose = find_final(response)
                answer = None
                if prose is not None and prose.var is not None:
                    answer = await self._final_var(session, prose.var, depth, iteration + 1)
                elif prose is not None:
                    answer = prose.answer
                if answer is None:
                    answer = response.strip() or best
                return self._finish(
                    answer, MAX_ITERATIONS, f"stopped after {s.max_iterations} iterations", depth, iteration
                )
            except _Stop as stop:
                return self._finish(best, stop.reason, stop.detail, depth, iteration)
            except RemoteError as exc:
                if exc.code == ErrorCode.BUDGET_EXCEEDED:
                    return self._finish(best, BUDGET, exc.message, depth, iteration)
                if exc.code == ErrorCode.TIMEOUT and self._past_deadline(started):
                    return self._finish(best, WALL_TIME, exc.message, depth, iteration)
                return self._finish(best, ERROR, f"{exc.raw_code}: {exc.message}", depth, iteration)
        finally:
            await session.close()

    def _finish(
        self, answer: str, reason: str, detail: str, depth: int, iterations: int
    ) -> tuple[str, str, str, int]:
        self._event(
            "final", depth=depth, answer=answer, stop_reason=reason, detail=detail, iterations=iterations
        )
        return answer, reason, detail, iterations

    def _past_deadline(self, started: float) -> bool:
        wall = self.settings.wall_time_s
        return wall is not None and time.monotonic() - started >= wall

    def _check_wall_time(self, started: float) -> None:
        if self._past_deadline(started):
            raise _Stop(WALL_TIME, f"wall time of {self.settings.wall_time_s:g} s reached")

    async def _act(
        self, session: Session, response: str, depth: int, iteration: int
    ) -> tuple[str | None, str]:
        """Run the response's code, or take its prose FINAL: (final answer or None, observation)."""
        blocks = extract_code_blocks(response)
        if not blocks:
            prose = find_final(response)
            if prose is None:
                return None, NO_CODE_NUDGE
            if prose.var is not None:
                value = await self._final_var(session, prose.var, depth, iteration)
                if value is None:
                    return None, (
                        f"FINAL_VAR({prose.var}) names no variable of the REPL. Define it with code first, "
                        "or answer with FINAL(answer)."
                    )
                return value, ""
            return prose.answer or "", ""
        observations = []
        for index, code in enumerate(blocks):
            result = await session.exec(code)
            self.sub_calls += result.llm_calls
            self._event(
                "exec",
                depth=depth,
                iteration=iteration,
                block=index,
                code=code,
                stdout=result.stdout,
                stderr=result.stderr,
                error=None
                if result.error is None
                else {
                    "code": result.error.code,
                    "type": result.error.type,
                    "message": result.error.message,
                    "traceback": result.error.traceback,
                },
                final=result.final,
                final_var=result.final_var,
                elapsed_ms=result.elapsed_ms,
                llm_calls=result.llm_calls,
                truncated_chars=result.truncated_chars,
                state_lost=result.state_lost,
            )
            observations.append(format_observation(index, len(blocks), code, result))
            if result.final is not None:
                return result.final, "\n\n".join(observations)
        return None, "\n\n".join(observations)

    async def _final_var(self, session: Session, name: str, depth: int, iteration: int) -> str | None:
        result = await session.exec(f"FINAL_VAR({name!r})")
        self._event("final_var", depth=depth, iteration=iteration, name=name, found=result.final is not None)
        return result.final

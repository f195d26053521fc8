"""The request pipeline without sockets: one admission and accounting path, driven inline or as
a task (rlmq.lmhandler.pipeline).

Each test runs the same traffic through a backend that answers at once (stepped inline in the
receive loop) and through the same backend marked as one that waits (run as a task), and expects
the same counters, budgets and replies from both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from rlmq.lmhandler.accounting import RunTable
from rlmq.lmhandler.backends import Backend, BackendError, BackendRequest, Completion, EchoBackend
from rlmq.lmhandler.config import HandlerConfig, parse_config
from rlmq.lmhandler.pipeline import Model, Pipeline
from rlmq.lmhandler.stats import ServerStats
from rlmq.lmhandler.testing import echo_model
from rlmq.protocol import (
    ChatMessage,
    CompleteRequest,
    ErrorCode,
    RlmqError,
    RunLimits,
    Usage,
    unpack,
)

PATHS = ["inline", "task"]


class Recorder(Backend):
    """Answers at once (or claims not to), recording what the handler's counters say meanwhile."""

    def __init__(self, *, at_once: bool, errors: list[BackendError] | None = None) -> None:
        self.at_once = at_once
        self.errors = list(errors or [])
        self.seen: list[tuple[int, int, int]] = []
        self.pipeline: Pipeline | None = None

    @property
    def answers_at_once(self) -> bool:
        return self.at_once

    async def complete(self, request: BackendRequest) -> Completion:
        assert self.pipeline is not None
        model = self.pipeline.models["m"]
        self.seen.append((self.pipeline.stats.in_flight, model.stats.in_flight, model.slots.in_flight))
        if self.errors:
            raise self.errors.pop(0)
        return Completion(request.messages[-1].content, "echo", Usage(10, 10))


class Held(Backend):
    """Claims to answer at once (or not) but waits for ``gate``: a call held in flight."""

    def __init__(self, *, at_once: bool, error: BackendError | None = None) -> None:
        self.at_once = at_once
        self.gate = asyncio.Event()
        self.error = error  # raised once the gate opens, instead of answering
        self.calls: list[str | None] = []  # the run of each call the backend saw

    @property
    def answers_at_once(self) -> bool:
        return self.at_once

    async def complete(self, request: BackendRequest) -> Completion:
        self.calls.append(request.run)
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return Completion("late", "held", Usage(1, 1))


class Harness:
    """A pipeline whose replies and errors land in lists; backoff sleeps are recorded, not slept."""

    def __init__(self, backend: Backend, **handler: Any) -> None:
        self.config: HandlerConfig = parse_config(
            {"models": {"m": echo_model(price_in_per_mtok=1.0)}, "handler": handler}
        )
        self.model = Model(self.config.models["m"], backend)
        self.runs = RunTable()
        self.stats = ServerStats()
        self.replies: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, RlmqError] = {}
        # Every outcome in order, with the connection (envelope) it was sent to.
        self.outcomes: list[tuple[bytes, dict[str, Any] | RlmqError]] = []
        self.slept: list[float] = []
        self.pipeline = Pipeline(
            self.config,
            {"m": self.model},
            self.runs,
            self.stats,
            loop=asyncio.get_running_loop(),
            reply=lambda env, payload: self._replied(env, bytes(payload)),
            fail=self._failed,
            sleep=self._sleep,
        )
        if isinstance(backend, Recorder):
            backend.pipeline = self.pipeline

    def _replied(self, envelope: list[Any], payload: bytes) -> None:
        reply = unpack(payload)
        self.replies[reply["id"]] = reply
        self.outcomes.append((envelope[0], reply))

    def _failed(self, envelope: list[Any], rid: str, exc: RlmqError) -> None:
        self.errors[rid] = exc
        self.outcomes.append((envelope[0], exc))

    async def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def submit(self, rid: str, *, run: str | None = None, model: str = "m", via: bytes = b"client") -> None:
        """Send a request as the connection ``via`` (a re-send after a reconnect comes on another)."""
        req = CompleteRequest(rid, model, (ChatMessage("user", rid),), run=run)
        self.pipeline.submit([via], req)

    async def settle(self) -> None:
        """Wait for every call that became a task."""
        while self.pipeline.tasks:
            await asyncio.wait(set(self.pipeline.tasks))


async def until(condition: Callable[[], bool], *, turns: int = 10) -> None:
    """Let ready tasks run until ``condition`` holds: event-loop turns, no wall-clock time."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def recorder(path: str, **kw: Any) -> Recorder:
    return Recorder(at_once=path == "inline", **kw)


@pytest.mark.parametrize("path", PATHS)
async def test_the_inline_path_is_taken_only_by_backends_that_answer_at_once(path: str) -> None:
    h = Harness(recorder(path))
    assert h.model.inline is (path == "inline")
    h.submit("a")
    # Inline: answered before submit returns, with no task; a task answers on its first turn.
    assert ("a" in h.replies) is (path == "inline")
    assert bool(h.pipeline.tasks) is (path == "task")
    await h.settle()
    assert h.replies["a"]["text"] == "a"


@pytest.mark.parametrize("path", PATHS)
async def test_calls_are_in_flight_while_the_backend_works(path: str) -> None:
    backend = recorder(path)
    h = Harness(backend)
    for i in range(3):
        h.submit(f"q{i}")
        await h.settle()
    # (handler in_flight, model in_flight, concurrency slots in use) seen by each call
    assert backend.seen == [(1, 1, 1)] * 3
    assert (h.stats.in_flight, h.model.stats.in_flight, h.model.slots.in_flight) == (0, 0, 0)
    stats = h.model.stats
    assert (stats.requests, stats.ok, stats.sent) == (3, 3, 3)


@pytest.mark.parametrize("path", PATHS)
async def test_max_in_flight_counts_every_call(path: str) -> None:
    backend = Held(at_once=path == "inline")
    h = Harness(backend, max_in_flight=2)
    h.submit("a")
    h.submit("b")
    # Inline, both are counted before submit returns; a task counts itself on its first turn.
    await until(lambda: h.stats.in_flight == 2)
    assert h.model.stats.in_flight == 2
    h.submit("c")
    assert h.errors["c"].code == ErrorCode.OVERLOADED
    assert h.errors["c"].retryable
    backend.gate.set()
    await h.settle()
    assert sorted(h.replies) == ["a", "b"]
    assert h.stats.in_flight == 0


@pytest.mark.parametrize("path", PATHS)
async def test_budgets_reservations_and_the_retry_budget_are_the_same(path: str) -> None:
    h = Harness(recorder(path))
    h.runs.open_run("r", RunLimits(max_calls=3))
    for i in range(5):
        h.submit(f"q{i}", run="r")
    await h.settle()
    assert sorted(h.replies) == ["q0", "q1", "q2"]
    assert {rid: e.code for rid, e in h.errors.items()} == {
        "q3": ErrorCode.BUDGET_EXCEEDED,
        "q4": ErrorCode.BUDGET_EXCEEDED,
    }
    run = h.runs.get("r")
    assert (run.calls, run.in_flight, run.failed_calls) == (3, 0, 0)
    assert (run.input_tokens, run.output_tokens) == (30, 30)
    assert run.cost_usd == pytest.approx(30 / 1e6)
    assert run.exceeded == "max_calls"
    stats = h.model.stats
    assert (stats.requests, stats.ok, stats.sent) == (5, 3, 3)
    assert stats.errors == {ErrorCode.BUDGET_EXCEEDED: 2}
    # Each admitted call deposits its share in the retry budget (the inline path used to skip it).
    assert h.model.retry_budget.balance == pytest.approx(10 + 3 * 0.5, abs=0.01)
    h.runs.close("r")
    h.submit("late", run="r")
    await h.settle()
    assert h.errors["late"].code == ErrorCode.RUN_CLOSED


@pytest.mark.parametrize("path", PATHS)
async def test_retries_honour_retry_after_and_spend_the_retry_budget(path: str) -> None:
    limited = [
        BackendError(ErrorCode.RATE_LIMITED, "429", retryable=True, retry_after_s=2.0, status=429)
        for _ in range(2)
    ]
    h = Harness(recorder(path, errors=limited))
    h.runs.open_run("r", RunLimits())
    h.submit("q", run="r")
    await h.settle()
    assert h.replies["q"]["retries"] == 2
    assert len(h.slept) == 2
    assert all(2.0 <= s <= 2.2 for s in h.slept)  # Retry-After, plus at most 10% jitter
    assert h.model.stats.retry_wait_s == pytest.approx(sum(h.slept))
    assert (h.model.stats.sent, h.model.stats.retries, h.model.stats.rate_limited) == (3, 2, 2)
    assert h.model.retry_budget.balance == pytest.approx(10 + 0.5 - 2, abs=0.01)
    assert h.runs.get("r").calls == 1


@pytest.mark.parametrize("path", PATHS)
async def test_a_failed_call_is_counted_as_failed(path: str) -> None:
    refused = BackendError(ErrorCode.UNAUTHORIZED, "bad key", retryable=False, status=401)
    h = Harness(recorder(path, errors=[refused]))
    h.runs.open_run("r", RunLimits())
    h.submit("q", run="r")
    await h.settle()
    assert h.errors["q"].code == ErrorCode.UNAUTHORIZED
    assert not h.errors["q"].retryable
    run = h.runs.get("r")
    assert (run.calls, run.failed_calls, run.in_flight) == (1, 1, 0)
    assert h.model.stats.errors == {ErrorCode.UNAUTHORIZED: 1}
    assert h.stats.in_flight == 0
    assert h.slept == []


async def test_unknown_model_is_refused_at_admission() -> None:
    h = Harness(EchoBackend(parse_config({"models": {"m": echo_model()}}).models["m"]))
    h.submit("x", model="nope")
    assert h.errors["x"].code == ErrorCode.UNKNOWN_MODEL
    assert "m" in h.errors["x"].message
    assert h.model.stats.requests == 0


# ---------------------------------------------------------------- re-sends while the call runs


@pytest.mark.parametrize("path", PATHS)
async def test_a_re_send_while_the_call_runs_joins_it_counted_and_paid_once(path: str) -> None:
    backend = Held(at_once=path == "inline")
    h = Harness(backend)
    h.runs.open_run("r", RunLimits(max_calls=5))
    h.submit("q", run="r", via=b"old")
    # The caller lost its connection and sends the same id again on a new one, same handler.
    h.submit("q", run="r", via=b"new")
    await until(lambda: len(backend.calls) == 1)
    assert h.outcomes == []
    backend.gate.set()
    await h.settle()
    assert backend.calls == ["r"]  # one backend call
    run = h.runs.get("r")
    assert (run.calls, run.in_flight, run.failed_calls) == (1, 0, 0)
    assert (run.input_tokens, run.output_tokens) == (1, 1)
    got = dict(h.outcomes)
    assert set(got) == {b"old", b"new"}
    old, new = got[b"old"], got[b"new"]
    assert isinstance(old, dict)
    assert isinstance(new, dict)
    assert (old["id"], old["text"], old.get("replayed", False)) == ("q", "late", False)
    assert (new["id"], new["text"], new["replayed"]) == ("q", "late", True)
    # The same answer, word for word (usage and cost as charged once, like any kept reply).
    assert {k: v for k, v in new.items() if k != "replayed"} == old
    assert h.pipeline.replayed == 1
    assert (h.model.stats.requests, h.model.stats.ok, h.model.stats.sent) == (1, 1, 1)
    assert not h.pipeline._flying  # the entry went with the call
    # Later still, the kept reply (finished calls, as before), never a second call.
    h.submit("q", run="r", via=b"later")
    await h.settle()
    later = h.outcomes[-1]
    assert later[0] == b"later"
    assert isinstance(later[1], dict)
    assert later[1]["replayed"] is True
    assert backend.calls == ["r"]
    assert h.runs.get("r").calls == 1


@pytest.mark.parametrize("path", PATHS)
async def test_the_error_of_a_joined_call_reaches_every_connection(path: str) -> None:
    refused = BackendError(ErrorCode.UNAUTHORIZED, "bad key", retryable=False, status=401)
    backend = Held(at_once=path == "inline", error=refused)
    h = Harness(backend)
    h.runs.open_run("r", RunLimits())
    h.submit("q", run="r", via=b"old")
    h.submit("q", run="r", via=b"new")
    h.submit("q", run="r", via=b"newer")
    backend.gate.set()
    await h.settle()
    assert backend.calls == ["r"]
    assert [via for via, _ in h.outcomes] == [b"new", b"newer", b"old"]
    assert all(isinstance(e, RlmqError) and e.code == ErrorCode.UNAUTHORIZED for _, e in h.outcomes)
    run = h.runs.get("r")
    assert (run.calls, run.failed_calls, run.in_flight) == (1, 1, 0)
    assert h.pipeline.replayed == 0
    # A failed call keeps no reply and leaves no entry: sending the id again is a new call.
    backend.error = None
    h.submit("q", run="r", via=b"again")
    await h.settle()
    assert backend.calls == ["r", "r"]
    assert h.outcomes[-1][0] == b"again"
    assert isinstance(h.outcomes[-1][1], dict)


@pytest.mark.parametrize("path", PATHS)
async def test_the_same_id_in_different_runs_is_two_calls(path: str) -> None:
    backend = Held(at_once=path == "inline")
    h = Harness(backend)
    h.runs.open_run("r1", RunLimits())
    h.runs.open_run("r2", RunLimits())
    h.submit("q", run="r1", via=b"one")
    h.submit("q", run="r2", via=b"two")
    h.submit("q", via=b"anonymous")  # no run: never joined, never listed
    await until(lambda: len(backend.calls) == 3)
    backend.gate.set()
    await h.settle()
    assert sorted(map(str, backend.calls)) == ["None", "r1", "r2"]
    assert h.runs.get("r1").calls == 1
    assert h.runs.get("r2").calls == 1
    assert {via for via, _ in h.outcomes} == {b"one", b"two", b"anonymous"}
    assert all(isinstance(r, dict) and not r.get("replayed") for _, r in h.outcomes)
    assert h.pipeline.replayed == 0


@pytest.mark.parametrize("path", PATHS)
async def test_a_joined_call_cancelled_at_shutdown_answers_both(path: str) -> None:
    backend = Held(at_once=path == "inline")
    h = Harness(backend)
    h.runs.open_run("r", RunLimits())
    h.submit("q", run="r", via=b"old")
    h.submit("q", run="r", via=b"new")
    await until(lambda: len(backend.calls) == 1)
    # One loop turn more, so that the task carrying the call has taken its first step (the
    # server's stop waits out a grace period first): cancelled before that, it never ran at all.
    await asyncio.sleep(0)
    for task in h.pipeline.tasks:
        task.cancel()
    await h.settle()
    assert {via for via, _ in h.outcomes} == {b"old", b"new"}
    for _, e in h.outcomes:
        assert isinstance(e, RlmqError)
        assert (e.code, e.retryable) == (ErrorCode.UNAVAILABLE, True)
    assert h.runs.get("r").calls == 1
    assert not h.pipeline._flying

"""One contract, two implementations: the handler's state in-process and in a real Redis.

Every test of the contract runs against both (``state`` is parametrised); a few at the end are
about what only shared state does (reservations taken over or expired, restarts, outages).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import requires
from redis_server import RedisServer

from rlmq.lmhandler import BudgetExceeded, ConfigError, RunClosed, UnknownRun
from rlmq.lmhandler.config import StateConfig, parse_config
from rlmq.lmhandler.state import MemoryState, State, StateUnavailable, make_state
from rlmq.lmhandler.state.redis import RedisState
from rlmq.protocol import CompleteReply, RunLimits, Usage, encode, unpack

HAS_REDIS = shutil.which("redis-server") is not None
needs_redis = requires(HAS_REDIS, "redis-server (Debian's redis-server package)")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not HAS_REDIS:
        pytest.skip("needs redis-server")  # the tests themselves carry `requires`
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _prefix() -> str:
    return f"t{os.urandom(4).hex()}:"  # a fresh key space per test, one server per module


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[State]:
    if request.param == "memory":
        st: State = MemoryState()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        st = make_state(StateConfig(url=server.url, key_prefix=_prefix()))
    await st.start()
    yield st
    await st.aclose()


def reply_bytes(rid: str, text: str = "answer") -> bytes:
    return encode(CompleteReply(rid, text, "m", Usage(3, 2)))


# ---------------------------------------------------------------- runs


async def test_open_usage_close(state: State) -> None:
    opened = await state.run_open("r", RunLimits(max_calls=10), None)
    assert (opened.run, opened.calls, opened.closed, opened.limits) == (
        "r",
        0,
        False,
        RunLimits(max_calls=10),
    )
    assert await state.runs_open() >= 1
    await state.admit("r", None, "q1", "m", 100, 5.0)
    await state.settle("r", "q1", "m", Usage(10, 5, 2, 1), 0.25, reply_bytes("q1"))
    await state.admit("r", None, "q2", "m", 100, 5.0)
    await state.settle("r", "q2", "m", None, 0.0, None)
    usage = await state.usage("r")
    assert (usage.calls, usage.failed_calls, usage.in_flight) == (2, 1, 0)
    assert usage.usage == Usage(10, 5, 2, 1)
    assert usage.cost_usd == pytest.approx(0.25)
    closed = await state.run_close("r", None)
    assert closed.closed
    assert (await state.usage("r")).closed  # a closed run still answers usage
    with pytest.raises(RunClosed):
        await state.admit("r", None, "q3", "m", 100, 5.0)
    with pytest.raises(RunClosed):
        await state.admit_cached("r", None)


async def test_unknown_run_is_refused_everywhere(state: State) -> None:
    with pytest.raises(UnknownRun):
        await state.admit("nope", None, "q", "m", 10, 1.0)
    with pytest.raises(UnknownRun):
        await state.usage("nope")
    with pytest.raises(UnknownRun):
        await state.run_close("nope", None)


async def test_run_keys(state: State) -> None:
    await state.run_open("k", RunLimits(), "secret")
    with pytest.raises(UnknownRun, match="held by another client"):
        await state.admit("k", None, "q", "m", 10, 1.0)
    with pytest.raises(UnknownRun):
        await state.admit("k", "wrong", "q", "m", 10, 1.0)
    with pytest.raises(UnknownRun):
        await state.run_open("k", RunLimits(), "other")
    with pytest.raises(UnknownRun):
        await state.run_close("k", None)
    await state.admit("k", "secret", "q", "m", 10, 1.0)
    assert (await state.usage("k")).calls == 1  # usage needs no key
    # A run without a key is anyone's.
    await state.run_open("shared", RunLimits(), None)
    await state.admit("shared", "whatever", "q", "m", 10, 1.0)


async def test_max_calls_is_exact_under_concurrency(state: State) -> None:
    await state.run_open("r", RunLimits(max_calls=5), None)
    results = await asyncio.gather(
        *(state.admit("r", None, f"q{i}", "m", 10, 5.0) for i in range(40)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(refused) == 35
    assert all(r.limit == "max_calls" for r in refused)
    assert refused[0].message == "run 'r': call limit of 5 reached"
    usage = await state.usage("r")
    assert (usage.calls, usage.in_flight, usage.exceeded) == (5, 5, "max_calls")


async def test_token_and_cost_limits_in_the_same_words(state: State) -> None:
    await state.run_open("i", RunLimits(max_input_tokens=10), None)
    await state.admit("i", None, "q", "m", 10, 5.0)
    await state.settle("i", "q", "m", Usage(12, 1), 0.0, None)
    with pytest.raises(BudgetExceeded) as info:
        await state.admit("i", None, "q2", "m", 10, 5.0)
    assert info.value.message == "run 'i': input token limit of 10 reached (12 used)"

    await state.run_open("c", RunLimits(max_cost_usd=0.5), None)
    await state.admit("c", None, "q", "m", 10, 5.0)
    await state.settle("c", "q", "m", Usage(1, 1), 0.75, None)
    with pytest.raises(BudgetExceeded) as info:
        await state.admit("c", None, "q2", "m", 10, 5.0)
    assert info.value.message == "run 'c': cost limit of $0.5 reached ($0.75 spent)"

    await state.run_open("d", RunLimits(deadline_s=0), None)
    with pytest.raises(BudgetExceeded) as info:
        await state.admit("d", None, "q", "m", 10, 5.0)
    assert info.value.limit == "deadline_s"
    assert (await state.usage("d")).exceeded == "deadline_s"


async def test_max_tokens_and_timeout_are_clamped(state: State) -> None:
    await state.run_open("r", RunLimits(max_output_tokens=100, deadline_s=30), None)
    first = await state.admit("r", None, "q1", "m", 4096, 120.0)
    assert first.max_tokens == 100
    assert 0 < first.timeout_s <= 30
    await state.settle("r", "q1", "m", Usage(5, 70), 0.0, None)
    second = await state.admit("r", None, "q2", "m", 4096, 1.0)
    assert (second.max_tokens, second.timeout_s) == (30, pytest.approx(1.0))


async def test_reopen_keeps_totals_and_reopening_a_closed_run_starts_afresh(state: State) -> None:
    await state.run_open("r", RunLimits(max_calls=1), None)
    await state.admit("r", None, "q1", "m", 10, 5.0)
    with pytest.raises(BudgetExceeded):
        await state.admit("r", None, "q2", "m", 10, 5.0)
    reopened = await state.run_open("r", RunLimits(max_calls=2), None)
    assert (reopened.calls, reopened.limits.max_calls) == (1, 2)
    await state.admit("r", None, "q2", "m", 10, 5.0)
    await state.run_close("r", None)
    fresh = await state.run_open("r", RunLimits(), None)
    assert (fresh.calls, fresh.closed) == (0, False)


async def test_cache_hits_are_free_but_need_an_open_run(state: State) -> None:
    await state.run_open("r", RunLimits(max_calls=1), None)
    await state.admit_cached("r", None)
    await state.admit_cached("r", None)
    usage = await state.usage("r")
    assert (usage.calls, usage.cached_calls) == (0, 2)


# ---------------------------------------------------------------- finished replies


async def test_a_finished_request_id_is_replayed_not_paid(state: State) -> None:
    await state.run_open("r", RunLimits(max_calls=1), None)
    await state.admit("r", None, "q1", "m", 10, 5.0)
    await state.settle("r", "q1", "m", Usage(3, 2), 0.1, reply_bytes("q1", "the answer"))
    again = await state.admit("r", None, "q1", "m", 10, 5.0)  # over max_calls, but a re-send
    assert again.replay is not None
    reply = CompleteReply.from_wire(unpack(again.replay))
    assert (reply.id, reply.text, reply.replayed) == ("q1", "the answer", True)
    usage = await state.usage("r")
    assert (usage.calls, usage.usage, usage.cost_usd) == (1, Usage(3, 2), pytest.approx(0.1))
    # The same id naming another model is not a re-send of that call.
    with pytest.raises(BudgetExceeded):
        await state.admit("r", None, "q1", "other", 10, 5.0)
    # A replay still needs the run's key.
    await state.run_open("k", RunLimits(), "secret")
    await state.admit("k", "secret", "q1", "m", 10, 5.0)
    await state.settle("k", "q1", "m", Usage(1, 1), 0.0, reply_bytes("q1"))
    with pytest.raises(UnknownRun):
        await state.admit("k", None, "q1", "m", 10, 5.0)


async def test_settling_twice_counts_once(state: State) -> None:
    await state.run_open("r", RunLimits(), None)
    await state.admit("r", None, "q", "m", 10, 5.0)
    await state.settle("r", "q", "m", Usage(3, 2), 0.0, reply_bytes("q"))
    await state.settle("r", "q", "m", Usage(3, 2), 0.0, reply_bytes("q"))
    usage = await state.usage("r")
    assert (usage.calls, usage.usage, usage.failed_calls) == (1, Usage(3, 2), 0)


async def test_a_replay_survives_the_run_being_closed(state: State) -> None:
    await state.run_open("r", RunLimits(), None)
    await state.admit("r", None, "q", "m", 10, 5.0)
    await state.settle("r", "q", "m", Usage(3, 2), 0.0, reply_bytes("q"))
    await state.run_close("r", None)
    assert (await state.admit("r", None, "q", "m", 10, 5.0)).replay is not None


async def test_replays_off(state: State) -> None:
    if isinstance(state, MemoryState):
        off: State = MemoryState(replay_ttl_s=0)
    else:
        assert isinstance(state, RedisState)
        off = make_state(dataclasses.replace(state.config, replay_ttl_s=0))
    await off.start()
    try:
        await off.run_open("r", RunLimits(), None)
        await off.admit("r", None, "q", "m", 10, 5.0)
        await off.settle("r", "q", "m", Usage(3, 2), 0.0, reply_bytes("q"))
        # No reply kept, but the id is still known as settled: settling it again (a retry whose
        # first try did land) counts nothing twice.
        await off.settle("r", "q", "m", Usage(3, 2), 0.0, reply_bytes("q"))
        usage = await off.usage("r")
        assert (usage.calls, usage.usage, usage.failed_calls) == (1, Usage(3, 2), 0)
        assert (await off.admit("r", None, "q", "m", 10, 5.0)).replay is None
    finally:
        await off.aclose()


# ---------------------------------------------------------------- pacing and cache


async def test_pacer_lets_a_burst_through_and_then_paces(state: State) -> None:
    pacer = state.pacer(f"m{os.urandom(2).hex()}", "rpm", 600_000)  # 10,000/s: a burst of 2,000
    for _ in range(50):
        await pacer.acquire()
    pacer.adjust(-5)
    pacer.adjust(5)


# ---------------------------------------------------------------- only shared state


@needs_redis
async def test_a_re_sent_request_in_flight_takes_its_reservation_over(redis_server: RedisServer) -> None:
    st = make_state(StateConfig(url=redis_server.url, key_prefix=_prefix()))
    await st.start()
    try:
        await st.run_open("r", RunLimits(max_calls=1), None)
        await st.admit("r", None, "q", "m", 10, 5.0)
        # Its handler went away; the client sends it again (to another handler): not a new call.
        await st.admit("r", None, "q", "m", 10, 5.0)
        usage = await st.usage("r")
        assert (usage.calls, usage.in_flight) == (1, 1)
        await st.settle("r", "q", "m", Usage(1, 1), 0.0, reply_bytes("q"))
        assert (await st.usage("r")).in_flight == 0
    finally:
        await st.aclose()


@needs_redis
async def test_a_dead_handlers_reservation_expires_with_its_deadline(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rlmq.lmhandler.state.redis.RESERVATION_GRACE_MS", 0)
    st = make_state(StateConfig(url=redis_server.url, key_prefix=_prefix()))
    await st.start()
    try:
        await st.run_open("r", RunLimits(max_calls=1), None)
        await st.admit("r", None, "q", "m", 10, 0.001)  # never settled: its handler died
        # No event marks an expiry in Redis: a bounded poll of usage until it is purged.
        deadline = time.monotonic() + 5
        while (usage := await st.usage("r")).in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert (usage.calls, usage.in_flight, usage.failed_calls) == (1, 0, 1)
        # It finished after all, late: counted as done, not as failed.
        await st.settle("r", "q", "m", Usage(4, 4), 0.0, reply_bytes("q"))
        usage = await st.usage("r")
        assert (usage.failed_calls, usage.usage) == (0, Usage(4, 4))
    finally:
        await st.aclose()


@needs_redis
async def test_state_outlives_its_client(redis_server: RedisServer) -> None:
    config = StateConfig(url=redis_server.url, key_prefix=_prefix())
    first = make_state(config)
    await first.start()
    await first.run_open("r", RunLimits(max_calls=3), "k")
    await first.admit("r", "k", "q", "m", 10, 5.0)
    await first.settle("r", "q", "m", Usage(7, 3), 0.5, reply_bytes("q"))
    await first.aclose()
    second = make_state(config)  # a restarted handler
    await second.start()
    try:
        usage = await second.usage("r")
        assert (usage.calls, usage.usage, usage.limits.max_calls) == (1, Usage(7, 3), 3)
        assert (await second.admit("r", "k", "q", "m", 10, 5.0)).replay is not None
    finally:
        await second.aclose()


@needs_redis
async def test_redis_down_is_unavailable_in_bounded_time_and_service_resumes(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        st = make_state(StateConfig(url=server.url, key_prefix=_prefix(), timeout_s=0.5))
        await st.start()
        try:
            await st.run_open("r", RunLimits(), None)
            server.stop()
            for _ in range(3):  # every call fails, typed and retryable; none hangs (pytest timeout)
                with pytest.raises(StateUnavailable) as info:
                    await st.admit("r", None, "q", "m", 10, 5.0)
                assert info.value.retryable
                assert server.url in info.value.message
            server.start()  # the same port, but empty: persistence is off
            with pytest.raises(UnknownRun):
                await st.admit("r", None, "q", "m", 10, 5.0)  # reached again, without help
            await st.run_open("r", RunLimits(), None)
            await st.admit("r", None, "q", "m", 10, 5.0)
        finally:
            await st.aclose()


@needs_redis
async def test_start_refuses_without_redis() -> None:
    from redis_server import free_port

    st = make_state(StateConfig(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5))
    with pytest.raises(ConfigError, match=r"\[state\] url redis://127\.0\.0\.1:\d+/0: cannot reach Redis"):
        await st.start()


def test_state_table() -> None:
    models = {"root": {"backend": "echo"}}
    assert parse_config({"models": models}).state == StateConfig()
    cfg = parse_config({"models": models, "state": {"url": "redis://h:1/2", "timeout_s": 0.2}})
    assert (cfg.state.url, cfg.state.timeout_s, cfg.state.shared) == ("redis://h:1/2", 0.2, True)
    with pytest.raises(ConfigError, match="unknown key 'urls' in \\[state\\]"):
        parse_config({"models": models, "state": {"urls": "redis://h"}})
    with pytest.raises(ConfigError, match="is not a Redis url"):
        parse_config({"models": models, "state": {"url": "http://h"}})
    with pytest.raises(ConfigError, match="timeout_s must be positive"):
        parse_config({"models": models, "state": {"url": "redis://h", "timeout_s": 0}})
    assert StateConfig(url="redis://:pw@h:1/0").redacted_url() == "redis://:***@h:1/0"


class _FlakySettle(MemoryState):
    """In-process state taken as shared (the pipeline's async path) whose first settlements fail,
    as they do while Redis is away."""

    local = False

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def settle(
        self, run: str, rid: str, model: str, usage: Usage | None, cost_usd: float, reply: bytes | None
    ) -> None:
        if self.failures:
            self.failures -= 1
            raise StateUnavailable("the shared state did not answer")
        await super().settle(run, rid, model, usage, cost_usd, reply)


async def test_a_settlement_that_failed_is_retried_until_the_call_is_counted() -> None:
    """The answer goes out at once; its usage lands on a later try, so a Redis blip does not let
    a paid call escape the run's token and cost limits."""
    from rlmq.lmhandler.backends import EchoBackend
    from rlmq.lmhandler.pipeline import Model, Pipeline
    from rlmq.lmhandler.stats import ServerStats
    from rlmq.lmhandler.testing import echo_model
    from rlmq.protocol import ChatMessage, CompleteRequest

    config = parse_config({"models": {"m": echo_model(price_in_per_mtok=1.0)}})
    state = _FlakySettle(failures=3)
    await state.run_open("r", RunLimits(max_calls=10), None)
    replies: list[dict[str, object]] = []
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    pipeline = Pipeline(
        config,
        {"m": Model(config.models["m"], EchoBackend(config.models["m"]), state)},
        state.runs,
        ServerStats(),
        loop=asyncio.get_running_loop(),
        reply=lambda _env, payload: replies.append(unpack(bytes(payload))),
        fail=lambda _env, rid, exc: pytest.fail(f"{rid} failed: {exc}"),
        sleep=no_wait,
        state=state,
    )
    pipeline.submit([b"c"], CompleteRequest("q1", "m", (ChatMessage("user", "hello"),), run="r"))
    while pipeline.tasks:
        await asyncio.wait(set(pipeline.tasks))
    assert [r["text"] for r in replies] == ["hello"]
    usage = await state.usage("r")
    assert (usage.calls, usage.failed_calls, usage.in_flight) == (1, 0, 0)
    assert usage.usage.input_tokens > 0
    assert pipeline.late_settlements == 1
    assert waits == [0.25, 0.5, 1.0]  # backoff between the three failed tries and the good one


class _GatedAdmission(MemoryState):
    """Shared-looking state whose admissions wait for the test to let each one through, so
    identical calls can be interleaved around the awaits of the shared path."""

    local = False

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}

    def cache(self, alias: str, entries: int) -> _DictStore:
        return _DictStore()

    async def admit(self, run: str, key: str | None, rid: str, model: str, max_tokens: int, timeout_s: float):  # type: ignore[no-untyped-def]
        await self.gates.setdefault(rid, asyncio.Event()).wait()
        return await super().admit(run, key, rid, model, max_tokens, timeout_s)


def _keep(replies: dict[str, dict[str, object]], reply: dict[str, object]) -> None:
    replies[str(reply["id"])] = reply


class _DictStore:
    def __init__(self) -> None:
        self.entries: dict[bytes, object] = {}

    async def get(self, key: bytes) -> object:
        return self.entries.get(key)

    async def put(self, key: bytes, completion: object) -> None:
        self.entries[key] = completion


async def test_a_call_waiting_on_an_identical_one_is_answered_however_admissions_interleave() -> None:
    """A and B ask the same thing; A is admitted first and leads, D arrives and waits on A, then
    B is admitted: B must go on alone, not take the flight over, or D waits for ever."""
    from rlmq.lmhandler.backends import Backend, BackendRequest, Completion
    from rlmq.lmhandler.pipeline import Model, Pipeline
    from rlmq.lmhandler.stats import ServerStats
    from rlmq.lmhandler.testing import echo_model
    from rlmq.protocol import ChatMessage, CompleteRequest

    release = asyncio.Event()
    sent: list[str] = []

    class Held(Backend):
        @property
        def answers_at_once(self) -> bool:
            return False

        async def complete(self, request: BackendRequest) -> Completion:
            sent.append(request.messages[-1].content)
            await release.wait()
            return Completion("the answer", "held", Usage(3, 2))

    config = parse_config({"models": {"m": echo_model(cache_entries=10)}})
    state = _GatedAdmission()
    await state.run_open("r", RunLimits(max_calls=10), None)
    replies: dict[str, dict[str, object]] = {}
    pipeline = Pipeline(
        config,
        {"m": Model(config.models["m"], Held(), state)},
        state.runs,
        ServerStats(),
        loop=asyncio.get_running_loop(),
        reply=lambda _env, payload: replies.__setitem__(
            str(unpack(bytes(payload))["id"]), unpack(bytes(payload))
        ),
        fail=lambda _env, rid, exc: pytest.fail(f"{rid} failed: {exc}"),
        state=state,
    )
    same = (ChatMessage("user", "same question"),)

    async def turns(n: int = 20) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    for rid in ("A", "B", "D"):
        state.gates[rid] = asyncio.Event()
    pipeline.submit([b"a"], CompleteRequest("A", "m", same, run="r"))
    pipeline.submit([b"b"], CompleteRequest("B", "m", same, run="r"))
    await turns()
    state.gates["A"].set()  # A is admitted and leads the flight
    await turns()
    assert sent == ["same question"]
    pipeline.submit([b"d"], CompleteRequest("D", "m", same, run="r"))  # waits on A's flight
    await turns()
    state.gates["B"].set()  # B is admitted after D started waiting
    await turns()
    release.set()
    await asyncio.wait_for(asyncio.gather(*pipeline.tasks), 10)
    assert sorted(replies) == ["A", "B", "D"]
    assert replies["D"]["cached"] is True
    assert pipeline.stats.in_flight == 0

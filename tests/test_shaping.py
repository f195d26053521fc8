"""Shaping: adaptive concurrency, retry budget, circuit breaker and rpm/tpm pacing, with fake clocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from rlmq.lmhandler import shaping
from rlmq.lmhandler.pacing import TokenBucket
from rlmq.lmhandler.shaping import AdaptiveLimit, CircuitBreaker, CircuitOpen, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(shaping.time, "monotonic", c)
    return c


async def until(condition: Callable[[], bool], *, turns: int = 100) -> None:
    """Let other tasks run until ``condition`` holds: a bounded number of event-loop turns, no
    wall-clock time (each turn runs every callback that is ready)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def window(limit: AdaptiveLimit, clock: Clock, attempts: int, refused: int) -> None:
    """One window of outcomes, closed by moving the clock past it."""
    for i in range(attempts):
        if i < refused:
            limit.on_overload()
        else:
            limit.on_success()
    clock.now += 1.1


async def test_limit_shrinks_only_when_a_large_share_is_refused(clock: Clock) -> None:
    limit = AdaptiveLimit(64, minimum=2)
    window(limit, clock, 50, 10)  # a fifth refused, whatever the load: not a reason to shrink
    window(limit, clock, 50, 10)
    assert (limit.decreases, int(limit.limit)) == (0, 64)
    window(limit, clock, 50, 40)  # most refused: the provider wants less
    limit.on_success()  # the first outcome of the next window closes the last one
    assert (limit.decreases, int(limit.limit)) == (1, 32)
    window(limit, clock, 5, 5)  # too few samples to judge
    limit.on_success()
    assert limit.decreases == 1
    for _ in range(32 * 3):
        limit.on_success()
    assert 34 <= int(limit.limit) <= 35  # grows back about one per round trip
    for _ in range(10):
        window(limit, clock, 20, 20)
        limit.on_overload()
    assert int(limit.limit) == 2  # never below the minimum


async def test_waiter_dropped_by_wake_then_cancelled_is_clean() -> None:
    limit = AdaptiveLimit(1)
    await limit.acquire()
    waiter = asyncio.ensure_future(limit.acquire())
    await until(lambda: limit.waiting == 1)
    waiter.cancel()  # cancels the future it waits on at once...
    limit.release()  # ...so the release drops it before the waiter runs its handler
    with pytest.raises(asyncio.CancelledError):
        await waiter  # a ValueError here became `internal` errors under load
    assert limit.in_flight == 0
    await asyncio.wait_for(limit.acquire(), 1)


async def test_limit_queues_in_order_and_admits_as_it_grows() -> None:
    limit = AdaptiveLimit(2)
    await limit.acquire()
    await limit.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await limit.acquire()
        order.append(i)

    tasks = [asyncio.ensure_future(wait(i)) for i in range(3)]
    await until(lambda: limit.waiting == 3)
    limit.release()
    await until(lambda: order == [0])
    assert limit.waiting == 2
    limit.release()
    limit.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert limit.in_flight == 2


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    limit = AdaptiveLimit(1)
    await limit.acquire()
    waiter = asyncio.ensure_future(limit.acquire())
    await until(lambda: limit.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    limit.release()
    assert limit.in_flight == 0
    await asyncio.wait_for(limit.acquire(), 1)


def test_retry_budget_caps_retries_to_a_share_of_requests(clock: Clock) -> None:
    budget = RetryBudget(ratio=0.5, reserve=2)
    for _ in range(100):
        budget.on_request()
    allowed = sum(budget.try_retry() for _ in range(200))
    assert allowed == 52  # 100 requests x 0.5 + the reserve
    assert budget.refused == 148
    clock.now += 30  # an outage later does not spend an old calm period's deposits
    budget.on_request()
    assert sum(budget.try_retry() for _ in range(10)) <= 2


def test_breaker_opens_fails_fast_probes_and_closes(clock: Clock) -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_s=2, max_cooldown_s=8)
    for _ in range(3):
        breaker.before_call()
        breaker.on_failure(provider_down=True)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.retry_after_s == pytest.approx(2)
    clock.now += 2.1
    breaker.before_call()  # the probe
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # only one probe at a time
    breaker.on_failure(provider_down=True)
    assert (breaker.state, breaker.cooldown_s) == ("open", 4)
    clock.now += 4.1
    breaker.before_call()
    breaker.on_success()
    assert breaker.state == "closed"
    breaker.before_call()


def test_rate_limits_and_client_errors_do_not_trip_the_breaker() -> None:
    breaker = CircuitBreaker(threshold=2)
    for _ in range(10):
        breaker.on_failure(provider_down=False)
    assert breaker.state == "closed"
    breaker.on_failure(provider_down=True)
    breaker.on_failure(provider_down=False)  # an answer in between: the provider is up
    breaker.on_failure(provider_down=True)
    assert breaker.state == "closed"


async def test_token_bucket_paces_a_burst() -> None:
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # the fake clock moves only when the bucket waits
        waits.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(per_minute=600, burst_s=1.0, clock=lambda: now[0], sleep=sleep)  # 10/s, burst 10
    await asyncio.gather(*(bucket.acquire() for _ in range(15)))
    # 10 go at once, the other 5 wait a tenth of a second each for their refill
    assert len(waits) == 5
    assert sum(waits) == pytest.approx(0.5)
    assert now[0] == pytest.approx(0.5)
    assert TokenBucket(per_minute=600).capacity == 2  # the default burst: a fifth of a second
    bucket.adjust(-100)  # refunds never exceed the capacity
    assert bucket.level <= bucket.capacity

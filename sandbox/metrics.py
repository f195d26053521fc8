"""``rlmq sandbox --metrics-bind``: the pool's counters as Prometheus metrics.

``PoolCollector`` reads, when ``/metrics`` is scraped and on the pool's loop, what the pool
keeps anyway (``Stats``, the session table, the supervisor's workers, the relay's counts).
docs/observability.md lists the metrics and what they mean.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rlmq.protocol.metrics import MetricsServer, by_label, histogram

from .pool import Pool
from .supervisor import WorkerState

__all__ = ["PoolCollector", "start_metrics"]

P = "rlmq_pool_"

# Stats counters shown as their own counter metric: name (rlmq_pool_<name>_total), key, help.
_COUNTERS = (
    ("sessions_opened", "sessions_opened", "sessions opened"),
    ("sessions_closed", "sessions_closed", "sessions closed by their client"),
    ("sessions_expired", "sessions_expired", "sessions closed after sitting idle too long"),
    ("sessions_lost", "sessions_lost", "sessions whose worker was lost (their variables with it)"),
    ("sessions_reloaded", "sessions_reloaded", "sessions moved to a fresh worker with `context` reloaded"),
    ("execs", "execs", "code executions started"),
    ("exec_timeouts", "exec_timeouts", "executions killed at their timeout"),
    ("exec_worker_deaths", "exec_worker_died", "executions whose worker died while the code ran"),
    ("worker_deaths", "workers_died", "workers that exited without the pool killing them"),
    ("workers_killed", "workers_killed", "workers the pool killed (timeouts, retirements, stop)"),
    ("workers_silent", "workers_silent", "workers that stopped sending heartbeats"),
    ("workers_started", "workers_ready", "workers that started and reported ready"),
    ("rlm_queries", "rlm_queries", "rlm_query requests forwarded to orchestrators"),
    ("tool_calls", "tool_calls", "host tool calls forwarded to orchestrators"),
)


class PoolCollector(Collector):
    """Metric families built from ``pool``'s counters at scrape time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        stats = pool.stats
        counters = stats.counters
        yield GaugeMetricFamily(P + "sessions", "sessions open now", value=len(pool.sessions.table))
        yield GaugeMetricFamily(
            P + "warm_workers", "workers started and waiting for a session", value=pool.sessions.warm
        )
        workers = GaugeMetricFamily(P + "workers", "worker processes, by state", labels=["state"])
        for state in WorkerState:
            workers.add_metric([state.value], pool.supervisor.count(state))
        yield workers
        for name, key, doc in _COUNTERS:
            yield CounterMetricFamily(P + name, doc, value=counters.get(key, 0))
        yield histogram(
            P + "exec_duration_seconds",
            "time from an exec's start to its result (timeouts and deaths included)",
            [],
            stats.exec_histogram.bounds_ms,
            [([], stats.exec_histogram.counts, stats.exec_histogram.sum_ms)],
        )
        yield histogram(
            P + "session_open_duration_seconds",
            "time to open a session (a warm worker taken and `context` loaded)",
            [],
            stats.open_histogram.bounds_ms,
            [([], stats.open_histogram.counts, stats.open_histogram.sum_ms)],
        )
        relay = pool.relay
        sub_calls = CounterMetricFamily(
            P + "sub_calls",
            "workers' model calls at the relay: relayed to the handler, refused, or dropped",
            labels=["outcome"],
        )
        if relay is not None:  # its own thread writes these; ints read whole under the GIL
            sub_calls.add_metric(["relayed"], relay.relayed)
            sub_calls.add_metric(["refused"], relay.refused)
            sub_calls.add_metric(["dropped"], relay.dropped)
        yield sub_calls
        ops = ((key[3:], n) for key, n in counters.items() if key.startswith("op_"))
        yield by_label(P + "requests", "client requests, by op", "op", ops)
        yield by_label(P + "error_replies", "error replies, by wire error code", "code", stats.errors.items())


async def start_metrics(pool: Pool, bind: str) -> MetricsServer:
    """Serve ``pool``'s metrics at ``http://bind/metrics`` on the running loop (``server.url``)."""
    server = MetricsServer([PoolCollector(pool)])
    await server.start(bind)
    return server

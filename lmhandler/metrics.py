"""``rlmq handler --metrics-bind``: the handler's counters as Prometheus metrics.

``HandlerCollector`` reads the counters the handler keeps anyway (``Model.stats``, the shaping
state, ``ServerStats``) when ``/metrics`` is scraped, on the handler's loop: requests pay
nothing for metrics but the latency histogram's bucket count. docs/observability.md lists the
metrics and what they mean.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rlmq.protocol.metrics import MetricsServer, by_label, histogram

from .server import Handler
from .shaping import CircuitBreaker
from .stats import LATENCY_BUCKETS_MS

__all__ = ["HandlerCollector", "start_metrics"]

_BREAKER_STATES = (CircuitBreaker.CLOSED, CircuitBreaker.HALF_OPEN, CircuitBreaker.OPEN)
P = "rlmq_handler_"


def _counter(name: str, doc: str) -> CounterMetricFamily:
    """A counter of the handler, by model (exposed as ``rlmq_handler_<name>_total``)."""
    return CounterMetricFamily(P + name, doc, labels=["model"])


def _gauge(name: str, doc: str) -> GaugeMetricFamily:
    """A gauge of the handler, by model."""
    return GaugeMetricFamily(P + name, doc, labels=["model"])


class HandlerCollector(Collector):
    """Metric families built from ``handler``'s counters at scrape time."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def collect(self) -> Iterator[Metric]:
        models = self.handler.models
        server = self.handler.stats

        requests = _counter("requests", "complete calls admitted for the model")
        ok = _counter("requests_ok", "complete calls answered (cache hits included)")
        errors = CounterMetricFamily(
            P + "request_errors",
            "complete calls that ended in an error reply, by wire error code",
            labels=["model", "code"],
        )
        in_flight = _gauge("requests_in_flight", "complete calls being served now")
        queued = _gauge("requests_queued", "calls waiting for a concurrency slot of the model")
        attempts = _counter("backend_attempts", "attempts sent to the backend")
        retries = _counter("retries", "failed attempts that were retried")
        retry_wait = _counter(
            "retry_wait_seconds", "backoff waited before retries (Retry-After or exponential)"
        )
        limited = _counter("rate_limited", "429 (rate limited) answers from the provider")
        hits = _counter("cache_hits", "calls answered by the handler's response cache")
        tokens_in = _counter("input_tokens", "prompt tokens billed by the provider")
        tokens_out = _counter("output_tokens", "completion tokens billed by the provider")
        cost = _counter("cost_usd", "cost of the model's calls, from its configured prices")
        breaker = GaugeMetricFamily(
            P + "circuit_breaker_state",
            "1 for the state the model's circuit breaker is in (closed, half_open, open), 0 for the others",
            labels=["model", "state"],
        )
        opens = _counter("circuit_breaker_opens", "times the circuit breaker opened")
        limit = _gauge("concurrency_limit", "calls the model may have at the provider at once (adaptive)")
        for alias, model in models.items():
            s = model.stats
            label = [alias]
            requests.add_metric(label, s.requests)
            ok.add_metric(label, s.ok)
            for code, n in s.errors.items():
                errors.add_metric([alias, code], n)
            in_flight.add_metric(label, s.in_flight)
            queued.add_metric(label, s.queued)
            attempts.add_metric(label, s.sent)
            retries.add_metric(label, s.retries)
            retry_wait.add_metric(label, s.retry_wait_s)
            limited.add_metric(label, s.rate_limited)
            hits.add_metric(label, s.cache_hits)
            tokens_in.add_metric(label, s.input_tokens)
            tokens_out.add_metric(label, s.output_tokens)
            cost.add_metric(label, s.cost_usd)
            for state in _BREAKER_STATES:
                breaker.add_metric([alias, state], 1.0 if model.breaker.state == state else 0.0)
            opens.add_metric(label, model.breaker.opens)
            limit.add_metric(label, int(model.slots.limit))
        yield from (requests, ok, errors, in_flight, queued, attempts, retries, retry_wait, limited, hits)
        yield from (tokens_in, tokens_out, cost, breaker, opens, limit)
        yield histogram(
            P + "request_duration_seconds",
            "time from receipt to reply of answered complete calls (cache hits included)",
            ["model"],
            LATENCY_BUCKETS_MS,
            (([alias], m.stats.latency_buckets, m.stats.latency_sum_ms) for alias, m in models.items()),
        )
        # The whole server: every message, and error replies of any op (refusals before a model
        # was known, such as unknown_model or overloaded, included).
        yield CounterMetricFamily(
            P + "messages_received", "messages read from the socket", value=server.received
        )
        yield CounterMetricFamily(P + "replies", "replies sent", value=server.replied)
        yield CounterMetricFamily(
            P + "messages_dropped", "unreadable messages with no id to answer", value=server.dropped
        )
        yield by_label(P + "requests_by_op", "decoded requests, by op", "op", server.by_op.items())
        yield by_label(
            P + "error_replies",
            "error replies sent for any op, by wire error code",
            "code",
            server.errors.items(),
        )
        yield GaugeMetricFamily(
            P + "in_flight", "complete calls being served now, all models", value=server.in_flight
        )


async def start_metrics(handler: Handler, bind: str) -> MetricsServer:
    """Serve ``handler``'s metrics at ``http://bind/metrics`` on the running loop (``server.url``)."""
    server = MetricsServer([HandlerCollector(handler)])
    await server.start(bind)
    return server

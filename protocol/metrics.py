"""Prometheus text at ``/metrics`` for ``--metrics-bind``, shared by the handler and the pool.

The services keep plain counters on their own event loop (lmhandler.stats, the pool's Stats);
a collector of theirs turns them into metric families when scraped. ``MetricsServer`` serves
the scrape on that same loop (aiohttp), so a scrape reads the counters between two steps of the
loop, never halfway through an update, and the hot path pays nothing for it.

Imported only where ``--metrics-bind`` is given: prometheus-client and aiohttp cost a service
that does not serve metrics nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import ConfigError
from .hostport import parse_bind

__all__ = ["MetricsServer", "by_label", "histogram", "parse_bind"]


def by_label(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, int]]
) -> CounterMetricFamily:
    """A counter with one label, a sample per (value, count): requests by op, errors by code."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, n in counts:
        family.add_metric([value], n)
    return family


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str],
    bounds_ms: Sequence[float],
    series: Iterable[tuple[Sequence[str], Sequence[int], float]],
) -> HistogramMetricFamily:
    """A histogram in seconds from counts kept in milliseconds: ``series`` holds, per label set,
    the count in each bucket of ``bounds_ms`` (the last: above them all) and the sum in ms."""
    family = HistogramMetricFamily(name, documentation, labels=labelnames)
    les = [_le(b / 1000.0) for b in bounds_ms] + ["+Inf"]
    for labels, counts, sum_ms in series:
        cumulative, buckets = 0, []
        for le, n in zip(les, counts, strict=True):
            cumulative += n
            buckets.append((le, float(cumulative)))
        family.add_metric(list(labels), buckets, sum_ms / 1000.0)
    return family


def _le(seconds: float) -> str:
    return repr(float(seconds))


class MetricsServer:
    """``GET /metrics`` over HTTP, on the running asyncio loop, from ``collectors``."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # process_*: CPU, memory and file descriptors of the service (Linux /proc).
        for collector in (*collectors, ProcessCollector(registry=None)):
            self.registry.register(collector)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, bind: str) -> str:
        """Listen on ``bind`` (HOST:PORT); returns the URL of the endpoint, with the port bound."""
        host, port = parse_bind(bind)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # Bound here rather than by aiohttp so that port 0's pick can be read back.
            sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {bind}: {exc}") from None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        self.url = f"http://{shown}:{bound_port}/metrics"
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        # Synchronous on the loop: the counters cannot change while they are read.
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

"""OpenTelemetry spans across rlmq's processes: cheap no-ops until ``configure`` runs.

A span's context crosses a process boundary as a W3C ``traceparent`` string, carried by the
optional ``trace`` field of the wire messages (docs/protocol.md). Each side calls
``current_traceparent()`` to fill it and passes what it received as ``span(..., parent=...)``.

Until ``configure`` is called nothing of OpenTelemetry is imported and every function here is
a constant-time no-op (``span`` returns one shared null context, ``current_traceparent`` None),
so code may call them on hot paths. Spans are off by default: the entry points turn them on with
``--otlp-endpoint URL`` (export over OTLP/HTTP, the ``otel`` extra), tests with an exporter of
their own (the SDK's ``InMemorySpanExporter``), and an application that has set up OpenTelemetry
itself with ``configure(service=...)`` alone, which uses its global tracer provider.

Span names (docs/observability.md): ``rlmq.run``, ``rlmq.iteration``, ``rlmq.exec`` (the
orchestrator), ``rlmq.exec.pool`` (the sandbox pool), ``rlmq.complete`` (the handler).
"""

from __future__ import annotations

import contextlib
import importlib
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from .errors import ConfigError

__all__ = [
    "OTEL_EXTRA_HINT",
    "configure",
    "current_traceparent",
    "enabled",
    "record",
    "set_attributes",
    "shutdown",
    "span",
]

OTEL_EXTRA_HINT = "pip install 'rlmq[otel]'"

_OFF: AbstractContextManager[None] = contextlib.nullcontext()


class _Tracing:
    """What ``configure`` set up: a tracer, the W3C propagator, and the provider if we own it."""

    def __init__(self, tracer: Any, provider: Any | None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.tracer = tracer
        self.provider = provider  # an SDK TracerProvider of ours (shut down with us), or None
        self.propagator = TraceContextTextMapPropagator()

    def context_of(self, traceparent: str | None) -> Any:
        """The context whose current span is the remote one ``traceparent`` names (None: the
        current context). A malformed value gives an empty context: the span starts a new trace."""
        if traceparent is None:
            return None
        return self.propagator.extract({"traceparent": traceparent})

    @contextlib.contextmanager
    def span(self, name: str, parent: str | None, attributes: Mapping[str, Any] | None) -> Iterator[None]:
        with self.tracer.start_as_current_span(
            name, context=self.context_of(parent), attributes=_clean(attributes)
        ):
            yield


_state: _Tracing | None = None


def configure(*, service: str, endpoint: str | None = None, exporter: Any = None) -> None:
    """Turn spans on for this process, as ``service`` (the ``service.name`` resource).

    ``endpoint``: an OTLP/HTTP URL (``http://collector:4318``; ``/v1/traces`` is added when the
    URL has no path); spans are batched and sent in the background. Needs the ``otel`` extra.
    ``exporter``: an OpenTelemetry ``SpanExporter`` that gets each span as it ends (tests pass
    the SDK's ``InMemorySpanExporter``). Neither: use the application's global tracer provider.
    Calling it again replaces the previous set-up (flushing it first).
    """
    global _state
    if endpoint is not None and exporter is not None:
        raise ConfigError("tracing takes an OTLP endpoint or an exporter, not both")
    if endpoint is None and exporter is None:
        from opentelemetry import trace

        shutdown()
        _state = _Tracing(trace.get_tracer("rlmq"), None)
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise ConfigError(f"exporting spans needs the OpenTelemetry SDK ({OTEL_EXTRA_HINT}): {exc}") from None
    if endpoint is not None:
        url = _otlp_url(endpoint)
        try:  # by name: the exporter is an optional extra, which type checkers may not have
            exporter_module = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        except ImportError as exc:
            raise ConfigError(f"--otlp-endpoint needs the OTLP exporter ({OTEL_EXTRA_HINT}): {exc}") from None
        processor: Any = BatchSpanProcessor(exporter_module.OTLPSpanExporter(endpoint=url))
    else:
        processor = SimpleSpanProcessor(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    shutdown()
    # A provider of our own, not the global one: the global can be set once per process, and an
    # application embedding rlmq may have set it already.
    _state = _Tracing(provider.get_tracer("rlmq"), provider)


def shutdown() -> None:
    """Flush and stop what ``configure`` set up; spans are off again."""
    global _state
    state, _state = _state, None
    if state is not None and state.provider is not None:
        state.provider.shutdown()


def enabled() -> bool:
    return _state is not None


def span(
    name: str, *, parent: str | None = None, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[None]:
    """A span around the ``with`` body, made current (contextvars) so that nested spans and
    ``current_traceparent()`` see it. ``parent``: a traceparent from the wire (another process);
    None: the current span, if any. An exception escaping the body marks the span as failed."""
    state = _state
    if state is None:
        return _OFF
    return state.span(name, parent, attributes)


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Add attributes to the current span (values known only once the work is done)."""
    state = _state
    if state is not None:
        state.trace.get_current_span().set_attributes(_clean(attributes))


def record(
    name: str,
    *,
    started: float,
    parent: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record a span that began at ``started`` (``time.monotonic()``) and ends now, without ever
    making it current: for work that is not one task's (the handler steps calls inline in its
    receive loop, where a current span would leak into the next message). ``error``: the error
    code it ended in (``error.type``, and the span's status)."""
    state = _state
    if state is None:
        return
    end_ns = time.time_ns()
    start_ns = end_ns - int((time.monotonic() - started) * 1e9)
    attrs = _clean(attributes)
    if error is not None:
        attrs["error.type"] = error
    s = state.tracer.start_span(name, context=state.context_of(parent), attributes=attrs, start_time=start_ns)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        s.set_status(Status(StatusCode.ERROR, error))
    s.end(end_time=end_ns)


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to send on the wire; None when spans are off or
    there is no current span."""
    state = _state
    if state is None:
        return None
    carrier: dict[str, str] = {}
    state.propagator.inject(carrier)
    return carrier.get("traceparent")


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """OpenTelemetry refuses None values (with a warning each): leave them out."""
    if not attributes:
        return {}
    return {k: v for k, v in attributes.items() if v is not None}


def _otlp_url(endpoint: str) -> str:
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"--otlp-endpoint must be an http(s) URL such as http://127.0.0.1:4318, not {endpoint!r}"
        )
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/v1/traces"))
    return endpoint

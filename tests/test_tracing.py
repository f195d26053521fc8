"""OpenTelemetry spans: off (and free) by default, linked across processes by the wire's
``trace`` field, and the handler's ``rlmq.complete`` a child of the caller's span."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from rlmq.lmhandler import cli as handler_cli
from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import echo_model, running_handler, script_model
from rlmq.protocol import (
    AsyncHandlerClient,
    ChatMessage,
    CompleteReply,
    CompleteRequest,
    ConfigError,
    RemoteError,
    TransportTimeout,
    tracing,
)
from rlmq.protocol.codec import decode_request
from rlmq.protocol.sandbox import AsyncSandboxClient
from rlmq.sandbox.testing import running_pool

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
REMOTE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans on for the test, into memory; off again after it."""
    exporter = InMemorySpanExporter()
    tracing.configure(service="rlmq-test", exporter=exporter)
    yield exporter
    tracing.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_off_by_default_every_call_is_a_no_op() -> None:
    assert not tracing.enabled()
    with tracing.span("nothing", attributes={"a": 1}):
        assert tracing.current_traceparent() is None
        tracing.set_attributes({"b": 2})
    tracing.record("nothing", started=0.0, parent=REMOTE, error="internal")
    # One shared null context: no generator, no object per call on a hot path.
    assert tracing.span("a") is tracing.span("b")
    wire = CompleteRequest("1", "root", (ChatMessage("user", "hi"),), trace=tracing.current_traceparent())
    assert "trace" not in wire.to_wire()


def test_nested_spans_and_the_traceparent_of_the_current_one(spans: InMemorySpanExporter) -> None:
    assert tracing.current_traceparent() is None  # on, but no span yet
    with tracing.span("outer", attributes={"rlmq.run": "r1", "skipped": None}):
        outer_tp = tracing.current_traceparent()
        with tracing.span("inner"):
            inner_tp = tracing.current_traceparent()
            tracing.set_attributes({"late": 7})
    (outer,) = named(spans, "outer")
    (inner,) = named(spans, "inner")
    assert outer_tp is not None
    assert inner_tp is not None
    trace_id, span_id = TRACEPARENT.match(outer_tp).groups()  # type: ignore[union-attr]
    assert int(trace_id, 16) == outer.context.trace_id
    assert int(span_id, 16) == outer.context.span_id
    assert inner.parent is not None
    assert inner.parent.span_id == outer.context.span_id
    assert inner.context.trace_id == outer.context.trace_id
    assert dict(outer.attributes or {}) == {"rlmq.run": "r1"}  # None values are left out
    assert dict(inner.attributes or {}) == {"late": 7}
    assert outer.resource.attributes["service.name"] == "rlmq-test"


def test_a_parent_from_the_wire_makes_a_child_of_the_remote_span(spans: InMemorySpanExporter) -> None:
    with tracing.span("here", parent=REMOTE):
        pass
    with tracing.span("garbage", parent="not a traceparent"):
        pass
    (here,) = named(spans, "here")
    assert here.parent is not None
    assert here.parent.is_remote
    assert format(here.context.trace_id, "032x") == REMOTE.split("-")[1]
    assert format(here.parent.span_id, "016x") == REMOTE.split("-")[2]
    (garbage,) = named(spans, "garbage")  # a new trace, and no failure
    assert garbage.parent is None


def test_an_exception_marks_the_span_failed(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="boom"), tracing.span("failing"):
        raise ValueError("boom")
    (failing,) = named(spans, "failing")
    assert failing.status.status_code == StatusCode.ERROR


def test_a_recorded_span_spans_from_its_start_to_now(spans: InMemorySpanExporter) -> None:
    tracing.record(
        "done", started=time.monotonic() - 2.0, parent=REMOTE, attributes={"k": "v"}, error="timeout"
    )
    (done,) = named(spans, "done")
    assert done.start_time is not None
    assert done.end_time is not None
    assert done.end_time - done.start_time >= 2_000_000_000  # back-dated to `started`
    assert done.kind == SpanKind.INTERNAL
    assert done.status.status_code == StatusCode.ERROR
    assert dict(done.attributes or {}) == {"k": "v", "error.type": "timeout"}


@pytest.fixture
async def handler(tmp_path: Path, actx: zmq.asyncio.Context) -> AsyncIterator[Handler]:
    script = tmp_path / "script.json"
    script.write_text('["scripted"]')
    models = {"root": echo_model(cache_entries=4), "sub": script_model(str(script))}
    async with running_handler(models, context=actx) as h:
        yield h


async def test_the_handler_span_of_each_call_is_a_child_of_the_callers_span(
    spans: InMemorySpanExporter, handler: Handler, actx: zmq.asyncio.Context
) -> None:
    async with AsyncHandlerClient(handler.address or "", context=actx) as client:

        async def complete(prompt: str, model: str) -> CompleteReply:
            # The request as a client sends it while a span of its is current.
            req = CompleteRequest(
                client.new_id(),
                model,
                (ChatMessage("user", prompt),),
                run=None,
                depth=2,
                trace=tracing.current_traceparent(),
            )
            reply = await client.request(req)
            assert isinstance(reply, CompleteReply)
            return reply

        with tracing.span("caller"):
            await complete("hello", "root")
            assert (await complete("hello", "root")).cached
            await complete("q", "sub")
            with pytest.raises(RemoteError, match="script_exhausted"):
                await complete("q", "sub")
        await complete("outside any span", "root")

    (caller,) = named(spans, "caller")
    completes = named(spans, "rlmq.complete")
    assert len(completes) == 5
    children, orphan = completes[:4], completes[4]
    for span in children:
        assert span.context.trace_id == caller.context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == caller.context.span_id
        assert span.resource.attributes["service.name"] == "rlmq-test"
    assert orphan.parent is None
    assert orphan.context.trace_id != caller.context.trace_id
    attrs = [dict(s.attributes or {}) for s in children]
    assert [a["rlmq.model"] for a in attrs] == ["root", "root", "sub", "sub"]
    assert [a["rlmq.cached"] for a in attrs] == [False, True, False, False]
    assert all(a["rlmq.depth"] == 2 and "rlmq.run" not in a for a in attrs)
    assert [a.get("error.type") for a in attrs] == [None, None, None, "script_exhausted"]
    assert children[3].status.status_code == StatusCode.ERROR
    assert children[0].status.status_code == StatusCode.UNSET


async def test_tracing_off_the_handler_makes_no_spans(handler: Handler, actx: zmq.asyncio.Context) -> None:
    exporter = InMemorySpanExporter()
    tracing.configure(service="rlmq-test", exporter=exporter)
    tracing.shutdown()  # on, then off again: nothing may reach the old exporter
    async with AsyncHandlerClient(handler.address or "", context=actx) as client:
        req = CompleteRequest(client.new_id(), "root", (ChatMessage("user", "hi"),), trace=REMOTE)
        assert isinstance(await client.request(req), CompleteReply)
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("traced", [False, True], ids=["tracing-off", "tracing-on"])
async def test_what_the_client_sends_carries_a_trace_only_while_tracing_is_on(
    traced: bool, actx: zmq.asyncio.Context
) -> None:
    """The wire as a handler sees it (a bare ROUTER that never answers): no ``trace`` key with
    tracing off; the current span's traceparent with it on."""
    router = actx.socket(zmq.ROUTER)
    exporter = InMemorySpanExporter()
    if traced:
        tracing.configure(service="rlmq-test", exporter=exporter)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        async with AsyncHandlerClient(f"tcp://127.0.0.1:{port}", context=actx, timeout_s=0.5) as client:
            with tracing.span("caller"):
                expected = tracing.current_traceparent()
                with pytest.raises(TransportTimeout):
                    await client.complete("hi", model="root")
            frames = await router.recv_multipart()
    finally:
        tracing.shutdown()
        router.close(linger=0)
    decode_request(frames[-1])  # a valid request either way
    raw = msgpack.unpackb(frames[-1])
    if traced:
        assert expected is not None
        assert raw.get("trace") == expected
    else:
        assert expected is None
        assert "trace" not in raw
        assert exporter.get_finished_spans() == ()


async def test_spans_are_exported_over_otlp_http_to_a_collector() -> None:
    """--otlp-endpoint for real: the SDK's OTLP/HTTP exporter posts protobuf to a collector (a
    local aiohttp server here), which decodes it with OpenTelemetry's own protobuf messages."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []
    got = asyncio.Event()

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        got.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        tracing.configure(service="rlmq-otlp-test", endpoint=f"http://127.0.0.1:{port}")
        with tracing.span("rlmq.run", attributes={"rlmq.run": "r1"}), tracing.span("rlmq.iteration"):
            pass
        # shutdown() flushes the batch processor; it blocks on the HTTP post, so off the loop.
        await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
        await asyncio.wait_for(got.wait(), 30)
    finally:
        tracing.shutdown()
        await runner.cleanup()
    spans = [
        (span.name, scope_spans.scope.name, resource.resource)
        for message in received
        for resource in message.resource_spans
        for scope_spans in resource.scope_spans
        for span in scope_spans.spans
    ]
    assert sorted(name for name, _, _ in spans) == ["rlmq.iteration", "rlmq.run"]
    services = {
        attr.value.string_value
        for _, _, resource in spans
        for attr in resource.attributes
        if attr.key == "service.name"
    }
    assert services == {"rlmq-otlp-test"}


def test_an_otlp_endpoint_without_the_otel_extra_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def without_exporter(name: str, package: str | None = None) -> Any:
        if name.startswith("opentelemetry.exporter"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, package)

    monkeypatch.setattr(tracing.importlib, "import_module", without_exporter)
    with pytest.raises(ConfigError, match=re.escape("pip install 'rlmq[otel]'")):
        tracing.configure(service="rlmq-test", endpoint="http://127.0.0.1:9")
    assert not tracing.enabled()


def test_configure_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="not both"):
        tracing.configure(service="x", endpoint="http://127.0.0.1:4318", exporter=InMemorySpanExporter())
    with pytest.raises(ConfigError):  # not a URL (or, without the extra, the extra's hint)
        tracing.configure(service="x", endpoint="collector:4318")
    assert not tracing.enabled()


def test_the_handler_exits_2_on_an_unusable_otlp_endpoint(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.root]\nbackend = "echo"\n')
    parser = argparse.ArgumentParser()
    handler_cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(config), "--otlp-endpoint", "collector:4318"])
    assert handler_cli.main(args) == 2
    assert not tracing.enabled()


async def test_sub_calls_nest_under_the_exec_across_the_pool_and_the_handler(
    spans: InMemorySpanExporter, actx: zmq.asyncio.Context
) -> None:
    """caller's span -> rlmq.exec.pool (the pool) -> rlmq.complete (the handler), each hop carried
    by the wire's ``trace`` field (all three in this process, each on its own sockets)."""
    async with running_handler({"sub": echo_model()}) as handler:
        async with AsyncHandlerClient(handler.address or "", context=actx) as runs:
            await runs.run_open("r-traced")
        async with (
            running_pool(handler.address or "", workers=1) as pool,
            AsyncSandboxClient(pool.address or "", context=actx) as client,
        ):
            session = await client.open(run="r-traced", context="ctx")
            with tracing.span("caller"):
                result = await session.exec("print(llm_query_batched([context, context + '!']))")
            await session.close()
    assert result.stdout == "['ctx', 'ctx!']\n", result
    (caller,) = named(spans, "caller")
    (exec_span,) = named(spans, "rlmq.exec.pool")
    completes = named(spans, "rlmq.complete")
    assert len(completes) == 2
    assert exec_span.parent is not None
    assert exec_span.parent.span_id == caller.context.span_id
    for span in (exec_span, *completes):
        assert span.context.trace_id == caller.context.trace_id
    for span in completes:
        assert span.parent is not None
        assert span.parent.span_id == exec_span.context.span_id
        assert dict(span.attributes or {})["rlmq.run"] == "r-traced"
        assert dict(span.attributes or {})["rlmq.depth"] == 1

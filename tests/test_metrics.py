"""``--metrics-bind``: the handler's and the pool's /metrics, from real processes, read with
prometheus-client's own text parser and checked against what the test did."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from rlmq.lmhandler import cli as handler_cli
from rlmq.lmhandler.metrics import start_metrics
from rlmq.lmhandler.testing import HeldModel, echo_model, running_handler
from rlmq.protocol import AsyncHandlerClient, ConfigError, ErrorCode, RemoteError
from rlmq.protocol.metrics import parse_bind
from rlmq.protocol.sandbox import AsyncSandboxClient
from rlmq.sandbox import cli as sandbox_cli
from rlmq.sandbox.metrics import start_metrics as start_pool_metrics
from rlmq.sandbox.testing import running_pool

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
START_S = 60.0  # a bound on a service's start (workers included), not a timing claim


class Scrape:
    """One /metrics page, parsed: ``page("rlmq_pool_sessions")``, ``page(name, model="root")``."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.values[(name, frozenset(labels.items()))]

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.values.items() if n == name}


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(await response.text())


@asynccontextmanager
async def service(args: Sequence[str], name: str, log: Path) -> AsyncIterator[tuple[str, str]]:
    """``rlmq <args> --metrics-bind 127.0.0.1:0`` as a process: yields (metrics URL, address),
    both read from its stdout; SIGTERM on exit, and it must stop cleanly."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlmq", *args, "--metrics-bind", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=ENV,
        )
    try:
        assert proc.stdout is not None
        lines = []
        for _ in range(2):  # the metrics line, then the ready line
            lines.append(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), START_S))
        metrics, ready = lines
        assert metrics.startswith(f"{name} metrics on http://127.0.0.1:"), (lines, log.read_text())
        assert ready.startswith(f"{name} ready on "), (lines, log.read_text())
        yield metrics.split()[-1], ready.split()[-1]
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


async def test_handler_metrics_count_calls_errors_tokens_and_cache_hits(
    tmp_path: Path, actx: zmq.asyncio.Context
) -> None:
    script = tmp_path / "script.json"
    script.write_text('["the one scripted answer"]')
    config = tmp_path / "rlmq.toml"
    # Prices of $1 and $2 a token: the cost is read back as a sum of tokens.
    config.write_text(
        '[models.root]\nbackend = "echo"\ncache_entries = 8\n'
        "price_in_per_mtok = 1000000.0\nprice_out_per_mtok = 2000000.0\n"
        f'[models.sub]\nbackend = "script"\npath = "{script}"\n'
    )
    args = ["handler", "--config", str(config), "--bind", "tcp://127.0.0.1:0"]
    async with service(args, "lmhandler", tmp_path / "handler.log") as (url, address):
        empty = await scrape(url)
        async with AsyncHandlerClient(address, context=actx) as client:
            first = await client.complete("hello", model="root")
            again = await client.complete("hello", model="root")  # the handler's cache answers
            other = await client.complete("a longer prompt, for other token counts", model="root")
            scripted = await client.complete("q", model="sub")
            with pytest.raises(RemoteError) as exhausted:
                await client.complete("q", model="sub")
            with pytest.raises(RemoteError) as unknown:
                await client.complete("q", model="nope")
        page = await scrape(url)

    assert empty("rlmq_handler_requests_total", model="root") == 0
    assert empty.labelled("rlmq_handler_request_errors_total") == {}
    assert (first.cached, again.cached, other.cached) == (False, True, False)
    assert exhausted.value.code == ErrorCode.SCRIPT_EXHAUSTED
    assert unknown.value.code == ErrorCode.UNKNOWN_MODEL

    assert page.types["rlmq_handler_requests"] == "counter"
    assert page.types["rlmq_handler_request_duration_seconds"] == "histogram"
    assert page("rlmq_handler_requests_total", model="root") == 3
    assert page("rlmq_handler_requests_ok_total", model="root") == 3
    assert page("rlmq_handler_requests_total", model="sub") == 2
    assert page("rlmq_handler_requests_ok_total", model="sub") == 1
    # Errors by model and code; a refusal before any model is known counts server-wide only.
    assert page.labelled("rlmq_handler_request_errors_total") == {
        frozenset({("model", "sub"), ("code", "script_exhausted")}): 1
    }
    assert page.labelled("rlmq_handler_error_replies_total") == {
        frozenset({("code", "script_exhausted")}): 1,
        frozenset({("code", "unknown_model")}): 1,
    }
    assert page("rlmq_handler_cache_hits_total", model="root") == 1
    assert page("rlmq_handler_cache_hits_total", model="sub") == 0
    assert page("rlmq_handler_backend_attempts_total", model="root") == 2  # the hit reached no backend
    # Tokens and cost: what the replies said was spent (a cache hit spends nothing).
    tokens_in = first.usage.input_tokens + other.usage.input_tokens
    tokens_out = first.usage.output_tokens + other.usage.output_tokens
    assert again.usage.input_tokens == again.usage.output_tokens == 0
    assert page("rlmq_handler_input_tokens_total", model="root") == tokens_in
    assert page("rlmq_handler_output_tokens_total", model="root") == tokens_out
    assert page("rlmq_handler_cost_usd_total", model="root") == pytest.approx(tokens_in + 2 * tokens_out)
    assert page("rlmq_handler_input_tokens_total", model="sub") == scripted.usage.input_tokens
    assert page("rlmq_handler_cost_usd_total", model="sub") == 0
    # The latency histogram holds every answered call, cache hits included.
    assert page("rlmq_handler_request_duration_seconds_count", model="root") == 3
    assert page("rlmq_handler_request_duration_seconds_bucket", model="root", le="+Inf") == 3
    assert page("rlmq_handler_request_duration_seconds_count", model="sub") == 1
    assert page("rlmq_handler_request_duration_seconds_sum", model="root") > 0
    for model in ("root", "sub"):
        assert page("rlmq_handler_requests_in_flight", model=model) == 0
        assert page("rlmq_handler_requests_queued", model=model) == 0
        assert page("rlmq_handler_retries_total", model=model) == 0
        assert page("rlmq_handler_rate_limited_total", model=model) == 0
        assert page("rlmq_handler_circuit_breaker_state", model=model, state="closed") == 1
        assert page("rlmq_handler_circuit_breaker_state", model=model, state="open") == 0
    assert page("rlmq_handler_in_flight") == 0
    assert page("rlmq_handler_requests_by_op_total", op="complete") == 6
    assert page("process_resident_memory_bytes") > 0


async def test_in_flight_and_queued_are_what_the_handler_holds_when_scraped(
    actx: zmq.asyncio.Context,
) -> None:
    """In process, on the same code path as --metrics-bind: two calls at the backend (its
    concurrency is 2) and one queued behind them."""
    held = HeldModel()
    async with running_handler({"held": echo_model(max_concurrency=2)}, backends={"held": held}) as handler:
        server = await start_metrics(handler, "127.0.0.1:0")
        assert server.url is not None
        try:
            async with AsyncHandlerClient(handler.address or "", context=actx) as client:
                calls = [asyncio.create_task(client.complete(f"p{i}", model="held")) for i in range(3)]
                await held.entered(2)
                # No event says the third call has reached the handler's queue: poll the page
                # itself, within a deadline.
                async with asyncio.timeout(10):
                    while (page := await scrape(server.url))(
                        "rlmq_handler_requests_queued", model="held"
                    ) < 1:
                        await asyncio.sleep(0.01)
                assert page("rlmq_handler_requests_in_flight", model="held") == 3
                assert page("rlmq_handler_in_flight") == 3
                assert page("rlmq_handler_requests_ok_total", model="held") == 0
                held.release()
                await asyncio.gather(*calls)
            page = await scrape(server.url)
        finally:
            await server.stop()
    assert page("rlmq_handler_requests_in_flight", model="held") == 0
    assert page("rlmq_handler_requests_queued", model="held") == 0
    assert page("rlmq_handler_requests_ok_total", model="held") == 3
    assert page("rlmq_handler_backend_attempts_total", model="held") == 3
    assert page("rlmq_handler_concurrency_limit", model="held") == 2


async def test_pool_metrics_count_sessions_execs_timeouts_and_deaths(
    tmp_path: Path, actx: zmq.asyncio.Context
) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.sub]\nbackend = "echo"\n')
    handler_args = ["handler", "--config", str(config), "--bind", "tcp://127.0.0.1:0"]
    async with service(handler_args, "lmhandler", tmp_path / "handler.log") as (_, handler_address):
        async with AsyncHandlerClient(handler_address, context=actx) as handler:
            await handler.run_open("r-metrics")  # a handler serves only runs it holds
        pool_args = ["sandbox", "--handler", handler_address, "--bind", "tcp://127.0.0.1:0", "--workers", "1"]
        async with service(pool_args, "sandbox", tmp_path / "pool.log") as (url, pool_address):
            before = await scrape(url)
            async with AsyncSandboxClient(pool_address, context=actx) as client:
                session = await client.open(run="r-metrics", context="the context")
                assert (await session.exec("x = 1")).error is None
                asked = await session.exec("print(llm_query(context))")
                assert asked.stdout == "the context\n", asked
                timed_out = await session.exec("while True: pass", timeout_s=0.5)
                died = await session.exec("import os; os._exit(3)")
                during = await scrape(url)
                await session.close()
            after = await scrape(url)

    assert timed_out.error is not None
    assert timed_out.error.code == "timeout"
    assert died.error is not None
    assert died.error.code == "worker_died"
    assert before("rlmq_pool_sessions") == 0
    assert before("rlmq_pool_warm_workers") == 1  # ready means the warm supply is full
    assert before("rlmq_pool_workers", state="warm") == 1
    assert before("rlmq_pool_execs_total") == 0
    assert during("rlmq_pool_sessions") == 1
    assert after("rlmq_pool_sessions") == 0
    assert after("rlmq_pool_sessions_opened_total") == 1
    assert after("rlmq_pool_sessions_closed_total") == 1
    assert after.types["rlmq_pool_exec_duration_seconds"] == "histogram"
    assert after("rlmq_pool_execs_total") == 4
    assert after("rlmq_pool_exec_duration_seconds_count") == 4
    assert after("rlmq_pool_exec_duration_seconds_bucket", le="+Inf") == 4
    assert after("rlmq_pool_exec_duration_seconds_sum") >= 0.5  # the timed-out exec ran that long at least
    assert after("rlmq_pool_exec_timeouts_total") == 1
    assert after("rlmq_pool_exec_worker_deaths_total") == 1
    assert after("rlmq_pool_worker_deaths_total") == 1  # the timed-out worker was killed, not dead
    assert after("rlmq_pool_workers_killed_total") >= 1
    assert after("rlmq_pool_session_open_duration_seconds_count") == 1
    assert after("rlmq_pool_sub_calls_total", outcome="relayed") == 1
    assert after("rlmq_pool_requests_total", op="exec") == 4
    assert after("rlmq_pool_requests_total", op="open") == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:0", ("::1", 0)), ("localhost:0", ("localhost", 0))],
)
def test_metrics_bind_is_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["9100", ":9100", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_bad_metrics_bind_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_bind(text)


@pytest.fixture
def echo_config(tmp_path: Path) -> Path:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.root]\nbackend = "echo"\n')
    return config


def test_the_handler_exits_2_on_a_bad_metrics_bind_before_it_starts(
    echo_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    parser = argparse.ArgumentParser()
    handler_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--config", str(echo_config), "--bind", "tcp://127.0.0.1:0", "--metrics-bind", "no-port-here"]
    )
    assert handler_cli.main(args) == 2
    assert "--metrics-bind takes HOST:PORT" in caplog.text
    # Refused before the ZeroMQ socket was bound: nothing was said to listen, nothing to stop.
    assert "listening on" not in caplog.text
    assert "lmhandler stopped" not in caplog.text


def test_the_pool_exits_2_on_a_bad_metrics_bind_before_it_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    parser = argparse.ArgumentParser()
    sandbox_cli.add_arguments(parser)
    # The handler address is never dialled: the pool is refused before it binds or starts a worker.
    args = parser.parse_args(
        [
            *("--handler", "ipc://" + str(tmp_path / "h.sock"), "--bind", "tcp://127.0.0.1:0"),
            *("--workers", "1", "--metrics-bind", "127.0.0.1:http"),
        ]
    )
    assert sandbox_cli.main(args) == 2
    assert "--metrics-bind takes HOST:PORT" in caplog.text
    assert "sandbox pool" not in caplog.text


def test_sandbox_help_says_several_handlers_go_comma_separated() -> None:
    parser = argparse.ArgumentParser()
    sandbox_cli.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "comma-separated" in text
    assert "sent again to another" in text


DOC = Path(__file__).resolve().parent.parent / "docs" / "observability.md"


def documented_metrics(prefix: str) -> set[str]:
    """The metric names in the first column of docs/observability.md's tables that start with ``prefix``."""
    names: set[str] = set()
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(rf"`({prefix}\w+)", first_cell))
    return names


def served_metrics(text: str, prefix: str) -> set[str]:
    """The metric names of a scrape as they are written (a counter's family with its ``_total``)."""
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
        if family.name.startswith(prefix)
    }


async def test_the_docs_list_every_metric_served_and_no_other() -> None:
    """In process (the code path of --metrics-bind): a fresh handler's and pool's pages hold every
    family, samples or not, so their names are compared with the doc's tables both ways."""

    async def page(url: str | None) -> str:
        assert url is not None
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return await response.text()

    async with running_handler({"sub": echo_model()}) as handler:
        server = await start_metrics(handler, "127.0.0.1:0")
        try:
            handler_page = await page(server.url)
        finally:
            await server.stop()
        async with running_pool(handler.address or "", workers=1) as pool:
            server = await start_pool_metrics(pool, "127.0.0.1:0")
            try:
                pool_page = await page(server.url)
            finally:
                await server.stop()
    for prefix, text in (("rlmq_handler_", handler_page), ("rlmq_pool_", pool_page)):
        served, documented = served_metrics(text, prefix), documented_metrics(prefix)
        assert served, prefix
        assert served - documented == set(), f"served but not in docs/observability.md: {served - documented}"
        assert documented - served == set(), f"in docs/observability.md but not served: {documented - served}"

"""``rlmq loadtest``, and the handler's fast paths it measures (no timing assertions here).

The handler drives a synchronous ROUTER from the event loop through ZeroMQ's edge-triggered FD,
answers latency-0 ``echo`` calls inline, and batches replies; the tests below would catch a
message left stranded in the socket (each waits for its replies without sending anything more,
so nothing else would wake the handler) and check the fast paths against the slow ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlmq.lmhandler.loadtest import echo_config, spawned_handler, summarize


def loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlmq", "loadtest", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- the command


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_spawn_provider_measures_the_http_relay_path(provider: str) -> None:
    done = loadtest("--spawn", "--provider", provider, "--requests", "60", "--concurrency", "20", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] == 60
    assert report["errors"] == {}
    model = report["handler"]["after"]["models"]["echo"]
    assert model["sent"] >= 60  # every request went out over HTTP to the fake provider


def test_provider_needs_spawn() -> None:
    done = loadtest("--connect", "tcp://127.0.0.1:1", "--provider", "openai")
    assert done.returncode == 2
    assert "--provider goes with --spawn" in done.stderr


@pytest.mark.slow
def test_spawn_json_counts_every_request() -> None:
    done = loadtest("--spawn", "--requests", "200", "--concurrency", "16", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["spawned"] is True
    assert report["mode"] == "closed"
    assert report["sent"] == report["ok"] == 200
    assert report["errors"] == {}
    assert report["processes"] >= 1
    assert report["elapsed_s"] > 0
    assert report["throughput_rps"] > 0
    assert set(report["latency_ms"]) == {"min", "mean", "p50", "p90", "p99", "max"}
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # The handler's own counters, before and after: every request of the test is in the delta.
    delta = report["handler"]["delta"]
    assert delta["models"]["echo"]["requests"] == delta["models"]["echo"]["ok"] == 200
    assert delta["by_op"]["complete"] == 200
    assert delta["replied"] == delta["received"]
    assert "errors" not in delta
    assert report["handler"]["after"]["in_flight"] == 0
    # Every request was accounted to the run the test opened (budgets on), which it closed.
    usage = report["run_usage"]
    assert usage["run"] == report["run"]
    assert usage["calls"] == 200
    assert usage["failed_calls"] == 0
    assert usage["closed"] is True


@pytest.mark.slow
def test_errors_are_counted_by_code() -> None:
    done = loadtest("--spawn", "--model", "no-such-model", "--requests", "50", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] == 0
    assert report["sent"] == 50
    assert report["errors"] == {"unknown_model": 50}
    assert report["latency_ms"]["max"] == 0.0  # latency is of successful calls only
    assert report["handler"]["delta"]["errors"] == {"unknown_model": 50}


@pytest.mark.slow
def test_open_loop_for_a_duration_against_a_running_handler() -> None:
    with spawned_handler(echo_config(latency_ms=1)) as handler:
        done = loadtest(
            "--connect",
            handler.address,
            "--model",
            "echo",
            "--rate",
            "400",
            "--duration",
            "0.5",
            "--no-run",
            "--json",
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["mode"] == "open"
    assert report["rate"] == 400
    assert report["sent"] > 0
    assert report["ok"] == report["sent"]
    assert report["errors"] == {}
    assert report["run"] is None
    assert report["run_usage"] is None
    assert "max_schedule_lag_ms" in report
    assert report["sent_rate_rps"] > 0


@pytest.mark.slow
def test_human_readable_report() -> None:
    done = loadtest("--spawn", "--requests", "100", "--prompt-bytes", "1000")
    assert done.returncode == 0, done.stderr
    assert "throughput" in done.stdout
    assert "100 sent, 100 ok, 0 errors" in done.stdout
    assert "handler     received" in done.stdout
    assert "\r" not in done.stderr  # no progress bar when stderr is not a terminal


def test_loadtest_refuses_bad_options() -> None:
    done = loadtest("--spawn", "--concurrency", "0", "--requests", "10")
    assert done.returncode == 1
    assert "concurrency" in done.stderr


def test_summarize_percentiles() -> None:
    assert summarize([]) == {"min": 0.0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    s = summarize([float(i) for i in range(1, 101)])
    assert s["min"] == 1.0
    assert s["p50"] == 51.0
    assert s["p99"] == 100.0
    assert s["max"] == 100.0

"""``rlmq loadtest`` (the ``rlmq.loadtest`` package): the command as a user runs it, and its parts.

The handler's own transport tests live in test_handler_transport.py; nothing here times anything
(figures belong to bench/): the tests count requests, replies and errors.
"""

from __future__ import annotations

import array
import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

from rlmq.loadtest import (
    LoadSpec,
    LoadtestError,
    check_spec,
    echo_config,
    run_load,
    spawn_handler,
    spawned_handler,
    summarize,
)
from rlmq.loadtest.report import build_report, format_report, stats_delta
from rlmq.loadtest.spec import CLIENT_TIMEOUT, payload_head
from rlmq.protocol import RlmqError
from rlmq.protocol.security import generate_keypair

PACKAGE = Path(__file__).resolve().parent.parent / "rlmq" / "loadtest"


def loadtest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlmq", "loadtest", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
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
    with spawned_handler(echo_config(latency_ms=1), env=os.environ) as handler:
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


@pytest.mark.slow
def test_curve_keys_come_from_the_environment(tmp_path: Path) -> None:
    """Client keys in the environment reach the client processes, server keys the spawned handler."""
    made = subprocess.run(
        [sys.executable, "-m", "rlmq", "keys", "--dir", str(tmp_path), "--client", "loadtest"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    server_env = {
        "RLMQ_CURVE_SERVER_SECRET_FILE": str(tmp_path / "server.key_secret"),
        "RLMQ_CURVE_CLIENTS_DIR": str(tmp_path / "allowed"),
    }
    client_env = {
        "RLMQ_CURVE_SERVER_PUBLIC_FILE": str(tmp_path / "server.key"),
        "RLMQ_CURVE_CLIENT_SECRET_FILE": str(tmp_path / "loadtest.key_secret"),
    }
    # A handler that speaks CURVE only (server keys given): the client must have used its keys.
    with spawned_handler(echo_config(), env={**os.environ, **server_env}) as handler:
        done = loadtest(
            "--connect",
            handler.address,
            "--model",
            "echo",
            "-n",
            "40",
            "--json",
            env={**os.environ, **client_env},
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] == 40
    # --spawn hands the same environment to its handler, so both ends take their keys from it.
    done = loadtest("--spawn", "-n", "40", "--json", env={**os.environ, **server_env, **client_env})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] == 40


def test_half_set_curve_keys_are_refused_before_anything_starts() -> None:
    env = {**os.environ, "RLMQ_CURVE_SERVER_PUBLIC": generate_keypair().public.decode()}
    env.pop("RLMQ_CURVE_CLIENT_SECRET", None)
    env.pop("RLMQ_CURVE_CLIENT_SECRET_FILE", None)
    done = loadtest("--spawn", "-n", "10", env=env)
    assert done.returncode == 1
    assert "half set" in done.stderr


def test_an_address_zeromq_cannot_use_is_an_error_not_a_traceback() -> None:
    done = loadtest("--connect", "nonsense", "-n", "10")
    assert done.returncode == 1
    assert "cannot connect to nonsense" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- the parts


@pytest.mark.slow
def test_run_load_starts_its_client_processes_with_the_given_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Away from the checkout and without PYTHONPATH, the clients still find rlmq.loadtest.worker.
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with spawned_handler(echo_config(), env=os.environ) as handler:
        spec = LoadSpec(address=handler.address, requests=40, concurrency=4, processes=2)
        report = run_load(spec, env=env)
    assert report["processes"] == 2
    assert report["sent"] == report["ok"] == 40
    assert report["run_usage"]["calls"] == 40


def test_spawn_handler_runs_with_the_environment_it_is_given() -> None:
    # A stand-in for `rlmq handler` that announces an address taken from its environment.
    announce = "import os; print('lmhandler ready on', os.environ['RLMQ_TEST_ADDRESS'], flush=True)"
    env = {**os.environ, "RLMQ_TEST_ADDRESS": "tcp://from-the-env:1"}
    handler = spawn_handler("", env=env, command=[sys.executable, "-c", announce])
    try:
        assert handler.address == "tcp://from-the-env:1"
    finally:
        handler.stop()


def test_spawn_handler_that_never_gets_ready_is_a_loadtest_error() -> None:
    with pytest.raises(LoadtestError, match="did not start"):
        spawn_handler("", env=os.environ, command=[sys.executable, "-c", "print('something else')"])
    with pytest.raises(LoadtestError, match="cannot start the handler"):
        spawn_handler("", env=os.environ, command=["/nonexistent/rlmq"])


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"requests": None}, "requests or a duration"),
        ({"requests": 0}, "requests"),
        ({"duration_s": 0.0}, "duration"),
        ({"concurrency": 0}, "concurrency"),
        ({"rate": -1.0}, "rate"),
        ({"prompt_bytes": -1}, "prompt size"),
        ({"processes": 0}, "processes"),
        ({"timeout_s": 0.0}, "timeout"),
    ],
)
def test_check_spec_refuses_what_no_test_can_run_with(change: dict[str, Any], says: str) -> None:
    spec = LoadSpec(address="tcp://127.0.0.1:1", **change)
    with pytest.raises(LoadtestError, match=says) as caught:
        check_spec(spec)
    assert isinstance(caught.value, RlmqError)


def test_payload_head_plus_an_id_is_the_whole_request() -> None:
    spec = LoadSpec(address="x", model="m", prompt_bytes=5, max_tokens=7, run="r", handler_timeout_s=2.5)
    request = msgpack.unpackb(payload_head(spec) + msgpack.packb("w0-1"))
    assert request == {
        "v": 1,
        "op": "complete",
        "model": "m",
        "prompt": "xxxxx",
        "max_tokens": 7,
        "run": "r",
        "timeout_s": 2.5,
        "id": "w0-1",
    }
    assert msgpack.unpackb(payload_head(LoadSpec(address="x")) + msgpack.packb("i"))["id"] == "i"


def _worker_result(
    sent: int, ok: int, errors: dict[str, int], latencies: list[float], first: float, last: float
) -> dict[str, Any]:
    return {
        "sent": sent,
        "ok": ok,
        "errors": errors,
        "latencies_ms": array.array("d", latencies).tobytes(),
        "first_send": first,
        "last_reply": last,
        "last_send": last,
        "max_lag_ms": 0.0,
        "cpu_s": 0.5,
    }


def test_report_merges_the_workers_and_leaves_client_timeouts_unanswered() -> None:
    results = [
        _worker_result(10, 9, {"overloaded": 1}, [1.0] * 9, first=100.0, last=101.0),
        _worker_result(10, 8, {CLIENT_TIMEOUT: 2}, [3.0] * 8, first=100.5, last=102.0),
    ]
    before = {"received": 5, "in_flight": 3, "errors": {"overloaded": 1}}
    after = {"received": 25, "in_flight": 0, "errors": {"overloaded": 2}, "models": {}}
    spec = LoadSpec(address="tcp://h:1", concurrency=8)
    report = build_report(spec, 2, results, before, after, None, None)
    assert (report["sent"], report["ok"]) == (20, 17)
    assert report["errors"] == {CLIENT_TIMEOUT: 2, "overloaded": 1}
    assert report["elapsed_s"] == 2.0  # first send of any worker to the last reply of any
    assert report["throughput_rps"] == 9.0  # 18 answered (timeouts are not answers) in 2 s
    assert report["latency_ms"]["min"] == 1.0
    assert report["latency_ms"]["max"] == 3.0
    assert report["generator_cpu_us_per_request"] == 50_000.0
    assert report["handler"]["delta"] == {"received": 20, "errors": {"overloaded": 1}}
    assert report["mode"] == "closed"
    text = format_report(report)
    assert "20 sent, 17 ok, 3 errors in 2.000 s" in text
    assert f"errors      {CLIENT_TIMEOUT} 2, overloaded 1" in text


def test_stats_delta_keeps_counters_and_drops_gauges() -> None:
    before = {"received": 1, "uptime_s": 5.0, "by_op": {"complete": 1, "ping": 2}, "ok": True}
    after = {
        "received": 4,
        "uptime_s": 9.0,
        "in_flight": 7,
        "by_op": {"complete": 3, "ping": 2},
        "cost_usd": 0.3,
        "ok": True,
        "models": {"echo": {"latency_ms": {"p50": 1.0}, "requests": 2}},
    }
    assert stats_delta(before, after) == {
        "received": 3,
        "by_op": {"complete": 2},
        "cost_usd": 0.3,
        "models": {"echo": {"requests": 2}},
    }


def test_only_the_command_reads_the_environment() -> None:
    """Library functions take the environment as an argument; ``cli.main`` reads it once."""
    readers = sorted(path.name for path in PACKAGE.glob("*.py") if _reads_environ(path))
    assert readers == ["cli.py"]


def _reads_environ(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "environb"}:
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in {"environ", "getenv"} for a in node.names)
        ):
            return True
    return False


def test_connect_spreads_the_load_over_several_handlers() -> None:
    with (
        spawned_handler(echo_config(latency_ms=1), env=os.environ) as one,
        spawned_handler(echo_config(latency_ms=1), env=os.environ) as two,
    ):
        done = loadtest(
            "--connect",
            f"{one.address},{two.address}",
            "--model",
            "echo",
            "--requests",
            "400",
            "--concurrency",
            "8",
            "--no-run",  # each handler here keeps its own state: a run would live on one only
            "--json",
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] == 400
    each = report["handlers"]
    assert sorted(each) == sorted([one.address, two.address])
    assert sum(h["ok"] for h in each.values()) == 400
    assert all(h["ok"] > 0 for h in each.values())
    # The total of the handlers' own counters is the sum of each one's.
    assert report["handler"]["delta"]["received"] == sum(
        h["handler"]["delta"]["received"] for h in each.values()
    )

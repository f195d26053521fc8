"""A whole scripted RLM run, rlmq next to the official implementation (PyPI ``rlms``).

    /tmp/venv/bin/python bench/bench_rlm_run.py [--quick] [--rounds N]

1. rlmq, in this process: a handler (``ScriptedModel`` root answering at once, ``sub`` echo at
   0 ms), a pool with one real worker process, ``orchestrator.loop.RLM``. A run of 10 iterations:
   9 responses with one small ```repl block (one of them ``llm_query_batched`` of 4 prompts),
   then ``FINAL(done)``. The root model has no latency, so the wall time per iteration is the
   framework's overhead (model round trip through the handler + exec round trip through the
   pool + the orchestrator's own work). Also with a 1M-character context, and the session open
   with that context alone.
2. rlms, in its own virtualenv (``bench/results/.venv-rlms``, made by ``bench/bench_rlms.py``'s
   ``ensure_venv``): this file re-runs itself there as a driver (``rlms-batch``, ``rlms-run``),
   which only uses rlms' public API.
   - batch: its ``LocalREPL`` (the default environment) runs
     ``r = llm_query_batched(['x%d' % i for i in range(100)])`` against its ``LMHandler`` serving
     the ``EchoLM`` mock of ``bench/rlms_driver.py`` at 500 ms; rlmq runs the same line in a
     sandbox session with the ``sub`` echo model at 500 ms.
   - whole run: ``rlm.RLM(backend="openai", base_url=<mock>)``: rlms only builds its clients
     from a backend name, so the mock is an OpenAI-compatible HTTP server in the driver process
     (root: the same script; sub: echo). Same 10 iterations; the final one sets
     ``answer["ready"] = True`` in code, rlms' way to finish.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

ITERATIONS = 10
BATCH = 100
BATCH_LATENCY_MS = 500
BIG_CONTEXT = 1_000_000


def script(final: str) -> list[str]:
    """9 code iterations (one with a batch of 4 sub-calls), then ``final``."""
    responses = []
    for i in range(ITERATIONS - 1):
        if i == 4:
            code = "r = llm_query_batched(['p%d' % j for j in range(4)])\nprint(len(r))"
        else:
            code = f"x{i} = len(context) + {i}\nprint(x{i})"
        responses.append(f"Step {i}.\n```repl\n{code}\n```")
    return [*responses, final]


def med(values: list[float], digits: int = 2) -> float:
    return round(statistics.median(values), digits) if values else 0.0


# --------------------------------------------------------------------------------------- rlmq


async def rlmq_bench(rounds: int, batch_rounds: int) -> dict[str, Any]:
    import zmq.asyncio

    from rlmq.lmhandler.testing import ScriptedModel, echo_model, running_handler
    from rlmq.orchestrator.loop import RLM
    from rlmq.orchestrator.settings import RunSettings
    from rlmq.orchestrator.trajectory import Trajectory
    from rlmq.protocol import AsyncHandlerClient
    from rlmq.protocol.sandbox import AsyncSandboxClient
    from rlmq.sandbox.testing import running_pool

    model = ScriptedModel()
    out: dict[str, Any] = {}
    ctx = zmq.asyncio.Context()
    models = {"root": echo_model(), "sub": echo_model(), "slow": echo_model(latency_ms=BATCH_LATENCY_MS)}
    try:
        async with (
            running_handler(models, backends={"root": model}, context=ctx) as h,
            running_pool(h.address or "", workers=1, context=ctx) as pool,
            AsyncHandlerClient(h.address or "", context=ctx, timeout_s=120) as hc,
            AsyncSandboxClient(pool.address or "", context=ctx, timeout_s=120) as sc,
        ):
            counter = 0

            async def one_run(context: str) -> dict[str, Any]:
                nonlocal counter
                counter += 1
                run_id = f"bench-{counter}"
                model.script(run_id, script("FINAL(done)"))
                stamps: list[tuple[str, float]] = []
                ends: dict[int, float] = {}  # iteration -> time of its last event

                def on_event(name: str, fields: dict[str, Any]) -> None:
                    now = time.perf_counter()
                    stamps.append((name, now))
                    if "iteration" in fields:
                        ends[fields["iteration"]] = now

                rlm = RLM(
                    hc,
                    sc,
                    RunSettings(max_iterations=ITERATIONS + 2, exec_timeout_s=60),
                    on_event=on_event,
                )
                await pool.wait_ready()  # a warm worker waiting, as in a steady state
                t0 = time.perf_counter()
                result = await rlm.run("Q?", context, run_id=run_id, trajectory=Trajectory(None))
                wall = time.perf_counter() - t0
                assert (result.answer, result.stop_reason, result.iterations) == (
                    "done",
                    "final",
                    ITERATIONS,
                ), result
                # model round trip: the time up to each model_call event from the event before it
                # (run_start or the previous exec_end); exec round trip: model_call -> exec_end
                # (exec_start, written just before the exec is sent, is not a step of its own).
                model_ms, exec_ms = [], []
                prev_name, prev_t = stamps[0]
                for name, t in stamps[1:]:
                    if name == "exec_start":
                        continue
                    if name == "model_call":
                        model_ms.append((t - prev_t) * 1000)
                    elif name == "exec_end" and prev_name == "model_call":
                        exec_ms.append((t - prev_t) * 1000)
                    prev_name, prev_t = name, t
                end_wall = t0 + wall
                bodies = [(ends[k] - ends[k - 1]) * 1000 for k in range(2, ITERATIONS + 1)]
                return {
                    "wall_ms": wall * 1000,
                    "bodies_ms": bodies,  # iterations 2..10: model round trip + exec + bookkeeping
                    "setup_and_first_ms": (ends[1] - t0) * 1000,  # run_open + session open + iteration 1
                    "teardown_ms": (end_wall - ends[ITERATIONS]) * 1000,  # session close + run_close
                    "first_model_ms": model_ms[0],  # includes the session open
                    "model_ms": model_ms[1:],
                    "exec_ms": exec_ms,
                }

            async def series(context: str, n: int) -> dict[str, Any]:
                await one_run(context)  # warm-up
                runs = [await one_run(context) for _ in range(n)]
                walls = [r["wall_ms"] for r in runs]
                return {
                    "rounds": n,
                    "run_wall_ms": med(walls),
                    "run_wall_ms_all": [round(w, 2) for w in walls],
                    "per_iteration_ms": med([w / ITERATIONS for w in walls]),
                    "first_model_call_incl_open_ms": med([r["first_model_ms"] for r in runs]),
                    "iteration_body_ms": med([x for r in runs for x in r["bodies_ms"]]),
                    # wall minus 10 typical iteration bodies: run/session open and close
                    "outside_iterations_ms": med(
                        [r["wall_ms"] - ITERATIONS * statistics.median(r["bodies_ms"]) for r in runs]
                    ),
                    "setup_and_first_iteration_ms": med([r["setup_and_first_ms"] for r in runs]),
                    "teardown_ms": med([r["teardown_ms"] for r in runs]),
                    "model_round_trip_ms": med([x for r in runs for x in r["model_ms"]]),
                    "exec_round_trip_ms": med([x for r in runs for x in r["exec_ms"]]),
                }

            out["small"] = series_small = await series("hello world", rounds)
            print(f"rlmq small context: {series_small}", flush=True)
            big = ("The quick brown fox jumps over the lazy dog. " * (BIG_CONTEXT // 45 + 1))[:BIG_CONTEXT]
            out["context_1m"] = await series(big, max(3, rounds // 2))
            print(f"rlmq 1M context: {out['context_1m']}", flush=True)

            opens: dict[str, list[float]] = {"small": [], "1m": []}
            for _ in range(max(3, rounds // 2)):
                for key, context in (("small", "hello world"), ("1m", big)):
                    await pool.wait_ready()
                    t = time.perf_counter()
                    session = await sc.open(run="bench-open", context=context)
                    opens[key].append((time.perf_counter() - t) * 1000)
                    await session.close()
            out["session_open_ms"] = {k: med(v) for k, v in opens.items()}
            print(f"rlmq session open: {out['session_open_ms']}", flush=True)

            # 100 batched sub-calls at 500 ms from inside the model's code
            await hc.run_open("bench-batch")
            await pool.wait_ready()
            session = await sc.open(run="bench-batch", context="x", sub_model="slow", exec_timeout_s=120)
            try:
                code = f"r = llm_query_batched(['x%d' % i for i in range({BATCH})])\nassert len(r) == {BATCH}"
                walls, in_worker = [], []
                for _ in range(batch_rounds):
                    t = time.perf_counter()
                    res = await session.exec(code)
                    walls.append(time.perf_counter() - t)
                    assert res.error is None, res
                    assert res.llm_calls == BATCH, res
                    in_worker.append(res.elapsed_ms / 1000)
            finally:
                await session.close()
                await hc.run_close("bench-batch")
            out["batch"] = {
                "size": BATCH,
                "latency_ms": BATCH_LATENCY_MS,
                "exec_s": med(walls, 3),
                "exec_s_all": [round(w, 3) for w in walls],
                "in_worker_s": med(in_worker, 3),
            }
            print(f"rlmq batch: {out['batch']}", flush=True)
    finally:
        ctx.term()
    return out


# ------------------------------------------------------------------ rlms (in its own venv)


def _mock_openai(root_script: list[str]) -> tuple[Any, int, dict[str, Any]]:
    """An OpenAI-compatible chat server: model "root" answers from ``root_script`` (reset it by
    ``state["script"] = [...]``), any other model echoes the last message."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state: dict[str, Any] = {"script": list(root_script), "lock": threading.Lock()}

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else headers and body in two writes wait for a delayed ACK

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["model"] == "root":
                with state["lock"]:
                    text = state["script"].pop(0) if state["script"] else "no script left"
            else:
                text = str(body["messages"][-1]["content"])
            reply = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1], state


def rlms_batch(args: argparse.Namespace) -> None:
    from rlm.core.lm_handler import LMHandler  # type: ignore[import-not-found]
    from rlm.environments.local_repl import LocalREPL  # type: ignore[import-not-found]
    from rlms_driver import EchoLM

    out: dict[str, Any] = {}
    for label, kwargs in (("default", {}), ("max_concurrent_100", {"batch_max_concurrent": BATCH})):
        handler = LMHandler(EchoLM(BATCH_LATENCY_MS / 1000), host="127.0.0.1", port=0, **kwargs)
        address = handler.start()
        repl = LocalREPL(lm_handler_address=address, context_payload="x")
        try:
            code = f"r = llm_query_batched(['x%d' % i for i in range({BATCH})])\nassert len(r) == {BATCH}"
            walls = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                res = repl.execute_code(code)
                walls.append(time.perf_counter() - t)
                ok = len(res.rlm_calls) == BATCH and "Error" not in res.stderr
                assert ok, (res.stderr, len(res.rlm_calls))
            out[label] = {"exec_s": med(walls, 3), "exec_s_all": [round(w, 3) for w in walls]}
        finally:
            repl.cleanup()
            handler.stop()
    print(json.dumps(out), flush=True)


def rlms_run(args: argparse.Namespace) -> None:
    from rlm import RLM  # type: ignore[import-not-found]
    from rlm.logger import RLMLogger  # type: ignore[import-not-found]

    final = 'Done.\n```repl\nanswer["content"] = "done"\nanswer["ready"] = True\n```'
    server, port, state = _mock_openai([])
    base = {"api_key": "x", "base_url": f"http://127.0.0.1:{port}/v1"}
    out: dict[str, Any] = {}
    try:
        from rlm.clients.openai import OpenAIClient  # type: ignore[import-not-found]

        client = OpenAIClient(**base, model_name="sub")
        for _ in range(20):
            client.completion("warm-up")
        rtts = []
        for _ in range(200):
            t = time.perf_counter()
            client.completion("ping")
            rtts.append((time.perf_counter() - t) * 1000)
        out["mock_model_round_trip_ms"] = med(rtts, 3)
        big = ("The quick brown fox jumps over the lazy dog. " * (BIG_CONTEXT // 45 + 1))[:BIG_CONTEXT]
        for label, context, n in (
            ("small", "hello world", args.rounds),
            ("context_1m", big, args.rounds_big),
        ):
            walls, bodies = [], []
            for k in range(n + 1):  # the first is a warm-up
                state["script"] = script(final)
                logger = RLMLogger()  # in memory: gives each iteration's time (model call + execs)
                rlm = RLM(
                    backend="openai",
                    backend_kwargs={**base, "model_name": "root"},
                    other_backends=["openai"],
                    other_backend_kwargs=[{**base, "model_name": "sub"}],
                    environment="local",
                    max_iterations=ITERATIONS + 2,
                    logger=logger,
                )
                t = time.perf_counter()
                result = rlm.completion(context, root_prompt="Q?")
                wall = time.perf_counter() - t
                assert result.response == "done", result.response
                assert not state["script"], state["script"]  # all 10 root responses used
                trajectory = logger.get_trajectory() or {}
                iterations = trajectory.get("iterations", [])
                assert len(iterations) == ITERATIONS, len(iterations)
                if k:
                    walls.append(wall * 1000)
                    bodies.append([it["iteration_time"] * 1000 for it in iterations])
            out[label] = {
                "rounds": n,
                "run_wall_ms": med(walls),
                "run_wall_ms_all": [round(w, 2) for w in walls],
                "per_iteration_ms": med([w / ITERATIONS for w in walls]),
                # rlms' own iteration_time: root model call + the code blocks' execs
                "iteration_body_ms": med([x for b in bodies for x in b]),
                "iteration_body_sum_ms": med([sum(b) for b in bodies]),
                # the rest of completion(): handler + clients + environment set up and torn down
                "outside_iterations_ms": med(
                    [w - ITERATIONS * statistics.median(b) for w, b in zip(walls, bodies, strict=True)]
                ),
            }
    finally:
        server.shutdown()
        server.server_close()
    print(json.dumps(out), flush=True)


def run_driver(python: Path, command: str, *extra: str) -> dict[str, Any]:
    proc = subprocess.Popen(
        [str(python), str(Path(__file__).resolve()), command, *extra],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": "x"},
    )
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"rlms driver {command} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="bench", choices=["bench", "rlms-batch", "rlms-run"])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--rounds-big", type=int, default=3)
    parser.add_argument("--venv", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "rlms-batch":
        return rlms_batch(args)
    if args.command == "rlms-run":
        return rlms_run(args)

    import asyncio

    sys.path.insert(0, str(ROOT))
    from _common import RESULTS, machine, ratio, table, write_results
    from bench_rlms import ensure_venv, rlms_version

    rounds = args.rounds or (3 if args.quick else 15)
    batch_rounds = 2 if args.quick else 5
    python = ensure_venv(args.venv or Path(os.environ.get("RLMQ_RLMS_VENV", RESULTS / ".venv-rlms")))
    version = rlms_version(python)

    ours = asyncio.run(rlmq_bench(rounds, batch_rounds))
    theirs_batch = run_driver(python, "rlms-batch", "--rounds", str(batch_rounds))
    print(f"rlms batch: {theirs_batch}", flush=True)
    theirs_run = run_driver(
        python, "rlms-run", "--rounds", str(rounds), "--rounds-big", str(max(3, rounds // 2))
    )
    print(f"rlms run: {theirs_run}", flush=True)

    s, b = ours["small"], ours["context_1m"]
    print()
    print(
        table(
            ["rlmq, 10-iteration scripted run", "small context", "1M-char context"],
            [
                ["run wall (median)", f"{s['run_wall_ms']:.1f} ms", f"{b['run_wall_ms']:.1f} ms"],
                ["per iteration", f"{s['per_iteration_ms']:.2f} ms", f"{b['per_iteration_ms']:.2f} ms"],
                [
                    "model round trip (handler, 0 ms model)",
                    f"{s['model_round_trip_ms']:.2f} ms",
                    f"{b['model_round_trip_ms']:.2f} ms",
                ],
                [
                    "exec round trip (pool + worker)",
                    f"{s['exec_round_trip_ms']:.2f} ms",
                    f"{b['exec_round_trip_ms']:.2f} ms",
                ],
                [
                    "first model call incl. session open",
                    f"{s['first_model_call_incl_open_ms']:.2f} ms",
                    f"{b['first_model_call_incl_open_ms']:.2f} ms",
                ],
                [
                    "session open alone",
                    f"{ours['session_open_ms']['small']:.2f} ms",
                    f"{ours['session_open_ms']['1m']:.2f} ms",
                ],
            ],
        )
    )
    ts, tb = theirs_run["small"], theirs_run["context_1m"]
    rows = [
        ("run wall, 10 iterations", "run_wall_ms", 1),
        ("wall / 10 iterations", "per_iteration_ms", 2),
        ("one iteration's body (median)", "iteration_body_ms", 2),
        ("outside the iterations (open, close)", "outside_iterations_ms", 1),
    ]
    print()
    print(
        table(
            ["scripted run, 0 ms root model", "rlms", "rlmq", "rlms, 1M ctx", "rlmq, 1M ctx"],
            [[label, *(f"{d[key]:.{digits}f} ms" for d in (ts, s, tb, b))] for label, key, digits in rows],
        )
    )
    print(
        "(rlms' mock model round trip alone, OpenAI client -> mock HTTP: "
        f"{theirs_run['mock_model_round_trip_ms']} ms)"
    )
    ob = ours["batch"]["exec_s"]
    rd, rm = theirs_batch["default"]["exec_s"], theirs_batch["max_concurrent_100"]["exec_s"]
    print()
    print(
        table(
            ["100 x llm_query_batched at 500 ms, one exec", "wall", "rlms / rlmq"],
            [
                [
                    "rlms LocalREPL, LMHandler default (batch_max_concurrent=16)",
                    f"{rd:.3f} s",
                    f"{ratio(rd, ob):.1f}x",
                ],
                [
                    "rlms LocalREPL, LMHandler batch_max_concurrent=100",
                    f"{rm:.3f} s",
                    f"{ratio(rm, ob):.1f}x",
                ],
                ["rlmq sandbox session (worker process)", f"{ob:.3f} s", "1.0x"],
            ],
        )
    )
    path = write_results(
        "rlm_run",
        {
            "bench": "rlm_run",
            "machine": machine(),
            "rlms_version": version,
            "iterations": ITERATIONS,
            "rlmq": ours,
            "rlms": {"batch": theirs_batch, "run": theirs_run},
            "batch_ratio_rlms_over_rlmq": {"default": ratio(rd, ob), "max_concurrent_100": ratio(rm, ob)},
        },
        quick=args.quick,
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()

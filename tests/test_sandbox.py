"""The sandbox pool: unit tests of the namespace and codec, then real pools with real worker
processes talking to a real handler (``echo`` backend)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import (
    AsyncHandlerClient,
    DecodeError,
    ErrorCode,
    RemoteError,
    RunLimits,
    UnknownOp,
    UnsupportedVersion,
    pack,
)
from rlmq.protocol.sandbox import (
    AsyncSandboxClient,
    ExecResult,
    SandboxCode,
    SandboxError,
    context_shape,
    decode_context,
    decode_sandbox_request,
    encode_context,
)
from rlmq.sandbox import ConfigError, LLMQueryError, Pool, PoolConfig, Repl, RLMQueryError, build_config
from rlmq.sandbox.runtime import OutputCapture
from rlmq.sandbox.testing import running_pool

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- unit: namespace and codec


class FakeCalls:
    def __init__(self) -> None:
        self.prompts: list[Any] = []

    def complete(self, prompt: Any, model: str | None) -> str:
        self.prompts.append(prompt)
        if prompt == "fail":
            raise LLMQueryError("llm_query failed (budget_exceeded): no calls left")
        return f"answer to {prompt}"

    def complete_many(self, prompts: Sequence[Any], model: str | None) -> list[str]:
        return [self.complete(p, model) for p in prompts]

    def rlm_query(self, prompt: str, context: Any) -> str:
        return f"child {prompt}"


@pytest.mark.parametrize(
    "module",
    [
        "rlmq.sandbox",
        "rlmq.sandbox.testing",
        "rlmq.sandbox.cli",
        "rlmq.sandbox.runtime",
        "rlmq.sandbox.procs",
        "rlmq.protocol.sandbox",
    ],
)
def test_sandbox_all_names_exist_once(module: str) -> None:
    exported = importlib.import_module(module).__all__
    assert len(set(exported)) == len(exported)
    assert [name for name in exported if not hasattr(importlib.import_module(module), name)] == []


def test_output_capture_keeps_head_and_tail_and_counts_the_cut() -> None:
    out = OutputCapture(100)
    for i in range(1000):
        out.write(f"{i:04d}\n")
    text, cut = out.value()
    assert text.startswith("0000\n0001\n")
    assert text.endswith("0998\n0999\n")
    assert cut == 5000 - 100
    assert f"[truncated {cut:,} characters]" in text
    small = OutputCapture(100)
    small.write("hello")
    assert small.value() == ("hello", 0)
    one_big = OutputCapture(10)
    one_big.write("a" * 5 + "b" * 1000 + "c" * 5)
    text, cut = one_big.value()
    assert text.startswith("aaaaa")
    assert text.endswith("ccccc")
    assert cut == 1000


def test_repl_persists_state_and_echoes_the_last_expression() -> None:
    repl = Repl("the context", FakeCalls())
    first = repl.run("def double(x):\n    return 2 * x\nn = 21")
    assert first.error is None
    assert first.stdout == ""
    second = repl.run("print('n is', n)\ndouble(n)")
    assert second.stdout == "n is 21\n42\n"
    assert repl.run("None").stdout == ""
    assert repl.run("len(context)").stdout == "11\n"


def test_repl_final_and_final_var_record_and_run_on() -> None:
    repl = Repl("", FakeCalls())
    result = repl.run("FINAL(40 + 2)\nprint('after')")
    assert (result.final, result.final_var, result.stdout) == ("42", None, "after\n")
    result = repl.run("answer = ['a', 'b']\nFINAL_VAR('answer')")
    assert (result.final, result.final_var) == ("['a', 'b']", "answer")
    assert repl.run("x = 1").final is None  # recorded per exec
    missing = repl.run("FINAL_VAR('nope')")
    assert missing.error is not None
    assert missing.error.type == "NameError"
    assert "no variable named 'nope'" in missing.error.message
    wrong = repl.run("FINAL_VAR(answer)")
    assert wrong.error is not None
    assert wrong.error.type == "TypeError"


def test_repl_errors_carry_a_trimmed_traceback() -> None:
    repl = Repl("", FakeCalls())
    result = repl.run("def f():\n    return 1 / 0\n\nf()")
    assert result.error is not None
    assert (result.error.code, result.error.type) == ("exception", "ZeroDivisionError")
    assert 'File "<repl-1>", line 4, in <module>' in result.error.traceback
    assert 'File "<repl-1>", line 2, in f' in result.error.traceback
    assert "runtime.py" not in result.error.traceback
    failed = repl.run("x = llm_query('fail')")
    assert failed.error is not None
    assert failed.error.type == "LLMQueryError"
    assert "x = llm_query('fail')" in failed.error.traceback
    assert failed.llm_calls == 1
    syntax = repl.run("def (")
    assert syntax.error is not None
    assert syntax.error.type == "SyntaxError"
    exited = repl.run("raise SystemExit(3)")
    assert exited.error is not None
    assert exited.error.type == "SystemExit"


def test_repl_rlm_query_disabled_message() -> None:
    repl = Repl("", FakeCalls(), rlm_error="rlm_query is disabled at depth 0")
    result = repl.run("rlm_query('q')")
    assert result.error is not None
    assert result.error.type == "RLMQueryError"
    assert result.error.message == "rlm_query is disabled at depth 0"
    assert issubclass(RLMQueryError, RuntimeError)


def test_context_codec_round_trips_and_shapes() -> None:
    docs = [{"title": "a", "body": "xyz"}, "plain", ["n", 1]]
    for value in ("héllo", docs, {"k": "v", "n": [1, "ab"]}):
        fmt, payload = encode_context(value)
        assert decode_context(fmt, payload) == value
    assert decode_context("text", b"\xff ok") == "\ufffd ok"
    assert decode_context("json", b'{"a": ["bc"]}') == {"a": ["bc"]}
    assert context_shape("abc") == ("str", 3, 3)
    assert context_shape(docs) == ("list", 3, 1 + 3 + 5 + 1)
    with pytest.raises(ValueError, match="JSON"):
        decode_context("json", b"{nope")
    with pytest.raises(TypeError):
        encode_context(object())  # type: ignore[arg-type]


def test_sandbox_requests_are_validated_once() -> None:
    ok = decode_sandbox_request(pack({"v": 1, "op": "exec", "id": "1", "session": "s", "code": "1"}), 0)
    assert ok.OP == "exec"
    cases: list[tuple[dict[str, Any], int, type[Exception], str]] = [
        ({"v": 2, "op": "ping", "id": "1"}, 0, UnsupportedVersion, "version 2"),
        ({"v": 1, "op": "fly", "id": "1"}, 0, UnknownOp, "fly"),
        ({"v": 1, "op": "exec", "id": "1", "session": "s"}, 0, DecodeError, "'code'"),
        ({"v": 1, "op": "open", "id": "1", "run": "r", "context_format": "text"}, 0, DecodeError, "blob"),
        ({"v": 1, "op": "open", "id": "1", "run": "r", "context_format": "xml"}, 1, DecodeError, "xml"),
        (
            {"v": 1, "op": "exec", "id": "1", "session": "s", "code": "1", "timeout_s": -1},
            0,
            DecodeError,
            ">=",
        ),
    ]
    for obj, nblobs, kind, text in cases:
        with pytest.raises(kind, match=text) as info:
            decode_sandbox_request(pack(obj), nblobs)
        assert getattr(info.value, "request_id", None) == "1"


def test_config_from_table_and_flags() -> None:
    config = build_config(
        {"workers": 5, "uid_base": False, "preimport": ["json"]}, source="x.toml", workers=3
    )
    assert (config.workers, config.uid_base, config.preimport) == (3, None, ("json",))
    with pytest.raises(ConfigError, match=r"x\.toml: unknown key 'wokers' in \[sandbox\]"):
        build_config({"wokers": 1}, source="x.toml")
    with pytest.raises(ConfigError, match="isolation must be one of"):
        build_config({"isolation": "vm"}, source="x.toml")
    with pytest.raises(ConfigError, match="memory_mb must be int"):
        build_config({"memory_mb": "lots"}, source="x.toml")
    with pytest.raises(ConfigError, match="handler address"):
        Pool(PoolConfig())


# ---------------------------------------------------------------- real pools


@pytest.fixture
async def handler() -> AsyncIterator[Handler]:
    async with running_handler({"sub": echo_model(), "slow": echo_model(latency_ms=300)}) as h:
        yield h


@pytest.fixture
async def pool(handler: Handler) -> AsyncIterator[Pool]:
    async with running_pool(handler.address or "") as p:
        yield p


@pytest.fixture
async def client(pool: Pool, actx: zmq.asyncio.Context) -> AsyncIterator[AsyncSandboxClient]:
    async with AsyncSandboxClient(pool.address or "", context=actx) as c:
        yield c


def ok(result: ExecResult) -> ExecResult:
    assert result.error is None, result.error
    return result


async def test_state_persists_across_execs(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-state", context="abc")
    ok(await session.exec("import math\ndef area(r):\n    return math.pi * r * r\nseen = []"))
    ok(await session.exec("seen.append(round(area(2), 2))"))
    result = ok(await session.exec("seen.append('again')\nseen"))
    assert result.stdout == "[12.57, 'again']\n"
    assert result.elapsed_ms >= 0
    assert not result.state_lost
    await session.close()


async def test_llm_query_answers_tagged_with_run_and_counted(
    client: AsyncSandboxClient, handler: Handler
) -> None:
    session = await client.open(run="r-llm", context="")
    result = ok(await session.exec("a = llm_query('hello there')\nprint(a)\nllm_query('x', model='sub')"))
    assert result.stdout == "hello there\n'x'\n"
    assert result.llm_calls == 2
    async with AsyncHandlerClient(handler.address or "") as hc:
        usage = await hc.usage("r-llm")
    assert usage.calls == 2
    failed = await session.exec("llm_query('x', model='nope')")
    assert failed.error is not None
    assert failed.error.type == "LLMQueryError"
    assert "unknown_model" in failed.error.message
    # the traceback ends at the model's own call, not inside the worker
    assert failed.error.traceback.rstrip().splitlines()[-2].strip() == "llm_query('x', model='nope')"
    assert "sandbox" not in failed.error.traceback
    await session.close()


async def test_100_batched_sub_calls_at_300ms_take_under_a_second(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-batch", sub_model="slow")
    started = time.monotonic()
    result = ok(
        await session.exec("answers = llm_query_batched([f'p{i}' for i in range(100)])\nlen(answers)")
    )
    elapsed = time.monotonic() - started
    assert result.stdout == "100\n"
    assert elapsed < 1.0, f"100 batched sub-calls at 300 ms took {elapsed:.2f} s"
    assert result.llm_calls == 100
    in_order = ok(await session.exec("answers == [f'p{i}' for i in range(100)]"))
    assert in_order.stdout == "True\n"
    await session.close()


async def test_a_failed_batch_prompt_is_named(client: AsyncSandboxClient, handler: Handler) -> None:
    async with AsyncHandlerClient(handler.address or "") as hc:
        await hc.run_open("r-budget", RunLimits(max_calls=3))
    session = await client.open(run="r-budget")
    result = await session.exec("llm_query_batched(['a', 'b', 'c', 'd', 'e'])")
    assert result.error is not None
    assert result.error.type == "LLMQueryError"
    assert "2 of 5 prompts failed (indexes 3, 4)" in result.error.message
    assert "budget_exceeded" in result.error.message
    await session.close()


async def test_40mb_context_is_loaded_fast_and_whole(client: AsyncSandboxClient) -> None:
    text = ("0123456789 abcdefghi\n" * 2_000_000)[:40_000_000]
    started = time.monotonic()
    session = await client.open(run="r-big", context=text)
    open_s = time.monotonic() - started
    assert open_s < 1.0, f"opening a 40 MB session took {open_s:.2f} s"
    assert (session.info.context_type, session.info.context_length) == ("str", 40_000_000)
    assert session.info.context_chars == 40_000_000
    result = ok(await session.exec("len(context), context[:10], context[-3:]"))
    assert result.stdout == f"(40000000, '0123456789', {text[-3:]!r})\n"
    await session.close()


async def test_list_dict_and_path_contexts(client: AsyncSandboxClient, tmp_path: Path) -> None:
    docs = [{"title": "one", "text": "alpha"}, {"title": "two", "text": "beta"}]
    listed = await client.open(run="r-ctx", context=docs)
    assert (listed.info.context_type, listed.info.context_length, listed.info.context_chars) == (
        "list",
        2,
        15,
    )
    assert ok(await listed.exec("[d['title'] for d in context]")).stdout == "['one', 'two']\n"
    mapped = await client.open(run="r-ctx", context={"a.txt": "hello", "b.txt": "world"})
    assert ok(await mapped.exec("sorted(context)")).stdout == "['a.txt', 'b.txt']\n"
    (tmp_path / "doc.txt").write_text("from a file\n")
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    from_text = await client.open(run="r-ctx", context_path=str(tmp_path / "doc.txt"))
    assert ok(await from_text.exec("context")).stdout == "'from a file\\n'\n"
    from_json = await client.open(run="r-ctx", context_path=str(tmp_path / "docs.json"))
    assert from_json.info.context_type == "list"
    with pytest.raises(SandboxError) as missing:
        await client.open(run="r-ctx", context_path=str(tmp_path / "absent.txt"))
    assert missing.value.code == ErrorCode.BAD_REQUEST
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SandboxError, match="not valid JSON"):
        await client.open(run="r-ctx", context_path=str(tmp_path / "bad.json"))
    for session in (listed, mapped, from_text, from_json):
        await session.close()


async def test_exceptions_come_back_with_tracebacks(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-exc")
    result = await session.exec("print('before')\ndef parse(s):\n    return int(s)\n\nparse('x')")
    assert result.error is not None
    assert (result.error.code, result.error.type) == ("exception", "ValueError")
    assert "invalid literal for int()" in result.error.message
    assert "line 5, in <module>" in result.error.traceback
    assert "line 3, in parse" in result.error.traceback
    assert result.stdout == "before\n"
    assert not result.state_lost
    ok(await session.exec("parse('7')"))  # the namespace survives an exception
    await session.close()


async def test_huge_output_is_truncated_with_a_note(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-out", max_output_chars=1000)
    code = "import sys\nfor i in range(200_000):\n    print(i)\nprint('x' * 5_000_000, file=sys.stderr)"
    result = ok(await session.exec(code))
    total_out = sum(len(f"{i}\n") for i in range(200_000))
    assert result.stdout.startswith("0\n1\n2\n")
    assert result.stdout.endswith("199998\n199999\n")
    assert result.truncated_chars == (total_out - 1000) + (5_000_001 - 1000)
    assert f"[truncated {total_out - 1000:,} characters]" in result.stdout
    assert len(result.stdout) < 1100
    assert len(result.stderr) < 1100
    await session.close()


async def test_final_and_final_var_are_reported(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-final")
    result = ok(await session.exec("FINAL('the answer')\nprint('still running')"))
    assert (result.final, result.final_var, result.stdout) == ("the answer", None, "still running\n")
    result = ok(await session.exec("total = sum(range(10))\nFINAL_VAR('total')"))
    assert (result.final, result.final_var) == ("45", "total")
    result = await session.exec("FINAL_VAR('missing')")
    assert result.error is not None
    assert result.error.type == "NameError"
    assert result.final is None
    await session.close()


async def test_rlm_query_round_trip_through_the_orchestrator(client: AsyncSandboxClient) -> None:
    seen: list[tuple[str, Any]] = []

    async def child_run(prompt: str, context: Any) -> str:
        seen.append((prompt, context))
        if prompt == "boom":
            raise RuntimeError("child run failed")
        await asyncio.sleep(0.01)  # answered asynchronously while the code waits
        return f"child says {prompt}"

    session = await client.open(run="r-rlm", max_depth=2, on_rlm_query=child_run)
    result = ok(
        await session.exec("a = rlm_query('sum it', context=['d1', 'd2'])\nb = rlm_query('plain')\na, b")
    )
    assert result.stdout == "('child says sum it', 'child says plain')\n"
    assert seen == [("sum it", ["d1", "d2"]), ("plain", None)]
    failed = await session.exec("rlm_query('boom')")
    assert failed.error is not None
    assert failed.error.type == "RLMQueryError"
    assert "child run failed" in failed.error.message
    await session.close()


async def test_rlm_query_is_disabled_at_max_depth_or_without_a_handler(client: AsyncSandboxClient) -> None:
    async def never(prompt: str, context: Any) -> str:
        raise AssertionError("must not be called")

    flat = await client.open(run="r-depth", on_rlm_query=never)  # max_depth=1: depth 0 may not recurse
    result = await flat.exec("rlm_query('q')")
    assert result.error is not None
    assert result.error.type == "RLMQueryError"
    assert "disabled at depth 0 (max_depth=1)" in result.error.message
    assert "llm_query" in result.error.message
    deep = await client.open(run="r-depth", depth=1, max_depth=2, on_rlm_query=never)
    result = await deep.exec("rlm_query('q')")
    assert result.error is not None
    assert "disabled at depth 1 (max_depth=2)" in result.error.message
    no_handler = await client.open(run="r-depth", max_depth=3)
    result = await no_handler.exec("rlm_query('q')")
    assert result.error is not None
    assert "does not answer recursive runs" in result.error.message
    for session in (flat, deep, no_handler):
        await session.close()


async def test_malformed_frames_are_answered_or_dropped(pool: Pool, actx: zmq.asyncio.Context) -> None:
    sock = actx.socket(zmq.DEALER)
    sock.connect(pool.address or "")
    try:

        async def reply() -> dict[str, Any]:
            assert await sock.poll(5000), "no reply from the pool"
            frames = await sock.recv_multipart()
            assert frames[0] == b""
            obj: dict[str, Any] = msgpack.unpackb(frames[1])
            return obj

        dropped: list[list[bytes]] = [
            [b"no delimiter"],
            [b"", b"\xc1 not msgpack"],
            [b"", pack({"v": 1, "op": "ping"})],  # no id: nobody to answer
            [b""],
        ]
        for frames in dropped:
            await sock.send_multipart(frames)
        answered: list[tuple[list[bytes], str]] = [
            ([b"", pack({"v": 9, "op": "ping", "id": "a"})], "unsupported_version"),
            ([b"", pack({"v": 1, "op": "dance", "id": "b"})], "unknown_op"),
            ([b"", pack({"v": 1, "op": "exec", "id": "c", "session": 5, "code": "1"})], "bad_request"),
            ([b"", pack({"v": 1, "op": "open", "id": "d", "run": "r"}), b"stray blob"], "bad_request"),
            (
                [b"", pack({"v": 1, "op": "exec", "id": "e", "session": "s-none", "code": "1"})],
                "unknown_session",
            ),
        ]
        for frames, code in answered:
            await sock.send_multipart(frames)
            obj = await reply()
            assert (obj["ok"], obj["error"]["code"]) == (False, code), obj
        await sock.send_multipart([b"", pack({"v": 1, "op": "ping", "id": "alive"})])
        obj = await reply()
        assert obj["id"] == "alive"
        assert obj["ok"] is True
        assert obj["server"] == "rlmq-sandbox"
    finally:
        sock.close(linger=0)


async def test_unknown_and_closed_sessions(client: AsyncSandboxClient, pool: Pool) -> None:
    session = await client.open(run="r-close")
    pid = session.info.worker_pid
    await session.close()
    await session.close()  # idempotent
    with pytest.raises(SandboxError) as closed:
        await session.exec("1")
    assert closed.value.code == SandboxCode.UNKNOWN_SESSION
    await pool.wait_cleaned()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone, never handed to another session
    fresh = await client.open(run="r-close")
    assert fresh.info.worker_pid != pid
    await fresh.close()


async def test_busy_session_and_max_sessions(handler: Handler, actx: zmq.asyncio.Context) -> None:
    async with (
        running_pool(handler.address or "", workers=1, max_sessions=1) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run="r-max")
        with pytest.raises(SandboxError) as full:
            await client.open(run="r-max")
        assert full.value.code == ErrorCode.OVERLOADED
        assert full.value.retryable
        slow = asyncio.ensure_future(session.exec("llm_query('x', model='slow')"))
        await asyncio.sleep(0)  # the first exec's request leaves before the second's
        with pytest.raises(SandboxError) as busy:
            await session.exec("1")
        assert busy.value.code == SandboxCode.SESSION_BUSY
        ok(await slow)
        await session.close()
        again = await client.open(run="r-max")
        await again.close()


async def test_a_silent_worker_is_noticed_and_replaced(handler: Handler, actx: zmq.asyncio.Context) -> None:
    async with (
        running_pool(handler.address or "", heartbeat_interval_s=0.2, heartbeat_liveness=3) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run="r-hb", context="kept")
        ok(await session.exec("x = 1"))
        stopped = session.info.worker_pid
        os.kill(stopped, signal.SIGSTOP)  # alive but silent: hung, as far as anyone can tell
        started = time.monotonic()
        result = await session.exec("x")
        assert result.error is not None
        assert result.error.code == "worker_died"
        assert "silent" in result.error.message
        assert result.state_lost
        assert time.monotonic() - started < 3.0
        result = ok(await session.exec("context"))
        assert result.stdout == "'kept'\n"
        assert session.info.worker_pid != stopped
        await pool.wait_cleaned()
        with pytest.raises(ProcessLookupError):
            os.kill(stopped, 0)
        await session.close()


async def test_a_session_may_use_another_handler(handler: Handler, actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"sub": echo_model()}) as other,
        running_pool(handler.address or "", workers=1) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run="r-other", handler=other.address)
        assert ok(await session.exec("llm_query('over there')")).stdout == "'over there'\n"
        async with AsyncHandlerClient(other.address or "") as hc:
            assert (await hc.usage("r-other")).calls == 1
        async with AsyncHandlerClient(handler.address or "") as hc:
            with pytest.raises(RemoteError):  # the pool's own handler never saw the run
                await hc.usage("r-other")
        await session.close()


async def test_workers_that_cannot_start_make_open_fail_clearly(
    handler: Handler, actx: zmq.asyncio.Context
) -> None:
    settings: dict[str, Any] = {"python": "/bin/false", "workers": 1, "open_timeout_s": 1.0}
    async with (
        running_pool(handler.address or "", wait_ready=False, **settings) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        with pytest.raises(SandboxError) as failed:
            await client.open(run="r-broken")
        assert failed.value.code == SandboxCode.POOL_EXHAUSTED
        assert failed.value.retryable
        assert "exited with status 1 before it was ready" in failed.value.message


async def test_idle_sessions_expire(handler: Handler, actx: zmq.asyncio.Context) -> None:
    settings: dict[str, Any] = {"workers": 1, "idle_timeout_s": 0.3, "heartbeat_interval_s": 0.1}
    async with (
        running_pool(handler.address or "", **settings) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run="r-idle")
        async with asyncio.timeout(5):
            while pool.snapshot()["sessions_open"]:
                await asyncio.sleep(0.05)  # waiting for a condition, bounded: not a sync by sleep
        with pytest.raises(SandboxError) as expired:
            await session.exec("1")
        assert expired.value.code == SandboxCode.UNKNOWN_SESSION
        assert pool.snapshot()["counters"]["sessions_expired"] == 1


async def test_ping_and_stats(client: AsyncSandboxClient) -> None:
    pong = await client.ping()
    assert pong["server"] == "rlmq-sandbox"
    assert pong["versions"] == [1]
    assert pong["workers_ready"] == 2
    session = await client.open(run="r-stats")
    ok(await session.exec("1"))
    await session.close()
    stats = await client.stats()
    assert stats["counters"]["sessions_opened"] == 1
    assert stats["counters"]["execs"] == 1
    assert stats["open_ms"]["p50"] > 0
    assert stats["isolation"] == "process"


# ---------------------------------------------------------------- command line


def test_cli_rejects_unknown_config_keys(tmp_path: Path) -> None:
    from rlmq.sandbox import cli

    config = tmp_path / "rlmq.toml"
    config.write_text('[models.sub]\nbackend = "echo"\n\n[sandbox]\nworkrs = 3\n')
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--handler", "tcp://127.0.0.1:1", "--config", str(config)])
    assert cli.main(args) == 2


async def test_cli_serves_until_sigterm(handler: Handler, tmp_path: Path, actx: zmq.asyncio.Context) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text("[sandbox]\nworkers = 1\nexec_timeout_s = 30.0\n")
    script = (
        "import argparse, logging, sys\n"
        "from sandbox import cli\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "p = argparse.ArgumentParser(); cli.add_arguments(p)\n"
        "sys.exit(cli.main(p.parse_args(sys.argv[1:])))\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            "--handler",
            handler.address or "",
            "--bind",
            "tcp://127.0.0.1:0",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.startswith("sandbox ready on tcp://127.0.0.1:"), line
        async with AsyncSandboxClient(line.split()[-1], context=actx) as client:
            session = await client.open(run="r-cli", context="cli context")
            assert session.exec_timeout_s == 30.0
            result = ok(await session.exec("llm_query(context)"))
            assert result.stdout == "'cli context'\n"
            pid = session.info.worker_pid
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=20)
        assert proc.returncode == 0, err
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

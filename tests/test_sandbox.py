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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from rlmq.fakeprovider import FakeProvider, FakeProviderConfig
from rlmq.lmhandler.backends import Backend, BackendRequest, Completion
from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import echo_model, ipc_address, running_handler
from rlmq.protocol import (
    AsyncHandlerClient,
    DecodeError,
    ErrorCode,
    RunLimits,
    TransportTimeout,
    UnknownOp,
    UnsupportedVersion,
    Usage,
    pack,
)
from rlmq.protocol.errors import ErrorInfo
from rlmq.protocol.sandbox import (
    AsyncSandboxClient,
    ExecResult,
    SandboxError,
    context_shape,
    decode_context,
    decode_sandbox_request,
    encode_context,
)
from rlmq.sandbox import ConfigError, LLMQueryError, Pool, PoolConfig, Repl, RLMQueryError, build_config
from rlmq.sandbox._wire import Assign, Loaded, RlmAnswer, decode_from_pool, decode_from_worker
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
        "rlmq.sandbox.errors",
        "rlmq.sandbox.supervisor",
        "rlmq.sandbox.sessions",
        "rlmq.sandbox.pool",
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
    # Given the value rather than the name (as models write it), the value is the answer.
    value = repl.run("FINAL_VAR(answer)")
    assert (value.error, value.final, value.final_var, value.ending) == (
        None,
        "['a', 'b']",
        "answer",
        "final_var",
    )


def test_repl_final_var_given_a_value_or_a_str_value() -> None:
    repl = Repl("", FakeCalls())
    assert repl.run("FINAL_VAR(6 * 7)").final == "42"  # a value that is no variable's: still the answer
    result = repl.run("city = 'Paris'\nFINAL_VAR(city)")  # the str value of a variable
    assert (result.final, result.final_var, result.ending) == ("Paris", "city", "final_var")
    missing = repl.run("FINAL_VAR('Lyon')")
    assert missing.error is not None
    assert "(defined: context, answer, city)" in missing.error.message
    assert "FINAL(answer)" in missing.error.message


def test_repl_answer_dict_ends_when_ready() -> None:
    repl = Repl("", FakeCalls())
    assert repl.run("answer").stdout == "{'content': '', 'ready': False}\n"
    draft = repl.run("answer['content'] = 'forty-two'")
    assert (draft.final, draft.ending) == (None, None)
    done = repl.run("answer['content'] = 42\nanswer['ready'] = True\nprint('set')")
    assert (done.final, done.final_var, done.ending, done.stdout) == ("42", None, "answer", "set\n")
    empty = Repl("", FakeCalls()).run("answer['ready'] = True")
    assert empty.final is None
    assert 'answer["content"] is empty' in empty.stderr
    both = Repl("", FakeCalls()).run("answer.update(content='dict', ready=True)\nFINAL('explicit')")
    assert (both.final, both.ending) == ("explicit", "final")  # FINAL called in code wins
    rebound = Repl("", FakeCalls()).run("answer = 'just a string'")
    assert rebound.final is None
    assert rebound.error is None


def test_repl_show_vars_lists_the_sessions_variables() -> None:
    repl = Repl("a context", FakeCalls())
    shown = repl.run("import re\nhits = [1, 2]\n_private = 1\nSHOW_VARS()")
    assert shown.stdout == "Variables: context (str, 9 chars), answer (dict, 2 items), hits (list, 2 items)\n"
    assert "llm_query" not in shown.stdout
    assert "re (" not in shown.stdout


def _windows(model: str | None) -> tuple[str, int] | None:
    alias = model or "sub"
    return (alias, 100) if alias == "sub" else None


def test_repl_refuses_a_prompt_over_the_window_before_sending_it() -> None:
    calls = FakeCalls()
    repl = Repl("", calls, windows=_windows)
    result = repl.run("llm_query('x' * 401)")
    assert result.error is not None
    assert result.error.type == "LLMQueryError"
    message = result.error.message
    assert "about 101 tokens (401 characters)" in message
    assert "'sub' (100 tokens)" in message
    assert "nothing was sent" in message
    assert "llm_query_batched" in message
    assert calls.prompts == []
    assert result.llm_calls == 0
    code = repl.run("try:\n    llm_query('x' * 401)\nexcept LLMQueryError as e:\n    print(e.code)")
    assert code.stdout == "too_large\n"
    assert repl.run("llm_query('x' * 400)").error is None  # exactly the window fits
    assert repl.run("llm_query('x' * 9000, model='big')").error is None  # a window not known: sent
    chat = repl.run("llm_query([{'role': 'user', 'content': 'y' * 500}])")
    assert chat.error is not None
    assert "about 125 tokens" in chat.error.message


def test_repl_batch_names_the_prompts_over_the_window_and_sends_none() -> None:
    calls = FakeCalls()
    repl = Repl("", calls, windows=_windows)
    result = repl.run("llm_query_batched(['ok', 'x' * 800, 'fine', 'y' * 1200])")
    assert result.error is not None
    message = result.error.message
    assert "2 of 4 prompts are over the context window of 'sub' (100 tokens)" in message
    assert "index 1 (about 200 tokens), 3 (about 300 tokens)" in message
    assert "none of the batch was sent" in message
    assert calls.prompts == []
    assert result.llm_calls == 0


def test_repl_caps_sub_calls_per_exec() -> None:
    calls = FakeCalls()
    repl = Repl("", calls, max_sub_calls=5)
    loop = repl.run("for i in range(10):\n    llm_query(str(i))")
    assert loop.error is not None
    assert loop.error.type == "LLMQueryError"
    assert "made 5 sub-calls" in loop.error.message
    assert "limit of 5 per block" in loop.error.message
    assert len(calls.prompts) == 5
    assert loop.llm_calls == 5
    caught = repl.run("try:\n    llm_query_batched(['a'] * 6)\nexcept LLMQueryError as e:\n    print(e.code)")
    assert caught.stdout == "budget_exceeded\n"
    assert len(calls.prompts) == 5
    assert repl.run("llm_query_batched(['a'] * 5)").error is None  # the count is per exec


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
    refusal = ErrorInfo(ErrorCode.BAD_REQUEST, "rlm_query is disabled at depth 0")
    repl = Repl("", FakeCalls(), rlm_error=refusal)
    result = repl.run("rlm_query('q')")
    assert result.error is not None
    assert result.error.type == "RLMQueryError"
    assert result.error.message == "rlm_query is disabled at depth 0"
    caught = repl.run("try:\n    rlm_query('q')\nexcept RLMQueryError as e:\n    print(e.code, e.retryable)")
    assert caught.stdout == "bad_request False\n"
    assert issubclass(RLMQueryError, RuntimeError)


def test_sub_call_errors_carry_code_and_retryable() -> None:
    info = ErrorInfo(ErrorCode.RATE_LIMITED, "slow down", True, 2.0)
    error = LLMQueryError("llm_query failed (rate_limited): slow down", info=info)
    assert (error.code, error.retryable, error.info, str(error)) == (
        "rate_limited",
        True,
        info,
        "llm_query failed (rate_limited): slow down",
    )
    plain = RLMQueryError("no child")  # raised without an ErrorInfo: a default code
    assert (plain.code, plain.retryable) == (ErrorCode.RLM_FAILED, False)
    assert LLMQueryError("x").code == ErrorCode.BACKEND_ERROR


def test_worker_hop_carries_errors_structurally() -> None:
    refusal = ErrorInfo(ErrorCode.BAD_REQUEST, "rlm_query is disabled at depth 1")
    assign = Assign("s-1", "r", 1, "sub", 1000, "text", refusal, None)
    assert decode_from_pool(pack(assign.to_wire()), 1) == assign
    capped = Assign("s-1", "r", 1, "sub", 1000, "text", None, None, max_sub_calls=7)
    assert decode_from_pool(pack(capped.to_wire()), 1) == capped
    with pytest.raises(DecodeError, match="max_sub_calls"):
        decode_from_pool(pack(capped.to_wire() | {"max_sub_calls": 0}), 1)
    answer = RlmAnswer("q1", False, error=ErrorInfo(ErrorCode.TIMEOUT, "child timed out", True))
    assert decode_from_pool(pack(answer.to_wire()), 0) == answer
    assert decode_from_pool(pack(RlmAnswer("q2", True, text="hi").to_wire()), 0) == RlmAnswer(
        "q2", True, "hi"
    )
    loaded = Loaded(False, error=ErrorInfo(ErrorCode.TOO_LARGE, "does not fit"))
    assert decode_from_worker(pack(loaded.to_wire()), 0, max_bytes=1 << 20) == loaded
    with pytest.raises(DecodeError):  # a failed answer without its error is malformed
        decode_from_pool(pack({"op": "rlm_result", "id": "q", "ok": False, "text": ""}), 0)


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
    assert PoolConfig().max_batch == 256  # over the 100 of bench/bench_sandbox.py: one wave there
    with pytest.raises(ConfigError, match=r"x\.toml: \[sandbox\] max_batch must be >= 1"):
        build_config({"max_batch": 0}, source="x.toml")


# ---------------------------------------------------------------- real pools


class Gathering(Backend):
    """Answers nothing until ``expected`` requests are in flight at once, then answers them all:
    calls made one after another could never finish (each would wait for the next)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.peak = 0
        self._in_flight = 0
        self._all_in = asyncio.Event()

    async def complete(self, request: BackendRequest) -> Completion:
        self.seen += 1
        self._in_flight += 1
        self.peak = max(self.peak, self._in_flight)
        if self._in_flight >= self.expected:
            self._all_in.set()
        try:
            # Bounded so that a serial caller fails the test clearly instead of hanging it.
            await asyncio.wait_for(self._all_in.wait(), 20)
        finally:
            self._in_flight -= 1
        text = request.messages[-1].content
        return Completion(text, "gathering", Usage(1, 1), "end_turn")


class Gate(Backend):
    """Says when a request arrived (the code has reached that line), answers once opened."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[str] = asyncio.Queue()
        self.opened = asyncio.Event()

    async def complete(self, request: BackendRequest) -> Completion:
        text = request.messages[-1].content
        self.arrived.put_nowait(text)
        await asyncio.wait_for(self.opened.wait(), 20)
        return Completion(text, "gate", Usage(1, 1), "end_turn")


@pytest.fixture
def gathering() -> Gathering:
    return Gathering(100)


@pytest.fixture
def gate() -> Gate:
    return Gate()


# The runs whose sessions make sub-calls: a handler serves only runs it holds (issue 14).
RUNS = ("r-llm", "r-batch", "r-window", "r-cap", "r-max", "r-other", "r-idle", "r-cli")


def open_runs(handler: Handler) -> None:
    for run in RUNS:
        handler.runs.open_run(run, RunLimits())


@pytest.fixture
async def handler(gathering: Gathering, gate: Gate) -> AsyncIterator[Handler]:
    models = {
        "sub": echo_model(),
        "slow": echo_model(latency_ms=300),
        "gathering": echo_model(max_concurrency=200),
        "gate": echo_model(),
    }
    async with running_handler(models, backends={"gathering": gathering, "gate": gate}) as h:
        open_runs(h)
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


async def test_dates_parse_in_a_session(client: AsyncSandboxClient) -> None:
    """strptime imports _strptime on first use, which a worker under a dropped uid may not be
    able to read by then (an interpreter under /root): it is pre-imported (found by rlmq eval)."""
    session = await client.open(run="r-dates", context="Date: Mar 04, 2024 || User: 7")
    code = "import datetime\nprint(datetime.datetime.strptime(context[6:18], '%b %d, %Y').date())"
    result = ok(await session.exec(code))
    assert result.stdout == "2024-03-04\n"
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
    # the error's code travelled as a field, not only inside the text
    code = (
        "try:\n    llm_query('x', model='nope')\nexcept LLMQueryError as e:\n    print(e.code, e.retryable)"
    )
    caught = ok(await session.exec(code))
    assert caught.stdout == "unknown_model False\n"
    await session.close()


async def test_100_batched_sub_calls_are_in_flight_at_once(
    client: AsyncSandboxClient, gathering: Gathering
) -> None:
    # The backend answers only once all 100 are in flight: sequential calls would never finish.
    # How long a batch takes against a slow model is bench/bench_sandbox.py's job.
    session = await client.open(run="r-batch", sub_model="gathering")
    result = ok(
        await session.exec("answers = llm_query_batched([f'p{i}' for i in range(100)])\nlen(answers)")
    )
    assert result.stdout == "100\n"
    assert (gathering.seen, gathering.peak) == (100, 100)
    assert result.llm_calls == 100
    in_order = ok(await session.exec("answers == [f'p{i}' for i in range(100)]"))
    assert in_order.stdout == "True\n"
    await session.close()


class Waves(Backend):
    """Holds calls until a whole wave is in (``size`` of them, or all that are left of ``total``),
    then answers that wave; ``peak`` is the most calls it ever held at once."""

    def __init__(self, size: int, total: int) -> None:
        self.size, self.left = size, total
        self.in_flight = self.peak = self.waves = 0
        self._held = 0
        self._gate = asyncio.Event()

    async def complete(self, request: BackendRequest) -> Completion:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        gate = self._gate
        self._held += 1
        if self._held >= min(self.size, self.left):
            self.left -= self._held
            self._held = 0
            self.waves += 1
            self._gate = asyncio.Event()
            gate.set()
        try:
            # Bounded so that a caller that never completes a wave fails the test instead of hanging it.
            await asyncio.wait_for(gate.wait(), 20)
        finally:
            self.in_flight -= 1
        return Completion(request.messages[-1].content, "waves", Usage(1, 1), "end_turn")


async def test_a_batch_past_max_batch_goes_in_waves(actx: zmq.asyncio.Context) -> None:
    # 20 prompts, at most 8 in flight: waves of 8, 8 and 4, each sent once the one before is
    # answered. The relay refuses a 9th call in flight, so a batch sent at once would fail.
    waves = Waves(size=8, total=20)
    models = {"sub": echo_model(), "waves": echo_model()}
    async with running_handler(models, backends={"waves": waves}) as handler:
        handler.runs.open_run("r-waves", RunLimits())
        handler.runs.open_run("r-waves-budget", RunLimits(max_calls=10))
        async with (
            running_pool(handler.address or "", workers=1, max_batch=8) as pool,
            AsyncSandboxClient(pool.address or "", context=actx) as client,
        ):
            session = await client.open(run="r-waves", sub_model="waves")
            code = "prompts = [f'p{i}' for i in range(20)]\nllm_query_batched(prompts) == prompts"
            result = ok(await session.exec(code))
            assert (result.stdout, result.llm_calls) == ("True\n", 20)
            assert (waves.waves, waves.peak) == (3, 8)
            assert pool.snapshot()["sub_calls"]["refused"] == 0
            await session.close()
            # A wave with a failure ends the batch: its answers would be lost with the error anyway.
            capped = await client.open(run="r-waves-budget")
            failed = await capped.exec("llm_query_batched([f'p{i}' for i in range(20)])")
            assert failed.error is not None
            assert (
                "6 of 20 prompts failed (indexes 10, 11, 12, 13, 14, 15); the last 4 prompts were not sent"
                in failed.error.message
            )
            assert handler.runs.get("r-waves-budget").calls == 10
            await capped.close()


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


@pytest.mark.parametrize(
    ("backend", "bind"),
    [("anthropic", "tcp"), ("openai", "tcp"), ("openai", "ipc")],
)
async def test_an_oversized_prompt_never_leaves_the_worker(
    backend: str, bind: str, actx: zmq.asyncio.Context
) -> None:
    """The worker knows the sub-model's window (from the handler's ping: at start over ipc, on
    the first sub-call over tcp) and refuses before any request is sent: the provider sees
    nothing, and the handler no ``complete``."""
    async with FakeProvider(FakeProviderConfig(api_key="sk-test")) as fp:
        base = fp.base_url + ("/v1" if backend == "openai" else "")
        sub = {
            "backend": backend,
            "model": "m",
            "base_url": base,
            "api_key_env": "K",
            "context_window_tokens": 50,
        }
        address = ipc_address() if bind == "ipc" else "tcp://127.0.0.1:0"
        async with (
            running_handler({"sub": sub}, bind=address, env={"K": "sk-test"}) as h,
            running_pool(h.address or "", workers=1) as pool,
            AsyncSandboxClient(pool.address, context=actx) as client,
        ):
            open_runs(h)
            session = await client.open(run="r-window", context="z" * 1000)
            one = await session.exec("llm_query(context)")
            assert one.error is not None
            assert one.error.type == "LLMQueryError"
            assert "about 250 tokens" in one.error.message
            assert "'sub' (50 tokens)" in one.error.message
            many = await session.exec("llm_query_batched(['short', context, 'also short'])")
            assert many.error is not None
            assert "1 of 3 prompts" in many.error.message
            assert "index 1 (about 250 tokens)" in many.error.message
            assert (one.llm_calls, many.llm_calls) == (0, 0)
            assert "complete" not in h.stats.by_op
            fits = await session.exec("print(llm_query(context[:200]))")
            assert fits.error is None
            assert fits.stdout == "z" * 200 + "\n"
            await session.close()
        assert len(fp.requests) == 1  # only the prompt that fits


async def test_a_runaway_loop_of_sub_calls_stops_at_the_per_exec_cap(
    handler: Handler, actx: zmq.asyncio.Context
) -> None:
    async with (
        running_pool(handler.address or "", workers=1, max_sub_calls_per_exec=3) as pool,
        AsyncSandboxClient(pool.address, context=actx) as client,
    ):
        session = await client.open(run="r-cap", context="a\nb\nc\nd\ne")
        result = await session.exec(
            "out = []\nfor line in context.splitlines():\n    out.append(llm_query(line))"
        )
        assert result.error is not None
        assert result.error.type == "LLMQueryError"
        assert "limit of 3 per block (max_sub_calls_per_exec)" in result.error.message
        assert result.llm_calls == 3
        again = await session.exec("print(len(out), llm_query('next exec'))")
        assert again.stdout == "3 next exec\n"  # the count starts again with each exec
        await session.close()


async def test_40mb_context_is_loaded_whole(client: AsyncSandboxClient) -> None:
    # How fast it opens is measured by bench/bench_sandbox.py, not asserted here.
    text = ("0123456789 abcdefghi\n" * 2_000_000)[:40_000_000]
    session = await client.open(run="r-big", context=text)
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
        if prompt == "late":
            raise TransportTimeout("the child's model did not answer")
        # answered on a later turn of the event loop, while the code waits
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(answer.set_result, f"child says {prompt}")
        return await answer

    session = await client.open(run="r-rlm", max_depth=2, on_rlm_query=child_run)
    result = ok(
        await session.exec("a = rlm_query('sum it', context=['d1', 'd2'])\nb = rlm_query('plain')\na, b")
    )
    assert result.stdout == "('child says sum it', 'child says plain')\n"
    assert seen == [("sum it", ["d1", "d2"]), ("plain", None)]
    failed = await session.exec("rlm_query('boom')")
    assert failed.error is not None
    assert failed.error.type == "RLMQueryError"
    assert failed.error.message == "rlm_query failed: (rlm_failed) RuntimeError: child run failed"
    # code and retryable reach the model's code as they left the orchestrator
    caught = ok(
        await session.exec(
            "try:\n    rlm_query('late')\nexcept RLMQueryError as e:\n    print(e.code, e.retryable, e)"
        )
    )
    assert caught.stdout == "timeout True rlm_query failed: (timeout) the child's model did not answer\n"
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
    assert closed.value.code == ErrorCode.UNKNOWN_SESSION
    await pool.wait_cleaned()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone, never handed to another session
    fresh = await client.open(run="r-close")
    assert fresh.info.worker_pid != pid
    await fresh.close()


async def test_busy_session_and_max_sessions(handler: Handler, gate: Gate, actx: zmq.asyncio.Context) -> None:
    async with (
        running_pool(handler.address or "", workers=1, max_sessions=1) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run="r-max")
        with pytest.raises(SandboxError) as full:
            await client.open(run="r-max")
        assert full.value.code == ErrorCode.OVERLOADED
        assert full.value.retryable
        running = asyncio.ensure_future(session.exec("llm_query('x', model='gate')"))
        assert await asyncio.wait_for(gate.arrived.get(), 10) == "x"  # the first exec is running
        with pytest.raises(SandboxError) as busy:
            await session.exec("1")
        assert busy.value.code == ErrorCode.SESSION_BUSY
        gate.opened.set()
        ok(await running)
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
        # Unnoticed, the exec would end at its 120 s timeout with code "timeout", not this:
        result = await session.exec("x")
        assert result.error is not None
        assert result.error.code == "worker_died"
        assert "silent" in result.error.message
        assert result.state_lost
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
        open_runs(other)
        session = await client.open(run="r-other", handler=other.address)
        assert ok(await session.exec("llm_query('over there')")).stdout == "'over there'\n"
        async with AsyncHandlerClient(other.address or "") as hc:
            assert (await hc.usage("r-other")).calls == 1
        async with AsyncHandlerClient(handler.address or "") as hc:
            assert (await hc.usage("r-other")).calls == 0  # the pool's own handler saw no call of it
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
        assert failed.value.code == ErrorCode.POOL_EXHAUSTED
        assert failed.value.retryable
        assert "exited with status 1 before it was ready" in failed.value.message


async def test_idle_sessions_expire(handler: Handler, gate: Gate, actx: zmq.asyncio.Context) -> None:
    async with (
        running_pool(handler.address or "", workers=1, idle_timeout_s=60.0) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        idle = await client.open(run="r-idle")
        working = await client.open(run="r-idle")
        running = asyncio.ensure_future(working.exec("llm_query('w', model='gate')"))
        assert await asyncio.wait_for(gate.arrived.get(), 10) == "w"
        now = pool.sessions.clock()
        # The housekeeping tick's check, run at chosen times instead of waiting for them.
        assert pool.sessions.expire_idle(now + 30.0) == 0
        assert pool.sessions.expire_idle(now + 61.0) == 1  # the session running code is not idle
        with pytest.raises(SandboxError) as expired:
            await idle.exec("1")
        assert expired.value.code == ErrorCode.UNKNOWN_SESSION
        assert pool.snapshot()["counters"]["sessions_expired"] == 1
        gate.opened.set()
        ok(await running)
        await working.close()


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
        "from rlmq.sandbox import cli\n"
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

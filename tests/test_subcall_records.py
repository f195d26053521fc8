"""Sub-call records and replay (issue 15), against a real pool with real workers and a real handler
(echo backend): what the pool's relay records of each sub-call, how the records reach the exec's
caller, and how an exec's sub-calls are answered from a recording."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import zmq
import zmq.asyncio

from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import AsyncHandlerClient, DecodeError, ErrorCode, RunLimits, Usage, pack, unpack
from rlmq.protocol.errors import ErrorInfo
from rlmq.protocol.messages import CompleteReply, PongReply
from rlmq.protocol.sandbox import (
    AsyncSandboxClient,
    ExecReply,
    ExecRequest,
    ExecResult,
    OpenReply,
    Replay,
    Session,
    SessionInfo,
    SubCall,
    SubCallsNotice,
    decode_sandbox_request,
    prompt_sha256,
)
from rlmq.protocol.sandbox import client as sandbox_client
from rlmq.sandbox.pool import Pool
from rlmq.sandbox.recording import ExecRecording, cut_prompt
from rlmq.sandbox.testing import running_pool

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Services:
    handler: Handler
    pool: Pool
    client: AsyncSandboxClient
    handler_client: AsyncHandlerClient

    async def open(self, run: str, **options: Any) -> Session:
        """A session of ``run``, opened at the handler first (sub-calls need an open run)."""
        await self.handler_client.run_open(run, RunLimits())
        return await self.client.open(run=run, context="ctx", **options)

    def requests(self, model: str = "sub") -> int:
        """Complete requests the handler took for ``model`` (answered from its cache or not)."""
        return self.handler.models[model].stats.requests


@asynccontextmanager
async def services(actx: zmq.asyncio.Context, **models: dict[str, Any]) -> AsyncIterator[Services]:
    async with (
        running_handler(models or {"sub": echo_model()}) as handler,
        running_pool(handler.address or "", workers=1) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
        AsyncHandlerClient(handler.address or "", context=actx) as handler_client,
    ):
        yield Services(handler, pool, client, handler_client)


@pytest.fixture
async def svc(actx: zmq.asyncio.Context) -> AsyncIterator[Services]:
    async with services(actx, sub=echo_model(cache_entries=64), other=echo_model()) as s:
        yield s


def ok(result: ExecResult) -> ExecResult:
    assert result.error is None, result.error
    return result


class Records(list[SubCall]):
    """An ``on_sub_call`` that keeps what it gets."""

    def __call__(self, record: SubCall) -> None:
        self.append(record)


# ---------------------------------------------------------------- unit: the messages


def _record(seq: int = 0, **changes: Any) -> SubCall:
    fields: dict[str, Any] = {
        "seq": seq,
        "model": "sub",
        "depth": 1,
        "prompt": "p",
        "prompt_tail": None,
        "prompt_chars": 1,
        "prompt_sha256": prompt_sha256([("user", "p")]),
        "text": "p",
        "usage": Usage(3, 4),
        "cost_usd": 0.25,
        "cached": False,
        "error": None,
        "started_ms": 1.5,
        "latency_ms": 2.0,
    }
    return SubCall(**(fields | changes))


def test_subcall_wire_round_trip() -> None:
    records = [
        _record(),
        _record(
            1, text=None, error=ErrorInfo("unknown_model", "no such model"), replayed=True, diverged=True
        ),
        _record(2, prompt="ab", prompt_tail="yz", prompt_chars=1000),
    ]
    for record in records:
        assert SubCall.from_wire(record.to_wire()) == record
    notice = SubCallsNotice("x1", "s-1", records)
    wire = unpack(pack(notice.to_wire()))
    assert wire["op"] == "sub_calls"
    assert SubCallsNotice.from_wire(wire) == SubCallsNotice("x1", "s-1", tuple(records))


@pytest.mark.parametrize(
    "change",
    [
        {"seq": -1},
        {"seq": True},
        {"prompt_sha256": "abc"},
        {"prompt_sha256": "G" * 64},
        {"cached": "yes"},
        {"usage": None},
        {"latency_ms": -1.0},
        {"text": None, "error": None},
        {"error": "boom"},
    ],
)
def test_subcall_decoding_is_strict(change: dict[str, Any]) -> None:
    wire = _record().to_wire() | change
    with pytest.raises(DecodeError):
        SubCall.from_wire(wire, "r1")


def test_exec_request_optional_fields() -> None:
    plain = ExecRequest("r1", "s-1", "1")
    assert set(plain.to_wire()) == {"v", "op", "id", "session", "code"}  # absent = today's exec
    full = ExecRequest(
        "r2", "s-1", "1", record_chars=100, replay=Replay((_record(),), live=True), trace=TRACE
    )
    assert decode_sandbox_request(pack(full.to_wire()), 0) == full
    bads: list[dict[str, Any]] = [
        {"record_chars": -1},
        {"replay": {"calls": []}},
        {"replay": []},
        {"trace": ""},
    ]
    for bad in bads:
        with pytest.raises(DecodeError):
            decode_sandbox_request(pack(plain.to_wire() | bad), 0)


def test_cut_prompt_keeps_head_and_tail() -> None:
    assert cut_prompt("short", 10) == ("short", None)
    assert cut_prompt("x" * 50, None) == ("x" * 50, None)
    assert cut_prompt("HEAD" + "-" * 20 + "TAIL", 8) == ("HEAD", "TAIL")


def test_records_leave_in_seq_order_once() -> None:
    """A record waits for every lower seq; finish() gives the rest, unanswered calls as timeouts;
    a second reply to a request (a re-send) is ignored; one wakeup per batch."""
    wakes: list[int] = []
    rec = ExecRecording(depth=1, record_chars=100, wake=lambda: wakes.append(1))
    for i in range(3):
        assert (
            rec.request(f"r{i}", {"model": "sub", "messages": [{"role": "user", "content": f"p{i}"}]}) is None
        )

    def reply(rid: str, text: str) -> bytes:
        return pack(CompleteReply(rid, text, "sub", Usage(1, 1)).to_wire())

    rec.reply(reply("r1", "a1"))
    assert rec.drain() == []
    assert wakes == []
    rec.reply(reply("r0", "a0"))
    rec.reply(reply("r0", "again"))  # first reply wins
    assert wakes == [1]
    assert [(r.seq, r.text) for r in rec.drain()] == [(0, "a0"), (1, "a1")]
    rest = rec.finish()
    assert [(r.seq, r.error and r.error.code) for r in rest] == [(2, "timeout")]
    rec.reply(reply("r2", "late"))
    assert rec.drain() == []


# ---------------------------------------------------------------- records from a real pool


async def test_batch_records_arrive_in_full_and_in_order_before_the_exec_returns(svc: Services) -> None:
    session = await svc.open("rec-batch")
    records = Records()
    n = 40
    code = f"answers = llm_query_batched([f'prompt {{i}}' for i in range({n})])\none = llm_query('single')\n"
    result = ok(await session.exec(code, on_sub_call=records, record_chars=2000))
    assert result.llm_calls == n + 1
    # Everything arrived before exec returned, each once, in order of issue.
    assert [r.seq for r in records] == list(range(n + 1))
    assert [r.prompt for r in records] == [f"prompt {i}" for i in range(n)] + ["single"]
    for r in records:
        assert r.text == r.prompt  # echo
        assert r.error is None
        assert not r.replayed
        assert not r.diverged
        assert r.model == "sub"
        assert r.depth == 1
        assert r.prompt_tail is None
        assert r.prompt_chars == len(r.prompt)
        assert r.prompt_sha256 == prompt_sha256([("user", r.prompt)])
        assert r.usage.input_tokens > 0
        assert r.usage.output_tokens > 0
        assert r.started_ms >= 0
        assert r.latency_ms >= 0
        assert not r.cached
    # The single call was issued after the whole batch was answered.
    assert records[-1].started_ms >= max(r.started_ms for r in records[:-1])
    await session.close()


async def test_cached_flag_error_codes_and_cut_prompts(svc: Services) -> None:
    session = await svc.open("rec-kinds")
    records = Records()
    long_prompt = "H" * 10 + "m" * 100 + "T" * 10
    code = (
        "llm_query('same')\n"
        "llm_query('same')\n"
        "try:\n"
        "    llm_query('who?', model='no-such-model')\n"
        "except LLMQueryError as exc:\n"
        "    print(exc.code)\n"
        f"long = llm_query({long_prompt!r}, model='other')\n"
    )
    result = ok(await session.exec(code, on_sub_call=records, record_chars=20))
    assert result.stdout == "unknown_model\n"
    first, second, failed, cut = records
    assert (first.cached, second.cached) == (False, True)
    assert failed.text is None
    assert failed.error is not None
    assert failed.error.code == ErrorCode.UNKNOWN_MODEL
    assert failed.model == "no-such-model"
    assert (cut.prompt, cut.prompt_tail, cut.prompt_chars) == ("H" * 10, "T" * 10, len(long_prompt))
    assert cut.text == long_prompt  # the answer is never cut
    assert cut.prompt_sha256 == prompt_sha256([("user", long_prompt)])
    await session.close()


async def test_no_notices_without_record_chars(svc: Services) -> None:
    session = await svc.open("rec-none")
    records = Records()
    ok(await session.exec("llm_query_batched(['a', 'b'])", on_sub_call=records))
    assert records == []
    assert "sub_calls_recorded" not in (await svc.client.stats())["counters"]
    await session.close()


async def test_model_code_cannot_forge_records(svc: Services) -> None:
    """A record is what the relay saw: the code can write neither a notice to the pool (an op
    workers do not have) nor a record's answer (the handler's reply is recorded)."""
    session = await svc.open("rec-forge")
    records = Records()
    fake = _record(7, text="FORGED").to_wire()
    code = (
        "link = llm_query.__self__.calls.link\n"
        f"link.send({{'op': 'sub_calls', 'id': 'x', 'session': 's', 'records': [{fake!r}]}})\n"
        "print(llm_query('real'))\n"
    )
    result = ok(await session.exec(code, on_sub_call=records, record_chars=100))
    assert result.stdout == "real\n"
    assert [(r.seq, r.prompt, r.text) for r in records] == [(0, "real", "real")]
    await session.close()


# ---------------------------------------------------------------- replay


BATCH_CODE = "answers = llm_query_batched(['a', 'b', 'c'])\nprint(answers, llm_query('d'))\n"


async def _recorded(svc: Services, code: str, run: str) -> tuple[ExecResult, list[SubCall]]:
    session = await svc.open(run)
    records = Records()
    result = await session.exec(code, on_sub_call=records, record_chars=1000)
    await session.close()
    return result, list(records)


async def test_replay_answers_every_call_from_the_recording(svc: Services) -> None:
    first, recorded = await _recorded(svc, BATCH_CODE, "rep-1")
    before = svc.requests()
    session = await svc.open("rep-1b")
    records = Records()
    result = ok(
        await session.exec(
            BATCH_CODE, on_sub_call=records, record_chars=1000, replay=Replay(recorded, live=False)
        )
    )
    assert result.stdout == first.stdout == "['a', 'b', 'c'] d\n"
    assert svc.requests() == before  # not one call reached the handler
    assert all(r.replayed and not r.diverged for r in records)
    assert [(r.seq, r.text, r.usage) for r in records] == [(r.seq, r.text, r.usage) for r in recorded]
    assert (await svc.client.stats())["counters"]["sub_calls_replayed"] == len(recorded)
    await session.close()


async def test_replay_divergence_without_live_is_not_recorded(svc: Services) -> None:
    _, recorded = await _recorded(svc, BATCH_CODE, "rep-2")
    before = svc.requests()
    session = await svc.open("rep-2b")
    records = Records()
    changed = (
        "try:\n"
        "    llm_query_batched(['a', 'CHANGED', 'c'])\n"
        "except LLMQueryError as exc:\n"
        "    print(exc.code)\n"
        "try:\n"
        "    llm_query('d')\n"  # seq 3 matches again
        "    llm_query('past the end')\n"
        "except LLMQueryError as exc:\n"
        "    print(exc.code)\n"
    )
    result = ok(
        await session.exec(
            changed, on_sub_call=records, record_chars=1000, replay=Replay(recorded, live=False)
        )
    )
    assert result.stdout == "not_recorded\nnot_recorded\n"
    assert svc.requests() == before
    assert [(r.seq, r.replayed, r.diverged) for r in records] == [
        (0, True, False),
        (1, False, True),
        (2, True, False),
        (3, True, False),
        (4, False, True),
    ]
    for r in (records[1], records[4]):
        assert r.error is not None
        assert r.error.code == ErrorCode.NOT_RECORDED
        assert not r.error.retryable
    await session.close()


async def test_replay_live_sends_unmatched_calls_to_the_handler(svc: Services) -> None:
    _, recorded = await _recorded(svc, BATCH_CODE, "rep-3")
    before = svc.requests()
    session = await svc.open("rep-3b")
    records = Records()
    code = BATCH_CODE + "print(llm_query('e'), llm_query('f'))\n"
    result = ok(
        await session.exec(
            code, on_sub_call=records, record_chars=1000, replay=Replay(recorded[:3], live=True)
        )
    )
    assert result.stdout == "['a', 'b', 'c'] d\ne f\n"
    assert svc.requests() == before + 3  # d, e and f went live
    # Past the end of the recording is not a divergence: the block simply goes on live.
    assert [(r.replayed, r.diverged, r.text) for r in records] == [
        (True, False, "a"),
        (True, False, "b"),
        (True, False, "c"),
        (False, False, "d"),
        (False, False, "e"),
        (False, False, "f"),
    ]
    await session.close()


async def test_replay_live_sends_a_changed_call_and_marks_it_diverged(svc: Services) -> None:
    _, recorded = await _recorded(svc, BATCH_CODE, "rep-3c")
    before = svc.requests()
    session = await svc.open("rep-3d")
    records = Records()
    code = BATCH_CODE.replace("'b'", "'B'")
    result = ok(
        await session.exec(code, on_sub_call=records, record_chars=1000, replay=Replay(recorded, live=True))
    )
    assert result.stdout == "['a', 'B', 'c'] d\n"
    assert svc.requests() == before + 1  # only the changed call was sent (and paid)
    assert [(r.replayed, r.diverged, r.text) for r in records] == [
        (True, False, "a"),
        (False, True, "B"),
        (True, False, "c"),
        (True, False, "d"),
    ]
    assert records[1].error is None
    await session.close()


async def test_replay_gives_recorded_errors_back(svc: Services) -> None:
    code = "try:\n    llm_query('x', model='gone')\nexcept LLMQueryError as exc:\n    print(exc.code)\n"
    first, recorded = await _recorded(svc, code, "rep-4")
    assert recorded[0].error is not None
    session = await svc.open("rep-4b")
    records = Records()
    result = ok(await session.exec(code, on_sub_call=records, record_chars=1000, replay=Replay(recorded)))
    assert result.stdout == first.stdout == "unknown_model\n"
    assert records[0].replayed
    assert records[0].error == recorded[0].error
    await session.close()


async def test_replay_without_records_still_answers(svc: Services) -> None:
    _, recorded = await _recorded(svc, BATCH_CODE, "rep-5")
    before = svc.requests()
    session = await svc.open("rep-5b")
    records = Records()
    result = ok(await session.exec(BATCH_CODE, on_sub_call=records, replay=Replay(recorded)))
    assert result.stdout == "['a', 'b', 'c'] d\n"
    assert svc.requests() == before
    assert records == []
    await session.close()


# ---------------------------------------------------------------- trace


class FakeHandler:
    """A ROUTER standing in for the handler: echoes completes and keeps every request it got."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.bind("tcp://127.0.0.1:0")
        self.address = str(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.requests: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            obj = unpack(frames[-1])
            if obj.get("op") == "ping":
                reply = PongReply(obj["id"]).to_wire()
            else:
                self.requests.append(obj)
                reply = CompleteReply(
                    obj["id"], obj["messages"][-1]["content"], "fake", Usage(1, 1)
                ).to_wire()
            await self.sock.send_multipart([*frames[:-1], pack(reply)])

    async def __aenter__(self) -> FakeHandler:
        self._task = asyncio.get_running_loop().create_task(self.serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task
        self.sock.close(linger=0)


async def test_trace_is_put_on_every_forwarded_complete(
    svc: Services, actx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sends the current traceparent with the exec; the relay puts it on each of the
    exec's completes, and none when the exec has none."""
    async with FakeHandler(actx) as upstream:
        session = await svc.open("trace", handler=upstream.address)
        monkeypatch.setattr(sandbox_client, "current_traceparent", lambda: TRACE)
        ok(await session.exec("llm_query_batched(['a', 'b'])\nllm_query('c')"))
        monkeypatch.setattr(sandbox_client, "current_traceparent", lambda: None)
        ok(await session.exec("llm_query('untraced')"))
        await session.close()
    assert [(r["messages"][-1]["content"], r.get("trace")) for r in upstream.requests] == [
        ("a", TRACE),
        ("b", TRACE),
        ("c", TRACE),
        ("untraced", None),
    ]
    assert all(r["run"] == "trace" for r in upstream.requests)


# ---------------------------------------------------------------- records lost on the way


class FakePool:
    """A ROUTER standing in for the pool: answers an open, then each exec with the notices it is
    given before the reply, as the pool does."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.bind("tcp://127.0.0.1:0")
        self.address = str(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))

    async def answer(self, notices: Sequence[dict[str, Any]] = ()) -> None:
        """Serve one request: an open, or an exec preceded by ``notices`` (their id filled in)."""
        frames = await self.sock.recv_multipart()
        identity, obj = frames[0], unpack(frames[2])  # [identity, delimiter, header, blobs...]
        if obj["op"] == "open":
            reply = OpenReply(obj["id"], "s1", SessionInfo(4242, "str", 3, 3, 0.1), 5.0, 1000).to_wire()
        else:
            assert obj["op"] == "exec"
            for notice in notices:
                body = {"v": 1, "op": "sub_calls", "id": obj["id"], "session": "s1", **notice}
                await self.sock.send_multipart([identity, b"", pack(body)])
            result = ExecResult("", "", None, None, None, 1.0, 0, 3, False)
            reply = ExecReply(obj["id"], "s1", result).to_wire()
        await self.sock.send_multipart([identity, b"", pack(reply)])

    def close(self) -> None:
        self.sock.close(linger=0)


async def test_a_malformed_notice_is_counted_per_exec_not_silently_dropped(actx: zmq.asyncio.Context) -> None:
    """A notice that does not decode: its readable records still arrive, the rest are counted in
    ``Session.records_dropped`` for the caller to write into exec_end (docs/trajectory.md)."""
    pool = FakePool(actx)
    try:
        async with AsyncSandboxClient(pool.address, context=actx, timeout_s=10) as client:
            served = asyncio.get_running_loop().create_task(pool.answer())
            session = await client.open(run="lossy", context="abc")
            await served
            assert session.records_dropped == 0
            good = [_record(0).to_wire(), _record(2).to_wire()]
            bad_record = {"records": [good[0], {"seq": "not a number"}]}  # one readable, one not
            no_list = {"records": "garbage"}  # nothing readable: counts as one lost
            notices: list[dict[str, Any]] = [bad_record, no_list, {"records": [good[1]]}]
            got = Records()
            served = asyncio.get_running_loop().create_task(pool.answer(notices))
            await session.exec("x", record_chars=100, on_sub_call=got)
            await served
            assert [r.seq for r in got] == [0, 2]
            assert session.records_dropped == 2

            # A failing on_sub_call loses its record too; the count is per exec.
            def failing(record: SubCall) -> None:
                raise RuntimeError("the caller's bug")

            served = asyncio.get_running_loop().create_task(pool.answer([{"records": [good[0]]}]))
            await session.exec("y", record_chars=100, on_sub_call=failing)
            await served
            assert session.records_dropped == 1
            served = asyncio.get_running_loop().create_task(pool.answer([{"records": good}]))
            await session.exec("z", record_chars=100, on_sub_call=Records())
            await served
            assert session.records_dropped == 0
            assert client._records_dropped == {}  # nothing kept past its exec
            session.closed = True  # the fake pool answers no close
    finally:
        pool.close()

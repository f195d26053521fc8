from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from rlmq.protocol import (
    PROTOCOL_VERSION,
    ChatMessage,
    CompleteReply,
    CompleteRequest,
    DecodeError,
    ErrorCode,
    ErrorReply,
    MessageTooLarge,
    PingRequest,
    PongReply,
    RemoteError,
    RunCloseRequest,
    RunLimits,
    RunOpenRequest,
    RunUsage,
    RunUsageReply,
    StatsRequest,
    UnknownOp,
    UnsupportedVersion,
    Usage,
    UsageRequest,
    decode_reply,
    decode_request,
    encode,
    pack,
    peek_id,
    unpack,
)
from rlmq.protocol import messages as messages_module
from rlmq.protocol.codec import LARGE_REPLY_CHARS, encode_complete_reply

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "message",
    [
        CompleteRequest(
            "a1",
            "root",
            (ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
            max_tokens=10,
            temperature=0.5,
            timeout_s=3.0,
            run="r",
            depth=2,
        ),
        CompleteRequest("a2", "sub", (ChatMessage("user", "x"),)),
        PingRequest("p"),
        StatsRequest("s"),
        RunOpenRequest("o", "run-1", RunLimits(max_calls=3, max_cost_usd=1.5, deadline_s=60)),
        RunCloseRequest("c", "run-1"),
        UsageRequest("u", "run-1"),
    ],
)
def test_requests_round_trip(message: object) -> None:
    assert decode_request(encode(message)) == message  # type: ignore[arg-type]


def test_prompt_is_one_user_message() -> None:
    req = decode_request(pack({"v": 1, "op": "complete", "id": "x", "model": "m", "prompt": "hello"}))
    assert isinstance(req, CompleteRequest)
    assert req.messages == (ChatMessage("user", "hello"),)


def test_replies_round_trip() -> None:
    reply = CompleteReply("a", "text", "m", Usage(10, 2, 3, 4), cached=True, retries=1, latency_ms=5.0)
    assert decode_reply(unpack(encode(reply)), "complete") == reply
    err = ErrorReply("a", ErrorCode.RATE_LIMITED, "slow down", retryable=True, retry_after_s=2.0)
    assert decode_reply(unpack(encode(err)), "complete") == err
    usage = RunUsage(
        "r",
        3,
        1,
        0,
        Usage(5, 6),
        0.25,
        1.0,
        RunLimits(max_calls=4),
        closed=True,
        exceeded="max_calls",
    )
    assert decode_reply(unpack(encode(RunUsageReply("u", usage))), "usage") == RunUsageReply("u", usage)


def test_error_wire_shape_is_code_message_retryable() -> None:
    wire = msgpack.unpackb(encode(ErrorReply("a", ErrorCode.TIMEOUT, "late", retryable=True)))
    assert wire == {
        "v": 1,
        "id": "a",
        "ok": False,
        "error": {"code": "timeout", "message": "late", "retryable": True},
    }


@pytest.mark.parametrize(
    ("payload", "error", "rid"),
    [
        (os.urandom(64), DecodeError, None),
        (b"\xc1", DecodeError, None),  # a byte msgpack never uses
        (pack({"v": 1}), DecodeError, None),  # no id
        (msgpack.packb([1, 2, 3]), DecodeError, None),
        (msgpack.packb({"v": 1, "id": 7, "op": "ping"}), DecodeError, None),
        (pack({"id": "a", "op": "ping"}), DecodeError, "a"),
        (pack({"v": "1", "id": "a", "op": "ping"}), DecodeError, "a"),
        (pack({"v": 99, "id": "a", "op": "ping"}), UnsupportedVersion, "a"),
        (pack({"v": 1, "id": "a", "op": "teleport"}), UnknownOp, "a"),
        (pack({"v": 1, "id": "a"}), DecodeError, "a"),
        (
            pack(
                {
                    "v": 1,
                    "id": "a",
                    "op": "complete",
                    "messages": [{"role": "user", "content": "x"}],
                }
            ),
            DecodeError,
            "a",
        ),
        (pack({"v": 1, "id": "a", "op": "complete", "model": "m"}), DecodeError, "a"),
        (
            pack({"v": 1, "id": "a", "op": "complete", "model": "m", "messages": []}),
            DecodeError,
            "a",
        ),
        (
            pack({"v": 1, "id": "a", "op": "complete", "model": "m", "messages": "hi"}),
            DecodeError,
            "a",
        ),
        (
            pack(
                {
                    "v": 1,
                    "id": "a",
                    "op": "complete",
                    "model": "m",
                    "messages": [{"role": "god", "content": "x"}],
                }
            ),
            DecodeError,
            "a",
        ),
        (
            pack(
                {
                    "v": 1,
                    "id": "a",
                    "op": "complete",
                    "model": "m",
                    "messages": [{"role": "user", "content": 5}],
                }
            ),
            DecodeError,
            "a",
        ),
        (
            pack(
                {
                    "v": 1,
                    "id": "a",
                    "op": "complete",
                    "model": "m",
                    "prompt": "x",
                    "max_tokens": "9",
                }
            ),
            DecodeError,
            "a",
        ),
        (
            pack(
                {
                    "v": 1,
                    "id": "a",
                    "op": "complete",
                    "model": "m",
                    "prompt": "x",
                    "max_tokens": True,
                }
            ),
            DecodeError,
            "a",
        ),
        (
            pack({"v": 1, "id": "a", "op": "complete", "model": "m", "prompt": "x", "max_tokens": 0}),
            DecodeError,
            "a",
        ),
        (
            pack(
                {
                    "v": 1,
                    "id": "a",
                    "op": "complete",
                    "model": "m",
                    "prompt": "x",
                    "temperature": -1,
                }
            ),
            DecodeError,
            "a",
        ),
        (pack({"v": 1, "id": "a", "op": "run_open"}), DecodeError, "a"),
        (
            pack({"v": 1, "id": "a", "op": "run_open", "run": "r", "limits": {"max_calls": "3"}}),
            DecodeError,
            "a",
        ),
        (
            pack({"v": 1, "id": "a", "op": "run_open", "run": "r", "limits": {"max_money": 3}}),
            DecodeError,
            "a",
        ),
    ],
)
def test_bad_payloads_raise_typed_errors(payload: bytes, error: type[Exception], rid: str | None) -> None:
    with pytest.raises(error) as info:
        decode_request(payload)
    assert getattr(info.value, "request_id", None) == rid
    assert info.value.code in ErrorCode  # type: ignore[attr-defined]


def test_too_large_keeps_the_id_without_decoding_the_body() -> None:
    payload = pack({"v": 1, "op": "complete", "model": "m", "prompt": "x" * 5000, "id": "big-1"})
    with pytest.raises(MessageTooLarge) as info:
        decode_request(payload, max_bytes=1000)
    assert info.value.request_id == "big-1"
    assert info.value.code == ErrorCode.TOO_LARGE
    assert peek_id(b"garbage") is None


def test_remote_error_keeps_unknown_codes() -> None:
    err = RemoteError("quota_gone", "new code from a newer server", retryable=True)
    assert err.code == ErrorCode.INTERNAL
    assert err.raw_code == "quota_gone"
    assert err.retryable


def test_spec_version_matches_code() -> None:
    spec = (ROOT / "docs" / "protocol.md").read_text()
    match = re.search(r"^Protocol version: (\d+)$", spec, re.MULTILINE)
    assert match, "docs/protocol.md must state 'Protocol version: N' on a line of its own"
    assert int(match.group(1)) == PROTOCOL_VERSION


def test_spec_lists_every_error_code_and_op() -> None:
    from rlmq.protocol.messages import REQUEST_TYPES

    spec = (ROOT / "docs" / "protocol.md").read_text()
    for code in ErrorCode:
        assert f"`{code.value}`" in spec, f"error code {code.value} is not documented"
    for op in REQUEST_TYPES:
        assert f"`{op}`" in spec, f"op {op} is not documented"


# ---------------------------------------------------------------- fast paths equal slow ones


def test_encode_complete_reply_is_encode_of_the_dataclass() -> None:
    usage = Usage(12, 34, 5, 6)
    for cached, retries, stop in [(False, 0, "end_turn"), (True, 3, None)]:
        reply = CompleteReply("id-1", "text ü", "m", usage, cached, retries, 1.25, stop)
        fast = encode_complete_reply(
            "id-1", "text ü", "m", usage, cached=cached, retries=retries, latency_ms=1.25, stop_reason=stop
        )
        assert fast == encode(reply)
    big = "x" * (LARGE_REPLY_CHARS + 5)  # packed into a presized buffer, sent as a view of it
    view = encode_complete_reply(
        "id-2", big, "m", usage, cached=False, retries=0, latency_ms=2.5, stop_reason=None
    )
    assert bytes(view) == encode(CompleteReply("id-2", big, "m", usage, False, 0, 2.5, None))


WELL_FORMED: list[dict[str, Any]] = [
    {"model": "m", "prompt": "hi"},
    {"model": "m", "prompt": ""},
    {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
    {"model": "m", "prompt": "p", "max_tokens": 7, "temperature": 1, "timeout_s": 2, "run": "r", "depth": 3},
    {"model": "m", "prompt": "p", "temperature": 0.5, "timeout_s": 0.25, "depth": 0, "run": None},
    {"model": "m", "prompt": "ignored", "messages": [{"role": "assistant", "content": "a"}]},
    {"model": "m", "messages": [{"role": "user", "content": "u", "name": "extra keys are ignored"}]},
]

MALFORMED: list[dict[str, Any]] = [
    {"model": 1, "prompt": "p"},
    {"model": "m"},
    {"model": "m", "prompt": 3},
    {"model": "m", "messages": []},
    {"model": "m", "messages": "hi"},
    {"model": "m", "messages": [["user", "x"]]},
    {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
    {"model": "m", "messages": [{"role": "user", "content": None}]},
    {"model": "m", "prompt": "p", "max_tokens": 0},
    {"model": "m", "prompt": "p", "max_tokens": True},
    {"model": "m", "prompt": "p", "max_tokens": 1.5},
    {"model": "m", "prompt": "p", "temperature": -0.1},
    {"model": "m", "prompt": "p", "temperature": "hot"},
    {"model": "m", "prompt": "p", "timeout_s": False},
    {"model": "m", "prompt": "p", "run": 5},
    {"model": "m", "prompt": "p", "depth": -1},
    {"model": "m", "prompt": "p", "depth": 1.0},
]


@pytest.fixture
def slow_decode(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Decode with the field readers alone, the fast path switched off."""

    def decode(fields: dict[str, Any]) -> CompleteRequest:
        with monkeypatch.context() as m:
            m.setattr(messages_module, "_complete_fast", lambda d, rid: None)
            request = decode_request(pack({"v": 1, "op": "complete", "id": "x", **fields}))
        assert isinstance(request, CompleteRequest)
        return request

    return decode


@pytest.mark.parametrize("fields", WELL_FORMED)
def test_fast_decode_equals_the_field_readers(fields: dict[str, Any], slow_decode: Any) -> None:
    fast = decode_request(pack({"v": 1, "op": "complete", "id": "x", **fields}))
    assert fast == slow_decode(fields)
    assert isinstance(fast, CompleteRequest)
    assert all(isinstance(m, ChatMessage) for m in fast.messages)
    with pytest.raises(AttributeError):
        fast.model = "changed"  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize("fields", MALFORMED)
def test_fast_decode_refuses_what_the_field_readers_refuse(fields: dict[str, Any], slow_decode: Any) -> None:
    with pytest.raises(DecodeError) as fast:
        decode_request(pack({"v": 1, "op": "complete", "id": "x", **fields}))
    with pytest.raises(DecodeError) as slow:
        slow_decode(fields)
    assert fast.value.message == slow.value.message
    assert fast.value.request_id == "x"


# ---------------------------------------------------------------- errors as structure


def test_error_info_round_trips_and_keeps_unknown_codes() -> None:
    from rlmq.protocol import ErrorInfo, RemoteError

    info = ErrorInfo("budget_exceeded", "no calls left", False)
    assert ErrorInfo.from_wire(info.to_wire()) == info
    later = ErrorInfo("rate_limited", "slow down", True, 1.5)
    assert ErrorInfo.from_wire(later.to_wire()) == later
    # A code from a newer peer survives every hop verbatim, and still raises a RemoteError.
    newer = ErrorInfo.from_wire({"code": "quota_gone", "message": "m", "retryable": False})
    exc = newer.exception()
    assert isinstance(exc, RemoteError)
    assert exc.code == ErrorCode.INTERNAL
    assert exc.raw_code == "quota_gone"
    assert ErrorInfo.of(exc) == newer
    assert str(exc) == "quota_gone: m"


@pytest.mark.parametrize(
    "wire",
    [
        "budget_exceeded",
        {"message": "m"},
        {"code": "", "message": "m"},
        {"code": "x", "message": 3},
        {"code": "x", "message": "m", "retryable": "yes"},
        {"code": "x", "message": "m", "retry_after_s": -1},
        {"code": "x", "message": "m", "retry_after_s": True},
    ],
)
def test_error_info_refuses_malformed_errors(wire: Any) -> None:
    from rlmq.protocol import ErrorInfo

    with pytest.raises(DecodeError):
        ErrorInfo.from_wire(wire)


def test_error_info_of_any_exception() -> None:
    from rlmq.protocol import ConfigError, ErrorInfo, TransportTimeout

    assert ErrorInfo.of(TransportTimeout("no reply")) == ErrorInfo("timeout", "no reply", True)
    assert ErrorInfo.of(ConfigError("bad key")) == ErrorInfo("bad_request", "bad key", False)
    # Not ours: internal, with the type named so the receiver can still tell what happened.
    assert ErrorInfo.of(KeyError("k")) == ErrorInfo("internal", "KeyError: 'k'", False)


def test_every_error_code_is_one_registry() -> None:
    """The sandbox's codes live in ErrorCode too: one enum, one set of wire strings."""
    import rlmq.protocol.sandbox as sandbox_protocol

    codes = {c.value for c in ErrorCode}
    assert {"unknown_session", "session_busy", "session_lost", "pool_exhausted", "rlm_failed"} <= codes
    assert not [name for name in vars(sandbox_protocol) if name.endswith("Code") and name != "ErrorCode"]


def test_a_reply_of_the_wrong_kind_is_a_typed_error() -> None:
    from rlmq.protocol.client import _expect

    with pytest.raises(DecodeError, match="expected a CompleteReply reply, got PongReply"):
        _expect(PongReply("id-1"), CompleteReply)
    with pytest.raises(RemoteError) as raised:
        _expect(ErrorReply("id-2", "rate_limited", "slow", True, 2.0), CompleteReply)
    assert (raised.value.code, raised.value.retryable, raised.value.retry_after_s) == (
        "rate_limited",
        True,
        2.0,
    )


def test_trace_must_be_a_short_string() -> None:
    """The handler, like the pool, refuses a trace field no traceparent could be: a call must not
    make the handler hold and re-send megabytes under a tracing header."""
    from rlmq.protocol import decode_request

    base = {"v": 1, "op": "complete", "id": "t1", "model": "m", "prompt": "hi"}
    ok = decode_request(pack({**base, "trace": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}))
    assert ok.trace is not None
    for bad in ("x" * 513, "", 7):
        with pytest.raises(DecodeError, match="trace"):
            decode_request(pack({**base, "trace": bad}))

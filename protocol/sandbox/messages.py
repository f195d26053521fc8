"""Typed messages of the sandbox session protocol, version 1, and the decoder of requests.

A message between an orchestrator and the pool is ``[envelope..., b"", header, *blobs]``:
everything up to and including the first empty frame is the envelope (echoed on replies),
``header`` is one msgpack map, and ``blobs`` are raw frames (a session's ``context``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from ..codec import unpack
from ..errors import DecodeError, ErrorCode, ErrorInfo, UnknownOp, UnsupportedVersion
from ..fields import Wire, drop_none, opt_float, opt_int, opt_string, optional, required, string
from ..messages import MAX_TRACE_CHARS, Usage
from .context import CONTEXT_FORMATS, ContextFormat

__all__ = [
    "EXEC_ERROR_CODES",
    "MAX_HEADER_BYTES",
    "SANDBOX_PROTOCOL_VERSION",
    "SANDBOX_REQUEST_TYPES",
    "CloseReply",
    "CloseRequest",
    "ExecError",
    "ExecReply",
    "ExecRequest",
    "ExecResult",
    "OpenReply",
    "OpenRequest",
    "Replay",
    "RlmQuery",
    "RlmResult",
    "SandboxPing",
    "SandboxPong",
    "SandboxRequest",
    "SandboxStats",
    "SandboxStatsReply",
    "SessionInfo",
    "SubCall",
    "SubCallsNotice",
    "decode_sandbox_request",
    "prompt_sha256",
    "split_delimited",
]

SANDBOX_PROTOCOL_VERSION = 1
SUPPORTED = frozenset({SANDBOX_PROTOCOL_VERSION})
# Headers carry code and small fields; contexts travel as blobs. Room for a big code block.
MAX_HEADER_BYTES = 16 * 1024 * 1024


# `ExecError.code`: how the code ended, when it did not end normally.
EXEC_ERROR_CODES = ("exception", "timeout", "worker_died", "memory")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ExecError:
    """How an exec ended abnormally. ``code``: exception | timeout | worker_died | memory."""

    code: str
    type: str
    message: str
    traceback: str

    def to_wire(self) -> Wire:
        return {"code": self.code, "type": self.type, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> ExecError:
        if not isinstance(d, Mapping):
            raise DecodeError("result.error must be a map", request_id=rid)
        return cls(
            code=string(d, "code", rid),
            type=string(d, "type", rid),
            message=string(d, "message", rid),
            traceback=opt_string(d, "traceback", rid) or "",
        )


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What one exec produced. ``final`` is the answer if the code ended the run: ``str(value)``
    of the last FINAL/FINAL_VAR call, or ``answer["content"]`` once ``answer["ready"]`` was set;
    ``ending`` says which (``final``, ``final_var``, ``answer``; None from older pools)."""

    stdout: str
    stderr: str
    error: ExecError | None
    final: str | None
    final_var: str | None
    elapsed_ms: float
    truncated_chars: int
    llm_calls: int
    state_lost: bool
    ending: str | None = None

    def to_wire(self) -> Wire:
        wire: Wire = {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "error": None if self.error is None else self.error.to_wire(),
            "final": self.final,
            "final_var": self.final_var,
            "elapsed_ms": self.elapsed_ms,
            "truncated_chars": self.truncated_chars,
            "llm_calls": self.llm_calls,
            "state_lost": self.state_lost,
        }
        if self.ending is not None:
            wire["ending"] = self.ending
        return wire

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> ExecResult:
        if not isinstance(d, Mapping):
            raise DecodeError("result must be a map", request_id=rid)
        error = d.get("error")
        return cls(
            stdout=string(d, "stdout", rid),
            stderr=string(d, "stderr", rid),
            error=None if error is None else ExecError.from_wire(error, rid),
            final=opt_string(d, "final", rid),
            final_var=opt_string(d, "final_var", rid),
            elapsed_ms=opt_float(d, "elapsed_ms", rid) or 0.0,
            truncated_chars=opt_int(d, "truncated_chars", rid) or 0,
            llm_calls=opt_int(d, "llm_calls", rid) or 0,
            state_lost=bool(optional(d, "state_lost", (bool,), "a boolean", rid)),
            ending=opt_string(d, "ending", rid),
        )

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the pool reports when a session opens. ``worker_pid`` is the host pid of the process
    that runs the code (the one to watch or kill); ``load_ms`` is the worker's decode time."""

    worker_pid: int
    context_type: str
    context_length: int
    context_chars: int
    load_ms: float

    def to_wire(self) -> Wire:
        return {
            "worker_pid": self.worker_pid,
            "context_type": self.context_type,
            "context_length": self.context_length,
            "context_chars": self.context_chars,
            "load_ms": self.load_ms,
        }

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> SessionInfo:
        if not isinstance(d, Mapping):
            raise DecodeError("info must be a map", request_id=rid)
        return cls(
            worker_pid=required(d, "worker_pid", (int,), "an integer", rid),
            context_type=string(d, "context_type", rid),
            context_length=required(d, "context_length", (int,), "an integer", rid),
            context_chars=required(d, "context_chars", (int,), "an integer", rid),
            load_ms=float(required(d, "load_ms", (int, float), "a number", rid)),
        )


# ---------------------------------------------------------------- sub-call records


def prompt_sha256(messages: Iterable[tuple[str, str]]) -> str:
    """The digest a sub-call's prompt is matched by on replay: sha256 (hex) of the msgpack of
    ``[[role, content], ...]``, the request's messages in order."""
    pairs = [[role, content] for role, content in messages]
    return hashlib.sha256(msgpack.packb(pairs, use_bin_type=True)).hexdigest()


def _number(d: Mapping[str, Any], key: str, rid: str | None) -> float:
    value = required(d, key, (int, float), "a number", rid)
    if value < 0:
        raise DecodeError(f"field {key!r} must be >= 0, got {value}", request_id=rid)
    return float(value)


def _count(d: Mapping[str, Any], key: str, rid: str | None) -> int:
    value: int = required(d, key, (int,), "an integer", rid)
    if value < 0:
        raise DecodeError(f"field {key!r} must be >= 0, got {value}", request_id=rid)
    return value


def _flag(d: Mapping[str, Any], key: str, rid: str | None) -> bool:
    return bool(optional(d, key, (bool,), "a boolean", rid))


def _usage_wire(usage: Usage) -> Wire:
    wire: Wire = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    if usage.cache_read_tokens:
        wire["cache_read_tokens"] = usage.cache_read_tokens
    if usage.cache_write_tokens:
        wire["cache_write_tokens"] = usage.cache_write_tokens
    return wire


@dataclass(frozen=True, slots=True)
class SubCall:
    """One llm_query/llm_query_batched call a session's code made, as the pool's relay saw it.

    ``seq`` is the call's order of issue within its exec (a batch's prompts in list order).
    ``prompt`` is the user content of the request's messages, joined by blank lines; past the
    exec's ``record_chars`` it is only the head, and ``prompt_tail`` the tail (``record_chars // 2``
    characters each). ``started_ms`` counts from the exec's start. ``replayed``: answered from
    the exec's replay list, never sent; ``diverged``: a replay had no recorded answer for it."""

    seq: int
    model: str
    depth: int
    prompt: str
    prompt_tail: str | None
    prompt_chars: int
    prompt_sha256: str
    text: str | None
    usage: Usage
    cost_usd: float
    cached: bool
    error: ErrorInfo | None
    started_ms: float
    latency_ms: float
    replayed: bool = False
    diverged: bool = False

    def to_wire(self) -> Wire:
        return {
            "seq": self.seq,
            "model": self.model,
            "depth": self.depth,
            "prompt": self.prompt,
            "prompt_tail": self.prompt_tail,
            "prompt_chars": self.prompt_chars,
            "prompt_sha256": self.prompt_sha256,
            "text": self.text,
            "usage": _usage_wire(self.usage),
            "cost_usd": self.cost_usd,
            "cached": self.cached,
            "error": None if self.error is None else self.error.to_wire(),
            "started_ms": self.started_ms,
            "latency_ms": self.latency_ms,
            "replayed": self.replayed,
            "diverged": self.diverged,
        }

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> SubCall:
        if not isinstance(d, Mapping):
            raise DecodeError("a sub-call record must be a map", request_id=rid)
        sha = string(d, "prompt_sha256", rid)
        if _SHA256_HEX.fullmatch(sha) is None:
            raise DecodeError("field 'prompt_sha256' must be 64 lowercase hex digits", request_id=rid)
        error = d.get("error")
        try:
            info = None if error is None else ErrorInfo.from_wire(error)
        except DecodeError as exc:
            raise DecodeError(f"field 'error': {exc.message}", request_id=rid) from None
        text = opt_string(d, "text", rid)
        if text is None and info is None:
            raise DecodeError("a sub-call record needs a 'text' or an 'error'", request_id=rid)
        return cls(
            seq=_count(d, "seq", rid),
            model=string(d, "model", rid),
            depth=_count(d, "depth", rid),
            prompt=string(d, "prompt", rid),
            prompt_tail=opt_string(d, "prompt_tail", rid),
            prompt_chars=_count(d, "prompt_chars", rid),
            prompt_sha256=sha,
            text=text,
            usage=Usage.from_wire(required(d, "usage", (dict,), "a map", rid), rid),
            cost_usd=opt_float(d, "cost_usd", rid) or 0.0,
            cached=required(d, "cached", (bool,), "a boolean", rid),
            error=info,
            started_ms=_number(d, "started_ms", rid),
            latency_ms=_number(d, "latency_ms", rid),
            replayed=_flag(d, "replayed", rid),
            diverged=_flag(d, "diverged", rid),
        )


@dataclass(frozen=True, slots=True)
class Replay:
    """An exec's recorded sub-calls to answer from: the call of seq ``n`` gets the answer of the
    record with seq ``n`` when their prompts' sha256 match. A call without one goes to the
    handler when ``live``, else fails with ``not_recorded``."""

    calls: Sequence[SubCall]
    live: bool = False

    def to_wire(self) -> Wire:
        return {"calls": [c.to_wire() for c in self.calls], "live": self.live}

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> Replay:
        if not isinstance(d, Mapping):
            raise DecodeError("field 'replay' must be a map", request_id=rid)
        calls = required(d, "calls", (list,), "a list", rid)
        return cls(
            tuple(SubCall.from_wire(c, rid) for c in calls),
            required(d, "live", (bool,), "a boolean", rid),
        )


@dataclass(frozen=True, slots=True)
class SubCallsNotice:
    """Pool -> client, one-way: sub-call records of the running exec ``id`` (the exec request's
    id), in seq order; every notice of an exec comes before the exec's reply."""

    id: str
    session: str
    records: Sequence[SubCall]

    OP: ClassVar[str] = "sub_calls"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | {
            "session": self.session,
            "records": [r.to_wire() for r in self.records],
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> SubCallsNotice:
        rid = string(d, "id", None)
        records = required(d, "records", (list,), "a list", rid)
        return cls(rid, string(d, "session", rid), tuple(SubCall.from_wire(r, rid) for r in records))


# ---------------------------------------------------------------- requests (client -> pool)


def _base(op: str, rid: str) -> Wire:
    return {"v": SANDBOX_PROTOCOL_VERSION, "op": op, "id": rid}


def _blobs(rid: str, op: str, nblobs: int, expected: int) -> None:
    if nblobs != expected:
        raise DecodeError(f"{op} expects {expected} blob frame(s), got {nblobs}", request_id=rid)


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """Open a session. The context is one blob (``context_format`` says how to read it), or a
    ``context_path`` the pool reads, or neither (``context`` is then the empty string)."""

    id: str
    run: str
    depth: int = 0
    max_depth: int = 1
    sub_model: str = "sub"
    handler: str | None = None
    exec_timeout_s: float | None = None
    max_output_chars: int | None = None
    context_format: str | None = None
    context_path: str | None = None
    rlm_query: bool = False  # the client answers rlm_query requests (it has a callback)
    # The key the run was opened with at the handler: the pool stamps it on the session's
    # sub-calls; the worker never sees it.
    run_key: str | None = None
    # Host-side tools the client answers (their names become functions of the namespace), and
    # modules the worker imports into the namespace at open: both additive, empty by default.
    tools: tuple[str, ...] = ()
    sandbox_modules: tuple[str, ...] = ()

    OP: ClassVar[str] = "open"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | drop_none(
            {
                "run": self.run,
                "depth": self.depth,
                "max_depth": self.max_depth,
                "sub_model": self.sub_model,
                "handler": self.handler,
                "exec_timeout_s": self.exec_timeout_s,
                "max_output_chars": self.max_output_chars,
                "context_format": self.context_format,
                "context_path": self.context_path,
                "rlm_query": self.rlm_query,
                "run_key": self.run_key,
                "tools": list(self.tools) or None,
                "sandbox_modules": list(self.sandbox_modules) or None,
            }
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> OpenRequest:
        fmt = opt_string(d, "context_format", rid)
        path = opt_string(d, "context_path", rid)
        if fmt is not None and path is not None:
            raise DecodeError(
                "give either context_format (with a blob) or context_path, not both", request_id=rid
            )
        if fmt is not None and fmt not in (ContextFormat.TEXT, ContextFormat.MSGPACK):
            raise DecodeError(f"context_format must be 'text' or 'msgpack', got {fmt!r}", request_id=rid)
        _blobs(rid, cls.OP, nblobs, 1 if fmt is not None else 0)
        max_output = opt_int(d, "max_output_chars", rid, minimum=100)
        timeout = opt_float(d, "exec_timeout_s", rid)
        if timeout is not None and timeout <= 0:
            raise DecodeError("field 'exec_timeout_s' must be positive", request_id=rid)
        depth = opt_int(d, "depth", rid) or 0
        max_depth = opt_int(d, "max_depth", rid)
        return cls(
            id=rid,
            run=string(d, "run", rid),
            depth=depth,
            max_depth=1 if max_depth is None else max_depth,
            sub_model=opt_string(d, "sub_model", rid) or "sub",
            handler=opt_string(d, "handler", rid),
            exec_timeout_s=timeout,
            max_output_chars=max_output,
            context_format=fmt,
            context_path=path,
            rlm_query=bool(optional(d, "rlm_query", (bool,), "a boolean", rid)),
            run_key=opt_string(d, "run_key", rid),
            tools=_names(d, "tools", rid),
            sandbox_modules=_names(d, "sandbox_modules", rid),
        )


def _names(d: Mapping[str, Any], key: str, rid: str) -> tuple[str, ...]:
    """An optional list of non-empty strings (tool names, module names)."""
    value = optional(d, key, (list,), "a list of strings", rid)
    if value is None:
        return ()
    if not all(isinstance(v, str) and v for v in value):
        raise DecodeError(f"field {key!r} must be a list of non-empty strings", request_id=rid)
    return tuple(value)


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """Run code in a session. Optional, added within version 1: ``record_chars`` (send a
    ``sub_calls`` record of every sub-call, prompts cut past that many characters; None sends
    none), ``replay`` (answer sub-calls from these records), ``trace`` (a W3C traceparent the
    pool puts on every sub-call it sends on)."""

    id: str
    session: str
    code: str
    timeout_s: float | None = None
    record_chars: int | None = None
    replay: Replay | None = None
    trace: str | None = None

    OP: ClassVar[str] = "exec"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | drop_none(
            {
                "session": self.session,
                "code": self.code,
                "timeout_s": self.timeout_s,
                "record_chars": self.record_chars,
                "replay": None if self.replay is None else self.replay.to_wire(),
                "trace": self.trace,
            }
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> ExecRequest:
        _blobs(rid, cls.OP, nblobs, 0)
        timeout = opt_float(d, "timeout_s", rid)
        if timeout is not None and timeout <= 0:
            raise DecodeError("field 'timeout_s' must be positive", request_id=rid)
        replay = d.get("replay")
        trace = opt_string(d, "trace", rid)
        if trace is not None and not 0 < len(trace) <= MAX_TRACE_CHARS:
            raise DecodeError(f"field 'trace' must be 1 to {MAX_TRACE_CHARS} characters", request_id=rid)
        return cls(
            rid,
            string(d, "session", rid),
            string(d, "code", rid),
            timeout,
            record_chars=opt_int(d, "record_chars", rid),
            replay=None if replay is None else Replay.from_wire(replay, rid),
            trace=trace,
        )


@dataclass(frozen=True, slots=True)
class CloseRequest:
    id: str
    session: str

    OP: ClassVar[str] = "close"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | {"session": self.session}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> CloseRequest:
        _blobs(rid, cls.OP, nblobs, 0)
        return cls(rid, string(d, "session", rid))


@dataclass(frozen=True, slots=True)
class SandboxPing:
    id: str

    OP: ClassVar[str] = "ping"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> SandboxPing:
        _blobs(rid, cls.OP, nblobs, 0)
        return cls(rid)


@dataclass(frozen=True, slots=True)
class SandboxStats:
    id: str

    OP: ClassVar[str] = "stats"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> SandboxStats:
        _blobs(rid, cls.OP, nblobs, 0)
        return cls(rid)


@dataclass(frozen=True, slots=True)
class RlmResult:
    """The answer to an ``rlm_query``: ``id`` is the query's id. Not replied to. The answer to a
    tool call (an ``rlm_query`` with ``tool``) carries the tool's result in ``value`` (any
    msgpack value) and an empty ``text``."""

    id: str
    session: str
    ok: bool
    text: str | None = None
    error: ErrorInfo | None = None
    value: Any = None

    OP: ClassVar[str] = "rlm_result"

    def to_wire(self) -> Wire:
        wire = _base(self.OP, self.id) | {"session": self.session, "ok": self.ok}
        if self.ok:
            wire["text"] = self.text or ""
            if self.value is not None:
                wire["value"] = self.value
        else:
            error = self.error or ErrorInfo(ErrorCode.RLM_FAILED, "the child run failed")
            wire["error"] = error.to_wire()
        return wire

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> RlmResult:
        _blobs(rid, cls.OP, nblobs, 0)
        session = string(d, "session", rid)
        ok = required(d, "ok", (bool,), "a boolean", rid)
        if ok:
            return cls(rid, session, True, text=string(d, "text", rid), value=d.get("value"))
        try:
            error = ErrorInfo.from_wire(required(d, "error", (dict,), "a map", rid))
        except DecodeError as exc:
            raise DecodeError(exc.message, request_id=rid) from None
        return cls(rid, session, False, error=error)


SandboxRequest = OpenRequest | ExecRequest | CloseRequest | SandboxPing | SandboxStats | RlmResult

SANDBOX_REQUEST_TYPES: dict[str, Callable[[Mapping[str, Any], str, int], SandboxRequest]] = {
    OpenRequest.OP: OpenRequest.from_wire,
    ExecRequest.OP: ExecRequest.from_wire,
    CloseRequest.OP: CloseRequest.from_wire,
    SandboxPing.OP: SandboxPing.from_wire,
    SandboxStats.OP: SandboxStats.from_wire,
    RlmResult.OP: RlmResult.from_wire,
}


def split_delimited(frames: Sequence[Any]) -> tuple[list[Any], Any, list[Any]] | None:
    """``[envelope..., b"", header, *blobs]`` to ``(envelope incl. delimiter, header, blobs)``.

    None when there is no empty delimiter frame or nothing after it: such a message cannot be
    answered (the envelope is unknown) and is dropped.
    """
    for i, frame in enumerate(frames):
        if len(frame) == 0:
            if i + 1 >= len(frames):
                return None
            return list(frames[: i + 1]), frames[i + 1], list(frames[i + 2 :])
    return None


def decode_sandbox_request(
    header: bytes | memoryview, nblobs: int, *, max_bytes: int = MAX_HEADER_BYTES
) -> SandboxRequest:
    """A header frame (and the number of blobs after it) to a validated request.

    Raises a ``ProtocolError`` subclass, with ``request_id`` set when the id could be read.
    """
    obj = unpack(header, max_bytes=max_bytes)
    rid = obj.get("id")
    if not isinstance(rid, str):
        raise DecodeError("missing or non-string field 'id'")
    version = obj.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise DecodeError("missing or non-integer field 'v'", request_id=rid)
    if version not in SUPPORTED:
        raise UnsupportedVersion(
            f"sandbox protocol version {version} is not supported; this pool speaks {sorted(SUPPORTED)}",
            request_id=rid,
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise DecodeError("missing or non-string field 'op'", request_id=rid)
    parser = SANDBOX_REQUEST_TYPES.get(op)
    if parser is None:
        raise UnknownOp(
            f"unknown op {op!r}; known: {', '.join(sorted(SANDBOX_REQUEST_TYPES))}", request_id=rid
        )
    return parser(obj, rid, nblobs)


# ---------------------------------------------------------------- replies and pool -> client


def _ok(rid: str, body: Wire) -> Wire:
    return {"v": SANDBOX_PROTOCOL_VERSION, "id": rid, "ok": True, **body}


@dataclass(frozen=True, slots=True)
class OpenReply:
    id: str
    session: str
    info: SessionInfo
    exec_timeout_s: float
    max_output_chars: int

    def to_wire(self) -> Wire:
        return _ok(
            self.id,
            {
                "session": self.session,
                "info": self.info.to_wire(),
                "exec_timeout_s": self.exec_timeout_s,
                "max_output_chars": self.max_output_chars,
            },
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> OpenReply:
        rid = string(d, "id", None)
        return cls(
            id=rid,
            session=string(d, "session", rid),
            info=SessionInfo.from_wire(d.get("info"), rid),
            exec_timeout_s=float(required(d, "exec_timeout_s", (int, float), "a number", rid)),
            max_output_chars=required(d, "max_output_chars", (int,), "an integer", rid),
        )


@dataclass(frozen=True, slots=True)
class ExecReply:
    id: str
    session: str
    result: ExecResult

    def to_wire(self) -> Wire:
        return _ok(self.id, {"session": self.session, "result": self.result.to_wire()})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ExecReply:
        rid = string(d, "id", None)
        return cls(rid, string(d, "session", rid), ExecResult.from_wire(d.get("result"), rid))


@dataclass(frozen=True, slots=True)
class CloseReply:
    id: str
    session: str

    def to_wire(self) -> Wire:
        return _ok(self.id, {"session": self.session})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> CloseReply:
        rid = string(d, "id", None)
        return cls(rid, string(d, "session", rid))


@dataclass(frozen=True, slots=True)
class SandboxPong:
    id: str
    isolation: str
    workers_ready: int
    sessions: int
    server: str = "rlmq-sandbox"
    versions: tuple[int, ...] = (SANDBOX_PROTOCOL_VERSION,)

    def to_wire(self) -> Wire:
        return _ok(
            self.id,
            {
                "server": self.server,
                "versions": list(self.versions),
                "isolation": self.isolation,
                "workers_ready": self.workers_ready,
                "sessions": self.sessions,
            },
        )


@dataclass(frozen=True, slots=True)
class SandboxStatsReply:
    id: str
    stats: Mapping[str, Any]

    def to_wire(self) -> Wire:
        return _ok(self.id, {"stats": dict(self.stats)})


@dataclass(frozen=True, slots=True)
class RlmQuery:
    """Pool -> client, unsolicited: the code of ``session`` called ``rlm_query``. The context, if
    any, follows as one blob in ``context_format``. Answer with ``RlmResult`` of the same id.

    With ``tool`` set it is a call of a host-side tool instead: ``tool(*args, **kwargs)``, the
    prompt empty and no blob; the answer's ``value`` is the tool's result."""

    id: str
    session: str
    prompt: str
    context_format: str | None = None
    tool: str | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None

    OP: ClassVar[str] = "rlm_query"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | drop_none(
            {
                "session": self.session,
                "prompt": self.prompt,
                "context_format": self.context_format,
                "tool": self.tool,
                "args": self.args,
                "kwargs": self.kwargs,
            }
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> RlmQuery:
        rid = string(d, "id", None)
        fmt = opt_string(d, "context_format", rid)
        if fmt is not None and fmt not in CONTEXT_FORMATS:
            raise DecodeError(f"unknown context_format {fmt!r}", request_id=rid)
        _blobs(rid, cls.OP, nblobs, 1 if fmt is not None else 0)
        tool = opt_string(d, "tool", rid)
        args = optional(d, "args", (list,), "a list", rid)
        kwargs = optional(d, "kwargs", (dict,), "a map", rid)
        if kwargs is not None and not all(isinstance(k, str) for k in kwargs):
            raise DecodeError("field 'kwargs' must be a map with string keys", request_id=rid)
        return cls(rid, string(d, "session", rid), string(d, "prompt", rid), fmt, tool, args, kwargs)

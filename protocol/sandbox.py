"""The sandbox session protocol, version 1: typed messages, the context codec, and the client.

docs/protocol.md ("Sandbox session protocol") is the spec. A message between an orchestrator and
the pool is ``[envelope..., b"", header, *blobs]``: everything up to and including the first empty
frame is the envelope (echoed on replies), ``header`` is one msgpack map, and ``blobs`` are raw
frames (a session's ``context``) that are never re-encoded on the way to the worker.

The client lives here, not in ``sandbox``, because the orchestrator may import only ``protocol``.

Errors the client raises:

    RlmqError
    └── SandboxError      an error reply from the pool, or no reply in time; ``code`` is an
                          ``ErrorCode`` value or a ``SandboxCode`` value (both are str)

Errors of the model's code are not exceptions here: they come back inside ``ExecResult.error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import msgpack
import zmq
import zmq.asyncio

from .client import _AsyncDealer
from .codec import DEFAULT_MAX_MESSAGE_BYTES, pack, unpack
from .errors import (
    DecodeError,
    ErrorCode,
    ErrorInfo,
    ProtocolError,
    RlmqError,
    UnknownOp,
    UnsupportedVersion,
)
from .messages import (
    ErrorReply,
    _drop_none,
    _field,
    _opt,
    _opt_float,
    _opt_int,
    _opt_str,
    _str,
)
from .security import CurveClientKeys

__all__ = [
    "CONTEXT_FORMATS",
    "EXEC_ERROR_CODES",
    "SANDBOX_PROTOCOL_VERSION",
    "SANDBOX_REQUEST_TYPES",
    "AsyncSandboxClient",
    "CloseReply",
    "CloseRequest",
    "ContextFormat",
    "ExecError",
    "ExecReply",
    "ExecRequest",
    "ExecResult",
    "OpenReply",
    "OpenRequest",
    "RlmQuery",
    "RlmResult",
    "SandboxCode",
    "SandboxError",
    "SandboxPing",
    "SandboxPong",
    "SandboxRequest",
    "SandboxStats",
    "SandboxStatsReply",
    "Session",
    "SessionInfo",
    "context_shape",
    "decode_context",
    "decode_sandbox_request",
    "encode_context",
    "split_delimited",
]

log = logging.getLogger(__name__)

SANDBOX_PROTOCOL_VERSION = 1
SUPPORTED = frozenset({SANDBOX_PROTOCOL_VERSION})
# Headers carry code and small fields; contexts travel as blobs. Room for a big code block.
MAX_HEADER_BYTES = 16 * 1024 * 1024
Wire = dict[str, Any]


class SandboxCode(StrEnum):
    """Error codes of the session protocol in addition to ``ErrorCode``."""

    UNKNOWN_SESSION = "unknown_session"  # no open session has this id (closed, expired, never opened)
    SESSION_BUSY = "session_busy"  # an exec is already running in this session
    SESSION_LOST = "session_lost"  # the worker died and no replacement could be started
    POOL_EXHAUSTED = "pool_exhausted"  # no worker became ready within open_timeout_s
    RLM_FAILED = "rlm_failed"  # an on_rlm_query callback raised (sent in rlm_result)


class ContextFormat(StrEnum):
    TEXT = "text"  # UTF-8 bytes -> str
    MSGPACK = "msgpack"  # a msgpack list or map -> list / dict
    JSON = "json"  # a JSON document (context_path ending in .json)


CONTEXT_FORMATS = frozenset(f.value for f in ContextFormat)
# `ExecError.code`: how the code ended, when it did not end normally.
EXEC_ERROR_CODES = ("exception", "timeout", "worker_died", "memory")


class SandboxError(RlmqError):
    """An error reply from the sandbox pool (or no reply in time)."""

    # Wider than the base's ErrorCode: the sandbox adds its own codes (SandboxCode). Both enums
    # are str, so `err.code == "unknown_session"` and `err.code == ErrorCode.TIMEOUT` both work.
    code: str  # type: ignore[assignment]

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# ---------------------------------------------------------------- context codec


def encode_context(
    context: str | bytes | bytearray | memoryview | list[Any] | dict[Any, Any],
) -> tuple[str, Any]:
    """A context value to ``(format, payload)``; the payload is sent as one blob frame."""
    if isinstance(context, str):
        # surrogatepass: a stray surrogate in a huge document should not refuse the whole session;
        # the worker decodes with errors="replace".
        return ContextFormat.TEXT.value, context.encode("utf-8", "surrogatepass")
    if isinstance(context, bytes | bytearray | memoryview):
        return ContextFormat.TEXT.value, context
    if isinstance(context, list | tuple | dict):
        try:
            return ContextFormat.MSGPACK.value, msgpack.packb(context, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(
                f"context must be str, bytes, or a list/dict of plain values (str, numbers, lists, "
                f"dicts): {exc}"
            ) from None
    raise TypeError(f"context must be str, bytes, list or dict, not {type(context).__name__}")


def decode_context(fmt: str, payload: bytes | memoryview) -> Any:
    """The inverse of ``encode_context`` (and of a context file read as ``text`` or ``json``).

    Text that is not valid UTF-8 is decoded with replacement characters rather than refused.
    Raises ``ValueError`` for a document that cannot be parsed.
    """
    if fmt == ContextFormat.TEXT:
        return str(payload, "utf-8", "replace")
    if fmt == ContextFormat.MSGPACK:
        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise ValueError(f"context is not valid msgpack ({type(exc).__name__})") from None
    if fmt == ContextFormat.JSON:
        try:
            return json.loads(str(payload, "utf-8", "replace"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"context is not valid JSON: {exc}") from None
    raise ValueError(f"unknown context format {fmt!r}")


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif depth < 64 and isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item, depth + 1)
    elif depth < 64 and isinstance(value, dict):
        for item in value.values():
            yield from _strings(item, depth + 1)


def context_shape(value: Any) -> tuple[str, int, int]:
    """``(context_type, len(context), total characters of every str inside it)``."""
    kind = "str" if isinstance(value, str) else "list" if isinstance(value, list) else "dict"
    if not isinstance(value, str | list | dict):
        kind = type(value).__name__
    length = len(value) if isinstance(value, str | list | dict) else 0
    chars = sum(len(s) for s in _strings(value))
    return kind, length, chars


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
            code=_str(d, "code", rid),
            type=_str(d, "type", rid),
            message=_str(d, "message", rid),
            traceback=_opt_str(d, "traceback", rid) or "",
        )


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What one exec produced. ``final`` is ``str(value)`` of the last FINAL/FINAL_VAR call."""

    stdout: str
    stderr: str
    error: ExecError | None
    final: str | None
    final_var: str | None
    elapsed_ms: float
    truncated_chars: int
    llm_calls: int
    state_lost: bool

    def to_wire(self) -> Wire:
        return {
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

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> ExecResult:
        if not isinstance(d, Mapping):
            raise DecodeError("result must be a map", request_id=rid)
        error = d.get("error")
        return cls(
            stdout=_str(d, "stdout", rid),
            stderr=_str(d, "stderr", rid),
            error=None if error is None else ExecError.from_wire(error, rid),
            final=_opt_str(d, "final", rid),
            final_var=_opt_str(d, "final_var", rid),
            elapsed_ms=_opt_float(d, "elapsed_ms", rid) or 0.0,
            truncated_chars=_opt_int(d, "truncated_chars", rid) or 0,
            llm_calls=_opt_int(d, "llm_calls", rid) or 0,
            state_lost=bool(_opt(d, "state_lost", (bool,), "a boolean", rid)),
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
            worker_pid=_field(d, "worker_pid", (int,), "an integer", rid),
            context_type=_str(d, "context_type", rid),
            context_length=_field(d, "context_length", (int,), "an integer", rid),
            context_chars=_field(d, "context_chars", (int,), "an integer", rid),
            load_ms=float(_field(d, "load_ms", (int, float), "a number", rid)),
        )


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

    OP: ClassVar[str] = "open"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | _drop_none(
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
            }
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> OpenRequest:
        fmt = _opt_str(d, "context_format", rid)
        path = _opt_str(d, "context_path", rid)
        if fmt is not None and path is not None:
            raise DecodeError(
                "give either context_format (with a blob) or context_path, not both", request_id=rid
            )
        if fmt is not None and fmt not in (ContextFormat.TEXT, ContextFormat.MSGPACK):
            raise DecodeError(f"context_format must be 'text' or 'msgpack', got {fmt!r}", request_id=rid)
        _blobs(rid, cls.OP, nblobs, 1 if fmt is not None else 0)
        max_output = _opt_int(d, "max_output_chars", rid, minimum=100)
        timeout = _opt_float(d, "exec_timeout_s", rid)
        if timeout is not None and timeout <= 0:
            raise DecodeError("field 'exec_timeout_s' must be positive", request_id=rid)
        depth = _opt_int(d, "depth", rid) or 0
        max_depth = _opt_int(d, "max_depth", rid)
        return cls(
            id=rid,
            run=_str(d, "run", rid),
            depth=depth,
            max_depth=1 if max_depth is None else max_depth,
            sub_model=_opt_str(d, "sub_model", rid) or "sub",
            handler=_opt_str(d, "handler", rid),
            exec_timeout_s=timeout,
            max_output_chars=max_output,
            context_format=fmt,
            context_path=path,
            rlm_query=bool(_opt(d, "rlm_query", (bool,), "a boolean", rid)),
        )


@dataclass(frozen=True, slots=True)
class ExecRequest:
    id: str
    session: str
    code: str
    timeout_s: float | None = None

    OP: ClassVar[str] = "exec"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | _drop_none(
            {"session": self.session, "code": self.code, "timeout_s": self.timeout_s}
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> ExecRequest:
        _blobs(rid, cls.OP, nblobs, 0)
        timeout = _opt_float(d, "timeout_s", rid)
        if timeout is not None and timeout <= 0:
            raise DecodeError("field 'timeout_s' must be positive", request_id=rid)
        return cls(rid, _str(d, "session", rid), _str(d, "code", rid), timeout)


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
        return cls(rid, _str(d, "session", rid))


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
    """The answer to an ``rlm_query``: ``id`` is the query's id. Not replied to."""

    id: str
    session: str
    ok: bool
    text: str | None = None
    error: ErrorInfo | None = None

    OP: ClassVar[str] = "rlm_result"

    def to_wire(self) -> Wire:
        wire = _base(self.OP, self.id) | {"session": self.session, "ok": self.ok}
        if self.ok:
            wire["text"] = self.text or ""
        else:
            error = self.error or ErrorInfo(ErrorCode.RLM_FAILED, "the child run failed")
            wire["error"] = error.to_wire()
        return wire

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str, nblobs: int) -> RlmResult:
        _blobs(rid, cls.OP, nblobs, 0)
        session = _str(d, "session", rid)
        ok = _field(d, "ok", (bool,), "a boolean", rid)
        if ok:
            return cls(rid, session, True, text=_str(d, "text", rid))
        try:
            error = ErrorInfo.from_wire(_field(d, "error", (dict,), "a map", rid))
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
        rid = _str(d, "id", None)
        return cls(
            id=rid,
            session=_str(d, "session", rid),
            info=SessionInfo.from_wire(d.get("info"), rid),
            exec_timeout_s=float(_field(d, "exec_timeout_s", (int, float), "a number", rid)),
            max_output_chars=_field(d, "max_output_chars", (int,), "an integer", rid),
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
        rid = _str(d, "id", None)
        return cls(rid, _str(d, "session", rid), ExecResult.from_wire(d.get("result"), rid))


@dataclass(frozen=True, slots=True)
class CloseReply:
    id: str
    session: str

    def to_wire(self) -> Wire:
        return _ok(self.id, {"session": self.session})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> CloseReply:
        rid = _str(d, "id", None)
        return cls(rid, _str(d, "session", rid))


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
    any, follows as one blob in ``context_format``. Answer with ``RlmResult`` of the same id."""

    id: str
    session: str
    prompt: str
    context_format: str | None = None

    OP: ClassVar[str] = "rlm_query"

    def to_wire(self) -> Wire:
        return _base(self.OP, self.id) | _drop_none(
            {"session": self.session, "prompt": self.prompt, "context_format": self.context_format}
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> RlmQuery:
        rid = _str(d, "id", None)
        fmt = _opt_str(d, "context_format", rid)
        if fmt is not None and fmt not in CONTEXT_FORMATS:
            raise DecodeError(f"unknown context_format {fmt!r}", request_id=rid)
        _blobs(rid, cls.OP, nblobs, 1 if fmt is not None else 0)
        return cls(rid, _str(d, "session", rid), _str(d, "prompt", rid), fmt)


# ---------------------------------------------------------------- the client

RlmCallback = Callable[[str, Any], Awaitable[str]]
# The pool answers an exec at its own deadline; the client waits this much longer before it
# gives up on the pool itself.
EXEC_WAIT_MARGIN_S = 15.0


def _raise_for(obj: Mapping[str, Any]) -> None:
    if obj.get("ok") is True:
        return
    try:
        err = ErrorReply.from_wire(obj)
    except ProtocolError as exc:
        raise SandboxError(ErrorCode.BAD_REQUEST, f"malformed reply from the pool: {exc.message}") from None
    raise SandboxError(err.code, err.message, retryable=err.retryable)


class Session:
    """One open session: a worker process with a persistent namespace. Made by ``open``."""

    def __init__(
        self,
        client: AsyncSandboxClient,
        session_id: str,
        info: SessionInfo,
        exec_timeout_s: float,
        on_rlm_query: RlmCallback | None,
    ) -> None:
        self._client = client
        self.id = session_id
        self.info = info
        self.exec_timeout_s = exec_timeout_s
        self.on_rlm_query = on_rlm_query
        self.closed = False

    def __repr__(self) -> str:
        info = self.info
        return f"<Session {self.id} pid={info.worker_pid} {info.context_type}[{info.context_length}]>"

    async def exec(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` in the session's namespace. Errors of the code come back in the result;
        raises ``SandboxError`` only when the session itself cannot serve (closed, lost)."""
        if self.closed:
            raise SandboxError(SandboxCode.UNKNOWN_SESSION, f"session {self.id} is closed")
        deadline = (timeout_s or self.exec_timeout_s) + EXEC_WAIT_MARGIN_S
        req = ExecRequest(self._client.new_id(), self.id, code, timeout_s)
        obj, _ = await self._client._request(req.to_wire(), [], deadline)
        try:
            _raise_for(obj)
        except SandboxError as exc:
            if exc.code in (SandboxCode.SESSION_LOST, SandboxCode.UNKNOWN_SESSION):
                self.closed = True  # the pool has forgotten it: so do we
                self._client._sessions.pop(self.id, None)
            raise
        pid = obj.get("worker_pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid != self.info.worker_pid:
            # The session moved to a fresh worker (after a timeout or a death).
            self.info = dataclasses.replace(self.info, worker_pid=pid)
        try:
            return ExecReply.from_wire(obj).result
        except ProtocolError as exc:
            raise SandboxError(ErrorCode.BAD_REQUEST, f"malformed exec reply: {exc.message}") from None

    async def close(self) -> None:
        """Close the session; its worker is killed and never reused. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._client._sessions.pop(self.id, None)
        req = CloseRequest(self._client.new_id(), self.id)
        obj, _ = await self._client._request(req.to_wire(), [], self._client.timeout_s)
        if obj.get("ok") is not True:
            err = ErrorReply.from_wire(obj)
            if err.code != SandboxCode.UNKNOWN_SESSION:  # already gone is closed enough
                raise SandboxError(err.code, err.message, retryable=err.retryable)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSandboxClient(_AsyncDealer):
    """One DEALER socket to a sandbox pool; many sessions over it, matched by request id.

    ``rlm_query`` requests from a session's code are answered by that session's ``on_rlm_query``
    callback, each in its own task, so a slow child run never blocks the reader.
    """

    def __init__(
        self,
        address: str,
        *,
        context: zmq.asyncio.Context | None = None,
        timeout_s: float = 60.0,
        curve: CurveClientKeys | None = None,
    ) -> None:
        """``curve``: keys for a pool that requires CURVE (see ``protocol.security``)."""
        super().__init__(address, context=context, timeout_s=timeout_s, curve=curve)
        self._pending: dict[str, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._sessions: dict[str, Session] = {}
        self._callbacks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ transport

    async def _send(self, header: Mapping[str, Any], blobs: Sequence[Any]) -> None:
        await self._sock.send_multipart([b"", pack(header), *blobs], copy=False)

    async def _request(
        self, header: Mapping[str, Any], blobs: Sequence[Any], timeout_s: float
    ) -> tuple[dict[str, Any], list[Any]]:
        if self._closed:
            raise SandboxError(ErrorCode.UNAVAILABLE, "client is closed")
        loop = asyncio.get_running_loop()
        if self._reader is None:
            self._reader = loop.create_task(self._read())
        rid = header["id"]
        future: asyncio.Future[tuple[dict[str, Any], list[Any]]] = loop.create_future()
        self._pending[rid] = future
        try:
            await self._send(header, blobs)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise SandboxError(
                ErrorCode.TIMEOUT,
                f"no reply to {header.get('op')} {rid} from {self.address} within {timeout_s:g} s",
                retryable=True,
            ) from None
        finally:
            self._pending.pop(rid, None)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            parts = split_delimited(frames)
            if parts is None:
                log.warning("message without a delimiter from %s dropped", self.address)
                continue
            _, header, blobs = parts
            try:
                obj = unpack(header.buffer, max_bytes=DEFAULT_MAX_MESSAGE_BYTES * 16)
            except ProtocolError as exc:
                log.warning("unreadable message from %s dropped: %s", self.address, exc.message)
                continue
            if obj.get("op") == RlmQuery.OP:
                self._on_rlm_query(obj, blobs)
                continue
            rid = obj.get("id")
            future = self._pending.get(rid) if isinstance(rid, str) else None
            if future is not None and not future.done():
                future.set_result((obj, blobs))
            # else: a late reply to a request that timed out

    def _on_rlm_query(self, obj: Mapping[str, Any], blobs: list[Any]) -> None:
        try:
            query = RlmQuery.from_wire(obj, len(blobs))
        except ProtocolError as exc:
            log.warning("malformed rlm_query from %s dropped: %s", self.address, exc.message)
            return
        task = asyncio.get_running_loop().create_task(self._answer(query, blobs))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _answer(self, query: RlmQuery, blobs: list[Any]) -> None:
        session = self._sessions.get(query.session)
        callback = session.on_rlm_query if session is not None else None
        if callback is None:
            result = RlmResult(
                query.id,
                query.session,
                False,
                error=ErrorInfo(ErrorCode.RLM_FAILED, "this session has no on_rlm_query handler"),
            )
        else:
            try:
                context = (
                    decode_context(query.context_format, blobs[0].buffer)
                    if query.context_format is not None
                    else None
                )
                text = await callback(query.prompt, context)
                result = RlmResult(query.id, query.session, True, text=str(text))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the orchestrator's failure becomes an exception in the code
                error = ErrorInfo.of(exc)
                if not isinstance(exc, RlmqError):  # a bug of the callback, not a typed failure
                    error = ErrorInfo(ErrorCode.RLM_FAILED, error.message)
                result = RlmResult(query.id, query.session, False, error=error)
        if not self._closed:
            await self._send(result.to_wire(), [])

    # ------------------------------------------------------------ operations

    async def open(
        self,
        *,
        run: str,
        context: str | bytes | list[Any] | dict[Any, Any] | None = None,
        context_path: str | None = None,
        depth: int = 0,
        max_depth: int = 1,
        handler: str | None = None,
        sub_model: str = "sub",
        exec_timeout_s: float | None = None,
        max_output_chars: int | None = None,
        on_rlm_query: RlmCallback | None = None,
    ) -> Session:
        """Open a session on a fresh worker with ``context`` (inline) or ``context_path`` (a file
        the pool reads; ``.json`` is parsed, anything else is UTF-8 text)."""
        if context is not None and context_path is not None:
            raise ValueError("give context or context_path, not both")
        blobs: list[Any] = []
        fmt: str | None = None
        if context is not None:
            fmt, payload = encode_context(context)
            blobs = [payload]
        req = OpenRequest(
            id=self.new_id(),
            run=run,
            depth=depth,
            max_depth=max_depth,
            sub_model=sub_model,
            handler=handler,
            exec_timeout_s=exec_timeout_s,
            max_output_chars=max_output_chars,
            context_format=fmt,
            context_path=context_path,
            rlm_query=on_rlm_query is not None,
        )
        started = time.monotonic()
        obj, _ = await self._request(req.to_wire(), blobs, self.timeout_s)
        _raise_for(obj)
        try:
            reply = OpenReply.from_wire(obj)
        except ProtocolError as exc:
            raise SandboxError(ErrorCode.BAD_REQUEST, f"malformed open reply: {exc.message}") from None
        session = Session(self, reply.session, reply.info, reply.exec_timeout_s, on_rlm_query)
        self._sessions[session.id] = session
        log.debug("session %s open in %.1f ms", session.id, (time.monotonic() - started) * 1000)
        return session

    async def ping(self) -> dict[str, Any]:
        obj, _ = await self._request(SandboxPing(self.new_id()).to_wire(), [], self.timeout_s)
        _raise_for(obj)
        return {k: v for k, v in obj.items() if k not in ("v", "id", "ok")}

    async def stats(self) -> dict[str, Any]:
        obj, _ = await self._request(SandboxStats(self.new_id()).to_wire(), [], self.timeout_s)
        _raise_for(obj)
        stats = obj.get("stats")
        if not isinstance(stats, dict):
            raise SandboxError(ErrorCode.BAD_REQUEST, "malformed stats reply")
        return stats

    async def aclose(self) -> None:
        """Close every session still open (best effort, briefly), then the socket."""
        if self._closed:
            return
        if self._sessions:
            sessions = list(self._sessions.values())
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        self._closed = True
        for task in [*self._callbacks, *([self._reader] if self._reader else [])]:
            task.cancel()
        for task in [*self._callbacks, *([self._reader] if self._reader else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        self._close_socket()

"""Messages between the pool and its workers (private to the sandbox package).

Transport: the pool binds a ROUTER on a private ipc:// path; each worker connects two DEALERs,
``<wid>`` (everything below) and ``<wid>:hb`` (heartbeats only, from their own thread). A message
is ``[header, *blobs]`` with a msgpack map header. Workers run untrusted code, so the pool
decodes what they send as strictly as what clients send: a bad message is dropped, never trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from rlmq.protocol import DecodeError, unpack
from rlmq.protocol.errors import ErrorCode, ErrorInfo
from rlmq.protocol.fields import drop_none, opt_string, required, string
from rlmq.protocol.sandbox import CONTEXT_FORMATS, ExecResult, SessionInfo

__all__ = [
    "Assign",
    "Exec",
    "Heartbeat",
    "Loaded",
    "Ready",
    "Result",
    "RlmAnswer",
    "WorkerRlmQuery",
    "decode_from_pool",
    "decode_from_worker",
]

Wire = dict[str, Any]


def _error(d: Mapping[str, Any], key: str) -> ErrorInfo:
    return ErrorInfo.from_wire(required(d, key, (dict,), "a map", None))


def _opt_error(d: Mapping[str, Any], key: str) -> ErrorInfo | None:
    return None if d.get(key) is None else _error(d, key)


def _opt_positive(d: Mapping[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DecodeError(f"{key} must be a positive integer")
    return value


def _fields(d: Mapping[str, Any], nblobs: int, expected: int, op: str) -> None:
    if nblobs != expected:
        raise DecodeError(f"{op}: expected {expected} blob(s), got {nblobs}")


# ---------------------------------------------------------------- pool -> worker


@dataclass(frozen=True, slots=True)
class Assign:
    """Give the worker its session; the context follows as one blob."""

    session: str
    run: str
    depth: int
    sub_model: str
    max_output_chars: int
    context_format: str
    rlm_error: ErrorInfo | None  # None: rlm_query is available; else what it raises
    handler: str | None = None  # a per-session handler address (else the worker's default)
    max_sub_calls: int | None = None  # per exec (else the worker's default)
    tools: tuple[str, ...] = ()  # host-side tools: functions of the namespace, answered by the client
    modules: tuple[str, ...] = ()  # imported into the namespace (a failure fails the load)

    OP: ClassVar[str] = "assign"

    def to_wire(self) -> Wire:
        return {"op": self.OP} | drop_none(
            {
                "session": self.session,
                "run": self.run,
                "depth": self.depth,
                "sub_model": self.sub_model,
                "max_output_chars": self.max_output_chars,
                "context_format": self.context_format,
                "rlm_error": self.rlm_error.to_wire() if self.rlm_error is not None else None,
                "handler": self.handler,
                "max_sub_calls": self.max_sub_calls,
                "tools": list(self.tools) or None,
                "modules": list(self.modules) or None,
            }
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> Assign:
        _fields(d, nblobs, 1, cls.OP)
        fmt = string(d, "context_format", None)
        if fmt not in CONTEXT_FORMATS:
            raise DecodeError(f"unknown context format {fmt!r}")
        return cls(
            session=string(d, "session", None),
            run=string(d, "run", None),
            depth=required(d, "depth", (int,), "an integer", None),
            sub_model=string(d, "sub_model", None),
            max_output_chars=required(d, "max_output_chars", (int,), "an integer", None),
            context_format=fmt,
            rlm_error=_opt_error(d, "rlm_error"),
            handler=opt_string(d, "handler", None),
            max_sub_calls=_opt_positive(d, "max_sub_calls"),
            tools=_names(d, "tools"),
            modules=_names(d, "modules"),
        )


def _names(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = d.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DecodeError(f"{key} must be a list of non-empty strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Exec:
    id: str
    code: str
    timeout_s: float  # the pool kills the worker at this deadline; bounds waits inside the code

    OP: ClassVar[str] = "exec"

    def to_wire(self) -> Wire:
        return {"op": self.OP, "id": self.id, "code": self.code, "timeout_s": self.timeout_s}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> Exec:
        _fields(d, nblobs, 0, cls.OP)
        timeout = required(d, "timeout_s", (int, float), "a number", None)
        return cls(string(d, "id", None), string(d, "code", None), float(timeout))


@dataclass(frozen=True, slots=True)
class RlmAnswer:
    """The answer to a worker's ``rlm_query``: the child run's text, or its error as it came.
    For a tool call, ``value`` is the tool's result."""

    id: str
    ok: bool
    text: str = ""
    error: ErrorInfo | None = None  # set when not ok
    value: Any = None

    OP: ClassVar[str] = "rlm_result"

    def to_wire(self) -> Wire:
        wire: Wire = {"op": self.OP, "id": self.id, "ok": self.ok, "text": self.text}
        if self.ok and self.value is not None:
            wire["value"] = self.value
        if not self.ok:
            error = self.error or ErrorInfo(ErrorCode.RLM_FAILED, "the child run failed")
            wire["error"] = error.to_wire()
        return wire

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> RlmAnswer:
        _fields(d, nblobs, 0, cls.OP)
        ok = required(d, "ok", (bool,), "a boolean", None)
        return cls(
            string(d, "id", None),
            ok,
            opt_string(d, "text", None) or "",
            None if ok else _error(d, "error"),
            d.get("value") if ok else None,
        )


FromPool = Assign | Exec | RlmAnswer
_FROM_POOL: dict[str, Callable[[Mapping[str, Any], int], FromPool]] = {
    Assign.OP: Assign.from_wire,
    Exec.OP: Exec.from_wire,
    RlmAnswer.OP: RlmAnswer.from_wire,
}


# ---------------------------------------------------------------- worker -> pool


@dataclass(frozen=True, slots=True)
class Ready:
    """Imports done, limits applied, privileges dropped: the worker can take a session."""

    pid: int  # os.getpid() of the code-running process, in its own pid namespace

    OP: ClassVar[str] = "ready"

    def to_wire(self) -> Wire:
        return {"op": self.OP, "pid": self.pid}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> Ready:
        _fields(d, nblobs, 0, cls.OP)
        pid = required(d, "pid", (int,), "an integer", None)
        if pid <= 0:
            raise DecodeError("pid must be positive")
        return cls(pid)


@dataclass(frozen=True, slots=True)
class Loaded:
    """The answer to ``Assign``: the context is loaded (``info``), or why not."""

    ok: bool
    info: SessionInfo | None = None
    error: ErrorInfo | None = None  # set when not ok

    OP: ClassVar[str] = "loaded"

    def to_wire(self) -> Wire:
        if self.ok and self.info is not None:
            return {"op": self.OP, "ok": True, "info": self.info.to_wire()}
        error = self.error or ErrorInfo(ErrorCode.INTERNAL, "the context was not loaded")
        return {"op": self.OP, "ok": False, "error": error.to_wire()}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> Loaded:
        _fields(d, nblobs, 0, cls.OP)
        if required(d, "ok", (bool,), "a boolean", None):
            return cls(True, SessionInfo.from_wire(d.get("info")))
        return cls(False, None, _error(d, "error"))


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    result: ExecResult

    OP: ClassVar[str] = "result"

    def to_wire(self) -> Wire:
        return {"op": self.OP, "id": self.id, "result": self.result.to_wire()}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> Result:
        _fields(d, nblobs, 0, cls.OP)
        return cls(string(d, "id", None), ExecResult.from_wire(d.get("result")))


@dataclass(frozen=True, slots=True)
class WorkerRlmQuery:
    """An ``rlm_query`` of the code, or with ``tool`` set a host-side tool call (no blob)."""

    id: str
    prompt: str
    context_format: str | None = None  # with one blob when set
    tool: str | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None

    OP: ClassVar[str] = "rlm_query"

    def to_wire(self) -> Wire:
        return {"op": self.OP} | drop_none(
            {
                "id": self.id,
                "prompt": self.prompt,
                "context_format": self.context_format,
                "tool": self.tool,
                "args": self.args,
                "kwargs": self.kwargs,
            }
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> WorkerRlmQuery:
        fmt = opt_string(d, "context_format", None)
        if fmt is not None and fmt not in CONTEXT_FORMATS:
            raise DecodeError(f"unknown context format {fmt!r}")
        _fields(d, nblobs, 1 if fmt is not None else 0, cls.OP)
        tool = opt_string(d, "tool", None)
        args = d.get("args")
        kwargs = d.get("kwargs")
        if args is not None and not isinstance(args, list):
            raise DecodeError("args must be a list")
        if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            raise DecodeError("kwargs must be a map with string keys")
        return cls(string(d, "id", None), string(d, "prompt", None), fmt, tool, args, kwargs)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    OP: ClassVar[str] = "hb"

    def to_wire(self) -> Wire:
        return {"op": self.OP}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], nblobs: int) -> Heartbeat:
        return cls()


FromWorker = Ready | Loaded | Result | WorkerRlmQuery | Heartbeat
_FROM_WORKER: dict[str, Callable[[Mapping[str, Any], int], FromWorker]] = {
    Ready.OP: Ready.from_wire,
    Loaded.OP: Loaded.from_wire,
    Result.OP: Result.from_wire,
    WorkerRlmQuery.OP: WorkerRlmQuery.from_wire,
    Heartbeat.OP: Heartbeat.from_wire,
}


def _decode(
    header: bytes | memoryview, nblobs: int, table: Mapping[str, Callable[..., Any]], max_bytes: int
) -> Any:
    obj = unpack(header, max_bytes=max_bytes)
    op = obj.get("op")
    parser = table.get(op) if isinstance(op, str) else None
    if parser is None:
        raise DecodeError(f"unknown or missing op {op!r}")
    return parser(obj, nblobs)


def decode_from_worker(header: bytes | memoryview, nblobs: int, *, max_bytes: int) -> FromWorker:
    message: FromWorker = _decode(header, nblobs, _FROM_WORKER, max_bytes)
    return message


def decode_from_pool(header: bytes | memoryview, nblobs: int) -> FromPool:
    message: FromPool = _decode(header, nblobs, _FROM_POOL, 1 << 40)
    return message

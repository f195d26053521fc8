"""Typed messages of the handler wire protocol, version 1 (docs/protocol.md).

Every request and reply is a frozen dataclass. ``to_wire`` gives the msgpack map; ``from_wire``
validates a decoded map once and raises ``DecodeError`` naming the field that is missing or
mistyped. Dicts do not travel past this module: code above it sees dataclasses only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import DecodeError, ErrorCode
from .fields import Wire, drop_none, opt_float, opt_int, opt_string, required, string

__all__ = [
    "PROTOCOL_VERSION",
    "ChatMessage",
    "CompleteReply",
    "CompleteRequest",
    "ErrorReply",
    "PingRequest",
    "PongReply",
    "Reply",
    "Request",
    "RunCloseRequest",
    "RunLimits",
    "RunOpenRequest",
    "RunUsage",
    "RunUsageReply",
    "StatsReply",
    "StatsRequest",
    "Usage",
    "UsageRequest",
]

PROTOCOL_VERSION = 1

T = TypeVar("T")


# ---------------------------------------------------------------- shared values


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str

    ROLES: ClassVar[frozenset[str]] = frozenset({"system", "user", "assistant"})

    def to_wire(self) -> Wire:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_wire(cls, d: Any, rid: str | None, index: int) -> ChatMessage:
        if not isinstance(d, Mapping):
            raise DecodeError(f"messages[{index}] must be a map", request_id=rid)
        role = required(d, "role", (str,), "a string", rid)
        content = required(d, "content", (str,), "a string", rid)
        if role not in cls.ROLES:
            raise DecodeError(
                f"messages[{index}].role must be one of system, user, assistant; got {role!r}",
                request_id=rid,
            )
        return cls(role, content)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one call. ``input_tokens`` counts every prompt token, cached ones included;
    ``cache_read_tokens`` and ``cache_write_tokens`` are the parts of it read from or written to
    the provider's prompt cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def to_wire(self) -> Wire:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
        }

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> Usage:
        if not isinstance(d, Mapping):
            raise DecodeError("usage must be a map", request_id=rid)
        return cls(
            input_tokens=opt_int(d, "input_tokens", rid) or 0,
            output_tokens=opt_int(d, "output_tokens", rid) or 0,
            cache_read_tokens=opt_int(d, "cache_read_tokens", rid) or 0,
            cache_write_tokens=opt_int(d, "cache_write_tokens", rid) or 0,
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )


@dataclass(frozen=True, slots=True)
class RunLimits:
    """Hard limits of a run; ``None`` means unlimited. ``deadline_s`` counts from ``run_open``."""

    max_calls: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_cost_usd: float | None = None
    deadline_s: float | None = None

    def to_wire(self) -> Wire:
        return drop_none(
            {
                "max_calls": self.max_calls,
                "max_input_tokens": self.max_input_tokens,
                "max_output_tokens": self.max_output_tokens,
                "max_cost_usd": self.max_cost_usd,
                "deadline_s": self.deadline_s,
            }
        )

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> RunLimits:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise DecodeError("limits must be a map", request_id=rid)
        unknown = set(d) - {
            "max_calls",
            "max_input_tokens",
            "max_output_tokens",
            "max_cost_usd",
            "deadline_s",
        }
        if unknown:
            raise DecodeError(f"unknown limit(s): {', '.join(sorted(map(str, unknown)))}", request_id=rid)
        return cls(
            max_calls=opt_int(d, "max_calls", rid),
            max_input_tokens=opt_int(d, "max_input_tokens", rid),
            max_output_tokens=opt_int(d, "max_output_tokens", rid),
            max_cost_usd=opt_float(d, "max_cost_usd", rid),
            deadline_s=opt_float(d, "deadline_s", rid),
        )


@dataclass(frozen=True, slots=True)
class RunUsage:
    """What a run has spent so far, as the handler counted it."""

    run: str
    calls: int
    cached_calls: int
    failed_calls: int
    usage: Usage
    cost_usd: float
    elapsed_s: float
    limits: RunLimits
    closed: bool
    exceeded: str | None = None  # the first limit that refused a call, if any
    in_flight: int = 0

    def to_wire(self) -> Wire:
        return {
            "run": self.run,
            "calls": self.calls,
            "cached_calls": self.cached_calls,
            "failed_calls": self.failed_calls,
            "usage": self.usage.to_wire(),
            "cost_usd": self.cost_usd,
            "elapsed_s": self.elapsed_s,
            "limits": self.limits.to_wire(),
            "closed": self.closed,
            "exceeded": self.exceeded,
            "in_flight": self.in_flight,
        }

    @classmethod
    def from_wire(cls, d: Any, rid: str | None = None) -> RunUsage:
        if not isinstance(d, Mapping):
            raise DecodeError("run usage must be a map", request_id=rid)
        return cls(
            run=string(d, "run", rid),
            calls=opt_int(d, "calls", rid) or 0,
            cached_calls=opt_int(d, "cached_calls", rid) or 0,
            failed_calls=opt_int(d, "failed_calls", rid) or 0,
            usage=Usage.from_wire(d.get("usage", {}), rid),
            cost_usd=opt_float(d, "cost_usd", rid) or 0.0,
            elapsed_s=opt_float(d, "elapsed_s", rid) or 0.0,
            limits=RunLimits.from_wire(d.get("limits"), rid),
            closed=bool(d.get("closed", False)),
            exceeded=opt_string(d, "exceeded", rid),
            in_flight=opt_int(d, "in_flight", rid) or 0,
        )


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    id: str
    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    timeout_s: float | None = None
    run: str | None = None
    depth: int = 0
    # The run's key, when the run was opened with one: a run with a key is spent only by
    # callers that show it (docs/protocol.md, "Run keys").
    key: str | None = None
    # W3C traceparent of the caller's span (rlmq.protocol.tracing); absent when tracing is off.
    trace: str | None = None

    OP: ClassVar[str] = "complete"

    def to_wire(self) -> Wire:
        return drop_none(
            {
                "v": PROTOCOL_VERSION,
                "op": self.OP,
                "id": self.id,
                "model": self.model,
                "messages": [m.to_wire() for m in self.messages],
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "timeout_s": self.timeout_s,
                "run": self.run,
                "depth": self.depth,
                "key": self.key,
                "trace": self.trace,
            }
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str) -> CompleteRequest:
        fast = _complete_fast(d, rid)
        if fast is not None:
            return fast
        model = string(d, "model", rid)
        raw = d.get("messages")
        if raw is None:
            prompt = d.get("prompt")
            if prompt is None:
                raise DecodeError("complete needs 'messages' or 'prompt'", request_id=rid)
            if not isinstance(prompt, str):
                raise DecodeError("field 'prompt' must be a string", request_id=rid)
            messages: tuple[ChatMessage, ...] = (ChatMessage("user", prompt),)
        else:
            if not isinstance(raw, list | tuple):
                raise DecodeError("field 'messages' must be a list", request_id=rid)
            messages = tuple(ChatMessage.from_wire(m, rid, i) for i, m in enumerate(raw))
            if not messages:
                raise DecodeError("field 'messages' must not be empty", request_id=rid)
        max_tokens = opt_int(d, "max_tokens", rid, minimum=1)
        return cls(
            id=rid,
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=opt_float(d, "temperature", rid),
            timeout_s=opt_float(d, "timeout_s", rid),
            run=opt_string(d, "run", rid),
            depth=opt_int(d, "depth", rid) or 0,
            key=opt_string(d, "key", rid),
            trace=_trace(d, rid),
        )


# A W3C traceparent is 55 characters; later versions may append fields. Anything longer is refused.
MAX_TRACE_CHARS = 512


def _trace(d: Mapping[str, Any], rid: str) -> str | None:
    trace = opt_string(d, "trace", rid)
    if trace is not None and not 0 < len(trace) <= MAX_TRACE_CHARS:
        raise DecodeError(f"field 'trace' must be 1 to {MAX_TRACE_CHARS} characters", request_id=rid)
    return trace


# The hot path of the handler decodes one CompleteRequest per model call. These build one
# without the frozen dataclass's per-field ``object.__setattr__`` detour, from values the fast
# validator below has already checked; the result is the same immutable object.
_new = object.__new__
_set_role = ChatMessage.__dict__["role"].__set__
_set_content = ChatMessage.__dict__["content"].__set__
# In field order (the order of __slots__), which _complete_fast unpacks.
_CR_SETTERS = tuple(CompleteRequest.__dict__[name].__set__ for name in CompleteRequest.__slots__)
_ROLES = ChatMessage.ROLES


def _chat(role: str, content: str) -> ChatMessage:
    m: ChatMessage = _new(ChatMessage)
    _set_role(m, role)
    _set_content(m, content)
    return m


def _complete_fast(d: Mapping[str, Any], rid: str) -> CompleteRequest | None:
    """The common, well-formed ``complete``: every field of exactly its type and in range.

    Returns None for anything else, and the field readers of ``from_wire`` then say precisely
    what is wrong; so this shortcut never changes what is accepted or the error a client sees.
    """
    get = d.get
    model = get("model")
    if type(model) is not str:
        return None
    raw = get("messages")
    if raw is None:
        prompt = get("prompt")
        if type(prompt) is not str:
            return None
        messages: tuple[ChatMessage, ...] = (_chat("user", prompt),)
    else:
        if type(raw) is not list or not raw:
            return None
        out = []
        for m in raw:
            if type(m) is not dict:
                return None
            role = m.get("role")
            content = m.get("content")
            if type(role) is not str or role not in _ROLES or type(content) is not str:
                return None
            out.append(_chat(role, content))
        messages = tuple(out)
    max_tokens = get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        return None
    temperature = get("temperature")
    if temperature is not None:
        kind = type(temperature)
        if (kind is not float and kind is not int) or temperature < 0:
            return None
        temperature = float(temperature)
    timeout_s = get("timeout_s")
    if timeout_s is not None:
        kind = type(timeout_s)
        if (kind is not float and kind is not int) or timeout_s < 0:
            return None
        timeout_s = float(timeout_s)
    run = get("run")
    if run is not None and type(run) is not str:
        return None
    depth = get("depth")
    if depth is None:
        depth = 0
    elif type(depth) is not int or depth < 0:
        return None
    key = get("key")
    if key is not None and type(key) is not str:
        return None
    trace = get("trace")
    if trace is not None and (type(trace) is not str or not 0 < len(trace) <= MAX_TRACE_CHARS):
        return None  # the full decoder says what is wrong
    req: CompleteRequest = _new(CompleteRequest)
    s_id, s_model, s_messages, s_max_tokens, s_temperature, s_timeout_s, s_run, s_depth, s_key, s_trace = (
        _CR_SETTERS
    )
    s_id(req, rid)
    s_model(req, model)
    s_messages(req, messages)
    s_max_tokens(req, max_tokens)
    s_temperature(req, temperature)
    s_timeout_s(req, timeout_s)
    s_run(req, run)
    s_depth(req, depth)
    s_key(req, key)
    s_trace(req, trace)
    return req


@dataclass(frozen=True, slots=True)
class _IdOnly:
    id: str

    OP: ClassVar[str] = ""

    def to_wire(self) -> Wire:
        return {"v": PROTOCOL_VERSION, "op": self.OP, "id": self.id}

    @classmethod
    def from_wire(cls: type[T], d: Mapping[str, Any], rid: str) -> T:
        return cls(rid)  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class PingRequest(_IdOnly):
    OP: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class StatsRequest(_IdOnly):
    OP: ClassVar[str] = "stats"


@dataclass(frozen=True, slots=True)
class RunOpenRequest:
    id: str
    run: str
    limits: RunLimits = field(default_factory=RunLimits)
    # A secret chosen by the opener: the run is then spent, reopened and closed only by callers
    # that show it. Without one the run is shared by every client that names it.
    key: str | None = None

    OP: ClassVar[str] = "run_open"

    def to_wire(self) -> Wire:
        wire: Wire = {
            "v": PROTOCOL_VERSION,
            "op": self.OP,
            "id": self.id,
            "run": self.run,
            "limits": self.limits.to_wire(),
        }
        if self.key is not None:
            wire["key"] = self.key
        return wire

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str) -> RunOpenRequest:
        key = opt_string(d, "key", rid)
        if key is not None and not key:
            raise DecodeError("field 'key' must not be empty", request_id=rid)
        return cls(rid, string(d, "run", rid), RunLimits.from_wire(d.get("limits"), rid), key)


@dataclass(frozen=True, slots=True)
class _RunOnly:
    id: str
    run: str

    OP: ClassVar[str] = ""

    def to_wire(self) -> Wire:
        return {"v": PROTOCOL_VERSION, "op": self.OP, "id": self.id, "run": self.run}

    @classmethod
    def from_wire(cls: type[T], d: Mapping[str, Any], rid: str) -> T:
        return cls(rid, string(d, "run", rid))  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class RunCloseRequest:
    id: str
    run: str
    key: str | None = None  # the run's key, when it was opened with one

    OP: ClassVar[str] = "run_close"

    def to_wire(self) -> Wire:
        wire = {"v": PROTOCOL_VERSION, "op": self.OP, "id": self.id, "run": self.run}
        return wire | drop_none({"key": self.key})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], rid: str) -> RunCloseRequest:
        return cls(rid, string(d, "run", rid), opt_string(d, "key", rid))


@dataclass(frozen=True, slots=True)
class UsageRequest(_RunOnly):
    OP: ClassVar[str] = "usage"


Request = CompleteRequest | PingRequest | StatsRequest | RunOpenRequest | RunCloseRequest | UsageRequest

REQUEST_TYPES: dict[str, Callable[[Mapping[str, Any], str], Request]] = {
    CompleteRequest.OP: CompleteRequest.from_wire,
    PingRequest.OP: PingRequest.from_wire,
    StatsRequest.OP: StatsRequest.from_wire,
    RunOpenRequest.OP: RunOpenRequest.from_wire,
    RunCloseRequest.OP: RunCloseRequest.from_wire,
    UsageRequest.OP: UsageRequest.from_wire,
}


# ---------------------------------------------------------------- replies


def _ok(rid: str, body: Wire) -> Wire:
    return {"v": PROTOCOL_VERSION, "id": rid, "ok": True, **body}


@dataclass(frozen=True, slots=True)
class CompleteReply:
    id: str
    text: str
    model: str
    usage: Usage
    cached: bool = False
    retries: int = 0
    latency_ms: float = 0.0
    stop_reason: str | None = None
    # The handler answered a re-sent request id whose call had already finished, from the reply it
    # kept: nothing was sent or counted again (added within version 1; sent only when true).
    replayed: bool = False
    # What the handler charged the run for this call, in USD, by the model's configured prices
    # (added within version 1; sent only when not 0: no prices, a cached or a replayed answer).
    cost_usd: float = 0.0

    def to_wire(self) -> Wire:
        body: Wire = {
            "text": self.text,
            "model": self.model,
            "usage": self.usage.to_wire(),
            "cached": self.cached,
            "retries": self.retries,
            "latency_ms": self.latency_ms,
            "stop_reason": self.stop_reason,
        }
        if self.cost_usd:
            body["cost_usd"] = self.cost_usd
        if self.replayed:
            body["replayed"] = True
        return _ok(self.id, body)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> CompleteReply:
        rid = string(d, "id", None)
        return cls(
            id=rid,
            text=string(d, "text", rid),
            model=string(d, "model", rid),
            usage=Usage.from_wire(d.get("usage", {}), rid),
            cached=bool(d.get("cached", False)),
            retries=opt_int(d, "retries", rid) or 0,
            latency_ms=opt_float(d, "latency_ms", rid) or 0.0,
            stop_reason=opt_string(d, "stop_reason", rid),
            replayed=d.get("replayed", False) is True,
            cost_usd=opt_float(d, "cost_usd", rid) or 0.0,
        )


@dataclass(frozen=True, slots=True)
class PongReply:
    id: str
    server: str = "rlmq-lmhandler"
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    models: tuple[str, ...] = ()
    # alias -> prompt tokens the model reads at most (added in 1; absent from older handlers)
    context_windows: Mapping[str, int] = field(default_factory=dict)

    def to_wire(self) -> Wire:
        body: Wire = {"server": self.server, "versions": list(self.versions), "models": list(self.models)}
        if self.context_windows:
            body["context_windows"] = dict(self.context_windows)
        return _ok(self.id, body)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> PongReply:
        rid = string(d, "id", None)
        raw = d.get("context_windows")
        windows = (
            {str(k): v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}
            if isinstance(raw, Mapping)
            else {}
        )
        return cls(
            id=rid,
            server=str(d.get("server", "")),
            versions=tuple(int(v) for v in d.get("versions", ())),
            models=tuple(str(m) for m in d.get("models", ())),
            context_windows=windows,
        )


@dataclass(frozen=True, slots=True)
class StatsReply:
    """Counters are an open-ended tree of numbers; documented in docs/protocol.md."""

    id: str
    stats: Mapping[str, Any]

    def to_wire(self) -> Wire:
        return _ok(self.id, {"stats": dict(self.stats)})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> StatsReply:
        rid = string(d, "id", None)
        stats = required(d, "stats", (dict,), "a map", rid)
        return cls(rid, stats)


@dataclass(frozen=True, slots=True)
class RunUsageReply:
    """Reply to run_open, run_close and usage."""

    id: str
    run: RunUsage

    def to_wire(self) -> Wire:
        return _ok(self.id, {"run": self.run.to_wire()})

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> RunUsageReply:
        rid = string(d, "id", None)
        return cls(rid, RunUsage.from_wire(d.get("run"), rid))


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: str | None
    code: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None

    def to_wire(self) -> Wire:
        error: Wire = {"code": str(self.code), "message": self.message, "retryable": self.retryable}
        if self.retry_after_s is not None:
            error["retry_after_s"] = self.retry_after_s
        return {"v": PROTOCOL_VERSION, "id": self.id, "ok": False, "error": error}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ErrorReply:
        rid = d.get("id")
        error = d.get("error")
        if not isinstance(error, Mapping):
            raise DecodeError("error reply without an 'error' map")
        return cls(
            id=rid if isinstance(rid, str) else None,
            code=str(error.get("code", ErrorCode.INTERNAL)),
            message=str(error.get("message", "")),
            retryable=bool(error.get("retryable", False)),
            retry_after_s=opt_float(error, "retry_after_s", None),
        )


Reply = CompleteReply | PongReply | StatsReply | RunUsageReply | ErrorReply

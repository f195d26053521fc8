"""Sub-call records and replay answers of one exec, between the relay thread and the pool's loop.

    relay thread (relay.py)                         pool event loop (sessions.py)
    request(rid, stamped request) -> answer | None  drain()  -> records ready, in seq order
    reply(payload)                                  finish() -> the rest, calls never answered too
          records, in seq order -> outbox -- a wakeup, then drains every 5 ms --> ``sub_calls``

The relay thread makes every record from what it saw itself (the stamped request, the handler's
reply), so the model's code cannot forge one. A record leaves the outbox only after every record
of a lower ``seq``, so a caller gets them in order of issue. The relay hands a reply to the
recording before it forwards it to the worker, so every record of an exec is in the outbox before
the worker can send that exec's result; ``finish`` (on the loop, before the exec's reply is sent)
takes the rest. One lock guards the state both sides touch; the loop holds it only to swap lists.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rlmq.protocol import pack, peek_id, unpack
from rlmq.protocol.errors import DecodeError, ErrorCode, ErrorInfo
from rlmq.protocol.messages import CompleteReply, ErrorReply, Usage
from rlmq.protocol.sandbox import Replay, SubCall, prompt_sha256

__all__ = ["ExecRecording", "cut_prompt", "request_messages"]

_NO_USAGE = Usage()
# Replies are decoded only for their record; the relay already bounds what a peer may send.
_MAX_REPLY_BYTES = 1 << 30


def request_messages(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A complete request's messages as (role, content) pairs, as the handler reads them (a plain
    ``prompt`` is one user message). Malformed entries are skipped: the handler refuses such a
    request, and the record shows its error."""
    raw = obj.get("messages")
    if raw is None:
        prompt = obj.get("prompt")
        return [("user", prompt)] if isinstance(prompt, str) else []
    if not isinstance(raw, list):
        return []
    return [
        (m["role"], m["content"])
        for m in raw
        if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    ]


def prompt_text(messages: list[tuple[str, str]]) -> str:
    """The prompt a record shows: the user messages' content, joined by blank lines (every
    message's, when none is a user's)."""
    user = [content for role, content in messages if role == "user"]
    return "\n\n".join(user if user else [content for _, content in messages])


def cut_prompt(text: str, record_chars: int | None) -> tuple[str, str | None]:
    """``(prompt, prompt_tail)``: the whole text, or past ``record_chars`` its head and tail of
    ``record_chars // 2`` characters each."""
    if record_chars is None or len(text) <= record_chars:
        return text, None
    half = record_chars // 2
    return text[:half], text[len(text) - half :] if half else ""


@dataclass(slots=True)
class _Call:
    """A sub-call sent on and not answered yet."""

    seq: int
    model: str
    text: str
    sha: str
    started: float
    diverged: bool


@dataclass(frozen=True, slots=True)
class _Answer:
    text: str | None
    usage: Usage
    cost_usd: float
    cached: bool
    error: ErrorInfo | None


def _tokens(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key, 0)
    return value if type(value) is int and value >= 0 else 0


def _cost(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else 0.0


def _parse_reply(obj: Mapping[str, Any]) -> _Answer:
    """The record's part of a handler reply; a malformed one is recorded as an ``internal`` error.
    Lenient where the worker's client is strict: the record shows what came, the worker decides."""
    if obj.get("ok") is True:
        text = obj.get("text")
        raw = obj.get("usage")
        usage = raw if isinstance(raw, dict) else {}
        return _Answer(
            text if isinstance(text, str) else "",
            Usage(
                _tokens(usage, "input_tokens"),
                _tokens(usage, "output_tokens"),
                _tokens(usage, "cache_read_tokens"),
                _tokens(usage, "cache_write_tokens"),
            ),
            _cost(obj.get("cost_usd")),
            obj.get("cached") is True,
            None,
        )
    try:
        error = ErrorInfo.from_wire(obj.get("error"))
    except DecodeError as exc:
        error = ErrorInfo(ErrorCode.INTERNAL, f"malformed error reply: {exc.message}")
    return _Answer(None, _NO_USAGE, 0.0, False, error)


def _replay_answer(rid: str, model: str, recorded: SubCall) -> bytes:
    """The reply the handler gave the recorded call, under this request's id."""
    if recorded.error is not None:
        e = recorded.error
        return pack(ErrorReply(rid, e.code, e.message, e.retryable, e.retry_after_s).to_wire())
    wire = CompleteReply(rid, recorded.text or "", model, recorded.usage, recorded.cached).to_wire()
    wire["replayed"] = True
    return pack(wire)


class ExecRecording:
    """The records of one exec's sub-calls and, with a ``replay``, their answers.

    ``request`` and ``reply`` run on the relay thread; ``drain`` and ``finish`` on the pool's loop.
    ``wake`` (called from the relay thread) is how the loop learns that records wait: when the
    outbox turns non-empty while the loop is not draining already (see ``drain``).
    ``record_chars`` None keeps no records (a replay without records still answers)."""

    def __init__(
        self,
        *,
        depth: int,
        record_chars: int | None,
        replay: Replay | None = None,
        wake: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.depth = depth
        self.record_chars = record_chars
        self._keep = record_chars is not None
        self._replay = None if replay is None else {c.seq: c for c in replay.calls}
        self._live = replay is not None and replay.live
        self._wake = wake
        self._clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self._seq = 0
        self._open: dict[str, _Call] = {}  # request id -> the call, until its reply
        self._done: dict[int, SubCall] = {}  # records waiting for a lower seq
        self._next = 0  # the seq the outbox takes next
        self._outbox: list[SubCall] = []
        self._woken = False
        self._finished = False
        self.replayed = 0
        self.diverged = 0

    # ------------------------------------------------------------ relay thread

    def request(self, rid: str, obj: Mapping[str, Any]) -> bytes | None:
        """Note a stamped ``complete``; returns the reply to send the worker instead of sending
        the request on (a replayed answer, or ``not_recorded``), or None to send it."""
        now = self._clock()
        messages = request_messages(obj)
        sha = prompt_sha256(messages)
        model = obj.get("model")
        call = _Call(0, model if isinstance(model, str) else "", prompt_text(messages), sha, now, False)
        with self._lock:
            if self._finished:  # a straggler of an exec that has ended: not this exec's
                return None
            call.seq = self._seq
            self._seq += 1
            if self._replay is None:
                self._open[rid] = call
                return None
            recorded = self._replay.get(call.seq)
            if recorded is not None and recorded.prompt_sha256 == sha:
                self.replayed += 1
                given = _Answer(
                    recorded.text, recorded.usage, recorded.cost_usd, recorded.cached, recorded.error
                )
                wake = self._release(self._record(call, given, now, replayed=True))
                answer = _replay_answer(rid, call.model, recorded)
            else:
                # Past the end of a live replay (a cut block going on): a plain live call. A call
                # whose prompt differs from its record diverged, live or not.
                call.diverged = recorded is not None or not self._live
                self.diverged += call.diverged
                if self._live:
                    self._open[rid] = call
                    return None
                error = ErrorInfo(
                    ErrorCode.NOT_RECORDED,
                    f"sub-call {call.seq} of this exec has no recorded answer"
                    + ("" if recorded is None else " (its prompt differs from the recorded one)"),
                )
                wake = self._release(self._record(call, _Answer(None, _NO_USAGE, 0.0, False, error), now))
                answer = pack(ErrorReply(rid, error.code, error.message).to_wire())
        if wake:
            self._signal()
        return answer

    def reply(self, payload: bytes | memoryview) -> None:
        """Record the handler's reply to one of this exec's calls. Anything else (a ping's
        reply, a second reply to a re-sent request) is ignored: the first reply wins."""
        now = self._clock()
        try:
            obj = unpack(payload, max_bytes=_MAX_REPLY_BYTES)
        except DecodeError:
            obj = {"id": peek_id(payload)}  # unreadable: recorded as such, if it is one of ours
        rid = obj.get("id")
        if not isinstance(rid, str) or rid not in self._open:  # unlocked peek: settled below
            return
        answer = _parse_reply(obj)
        with self._lock:
            call = self._open.pop(rid, None)
            if call is None or self._finished:
                return
            wake = self._release(self._record(call, answer, now))
        if wake:
            self._signal()

    def _record(self, call: _Call, answer: _Answer, now: float, *, replayed: bool = False) -> SubCall:
        head, tail = cut_prompt(call.text, self.record_chars)
        return SubCall(
            seq=call.seq,
            model=call.model,
            depth=self.depth,
            prompt=head,
            prompt_tail=tail,
            prompt_chars=len(call.text),
            prompt_sha256=call.sha,
            text=answer.text if answer.error is None else None,
            usage=answer.usage,
            cost_usd=answer.cost_usd,
            cached=answer.cached,
            error=answer.error,
            started_ms=round((call.started - self.started) * 1000.0, 3),
            latency_ms=round((now - call.started) * 1000.0, 3),
            replayed=replayed,
            diverged=call.diverged,
        )

    def _release(self, record: SubCall) -> bool:
        """Under the lock: file the record, move what is now in order to the outbox; True when the
        loop must be woken."""
        if not self._keep:
            return False
        self._done[record.seq] = record
        while self._next in self._done:
            self._outbox.append(self._done.pop(self._next))
            self._next += 1
        if self._outbox and not self._woken:
            self._woken = True
            return True
        return False

    def _signal(self) -> None:
        if self._wake is not None:
            # RuntimeError: the loop is closed, the pool is stopping: nobody to tell.
            with contextlib.suppress(RuntimeError):
                self._wake()

    # ------------------------------------------------------------ pool loop

    def drain(self) -> list[SubCall]:
        """The records ready to send, in seq order. The loop calls it again soon after it got
        some (more tend to follow); an empty drain re-arms the wakeup, so a burst of records costs
        a few drains, not one wakeup each."""
        with self._lock:
            out, self._outbox = self._outbox, []
            if not out:
                self._woken = False
            return out

    def finish(self, reason: str = "the exec ended before the handler answered") -> list[SubCall]:
        """End the exec: every record not sent yet, in seq order, calls still unanswered among
        them (as ``timeout`` errors). Later replies and requests are ignored."""
        now = self._clock()
        with self._lock:
            self._finished = True
            if self._keep:
                unanswered = _Answer(None, _NO_USAGE, 0.0, False, ErrorInfo(ErrorCode.TIMEOUT, reason, True))
                for call in self._open.values():
                    self._done[call.seq] = self._record(call, unanswered, now)
                self._outbox.extend(self._done[seq] for seq in sorted(self._done))
                self._done.clear()
            self._open.clear()
            out, self._outbox = self._outbox, []
            self._woken = False
            return out

    @property
    def calls(self) -> int:
        """Sub-calls noted so far."""
        return self._seq

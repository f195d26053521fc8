"""Bytes <-> typed messages. Knows msgpack, size limits and versions; knows nothing of sockets.

A ZeroMQ message is ``[envelope frames..., payload]``; the payload is one msgpack map. Servers
echo the envelope unchanged so ROUTER/DEALER and ROUTER/REQ both work (see ``split_envelope``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from .errors import DecodeError, MessageTooLarge, UnknownOp, UnsupportedVersion
from .messages import (
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    CompleteReply,
    ErrorReply,
    PongReply,
    Reply,
    Request,
    RunUsageReply,
    StatsReply,
    Usage,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SUPPORTED_VERSIONS",
    "decode_reply",
    "decode_request",
    "encode",
    "encode_complete_reply",
    "pack",
    "peek_id",
    "split_envelope",
    "unpack",
]

# 64 MiB: room for a 10M-token context (about 40 MB of text) in one frame, with headroom.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})


_packb = msgpack.packb


def pack(obj: Mapping[str, Any]) -> bytes:
    """msgpack with str as str and bytes as bin: the only encoding rlmq writes."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(payload: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode one payload into a map, or raise a typed error. Never returns anything but a dict."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(
            f"message of {len(payload)} bytes is over the limit of {max_bytes} bytes",
            request_id=peek_id(payload),
        )
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise DecodeError(f"payload is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"payload must be a msgpack map, got {type(obj).__name__}")
    return obj


def peek_id(payload: bytes | memoryview) -> str | None:
    """Read only the ``id`` of a map payload, skipping every other value without building it.

    Used for payloads too large to decode, so that even a ``too_large`` reply carries the id.
    """
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(payload) + 1)
        unpacker.feed(payload)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "id":
                value = unpacker.unpack()
                return value if isinstance(value, str) else None
            unpacker.skip()
    except Exception:  # garbage input: msgpack raises several unrelated types; no id is the answer
        return None
    return None


def encode(message: Request | Reply) -> bytes:
    """A typed message to its payload frame."""
    return pack(message.to_wire())


# ASCII texts at least this long are packed into a buffer sized for them up front, and the frame
# is a view of that buffer: packb grows its buffer by reallocation and copies the result once more
# (10 MB: 2.4 ms with packb, 0.7 ms this way). 64 KiB is where ZeroMQ stops copying what it sends.
LARGE_REPLY_CHARS = 1 << 16
_Packer: Any = msgpack.Packer
try:  # the compiled Packer takes buf_size; msgpack's pure-Python fallback does not
    _Packer(buf_size=16)
    _PRESIZED = True
except TypeError:
    _PRESIZED = False


def encode_complete_reply(
    rid: str,
    text: str,
    model: str,
    usage: Usage,
    *,
    cached: bool,
    retries: int,
    latency_ms: float,
    stop_reason: str | None,
    cost_usd: float = 0.0,
) -> bytes | memoryview:
    """``encode(CompleteReply(...))`` without building the dataclass and its nested maps first:
    the handler sends one of these per model call. Same bytes (a test keeps it so); a view of
    them for texts of ``LARGE_REPLY_CHARS`` or more."""
    wire = {
        "v": PROTOCOL_VERSION,
        "id": rid,
        "ok": True,
        "text": text,
        "model": model,
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_read_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "cached": cached,
        "retries": retries,
        "latency_ms": latency_ms,
        "stop_reason": stop_reason,
    }
    if cost_usd:
        wire["cost_usd"] = cost_usd
    if len(text) < LARGE_REPLY_CHARS or not _PRESIZED or not text.isascii():  # isascii: a flag
        data: bytes = _packb(wire, use_bin_type=True)
        return data
    # ASCII text is as long in UTF-8; the rest of the map is small.
    packer = _Packer(use_bin_type=True, autoreset=False, buf_size=len(text) + 4096)
    packer.pack(wire)
    view: memoryview = packer.getbuffer()  # keeps the packer's buffer alive while referenced
    return view


def decode_request(payload: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """Payload frame to a validated request; raises a ``ProtocolError`` subclass otherwise."""
    obj = unpack(payload, max_bytes=max_bytes)
    rid = obj.get("id")
    if type(rid) is not str:
        raise DecodeError("missing or non-string field 'id'")
    version = obj.get("v")
    if type(version) is not int:  # bool is not a version, and msgpack makes no int subclasses
        raise DecodeError("missing or non-integer field 'v'", request_id=rid)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"protocol version {version} is not supported; this server speaks {sorted(SUPPORTED_VERSIONS)}",
            request_id=rid,
        )
    op = obj.get("op")
    if type(op) is not str:
        raise DecodeError("missing or non-string field 'op'", request_id=rid)
    parser = REQUEST_TYPES.get(op)
    if parser is None:
        raise UnknownOp(f"unknown op {op!r}; known: {', '.join(sorted(REQUEST_TYPES))}", request_id=rid)
    return parser(obj, rid)


_REPLY_TYPES: dict[str, Callable[[Mapping[str, Any]], Reply]] = {
    "complete": CompleteReply.from_wire,
    "ping": PongReply.from_wire,
    "stats": StatsReply.from_wire,
    "run_open": RunUsageReply.from_wire,
    "run_close": RunUsageReply.from_wire,
    "usage": RunUsageReply.from_wire,
}


def decode_reply(obj: Mapping[str, Any], op: str) -> Reply:
    """A decoded reply map, for a request of ``op``, to its typed reply."""
    if obj.get("ok") is True:
        return _REPLY_TYPES[op](obj)
    return ErrorReply.from_wire(obj)


def split_envelope(frames: Sequence[Any]) -> tuple[list[Any], Any]:
    """``[envelope..., payload]`` to ``(envelope, payload)``; the envelope is echoed verbatim."""
    if not frames:
        raise DecodeError("empty message")
    return list(frames[:-1]), frames[-1]

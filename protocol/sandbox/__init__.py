"""The sandbox session protocol, version 1: orchestrator <-> pool (docs/protocol.md, "Sandbox
session protocol").

    context.py    how a session's ``context`` travels as one blob frame, and is read back
    messages.py   typed requests, replies and results, and the decoder of requests
    client.py     ``AsyncSandboxClient`` and ``Session``, the orchestrator's side (sockets)

The client lives in ``protocol``, not in ``sandbox``, because the orchestrator may import only
``protocol``. Error codes are the one registry, ``rlmq.protocol.errors.ErrorCode``; the field
readers are ``rlmq.protocol.fields``, shared with the handler protocol.
"""

from .client import AsyncSandboxClient, RlmCallback, SandboxError, Session, SubCallCallback, ToolCallback
from .context import CONTEXT_FORMATS, ContextFormat, context_shape, decode_context, encode_context
from .messages import (
    EXEC_ERROR_CODES,
    MAX_HEADER_BYTES,
    SANDBOX_PROTOCOL_VERSION,
    SANDBOX_REQUEST_TYPES,
    CloseReply,
    CloseRequest,
    ExecError,
    ExecReply,
    ExecRequest,
    ExecResult,
    OpenReply,
    OpenRequest,
    Replay,
    RlmQuery,
    RlmResult,
    SandboxPing,
    SandboxPong,
    SandboxRequest,
    SandboxStats,
    SandboxStatsReply,
    SessionInfo,
    SubCall,
    SubCallsNotice,
    decode_sandbox_request,
    prompt_sha256,
    split_delimited,
)

__all__ = [
    "CONTEXT_FORMATS",
    "EXEC_ERROR_CODES",
    "MAX_HEADER_BYTES",
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
    "Replay",
    "RlmCallback",
    "RlmQuery",
    "RlmResult",
    "SandboxError",
    "SandboxPing",
    "SandboxPong",
    "SandboxRequest",
    "SandboxStats",
    "SandboxStatsReply",
    "Session",
    "SessionInfo",
    "SubCall",
    "SubCallCallback",
    "SubCallsNotice",
    "ToolCallback",
    "context_shape",
    "decode_context",
    "decode_sandbox_request",
    "encode_context",
    "prompt_sha256",
    "split_delimited",
]

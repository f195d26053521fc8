"""What each provider's HTTP API looks like to a client: paths, the bodies it accepts, its errors.

Pure functions of a request body or a status; the server (``server.py``) decides which to send.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

from aiohttp import web

__all__ = [
    "ANTHROPIC_PATH",
    "OPENAI_PATH",
    "STATS_PATH",
    "Api",
    "block_text",
    "check_anthropic_body",
    "check_openai_body",
    "error_response",
    "fmt_seconds",
    "malformed_response",
    "tokens",
]

ANTHROPIC_PATH: Final = "/v1/messages"
OPENAI_PATH: Final = "/v1/chat/completions"
STATS_PATH: Final = "/stats"

Api = Literal["anthropic", "openai"]


def tokens(chars: int) -> int:
    """The fake's token estimate: four characters a token, rounded up."""
    return math.ceil(chars / 4)


def block_text(content: Any) -> str:
    """The text of a message content: a string, or the text blocks of a block list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            b.get("text", "") for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return ""


def check_anthropic_body(body: Any) -> str | None:
    """Why the Messages API would refuse this body (400), or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: field required, an integer of at least 1"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        return "system: must be a string or a list of text blocks"
    if isinstance(system, list) and not all(isinstance(b, dict) for b in system):
        return "system: must be a list of text blocks"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: must be 'user' or 'assistant'"
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(b, dict) for b in content):
                return f"messages.{i}.content: must be a list of content blocks"
        elif not isinstance(content, str):
            return f"messages.{i}.content: must be a string or a list of content blocks"
    return None


def check_openai_body(body: Any) -> str | None:
    """Why chat completions would refuse this body (400), or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: a non-empty array is required"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}]: each message needs a role"
    return None


_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_TYPES: Final = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_DEFAULT_MESSAGES: Final = {
    400: "Invalid request.",
    401: "Invalid API key.",
    403: "Permission denied.",
    404: "Not found.",
    408: "Request timed out.",
    413: "Request too large.",
    429: "Rate limit exceeded.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
    529: "Overloaded.",
}


def error_response(
    api: Api, status: int, message: str | None, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in ``api``'s own shape (error type and code as the real API names them)."""
    text = message or _DEFAULT_MESSAGES.get(status, f"Error {status}.")
    body: dict[str, Any]
    if api == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": text}}
    else:
        kind, code = _OPENAI_TYPES.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None)
        )
        body = {"error": {"message": text, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def malformed_response() -> web.Response:
    """A 200 that says JSON and is not: what a truncating proxy produces."""
    return web.Response(status=200, text='{"id": "msg_trunc', content_type="application/json")


def fmt_seconds(seconds: float) -> str:
    """Seconds as a retry-after header writes them: ``1``, ``2.5``."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"

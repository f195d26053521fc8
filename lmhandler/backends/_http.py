"""What the HTTP backends share: reading Retry-After, mapping HTTP statuses and transport failures
to ``BackendError``, and keeping provider error text short and free of the API key.

    HTTP status              ErrorCode        retryable
    400, 422                 BAD_REQUEST      no
    401, 403                 UNAUTHORIZED     no
    404                      BACKEND_ERROR    no   (model unknown at the provider)
    408                      TIMEOUT          yes
    413                      TOO_LARGE        no
    429                      RATE_LIMITED     yes  (retry_after_s from the headers)
    500, 502, 503, 504       BACKEND_ERROR    yes
    529                      OVERLOADED       yes
    other 4xx                BACKEND_ERROR    no
    other 5xx                BACKEND_ERROR    yes
    client timeout           TIMEOUT          yes
    connection failure       BACKEND_ERROR    yes
    host name not resolved   BACKEND_ERROR    no   (a configuration error: base_url, or DNS)
    200 with a bad body      BACKEND_ERROR    yes
    no key where one is due  UNAUTHORIZED     no   (never sent; see ``KeyCheck``)
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import socket
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from rlmq.protocol import ErrorCode

from ..config import ModelConfig
from .base import BackendError

__all__ = [
    "KeyCheck",
    "connection_error",
    "error_detail",
    "malformed_error",
    "parse_json",
    "parse_retry_after",
    "redact",
    "status_error",
    "timeout_error",
]

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS: Final = 500
MIN_SECRET_CHARS: Final = 8

_STATUS: Final[Mapping[int, tuple[ErrorCode, bool, str]]] = {
    400: (ErrorCode.BAD_REQUEST, False, "bad request"),
    401: (ErrorCode.UNAUTHORIZED, False, "unauthorized"),
    403: (ErrorCode.UNAUTHORIZED, False, "forbidden"),
    404: (ErrorCode.BACKEND_ERROR, False, "not found, is the model name right?"),
    408: (ErrorCode.TIMEOUT, True, "request timeout"),
    413: (ErrorCode.TOO_LARGE, False, "request too large"),
    422: (ErrorCode.BAD_REQUEST, False, "unprocessable request"),
    429: (ErrorCode.RATE_LIMITED, True, "rate limited"),
    500: (ErrorCode.BACKEND_ERROR, True, "server error"),
    502: (ErrorCode.BACKEND_ERROR, True, "bad gateway"),
    503: (ErrorCode.BACKEND_ERROR, True, "service unavailable"),
    504: (ErrorCode.BACKEND_ERROR, True, "gateway timeout"),
    529: (ErrorCode.OVERLOADED, True, "overloaded"),
}


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``retry-after`` as seconds or an HTTP date.

    ``headers`` should be case-insensitive (httpx and httpx2 headers are). None when absent or
    unreadable; a date in the past gives 0.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        value = _finite(ms)
        if value is not None and value >= 0:
            return value / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    value = _finite(raw)
    if value is not None:
        return value if value >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _finite(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def redact(text: str, secret: str | None) -> str:
    """``text`` cut to a readable length, with every occurrence of ``secret`` masked.

    Secrets shorter than ``MIN_SECRET_CHARS`` are left alone: masking a two-letter test key
    would mangle every word that contains it, and real keys are long."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        text = text.replace(secret, "***")
    if len(text) > MAX_DETAIL_CHARS:
        text = text[:MAX_DETAIL_CHARS] + "…"
    return text


def error_detail(body: Any, text: str) -> str:
    """The provider's own error message: ``error.message`` in both APIs' error bodies, else the
    raw text. ``body`` is the parsed JSON or None."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            message = error.get("message")
            kind = error.get("type")
            if isinstance(message, str) and message:
                return f"{kind}: {message}" if isinstance(kind, str) and kind else message
        elif isinstance(error, str) and error:  # some OpenAI-compatible servers
            return error
    return text.strip() or "(empty body)"


def parse_json(text: str) -> Any:
    """JSON or None."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def status_error(
    where: str,
    status: int,
    detail: str,
    *,
    retry_after_s: float | None = None,
    secret: str | None = None,
) -> BackendError:
    """A ``BackendError`` for an HTTP error status. ``where`` names the model and provider."""
    code, retryable, label = _STATUS.get(
        status,
        (
            ErrorCode.BACKEND_ERROR,
            status >= 500,
            "server error" if status >= 500 else "client error",
        ),
    )
    return BackendError(
        code,
        f"{where}: HTTP {status} {label}: {redact(detail, secret)}",
        retryable=retryable,
        retry_after_s=retry_after_s,
        status=status,
    )


def timeout_error(where: str, timeout_s: float | None, detail: str = "") -> BackendError:
    after = f" after {timeout_s:g} s" if timeout_s is not None else ""
    extra = f" ({detail})" if detail else ""
    return BackendError(ErrorCode.TIMEOUT, f"{where}: no response{after}{extra}", retryable=True)


class KeyCheck:
    """A model whose key variable is unset: said on first use (the handler said it at start too).

    Where a key is due (the provider's API, a remote gateway) every call fails with
    ``unauthorized`` before anything is sent; a server on loopback may run keyless, so calls to
    it go without a key."""

    def __init__(self, config: ModelConfig) -> None:
        self.problem = config.key_problem()
        self.refuse = self.problem is not None and not config.keyless_ok
        self._said = False

    def before_call(self) -> None:
        if self.problem is None:
            return
        if not self._said:
            self._said = True
            log.warning("%s", self.problem)
        if self.refuse:
            raise BackendError(ErrorCode.UNAUTHORIZED, f"{self.problem}; nothing was sent", retryable=False)


def _unresolved(exc: BaseException) -> socket.gaierror | None:
    """The name-resolution failure behind a connection error, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return current
        os_error = getattr(current, "os_error", None)  # aiohttp keeps it there
        if isinstance(os_error, socket.gaierror):
            return os_error
        current = current.__cause__ or current.__context__
    return None


def connection_error(
    where: str, exc: BaseException, secret: str | None = None, *, url: str | None = None
) -> BackendError:
    """A failed connection: retryable, unless the host name did not resolve (``url`` names it),
    which is a configuration error and said so: retrying it only makes a newcomer wait."""
    gai = _unresolved(exc)
    if gai is not None:
        host = (urlsplit(url).hostname if url else None) or "the provider's host"
        temporary = gai.errno == socket.EAI_AGAIN
        why = "temporary failure in name resolution: is this machine offline?" if temporary else gai.strerror
        return BackendError(
            ErrorCode.BACKEND_ERROR,
            f"{where}: cannot resolve the host name {host!r} ({why}). Check base_url in this "
            "model's table of the config, and this machine's network; not retried",
            retryable=False,
        )
    detail = redact(str(exc) or type(exc).__name__, secret)
    return BackendError(
        ErrorCode.BACKEND_ERROR,
        f"{where}: connection failed ({type(exc).__name__}: {detail})",
        retryable=True,
    )


def malformed_error(where: str, detail: str, status: int | None = 200) -> BackendError:
    return BackendError(
        ErrorCode.BACKEND_ERROR,
        f"{where}: the provider returned malformed data ({detail})",
        retryable=True,
        status=status,
    )

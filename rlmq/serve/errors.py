"""The server's errors, each with the HTTP status and OpenAI error ``type`` it is answered with.

    RlmqError (rlmq.protocol)
    └── ApiError                 status, type, api_code: one OpenAI-style error reply
        ├── BadRequest           400 a body that is not a chat completion request, a bad context
        ├── Unauthorized         401 a missing or wrong bearer key
        ├── Forbidden            403 a context path outside the data directory
        ├── NotFound             404 an unknown model (profile) or route
        └── TooLarge             413 a body over max_body_bytes

A run that stops with an error (the handler's, the pool's) becomes an ``ApiError`` through
``from_info``, its rlmq code kept as the reply's ``code``.
"""

from __future__ import annotations

from typing import Any

from rlmq.protocol import ErrorCode, ErrorInfo, RlmqError

__all__ = ["ApiError", "BadRequest", "Forbidden", "NotFound", "TooLarge", "Unauthorized"]

INVALID = "invalid_request_error"
SERVER = "server_error"

# rlmq codes of a failed run -> HTTP status (anything else is 502: the upstream failed)
_STATUS = {
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.POOL_EXHAUSTED: 503,
    ErrorCode.SESSION_LOST: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_MODEL: 400,
    ErrorCode.TOO_LARGE: 413,
}


class ApiError(RlmqError):
    status = 500
    type = SERVER

    def __init__(self, message: str, *, api_code: str | None = None, status: int | None = None) -> None:
        super().__init__(message, retryable=False)
        self.api_code = api_code or str(self.code)
        if status is not None:
            self.status = status
        if self.status >= 500 or self.status == 429:
            self.type = SERVER if self.status != 429 else "rate_limit_error"

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.api_code}}

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ApiError:
        """A run's error, with its rlmq code."""
        try:
            status = _STATUS.get(ErrorCode(info.code), 502)
        except ValueError:
            status = 502
        error = cls(info.message, api_code=info.code, status=status)
        if status < 500 and status != 429:
            error.type = INVALID
        return error


class BadRequest(ApiError):
    code = ErrorCode.BAD_REQUEST
    status = 400
    type = INVALID


class Unauthorized(ApiError):
    code = ErrorCode.UNAUTHORIZED
    status = 401
    type = INVALID

    def __init__(self, message: str) -> None:
        super().__init__(message, api_code="invalid_api_key")


class Forbidden(ApiError):
    code = ErrorCode.BAD_REQUEST
    status = 403
    type = INVALID

    def __init__(self, message: str) -> None:
        super().__init__(message, api_code="path_outside_data_dir")


class NotFound(ApiError):
    code = ErrorCode.UNKNOWN_MODEL
    status = 404
    type = INVALID


class TooLarge(ApiError):
    code = ErrorCode.TOO_LARGE
    status = 413
    type = INVALID

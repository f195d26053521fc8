"""``rlmq serve``: RLM runs behind an OpenAI-compatible HTTP endpoint (docs/serve.md).

A tool, not a service: it runs the orchestrator through ``rlmq.facade.RLM`` and serves it with
aiohttp. ``settings`` reads the ``[serve]`` table and its profiles, ``requests`` turns a chat
request into a question and a context, ``app`` is the application, ``cli`` the command.

Errors it answers with (``errors``): ApiError (an OpenAI-style error reply with its HTTP status)
and its subclasses BadRequest, Unauthorized, Forbidden, NotFound and TooLarge.
"""

from .app import make_app
from .errors import ApiError, BadRequest, Forbidden, NotFound, TooLarge, Unauthorized
from .settings import DEFAULT_PROFILE, ServeConfig, ServeSettings, load_serve_config

__all__ = [
    "DEFAULT_PROFILE",
    "ApiError",
    "BadRequest",
    "Forbidden",
    "NotFound",
    "ServeConfig",
    "ServeSettings",
    "TooLarge",
    "Unauthorized",
    "load_serve_config",
    "make_app",
]

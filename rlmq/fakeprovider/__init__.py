"""A fake model provider speaking real HTTP: the Anthropic Messages API and OpenAI chat completions.

It lets the real backends (and load tests) run against a local server with no model and no
network. Replies echo the last user message (or a fixed text); token counts are estimated at
four characters a token. Anthropic prompt caching is simulated from the ``cache_control``
breakpoints the client sends: the longest prefix seen before is a cache read, the rest up to
the last breakpoint a cache write (no minimum length, no expiry). Faults can be injected at
random (fractions of requests, seeded) or forced one per request with ``FakeProvider.force``,
so tests stay deterministic.

    async with FakeProvider(FakeProviderConfig(api_key="k")) as fp:
        fp.force([429, "malformed"])   # the next two requests fail this way
        ...                            # point a client at fp.base_url

``run`` serves until SIGINT/SIGTERM; the ``rlmq fake-provider`` command calls it. A tool beside
the services: it imports nothing of rlmq but ``rlmq.protocol``'s error tree, and no service
imports it.

    RlmqError (rlmq.protocol)
    └── FakeProviderError          the fake provider was used wrongly
        ├── UnknownOutcome         ``force`` got an outcome it does not know (also a ValueError)
        └── NotStarted             ``base_url`` before ``start`` (also a RuntimeError)

Modules: ``apis`` (each API's paths, body checks and error shapes), ``server`` (the server),
``cli`` (the command).
"""

from .cli import run
from .server import (
    FakeProvider,
    FakeProviderConfig,
    FakeProviderCounters,
    FakeProviderError,
    Forced,
    NotStarted,
    RecordedRequest,
    UnknownOutcome,
)

__all__ = [
    "FakeProvider",
    "FakeProviderConfig",
    "FakeProviderCounters",
    "FakeProviderError",
    "Forced",
    "NotStarted",
    "RecordedRequest",
    "UnknownOutcome",
    "run",
]

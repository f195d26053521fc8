"""What a load test sends, checked before anything starts, and the request it sends encoded once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from rlmq.protocol import RlmqError
from rlmq.protocol.security import CurveClientKeys

__all__ = ["CLIENT_TIMEOUT", "OPEN_LOOP_CAP", "LoadSpec", "LoadtestError", "check_spec", "payload_head"]

# Counted under this code when the generator gave up waiting for a reply.
CLIENT_TIMEOUT = "client_timeout"
# Open loop: requests outstanding beyond this wait (and show up as schedule lag).
OPEN_LOOP_CAP = 100_000


class LoadtestError(RlmqError):
    """The load test could not run (no handler, a handler that died, bad options)."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send. ``requests`` or ``duration_s`` bounds the test; ``rate`` makes it open loop."""

    address: str
    requests: int | None = 10_000
    duration_s: float | None = None
    concurrency: int = 64
    rate: float | None = None
    model: str = "echo"
    prompt_bytes: int = 16
    processes: int | None = None
    timeout_s: float = 60.0
    max_tokens: int | None = None
    run: str | None = None
    run_key: str | None = None  # the key of a run this load test opened (every request shows it)
    handler_timeout_s: float | None = None  # the request's own timeout_s field, if given
    curve: CurveClientKeys | None = None  # CURVE client keys, for a handler with server keys


def check_spec(spec: LoadSpec) -> None:
    """Raise ``LoadtestError`` for options no load test can run with."""
    if spec.requests is None and spec.duration_s is None:
        raise LoadtestError("give a number of requests or a duration")
    if spec.requests is not None and spec.requests < 1:
        raise LoadtestError("requests must be at least 1")
    if spec.duration_s is not None and spec.duration_s <= 0:
        raise LoadtestError("duration must be positive")
    if spec.concurrency < 1:
        raise LoadtestError("concurrency must be at least 1")
    if spec.rate is not None and spec.rate <= 0:
        raise LoadtestError("rate must be positive")
    if spec.prompt_bytes < 0:
        raise LoadtestError("prompt size must not be negative")
    if spec.processes is not None and spec.processes < 1:
        raise LoadtestError("processes must be at least 1")
    if spec.timeout_s <= 0:
        raise LoadtestError("timeout must be positive")


def payload_head(spec: LoadSpec) -> bytes:
    """Every field of the request but ``id``, with a map header counting the ``id`` too.

    A request is ``head + packb("id") + packb(id)``: the prompt is encoded once per process,
    which matters for 40 MB prompts, and the per-request cost is one small pack and one concat.
    """
    prompt = ("x" * spec.prompt_bytes) if spec.prompt_bytes > 0 else ""
    fields: dict[str, Any] = {"v": 1, "op": "complete", "model": spec.model, "prompt": prompt}
    if spec.max_tokens is not None:
        fields["max_tokens"] = spec.max_tokens
    if spec.run is not None:
        fields["run"] = spec.run
    if spec.run_key is not None:
        fields["key"] = spec.run_key
    if spec.handler_timeout_s is not None:
        fields["timeout_s"] = spec.handler_timeout_s
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(fields) + 1)]
    for key, value in fields.items():
        parts.append(packer.pack(key))
        parts.append(packer.pack(value))
    parts.append(packer.pack("id"))
    return b"".join(parts)

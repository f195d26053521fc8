"""``rlmq loadtest``: drive a handler over the wire protocol and report what it sustained.

Closed loop (``--concurrency`` requests kept in flight) or open loop (``--rate`` requests per
second on a fixed schedule, latency counted from the scheduled time so a stalled handler cannot
hide behind a stalled generator). Requests are spread over several client processes, each with
one DEALER and a synchronous pyzmq loop, so that on a small machine the generator is not the
bottleneck. Reports throughput, latency percentiles, errors by code, and the handler's own
counters (the ``stats`` op) before and after. ``--spawn`` starts a private handler with an
``echo`` model, so one command measures a machine.

By default every request is accounted to a run opened with generous limits, so the handler's
budget checks and accounting run as they would in production (``--no-run`` turns that off).

A tool beside the services: it speaks to a handler through ``rlmq.protocol`` and starts one as a
subprocess (``rlmq handler``); no service imports it. Modules: ``spec`` (what to send),
``worker`` (one client process), ``driver`` (``run_load``), ``report``, ``spawn`` (private
handler and fake provider processes) and ``cli`` (the command, the only reader of the
environment: every function here takes the environment it needs as an argument).

    RlmqError (rlmq.protocol)
    └── LoadtestError              the test could not run: bad options, no handler, one that died
"""

from .cli import add_arguments, main
from .driver import run_load
from .report import summarize
from .spawn import (
    FakeProviderProcess,
    SpawnedHandler,
    echo_config,
    read_line,
    relay_config,
    spawn_fake_provider,
    spawn_handler,
    spawned_handler,
    stop_process,
)
from .spec import LoadSpec, LoadtestError, check_spec

__all__ = [
    "FakeProviderProcess",
    "LoadSpec",
    "LoadtestError",
    "SpawnedHandler",
    "add_arguments",
    "check_spec",
    "echo_config",
    "main",
    "read_line",
    "relay_config",
    "run_load",
    "spawn_fake_provider",
    "spawn_handler",
    "spawned_handler",
    "stop_process",
    "summarize",
]

"""``HOST:PORT`` flags (``--metrics-bind``), checked before a service binds anything.

Kept apart from ``metrics.py`` so that checking a flag does not import prometheus-client and
aiohttp, which a service loads only when it serves metrics."""

from __future__ import annotations

import argparse

from .errors import ConfigError

__all__ = ["add_metrics_bind", "bind_error", "parse_bind"]


def add_metrics_bind(parser: argparse.ArgumentParser) -> None:
    """The ``--metrics-bind`` flag, the same on every service that serves metrics."""
    parser.add_argument(
        "--metrics-bind",
        metavar="HOST:PORT",
        default=None,
        help="also serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (port 0 picks a free "
        "port; the URL is printed before the ready line). docs/observability.md lists them",
    )


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0 picks a free one) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"--metrics-bind takes HOST:PORT, such as 127.0.0.1:9100 (port 0: any free), not {text!r}"
        )
    return host, int(port)


def bind_error(text: str | None) -> str | None:
    """What is wrong with a ``--metrics-bind`` value (None: nothing, or no flag given)."""
    if text is None:
        return None
    try:
        parse_bind(text)
    except ConfigError as exc:
        return exc.message
    return None

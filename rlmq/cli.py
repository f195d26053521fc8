"""``rlmq SUBCOMMAND``: one subcommand per service, each imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

# subcommand -> (module with add_arguments/main, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("rlmq.orchestrator.run_cli", "answer one question about a large context (an RLM run)"),
    "demo": ("rlmq.orchestrator.demo", "offline end-to-end RLM run over a generated 1M-token document"),
    "up": ("rlmq.orchestrator.up_cli", "start a handler and a sandbox pool on this machine"),
    "handler": ("rlmq.lmhandler.cli", "run the LM handler (relays every model call; holds the API keys)"),
    "sandbox": ("rlmq.sandbox.cli", "run a sandbox pool (executes model-written code in isolated workers)"),
    "loadtest": (
        "rlmq.loadtest.cli",
        "drive a handler with load and report throughput, latency and errors",
    ),
    "eval": (
        "rlmq.eval.cli",
        "run the paper's long-context tasks (generated offline, exact answers) and score a model on them",
    ),
    "serve": (
        "rlmq.serve.cli",
        "answer OpenAI-compatible chat completion requests over HTTP with RLM runs",
    ),
    "view": (
        "rlmq.view.cli",
        "show a run's trajectory in the browser, live while it runs (or write one HTML file)",
    ),
    "replay": (
        "rlmq.orchestrator.replay_cli",
        "run a recorded trajectory again offline: exit 0 if it matches, 1 where it diverges or the file ends",
    ),
    "keys": ("rlmq.protocol.security", "make CURVE keys for handlers and pools listening on TCP"),
    "fake-provider": (
        "rlmq.fakeprovider.cli",
        "serve the Anthropic and OpenAI HTTP APIs locally, with fault injection, for tests and load tests",
    ),
}
# Long-running services log their life cycle at INFO by default; one-shot commands stay quiet.
SERVICES = frozenset({"handler", "sandbox", "fake-provider", "up", "serve", "view"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="rlmq",
        description="Recursive Language Models as a client-server system over ZeroMQ.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    if args.command in SERVICES:
        level = min(level, logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # HTTP client libraries log every request at INFO: a line per relayed call costs the
    # handler real CPU at thousands in flight, and says nothing our stats do not.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    code: int = module.main(args)
    return code

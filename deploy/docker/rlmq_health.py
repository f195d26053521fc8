#!/opt/rlmq/bin/python3
"""Health checks and pool discovery inside the rlmq containers (installed as ``rlmq-health``).

    rlmq-health handler [ADDR]    the handler answers ``ping`` (default ipc:///run/rlmq/handler.sock);
                                  ADDR "A,B,...": one handler of the front answers (the others'
                                  problems on stderr)
    rlmq-health sandbox ADDR      the sandbox pool at ADDR answers ``ping``
    rlmq-health pick-pool GLOB    print the address of a live pool whose ipc socket matches GLOB,
                                  chosen at random (the orchestrator's entry point uses it)

``{hostname}`` in ADDR or GLOB is this container's hostname. Exit status 0 when healthy, 1 when
not (the reason on stderr), 2 on bad arguments. Every wait is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import random
import socket
import sys

from rlmq.protocol import HandlerClient, RlmqError
from rlmq.protocol.sandbox import AsyncSandboxClient

DEFAULT_HANDLER = "ipc:///run/rlmq/handler.sock"


def _expand(text: str) -> str:
    return text.replace("{hostname}", socket.gethostname())


def _listening(path: str, timeout_s: float) -> bool:
    """Something accepts connections on this unix socket (a stale file refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def ping_handler(address: str, timeout_s: float) -> str | None:
    """None when the handler answers, else why not."""
    if address.startswith("ipc://") and not _listening(address[len("ipc://") :], timeout_s):
        return f"nothing listens on {address}"  # a stopped handler's socket file: no wait
    try:
        with HandlerClient(address, timeout_s=timeout_s) as client:
            client.ping(timeout_s=timeout_s)
    except RlmqError as exc:
        return exc.message
    return None


async def _ping_pool(address: str, timeout_s: float) -> None:
    async with AsyncSandboxClient(address, timeout_s=timeout_s) as client:
        await asyncio.wait_for(client.ping(), timeout_s)


def ping_pool(address: str, timeout_s: float) -> str | None:
    """None when the pool answers, else why not."""
    if address.startswith("ipc://") and not _listening(address[len("ipc://") :], timeout_s):
        return f"nothing listens on {address}"
    try:
        asyncio.run(_ping_pool(address, timeout_s))
    except TimeoutError:
        return f"no reply from {address} within {timeout_s:g} s"
    except RlmqError as exc:
        return exc.message
    return None


def pick_pool(pattern: str, timeout_s: float) -> tuple[str | None, list[str]]:
    """A live pool's address (random among those that answer) and why the others were skipped."""
    paths = glob.glob(pattern)
    random.shuffle(paths)
    skipped: list[str] = []
    for path in paths:
        address = f"ipc://{path}"
        problem = ping_pool(address, timeout_s)
        if problem is None:
            return address, skipped
        skipped.append(problem)
    return None, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlmq-health", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("handler", "sandbox", "pick-pool"))
    parser.add_argument("target", nargs="?", help="an address (handler, sandbox) or a glob (pick-pool)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default 3)")
    args = parser.parse_args(argv)
    if args.what == "handler":
        addresses = _expand(args.target or DEFAULT_HANDLER).split(",")
        # Several handlers are one front: it serves while any of them does.
        problems = []
        for address in addresses:
            problem = ping_handler(address, args.timeout)
            if problem is None:
                break
            problems.append(problem)
        else:
            problem = "; ".join(problems)
            if any(a.startswith("ipc://") for a in addresses):
                problem += "; is the stack up? (docker compose up -d)"
        if problem is None and problems:
            print(f"rlmq-health handler: {'; '.join(problems)} (another handler answered)", file=sys.stderr)
    elif args.target is None:
        parser.error(f"{args.what} needs an address or a glob")
    elif args.what == "sandbox":
        problem = ping_pool(_expand(args.target), args.timeout)
    else:
        pool, skipped = pick_pool(_expand(args.target), args.timeout)
        if pool is not None:
            print(pool)
            return 0
        problem = (
            f"no live sandbox pool matches {args.target}"
            + (f" ({'; '.join(skipped)})" if skipped else "")
            + "; is the stack up? (docker compose up -d)"
        )
    if problem is not None:
        print(f"rlmq-health {args.what}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

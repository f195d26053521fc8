"""Reference servers the handler is measured against, in the same run and with the same load.

``bare``: the floor. A synchronous pyzmq ROUTER loop: ``recv_multipart``, decode the payload with
msgpack (C) to read the ``id``, send back the envelope and a reply pre-encoded at start-up (the
same fields and text size as the handler's ``complete`` reply) with that ``id`` appended. No
validation, no accounting, no backend, no event loop. It answers every op (ping, stats, ...)
with that same canned reply.

``plain``: what a straightforward asyncio server gets. ``zmq.asyncio`` ROUTER, one
``await recv_multipart()`` per message, reads the ``id`` the same way, one task per request that
sleeps ``--latency-ms`` (if any) and ``await``s ``send_multipart`` of the canned reply.

Both print ``ready on ADDR`` once bound (port 0 picks a free port) and run until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgpack
import zmq
import zmq.asyncio

HWM = 1_000_000


def canned_reply_head(text_bytes: int) -> bytes:
    fields: dict[str, Any] = {
        "v": 1,
        "ok": True,
        "text": "x" * text_bytes,
        "model": "echo",
        "usage": {"input_tokens": 4, "output_tokens": 4, "cache_read_tokens": 0, "cache_write_tokens": 0},
        "cached": False,
        "retries": 0,
        "latency_ms": 0.0,
        "stop_reason": "end_turn",
    }
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(fields) + 1)]
    for key, value in fields.items():
        parts += [packer.pack(key), packer.pack(value)]
    parts.append(packer.pack("id"))
    return b"".join(parts)


def _configure(sock: zmq.Socket[Any], bind: str) -> str:
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.LINGER, 0)
    if bind.endswith(":0"):
        bind = bind[:-2] + ":*"
    sock.bind(bind)
    address = sock.getsockopt(zmq.LAST_ENDPOINT)
    return address.decode() if isinstance(address, bytes) else str(address)


def serve_bare(bind: str, text_bytes: int) -> None:
    head = canned_reply_head(text_bytes)
    packb = msgpack.packb
    unpackb = msgpack.unpackb
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    print(f"ready on {_configure(sock, bind)}", flush=True)
    recv = sock.recv_multipart
    send = sock.send_multipart
    while True:
        frames = recv()
        rid = unpackb(frames[-1])["id"]
        frames[-1] = head + packb(rid)
        send(frames)


async def serve_plain(bind: str, text_bytes: int, latency_s: float) -> None:
    head = canned_reply_head(text_bytes)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    print(f"ready on {_configure(sock, bind)}", flush=True)
    tasks: set[asyncio.Task[None]] = set()

    async def answer(envelope: list[bytes], rid: str) -> None:
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        await sock.send_multipart([*envelope, head + msgpack.packb(rid)])

    while True:
        frames = await sock.recv_multipart()
        rid = msgpack.unpackb(frames[-1])["id"]
        task = asyncio.create_task(answer(frames[:-1], rid))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["bare", "plain"])
    parser.add_argument("--bind", default="tcp://127.0.0.1:0")
    parser.add_argument("--text-bytes", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        if args.kind == "bare":
            if args.latency_ms:
                sys.exit("bare answers at once; use plain for a latency")
            serve_bare(args.bind, args.text_bytes)
        else:
            asyncio.run(serve_plain(args.bind, args.text_bytes, args.latency_ms / 1000.0))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

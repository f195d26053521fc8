"""A ZeroMQ relay from an ipc:// path to the handler: how workers without network (bwrap) or
without keys (a CURVE handler) reach it. Runs in its own thread; the pool starts and stops it."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import zmq

from rlmq.protocol.client import configure_socket
from rlmq.protocol.security import CurveClientKeys, connect

__all__ = ["HandlerProxy"]

log = logging.getLogger(__name__)


class HandlerProxy:
    """A ZeroMQ ROUTER on an ipc:// path relayed to the handler (DEALER), in its own thread.

    With ``isolation = "bwrap"`` workers have no network; this is their only way out, and it
    leads to the handler only. The handler echoes envelopes, so replies find their worker.
    """

    def __init__(
        self, upstream: str, path: str, *, public: bool = False, curve: CurveClientKeys | None = None
    ) -> None:
        self.upstream = upstream
        self.curve = curve  # CURVE client keys for an upstream that requires them
        self.path = path
        self.address = f"ipc://{path}"
        self.public = public  # world-connectable: for workers that connect after the uid drop
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._control_address = f"inproc://proxy-control-{id(self)}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"handler-proxy {path}", daemon=True)

    def start(self, timeout_s: float = 5.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise OSError(f"handler proxy on {self.address} did not start: {self._error}")
        return self.address

    def _run(self) -> None:
        front = self._ctx.socket(zmq.ROUTER)
        back = self._ctx.socket(zmq.DEALER)
        control = self._ctx.socket(zmq.PAIR)
        try:
            for sock in (front, back):
                configure_socket(sock)
            front.bind(self.address)
            if self.public:
                # Deliberate: reached by workers after their uid drop; it leads to the handler only.
                os.chmod(self.path, 0o666)  # noqa: S103
            connect(back, self.upstream, self.curve)
            control.bind(self._control_address)
        except BaseException as exc:  # the thread's boundary: handed to start(), which raises
            self._error = exc
            self._ready.set()
            for sock in (front, back, control):
                sock.close(linger=0)
            return
        self._ready.set()
        try:
            zmq.proxy_steerable(front, back, None, control)
        except zmq.ZMQError as exc:
            log.debug("handler proxy %s ended: %s", self.address, exc)
        finally:
            for sock in (front, back, control):
                sock.close(linger=0)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            client = self._ctx.socket(zmq.PAIR)
            try:
                client.connect(self._control_address)
                client.send(b"TERMINATE")
            finally:
                client.close(linger=0)
            self._thread.join(timeout_s)
        self._ctx.term()

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import zmq
import zmq.asyncio


def _assert_closed(ctx: zmq.Context) -> None:  # type: ignore[type-arg]
    leaked = [s for s in list(ctx._sockets) if not s.closed]
    for s in leaked:
        s.close(linger=0)
    ctx.term()
    assert not leaked, f"test leaked {len(leaked)} ZeroMQ socket(s)"


@pytest.fixture
async def actx() -> AsyncIterator[zmq.asyncio.Context]:
    """An asyncio ZeroMQ context; the test fails if it leaves a socket open."""
    ctx = zmq.asyncio.Context()
    yield ctx
    _assert_closed(ctx)


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:  # type: ignore[type-arg]
    """A blocking ZeroMQ context; the test fails if it leaves a socket open."""
    ctx: zmq.Context = zmq.Context()  # type: ignore[type-arg]
    yield ctx
    _assert_closed(ctx)

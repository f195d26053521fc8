from __future__ import annotations

import os
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


# ---------------------------------------------------------------- skips that cannot hide
# A test that needs something this machine may lack (bubblewrap, root, Docker) says so with
# `requires(...)`. On a developer's machine a missing prerequisite skips, with its reason in the
# summary; under CI (CI or RLMQ_NO_SKIP set) every skip is a failure, so a renamed function or a
# package CI forgot to install can never turn a test off unnoticed.
STRICT_SKIPS = bool(os.environ.get("CI") or os.environ.get("RLMQ_NO_SKIP"))


def requires(available: bool, what: str) -> pytest.MarkDecorator:
    """``@requires(shutil.which("bwrap") is not None, "bubblewrap (bwrap)")``."""
    return pytest.mark.skipif(not available, reason=f"needs {what}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where nothing may skip: {reason}"

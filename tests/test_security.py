"""CURVE on TCP: who must authenticate, keys through files and env, a real ROUTER refusing strangers."""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from rlmq.lmhandler.config import parse_config
from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import echo_model, ipc_address
from rlmq.protocol import AsyncHandlerClient, ErrorCode, RemoteError
from rlmq.protocol.security import (
    AuthRequired,
    CurveAuthenticator,
    CurveClientKeys,
    CurveError,
    CurveServerKeys,
    KeyPair,
    ServerSecurity,
    add_arguments,
    client_keys_from_env,
    connect,
    generate_keypair,
    load_public_keys,
    main,
    needs_auth,
    read_key_file,
    server_keys_from_env,
    uses_curve,
    write_keypair,
)

Ctx = zmq.Context[Any]
# How long a refused client waits for a reply that must never come.
REFUSED_WAIT_MS = 400


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("ipc:///run/rlmq/handler.sock", False),
        ("inproc://x", False),
        ("tcp://127.0.0.1:5555", False),
        ("tcp://127.3.4.5:5555", False),
        ("tcp://localhost:5555", False),
        ("tcp://lo:5555", False),
        ("tcp://[::1]:5555", False),
        ("tcp://127.0.0.1:*", False),
        ("tcp://0.0.0.0:5555", True),
        ("tcp://*:5555", True),
        ("tcp://[::]:5555", True),
        ("tcp://10.0.0.7:5555", True),
        ("tcp://eth0:5555", True),
        ("tcp://handler.internal:5555", True),
        ("ws://127.0.0.1:5555", True),
    ],
)
def test_needs_auth(address: str, expected: bool) -> None:
    assert needs_auth(address) is expected


def test_uses_curve_on_every_tcp_endpoint_once_keys_exist() -> None:
    assert uses_curve("tcp://127.0.0.1:5555", True)
    assert not uses_curve("tcp://127.0.0.1:5555", False)
    assert not uses_curve("ipc:///tmp/x.sock", True)
    with pytest.raises(CurveError):
        needs_auth("127.0.0.1:5555")


# ------------------------------------------------------------------ keys, files, env


def test_keypair_round_trips_through_certificate_files(tmp_path: Path) -> None:
    pair = generate_keypair()
    public_path, secret_path = write_keypair(tmp_path, "server", pair)
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert read_key_file(public_path) == (pair.public, None)
    assert read_key_file(secret_path) == (pair.public, pair.secret)
    assert load_public_keys(tmp_path) == {pair.public}
    with pytest.raises(CurveError, match="exists"):
        write_keypair(tmp_path, "server", generate_keypair())
    write_keypair(tmp_path, "server", generate_keypair(), overwrite=True)
    assert read_key_file(public_path)[0] != pair.public


def test_a_bare_key_file_and_bad_files(tmp_path: Path) -> None:
    pair = generate_keypair()
    bare = tmp_path / "bare"
    bare.write_bytes(pair.secret + b"\n")
    assert read_key_file(bare) == (pair.public, pair.secret)
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key")
    with pytest.raises(CurveError, match="not a CURVE key"):
        read_key_file(garbage)
    mismatched = tmp_path / "mismatched"
    other = generate_keypair()
    mismatched.write_text(
        f'curve\n    public-key = "{other.public.decode()}"\n    secret-key = "{pair.secret.decode()}"\n'
    )
    with pytest.raises(CurveError, match="does not belong"):
        read_key_file(mismatched)
    with pytest.raises(CurveError, match="cannot read"):
        read_key_file(tmp_path / "missing")


def test_keys_from_env_values_and_files(tmp_path: Path) -> None:
    server, client, other = generate_keypair(), generate_keypair(), generate_keypair()
    assert server_keys_from_env({}) is None
    assert client_keys_from_env({"RLMQ_CURVE_SERVER_PUBLIC": ""}) is None  # compose's unset default

    keys = server_keys_from_env(
        {
            "RLMQ_CURVE_SERVER_SECRET": server.secret.decode(),
            "RLMQ_CURVE_CLIENTS": f"{client.public.decode()}, {other.public.decode()}",
        }
    )
    assert keys == CurveServerKeys(server, frozenset({client.public, other.public}))

    write_keypair(tmp_path, "server", server)
    write_keypair(tmp_path / "allowed", "client", client)
    _, client_secret = write_keypair(tmp_path, "client", client)
    from_files = server_keys_from_env(
        {
            "RLMQ_CURVE_SERVER_SECRET_FILE": str(tmp_path / "server.key_secret"),
            "RLMQ_CURVE_CLIENTS_DIR": str(tmp_path / "allowed"),
        }
    )
    assert from_files == CurveServerKeys(server, frozenset({client.public}))

    assert client_keys_from_env(
        {
            "RLMQ_CURVE_SERVER_PUBLIC": server.public.decode(),
            "RLMQ_CURVE_CLIENT_SECRET": client.secret.decode(),
        }
    ) == CurveClientKeys(server.public, client)
    assert client_keys_from_env(
        {
            "RLMQ_CURVE_SERVER_PUBLIC_FILE": str(tmp_path / "server.key"),
            "RLMQ_CURVE_CLIENT_SECRET_FILE": str(client_secret),
        }
    ) == CurveClientKeys(server.public, client)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RLMQ_CURVE_SERVER_SECRET": "x" * 40}, "no client may connect"),
        ({"RLMQ_CURVE_SERVER_SECRET": "short", "RLMQ_CURVE_CLIENTS": "y"}, "not a CURVE key"),
        ({"RLMQ_CURVE_CLIENTS": "x" * 40}, "is not"),
        ({"RLMQ_CURVE_SERVER_SECRET": "x" * 40, "RLMQ_CURVE_SERVER_SECRET_FILE": "/k"}, "not both"),
        ({"RLMQ_CURVE_SERVER_SECRET_FILE": "/nonexistent/k", "RLMQ_CURVE_CLIENTS": "x" * 40}, "cannot read"),
    ],
)
def test_bad_server_env_is_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(CurveError, match=message):
        server_keys_from_env(env)


def test_half_a_client_setup_is_an_error() -> None:
    with pytest.raises(CurveError, match="RLMQ_CURVE_CLIENT_SECRET"):
        client_keys_from_env({"RLMQ_CURVE_SERVER_PUBLIC": generate_keypair().public.decode()})


def test_a_public_key_file_is_no_secret(tmp_path: Path) -> None:
    public, _ = write_keypair(tmp_path, "client", generate_keypair())
    with pytest.raises(CurveError, match="no secret key"):
        client_keys_from_env(
            {
                "RLMQ_CURVE_SERVER_PUBLIC": generate_keypair().public.decode(),
                "RLMQ_CURVE_CLIENT_SECRET_FILE": str(public),
            }
        )


# ------------------------------------------------------------------ `rlmq keys`


def _keys_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _parse_env(text: str) -> dict[str, str]:
    """KEY='value' lines, as a shell or docker compose reads them."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    env = {}
    for key, value in pairs:
        assert value[0] == value[-1] == "'"
        env[key] = value[1:-1]
    return env


def test_keys_command_prints_a_working_env_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_keys_args()) == 0
    env = _parse_env(capsys.readouterr().out)
    server, client = server_keys_from_env(env), client_keys_from_env(env)
    assert server is not None
    assert client is not None
    assert client.server_public == server.pair.public
    assert server.allowed_clients == {client.pair.public}


def test_keys_command_env_lines_survive_a_shell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Z85 keys contain $, #, &, ( and ): the lines must still mean the same to sh.
    assert main(_keys_args()) == 0
    env_file = tmp_path / "curve.env"
    env_file.write_text(capsys.readouterr().out)
    script = '. "$1" && printf "%s\\n%s\\n" "$RLMQ_CURVE_SERVER_SECRET" "$RLMQ_CURVE_CLIENT_SECRET"'
    shell = subprocess.run(
        ["sh", "-c", script, "sh", str(env_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    expected = _parse_env(env_file.read_text())
    assert shell.stdout.splitlines() == [
        expected["RLMQ_CURVE_SERVER_SECRET"],
        expected["RLMQ_CURVE_CLIENT_SECRET"],
    ]


def test_keys_command_writes_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_keys_args("--dir", str(tmp_path), "--client", "orch", "--client", "loadtest")) == 0
    out = capsys.readouterr().out
    assert "RLMQ_CURVE_CLIENTS_DIR=" in out
    assert sorted(p.name for p in (tmp_path / "allowed").iterdir()) == ["loadtest.key", "orch.key"]
    assert stat.S_IMODE((tmp_path / "orch.key_secret").stat().st_mode) == 0o600
    server = server_keys_from_env(
        {
            "RLMQ_CURVE_SERVER_SECRET_FILE": str(tmp_path / "server.key_secret"),
            "RLMQ_CURVE_CLIENTS_DIR": str(tmp_path / "allowed"),
        }
    )
    client = client_keys_from_env(
        {
            "RLMQ_CURVE_SERVER_PUBLIC_FILE": str(tmp_path / "server.key"),
            "RLMQ_CURVE_CLIENT_SECRET_FILE": str(tmp_path / "loadtest.key_secret"),
        }
    )
    assert server is not None
    assert client is not None
    assert client.pair.public in server.allowed_clients
    # A second run does not overwrite keys in use.
    assert main(_keys_args("--dir", str(tmp_path))) == 1
    assert "exists" in capsys.readouterr().err


def test_keys_command_refuses_bad_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_keys_args("--client", "server")) == 2
    assert main(_keys_args("--client", "a", "--client", "b")) == 2  # several clients need --dir
    capsys.readouterr()


# ------------------------------------------------------------------ real sockets


def _server_keys(*clients: KeyPair) -> CurveServerKeys:
    return CurveServerKeys(generate_keypair(), frozenset(c.public for c in clients))


def _ask(ctx: Ctx, router: zmq.Socket[Any], address: str, keys: CurveClientKeys | None) -> bytes | None:
    """Send one message from a fresh DEALER; the ROUTER echoes what it gets; the reply or None."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        connect(dealer, address, keys)
        dealer.send(b"ping")
        if router.poll(REFUSED_WAIT_MS):
            identity, payload = router.recv_multipart()
            router.send_multipart([identity, b"pong:" + payload])
        if dealer.poll(REFUSED_WAIT_MS):
            reply: bytes = dealer.recv()
            return reply
        return None
    finally:
        dealer.close()


def test_curve_router_answers_listed_clients_only(zctx: Ctx, tmp_path: Path) -> None:
    allowed, stranger = generate_keypair(), generate_keypair()
    keys = _server_keys(allowed)
    router = zctx.socket(zmq.ROUTER)
    router.linger = 0
    with ServerSecurity(zctx, keys) as security:
        try:
            ipc = security.bind(router, f"ipc://{tmp_path}/h.sock")
            tcp = security.bind(router, "tcp://127.0.0.1:0")  # loopback, but keys are given: CURVE
            assert tcp.startswith("tcp://127.0.0.1:")
            assert not tcp.endswith(":0")
            good = CurveClientKeys(keys.pair.public, allowed)
            assert _ask(zctx, router, tcp, good) == b"pong:ping"
            assert _ask(zctx, router, tcp, None) is None  # no keys: the handshake never completes
            assert _ask(zctx, router, tcp, CurveClientKeys(keys.pair.public, stranger)) is None
            wrong_server = CurveClientKeys(generate_keypair().public, allowed)
            assert _ask(zctx, router, tcp, wrong_server) is None
            assert _ask(zctx, router, ipc, None) == b"pong:ping"  # ipc stays open
            assert _ask(zctx, router, tcp, good) == b"pong:ping"  # and the server still serves
        finally:
            router.close()


def test_without_keys_only_loopback_and_ipc_may_listen(zctx: Ctx, tmp_path: Path) -> None:
    router = zctx.socket(zmq.ROUTER)
    router.linger = 0
    with ServerSecurity(zctx, None) as security:
        try:
            with pytest.raises(AuthRequired, match="rlmq keys"):
                security.bind(router, "tcp://0.0.0.0:0")
            with pytest.raises(AuthRequired):
                security.bind(router, "tcp://*:0")
            tcp = security.bind(router, "tcp://127.0.0.1:*")
            ipc = security.bind(router, f"ipc://{tmp_path}/open.sock")
            assert _ask(zctx, router, tcp, None) == b"pong:ping"
            assert _ask(zctx, router, ipc, None) == b"pong:ping"
        finally:
            router.close()


async def test_asyncio_router_with_curve(actx: zmq.asyncio.Context) -> None:
    client = generate_keypair()
    keys = _server_keys(client)
    router = actx.socket(zmq.ROUTER)
    dealer = actx.socket(zmq.DEALER)
    security = ServerSecurity(actx, keys)
    try:
        address = security.bind(router, "tcp://127.0.0.1:0")
        connect(dealer, address, CurveClientKeys(keys.pair.public, client))
        await dealer.send(b"hello")
        assert await router.poll(5000)
        identity, payload = await router.recv_multipart()
        await router.send_multipart([identity, payload.upper()])
        assert await dealer.poll(5000)
        assert await dealer.recv() == b"HELLO"
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        security.close()


def test_one_authenticator_per_context(zctx: Ctx) -> None:
    key = generate_keypair().public
    with CurveAuthenticator(zctx, [key]) as auth:
        assert auth.allowed_clients == {key}
        with pytest.raises(CurveError, match="one per ZeroMQ context"):
            CurveAuthenticator(zctx, [key]).start()
    auth.stop()  # idempotent


# ------------------------------------------------------------------ the handler, wired
# These run once the handler takes ``curve=`` and several binds (the wiring the lead applies);
# until then they skip, saying so.


async def test_handler_with_keys_answers_curve_clients_and_ipc(actx: zmq.asyncio.Context) -> None:
    client = generate_keypair()
    keys = _server_keys(client)
    ipc = ipc_address("curve")
    config = parse_config({"models": {"echo": echo_model()}, "handler": {"bind": "tcp://127.0.0.1:0"}})
    config = dataclasses.replace(config, also_bind=(ipc,))
    handler = Handler(config, context=actx, curve=keys)
    await handler.start()
    try:
        tcp = handler.address
        assert tcp is not None
        assert tcp.startswith("tcp://")
        curve = CurveClientKeys(keys.pair.public, client)
        async with AsyncHandlerClient(tcp, context=actx, curve=curve) as good:
            # With keys, anonymous calls are off by default: every call names a run it holds.
            with pytest.raises(RemoteError) as refused:
                await good.complete("hi", model="echo", timeout_s=5)
            assert refused.value.code == ErrorCode.UNAUTHORIZED
            await good.run_open("r", key="k")
            assert (await good.complete("hi", model="echo", run="r", timeout_s=5)).text == "hi"
        async with AsyncHandlerClient(ipc, context=actx) as local:
            assert (await local.ping(timeout_s=5)).server == "rlmq-lmhandler"
            with pytest.raises(RemoteError) as other:  # the run is the keyed client's
                await local.complete("hi", model="echo", run="r", timeout_s=5)
            assert other.value.code == ErrorCode.UNKNOWN_RUN
        stranger = actx.socket(zmq.DEALER)
        try:
            connect(stranger, tcp, CurveClientKeys(keys.pair.public, generate_keypair()))
            await stranger.send(b"\x80")  # never reaches the handler
            assert not await stranger.poll(REFUSED_WAIT_MS)
        finally:
            stranger.close(linger=0)
    finally:
        await handler.stop(grace_s=1.0)


def test_handler_command_refuses_tcp_beyond_loopback_without_keys(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.echo]\nbackend = "echo"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLMQ_CURVE_")}
    done = subprocess.run(
        [sys.executable, "-m", "rlmq", "handler", "--config", str(config), "--bind", "tcp://0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert "rlmq keys" in done.stderr
    assert "lmhandler ready" not in done.stdout

"""ZeroMQ CURVE for rlmq's TCP listeners: keys, socket options, an allow-list authenticator.

The rule (docs/security.md, "Network authentication (CURVE)"):

- ``ipc://`` and ``inproc://`` endpoints never use CURVE: file permissions guard them.
- A server with keys uses CURVE on **every** TCP endpoint it binds, loopback included, and admits
  only the client public keys on its allow-list. A client with keys uses CURVE on every TCP
  endpoint it connects to.
- A server without keys may bind TCP on loopback only; ``needs_auth`` says which addresses need
  keys, and ``ServerSecurity.bind`` refuses those with ``AuthRequired`` instead of listening open.

Keys are ZeroMQ's Z85 text (40 characters), read from the environment (``server_keys_from_env``,
``client_keys_from_env``; names in ``ENV_NAMES``) or from certificate files in pyzmq's format
(``write_keypair`` / ``read_key_file``), and made by ``rlmq keys`` (``add_arguments``/``main``).

    RlmqError
    └── CurveError         a key that is not a key, a missing file, keys configured by halves
        └── AuthRequired   a TCP bind beyond loopback without server keys
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .errors import RlmqError

__all__ = [
    "ENV_NAMES",
    "AuthRequired",
    "CurveAuthenticator",
    "CurveClientKeys",
    "CurveError",
    "CurveServerKeys",
    "KeyPair",
    "ServerSecurity",
    "add_arguments",
    "client_keys_from_env",
    "client_socket_options",
    "connect",
    "generate_keypair",
    "load_public_keys",
    "main",
    "needs_auth",
    "read_key_file",
    "server_keys_from_env",
    "server_socket_options",
    "uses_curve",
    "write_keypair",
]

log = logging.getLogger(__name__)

# Environment variables, each with a ``_FILE`` twin naming a file that holds the value instead
# (a pyzmq certificate or the bare Z85 key), for Docker and Kubernetes secrets. (S105: these
# are the names of variables, not secrets.)
SERVER_SECRET = "RLMQ_CURVE_SERVER_SECRET"  # noqa: S105  # server: its secret key
CLIENTS = "RLMQ_CURVE_CLIENTS"  # server: allowed client public keys, comma or space separated
CLIENTS_DIR = "RLMQ_CURVE_CLIENTS_DIR"  # server: a directory of allowed public certificates (*.key)
SERVER_PUBLIC = "RLMQ_CURVE_SERVER_PUBLIC"  # client: the server's public key
CLIENT_SECRET = "RLMQ_CURVE_CLIENT_SECRET"  # noqa: S105  # client: its own secret key (the public one follows)
ENV_NAMES = (SERVER_SECRET, CLIENTS, CLIENTS_DIR, SERVER_PUBLIC, CLIENT_SECRET)

_Z85_KEY = re.compile(rb"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_OPEN_SCHEMES = frozenset({"ipc", "inproc"})
_WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", ""})  # noqa: S104  # recognised, not bound
_LOOPBACK_NAMES = frozenset({"localhost", "lo"})


class CurveError(RlmqError):
    """CURVE configuration that cannot be used: a malformed key, a missing file, half a setup."""


class AuthRequired(CurveError):
    """A TCP address reachable beyond loopback, and no server keys to authenticate clients with."""


def _key(value: str | bytes, what: str) -> bytes:
    raw = value.encode("ascii", "replace") if isinstance(value, str) else value
    raw = raw.strip()
    if not _Z85_KEY.match(raw):
        raise CurveError(f"{what} is not a CURVE key (40 characters of Z85 text, as `rlmq keys` writes)")
    return raw


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both halves as 40-character Z85 bytes."""

    public: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: str | bytes, what: str = "secret key") -> KeyPair:
        key = _key(secret, what)
        return cls(zmq.curve_public(key), key)


@dataclass(frozen=True, slots=True)
class CurveServerKeys:
    """What a listening service needs: its key pair and the client public keys it admits."""

    pair: KeyPair
    allowed_clients: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class CurveClientKeys:
    """What a connecting client needs: the server's public key and its own key pair."""

    server_public: bytes
    pair: KeyPair


def generate_keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


# ------------------------------------------------------------------ files


def _certificate(pair: KeyPair, *, secret: bool) -> str:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    kind = "SECRET certificate: keep it private" if secret else "public certificate"
    lines = [
        f"#   rlmq CURVE {kind} (ZeroMQ/pyzmq format), made {now}",
        "metadata",
        "curve",
        f'    public-key = "{pair.public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{pair.secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise CurveError(f"{path} exists; not overwriting a key (use --force)") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    os.chmod(path, mode)  # O_CREAT's mode passes through the umask, and TRUNC keeps the old one


def write_keypair(
    directory: str | os.PathLike[str], name: str, pair: KeyPair, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600); returns both paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    _write(secret, _certificate(pair, secret=True), 0o600, overwrite)
    _write(public, _certificate(pair, secret=False), 0o644, overwrite)
    return public, secret


def read_key_file(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """``(public, secret or None)`` from a pyzmq certificate, or a file holding one bare key.

    A bare key is taken as a secret key when its public half does not equal it, so a file made
    with ``printf %s "$RLMQ_CURVE_SERVER_SECRET"`` works as well as a certificate.
    """
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise CurveError(f"cannot read CURVE key file {p}: {exc.strerror}") from None
    public: bytes | None = None
    secret: bytes | None = None
    for line in text.splitlines():
        line = line.strip()
        for name in (b"public-key", b"secret-key"):
            if line.startswith(name) and b"=" in line:
                value = _key(line.split(b"=", 1)[1].strip(b" \t'\""), f"{name.decode()} in {p}")
                if name == b"public-key":
                    public = value
                else:
                    secret = value
    if public is None and secret is None:
        bare = _key(text, f"the content of {p}")
        return zmq.curve_public(bare), bare
    if secret is not None:
        derived = zmq.curve_public(secret)
        if public is not None and public != derived:
            raise CurveError(f"{p}: public-key does not belong to secret-key")
        return derived, secret
    assert public is not None
    return public, None


def load_public_keys(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """The public keys of every ``*.key`` certificate in a directory (an allow-list)."""
    d = Path(directory)
    if not d.is_dir():
        raise CurveError(f"CURVE allow-list directory {d} does not exist")
    return frozenset(read_key_file(p)[0] for p in sorted(d.glob("*.key")))


# ------------------------------------------------------------------ environment


def _source(env: Mapping[str, str], name: str) -> tuple[str, bool] | None:
    """``(value, is_file)`` from ``NAME`` or ``NAME_FILE``; empty counts as unset."""
    direct = env.get(name, "").strip()
    path = env.get(f"{name}_FILE", "").strip()
    if direct and path:
        raise CurveError(f"set {name} or {name}_FILE, not both")
    if direct:
        return direct, False
    if path:
        return path, True
    return None


def _pair_from(env: Mapping[str, str], name: str) -> KeyPair | None:
    source = _source(env, name)
    if source is None:
        return None
    value, is_file = source
    if not is_file:
        return KeyPair.from_secret(value, f"${name}")
    public, secret = read_key_file(value)
    if secret is None:
        raise CurveError(f"${name}_FILE ({value}) holds no secret key")
    return KeyPair(public, secret)


def _public_from(env: Mapping[str, str], name: str) -> bytes | None:
    source = _source(env, name)
    if source is None:
        return None
    value, is_file = source
    return read_key_file(value)[0] if is_file else _key(value, f"${name}")


def server_keys_from_env(env: Mapping[str, str]) -> CurveServerKeys | None:
    """Server keys from ``RLMQ_CURVE_SERVER_SECRET[_FILE]`` and the allow-list, or None if unset."""
    pair = _pair_from(env, SERVER_SECRET)
    allowed: set[bytes] = set()
    listed = env.get(CLIENTS, "").strip()
    for item in re.split(r"[\s,]+", listed) if listed else ():
        allowed.add(_key(item, f"an entry of ${CLIENTS}"))
    directory = env.get(CLIENTS_DIR, "").strip()
    if directory:
        allowed |= load_public_keys(directory)
    if pair is None:
        if listed or directory:
            raise CurveError(f"${CLIENTS} or ${CLIENTS_DIR} is set but ${SERVER_SECRET} is not")
        return None
    if not allowed:
        raise CurveError(
            f"${SERVER_SECRET} is set but no client may connect: list client public keys in "
            f"${CLIENTS} or put their certificates in ${CLIENTS_DIR}"
        )
    return CurveServerKeys(pair, frozenset(allowed))


def client_keys_from_env(env: Mapping[str, str]) -> CurveClientKeys | None:
    """Client keys from ``RLMQ_CURVE_SERVER_PUBLIC[_FILE]`` and ``RLMQ_CURVE_CLIENT_SECRET[_FILE]``."""
    server_public = _public_from(env, SERVER_PUBLIC)
    pair = _pair_from(env, CLIENT_SECRET)
    if server_public is None and pair is None:
        return None
    if server_public is None or pair is None:
        missing = SERVER_PUBLIC if server_public is None else CLIENT_SECRET
        raise CurveError(f"CURVE client keys are half set: ${missing} (or ${missing}_FILE) is missing")
    return CurveClientKeys(server_public, pair)


# ------------------------------------------------------------------ sockets


def _scheme_host(address: str) -> tuple[str, str]:
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise CurveError(f"{address!r} is not a ZeroMQ endpoint (scheme://...)")
    if scheme != "tcp":
        return scheme, rest
    rest = rest.rsplit(";", 1)[-1]  # connect's "source;destination" form: the destination
    if rest.startswith("["):  # [IPv6]:port
        return scheme, rest[1 : rest.find("]")] if "]" in rest else rest[1:]
    return scheme, rest.rsplit(":", 1)[0] if ":" in rest else rest


def needs_auth(address: str) -> bool:
    """Whether a bind address is reachable beyond this machine, so clients must authenticate.

    ``ipc://``/``inproc://`` and TCP on a loopback address or ``localhost``/``lo``: no. A
    wildcard (``*``, ``0.0.0.0``, ``::``), any other address, a host or interface name, and any
    other transport: yes (names are not resolved; an unknown name counts as reachable).
    """
    scheme, host = _scheme_host(address)
    if scheme in _OPEN_SCHEMES:
        return False
    if scheme != "tcp" or host in _WILDCARD_HOSTS:
        return True
    if host.lower() in _LOOPBACK_NAMES:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def uses_curve(address: str, have_keys: bool) -> bool:
    """Whether an endpoint is secured with CURVE: every TCP endpoint once keys are configured."""
    scheme, _ = _scheme_host(address)
    return have_keys and scheme not in _OPEN_SCHEMES


def server_socket_options(sock: zmq.Socket[Any], secret_key: bytes) -> None:
    """Make the next ``bind`` on ``sock`` a CURVE server endpoint with this secret key."""
    key = _key(secret_key, "the server secret key")
    sock.setsockopt(zmq.CURVE_SECRETKEY, key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(key))
    sock.setsockopt(zmq.CURVE_SERVER, 1)


def client_socket_options(
    sock: zmq.Socket[Any], server_public: bytes, client_public: bytes, client_secret: bytes
) -> None:
    """Make the next ``connect`` on ``sock`` a CURVE client of the server with ``server_public``."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, _key(server_public, "the server public key"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, _key(client_public, "the client public key"))
    sock.setsockopt(zmq.CURVE_SECRETKEY, _key(client_secret, "the client secret key"))


def _no_security(sock: zmq.Socket[Any]) -> None:
    # Mechanism options apply per endpoint, when bind/connect is called: back to NULL.
    sock.setsockopt(zmq.CURVE_SERVER, 0)


def connect(sock: zmq.Socket[Any], address: str, keys: CurveClientKeys | None) -> None:
    """Connect, with CURVE when ``keys`` are given and the address is TCP."""
    if keys is not None and uses_curve(address, True):
        client_socket_options(sock, keys.server_public, keys.pair.public, keys.pair.secret)
    else:
        _no_security(sock)
    sock.connect(address)


class _AllowList:
    """pyzmq's credentials-provider interface over a set of public keys."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            log.warning("CURVE client refused: public key %s is not on the allow-list", key.decode())
        return ok


class CurveAuthenticator:
    """A ZAP handler admitting only listed CURVE client keys; one per ZeroMQ context.

    Runs pyzmq's ``ThreadAuthenticator`` (a thread with its own sockets on ``context``), so it
    serves asyncio and blocking sockets alike and never touches the caller's event loop. Without a
    running authenticator libzmq admits every CURVE client, so start it before binding.
    """

    def __init__(self, context: zmq.Context[Any], allowed_clients: Iterable[bytes]) -> None:
        # ZAP works per libzmq context, over inproc: the authenticator's sockets live on ``context``
        # (as blocking sockets, even on an asyncio context).
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("zmq.auth"))
        self._allow = _AllowList(allowed_clients)
        self._started = False

    @property
    def allowed_clients(self) -> frozenset[bytes]:
        return self._allow.keys

    def start(self) -> CurveAuthenticator:
        if not self._started:
            try:
                self._auth.start()
            except zmq.ZMQError as exc:
                self._auth.stop()  # closes the half-made ZAP socket
                raise CurveError(
                    f"cannot start the CURVE authenticator ({exc}): one per ZeroMQ context"
                ) from None
            self._auth.configure_curve_callback("*", self._allow)
            self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._auth.stop()
            self._started = False

    def __enter__(self) -> CurveAuthenticator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerSecurity:
    """Binds a server's endpoints by the rule above; owns the authenticator when keys are given.

    ``bind(sock, address)`` replaces ``sock.bind``: ipc stays open, TCP gets CURVE when keys are
    configured, and TCP beyond loopback without keys raises ``AuthRequired``. Call ``close``
    (or use it as a context manager) after closing the sockets.
    """

    def __init__(self, context: zmq.Context[Any], keys: CurveServerKeys | None) -> None:
        self.keys = keys
        self._context = context
        self._auth: CurveAuthenticator | None = None

    def bind(self, sock: zmq.Socket[Any], address: str) -> str:
        """Bind (port 0 or * picks a free port); returns the address actually bound."""
        if uses_curve(address, self.keys is not None):
            assert self.keys is not None
            if self._auth is None:
                self._auth = CurveAuthenticator(self._context, self.keys.allowed_clients).start()
            server_socket_options(sock, self.keys.pair.secret)
        elif needs_auth(address):
            raise AuthRequired(
                f"{address} is reachable beyond this machine and needs CURVE keys: set "
                f"${SERVER_SECRET} and ${CLIENTS} (make them with `rlmq keys`), "
                "or bind to 127.0.0.1 or an ipc:// path"
            )
        else:
            _no_security(sock)
        if address.startswith("tcp://") and (address.endswith(":0") or address.endswith(":*")):
            address = address.rsplit(":", 1)[0] + ":*"
        sock.bind(address)
        bound = sock.getsockopt(zmq.LAST_ENDPOINT)
        return bound.decode() if isinstance(bound, bytes) else str(bound)

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> ServerSecurity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ `rlmq keys`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        help="write certificate files here (server.key, server.key_secret, allowed/NAME.key, "
        "NAME.key_secret) instead of printing environment lines for an .env file",
    )
    parser.add_argument(
        "--client",
        action="append",
        metavar="NAME",
        help="a client key pair to make and allow (repeatable; default: one named 'client')",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")


def _env_lines(server: KeyPair, client: KeyPair) -> str:
    # Single quotes: Z85 uses $, #, & and brackets, but never a quote; both POSIX shells
    # (`set -a; . ./.env`) and docker compose's .env take single-quoted values literally.
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return (
        f"# rlmq CURVE keys made by `rlmq keys` at {now}. SECRET: keep this file private.\n"
        "# The handler or pool (server side):\n"
        f"{SERVER_SECRET}='{server.secret.decode()}'\n"
        f"{CLIENTS}='{client.public.decode()}'\n"
        "# Its clients (orchestrators, rlmq loadtest, workers of a pool on another host):\n"
        f"{SERVER_PUBLIC}='{server.public.decode()}'\n"
        f"{CLIENT_SECRET}='{client.secret.decode()}'\n"
    )


def _write_keys(directory: Path, server: KeyPair, clients: dict[str, KeyPair], overwrite: bool) -> None:
    write_keypair(directory, "server", server, overwrite=overwrite)
    allowed = directory / "allowed"
    allowed.mkdir(exist_ok=True)
    for name, pair in clients.items():
        _write(directory / f"{name}.key_secret", _certificate(pair, secret=True), 0o600, overwrite)
        _write(allowed / f"{name}.key", _certificate(pair, secret=False), 0o644, overwrite)


def main(args: argparse.Namespace) -> int:
    names: list[str] = args.client or ["client"]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.-]+", n) or n == "server"]
    if bad or len(set(names)) != len(names):
        print(f"rlmq keys: client names must be distinct, plain and not 'server': {names}", file=sys.stderr)
        return 2
    if args.dir is None and len(names) > 1:
        print("rlmq keys: several clients need --dir (one file per client secret)", file=sys.stderr)
        return 2
    server = generate_keypair()
    clients = {n: generate_keypair() for n in names}
    if args.dir is None:
        sys.stdout.write(_env_lines(server, clients[names[0]]))
        return 0
    d = Path(args.dir)
    try:
        _write_keys(d, server, clients, args.force)
    except CurveError as exc:
        print(f"rlmq keys: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"rlmq keys: cannot write keys in {d}: {exc}", file=sys.stderr)
        return 1
    print(f"server: {SERVER_SECRET}_FILE={d / 'server.key_secret'} {CLIENTS_DIR}={d / 'allowed'}")
    for n in names:
        print(f"{n}: {SERVER_PUBLIC}_FILE={d / 'server.key'} {CLIENT_SECRET}_FILE={d / (n + '.key_secret')}")
    return 0

"""``rlmq serve`` (rlmq.serve): a real server process with real services behind it, the script
backend as the root model, and the official ``openai`` SDK as the client."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp.test_utils import TestServer

from rlmq.protocol import ConfigError
from rlmq.serve import load_serve_config, make_app
from rlmq.serve.errors import BadRequest, Forbidden
from rlmq.serve.requests import ContextPath, load_path_context, parse_chat_request

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
MAX_BODY = 64 * 1024

MEASURE = [
    "Let me look.\n```repl\nn = len(context)\nprint(llm_query('ping'))\n```",
    "```repl\nFINAL(f'{type(context).__name__}:{n}')\n```",
]
HOLD = ["```repl\nimport time\nwhile True:\n    time.sleep(0.05)\n```"]


def write_config(directory: Path, *, serve: str) -> Path:
    (directory / "root.json").write_text(json.dumps(MEASURE))
    (directory / "hold.json").write_text(json.dumps(HOLD))
    path = directory / "rlmq.toml"
    path.write_text(
        textwrap.dedent(
            """\
            [models.root]
            backend = "script"
            path = "root.json"

            [models.hold]
            backend = "script"
            path = "hold.json"

            [models.sub]
            backend = "echo"

            [sandbox]
            workers = 2

            [run]
            max_iterations = 5

            """
        )
        + serve
    )
    return path


def make_data(directory: Path) -> Path:
    """data/ with a file, a folder, and two links that lead out of it; secret.txt outside."""
    (directory / "secret.txt").write_text("TOP-SECRET")
    data = directory / "data"
    (data / "docs").mkdir(parents=True)
    (data / "doc.txt").write_text("twelve chars")
    (data / "docs" / "a.txt").write_text("a")
    (data / "docs" / "b.txt").write_text("b")
    (data / "docs" / "leak.txt").symlink_to(directory / "secret.txt")
    (data / "out.txt").symlink_to(directory / "secret.txt")
    return data


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    directory: Path
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def client(self, key: str = KEY) -> openai.OpenAI:
        """An SDK client with this key (kept, and closed with the server)."""
        if key not in self.clients:
            self.clients[key] = openai.OpenAI(
                base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60
            )
        return self.clients[key]


def start_server(config: Path, *args: str) -> Server:
    process = subprocess.Popen(
        [sys.executable, "-m", "rlmq", "serve", "--config", str(config), "--bind", "127.0.0.1:0", *args],
        cwd=config.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    # The ready line is the event to wait on; select bounds the wait should the server hang.
    ready, _, _ = select.select([process.stdout], [], [], 60)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("rlmq serve ready on "):
        process.kill()
        _, err = process.communicate(timeout=30)
        raise AssertionError(f"rlmq serve did not start: {line!r}\n{err}")
    return Server(process, line.split()[-1], config.parent)


def stop_server(server: Server) -> None:
    """SIGTERM: the server stops cleanly (exit 0) and its handler and pool with it."""
    for client in server.clients.values():
        client.close()
    services = children(server.process.pid)
    server.process.send_signal(signal.SIGTERM)
    try:
        _, err = server.process.communicate(timeout=60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.communicate()
    assert server.process.returncode == 0, err
    assert not any(alive(pid) for pid in services)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("serve")
    make_data(directory)
    config = write_config(
        directory,
        serve=textwrap.dedent(
            f"""\
            [serve]
            api_keys = ["{KEY}", "sk-second"]
            data_dir = "data"
            max_body_bytes = {MAX_BODY}
            trajectory_dir = "runs"
            keepalive_s = 1.0

            [serve.profiles.hold]
            root_model = "hold"
            """
        ),
    )
    running = start_server(config)
    yield running
    stop_server(running)


def still_serving(server: Server) -> None:
    reply = server.client().chat.completions.create(
        model="rlm", messages=[{"role": "user", "content": "abc"}, {"role": "user", "content": "How long?"}]
    )
    assert reply.choices[0].message.content == "str:3"


# ---------------------------------------------------------------- answers


def test_models_lists_the_profiles(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == ["rlm", "hold"]


def test_plain_completion(server: Server) -> None:
    client = server.client("sk-second")  # any configured key
    reply = client.chat.completions.create(
        model="rlm",
        messages=[
            {"role": "user", "content": "hello world"},  # one earlier message: the context string
            {"role": "user", "content": "How long is the text?"},
        ],
    )
    (choice,) = reply.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "str:11",
        "stop",
    )
    assert reply.model == "rlm"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    extension = (reply.model_extra or {})["rlmq"]
    assert (extension["stop_reason"], extension["iterations"], extension["calls"]) == ("final", 2, 3)
    assert (server.directory / extension["trajectory"]).exists()
    # Several earlier messages: a list of their texts (a system message's included).
    reply = client.chat.completions.create(
        model="rlm",
        messages=[
            {"role": "system", "content": "part one"},
            {"role": "user", "content": [{"type": "text", "text": "part two"}]},
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": "How many parts?"},
        ],
    )
    assert reply.choices[0].message.content == "list:3"


def test_streamed_completion(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model="rlm",
        messages=[{"role": "user", "content": "four"}, {"role": "user", "content": "How long?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    progress = [
        (c.model_extra or {}).get("rlmq") for c in chunks if c.choices and c.choices[0].delta.model_extra
    ]
    assert [p["event"] for p in progress] == ["model_call", "exec", "model_call", "exec", "final"]
    assert progress[1]["sub_calls"] == 1
    lines = [(c.choices[0].delta.model_extra or {})["reasoning_content"] for c in chunks[1:6]]
    assert lines[0].startswith("iteration 1: ")
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "str:4"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("context", "answer"),
    [
        ("a string", "str:8"),
        (["x", "y", "z"], "list:3"),
        ({"k": "v"}, "dict:1"),
        ({"path": "doc.txt"}, "str:12"),
        ({"path": "docs"}, "dict:2"),  # a folder; leak.txt leads out of data/ and is skipped
    ],
)
def test_context_in_the_body(server: Server, context: Any, answer: str) -> None:
    reply = server.client().chat.completions.create(
        model="rlm",
        messages=[
            {"role": "user", "content": "ignored: the body's context wins"},
            {"role": "user", "content": "?"},
        ],
        extra_body={"context": context},
    )
    assert reply.choices[0].message.content == answer


# ---------------------------------------------------------------- errors, and serving on


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict)
    assert set(body) >= {"message", "type", "code"}  # the SDK unwraps {"error": {...}}
    return body


def test_a_missing_or_wrong_key(server: Server) -> None:
    no_key = {"Authorization": openai.omit}  # the SDK refuses to be made without a key
    for client, headers in ((server.client(), no_key), (server.client("sk-wrong"), {})):
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(
                model="rlm", messages=[{"role": "user", "content": "?"}], extra_headers=headers
            )
        assert caught.value.status_code == 401
        assert error_body(caught.value)["code"] == "invalid_api_key"
        assert ("no API key" in caught.value.message) == (headers is no_key)
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").models.list()
    still_serving(server)


def test_an_oversized_body(server: Server) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().chat.completions.create(
            model="rlm",
            messages=[{"role": "user", "content": "?"}],
            extra_body={"context": "x" * (2 * MAX_BODY)},
        )
    assert caught.value.status_code == 413
    body = error_body(caught.value)
    assert (body["type"], body["code"]) == ("invalid_request_error", "too_large")
    still_serving(server)


@pytest.mark.parametrize("path", ["../secret.txt", "docs/../../secret.txt", "/etc/passwd", "out.txt"])
def test_a_path_outside_the_data_directory(server: Server, path: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        server.client().chat.completions.create(
            model="rlm", messages=[{"role": "user", "content": "?"}], extra_body={"context": {"path": path}}
        )
    assert caught.value.status_code == 403
    assert error_body(caught.value)["code"] == "path_outside_data_dir"
    assert "TOP-SECRET" not in caught.value.message
    still_serving(server)


def test_an_unknown_model_and_bad_requests(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "?"}])
    assert error_body(caught.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="rlm", messages=[{"role": "assistant", "content": "no question"}]
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="rlm",
            messages=[{"role": "user", "content": "?"}],
            extra_body={"context": {"path": "nothing.txt"}},
        )
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path, body in [("POST", "/v1/chat/completions", b"{not json"), ("GET", "/v1/nothing", b"")]:
        raw = httpx.request(method, server.url + path, content=body, headers=headers, timeout=30)
        raw.close()
        assert raw.status_code in (400, 404)
        assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    still_serving(server)


def test_a_client_that_goes_away_cancels_its_run(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model="hold", messages=[{"role": "user", "content": "?"}], stream=True
    )
    run_id = None
    for chunk in stream:
        extension = (chunk.model_extra or {}).get("rlmq")
        if extension and extension["event"] == "model_call":
            run_id = extension["run_id"]  # the model replied; its code now loops for ever
            break
    assert run_id is not None
    stream.close()
    trajectory = server.directory / "runs" / f"{run_id}.jsonl"
    # The run ends in another process; its trajectory is all that shows it, so poll the file
    # with a deadline.
    deadline = time.monotonic() + 30
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = json.loads(trajectory.read_text().splitlines()[-1])
        if last["event"] == "run_end":
            break
        time.sleep(0.05)
    assert last["event"] == "run_end"
    assert "CancelledError" in last["detail"]
    still_serving(server)


# ---------------------------------------------------------------- configuration and access


def test_no_keys_beyond_loopback_refuses_to_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, serve="")
    done = subprocess.run(
        [sys.executable, "-m", "rlmq", "serve", "--config", str(config), "--bind", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "beyond loopback needs bearer keys" in done.stderr


def test_settings_from_the_table(tmp_path: Path) -> None:
    make_data(tmp_path)
    config = write_config(
        tmp_path,
        serve='[serve]\napi_keys_env = "KEYS"\ndata_dir = "data"\n'
        "[serve.profiles.fast]\nmax_iterations = 2\n",
    )
    loaded = load_serve_config(config, env={"KEYS": "a, b,"})
    assert loaded.keys == {"a", "b"}
    assert (loaded.host, loaded.port) == ("127.0.0.1", 8080)
    assert loaded.data_dir == (tmp_path / "data").resolve()
    assert dict(loaded.profiles) == {"rlm": {}, "fast": {"max_iterations": 2}}
    assert load_serve_config(config, bind="[::1]:9000", env={}).open_access
    for bad, message in [
        ("[serve]\nmax_body = 3\n", "unknown key 'max_body'"),
        ("[serve.profiles.x]\nmax_iteration = 2\n", r"unknown key 'max_iteration' in \[serve.profiles.x\]"),
        ("[serve.profiles.x]\nmax_iterations = 0\n", "max_iterations must be at least 1"),
        ('[serve]\ndata_dir = "nowhere"\n', "is not a directory"),
        ('[serve]\nbind = "8080"\n', "HOST:PORT"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_serve_config(write_config(tmp_path, serve=bad))


async def test_open_access_on_loopback_when_no_keys_are_configured(tmp_path: Path) -> None:
    config = load_serve_config(write_config(tmp_path, serve=""), env={})
    app = make_app(config, {"rlm": None})  # listing the models runs nothing
    async with TestServer(app, host="127.0.0.1") as test_server:
        client = openai.AsyncOpenAI(
            base_url=str(test_server.make_url("/v1")), api_key="anything", max_retries=0
        )
        assert [m.id async for m in client.models.list()] == ["rlm"]
        await client.close()


def test_parse_chat_request() -> None:
    chat = parse_chat_request(json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode())
    assert (chat.model, chat.question, chat.context, chat.stream) == ("rlm", "q", "", False)
    with_path = {"messages": [{"role": "user", "content": "q"}], "context": {"path": "a.txt"}}
    assert parse_chat_request(json.dumps(with_path).encode()).context == ContextPath("a.txt")
    for bad in [b"[]", b'{"messages": []}', b'{"messages": [{"role": "user", "content": 3}]}']:
        with pytest.raises(BadRequest):
            parse_chat_request(bad)


def test_load_path_context_stays_inside(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    assert load_path_context(data, ContextPath("doc.txt")) == "twelve chars"
    assert load_path_context(data, ContextPath("docs")) == {"a.txt": "a", "b.txt": "b"}
    for escaping in ["../secret.txt", "/etc/passwd", "out.txt", "docs/../../secret.txt"]:
        with pytest.raises(Forbidden):
            load_path_context(data, ContextPath(escaping))
    with pytest.raises(BadRequest, match="no data directory"):
        load_path_context(None, ContextPath("doc.txt"))


def test_all_names_exist_once() -> None:
    import rlmq.serve

    assert len(set(rlmq.serve.__all__)) == len(rlmq.serve.__all__)
    assert all(hasattr(rlmq.serve, name) for name in rlmq.serve.__all__)

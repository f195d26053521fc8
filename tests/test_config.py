from __future__ import annotations

from pathlib import Path

import pytest

from rlmq.lmhandler.config import (
    GENERIC_CONTEXT_WINDOW_TOKENS,
    OFFLINE_CONCURRENCY,
    ConfigError,
    default_context_window,
    is_loopback_url,
    load_config,
    parse_config,
)
from rlmq.protocol import ConfigError as ProtocolConfigError

GOOD = """
[handler]
bind = "ipc:///tmp/x.sock"

[models.root]
backend = "anthropic"
model = "claude-sonnet-4-5"
api_key_env = "TEST_KEY"
price_in_per_mtok = 3.0
price_out_per_mtok = 15.0

[models.sub]
backend = "openai"
base_url = "http://127.0.0.1:8000/v1"
model = "qwen2.5-7b-instruct"
max_concurrency = 64
rpm = 600

[models.fake]
backend = "echo"
latency_ms = 20
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rlmq.toml"
    path.write_text(text)
    return path


def test_design_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={"TEST_KEY": "sk-1"})
    assert config.bind == "ipc:///tmp/x.sock"
    root, sub, fake = config.models["root"], config.models["sub"], config.models["fake"]
    assert root.api_key == "sk-1"
    assert "sk-1" not in repr(root)  # keys never reach logs through a repr
    assert sub.max_concurrency == 64
    assert sub.rpm == 600
    assert sub.api_key is None
    assert fake.max_concurrency == OFFLINE_CONCURRENCY
    assert root.cost_usd(1_000_000, 1_000_000, 0, 0) == pytest.approx(18.0)
    # cache reads at a tenth, writes at 1.25x the input price by default
    assert root.cost_usd(1_000_000, 0, 500_000, 500_000) == pytest.approx(0.15 + 1.875)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            '[models.a]\nbackend = "echo"\nmax_concurency = 3\n',
            "unknown key 'max_concurency' in [models.a]",
        ),
        ('[models.a]\nbackend = "gpt"\n', "backend 'gpt' is not one of"),
        ('[models.a]\nmodel = "x"\n', "needs 'backend'"),
        ('[models.a]\nbackend = "openai"\n', "needs 'model'"),
        ('[models.a]\nbackend = "script"\n', "needs 'path'"),
        ('[models.a]\nbackend = "echo"\nlatency_ms = "fast"\n', "[models.a] latency_ms must be"),
        ('[models.a]\nbackend = "echo"\nmax_concurrency = true\n', "got a boolean"),
        ('[models.a]\nbackend = "echo"\nmax_concurrency = 0\n', "at least 1"),
        (
            '[models.a]\nbackend = "echo"\ncontext_window_tokens = 0\n',
            "context_window_tokens must be at least 1",
        ),
        ('[handler]\nbind = "tcp://x:1"\n', "no models configured"),
        ('[models.a]\nbackend = "echo"\n[handler]\nport = 3\n', "unknown key 'port' in [handler]"),
        ('[model.a]\nbackend = "echo"\n', "unknown top-level table 'model'"),
        ("this is = not toml [", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_problem_and_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert fragment in info.value.message
    assert str(path) in info.value.message


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/rlmq.toml", env={})


def test_script_path_is_relative_to_the_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[models.s]\nbackend = "script"\npath = "s.json"\n'), env={})
    assert config.models["s"].path == str(tmp_path / "s.json")


def test_parse_config_in_memory() -> None:
    config = parse_config({"models": {"e": {"backend": "echo"}}}, env={})
    assert config.models["e"].model == "e"


def test_the_environment_is_an_argument_never_read_behind_the_callers_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_KEY", "sk-from-os-environ")
    path = write(tmp_path, GOOD)
    # os.environ has the key; the caller's environment does not
    assert load_config(path, env={}).models["root"].api_key is None
    assert (
        parse_config({"models": {"root": {"backend": "anthropic", "model": "c", "api_key_env": "TEST_KEY"}}})
        .models["root"]
        .key_problem()
    )
    assert load_config(path, env={"TEST_KEY": "sk-given"}).models["root"].api_key == "sk-given"


def test_rlmq_state_url_overrides_the_files_state_url(tmp_path: Path) -> None:
    plain = write(tmp_path, '[models.e]\nbackend = "echo"\n')
    assert load_config(plain, env={}).state.url is None
    given = {"RLMQ_STATE_URL": "redis://127.0.0.1:6390/1"}
    assert load_config(plain, env=given).state.url == "redis://127.0.0.1:6390/1"
    # The variable wins over the file's url and keeps the table's other settings.
    table = '[models.e]\nbackend = "echo"\n[state]\nurl = "redis://db:6379/0"\nkey_prefix = "x:"\n'
    with_url = load_config(write(tmp_path, table), env=given)
    assert (with_url.state.url, with_url.state.key_prefix) == ("redis://127.0.0.1:6390/1", "x:")
    assert load_config(write(tmp_path, table), env={"RLMQ_STATE_URL": ""}).state.url == "redis://db:6379/0"
    with pytest.raises(
        ConfigError, match=r"\$RLMQ_STATE_URL \(which overrides \[state\] url in .*\) 'http://x'"
    ):
        load_config(plain, env={"RLMQ_STATE_URL": "http://x"})


def test_an_unset_key_variable_is_one_line_naming_the_variable_and_the_alias(tmp_path: Path) -> None:
    """Start does not refuse (the handler's other models may serve): the line is logged at
    start and the call fails on use (tests/test_handler_http.py)."""
    config = load_config(write(tmp_path, GOOD), env={})
    problem = config.models["root"].key_problem()
    assert problem is not None
    assert "\n" not in problem
    assert "$TEST_KEY is not set" in problem
    assert "'root'" in problem
    assert config.models["fake"].key_problem() is None  # offline backends need no key
    assert config.models["sub"].key_problem() is None  # a base_url without api_key_env: keyless


@pytest.mark.parametrize(
    ("table", "variable"),
    [
        ({"backend": "anthropic", "model": "claude-sonnet-4-5"}, "ANTHROPIC_API_KEY"),
        ({"backend": "openai", "model": "gpt-4o"}, "OPENAI_API_KEY"),
    ],
)
def test_the_providers_own_api_reads_the_backends_usual_variable(
    table: dict[str, str], variable: str
) -> None:
    model = parse_config({"models": {"root": table}}, env={}).models["root"]
    assert model.api_key_env == variable
    problem = model.key_problem()
    assert problem is not None
    assert f"${variable} is not set" in problem
    assert "'root'" in problem
    given = parse_config({"models": {"root": table}}, env={variable: "sk-x"}).models["root"]
    assert given.api_key == "sk-x"
    assert given.key_problem() is None


def test_a_gateway_never_gets_the_providers_key_unless_named() -> None:
    table = {"backend": "openai", "model": "m", "base_url": "https://gateway.example/v1"}
    model = parse_config({"models": {"g": table}}, env={"OPENAI_API_KEY": "sk-openai"}).models["g"]
    assert model.api_key is None
    assert model.api_key_env is None
    assert model.key_problem() is None


def test_a_named_key_on_loopback_is_reported_but_may_run_keyless() -> None:
    table = {
        "backend": "openai",
        "model": "m",
        "base_url": "http://localhost:8080/v1",
        "api_key_env": "LOCAL_KEY",
    }
    model = parse_config({"models": {"l": table}}, env={}).models["l"]
    assert model.keyless_ok
    problem = model.key_problem()
    assert problem is not None
    assert "$LOCAL_KEY" in problem
    assert "without a key" in problem


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000/v1", True),
        ("http://127.9.9.9/v1", True),
        ("http://[::1]:8080", True),
        ("http://localhost:1234", True),
        ("http://10.0.0.5:8000/v1", False),
        ("https://api.openai.com/v1", False),
        ("http://llama:8080/v1", False),
        (None, False),
    ],
)
def test_loopback_urls(url: str | None, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback


@pytest.mark.parametrize(
    ("backend", "model", "tokens"),
    [
        ("anthropic", "claude-sonnet-4-5", 200_000),
        ("openai", "gpt-4o-mini", 128_000),
        ("openai", "gpt-4.1", 1_047_576),
        ("openai", "gpt-5-mini", 272_000),
        ("openai", "qwen2.5-7b-instruct", 32_768),
        ("openai", "Qwen/Qwen3-30B-A3B-Instruct-2507", 262_144),
        ("openai", "llama3.1:8b", 131_072),
        ("openai", "meta-llama/Meta-Llama-3.1-70B-Instruct", 131_072),
        ("openai", "gemma-3-27b-it", 131_072),
        ("openai", "some-model-we-never-heard-of", GENERIC_CONTEXT_WINDOW_TOKENS),
    ],
)
def test_context_windows_default_by_family(backend: str, model: str, tokens: int) -> None:
    assert default_context_window(backend, model) == tokens
    config = parse_config({"models": {"m": {"backend": backend, "model": model}}}, env={})
    assert config.models["m"].context_window_tokens == tokens


def test_context_window_set_in_the_config_wins(tmp_path: Path) -> None:
    text = GOOD.replace(
        'model = "qwen2.5-7b-instruct"', 'model = "qwen2.5-7b-instruct"\ncontext_window_tokens = 8192'
    )
    config = load_config(write(tmp_path, text), env={})
    assert config.models["sub"].context_window_tokens == 8192
    assert config.models["root"].context_window_tokens == 200_000
    assert config.models["fake"].context_window_tokens > 10**9  # offline backends read anything


def test_config_error_is_the_one_of_rlmq_protocol() -> None:
    assert ConfigError is ProtocolConfigError

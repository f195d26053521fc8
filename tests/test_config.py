from __future__ import annotations

from pathlib import Path

import pytest

from rlmq.lmhandler.config import OFFLINE_CONCURRENCY, ConfigError, load_config, parse_config
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
            '[models.a]\nbackend = "anthropic"\nmodel = "c"\napi_key_env = "NOPE_UNSET"\n',
            "$NOPE_UNSET, which is not set",
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
    with pytest.raises(ConfigError, match=r"\$TEST_KEY, which is not set"):
        load_config(path, env={})  # os.environ has the key; the caller's environment does not
    with pytest.raises(ConfigError, match="TEST_KEY"):
        parse_config({"models": {"root": {"backend": "anthropic", "model": "c", "api_key_env": "TEST_KEY"}}})
    assert load_config(path, env={"TEST_KEY": "sk-given"}).models["root"].api_key == "sk-given"


def test_config_error_is_the_one_of_rlmq_protocol() -> None:
    assert ConfigError is ProtocolConfigError

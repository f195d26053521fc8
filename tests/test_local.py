"""The private services that `rlmq run`, `rlmq demo`, `rlmq eval` and `RLM.from_config` start:
they serve only the runs their orchestrator opens, and the pool never holds a provider's key."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.asyncio

from rlmq.orchestrator.errors import NoServices
from rlmq.orchestrator.local import local_services, services_or_private
from rlmq.protocol import AsyncHandlerClient, ErrorCode, RemoteError, RunLimits


def _processes_running(needle: str) -> list[int]:
    """The pids whose command line contains ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


async def test_private_services_refuse_calls_without_a_run_and_keep_keys_from_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, actx: zmq.asyncio.Context
) -> None:
    monkeypatch.setenv("RLMQ_TEST_PROVIDER_KEY", "sk-not-for-the-pool")
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "sk-also-not-for-the-pool")
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.sub]\nbackend = "echo"\n')
    async with (
        local_services(config, workers=1) as services,
        AsyncHandlerClient(services.handler, context=actx, timeout_s=10) as client,
    ):
        # Code that finds the handler's socket cannot spend outside a run...
        with pytest.raises(RemoteError) as refused:
            await client.complete("spend", model="sub")
        assert refused.value.code == ErrorCode.UNAUTHORIZED
        # ...nor open a run nobody else could be kept out of...
        with pytest.raises(RemoteError) as keyless:
            await client.run_open("r-anyone", RunLimits(max_calls=2))
        assert keyless.value.code == ErrorCode.UNAUTHORIZED
        # ...while the orchestrator's own runs, opened with a key, are served.
        await client.run_open("r-local", RunLimits(max_calls=2), key="k" * 32)
        assert (await client.complete("ok", model="sub", run="r-local")).text == "ok"
        (pool_pid,) = _processes_running(f"sandbox --handler {services.handler}")
        environ = Path(f"/proc/{pool_pid}/environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0] for item in environ if item}
        assert b"SOME_PROVIDER_API_KEY" not in names
        assert b"RLMQ_TEST_PROVIDER_KEY" in names  # rlmq's own settings (CURVE keys) do reach it
        assert b"PATH" in names


async def test_given_addresses_are_used_and_no_config_is_a_typed_error(tmp_path: Path) -> None:
    async with services_or_private("ipc:///h", "ipc:///s", tmp_path / "absent.toml", guide="README") as got:
        assert got == ("ipc:///h", "ipc:///s")  # nothing started, the config not even read
    with pytest.raises(NoServices, match=r"no .*absent\.toml to start private ones with.*\(see README\)"):
        async with services_or_private(None, "ipc:///s", tmp_path / "absent.toml", guide="README"):
            pass

"""Host-side tools and sandbox_modules (rlmq.orchestrator.tools): real handler, pool and worker
processes, the script backend, through ``from rlmq import RLM``.

Each root model is a script (DESIGN.md section 3) whose code calls a tool; the tools are plain
functions of this test process, so a call they record proves it came back here, out of the
sandbox. A few in-memory tests (``InMemorySandbox``) cover the loop's side without processes.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlmq import RLM
from rlmq.orchestrator import RLM as Loop
from rlmq.orchestrator import RunSettings, SettingsError, StopReason, ToolBox, ToolFailed
from rlmq.orchestrator.testing import InMemorySandbox, ScriptedModelClient
from rlmq.orchestrator.tools import describe_function
from rlmq.protocol import ErrorCode, RlmqError

calls_seen: list[tuple[str, tuple[Any, ...]]] = []  # what the tools saw, in this process


def search(query: str, k: int = 3) -> list[str]:
    """Search the vendor index for ``query``.

    Returns at most ``k`` vendor names. (Not in the prompt: only the first paragraph is.)"""
    calls_seen.append(("search", (query, k, os.getpid())))
    return [f"{query}-{i}" for i in range(k)]


def boom(code: int) -> None:
    """Always fails."""
    raise ValueError(f"no such record {code}")


def unsendable() -> object:
    """Returns what msgpack cannot carry."""
    return {1, 2, 3}


async def slow() -> str:
    """Never answers in time."""
    await asyncio.Event().wait()  # never set: cancelled at the tool's timeout
    return "late"


async def lookup(key: str) -> dict[str, Any]:
    """An async tool."""
    await asyncio.sleep(0)  # a real await: the tool runs on the event loop
    return {"key": key, "value": len(key)}


TOOLS = {"search": search, "boom": boom, "unsendable": unsendable, "slow": slow, "lookup": lookup}


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


SCRIPTS = {
    # A tool called from the code, and its result used in the answer.
    "uses": [repl("hits = search('acme', k=2)\nprint(hits)"), repl("FINAL(f'{len(hits)}:{hits[-1]}')")],
    # A tool that raises: a Python exception in the code, caught there.
    "raises": [
        repl("try:\n    boom(7)\nexcept ToolError as e:\n    FINAL(f'{type(e).__name__}|{e.code}|{e}')")
    ],
    # ... and one not caught: the exec's error, the run goes on.
    "uncaught": [repl("boom(8)"), repl("FINAL('went on')")],
    "unsendable": [repl("try:\n    unsendable()\nexcept ToolError as e:\n    FINAL(f'{e.code}|{e}')")],
    "bad_argument": [repl("try:\n    search({1, 2})\nexcept TypeError as e:\n    FINAL(str(e))")],
    "slow": [repl("try:\n    slow()\nexcept ToolError as e:\n    FINAL(f'{e.code}|{e}')")],
    "async": [repl("FINAL(str(lookup('abcd')))")],
    # A child run (rlm_query) calls the tool too: the script is shared by the run's depths.
    "child": [
        repl("print(rlm_query('ask the index'))"),
        repl("FINAL(search('child', k=1)[0])"),
        "FINAL(done)",
    ],
    "modules": [repl("FINAL(f'{mean([1, 2, 3, 6])}|{median([5, 1, 3])}|{statistics.pstdev([2, 2])}')")],
}


def write_config(directory: Path) -> Path:
    lines = []
    for alias, script in SCRIPTS.items():
        (directory / f"{alias}.json").write_text(json.dumps(script))
        lines += [f"[models.{alias}]", 'backend = "script"', f'path = "{alias}.json"', ""]
    lines += [
        "[models.sub]",
        'backend = "echo"',
        "",
        "[sandbox]",
        "workers = 2",
        "uid_base = false",
        "",
        "[run]",
        "max_iterations = 4",
        "tool_timeout_s = 1.0  # the slow tool's: it never answers, so this bounds the test",
    ]
    path = directory / "rlmq.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def rlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RLM]:
    config = write_config(tmp_path_factory.mktemp("tools"))
    with RLM.from_config(config, tools=TOOLS, trajectory_dir=tmp_path_factory.mktemp("runs")) as shared:
        yield shared


def trajectory_events(path: Path | None, name: str) -> list[dict[str, Any]]:
    assert path is not None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in lines if e["event"] == name]


# ---------------------------------------------------------------- host-side tools, real processes


def test_a_tool_runs_here_and_its_result_is_used(rlm: RLM) -> None:
    calls_seen.clear()
    result = rlm.completion("Which vendors?", "ctx", root_model="uses")
    assert (result.answer, result.stop_reason) == ("2:acme-1", StopReason.FINAL)
    # The call ran in this process (the orchestrator's), not in the worker.
    assert calls_seen == [("search", ("acme", 2, os.getpid()))]
    execs = trajectory_events(result.trajectory, "exec_end")
    assert execs[0]["stdout"] == "['acme-0', 'acme-1']\n"
    # The system prompt describes the tool from its signature and its docstring's summary.
    system = trajectory_events(result.trajectory, "model_call")[0]["added"][0]["content"]
    assert "`search(query: str, k: int = 3) -> list[str]`: Search the vendor index for ``query``." in system
    assert "Not in the prompt" not in system
    assert "`boom(code: int) -> None`: Always fails." in system


def test_a_tool_that_raises_is_an_exception_in_the_code(rlm: RLM) -> None:
    result = rlm.completion("q", "ctx", root_model="raises")
    assert (
        result.answer
        == "ToolError|backend_error|boom() failed (backend_error): boom() raised ValueError: no such record 7"
    )


def test_an_uncaught_tool_error_is_the_blocks_error_and_the_run_goes_on(rlm: RLM) -> None:
    result = rlm.completion("q", "ctx", root_model="uncaught")
    assert (result.answer, result.iterations) == ("went on", 2)
    error = trajectory_events(result.trajectory, "exec_end")[0]["error"]
    assert error["type"] == "ToolError"
    assert "boom() raised ValueError: no such record 8" in error["message"]


def test_an_unserialisable_result_is_a_clear_error_in_the_code(rlm: RLM) -> None:
    answer = rlm.completion("q", "ctx", root_model="unsendable").answer
    assert answer.startswith("internal|unsendable() failed (internal): unsendable() returned a set, ")
    assert "cannot be sent to the sandbox (results must be msgpack values" in answer


def test_an_unserialisable_argument_is_refused_in_the_worker(rlm: RLM) -> None:
    calls_seen.clear()
    answer = rlm.completion("q", "ctx", root_model="bad_argument").answer
    assert answer.startswith("search(): its arguments must be msgpack values")
    assert calls_seen == []  # nothing reached the tool


def test_a_tool_past_its_timeout_is_a_timeout_error_in_the_code(rlm: RLM) -> None:
    answer = rlm.completion("q", "ctx", root_model="slow").answer
    assert answer == "timeout|slow() failed (timeout): slow() did not return within 1 s"


def test_an_async_tool_works(rlm: RLM) -> None:
    assert rlm.completion("q", "ctx", root_model="async").answer == "{'key': 'abcd', 'value': 4}"


def test_child_runs_see_the_same_tools(rlm: RLM) -> None:
    calls_seen.clear()
    result = rlm.completion("q", "ctx", root_model="child", max_depth=2)
    assert result.stop_reason == StopReason.FINAL
    root_exec = next(e for e in trajectory_events(result.trajectory, "exec_end") if e["depth"] == 0)
    assert root_exec["stdout"] == "child-0\n"
    assert calls_seen == [("search", ("child", 1, os.getpid()))]


def test_an_rlm_without_tools_gives_the_code_none(rlm: RLM) -> None:
    view = rlm.with_options(tools={}, root_model="uncaught")
    result = view.completion("q", "ctx")
    assert trajectory_events(result.trajectory, "exec_end")[0]["error"]["type"] == "NameError"


# ---------------------------------------------------------------- sandbox_modules


def test_sandbox_modules_put_helpers_in_the_repl(rlm: RLM) -> None:
    result = rlm.completion("q", "ctx", root_model="modules", sandbox_modules=["statistics"])
    assert result.answer == "3|3|0.0"
    system = trajectory_events(result.trajectory, "model_call")[0]["added"][0]["content"]
    assert "- `statistics`: the module `statistics`" in system
    assert "`median(data)`: Return the median (middle value) of numeric data." in system


def test_a_module_that_cannot_be_imported_fails_the_session_open(rlm: RLM) -> None:
    session = rlm.session("ctx", sandbox_modules=["no_such_helpers_xyz"])
    with pytest.raises(RlmqError, match="sandbox_modules: cannot import 'no_such_helpers_xyz'") as caught:
        session.open()
    assert caught.value.code == ErrorCode.BAD_REQUEST
    # A run stops at once with the same error, as any session that could not open.
    result = rlm.completion("q", "ctx", root_model="modules", sandbox_modules=["no_such_helpers_xyz"])
    assert result.stop_reason == StopReason.ERROR
    assert "cannot import 'no_such_helpers_xyz': ModuleNotFoundError" in result.detail


def test_a_module_may_not_replace_the_repls_names(rlm: RLM) -> None:
    # rlmq.orchestrator.testing defines LLMQueryError, as the REPL does.
    session = rlm.session("ctx", sandbox_modules=["rlmq.orchestrator.testing"])
    with pytest.raises(RlmqError, match="'LLMQueryError' would replace a name the REPL already has"):
        session.open()
    assert session.closed


def test_sandbox_modules_must_be_module_names() -> None:
    with pytest.raises(SettingsError, match="not a module name"):
        RunSettings(sandbox_modules=("os path",)).validated()
    with pytest.raises(SettingsError, match="not a str"):
        RunSettings(sandbox_modules="statistics")  # type: ignore[arg-type]
    assert RunSettings(sandbox_modules=["a.b"]).sandbox_modules == ("a.b",)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the loop's side, in memory


def test_toolbox_refuses_names_the_repl_has() -> None:
    with pytest.raises(ValueError, match="REPL has that name"):
        ToolBox({"FINAL": print})
    with pytest.raises(ValueError, match="Python identifier"):
        ToolBox({"class": print})


def test_describe_function_reads_signature_and_first_paragraph() -> None:
    assert describe_function("search", search) == (
        "search(query: str, k: int = 3) -> list[str]",
        "Search the vendor index for ``query``.",
    )
    assert describe_function("len", len)[0] == "len(obj, /)"


def test_toolbox_call_maps_every_failure_to_tool_failed() -> None:
    box = ToolBox(TOOLS)

    async def main() -> None:
        assert await box.call("search", ["x"], {"k": 1}, timeout_s=None) == ["x-0"]
        assert await box.call("lookup", ["ab"], {}, timeout_s=None) == {"key": "ab", "value": 2}
        for name, args, code in (
            ("boom", [1], ErrorCode.BACKEND_ERROR),
            ("unsendable", [], ErrorCode.INTERNAL),
            ("slow", [], ErrorCode.TIMEOUT),
            ("missing", [], ErrorCode.BAD_REQUEST),
        ):
            with pytest.raises(ToolFailed) as caught:
                await box.call(name, args, {}, timeout_s=0.2)
            assert caught.value.code == code

    asyncio.run(main())


def test_the_loop_passes_tools_to_every_session_in_memory() -> None:
    models = ScriptedModelClient()
    models.script(
        "run-t", [repl("print(rlm_query('sub'))"), repl("FINAL(search('in', k=1)[0])"), "FINAL(done)"]
    )
    sandbox = InMemorySandbox(models)
    loop = Loop(models, sandbox, RunSettings(max_depth=2), tools=ToolBox({"search": search}))
    result = asyncio.run(loop.run("q", "ctx", run_id="run-t"))
    assert result.stop_reason == StopReason.FINAL
    assert sandbox.sessions[0].namespace["search"].__name__ == "search"
    assert "search" in sandbox.sessions[1].namespace  # the child's session too


def test_a_sandbox_that_takes_no_tools_stops_the_run_clearly() -> None:
    models = ScriptedModelClient()
    plain = InMemorySandbox(models)

    class NoTools:
        async def open(
            self,
            *,
            run: str,
            context: Any,
            depth: int,
            max_depth: int,
            sub_model: str,
            exec_timeout_s: float | None,
            max_output_chars: int | None,
            on_rlm_query: Any,
        ) -> Any:
            return await plain.open(run=run, context=context)

    loop = Loop(models, NoTools(), RunSettings(), tools=ToolBox({"search": search}))
    result = asyncio.run(loop.run("q", "ctx"))
    assert result.stop_reason == StopReason.ERROR
    assert "need a sandbox that takes them; NoTools does not" in result.detail
    assert models.requests == []  # stopped before any model call


# ---------------------------------------------------------------- the wire and the worker's side


def test_tool_fields_travel_on_the_sandbox_protocol() -> None:
    from rlmq.protocol.sandbox import OpenRequest, RlmQuery, RlmResult
    from rlmq.sandbox._wire import Assign, RlmAnswer, WorkerRlmQuery

    req = OpenRequest("o1", "run", tools=("search",), sandbox_modules=("statistics",))
    assert OpenRequest.from_wire(req.to_wire(), "o1", 0) == req
    assert "tools" not in OpenRequest("o2", "run").to_wire()  # absent when empty: older pools see nothing new
    query = RlmQuery("q1", "s1", "", None, "search", ["acme"], {"k": 2})
    assert RlmQuery.from_wire(query.to_wire(), 0) == query
    result = RlmResult("q1", "s1", True, text="", value={"hits": [1, 2]})
    assert RlmResult.from_wire(result.to_wire(), "q1", 0) == result
    call = WorkerRlmQuery("t1", "", None, "search", ["acme"], {"k": 2})
    assert WorkerRlmQuery.from_wire(call.to_wire(), 0) == call
    answer = RlmAnswer("t1", True, value=[1, "two"])
    assert RlmAnswer.from_wire(answer.to_wire(), 0) == answer
    assign = Assign("s1", "run", 0, "sub", 100, "text", None, tools=("search",), modules=("statistics",))
    assert Assign.from_wire(assign.to_wire(), 1) == assign


def test_the_repl_gives_tools_and_module_names_and_keeps_its_own() -> None:
    from rlmq.sandbox.runtime import Repl, load_modules

    class Calls:
        def complete(self, prompt: Any, model: str | None) -> str:
            raise AssertionError

        def complete_many(self, prompts: Any, model: str | None) -> list[str]:
            raise AssertionError

        def rlm_query(self, prompt: str, context: Any) -> str:
            raise AssertionError

        def tool_call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
            return [name, args, kwargs]

    calls = Calls()
    repl_ = Repl("ctx", calls, tools=("search",), tool_calls=calls, extra=load_modules(["statistics"]))
    result = repl_.run("print(search(1, k=2), mean([1, 3]), statistics.median([1, 2, 3]))")
    assert result.stdout == "['search', [1], {'k': 2}] 2 2\n"
    refused = repl_.run("search(object())").error
    assert refused is not None
    assert (refused.type, refused.message.split(":")[0]) == ("TypeError", "search()")
    with pytest.raises(ValueError, match="REPL has that name"):
        Repl("ctx", calls, tools=("FINAL",), tool_calls=calls)
    with pytest.raises(ImportError, match="cannot import 'no_such_helpers_xyz'"):
        load_modules(["no_such_helpers_xyz"])

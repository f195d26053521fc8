"""rlmq view: the tail reader, the events endpoint, the CLI, and the page in a real headless chromium."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from rlmq.orchestrator.loop import RLM
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import InMemorySandbox, ModelRequest, ScriptedModelClient
from rlmq.orchestrator.trajectory import Trajectory
from rlmq.view import cli as view_cli
from rlmq.view.page import render_page
from rlmq.view.server import ViewServer, serving
from rlmq.view.tail import newest_run, parse_lines, read_from, read_lines
from tests.conftest import requires

CHROMIUM = "/usr/bin/chromium"
HAVE_BROWSER = shutil.which("chromedriver") is not None and Path(CHROMIUM).exists()
needs_browser = requires(HAVE_BROWSER, "Debian's chromium and chromium-driver (chromedriver)")
WAIT_S = 30  # bound of every wait on the page


# ---------------------------------------------------------------------------------- trajectories
def _ev(events: list[dict[str, Any]], kind: str, **fields: Any) -> None:
    level = fields.pop("level", "0")
    depth = fields.pop("depth", level.count("."))
    events.append(
        {"event": kind, "t": round(len(events) * 0.01, 3), "level": level, "depth": depth, **fields}
    )


def _usage(i: int, o: int) -> dict[str, int]:
    return {"input_tokens": i, "output_tokens": o, "cache_read_tokens": 0, "cache_write_tokens": 0}


def _sub(events: list[dict[str, Any]], iteration: int, block: int, seq: int, *, tail: bool = False) -> None:
    prompt = f"Find vault codes in chunk {seq}: routine lines"
    _ev(
        events,
        "sub_call",
        depth=1,
        iteration=iteration,
        block=block,
        seq=seq,
        model="sub",
        prompt=prompt,
        prompt_tail="... and the tail of the long prompt" if tail else None,
        prompt_chars=len(prompt) + (5000 if tail else 0),
        prompt_sha256="ab" * 32,
        text=None if seq == 2 else f"answer {seq}: vault Orion code {10000 + seq}",
        usage={"input_tokens": 100, "output_tokens": 10},
        cost_usd=0.0001,
        cached=seq == 3,
        error={"code": "timeout", "message": "no answer in 30 s", "retryable": True} if seq == 2 else None,
        started_ms=float(seq % 40),
        latency_ms=200.0 + seq % 300,
        replayed=False,
        diverged=False,
    )


def _iteration_start(events: list[dict[str, Any]], iteration: int, code: str, *, level: str = "0") -> None:
    _ev(
        events,
        "model_call",
        level=level,
        iteration=iteration,
        purpose="iteration",
        model="root",
        reset=iteration == 1,
        added=[{"role": "user", "content": f"observation before iteration {iteration}"}],
        response=f"Iteration {iteration}.\n```repl\n{code}\n```",
        stop_reason="end_turn",
        usage=_usage(1000, 50),
        cost_usd=0.004,
        latency_ms=500.0,
        cached=False,
    )
    _ev(events, "exec_start", level=level, iteration=iteration, block=0, code=code)


def _exec_end(events: list[dict[str, Any]], iteration: int, stdout: str, calls: int, **fields: Any) -> None:
    _ev(
        events,
        "exec_end",
        iteration=iteration,
        block=0,
        stdout=stdout,
        stderr="",
        error=None,
        final=fields.pop("final", None),
        final_var=None,
        ending=fields.pop("ending", None),
        elapsed_ms=800.0,
        llm_calls=calls,
        truncated_chars=0,
        state_lost=False,
        **fields,
    )


def run_head(n_subs: int = 12, *, blocks_of: int | None = None) -> list[dict[str, Any]]:
    """A schema-2 run up to the end of its first iterations: batched sub-calls and a child run."""
    events: list[dict[str, Any]] = []
    _ev(
        events,
        "run_start",
        schema=2,
        run="run-view",
        query="Which vault codes hide in the log?",
        context="str",
    )
    per = blocks_of or n_subs
    for iteration, first in enumerate(range(0, n_subs, per), start=1):
        _iteration_start(events, iteration, "r = llm_query_batched(chunks)\nprint(len(r))")
        for seq in range(per):
            _sub(events, iteration, 0, first + seq if blocks_of else seq, tail=seq == 5)
        if iteration == 1:
            _ev(
                events,
                "child_start",
                level="0.1",
                parent="0",
                iteration=1,
                block=0,
                query="Summarise the decoys",
            )
            _iteration_start(events, 1, "FINAL('decoys are noise')", level="0.1")
            _ev(
                events,
                "exec_end",
                level="0.1",
                iteration=1,
                block=0,
                stdout="",
                stderr="",
                error=None,
                final="decoys are noise",
                final_var=None,
                ending="final",
                elapsed_ms=2.0,
                llm_calls=0,
            )
            _ev(events, "final", level="0.1", answer="decoys are noise", stop_reason="final", iterations=1)
            _ev(events, "child_end", level="0.1", parent="0", answer="decoys are noise", stop_reason="final")
        _exec_end(events, iteration, f"{per}\n", per)
    return events


def run_tail(iteration: int) -> list[dict[str, Any]]:
    """The last iteration (FINAL) and run_end of a run."""
    events: list[dict[str, Any]] = []
    _iteration_start(events, iteration, "FINAL('Orion 10001')")
    _exec_end(events, iteration, "", 0, final="Orion 10001", ending="final")
    _ev(events, "final", answer="Orion 10001", stop_reason="final", iterations=iteration)
    run_usage = {"run": "run-view", "calls": 16, "usage": _usage(4000, 150), "cost_usd": 0.0111}
    _ev(
        events,
        "run_end",
        run="run-view",
        stop_reason="final",
        answer="Orion 10001",
        iterations=iteration,
        elapsed_s=2.5,
        usage=run_usage,
        error=None,
    )
    return events


def lines(events: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    path = tmp_path / "run-view.jsonl"
    path.write_text(lines(run_head() + run_tail(2)), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- tail reader
def test_read_from_keeps_a_torn_last_line_for_later(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    first, second = json.dumps({"event": "a", "n": 1}), json.dumps({"event": "b", "n": 2})
    path.write_text(first + "\n" + second[:9], encoding="utf-8")  # the writer is mid-line
    chunk = read_from(path, 0)
    assert [e["event"] for e in chunk.events] == ["a"]
    assert chunk.offset == len(first) + 1
    assert chunk.size > chunk.offset

    assert read_from(path, chunk.offset).events == []  # still torn: nothing, same offset
    assert read_from(path, chunk.offset).offset == chunk.offset

    with path.open("a", encoding="utf-8") as f:
        f.write(second[9:] + "\n" + json.dumps({"event": "c"}) + "\n")
    rest = read_from(path, chunk.offset)
    assert [e["event"] for e in rest.events] == ["b", "c"]
    assert rest.offset == path.stat().st_size
    assert not rest.reset


def test_read_from_skips_bad_lines_and_notices_a_rewritten_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text('{"event": "a"}\nnot json\n[1, 2]\n\n{"event": "b"}\n', encoding="utf-8")
    chunk = read_from(path, 0)
    assert [e["event"] for e in chunk.events] == ["a", "b"]
    assert chunk.bad_lines == 2

    path.write_text('{"event": "new"}\n', encoding="utf-8")  # shorter than what was read: a new run
    again = read_from(path, chunk.offset)
    assert again.reset
    assert [e["event"] for e in again.events] == ["new"]
    assert read_from(tmp_path / "missing.jsonl", 0).events == []


def test_read_from_cuts_at_the_chunk_size_but_returns_a_long_line_whole(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    long_line = json.dumps({"event": "long", "text": "x" * 5000})
    path.write_text(long_line + "\n" + '{"event": "short"}\n' * 100, encoding="utf-8")
    chunk = read_from(path, 0, max_bytes=1000)
    assert [e["event"] for e in chunk.events] == ["long"]
    assert chunk.more
    events = chunk.events
    while chunk.more:
        chunk = read_from(path, chunk.offset, max_bytes=1000)
        events += chunk.events
    assert len(events) == 101
    assert chunk.offset == path.stat().st_size


def test_read_lines_notices_a_file_rewritten_in_place_that_grew_past_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text('{"event": "run_start", "run": "a"}\n{"event": "ask"}\n', encoding="utf-8")
    first = read_lines(path, 0)
    assert first.generation
    # Rewritten in place (same inode) by another run, and already longer than what was read.
    with path.open("r+b") as f:
        f.truncate(0)
        f.write(b'{"event": "run_start", "run": "b"}\n' + b'{"event": "model_call", "n": 12345}\n' * 3)
    assert not read_lines(path, first.offset).reset  # the offset alone cannot tell
    again = read_lines(path, first.offset, generation=first.generation)
    assert again.reset
    assert parse_lines(again.data)[0][0] == {"event": "run_start", "run": "b"}
    assert again.generation != first.generation
    # Appending keeps the generation: no reset.
    with path.open("ab") as f:
        f.write(b'{"event": "run_end"}\n')
    more = read_lines(path, again.offset, generation=again.generation)
    assert not more.reset
    assert parse_lines(more.data)[0] == [{"event": "run_end"}]
    assert more.generation == again.generation
    # Replaced by another file with the same first line (a new inode): a new generation too.
    other = tmp_path / "other.jsonl"
    other.write_bytes(path.read_bytes() + b'{"event": "extra"}\n')
    os.replace(other, path)
    assert read_lines(path, more.offset, generation=more.generation).reset


def test_newest_run(tmp_path: Path) -> None:
    assert newest_run(tmp_path / "nowhere") is None
    assert newest_run(tmp_path) is None
    old, new = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    old.write_text("{}\n")
    new.write_text("{}\n")
    (tmp_path / "notes.txt").write_text("not a run")
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    assert newest_run(tmp_path) == new


# ---------------------------------------------------------------------------------- server
async def test_events_endpoint_follows_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    head = lines(run_head(3))
    path.write_text(head + '{"event": "exec_st', encoding="utf-8")  # torn last line
    server = ViewServer(path)
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "events", params={"offset": "0"}) as r:
                body = await r.read()
            assert r.status == 200
            assert r.headers["Cache-Control"] == "no-store"
            assert body == head.encode()  # whole lines only, as the file has them
            offset = int(r.headers["X-Rlmq-Offset"])
            assert offset == len(head.encode())
            assert r.headers["X-Rlmq-Reset"] == "0"

            # A held request (long poll) answers with what is appended while it waits; whether the
            # append lands before or after the request arrives, the answer is the same.
            async def held() -> list[dict[str, Any]]:
                async with http.get(url + "events", params={"offset": str(offset), "wait": "20"}) as r:
                    return parse_lines(await r.read())[0]

            task = asyncio.create_task(held())
            with path.open("a", encoding="utf-8") as f:
                f.write('art", "level": "0", "iteration": 9, "block": 0, "code": "x = 1"}\n')
            second = await asyncio.wait_for(task, 30)
            assert [e["event"] for e in second] == ["exec_start"]
            assert second[0]["code"] == "x = 1"

            path.write_text('{"event": "run_start"}\n', encoding="utf-8")  # rewritten by a new run
            async with http.get(url + "events", params={"offset": str(offset)}) as r:
                assert r.headers["X-Rlmq-Reset"] == "1"
                assert parse_lines(await r.read())[0] == [{"event": "run_start"}]

            async with http.get(url + "events", params={"offset": "-1"}) as r:
                assert r.status == 400
            for bad in ({"offset": "inf"}, {"offset": "nan"}, {"offset": "-inf"}, {"wait": "nan"}):
                async with http.get(url + "events", params=bad) as r:
                    assert r.status == 400, bad
            async with http.get(url + "events", headers={"Host": "evil.example:80"}) as r:
                assert r.status == 403  # DNS rebinding: only loopback names are served
            async with http.get(url) as r:
                page = await r.text()
            assert r.status == 200
            assert '"events_url":"events"' in page
    finally:
        await server.stop()


async def test_events_endpoint_restarts_a_page_when_the_file_was_rewritten_past_its_offset(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text('{"event": "run_start", "run": "a"}\n', encoding="utf-8")
    server = ViewServer(path)
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "events", params={"offset": "0", "gen": ""}) as r:
                await r.read()
                offset, gen = r.headers["X-Rlmq-Offset"], r.headers["X-Rlmq-Generation"]
            assert gen
            # Another run rewrites the file in place, longer than what the page has read.
            with path.open("r+b") as f:
                f.truncate(0)
                f.write(b'{"event": "run_start", "run": "b"}\n{"event": "ask", "query": "a longer one"}\n')
            async with http.get(url + "events", params={"offset": offset, "gen": gen}) as r:
                assert r.headers["X-Rlmq-Reset"] == "1"
                events = parse_lines(await r.read())[0]
                assert r.headers["X-Rlmq-Generation"] != gen
            assert [e["event"] for e in events] == ["run_start", "ask"]
            assert events[0]["run"] == "b"
    finally:
        await server.stop()


def test_page_embeds_events_safely() -> None:
    evil = {"event": "exec_end", "stdout": "</script><script>alert(1)</script><!--"}
    page = render_page(title="x</title>", events=[evil])
    assert "</script><script>alert" not in page
    assert "<!--rlmq:" not in page
    assert "x&lt;/title&gt;" in page
    assert "http://" not in page
    assert "https://" not in page


# ---------------------------------------------------------------------------------- CLI
def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    view_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_without_a_run_says_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert view_cli.main(_args("--runs-dir", str(tmp_path / "runs"), "--html", str(tmp_path / "x.html"))) == 2
    assert "no trajectory" in capsys.readouterr().err
    assert view_cli.main(_args(str(tmp_path / "missing.jsonl"), "--html", str(tmp_path / "x.html"))) == 2
    assert view_cli.main(_args(str(tmp_path / "a.jsonl"), "--port", "70000")) == 2


def test_cli_html_takes_the_newest_run(tmp_path: Path, recorded: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    older = runs / "older.jsonl"
    older.write_text(lines(run_head(1)), encoding="utf-8")
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    shutil.copy(recorded, runs / "newer.jsonl")
    out = tmp_path / "page.html"
    assert view_cli.main(_args("--runs-dir", str(runs), "--html", str(out))) == 0
    page = out.read_text(encoding="utf-8")
    assert "newer.jsonl" in page
    assert "answer 11: vault Orion code 10011" in page


@pytest.mark.parametrize(
    "content",
    ['{"a": 1}\n', "plain text, not JSON\n", "", '{"event": "mystery"}\n[1, 2]\n'],
    ids=["json-object", "text", "empty", "unknown-event"],
)
def test_cli_html_refuses_a_file_with_no_trajectory_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path = tmp_path / "notatrajectory.json"
    path.write_text(content, encoding="utf-8")
    out = tmp_path / "out.html"
    assert view_cli.main(_args(str(path), "--html", str(out))) == 2
    assert f"{path} is not a trajectory: it holds no trajectory event" in capsys.readouterr().err
    assert not out.exists()


def test_cli_live_refuses_a_file_whose_first_line_is_not_an_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notatrajectory.json"
    path.write_text('{"a": 1}\n' + lines(run_head(1)), encoding="utf-8")
    assert view_cli.main(_args(str(path), "--no-open")) == 2  # refused before serving anything
    captured = capsys.readouterr()
    assert "its first line is not a trajectory event" in captured.err
    assert "http://" not in captured.out
    assert view_cli.main(_args(str(tmp_path), "--no-open")) == 2
    assert "is a directory" in capsys.readouterr().err


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    with selectors.DefaultSelector() as sel:
        assert proc.stdout is not None
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise AssertionError(f"rlmq view printed nothing in {timeout_s} s")
        return proc.stdout.readline()


def test_cli_serves_until_sigterm(recorded: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlmq", "view", str(recorded), "--no-open"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, 60)
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:")
        assert str(recorded) in line
        with urllib.request.urlopen(url + "events?offset=0", timeout=30) as r:
            events, bad = parse_lines(r.read())
        assert events[0]["event"] == "run_start"
        assert events[-1]["event"] == "run_end"
        assert bad == 0
        request = urllib.request.Request(url, headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        refused.value.close()
        assert refused.value.code == 403
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_cli_live_waits_for_a_missing_file_then_reports_what_it_is(tmp_path: Path) -> None:
    """A file that does not exist yet is waited for; once its first line shows it is not a
    trajectory, the viewer says so and exits 2."""
    path = tmp_path / "later.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlmq", "view", str(path), "--no-open"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _read_line(proc, 60).startswith("rlmq view: http://127.0.0.1:")  # serving, waiting
        assert proc.poll() is None
        path.write_text("hello, not a trajectory\n", encoding="utf-8")
        assert proc.wait(timeout=30) == 2
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "does not exist yet" in err
        assert f"{path} is not a trajectory: its first line is not a trajectory event" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------------------------- the page in chromium
@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1200",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, what: Callable[[WebDriver], Any], message: str) -> Any:
    return WebDriverWait(driver, WAIT_S).until(what, message)


def text_of(driver: WebDriver, css: str) -> str:
    return "\n".join(el.text for el in driver.find_elements(By.CSS_SELECTOR, css))


def search(driver: WebDriver, text: str) -> str:
    """Type ``text`` in the search box, wait until the page shows its result; the match count."""
    box = driver.find_element(By.ID, "search")
    box.clear()
    box.send_keys(text)
    count = driver.find_element(By.ID, "match-count")
    wanted = text.strip().lower()
    wait_for(
        driver, lambda d: count.get_attribute("data-query") == wanted, f"search for {text!r} never applied"
    )
    return str(count.text)


def check_recorded_run(driver: WebDriver) -> None:
    """What a recorded run must show: iterations, blocks, sub-call answers, search, child, totals."""
    wait_for(driver, lambda d: "finished: final" in text_of(d, "#status"), "run never shown as finished")
    assert len(driver.find_elements(By.CSS_SELECTOR, 'section[data-level="0"] > .iters > .iter')) == 2
    assert "Orion 10001" in text_of(driver, 'section[data-level="0"] > div > .run-foot .answer')
    assert text_of(driver, ".total-cost") == "$0.0111"  # run_end's usage, the handler's count
    head = text_of(driver, '.iter[data-iteration="1"] > .iter-head')
    assert "12 sub-calls" in head
    assert "in /" in head
    assert "print(len(r))" in text_of(driver, '.iter[data-iteration="1"] pre.code')
    # The child run sits under the block that started it.
    child = driver.find_element(By.CSS_SELECTOR, '.iter[data-iteration="1"] .block section.run.child')
    assert child.get_attribute("data-level") == "0.1"
    assert "decoys are noise" in child.text

    # Sub-calls are collapsed to one summary line until asked for.
    assert driver.find_elements(By.CSS_SELECTOR, ".sub") == []
    driver.find_element(By.CSS_SELECTOR, 'section[data-level="0"] .subs-toggle').click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".sub")) == 12, "sub-call rows not shown")
    assert driver.find_element(By.CSS_SELECTOR, ".waterfall").get_attribute("data-bars") == "12"
    rows = text_of(driver, ".sub")
    assert "answer 7: vault Orion code 10007" in rows
    assert "timeout: no answer in 30 s" in rows
    driver.find_element(By.CSS_SELECTOR, '.sub[data-seq="5"] .sub-line').click()
    body = wait_for(
        driver, lambda d: d.find_element(By.CSS_SELECTOR, '.sub[data-seq="5"] .sub-body'), "no body"
    )
    assert "characters not recorded" in body.text
    assert "the tail of the long prompt" in body.text
    assert "answer 5: vault Orion code 10005" in body.text

    assert search(driver, "CODE 10007") == "1 of 12 sub-calls match"
    shown = driver.find_elements(By.CSS_SELECTOR, ".sub")
    assert len(shown) == 1
    assert "answer 7" in shown[0].text
    assert driver.find_element(By.CSS_SELECTOR, ".sub mark").text.lower() == "code 10007"
    assert search(driver, "no answer in 30") == "1 of 12 sub-calls match"  # errors are searchable too
    assert "#2" in text_of(driver, ".sub")


@needs_browser
def test_served_page_shows_the_sub_calls_and_searches_them(browser: WebDriver, recorded: Path) -> None:
    with serving(recorded) as url:
        browser.get(url)
        check_recorded_run(browser)


@needs_browser
def test_html_file_works_without_a_server(browser: WebDriver, recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared.html"
    assert view_cli.main(_args(str(recorded), "--html", str(out))) == 0
    browser.get(out.as_uri())  # no server runs at all
    check_recorded_run(browser)


@needs_browser
def test_page_follows_a_live_run(browser: WebDriver, tmp_path: Path) -> None:
    events = run_head(12) + run_tail(2)
    # The run is inside its first block: 6 of its 12 sub-calls answered, the writer mid-line.
    running = next(i for i, e in enumerate(events) if e["event"] == "sub_call" and e["seq"] == 6)
    done, rest = lines(events[:running]), lines(events[running:])
    cut = rest.index("\n") // 2
    path = tmp_path / "live.jsonl"
    path.write_text(done + rest[:cut], encoding="utf-8")
    with serving(path) as url:
        browser.get(url)
        wait_for(
            browser, lambda d: "6 sub-calls" in text_of(d, ".subs-toggle"), "the running block not shown"
        )
        assert text_of(browser, "#status") == "live"
        assert "running" in text_of(browser, ".block-head")
        assert browser.find_elements(By.CSS_SELECTOR, '.iter[data-iteration="2"]') == []
        # What the reader opened stays open while the block grows under it.
        browser.find_element(By.CSS_SELECTOR, 'section[data-level="0"] .subs-toggle').click()
        browser.find_element(By.CSS_SELECTOR, 'details[data-fold^="m|0|1|"] > summary').click()

        with path.open("a", encoding="utf-8") as f:  # the rest of the torn line, then the rest of the run
            f.write(rest[cut:])
        wait_for(browser, lambda d: "finished: final" in text_of(d, "#status"), "the run's end never arrived")
        assert "FINAL('Orion 10001')" in text_of(browser, '.iter[data-iteration="2"] pre.code')
        assert "Orion 10001" in text_of(browser, ".run-foot .answer")
        assert len(browser.find_elements(By.CSS_SELECTOR, '.iter[data-iteration="1"] .sub')) == 12
        fold = browser.find_element(By.CSS_SELECTOR, 'details[data-fold^="m|0|1|"]')
        assert fold.get_attribute("open") is not None
        assert "observation before iteration 1" in fold.text
        assert "ran 800 ms" in text_of(browser, '.iter[data-iteration="1"] .block-head')


@needs_browser
@pytest.mark.timeout(300)
def test_ten_thousand_sub_calls_load_collapsed_and_search(browser: WebDriver, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(lines(run_head(10_000, blocks_of=2_500) + run_tail(5)), encoding="utf-8")
    with serving(path, chunk_bytes=1 << 20) as url:  # several answers: the page builds up chunk by chunk
        browser.get(url)
        wait_for(browser, lambda d: "finished: final" in text_of(d, "#status"), "the big run never loaded")
        assert "10000 sub-calls" in text_of(browser, "#totals")
        assert len(browser.find_elements(By.CSS_SELECTOR, 'section[data-level="0"] > .iters > .iter')) == 5
        # Collapsed: the page holds summaries, not 10,000 rows.
        nodes = browser.execute_script("return document.getElementsByTagName('*').length")
        assert nodes < 3000, nodes
        assert browser.find_elements(By.CSS_SELECTOR, ".sub") == []

        browser.find_element(By.CSS_SELECTOR, '.iter[data-iteration="3"] .subs-toggle').click()
        wait_for(
            browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".sub")) == 100, "first page of rows"
        )
        browser.find_element(By.CSS_SELECTOR, ".subs button.more").click()
        wait_for(
            browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".sub")) == 200, "second page of rows"
        )

        assert search(browser, "code 17777") == "1 of 10000 sub-calls match"
        shown = browser.find_elements(By.CSS_SELECTOR, ".sub")
        assert len(shown) == 1
        assert "answer 7777: vault Orion code 17777" in shown[0].text
        # Thousands match (every answer but the failed one): still only a page of rows per block.
        assert search(browser, "vault orion code 1") == "9999 of 10000 sub-calls match"
        assert len(browser.find_elements(By.CSS_SELECTOR, ".sub")) <= 4 * 100


@needs_browser
def test_schema_1_runs_are_shown_too(browser: WebDriver, tmp_path: Path) -> None:
    """Before issue 15: no level, one `exec` per block, whole messages; children known by depth."""

    def call(depth: int, iteration: int, response: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": "q"}]
        return {
            "event": "model_call",
            "t": 0.1,
            "depth": depth,
            "iteration": iteration,
            "purpose": "iteration",
            "messages": messages,
            "response": response,
            "usage": _usage(10, 5),
            "latency_ms": 5.0,
        }

    def exec_(depth: int, iteration: int, code: str, stdout: str) -> dict[str, Any]:
        return {
            "event": "exec",
            "t": 0.2,
            "depth": depth,
            "iteration": iteration,
            "block": 0,
            "code": code,
            "stdout": stdout,
            "stderr": "",
            "error": None,
            "final": None,
            "elapsed_ms": 3.0,
            "llm_calls": 1,
        }

    events = [
        {"event": "run_start", "t": 0.0, "run": "old-run", "query": "old question", "context": "str"},
        call(0, 1, "```repl\nprint(rlm_query('inner'))\n```"),
        {"event": "child_start", "t": 0.15, "depth": 1, "query": "inner", "context": "str"},
        call(1, 1, "```repl\nprint('child output')\n```"),
        exec_(1, 1, "print('child output')", "child output\n"),
        {"event": "final", "t": 0.16, "depth": 1, "answer": "inner answer", "stop_reason": "final"},
        exec_(0, 1, "print(rlm_query('inner'))", "inner answer\n"),
        {"event": "run_end", "t": 0.3, "run": "old-run", "stop_reason": "final", "answer": "old answer"},
    ]
    path = tmp_path / "old.jsonl"
    path.write_text(lines(events), encoding="utf-8")
    out = tmp_path / "old.html"
    assert view_cli.main(_args(str(path), "--html", str(out))) == 0
    browser.get(out.as_uri())
    wait_for(browser, lambda d: "finished: final" in text_of(d, "#status"), "old run not shown")
    assert "inner answer" in text_of(
        browser, 'section[data-level="0"] > .iters > .iter > .block > details > pre.stdout'
    )
    child = browser.find_element(By.CSS_SELECTOR, '.iter[data-iteration="1"] .block section.run.child')
    assert "child output" in child.text
    assert "inner answer" in child.text
    assert "old answer" in text_of(browser, 'section[data-level="0"] > div > .run-foot .answer')


# ---------------------------------------------------------------------------------- a run of the real writer
REAL_CONTEXT = "vault Orion 1111\nvault Lyra 2222\nrotated log segment 7e43"
REAL_ROOT = [
    "I look first.\n```repl\nlines = context.splitlines()\nprint(len(lines), 'lines')\n```",
    "One batch, and a child run for the decoys.\n```repl\n"
    "found = llm_query_batched(['find codes in: ' + l for l in lines])\n"
    "summary = rlm_query('summarise the decoys')\nprint(found[1], '|', summary)\n```",
    "```repl\nFINAL(found[0] + ' / ' + summary)\n```",
]
REAL_CHILD = [
    "```repl\nnote = llm_query('child looks at decoys')\nprint('child saw', note)\n```",
    "FINAL_VAR(note)",
]


def _sub_answer(request: ModelRequest) -> str:
    return "answer to " + request.last_user


@pytest.fixture
async def written(tmp_path: Path) -> Path:
    """A trajectory written by the orchestrator's own writer (RLM + Trajectory), not by hand: a
    root run with a batch of 3 sub-calls and an rlm_query child that makes one of its own."""
    model = ScriptedModelClient(reply=_sub_answer)
    model.script("real", REAL_ROOT, depth=0)
    model.script("real", REAL_CHILD, depth=1)
    path = tmp_path / "real.jsonl"
    trajectory = Trajectory(path)
    try:
        result = await RLM(model, InMemorySandbox(model), RunSettings(max_depth=2)).run(
            "Which codes?", REAL_CONTEXT, run_id="real", trajectory=trajectory
        )
    finally:
        trajectory.close()
    assert result.answer == "answer to find codes in: vault Orion 1111 / answer to child looks at decoys"
    return path


@needs_browser
def test_page_shows_a_run_written_by_the_real_writer(browser: WebDriver, written: Path) -> None:
    with serving(written) as url:
        browser.get(url)
        wait_for(browser, lambda d: "finished: final" in text_of(d, "#status"), "run never shown as finished")
        root = 'section[data-level="0"] > .iters > .iter'
        assert len(browser.find_elements(By.CSS_SELECTOR, root)) == 3
        assert "answer to find codes in: vault Orion 1111 / answer to child looks at decoys" in text_of(
            browser, 'section[data-level="0"] > div > .run-foot .answer'
        )
        second = root + '[data-iteration="2"]'
        assert "4 sub-calls" in text_of(browser, second + " > .iter-head")  # the batch's 3 and the child's 1
        # The code block with its output (the batch's second answer and the child's).
        assert "llm_query_batched" in text_of(browser, second + " > .block > details > pre.code")
        assert "answer to find codes in: vault Lyra 2222 | answer to child looks at decoys" in text_of(
            browser, second + " > .block > details > pre.stdout"
        )
        # The child run, nested under the block that started it, with its own code, output and answer.
        child = browser.find_element(By.CSS_SELECTOR, second + " > .block .children > section.run.child")
        assert child.get_attribute("data-level") == "0.1"
        assert "child saw answer to child looks at decoys" in text_of(browser, "section.run.child pre.stdout")
        assert "answer to child looks at decoys" in text_of(browser, "section.run.child .run-foot .answer")

        # The batch's sub-calls under the root block: each prompt and answer.
        browser.find_element(By.CSS_SELECTOR, second + " > .block > .subs > .subs-toggle").click()
        wait_for(
            browser,
            lambda d: len(d.find_elements(By.CSS_SELECTOR, second + " > .block > .subs .sub")) == 3,
            "the batch's rows not shown",
        )
        rows = text_of(browser, second + " > .block > .subs .sub")
        for line in REAL_CONTEXT.splitlines():
            assert f"answer to find codes in: {line}" in rows
        browser.find_element(
            By.CSS_SELECTOR, second + ' > .block > .subs .sub[data-seq="2"] .sub-line'
        ).click()
        body = wait_for(
            browser, lambda d: d.find_element(By.CSS_SELECTOR, ".sub .sub-body"), "the sub-call never opened"
        )
        assert (
            "find codes in: rotated log segment 7e43" in body.find_element(By.CSS_SELECTOR, "pre.prompt").text
        )
        assert (
            "answer to find codes in: rotated log segment 7e43"
            in body.find_element(By.CSS_SELECTOR, "pre.answer-text").text
        )
        # The child's own sub-call, under the child's block.
        child.find_element(By.CSS_SELECTOR, ".subs-toggle").click()
        wait_for(
            browser,
            lambda d: "answer to child looks at decoys" in text_of(d, "section.run.child .sub"),
            "the child's sub-call not shown",
        )
        assert search(browser, "Lyra") == "1 of 4 sub-calls match"

"""``rlmq view [RUN.jsonl]``: a run's trajectory in the browser, live while the run writes it.

Without a file it shows the newest ``*.jsonl`` in ``rlmq-runs/``. It serves one page on
127.0.0.1 (a free port unless ``--port``), prints its URL and opens the browser (not with
``--no-open``), and runs until interrupted. ``--html FILE`` writes one self-contained page
instead (events, script and style inline) that needs no server and no network.
Exit status: 0 after a clean stop or a written file, 2 when there is no trajectory to show: no
file, a file with no trajectory event, or (live) a file whose first line is not one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import webbrowser
from pathlib import Path

from .page import render_page
from .server import POLL_S, ViewServer
from .tail import first_line, is_trajectory_event, newest_run, read_from

__all__ = ["add_arguments", "main"]

DEFAULT_RUNS_DIR = Path("rlmq-runs")  # where `rlmq run` writes trajectories


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The page shows the iterations as a timeline, each code block with its output and error, the "
        "sub-calls it made (prompt and answer on expand, a search box over all of them), child runs "
        "nested under their block, tokens and cost per iteration, and a latency waterfall of each "
        "block's sub-calls. docs/view.md has more."
    )
    parser.add_argument(
        "run",
        nargs="?",
        metavar="RUN.jsonl",
        help="the trajectory to show (default: the newest *.jsonl in --runs-dir)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=DEFAULT_RUNS_DIR,
        help="where to look for the newest trajectory when none is given (default: %(default)s)",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 to serve on (default: a free one)"
    )
    parser.add_argument("--no-open", action="store_true", help="print the URL only; do not open a browser")
    parser.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="write one self-contained HTML file (no server, no network needed) and exit",
    )


def _fail(message: str) -> int:
    print(f"rlmq view: {message}", file=sys.stderr)
    return 2


def _not_a_trajectory(path: Path, what: str) -> int:
    return _fail(
        f"{path} is not a trajectory: {what} (a trajectory is the JSON lines `rlmq run` writes, "
        "first a run_start event; docs/trajectory.md)"
    )


def _is_event_line(line: bytes) -> bool:
    try:
        return is_trajectory_event(json.loads(line))
    except ValueError:
        return False


def main(args: argparse.Namespace) -> int:
    if args.run is not None:
        path = Path(args.run)
    else:
        newest = newest_run(args.runs_dir)
        if newest is None:
            return _fail(f"no trajectory (*.jsonl) in {args.runs_dir}/: give one as RUN.jsonl, or --runs-dir")
        path = newest
    if not 0 <= args.port <= 65535:
        return _fail(f"--port must be 0..65535, not {args.port}")
    if args.html is not None:
        return _write_html(path, args.html)
    if path.is_dir():
        return _fail(f"{path} is a directory: give a trajectory file, or the directory as --runs-dir")
    if not path.exists():
        # A run started at the same moment may not have written its first line yet.
        print(f"rlmq view: {path} does not exist yet; the page shows it once it is written", file=sys.stderr)
    else:
        line = first_line(path)
        if line is not None and not _is_event_line(line):
            return _not_a_trajectory(path, "its first line is not a trajectory event")
    return asyncio.run(_serve(path, port=args.port, open_browser=not args.no_open))


def _write_html(path: Path, out: Path) -> int:
    if not path.is_file():
        return _fail(f"no such trajectory: {path}")
    chunk = read_from(path, 0, max_bytes=max(path.stat().st_size, 1))
    if not any(is_trajectory_event(e) for e in chunk.events):
        return _not_a_trajectory(path, "it holds no trajectory event")
    if chunk.bad_lines:
        print(
            f"rlmq view: skipped {chunk.bad_lines} line(s) of {path} that were not JSON objects",
            file=sys.stderr,
        )
    try:
        out.write_text(render_page(title=path.name, events=chunk.events), encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot write {out}: {exc.strerror or exc}")
    print(out)
    return 0


async def _watch_first_line(path: Path, stop: asyncio.Event) -> int:
    """Until the file has a first whole line: 0 when it is a trajectory event, else 2 (and ``stop``)."""
    while (line := await asyncio.to_thread(first_line, path)) is None:
        # A file has no event to wait on: look again, as the server's long poll does.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_S)
        if stop.is_set():
            return 0
    if _is_event_line(line):
        return 0
    _not_a_trajectory(path, "its first line is not a trajectory event")
    stop.set()
    return 2


async def _serve(path: Path, *, port: int, open_browser: bool) -> int:
    server = ViewServer(path, port=port)
    try:
        url = await server.start()
    except OSError as exc:
        return _fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A file not written yet is waited for; what it turns out to be once written is checked.
    watch = asyncio.create_task(_watch_first_line(path, stop))
    try:
        print(f"rlmq view: {url} ({path})", flush=True)
        if open_browser:
            # webbrowser may block while it starts a browser: keep the loop serving meanwhile.
            await asyncio.to_thread(webbrowser.open, url)
        await stop.wait()
        return await watch
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await server.stop()

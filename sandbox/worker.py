"""A sandbox worker process: ``python -m rlmq.sandbox.worker SPEC_JSON`` (started by the pool).

Start-up, before the worker announces READY:

1. import everything the worker and, likely, the model's code need (after the uid drop an
   interpreter in a private directory such as /root cannot be read any more), and move into a
   network namespace of its own (``spec.netns``; bubblewrap has made one already);
2. fork. The parent stays root as the *nanny*: a child subreaper that reaps every process the
   model's code starts and, when the code-running child dies, kills and reaps whatever is left,
   then exits with the child's status (128 + signal when it was killed). The model's code cannot
   signal the nanny (it is root), and its own parent is the nanny, never the pool.
3. the child: new session, connect to the pool and to the pool's sub-call relay (its only way to
   a model: the relay stamps run and depth) while still root, apply the rlimits, chdir into its
   private directory, drop to the unprivileged uid, forbid new privileges, start the heartbeat
   thread, send READY, and serve one session.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import itertools
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import zmq

from rlmq.protocol import (
    CompleteReply,
    ErrorReply,
    HandlerClient,
    RemoteError,
    RlmqError,
    TransportTimeout,
    pack,
)
from rlmq.protocol.client import configure_socket
from rlmq.protocol.errors import ErrorCode, ErrorInfo
from rlmq.protocol.sandbox import (
    ExecError,
    ExecResult,
    SessionInfo,
    context_shape,
    decode_context,
    encode_context,
)

from . import procs
from ._wire import (
    Assign,
    Exec,
    FromPool,
    Heartbeat,
    Loaded,
    Ready,
    Result,
    RlmAnswer,
    WorkerRlmQuery,
    decode_from_pool,
)
from .runtime import DEFAULT_MAX_SUB_CALLS, LLMQueryError, Repl, RLMQueryError, ToolError, load_modules
from .spec import DEFAULT_MAX_BATCH, WorkerSpec

__all__ = ["main"]

log = logging.getLogger("rlmq.sandbox.worker")

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# Exit codes of the nanny when something went wrong before the child could report.
EXIT_ORPHANED = 70
EXIT_NO_POOL = 72
EXIT_SETUP = 73

WINDOWS_PING_S = 2.0  # how long a worker waits for the handler to tell its context windows


# ---------------------------------------------------------------- OS helpers

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def _preimport(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional convenience: a missing module is not fatal...
            # ...but after the uid drop it cannot be imported lazily either: say which one.
            log.warning("preimport %s failed (model code importing it will fail): %s", name, exc)


def _connect(sock: zmq.Socket[Any], address: str, timeout_s: float) -> bool:
    """Connect and, for ipc://, wait until the connection exists: after the uid drop the socket
    file may no longer be reachable, so the connection must be made while we are root."""
    if not address.startswith("ipc://"):
        sock.connect(address)
        return True
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        sock.connect(address)
        return bool(monitor.poll(int(timeout_s * 1000)))
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def _apply_limits(spec: WorkerSpec) -> None:
    mib = 1024 * 1024
    memory = spec.memory_mb * mib
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # soft: SIGXCPU (the worker dies, reported as the CPU limit); hard: SIGKILL shortly after
    resource.setrlimit(resource.RLIMIT_CPU, (spec.cpu_s, spec.cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec.fsize_mb * mib, spec.fsize_mb * mib))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if spec.uid is not None:
        # Counted per real uid, and ignored for uid 0: only meaningful after the drop below.
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.nproc, spec.nproc))
    # A write past RLIMIT_FSIZE should be an OSError (EFBIG) in the code, not the worker's death.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _drop_privileges(spec: WorkerSpec) -> None:
    if spec.uid is None or os.geteuid() != 0:
        return
    gid = spec.gid if spec.gid is not None else spec.uid
    os.setgroups([])
    os.setgid(gid)
    os.setuid(spec.uid)
    if os.getuid() != spec.uid or os.geteuid() != spec.uid:
        raise OSError("setuid did not take effect")


# ---------------------------------------------------------------- nanny


def _nanny(child: int) -> int:
    """Reap everything below us until the child is gone, then kill and reap the rest."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status: int | None = None
    while status is None:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            return EXIT_SETUP
        if pid == child:
            status = st
    procs.reap_descendants()
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# ---------------------------------------------------------------- child: sub-calls


class PoolLink:
    """The worker's DEALER to the pool, shared by the serve loop and rlm_query (which the model's
    threads may call too): a lock, and answers parked by id until their caller takes them."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._answers: dict[str, RlmAnswer] = {}
        self._inbox: deque[tuple[FromPool, list[zmq.Frame]]] = deque()
        self._ids = itertools.count(1)

    def send(self, header: dict[str, Any], blobs: Sequence[Any] = ()) -> None:
        with self._lock:
            self._sock.send_multipart([pack(header), *blobs], copy=False)

    def _pump(self, timeout_ms: int) -> None:
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            return
        frames = self._sock.recv_multipart(copy=False)
        try:
            message = decode_from_pool(frames[0].buffer, len(frames) - 1)
        except RlmqError as exc:
            log.warning("unreadable message from the pool dropped: %s", exc.message)
            return
        if isinstance(message, RlmAnswer):
            self._answers[message.id] = message
        else:
            self._inbox.append((message, list(frames[1:])))

    def next_message(self, timeout_ms: int) -> tuple[FromPool, list[zmq.Frame]] | None:
        with self._lock:
            if not self._inbox:
                self._pump(timeout_ms)
            return self._inbox.popleft() if self._inbox else None

    def _wait(self, qid: str, timeout_s: float) -> RlmAnswer | None:
        """The answer to request ``qid``, or None past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                answer = self._answers.pop(qid, None)
                if answer is None:
                    self._pump(50)
                    answer = self._answers.pop(qid, None)
            if answer is not None:
                return answer
            if time.monotonic() > deadline:
                return None

    def tool_call(self, name: str, args: list[Any], kwargs: dict[str, Any], timeout_s: float) -> Any:
        """Call the host-side tool ``name`` through the pool (the way of rlm_query)."""
        qid = f"t{next(self._ids)}"
        self.send(WorkerRlmQuery(qid, "", None, name, args, kwargs).to_wire())
        answer = self._wait(qid, timeout_s)
        if answer is None:
            info = ErrorInfo(ErrorCode.TIMEOUT, f"{name}(): no answer within {timeout_s:g} s", True)
            raise ToolError(info.message, info=info)
        if not answer.ok:
            error = answer.error or ErrorInfo(ErrorCode.INTERNAL, "the tool failed")
            raise ToolError(f"{name}() failed ({error.code}): {error.message}", info=error)
        return answer.value

    def rlm_query(self, prompt: str, context: Any, timeout_s: float) -> str:
        qid = f"q{next(self._ids)}"
        fmt: str | None = None
        blobs: list[Any] = []
        if context is not None:
            fmt, payload = encode_context(context)
            blobs = [payload]
        self.send(WorkerRlmQuery(qid, prompt, fmt).to_wire(), blobs)
        answer = self._wait(qid, timeout_s)
        if answer is None:
            info = ErrorInfo(ErrorCode.TIMEOUT, f"no answer to rlm_query within {timeout_s:g} s", True)
            raise RLMQueryError(info.message, info=info)
        if not answer.ok:
            error = answer.error or ErrorInfo(ErrorCode.RLM_FAILED, "the child run failed")
            raise RLMQueryError(f"rlm_query failed: ({error.code}) {error.message}", info=error)
        return answer.text


class SubCalls:
    """``llm_query`` through the handler (tagged with the run and depth + 1), ``rlm_query``
    through the pool to the orchestrator."""

    def __init__(
        self,
        client: HandlerClient,
        link: PoolLink,
        sub_model: str,
        windows: Mapping[str, int] | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        """``windows``: the handler's context windows by alias, if already known (the start-up
        ping); else asked once, on the first sub-call. ``max_batch``: calls in flight at once (the
        relay refuses more), so a larger batch goes in waves of that many."""
        self.client = client
        self.link = link
        self.sub_model = sub_model
        self.max_batch = max_batch
        self.exec_timeout_s = 3600.0  # updated per exec; bounds rlm_query's wait
        self._windows = None if windows is None else dict(windows)

    def context_window(self, model: str | None) -> tuple[str, int] | None:
        """The alias ``model`` resolves to and its context window, from the handler's ping. An
        older handler (or one that does not answer) tells none: the handler's admission still
        refuses an oversized prompt, only after a round trip."""
        alias = model if isinstance(model, str) and model else self.sub_model
        if self._windows is None:
            try:
                self._windows = dict(self.client.ping(timeout_s=WINDOWS_PING_S).context_windows)
            except RlmqError as exc:
                log.warning("the handler did not tell its context windows: %s", exc.message)
                self._windows = {}
        tokens = self._windows.get(alias)
        return None if tokens is None else (alias, tokens)

    @staticmethod
    def _check_prompt(prompt: Any, what: str) -> None:
        if isinstance(prompt, str):
            return
        if isinstance(prompt, list | tuple) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        ):
            return
        raise TypeError(
            f"{what} prompt must be a str (or a list of {{role, content}} maps), not {type(prompt).__name__}"
        )

    def complete(self, prompt: Any, model: str | None) -> str:
        self._check_prompt(prompt, "llm_query")
        alias = model or self.sub_model
        try:
            return self.client.complete(prompt, model=alias).text
        except (RemoteError, TransportTimeout) as exc:
            info = ErrorInfo.of(exc)
            raise LLMQueryError(f"llm_query failed ({info.code}): {info.message}", info=info) from None

    def complete_many(self, prompts: Sequence[Any], model: str | None) -> list[str]:
        for i, prompt in enumerate(prompts):
            self._check_prompt(prompt, f"llm_query_batched: prompts[{i}]")
        alias = model or self.sub_model
        replies: list[CompleteReply | ErrorReply] = []
        # Waves of at most max_batch in flight; a wave with a failure ends the batch (its answers
        # would be thrown away with the error), so the later waves are not spent.
        for start in range(0, len(prompts), self.max_batch):
            try:
                wave = self.client.complete_many(prompts[start : start + self.max_batch], model=alias)
            except TransportTimeout as exc:
                info = ErrorInfo.of(exc)
                raise LLMQueryError(
                    f"llm_query_batched failed ({info.code}): {info.message}", info=info
                ) from None
            replies.extend(wave)
            if any(isinstance(r, ErrorReply) for r in wave):
                break
        failed = [i for i, r in enumerate(replies) if isinstance(r, ErrorReply)]
        if failed:
            first = replies[failed[0]]
            assert isinstance(first, ErrorReply)
            shown = ", ".join(map(str, failed[:20])) + (", ..." if len(failed) > 20 else "")
            unsent = len(prompts) - len(replies)
            rest = f"; the last {unsent:,} prompts were not sent" if unsent else ""
            info = ErrorInfo(first.code, first.message, first.retryable, first.retry_after_s)
            raise LLMQueryError(
                f"llm_query_batched: {len(failed)} of {len(prompts)} prompts failed (indexes {shown}){rest}; "
                f"first error, at index {failed[0]}: ({first.code}) {first.message}",
                info=info,
            )
        return [r.text for r in replies if not isinstance(r, ErrorReply)]

    def rlm_query(self, prompt: str, context: Any) -> str:
        return self.link.rlm_query(prompt, context, self.exec_timeout_s)

    def tool_call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self.link.tool_call(name, args, kwargs, self.exec_timeout_s)


# ---------------------------------------------------------------- child: serve

_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


def _refuse_in_fork() -> None:
    if _forked:
        raise RuntimeError("sub-calls are not available in a process forked by the code")


class _Worker:
    def __init__(
        self,
        spec: WorkerSpec,
        ctx: zmq.Context[Any],
        link: PoolLink,
        client: HandlerClient,
        windows: Mapping[str, int] | None = None,
    ) -> None:
        self.spec = spec
        self.ctx = ctx
        self.link = link
        self.client = client
        self.windows = windows  # of the default handler, when its start-up ping told them
        self.repl: Repl | None = None
        self.calls: SubCalls | None = None

    def serve(self) -> NoReturn:
        while True:
            item = self.link.next_message(1000)
            if item is None:
                continue
            message, blobs = item
            item = None  # the context frame must not outlive its decoding (40 MB and more)
            if isinstance(message, Assign):
                loaded = self._assign(message, blobs.pop())
                self.link.send(loaded.to_wire())
            elif isinstance(message, Exec):
                result = self._exec(message)
                if _forked:  # a child forked by the code came back here: never touch the sockets
                    os._exit(0)
                self.link.send(Result(message.id, result).to_wire())

    def _assign(self, msg: Assign, blob: zmq.Frame) -> Loaded:
        if self.repl is not None:
            return Loaded(False, error=ErrorInfo(ErrorCode.BAD_REQUEST, "worker already has a session"))
        started = time.perf_counter()
        try:
            context = decode_context(msg.context_format, blob.buffer)
        except ValueError as exc:
            return Loaded(False, error=ErrorInfo(ErrorCode.BAD_REQUEST, str(exc)))
        except MemoryError:
            message = f"the context does not fit in the worker's memory limit ({self.spec.memory_mb} MB)"
            return Loaded(False, error=ErrorInfo(ErrorCode.TOO_LARGE, message))
        load_ms = (time.perf_counter() - started) * 1000.0
        # Sub-calls carry no run or depth from here: the relay writes the session's on each.
        # A session with a handler of its own learns that handler's windows on first use.
        windows = self.windows if msg.handler is None else None
        calls = SubCalls(self.client, self.link, msg.sub_model, windows, max_batch=self.spec.max_batch)
        try:
            extra = load_modules(msg.modules)
        except ImportError as exc:
            return Loaded(False, error=ErrorInfo(ErrorCode.BAD_REQUEST, str(exc)))
        try:
            repl = Repl(
                context,
                calls,
                max_output_chars=msg.max_output_chars,
                rlm_error=msg.rlm_error,
                on_fork_check=_refuse_in_fork,
                memory_mb=self.spec.memory_mb,
                windows=calls.context_window,
                max_sub_calls=msg.max_sub_calls or DEFAULT_MAX_SUB_CALLS,
                tools=msg.tools,
                tool_calls=calls,
                extra=extra,
            )
        except ValueError as exc:  # a tool or module name that would replace one of the REPL's
            return Loaded(False, error=ErrorInfo(ErrorCode.BAD_REQUEST, str(exc)))
        self.calls, self.repl = calls, repl
        kind, length, chars = context_shape(context)
        return Loaded(True, SessionInfo(os.getpid(), kind, length, chars, round(load_ms, 3)))

    def _exec(self, msg: Exec) -> ExecResult:
        if self.repl is None or self.calls is None:
            error = ExecError("exception", "RuntimeError", "this worker has no session", "")
            return ExecResult("", "", error, None, None, 0.0, 0, 0, False)
        self.calls.exec_timeout_s = msg.timeout_s
        return self.repl.run(msg.code)


def _heartbeat(sock: zmq.Socket[Any], interval_s: float, parent: int) -> None:
    beat = pack(Heartbeat().to_wire())
    while True:
        if os.getppid() != parent:  # the nanny is gone: nobody will reap or report us
            os._exit(EXIT_ORPHANED)
        with contextlib.suppress(zmq.Again):
            sock.send(beat, zmq.NOBLOCK)
        time.sleep(interval_s)


def _child(spec: WorkerSpec, nanny: int) -> NoReturn:
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != nanny:
        os._exit(EXIT_ORPHANED)
    ctx: zmq.Context[Any] = zmq.Context()
    main_sock = ctx.socket(zmq.DEALER)
    hb_sock = ctx.socket(zmq.DEALER)
    relay_sock = ctx.socket(zmq.DEALER)
    # All three are made now, while the pool's directory can be entered: after the uid drop it
    # cannot, so the code can reuse these sockets but never open a channel of its own.
    for sock, ident, address in (
        (main_sock, spec.wid, spec.pool),
        (hb_sock, spec.wid + ":hb", spec.pool),
        (relay_sock, spec.relay_id, spec.relay),
    ):
        configure_socket(sock)
        sock.setsockopt(zmq.ROUTING_ID, ident.encode())
        if not _connect(sock, address, spec.connect_timeout_s):
            log.error("worker %s cannot reach the pool at %s", spec.wid, address)
            os._exit(EXIT_NO_POOL)
    client = HandlerClient(spec.relay, context=ctx, sock=relay_sock)
    windows: Mapping[str, int] | None = None
    # The handler's context windows, so llm_query refuses oversized prompts at once.
    try:
        windows = client.ping(timeout_s=WINDOWS_PING_S).context_windows or None
    except RlmqError as exc:
        log.warning("worker %s: the handler did not answer a ping: %s", spec.wid, exc.message)
    _apply_limits(spec)
    os.chdir(spec.workdir)
    os.umask(0o077)
    _drop_privileges(spec)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot give the code its privileges back
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the uid change cleared it
    if os.getppid() != nanny:
        os._exit(EXIT_ORPHANED)
    os.register_at_fork(after_in_child=_mark_forked)
    threading.Thread(
        target=_heartbeat, args=(hb_sock, spec.heartbeat_interval_s, nanny), name="heartbeat", daemon=True
    ).start()
    link = PoolLink(main_sock)
    link.send(Ready(os.getpid()).to_wire())
    _Worker(spec, ctx, link, client, windows).serve()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="worker: %(levelname)s %(message)s", stream=sys.stderr)
    if len(argv) != 1:
        print("usage: python -m rlmq.sandbox.worker SPEC_JSON (started by the sandbox pool)", file=sys.stderr)
        return 2
    spec = WorkerSpec.from_json(argv[0])
    os.environ.pop("PWD", None)  # set by the launcher's /bin/sh; nothing of the parent's stays
    _preimport(spec.preimport)
    try:
        procs.unshare_network(spec.netns)  # before any model code, for the nanny and the child
    except OSError as exc:
        log.error("worker %s: no network namespace (%s); not starting without one", spec.wid, exc)
        return EXIT_SETUP
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the pool (or bubblewrap) dies: so do we
    if os.getppid() != parent:
        return EXIT_ORPHANED
    nanny = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            _child(spec, nanny)
        except BaseException:
            log.exception("worker %s failed to start", spec.wid)
            os._exit(EXIT_SETUP)
    return _nanny(child)


if __name__ == "__main__":
    sys.exit(main())

"""Drives the official RLM implementation (PyPI ``rlms``, package ``rlm``) through its public API.

Runs under the separate virtualenv ``bench/bench_rlms.py`` makes (it never imports rlmq, and rlmq
never imports this). The mock model is the same as rlmq's ``echo`` backend: it answers the prompt
verbatim after ``--latency-ms``, plugged in the way rlms takes any model: a ``BaseLM`` subclass.

    serve --latency-ms L     start rlm.core.lm_handler.LMHandler with that model; print
                             "ready on HOST:PORT"; serve until killed
    load  --address H:P ...  a closed loop of sub-calls the way rlms' REPL environments make them
                             (rlm.core.comms_utils.send_lm_request, one per llm_query), from
                             --concurrency threads; waits for "go" on stdin; prints one JSON line
    batch --address H:P ...  one llm_query_batched-style call (send_lm_request_batched); prints
                             one JSON line with its wall time
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from rlm.clients.base_lm import BaseLM
from rlm.core.comms_utils import LMRequest, send_lm_request, send_lm_request_batched
from rlm.core.lm_handler import LMHandler
from rlm.core.types import ModelUsageSummary, UsageSummary


class EchoLM(BaseLM):
    """The prompt back after a fixed latency, with usage counted as rlmq's echo does (4 chars/token)."""

    def __init__(self, latency_s: float) -> None:
        super().__init__(model_name="echo")
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self._last = ModelUsageSummary(0, 0, 0)

    @staticmethod
    def _text(prompt: str | dict[str, Any]) -> str:
        if isinstance(prompt, str):
            return prompt
        return str(prompt.get("content", prompt))

    def _count(self, text: str) -> None:
        tokens = max(1, len(text) // 4)
        with self._lock:
            self.calls += 1
            self.input_tokens += tokens
            self.output_tokens += tokens
            self._last = ModelUsageSummary(1, tokens, tokens)

    def completion(self, prompt: str | dict[str, Any]) -> str:
        if self.latency_s:
            time.sleep(self.latency_s)
        text = self._text(prompt)
        self._count(text)
        return text

    async def acompletion(self, prompt: str | dict[str, Any]) -> str:
        import asyncio

        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = self._text(prompt)
        self._count(text)
        return text

    def get_usage_summary(self) -> UsageSummary:
        with self._lock:
            summary = ModelUsageSummary(self.calls, self.input_tokens, self.output_tokens)
        return UsageSummary(model_usage_summaries={"echo": summary})

    def get_last_usage(self) -> ModelUsageSummary:
        return self._last


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def serve(args: argparse.Namespace) -> None:
    handler = LMHandler(EchoLM(args.latency_ms / 1000.0), host="127.0.0.1", port=0)
    host, port = handler.start()
    print(f"ready on {host}:{port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        handler.stop()


def load(args: argparse.Namespace) -> None:
    address = _address(args.address)
    prompt = "x" * args.prompt_bytes
    per_thread = [
        args.requests // args.concurrency + (i < args.requests % args.concurrency)
        for i in range(args.concurrency)
    ]
    latencies: list[list[float]] = [[] for _ in per_thread]
    errors: list[dict[str, int]] = [{} for _ in per_thread]
    first_send = [float("inf")] * len(per_thread)
    last_reply = [0.0] * len(per_thread)
    start = threading.Event()

    def worker(i: int) -> None:
        start.wait()
        for _ in range(per_thread[i]):
            t0 = time.monotonic()
            first_send[i] = min(first_send[i], t0)
            response = send_lm_request(address, LMRequest(prompt=prompt, depth=1), timeout=args.timeout_s)
            now = time.monotonic()
            last_reply[i] = now
            if response.success and response.chat_completion is not None:
                latencies[i].append((now - t0) * 1000.0)
            else:
                key = (response.error or "error").split(":")[0][:40]
                errors[i][key] = errors[i].get(key, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(per_thread))]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    start.set()
    for t in threads:
        t.join()
    merged: dict[str, int] = {}
    for e in errors:
        for k, v in e.items():
            merged[k] = merged.get(k, 0) + v
    print(
        json.dumps(
            {
                "ok": sum(len(lat) for lat in latencies),
                "errors": merged,
                "first_send": min(first_send),
                "last_reply": max(last_reply),
                "latencies_ms": [x for lat in latencies for x in lat],
            }
        ),
        flush=True,
    )


def batch(args: argparse.Namespace) -> None:
    prompts = [f"{i}:" + "x" * args.prompt_bytes for i in range(args.size)]
    started = time.monotonic()
    responses = send_lm_request_batched(_address(args.address), prompts, timeout=args.timeout_s)
    elapsed = time.monotonic() - started
    ok = sum(
        1
        for r, p in zip(responses, prompts, strict=True)
        if r.success and r.chat_completion and r.chat_completion.response == p
    )
    print(json.dumps({"size": args.size, "ok": ok, "elapsed_s": elapsed}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p = sub.add_parser("load")
    p.add_argument("--address", required=True)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-bytes", type=int, default=16)
    p.add_argument("--timeout-s", type=int, default=60)
    p = sub.add_parser("batch")
    p.add_argument("--address", required=True)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--prompt-bytes", type=int, default=16)
    p.add_argument("--timeout-s", type=int, default=600)
    args = parser.parse_args()
    {"serve": serve, "load": load, "batch": batch}[args.cmd](args)


if __name__ == "__main__":
    main()

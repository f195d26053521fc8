"""`rlmq serve` and the official openai SDK, offline: `python examples/serve_client.py`.

Starts `rlmq serve --config examples/offline.toml` on a free loopback port, asks it a question
twice (plain, then streamed with progress), and stops it. Needs `pip install openai`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import openai

CONFIG = Path(__file__).with_name("offline.toml")
REVIEWS = ["Great battery life.", "Stopped working after a week.", "Good value.", "The strap broke."]


def main() -> int:
    server = subprocess.Popen(
        [sys.executable, "-m", "rlmq", "serve", "--config", str(CONFIG), "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()  # "rlmq serve ready on http://127.0.0.1:PORT"
        if not ready.startswith("rlmq serve ready on "):
            print("the server did not start", file=sys.stderr)
            return 1
        url = ready.split()[-1]
        # No keys in the config: open access, which rlmq serve allows on loopback only.
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as client:
            print("models:", [m.id for m in client.models.list()])
            reply = client.chat.completions.create(
                model="rlm",
                messages=[{"role": "user", "content": "How many reviews are positive?"}],
                extra_body={"context": REVIEWS},  # rlmq's extension: the context, not a message
            )
            print("answer:", reply.choices[0].message.content)
            assert reply.usage is not None
            print("tokens:", reply.usage.total_tokens)
            stream = client.chat.completions.create(
                model="quick",
                messages=[{"role": "user", "content": "How many reviews are positive?"}],
                extra_body={"context": REVIEWS},
                stream=True,
            )
            for chunk in stream:
                delta = chunk.choices[0].delta if chunk.choices else None
                progress = (delta.model_extra or {}).get("reasoning_content") if delta else None
                if progress:
                    print("  ..", progress.rstrip())
                elif delta and delta.content:
                    print("streamed answer:", delta.content)
    finally:
        server.send_signal(signal.SIGTERM)  # a clean stop: the handler and pool stop with it
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host-side tools, sandbox helpers and a session, offline: `python examples/tools_and_sessions.py`.

- ``tools=``: functions of *this* process the model's code calls by name. ``order_status`` reads a
  "database" the sandbox cannot reach; credentials a tool needs stay here too.
- ``sandbox_modules`` (in offline_tools.toml's [run]): modules imported into the REPL itself.
- ``rlm.session(context)``: the context is loaded once, and the second question reuses what the
  first one left in the REPL (``statuses``) and in the history.

The root model replays offline_tools_script.json, so this runs without a key or a network.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from rlmq import RLM, Progress

CONFIG = Path(__file__).with_name("offline_tools.toml")
TICKETS = [
    "A-100: my order is late, where is it?",
    "A-101: thanks, arrived in perfect shape",
    "A-102: the parcel is two weeks late",
    "A-103: wrong colour, I want to exchange it",
]
ORDERS = {  # the shop's database: only this process can read it
    "A-100": {"status": "in transit", "total": 40.0},
    "A-101": {"status": "delivered", "total": 15.5},
    "A-102": {"status": "held at customs", "total": 60.0},
}


def order_status(order_id: str) -> dict[str, object]:
    """The status and total (USD) of an order, from the shop's database."""
    if order_id not in ORDERS:
        raise KeyError(f"no order {order_id}")
    return ORDERS[order_id]


async def exchange_rate(currency: str) -> float:
    """How many units of ``currency`` one USD buys today (an async tool)."""
    await asyncio.sleep(0)  # a real service would be awaited here
    return {"EUR": 0.5}[currency]


def show(step: Progress) -> None:
    print("  ..", step.message)


def main() -> None:
    tools = {"order_status": order_status, "exchange_rate": exchange_rate}
    with RLM.from_config(CONFIG, tools=tools, trajectory_dir=None) as rlm:
        with rlm.session(TICKETS) as chat:
            first = chat.ask("Which tickets are about late orders, and where are they?", on_progress=show)
            print("answer 1:", first.answer)
            second = chat.ask("What is the average total of those orders, in EUR?")
            print("answer 2:", second.answer)
        assert chat.usage is not None
        iterations = first.iterations + second.iterations
        print(f"the session made {chat.usage.calls} model calls over {iterations} iterations")


if __name__ == "__main__":
    main()

"""The viewer's one page: ``view.html`` with its style and script put inline.

Served by ``rlmq view`` (the page then asks the server for events), or written by ``--html``
with the events embedded, so the file needs neither a server nor the network.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

__all__ = ["render_page"]

_SLOT = re.compile(r"<!--rlmq:(\w+)-->")


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no '<' can close it or open a comment."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_page(
    *, title: str, events: Sequence[dict[str, Any]] | None = None, events_url: str = "events"
) -> str:
    """The page. With ``events`` it is static (embedded); without, it polls ``events_url``."""
    config: dict[str, Any] = {"title": title}
    if events is None:
        config["events_url"] = events_url
    else:
        config["events"] = list(events)
    slots = {
        "title": html.escape(f"rlmq view: {title}"),
        "css": _asset("view.css"),
        "js": _asset("view.js"),
        "data": _script_json(config),
    }
    # One pass over the template, so nothing inside a filled slot is ever taken for a slot.
    return _SLOT.sub(lambda m: slots[m.group(1)], _asset("view.html"))

"""``rlmq view``: a run's trajectory (docs/trajectory.md) in the browser, live while it runs.

A tool, not a service: ``tail`` reads whole lines of a growing JSON-lines file by offset, ``server``
serves the page and the events (long poll) on 127.0.0.1, ``page`` builds the one page (also as a
self-contained file, ``--html``) from ``view.html``, ``view.css`` and ``view.js``, ``cli`` is the
command. docs/view.md describes the page.
"""

from .page import render_page
from .server import ViewServer, make_app, serving
from .tail import Chunk, newest_run, read_from

__all__ = ["Chunk", "ViewServer", "make_app", "newest_run", "read_from", "render_page", "serving"]

"""The trajectory: a run as data, one JSON object per line, flushed as it happens.

Not a log: it records what the model was sent and said, the code it ran and what that printed,
sub-call counts, usage, and why the run stopped. A run that fails still leaves a complete file,
ending with a ``run_end`` event that carries the error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Trajectory"]


class Trajectory:
    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: TextIO | None = None
        self._started = time.monotonic()
        self.events: list[dict[str, Any]] = []  # kept in memory too, for callers and tests
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")

    def write(self, event: str, /, **fields: Any) -> None:
        record = {"event": event, "t": round(time.monotonic() - self._started, 4), **fields}
        self.events.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""What the pool tells a worker at start (one JSON argument: the environment is scrubbed).

Kept apart from ``rlmq.sandbox.worker`` so that importing the package never imports the module
that ``python -m rlmq.sandbox.worker`` runs as ``__main__``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_PREIMPORT", "WorkerSpec"]

DEFAULT_MAX_BATCH = 256  # llm_query calls of a session in flight at once

# Modules the model's code commonly uses, imported while the interpreter is still readable.
DEFAULT_PREIMPORT = [
    "re",
    "json",
    "math",
    "cmath",
    "collections",
    "collections.abc",
    "itertools",
    "functools",
    "statistics",
    "textwrap",
    "string",
    "random",
    "datetime",
    "_strptime",  # datetime.strptime / time.strptime import it lazily, on first use
    "time",
    "calendar",
    "heapq",
    "bisect",
    "hashlib",
    "hmac",
    "base64",
    "binascii",
    "struct",
    "zlib",
    "gzip",
    "bz2",
    "lzma",
    "unicodedata",
    "csv",
    "io",
    "dataclasses",
    "typing",
    "operator",
    "copy",
    "pprint",
    "difflib",
    "fractions",
    "decimal",
    "numbers",
    "enum",
    "abc",
    "contextlib",
    "threading",
    "queue",
    "array",
    "uuid",
    "urllib.parse",
    "html",
    "html.parser",
    "xml.etree.ElementTree",
    "fnmatch",
    "glob",
    "shlex",
    "tempfile",
    "pathlib",
    "shutil",
    "ast",
    "traceback",
    "warnings",
    "secrets",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.cp1252",
    "encodings.ascii",
    "encodings.utf_16",
    "encodings.utf_32",
    "encodings.utf_8_sig",
    "encodings.unicode_escape",
    "encodings.raw_unicode_escape",
]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs, passed as one JSON argument (the environment is scrubbed)."""

    wid: str
    pool: str  # ipc:// address of the pool's worker ROUTER
    relay: str  # ipc:// address of the pool's sub-call relay: the worker's only way to a model
    relay_id: str  # the routing id the worker connects to the relay with (the pool chose it)
    workdir: str
    uid: int | None  # drop to this uid/gid; None: keep the pool's uid
    gid: int | None
    memory_mb: int
    cpu_s: int
    fsize_mb: int
    nproc: int
    heartbeat_interval_s: float
    preimport: tuple[str, ...] = ()
    connect_timeout_s: float = 5.0
    netns: str = ""  # how to get a network namespace of its own (procs.NETNS_MODES)
    max_batch: int = DEFAULT_MAX_BATCH  # llm_query_batched sends waves of at most this many

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        data["preimport"] = tuple(data.get("preimport", ()))
        return cls(**data)

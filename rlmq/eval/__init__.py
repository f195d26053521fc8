"""``rlmq eval``: the RLM paper's long-context tasks, generated offline with exact answers.

Tasks (``sniah``, ``oolong``, ``oolong-pairs``) are generated on this machine from a seed, from
1K to 10M tokens, each with its gold answer and the labels it was computed from. Runs go through
the real services: ``rlm`` is a full RLM run (``rlmq.orchestrator.runner.run_query``), ``direct``
one call with the whole context. Scores follow the paper: exact match (item by item for a list),
0.75 ** |error| for numbers, F1 for pairs. Modules: ``tasks`` (what a task is, ``generate``), ``sniah`` and
``oolong`` (the generators), ``scoring``, ``direct`` (the baseline), ``harness`` (runs, the
output directory, resuming), ``report`` (table and plot), ``cli``.

A tool beside the services, like ``rlmq.loadtest``: it may import them; none imports it. Its
errors are the ones of what it drives (``ConfigError``, the orchestrator's ``RunError``s, the
clients' ``RemoteError`` and ``TransportTimeout``); it adds none of its own.
"""

from .cli import add_arguments, main
from .direct import DEFAULT_CONTEXT_WINDOW_TOKENS, context_window_tokens, direct_prompt
from .harness import METHODS, EvalOutcome, EvalPlan, Results, pending_runs, run_eval
from .report import format_table, plot, summarize
from .scoring import (
    normalise,
    parse_items,
    parse_number,
    parse_pairs,
    score,
    score_exact,
    score_items,
    score_number,
    score_pairs,
)
from .tasks import TASKS, AnswerKind, Needle, RecordLabels, SniahLabels, Task, generate

__all__ = [
    "DEFAULT_CONTEXT_WINDOW_TOKENS",
    "METHODS",
    "TASKS",
    "AnswerKind",
    "EvalOutcome",
    "EvalPlan",
    "Needle",
    "RecordLabels",
    "Results",
    "SniahLabels",
    "Task",
    "add_arguments",
    "context_window_tokens",
    "direct_prompt",
    "format_table",
    "generate",
    "main",
    "normalise",
    "parse_items",
    "parse_number",
    "parse_pairs",
    "pending_runs",
    "plot",
    "run_eval",
    "score",
    "score_exact",
    "score_items",
    "score_number",
    "score_pairs",
    "summarize",
]

"""``sniah``: needles in a haystack, as in RULER, in a haystack built to need reading.

The context is a facility's logbook, one sentence a line. A few keys (``the Vega archive``) each
have one current value, stated once in varied wording, and several decoy values stated in
sentences that retire, deny or doubt them. The filler names the same keys next to numbers,
tickets and phrases of exactly the value's shape, so neither a pattern for the value nor the key
and a value on one line finds the answer: one must read which sentence gives the current value.
Values are numbers, two-word passphrases, or hexadecimal registry keys (RULER's key–value).

The question, in turn by task index, is one of RULER's three (``QUESTIONS``): ``single`` asks
one key's value among the several keys placed (multi-key); ``multi_value`` asks every current
value of one key that has two to four (a set, in any order); ``multi_query`` asks the values of
two to four keys at once (a list, in the asked order).
"""

from __future__ import annotations

import math
import random

from ._words import ANIMALS, COLOURS, SITES, STAFF, STARS
from .tasks import CHARS_PER_TOKEN, AnswerKind, Needle, SniahLabels, Task, task_rng

__all__ = ["DECOY_TEMPLATES", "MULTI_VALUE_TEMPLATES", "NEEDLE_TEMPLATES", "QUESTIONS", "VALUE_KINDS", "make"]

# value kind -> (what the value is called, its shape)
VALUE_KINDS: dict[str, str] = {"number": "access code", "phrase": "passphrase", "hex": "registry key"}

NEEDLE_TEMPLATES = (
    "The {what} of the {key} is {value}.",
    "For the {key}, the {what} is {value}.",
    "Note that {value} is the {what} of the {key}.",
    "Anyone who needs to enter the {key} should use the {what} {value}.",
    "The {key}'s {what}: {value}.",
    "{staff} confirmed that the {key} now takes the {what} {value}.",
)
# One of several current values of a key (``multi_value``): none says "the" value, none doubts it.
MULTI_VALUE_TEMPLATES = (
    "One of the {what}s of the {key} is {value}.",
    "{value} is one of the {what}s the {key} accepts.",
    "The {key} accepts the {what} {value} as well.",
    "{staff} added {value} to the {what}s of the {key}.",
    "Another valid {what} for the {key} is {value}.",
)
DECOY_TEMPLATES = (
    "The former {what} of the {key}, {value}, was retired last spring.",
    "{staff} guessed {value} as the {what} of the {key}, but it was wrong.",
    "{value} was never the {what} of the {key}, whatever the rumours say.",
    "The old {what} {value} of the {key} no longer works.",
    "A draft memo proposed {value} as the {what} of the {key}; it was rejected.",
)
# Filler names keys beside values of the same shape, but never with the value's name (``what``).
FILLER_TEMPLATES = (
    "Ticket {value} about the {key} was closed by {staff}.",
    "The {key} was inspected on day {n} and found in order.",
    "Staff moved {n} crates from the {key} to the {key2}.",
    "{staff} logged {value} as the shipment number for the {key}.",
    "A visitor described the {key} as {colour} and quiet.",
    "The {colour} {animal} mural near the {key} was cleaned.",
    "Badge {value} was issued to {staff} for the {key}.",
    "The night shift reported nothing unusual at the {key}.",
    "Rain delayed the supply truck to the {key} by {n} minutes.",
    "{staff} wrote that the {key} smelled faintly of {colour} paint.",
    "The {key} inventory lists {n} items, among them the {colour} {animal} statue.",
    "Heating in the {key} was set to {n} degrees.",
)
POOL_LINES = 4096
QUESTIONS = ("single", "multi_value", "multi_query")
PREAMBLE = "The context is a facility logbook, one entry per line. "
DOUBT = "Some entries mention old, guessed or rejected values; give only the current "


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "phrase":
        return f"{rng.choice(COLOURS)} {rng.choice(ANIMALS)}"
    return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"


def _filler_pool(kind: str, keys: list[str], rng: random.Random) -> list[str]:
    def line() -> str:
        return rng.choice(FILLER_TEMPLATES).format(
            value=_value(kind, rng),
            key=rng.choice(keys),
            key2=rng.choice(keys),
            staff=rng.choice(STAFF),
            n=rng.randrange(2, 900),
            colour=rng.choice(COLOURS),
            animal=rng.choice(ANIMALS),
        )

    return [line() for _ in range(POOL_LINES)]


def _new_value(kind: str, rng: random.Random, used: set[str]) -> str:
    """A value no sentence of the task has stated yet, so every value names one key."""
    value = _value(kind, rng)
    while value in used:
        value = _value(kind, rng)
    used.add(value)
    return value


def _sentences(
    key: str, what: str, kind: str, rng: random.Random, used: set[str], *, decoys: int, current: int = 1
) -> list[tuple[str, Needle]]:
    """``current`` values for ``key`` (one: a single value's wording; several: ``multi_value``'s)
    and ``decoys`` other values, as (sentence, label) pairs; the labels' lines are filled in once
    the sentences have places."""
    templates = NEEDLE_TEMPLATES if current == 1 else MULTI_VALUE_TEMPLATES
    out = []
    for _ in range(current):
        value = _new_value(kind, rng, used)
        text = rng.choice(templates).format(what=what, key=key, value=value, staff=rng.choice(STAFF))
        out.append((text, Needle(key, value, -1, current=True)))
    for _ in range(decoys):
        other = _new_value(kind, rng, used)
        text = rng.choice(DECOY_TEMPLATES).format(what=what, key=key, value=other, staff=rng.choice(STAFF))
        out.append((text, Needle(key, other, -1, current=False)))
    return out


def _places(keys: list[str]) -> str:
    """'the A', 'the A and the B', 'the A, the B and the C'."""
    named = [f"the {key}" for key in keys]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"


def make(name: str, length_tokens: int, seed: int, index: int) -> Task:
    rng = task_rng(name, length_tokens, seed, index)
    kind = ("number", "phrase", "hex")[index % 3]
    # Offset by a third of the index, so that tasks 0-2, 3-5, ... each have the three value kinds
    # and the three questions, and tasks 0-8 every pairing of the two.
    question = QUESTIONS[(index + index // 3) % 3]
    what = VALUE_KINDS[kind]
    all_keys = [f"{star} {site}" for star in STARS for site in SITES]
    keys = rng.sample(all_keys, 40)
    used: set[str] = set()
    placed: list[tuple[str, Needle]] = []
    if question == "multi_value":
        # The asked key with two to four current values, and up to three other keys with one each.
        asked = keys[:1]
        several = rng.randrange(2, 5)
        placed += _sentences(asked[0], what, kind, rng, used, decoys=rng.randrange(2, 5), current=several)
        needled = keys[1 : 1 + rng.randrange(4)]
    else:
        # single: the asked key and up to three others; multi_query: two to four asked, up to two more.
        count = 1 if question == "single" else rng.randrange(2, 5)
        asked = keys[:count]
        needled = keys[: count + rng.randrange(4 if question == "single" else 3)]
    for key in needled:
        placed += _sentences(key, what, kind, rng, used, decoys=rng.randrange(2, 5))

    pool = _filler_pool(kind, keys, rng)
    mean_chars = sum(len(s) + 1 for s in pool) / len(pool)
    target_chars = length_tokens * CHARS_PER_TOKEN - sum(len(s) + 1 for s, _ in placed)
    filler = rng.choices(pool, k=max(len(placed), math.ceil(target_chars / mean_chars)))

    lines, needles = _insert(filler, placed, rng)
    current: dict[str, list[str]] = {}
    for needle in needles:
        if needle.current:
            current.setdefault(needle.key, []).append(needle.value)
    gold: str | frozenset[str] | tuple[str, ...]
    if question == "single":
        query = (
            f"{PREAMBLE}What is the current {what} of {_places(asked)}? {DOUBT}one. "
            f"Answer with the {what} alone."
        )
        gold, answer_kind = current[asked[0]][0], AnswerKind.EXACT
    elif question == "multi_value":
        query = (
            f"{PREAMBLE}The {asked[0]} has several current {what}s. What are all of them? {DOUBT}ones. "
            f"Answer with the {what}s alone, separated by commas."
        )
        gold, answer_kind = frozenset(current[asked[0]]), AnswerKind.SET
    else:
        query = (
            f"{PREAMBLE}What are the current {what}s of {_places(asked)}? {DOUBT}ones. "
            f"Answer with the {what}s alone, in the order the places are asked, separated by commas."
        )
        gold, answer_kind = tuple(current[key][0] for key in asked), AnswerKind.LIST
    return Task(
        name=name,
        length_tokens=length_tokens,
        seed=seed,
        index=index,
        query=query,
        context="\n".join(lines),
        gold=gold,
        kind=answer_kind,
        spec={"question": question, "keys": asked, "what": what, "value_kind": kind},
        labels=SniahLabels(tuple(sorted(needles, key=lambda n: n.line))),
    )


def _insert(
    filler: list[str], placed: list[tuple[str, Needle]], rng: random.Random
) -> tuple[list[str], list[Needle]]:
    """Spread ``placed`` over the filler at random places; the labels get their final lines."""
    positions = sorted(rng.randrange(len(filler) + 1) for _ in placed)
    rng.shuffle(placed)  # decoys may come before or after the current value
    lines: list[str] = []
    needles: list[Needle] = []
    previous = 0
    for position, (text, label) in zip(positions, placed, strict=True):
        lines.extend(filler[previous:position])
        needles.append(Needle(label.key, label.value, len(lines), label.current))
        lines.append(text)
        previous = position
    lines.extend(filler[previous:])
    return lines, needles

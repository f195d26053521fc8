"""``sniah``: single needle in a haystack, as in RULER, in a haystack built to need reading.

The context is a facility's logbook, one sentence a line. A few keys (``the Vega archive``) each
have one current value, stated once in varied wording, and several decoy values stated in
sentences that retire, deny or doubt them. The filler names the same keys next to numbers,
tickets and phrases of exactly the value's shape, so neither a pattern for the value nor the key
and a value on one line finds the answer: one must read which sentence gives the current value.
Values are numbers, two-word passphrases, or hexadecimal registry keys (RULER's key–value).
"""

from __future__ import annotations

import math
import random

from ._words import ANIMALS, COLOURS, SITES, STAFF, STARS
from .tasks import CHARS_PER_TOKEN, AnswerKind, Needle, SniahLabels, Task, task_rng

__all__ = ["DECOY_TEMPLATES", "NEEDLE_TEMPLATES", "VALUE_KINDS", "make"]

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


def _sentences(key: str, what: str, kind: str, rng: random.Random, decoys: int) -> list[tuple[str, Needle]]:
    """One current value for ``key`` and ``decoys`` other values, as (sentence, label) pairs;
    the labels' lines are filled in once the sentences have places."""
    value = _value(kind, rng)
    template = rng.choice(NEEDLE_TEMPLATES)
    text = template.format(what=what, key=key, value=value, staff=rng.choice(STAFF))
    out = [(text, Needle(key, value, -1, current=True))]
    used = {value}
    for _ in range(decoys):
        other = _value(kind, rng)
        while other in used:
            other = _value(kind, rng)
        used.add(other)
        text = rng.choice(DECOY_TEMPLATES).format(what=what, key=key, value=other, staff=rng.choice(STAFF))
        out.append((text, Needle(key, other, -1, current=False)))
    return out


def make(name: str, length_tokens: int, seed: int, index: int) -> Task:
    rng = task_rng(name, length_tokens, seed, index)
    kind = ("number", "phrase", "hex")[index % 3]
    what = VALUE_KINDS[kind]
    all_keys = [f"{star} {site}" for star in STARS for site in SITES]
    keys = rng.sample(all_keys, 40)
    asked = keys[0]
    # Several needles: the asked key and up to three others, each with its decoys.
    needled = keys[: 1 + rng.randrange(4)]
    placed: list[tuple[str, Needle]] = []
    for key in needled:
        placed += _sentences(key, what, kind, rng, decoys=rng.randrange(2, 5))

    pool = _filler_pool(kind, keys, rng)
    mean_chars = sum(len(s) + 1 for s in pool) / len(pool)
    target_chars = length_tokens * CHARS_PER_TOKEN - sum(len(s) + 1 for s, _ in placed)
    filler = rng.choices(pool, k=max(len(placed), math.ceil(target_chars / mean_chars)))

    lines, needles = _insert(filler, placed, rng)
    query = (
        f"The context is a facility logbook, one entry per line. What is the current {what} of the "
        f"{asked}? Some entries mention old, guessed or rejected values; give only the current one. "
        f"Answer with the {what} alone."
    )
    return Task(
        name=name,
        length_tokens=length_tokens,
        seed=seed,
        index=index,
        query=query,
        context="\n".join(lines),
        gold=next(n.value for n in needles if n.key == asked and n.current),
        kind=AnswerKind.EXACT,
        spec={"key": asked, "what": what, "value_kind": kind},
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

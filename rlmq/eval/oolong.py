"""``oolong`` and ``oolong-pairs``: aggregation over many short records, as in OOLONG-synth.

Each line is a record: ``Date: Mar 04, 2023 || User: 48213 || Instance: <a question>``. Every
question belongs to one of OOLONG's six TREC-coarse classes, which the context never states. The
questions come from templates whose wording crosses the classes ("What is the capital of X?" is a
location, "What is the population of X?" a number, "When did X take place?" a number, "Where did X
take place?" a location, "What does WHO stand for?" an abbreviation): a reader decides a class
at a glance, while code needs the whole lexicon of the templates.

``oolong`` asks for counts, comparisons, filters by user or by date, and the most or least
common class; ``oolong-pairs`` asks for every pair of users whose per-user class counts meet a
condition. Gold answers are computed from the generator's labels (``RecordLabels``).
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._words import (
    ACRONYMS,
    CITIES,
    CONCEPTS,
    COUNTRIES,
    EVENTS,
    FOUNDED,
    INVENTIONS,
    OLD_THINGS,
    PREFIXES,
)
from .tasks import CHARS_PER_TOKEN, AnswerKind, RecordLabels, Task, task_rng

__all__ = ["DAYS", "FIRST_DAY", "LABELS", "day_name", "make_oolong", "make_pairs", "question_pool"]

LABELS = (
    "abbreviation",
    "entity",
    "description and abstract concept",
    "human being",
    "location",
    "numeric value",
)
ABBR, ENTY, DESC, HUM, LOC, NUM = range(6)
FIRST_DAY = dt.date(2022, 1, 1)
DAYS = 730
QUESTIONS_PER_LABEL = 600

TEMPLATES: dict[int, tuple[str, ...]] = {
    ABBR: (
        "What does {acro} stand for?",
        "What is the full form of {acro}?",
        "{acro} is short for what?",
        "What is the abbreviation of {full}?",
        "What is the acronym for {full}?",
        "What do the letters in {acro} mean?",
    ),
    ENTY: (
        "What animal is the national symbol of {country}?",
        "What sport is most popular in {country}?",
        "What instrument is traditionally played at weddings in {country}?",
        "What is the national dish of {country}?",
        "What colour is the flag of {city}?",
        "What material were {old} made of?",
        "Which breed of dog comes from {country}?",
    ),
    DESC: (
        "What does {concept} mean?",
        "What causes {concept}?",
        "How does {invention} work?",
        "What is the definition of {concept}?",
        "What is the difference between {concept} and {concept2}?",
        "Can you explain {concept} in simple terms?",
        "Why is {concept} important?",
    ),
    HUM: (
        "Who invented {invention}?",
        "What is the name of the person who founded {founded}?",
        "Who was the first mayor of {city}?",
        "Which scientist first explained {concept}?",
        "Who wrote the national anthem of {country}?",
        "Which explorer first reached {country}?",
    ),
    LOC: (
        "Where was {invention} invented?",
        "What is the capital of {country}?",
        "In which country is {city}?",
        "Where did {event} take place?",
        "What river runs through {city}?",
        "What is the highest mountain in {country}?",
        "Which ocean is closest to {city}?",
    ),
    NUM: (
        "How many people live in {city}?",
        "What is the population of {country}?",
        "In what year was {invention} invented?",
        "How far is {city} from {city2}?",
        "What is the average winter temperature in {city}?",
        "How much did {invention} cost when it first went on sale?",
        "How tall is the highest mountain in {country}?",
        "When did {event} take place?",
    ),
}


def day_name(day: int) -> str:
    return (FIRST_DAY + dt.timedelta(days=day)).strftime("%b %d, %Y")


DAY_NAMES = tuple(day_name(d) for d in range(DAYS))


def question_pool(rng: random.Random) -> list[list[str]]:
    """``QUESTIONS_PER_LABEL`` worded questions per class (duplicates allowed, as in real logs)."""

    def one(label: int) -> str:
        acro, full = rng.choice(ACRONYMS)
        concept, concept2 = rng.sample(CONCEPTS, 2)
        city, city2 = rng.sample(CITIES, 2)
        text = rng.choice(TEMPLATES[label]).format(
            acro=acro,
            full=full,
            country=rng.choice(COUNTRIES),
            city=city,
            city2=city2,
            old=rng.choice(OLD_THINGS),
            concept=concept,
            concept2=concept2,
            invention=rng.choice(INVENTIONS),
            founded=rng.choice(FOUNDED),
            event=rng.choice(EVENTS),
        )
        prefix = rng.choice(PREFIXES)
        if prefix and not text.split()[0].isupper():
            text = text[0].lower() + text[1:]
        return prefix + text

    return [[one(label) for _ in range(QUESTIONS_PER_LABEL)] for label in range(len(LABELS))]


def _records(length_tokens: int, rng: random.Random) -> tuple[str, RecordLabels]:
    pool = question_pool(rng)
    mean_question = sum(len(q) for qs in pool for q in qs) / sum(len(qs) for qs in pool)
    line_chars = len("Date: Mar 04, 2023 || User: 48213 || Instance: \n") + mean_question
    n = max(20, round(length_tokens * CHARS_PER_TOKEN / line_chars))
    n_users = min(1000, max(8, round(2 * math.sqrt(n))))
    user_ids = rng.sample(range(10_000, 100_000), n_users)
    activity = [rng.uniform(0.3, 3.0) for _ in user_ids]
    favourite = [rng.randrange(len(LABELS)) for _ in user_ids]
    # Distinct class weights, so that most and least common classes are rarely tied.
    weights = [rng.uniform(0.4, 1.6) for _ in LABELS]
    who = rng.choices(range(n_users), weights=activity, k=n)
    drawn = rng.choices(range(len(LABELS)), weights=weights, k=n)
    coin = rng.random
    labels = [favourite[u] if coin() < 0.3 else g for u, g in zip(who, drawn, strict=True)]
    days = sorted(rng.choices(range(DAYS), k=n))  # a log: in date order
    pick = rng.randrange
    lines = [
        f"Date: {DAY_NAMES[d]} || User: {user_ids[u]} || Instance: {pool[c][pick(QUESTIONS_PER_LABEL)]}"
        for d, u, c in zip(days, who, labels, strict=True)
    ]
    users = tuple(user_ids[u] for u in who)
    return "\n".join(lines), RecordLabels(users, tuple(days), tuple(labels))


INTRO = (
    "The context has one record per line: 'Date: ... || User: ... || Instance: <a question>'. "
    "Each question belongs to exactly one of these categories: "
    + ", ".join(f"'{label}'" for label in LABELS)
    + ". The categories are not written in the data; decide each from the question itself."
)


def _task(name: str, length: int, seed: int, index: int, context: str, labels: RecordLabels,
          query: str, gold: Any, kind: AnswerKind, spec: dict[str, Any]) -> Task:  # fmt: skip
    return Task(name, length, seed, index, f"{INTRO} {query}", context, gold, kind, spec, labels)


# ---------------------------------------------------------------- oolong


def _unique_extreme(counts: Counter[int], most: bool) -> int | None:
    ranked = sorted(range(len(LABELS)), key=lambda c: counts[c], reverse=most)
    return ranked[0] if counts[ranked[0]] != counts[ranked[1]] else None


class _Question(NamedTuple):
    text: str
    gold: Any
    kind: AnswerKind
    spec: dict[str, Any]


NUMBER = " Answer with a number only."
ONE_LABEL = " Answer with the category name only."


def _oolong_question(labels: RecordLabels, rng: random.Random, index: int) -> _Question:
    """Counts, a filter by user or by dates, most or least common, a comparison: by ``index``."""
    label = rng.randrange(len(LABELS))
    name = LABELS[label]
    shape = ("count", "user", "dates", "most", "least", "compare")[index % 6]
    counts = Counter(labels.labels)
    if shape in ("most", "least"):
        best = _unique_extreme(counts, most=shape == "most")
        if best is not None:
            text = f"Which category is the {shape} common among all records?{ONE_LABEL}"
            return _Question(text, LABELS[best], AnswerKind.EXACT, {"shape": shape})
        shape = "count"  # a tie has no single answer
    if shape == "user":
        # A user who asked at least one such question, when there is one: 0 is a dull answer.
        askers = [u for u, c in zip(labels.users, labels.labels, strict=True) if c == label]
        user = rng.choice(askers or labels.users)
        pairs = zip(labels.users, labels.labels, strict=True)
        gold = sum(1 for u, c in pairs if u == user and c == label)
        text = f"How many questions from user {user} are in the category '{name}'?{NUMBER}"
        return _Question(text, gold, AnswerKind.NUMBER, {"shape": shape, "user": user, "label": name})
    if shape == "dates":
        first, last = sorted(rng.sample(range(DAYS), 2))
        dated = zip(labels.days, labels.labels, strict=True)
        gold = sum(1 for d, c in dated if first <= d <= last and c == label)
        text = (
            f"How many questions dated from {day_name(first)} to {day_name(last)} (both days included) "
            f"are in the category '{name}'?{NUMBER}"
        )
        spec = {"shape": shape, "label": name, "first": day_name(first), "last": day_name(last)}
        return _Question(text, gold, AnswerKind.NUMBER, spec)
    if shape == "compare":
        other = rng.choice([c for c in range(len(LABELS)) if c != label])
        if counts[label] == counts[other]:
            answer = "same frequency"
        else:
            answer = "more common" if counts[label] > counts[other] else "less common"
        text = (
            f"Is the category '{name}' more common, less common, or of the same frequency as the "
            f"category '{LABELS[other]}'? Answer with 'more common', 'less common' or 'same frequency'."
        )
        return _Question(
            text, answer, AnswerKind.EXACT, {"shape": shape, "label": name, "other": LABELS[other]}
        )
    text = f"How many questions are in the category '{name}'?{NUMBER}"
    return _Question(text, counts[label], AnswerKind.NUMBER, {"shape": "count", "label": name})


def make_oolong(name: str, length_tokens: int, seed: int, index: int) -> Task:
    rng = task_rng(name, length_tokens, seed, index)
    context, labels = _records(length_tokens, rng)
    q = _oolong_question(labels, rng, index)
    return _task(name, length_tokens, seed, index, context, labels, q.text, q.gold, q.kind, q.spec)


# ---------------------------------------------------------------- oolong-pairs


@dataclass(frozen=True, slots=True)
class _Condition:
    """What one user's records, as (day, class), must meet. A pair qualifies when both users
    meet it or, when ``exactly_one``, when one does and the other does not."""

    shape: str  # at_least | exactly_one | more_than | after | none_of
    label: int
    other: int = 0  # more_than: the class to outnumber
    at_least: int = 1  # at_least, exactly_one
    after: int = 0  # after: the day

    @property
    def exactly_one(self) -> bool:
        return self.shape == "exactly_one"

    def meets(self, records: Sequence[tuple[int, int]]) -> bool:
        label = self.label
        if self.shape in ("at_least", "exactly_one"):
            return sum(1 for _, c in records if c == label) >= self.at_least
        if self.shape == "more_than":
            return sum(1 for _, c in records if c == label) > sum(1 for _, c in records if c == self.other)
        if self.shape == "after":
            return any(d > self.after and c == label for d, c in records)
        return all(c != label for _, c in records)

    def text(self) -> str:
        name = f"'{LABELS[self.label]}'"
        if self.shape in ("at_least", "exactly_one"):
            k = self.at_least
            has = f"has at least {k} question{'s' if k > 1 else ''} in the category {name}"
            if self.exactly_one:
                return f"exactly one of the two users {has}, and the other does not"
            return f"both users each {has}"
        if self.shape == "more_than":
            return (
                f"both users each have more questions in the category {name} than in '{LABELS[self.other]}'"
            )
        if self.shape == "after":
            return (
                f"both users each have a question in the category {name} dated after {day_name(self.after)}"
            )
        return f"neither user has any question in the category {name}"

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"shape": self.shape, "label": LABELS[self.label]}
        if self.shape in ("at_least", "exactly_one"):
            spec["at_least"] = self.at_least
        elif self.shape == "more_than":
            spec["other"] = LABELS[self.other]
        elif self.shape == "after":
            spec["after"] = day_name(self.after)
        return spec


def _by_user(labels: RecordLabels) -> dict[int, list[tuple[int, int]]]:
    by_user: dict[int, list[tuple[int, int]]] = {}
    for u, d, c in zip(labels.users, labels.days, labels.labels, strict=True):
        by_user.setdefault(u, []).append((d, c))
    return by_user


def _pair_condition(by_user: dict[int, list[tuple[int, int]]], rng: random.Random) -> _Condition:
    """A condition drawn until 5-60 % of the users meet it (at least two), 40 tries at most."""
    users = list(by_user.values())
    condition = _Condition("none_of", 0)
    for _ in range(40):
        a, b = rng.sample(range(len(LABELS)), 2)
        shape = rng.choice(("at_least", "more_than", "exactly_one", "after", "none_of"))
        if shape in ("at_least", "exactly_one"):
            counts = sorted(sum(1 for _, c in recs if c == a) for recs in users)
            k = max(1, counts[int(len(counts) * rng.uniform(0.5, 0.85))])
            condition = _Condition(shape, a, at_least=k)
        elif shape == "more_than":
            condition = _Condition(shape, a, other=b)
        elif shape == "after":
            condition = _Condition(shape, a, after=rng.randrange(DAYS // 2, DAYS))
        else:
            condition = _Condition(shape, a)
        meeting = sum(1 for recs in users if condition.meets(recs))
        if 0.05 <= meeting / len(users) <= 0.6 and meeting >= 2:
            break
    return condition


def make_pairs(name: str, length_tokens: int, seed: int, index: int) -> Task:
    rng = task_rng(name, length_tokens, seed, index)
    context, labels = _records(length_tokens, rng)
    by_user = _by_user(labels)
    condition = _pair_condition(by_user, rng)
    meets = sorted(u for u, recs in by_user.items() if condition.meets(recs))
    if condition.exactly_one:
        others = sorted(set(by_user) - set(meets))
        gold = frozenset((min(x, y), max(x, y)) for x in meets for y in others)
    else:
        gold = frozenset((x, y) for i, x in enumerate(meets) for y in meets[i + 1 :])
    query = (
        f"List every pair of user IDs where {condition.text()}. Count only users who appear in the data. "
        "List each pair once with the smaller ID first, one pair per line, as (ID1, ID2)."
    )
    return _task(
        name, length_tokens, seed, index, context, labels, query, gold, AnswerKind.PAIRS, condition.spec()
    )

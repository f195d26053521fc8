"""The task generators: gold answers checked by a solver of this file's own, which reads the
generator's labels; labels checked against the text; determinism, length, and haystacks that a
pattern alone does not solve."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from itertools import combinations

import pytest

from rlmq.eval import TASKS, AnswerKind, RecordLabels, SniahLabels, Task, generate

CATEGORIES = (
    "abbreviation",
    "entity",
    "description and abstract concept",
    "human being",
    "location",
    "numeric value",
)
CALENDAR_START = dt.date(2022, 1, 1)
RECORD = re.compile(r"Date: (\w{3} \d{2}, \d{4}) \|\| User: (\d{5}) \|\| Instance: (.+)")
CASES = [(length, seed, index) for length in (8_000, 40_000) for seed in (0, 3) for index in range(6)]


def day_of(text: str) -> int:
    return (dt.datetime.strptime(text, "%b %d, %Y").date() - CALENDAR_START).days


# ---------------------------------------------------------------- the independent solvers


PLACE = re.compile(r"\b[Tt]he ([A-Z][a-z]+ [a-z]+)")


def asked_keys(query: str) -> list[str]:
    """The places the question names, in its order, read from its text (not from the spec)."""
    question = query.split("one entry per line. ", 1)[1].split("?", 1)[0]
    return PLACE.findall(question)


def sniah_gold(task: Task) -> object:
    """The current values of the keys the question names: one (single), all of one key's
    (multi-value, a set), or one per key in the asked order (multi-query, a list)."""
    labels = task.labels
    assert isinstance(labels, SniahLabels)
    current: dict[str, list[str]] = {}
    for needle in labels.needles:
        if needle.current:
            current.setdefault(needle.key, []).append(needle.value)
    keys = asked_keys(task.query)
    assert keys == task.spec["keys"]
    if "several current" in task.query:
        assert task.kind is AnswerKind.SET
        [key] = keys
        assert len(current[key]) >= 2
        assert len(set(current[key])) == len(current[key])
        return frozenset(current[key])
    assert all(len(current[key]) == 1 for key in keys), "every asked key has one current value"
    if len(keys) == 1:
        assert task.kind is AnswerKind.EXACT
        return current[keys[0]][0]
    assert task.kind is AnswerKind.LIST
    assert "in the order the places are asked" in task.query
    return tuple(current[key][0] for key in keys)


def per_user(labels: RecordLabels) -> dict[int, list[tuple[int, str]]]:
    users: dict[int, list[tuple[int, str]]] = {}
    for user, day, label in zip(labels.users, labels.days, labels.labels, strict=True):
        users.setdefault(user, []).append((day, CATEGORIES[label]))
    return users


def oolong_gold(task: Task) -> object:
    labels = task.labels
    assert isinstance(labels, RecordLabels)
    spec = task.spec
    names = [CATEGORIES[c] for c in labels.labels]
    counts = Counter(names)
    shape = spec["shape"]
    if shape == "count":
        return counts[spec["label"]]
    if shape == "user":
        return sum(1 for (day, name) in per_user(labels).get(spec["user"], []) if name == spec["label"])
    if shape == "dates":
        first, last = day_of(spec["first"]), day_of(spec["last"])
        return sum(
            1 for d, n in zip(labels.days, names, strict=True) if first <= d <= last and n == spec["label"]
        )
    if shape in ("most", "least"):
        ranked = sorted(CATEGORIES, key=lambda c: counts[c])
        return ranked[-1] if shape == "most" else ranked[0]
    a, b = counts[spec["label"]], counts[spec["other"]]
    return "more common" if a > b else "less common" if a < b else "same frequency"


def pairs_gold(task: Task) -> frozenset[tuple[int, int]]:
    labels = task.labels
    assert isinstance(labels, RecordLabels)
    spec = task.spec
    users = per_user(labels)

    def count(user: int, name: str) -> int:
        return sum(1 for _, n in users[user] if n == name)

    shape = spec["shape"]
    if shape in ("at_least", "exactly_one"):
        meets = {u for u in users if count(u, spec["label"]) >= spec["at_least"]}
    elif shape == "more_than":
        meets = {u for u in users if count(u, spec["label"]) > count(u, spec["other"])}
    elif shape == "after":
        after = day_of(spec["after"])
        meets = {u for u in users if any(d > after and n == spec["label"] for d, n in users[u])}
    else:
        assert shape == "none_of"
        meets = {u for u in users if count(u, spec["label"]) == 0}
    if shape == "exactly_one":
        return frozenset(
            tuple(sorted(p)) for p in combinations(users, 2) if (p[0] in meets) != (p[1] in meets)
        )  # type: ignore[misc]
    return frozenset(tuple(sorted(p)) for p in combinations(meets, 2))  # type: ignore[misc]


@pytest.mark.parametrize(("length", "seed", "index"), CASES)
@pytest.mark.parametrize("name", TASKS)
def test_gold_answers_agree_with_an_independent_solver(name: str, length: int, seed: int, index: int) -> None:
    task = generate(name, length, seed=seed, index=index)
    if name == "sniah":
        assert task.gold == sniah_gold(task)
    elif name == "oolong":
        assert task.gold == oolong_gold(task)
    else:
        assert task.kind is AnswerKind.PAIRS
        assert task.gold == pairs_gold(task)
        assert task.gold, "a pairs task always has pairs to find"


# ---------------------------------------------------------------- labels against the text


@pytest.mark.parametrize("index", range(6))
def test_sniah_labels_are_where_the_text_says(index: int) -> None:
    task = generate("sniah", 20_000, seed=1, index=index)
    labels = task.labels
    assert isinstance(labels, SniahLabels)
    lines = task.context.splitlines()
    what = task.spec["what"]
    for needle in labels.needles:
        assert needle.key in lines[needle.line]
        assert needle.value in lines[needle.line]
        assert what in lines[needle.line]
    # Only the placed sentences name the value's kind: the filler never says "access code".
    assert {i for i, line in enumerate(lines) if what in line} == {n.line for n in labels.needles}
    # Every value is stated once: no value of one key is a decoy or a value of another.
    assert len({n.value for n in labels.needles}) == len(labels.needles)
    assert all(key in task.query for key in task.spec["keys"])
    assert not any(n.value in task.query for n in labels.needles)


def test_sniah_asks_all_three_of_rulers_questions_with_every_value_kind() -> None:
    """Tasks 0-2, 3-5 and 6-8 each have the three questions and the three value kinds, and the
    nine every pairing; a question asks two to four values where it asks several."""
    tasks = [generate("sniah", 8_000, seed=4, index=i) for i in range(9)]
    for start in (0, 3, 6):
        window = tasks[start : start + 3]
        assert {t.spec["question"] for t in window} == {"single", "multi_value", "multi_query"}
        assert {t.spec["value_kind"] for t in window} == {"number", "phrase", "hex"}
    assert len({(t.spec["question"], t.spec["value_kind"]) for t in tasks}) == 9
    for task in tasks:
        if task.spec["question"] == "single":
            assert isinstance(task.gold, str)
        else:
            assert isinstance(task.gold, frozenset | tuple)
            assert 2 <= len(task.gold) <= 4


@pytest.mark.parametrize("name", ["oolong", "oolong-pairs"])
def test_record_labels_match_every_line(name: str) -> None:
    task = generate(name, 20_000, seed=2, index=1)
    labels = task.labels
    assert isinstance(labels, RecordLabels)
    parsed = [RECORD.fullmatch(line) for line in task.context.splitlines()]
    assert all(parsed)
    assert [int(m.group(2)) for m in parsed if m] == list(labels.users)
    assert [day_of(m.group(1)) for m in parsed if m] == list(labels.days)
    assert list(labels.days) == sorted(labels.days)
    # The class is never written down.
    assert not any(c in task.context for c in ("numeric value", "human being", "abstract concept"))


# ---------------------------------------------------------------- shape of the generator


@pytest.mark.parametrize("name", TASKS)
def test_a_task_is_the_same_for_the_same_seed_and_differs_for_another(name: str) -> None:
    a, b = generate(name, 8_000, seed=5, index=2), generate(name, 8_000, seed=5, index=2)
    assert (a.context, a.query, a.gold) == (b.context, b.query, b.gold)
    c = generate(name, 8_000, seed=6, index=2)
    assert c.context != a.context
    assert a.id == f"{name}-8000-s5-2"


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("length", [1_000, 8_000, 131_072, 1_000_000])
def test_the_context_is_as_long_as_asked(name: str, length: int) -> None:
    task = generate(name, length, seed=0, index=0)
    assert abs(task.context_tokens - length) <= max(100, length // 50)


def test_lengths_outside_the_range_and_unknown_tasks_are_refused() -> None:
    with pytest.raises(ValueError, match="between"):
        generate("sniah", 10_000_001)
    with pytest.raises(ValueError, match="unknown task"):
        generate("ruler", 8_000)


def test_sniah_needs_reading_a_pattern_finds_decoys_too() -> None:
    """Key and value shape on one line is not enough: decoys and filler give other values."""
    # Lookaheads, so that overlapping two-word phrases are all found.
    shapes = {
        "number": r"\b(\d{7})\b",
        "phrase": r"(?=\b([a-z]+ [a-z]+)\b)",
        "hex": r"\b([0-9a-f]{8}-[0-9a-f]{4})\b",
    }
    for index in range(9):
        task = generate("sniah", 32_000, seed=0, index=index)
        labels = task.labels
        assert isinstance(labels, SniahLabels)
        for key in task.spec["keys"]:
            values = {
                v
                for line in task.context.splitlines()
                if key in line
                for v in re.findall(shapes[task.spec["value_kind"]], line)
            }
            right = {n.value for n in labels.needles if n.key == key and n.current}
            assert right < values
            assert len(values - right) >= 2


def test_oolong_classes_need_reading_a_first_word_rule_gets_many_wrong() -> None:
    """The usual surface rule (who -> person, where -> place, how many/when -> number) fails often."""
    task = generate("oolong", 32_000, seed=0, index=0)
    labels = task.labels
    assert isinstance(labels, RecordLabels)

    def first_word_rule(question: str) -> str:
        q = question.lower()
        if "who" in q:
            return "human being"
        if "where" in q:
            return "location"
        if "how many" in q or "when" in q or "how much" in q:
            return "numeric value"
        if "stand for" in q:
            return "abbreviation"
        return "description and abstract concept"

    questions = [line.split("Instance: ", 1)[1] for line in task.context.splitlines()]
    wrong = sum(first_word_rule(q) != CATEGORIES[c] for q, c in zip(questions, labels.labels, strict=True))
    assert wrong / len(questions) > 0.3

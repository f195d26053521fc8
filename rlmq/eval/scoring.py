"""Scores as in the RLM paper: exact match after normalisation, 0.75 ** |error| for numbers, F1
for sets of pairs. A list answer (sniah's multi-value and multi-query questions) is exact match
too, item by item: all its values right, none missing, none extra, in the asked order where there
is one. Every score is in [0, 1]."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable
from typing import cast

from .tasks import AnswerKind, Gold

__all__ = [
    "normalise",
    "parse_items",
    "parse_number",
    "parse_pairs",
    "score",
    "score_exact",
    "score_items",
    "score_number",
    "score_pairs",
]

_LABEL = re.compile(r"^\s*(?:final\s+)?answer\b\s*(?:is\b)?\s*[:=\-]?\s*", re.IGNORECASE)
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NOT_WORD = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
MAX_NUMBER_ANSWER_WORDS = 6
_PAIR = re.compile(r"(\d+)\s*[,;]\s*(\d+)")
# Between the items of a list answer; no value of a list task contains one ("and" as a word only).
_ITEM_SEPARATOR = re.compile(r"[,;\n]|\band\b", re.IGNORECASE)


def _strip_label(text: str) -> str:
    return _LABEL.sub("", unicodedata.normalize("NFKC", text), count=1)


def normalise(text: str) -> str:
    """Lower case, no leading 'Answer:', no punctuation or articles, single spaces."""
    text = _DIGIT_COMMA.sub("", _strip_label(text).lower())
    text = _ARTICLES.sub(" ", _NOT_WORD.sub(" ", text))
    return " ".join(text.split())


def score_exact(answer: str, gold: str) -> float:
    return 1.0 if normalise(answer) == normalise(gold) else 0.0


def parse_items(answer: str) -> list[str]:
    """The items of a list answer ('a, b and c', one a line, 'Answer: a; b'), each normalised;
    empty items are dropped. Commas between thousands are not separators."""
    text = _DIGIT_COMMA.sub("", _strip_label(answer))
    return [item for part in _ITEM_SEPARATOR.split(text) if (item := normalise(part))]


def score_items(answer: str, gold: Iterable[str], *, ordered: bool) -> float:
    """1.0 when the answer's items are the gold items: the same sequence when ``ordered``, else the
    same set (order and repeats do not matter). One missing, extra or wrong item scores 0."""
    found, wanted = parse_items(answer), [normalise(g) for g in gold]
    if ordered:
        return 1.0 if found == wanted else 0.0
    return 1.0 if set(found) == set(wanted) else 0.0


def parse_number(answer: str) -> float | None:
    """The one number of a short answer ('42', 'Answer: 1,204', 'about 42 questions'); None when
    the answer has none, several, or is prose around a number (more than six words)."""
    text = _DIGIT_COMMA.sub("", _strip_label(answer))
    found = _NUMBER.findall(text)
    if len(found) != 1 or len(text.split()) > MAX_NUMBER_ANSWER_WORDS:
        return None
    return float(found[0])


def score_number(answer: str, gold: int) -> float:
    value = parse_number(answer)
    return 0.0 if value is None else 0.75 ** abs(value - gold)


def parse_pairs(answer: str) -> set[tuple[int, int]]:
    """Every 'a, b' (in any brackets) in the answer, as (smaller, larger); a pair of one id twice
    is no pair."""
    pairs = ((int(a), int(b)) for a, b in _PAIR.findall(answer))
    return {(min(a, b), max(a, b)) for a, b in pairs if a != b}


def score_pairs(answer: str | Iterable[tuple[int, int]], gold: Collection[tuple[int, int]]) -> float:
    """F1 of the answer's pairs against the gold pairs; 1.0 when both are empty."""
    found = parse_pairs(answer) if isinstance(answer, str) else set(answer)
    right = len(found & set(gold))
    if not found and not gold:
        return 1.0
    if right == 0:
        return 0.0
    precision, recall = right / len(found), right / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(kind: AnswerKind, answer: str, gold: Gold) -> float:
    if kind is AnswerKind.PAIRS:
        assert isinstance(gold, frozenset)
        return score_pairs(answer, cast("frozenset[tuple[int, int]]", gold))  # PAIRS: gold is pairs
    if kind is AnswerKind.NUMBER:
        assert isinstance(gold, int)
        return score_number(answer, gold)
    if kind in (AnswerKind.SET, AnswerKind.LIST):
        assert isinstance(gold, frozenset | tuple)
        return score_items(answer, [str(g) for g in gold], ordered=kind is AnswerKind.LIST)
    return score_exact(answer, str(gold))

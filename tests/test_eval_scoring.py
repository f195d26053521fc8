"""Scoring as in the RLM paper, on hand-made answers: exact match after normalisation, 0.75 **
|error| for numbers, F1 for pairs, and exact match item by item for sniah's list answers."""

from __future__ import annotations

import pytest

from rlmq.eval import (
    AnswerKind,
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


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("4418203", "4418203"),
        ("Answer: 4418203", "4418203"),
        ("  4,418,203. ", "4418203"),
        ("**Teal Condor**", "teal condor"),
        ('"teal condor"', "teal condor"),
        ("The teal condor", "teal condor"),
        ("Final answer: Description and abstract concept.", "description and abstract concept"),
        ("MORE COMMON", "more common"),
        ("499e0601-9417", "499e0601-9417"),
    ],
)
def test_exact_match_forgives_case_punctuation_articles_and_labels(answer: str, gold: str) -> None:
    assert score_exact(answer, gold) == 1.0


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("4418204", "4418203"),
        ("4418203 or 5512000", "4418203"),
        ("teal", "teal condor"),
        ("less common", "more common"),
        ("", "location"),
        ("location, probably", "human being"),
    ],
)
def test_exact_match_is_exact_about_content(answer: str, gold: str) -> None:
    assert score_exact(answer, gold) == 0.0


def test_normalise() -> None:
    assert normalise("  Answer:  The  Human-Being!  ") == "human being"
    assert normalise("1,204") == "1204"


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("42", 42, 1.0),
        ("Answer: 42", 42, 1.0),
        ("There are 42 such questions.", 42, 1.0),
        ("1,204", 1204, 1.0),
        ("41", 42, 0.75),
        ("45", 42, 0.75**3),
        ("42.5", 42, 0.75**0.5),
        ("forty-two", 42, 0.0),  # no number to read
        ("41 or 43", 42, 0.0),  # two numbers: no single answer
        ("You have used all 3 iterations. Answer now with FINAL(your best answer).", 42, 0.0),  # prose
    ],
)
def test_numbers_score_three_quarters_per_unit_of_error(answer: str, gold: int, expected: float) -> None:
    assert score_number(answer, gold) == pytest.approx(expected)


def test_parse_number_reads_one_number_of_a_short_answer() -> None:
    assert parse_number("about 17") == 17.0
    assert parse_number("-3") == -3.0
    assert parse_number("none") is None


def test_pairs_are_read_in_any_bracket_and_order() -> None:
    text = "(17746, 18249)\n[20052,17746]\n30837; 40555\n(5, 5)\nno pair here"
    assert parse_pairs(text) == {(17746, 18249), (17746, 20052), (30837, 40555)}


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("(1, 2)\n(1, 3)\n(2, 3)", {(1, 2), (1, 3), (2, 3)}, 1.0),
        ("(2, 1)\n(3, 1)\n(3, 2)\n(2, 3)", {(1, 2), (1, 3), (2, 3)}, 1.0),  # order and repeats
        ("(1, 2)", {(1, 2), (1, 3), (2, 3)}, 0.5),  # precision 1, recall 1/3
        ("(1, 2)\n(1, 3)\n(2, 3)\n(4, 5)", {(1, 2), (1, 3), (2, 3)}, 2 * 0.75 * 1 / 1.75),
        ("(4, 5)", {(1, 2)}, 0.0),
        ("", {(1, 2)}, 0.0),
        ("none", set(), 1.0),
        ("(1, 2)", set(), 0.0),
    ],
)
def test_pairs_score_f1(answer: str, gold: set[tuple[int, int]], expected: float) -> None:
    assert score_pairs(answer, gold) == pytest.approx(expected)


def test_list_items_are_split_at_commas_semicolons_lines_and_and() -> None:
    assert parse_items("Answer: Teal Condor, amber otter and **slate lynx**.") == [
        "teal condor",
        "amber otter",
        "slate lynx",
    ]
    assert parse_items("4,418,203; 5,512,903,\n- 1204000\n") == ["4418203", "5512903", "1204000"]
    assert parse_items("499e0601-9417, 0b1c2d3e-aaaa") == ["499e0601 9417", "0b1c2d3e aaaa"]
    assert parse_items("") == []


SET = frozenset({"teal condor", "amber otter", "slate lynx"})


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("teal condor, amber otter, slate lynx", 1.0),
        ("Slate lynx, Teal condor and amber otter.", 1.0),  # any order, any case
        ("teal condor\namber otter\nslate lynx\nteal condor", 1.0),  # repeats do not count
        ("teal condor, amber otter", 0.0),  # one missing
        ("teal condor, amber otter, slate lynx, cobalt heron", 0.0),  # one extra
        ("teal condor amber otter slate lynx", 0.0),  # not a list
        ("", 0.0),
    ],
)
def test_a_set_answer_is_exact_match_on_the_set_of_items(answer: str, expected: float) -> None:
    assert score_items(answer, SET, ordered=False) == expected
    assert score(AnswerKind.SET, answer, SET) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("4418203, 5512903, 1204000", 1.0),
        ("Answer: 4,418,203; 5,512,903 and 1,204,000", 1.0),
        ("5512903, 4418203, 1204000", 0.0),  # the values of two places swapped
        ("4418203, 5512903", 0.0),
        ("4418203, 4418203, 5512903, 1204000", 0.0),
    ],
)
def test_a_list_answer_is_exact_match_item_by_item_in_order(answer: str, expected: float) -> None:
    gold = ("4418203", "5512903", "1204000")
    assert score_items(answer, gold, ordered=True) == expected
    assert score(AnswerKind.LIST, answer, gold) == expected


def test_score_dispatches_on_the_kind() -> None:
    assert score(AnswerKind.EXACT, "Location", "location") == 1.0
    assert score(AnswerKind.NUMBER, "10", 12) == pytest.approx(0.5625)
    assert score(AnswerKind.PAIRS, "(1, 2)", frozenset({(1, 2)})) == 1.0

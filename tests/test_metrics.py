"""The TriviaQA scorer, pinned on the cases the official evaluation script decides."""

import pytest

from common.evaluation.metrics import exact_match, extract_answer, f1_score, normalize_answer, score


@pytest.mark.parametrize("raw,normalised", [
    ("The Beatles", "beatles"),
    ("the the", ""),
    ("An Apple a Day", "apple day"),
    ("Theatre", "theatre"),  # articles only as whole words
    ("Mt. Everest", "mt everest"),
    ("Rock_and_roll", "rock and roll"),
    ("‘Hello’", "hello"),  # curly single quotes
    ("It´s `quoted`", "it s quoted"),  # accents used as quotes
    ("Tiramisù", "tiramisù"),  # accents on letters are kept
    ("São Paulo!", "são paulo"),
    ("1,000", "1 000"),
    ("3.14", "3 14"),
    ("  Lots   of\tspace\n", "lots of space"),
    ("Guns N' Roses", "guns n roses"),
    ("A", ""),
])
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("the Eiffel Tower.", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0


def test_f1_is_token_overlap():
    assert f1_score("Katsushika Hokusai", "Hokusai") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("Paris", "London") == 0.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("new new york", "new york") == pytest.approx(0.8)


def test_scores_are_the_best_over_aliases():
    aliases = ["Mount Everest", "Everest", "Sagarmatha"]
    assert score("everest", aliases) == {"em": 1.0, "f1": 1.0}
    assert score("Mount Kilimanjaro", aliases) == {"em": 0.0, "f1": pytest.approx(2 * 0.5 * 0.5 / 1.0)}
    assert score("anything", []) == {"em": 0.0, "f1": 0.0}


def test_answer_extraction_stops_at_newline():
    assert extract_answer(" Paris\nQuestion: next") == "Paris"
    assert extract_answer("  ") == ""

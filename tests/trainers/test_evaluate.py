"""Generation-quality measures: exact values on hand-made strings."""

import math

import pytest

from trainers.evaluate import generation_metrics, repeated_ngram_rate, rouge_l


def test_repeated_ngram_rate():
    assert repeated_ngram_rate("a b c d e".split()) == 0.0
    assert repeated_ngram_rate("a b a b a b".split()) == pytest.approx(1 - 2 / 4)  # ab a, b a b: 2 unique of 4
    assert repeated_ngram_rate([201] * 20) == pytest.approx(1 - 1 / 18)  # a newline loop
    assert repeated_ngram_rate(["short"]) == 0.0


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("the cat sat", "the big cat sat") = 3; P = 3/3, R = 3/4, F = 6/7
    assert rouge_l("the cat sat", "The big cat sat") == pytest.approx(6 / 7)
    assert rouge_l("", "x") == 0.0 and rouge_l("a", "b") == 0.0


def test_generation_metrics_average_over_prompts():
    results = [
        {"generation": "one two three four", "ended": True, "repeat_rate": 0.0, "reference": None},
        {"generation": "one two", "ended": False, "repeat_rate": 0.5, "reference": "one two three"},
    ]
    m = generation_metrics(results)
    se = m.pop("rouge_l_se")
    assert m == {"repeat_ngram_rate": 0.25, "gen_mean_words": 3.0, "end_marker_rate": 0.5,
                 "rouge_l": pytest.approx(0.8)}
    assert math.isnan(se)  # one scored row: no standard error
    results.append({"generation": "one", "ended": False, "repeat_rate": 0.0, "reference": "one two three"})
    # ROUGE-L 0.8 and 0.5: mean 0.65, sd 0.2121, SE 0.15
    assert generation_metrics(results)["rouge_l_se"] == pytest.approx(0.15)

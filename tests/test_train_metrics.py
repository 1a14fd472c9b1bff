"""Metric conventions checked against values computed by hand (conlleval, official SQuAD v2.0 script)."""

import numpy as np
import pytest

from bertkit.train.metrics import (accuracy, classification_metrics, entity_scores, get_entities, macro_f1,
                                   normalize_answer, squad_exact, squad_f1, squad_scores)


# ------------------------------------------------------------------------------ NER
@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["O", "B-LOC", "I-LOC"], [("LOC", 1, 2)]),                     # entity at the sentence end
    (["I-PER", "I-PER", "O"], [("PER", 0, 1)]),                     # I- without B- opens an entity
    (["O", "I-ORG"], [("ORG", 1, 1)]),                              # ... also after O, at the end
    (["B-PER", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),           # a type change splits
    (["I-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),           # B- always starts a new one
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),
    (["S-LOC", "B-ORG", "E-ORG", "O"], [("LOC", 0, 0), ("ORG", 1, 2)]),  # IOBES
    (["O", "O"], []),
])
def test_get_entities_follows_conlleval(tags, expected):
    assert get_entities(tags) == expected


def test_entity_scores_hand_computed():
    gold = [["B-PER", "O", "B-LOC"], ["B-ORG", "I-ORG"]]
    pred = [["B-PER", "O", "O"], ["B-ORG", "I-ORG"]]
    # gold: PER, LOC, ORG; predicted: PER, ORG (both right) -> P = 1, R = 2/3, F1 = 0.8
    scores = entity_scores(gold, pred)
    assert scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(0.8)
    assert scores["accuracy"] == pytest.approx(4 / 5)
    assert scores["f1_LOC"] == 0.0 and scores["f1_PER"] == 1.0


def test_entity_scores_boundaries_and_sentence_end():
    # The predicted LOC stops one token early at the end of the sentence: wrong boundary = no match.
    scores = entity_scores([["O", "B-LOC", "I-LOC"]], [["O", "B-LOC", "O"]])
    assert scores["precision"] == 0.0 and scores["recall"] == 0.0 and scores["f1"] == 0.0
    # I-PER I-PER without B- is the same entity as B-PER I-PER.
    assert entity_scores([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])["f1"] == 1.0
    # Entities do not run across sentences.
    assert entity_scores([["B-PER"], ["I-PER"]], [["B-PER", ], ["B-PER"]])["f1"] == 1.0
    # Wrong type with the right span is wrong: 1 of 2 predicted correct, 1 of 2 gold found.
    scores = entity_scores([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "B-ORG"]])
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5


def test_entity_scores_errors():
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="1 gold sentences but 2 predicted"):
        entity_scores([["O"]], [["O"], ["O"]])


# ------------------------------------------------------------------------------ SQuAD
@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower.", "eiffel tower"),
    ("an apple a day", "apple day"),
    ("  Rock-and-roll,   THE band!  ", "rockandroll band"),   # punctuation is deleted, not spaced
    ("theater", "theater"),                                   # articles only as whole words
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_squad_exact_and_f1_hand_computed():
    assert squad_exact("the Eiffel Tower.", "Eiffel Tower") == 1
    assert squad_exact("Eiffel", "Eiffel Tower") == 0
    # pred tokens {in, year, 1851}, gold {1851}: P = 1/3, R = 1, F1 = 0.5
    assert squad_f1("in the year 1851", "1851") == pytest.approx(0.5)
    assert squad_f1("Paris", "London") == 0.0
    assert squad_f1("", "") == 1.0 and squad_f1("", "Paris") == 0.0 and squad_f1("Paris", "") == 0.0


def test_squad_scores_with_null_answers():
    golds = {"a": ["Denver Broncos", "The Broncos"], "b": [], "c": [], "d": ["1851"]}
    predictions = {"a": "broncos", "b": "", "c": "some text", "d": "in 1851 ."}
    scores = squad_scores(predictions, golds)
    # a: EM 1 via "The Broncos"; b: right no-answer; c: answered an unanswerable one; d: F1 2/3, EM 0
    assert scores["exact_match"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)
    assert scores["HasAns_exact_match"] == 0.5 and scores["HasAns_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert scores["NoAns_exact_match"] == 0.5 and scores["NoAns_f1"] == 0.5
    # A gold answer that normalizes to nothing ("the") counts as "no answer", as in the official script.
    assert squad_scores({"q": ""}, {"q": ["the"]})["exact_match"] == 1.0
    with pytest.raises(ValueError, match="no prediction for 1 question"):
        squad_scores({}, {"q": ["x"]})


# ------------------------------------------------------------------------------ classification
def test_classification_metrics_hand_computed():
    assert accuracy([0, 1, 1], [0, 1, 0]) == pytest.approx(2 / 3)
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 0, fn 1 -> 4/5
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 0.8) / 2)
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    single = classification_metrics(logits, np.array([0, 1, 1]), "single_label_classification")
    assert single["accuracy"] == pytest.approx(2 / 3)
    multi = classification_metrics(np.array([[1.0, -1.0], [1.0, 1.0]]), np.array([[1, 0], [0, 1]]),
                                   "multi_label_classification")
    # predicted [[1,0],[1,1]]: micro tp 2, fp 1, fn 0 -> 0.8; per label 2/3 and 1; one row exactly right
    assert multi["micro_f1"] == pytest.approx(0.8)
    assert multi["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert multi["subset_accuracy"] == 0.5
    reg = classification_metrics(np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 3.0, 4.0]), "regression")
    assert reg["mse"] == pytest.approx(1 / 3)
    assert reg["pearson"] == pytest.approx(np.corrcoef([1, 2, 4], [1, 3, 4])[0, 1])

"""Evaluation metrics for the fine-tuning tasks, written out so their conventions are visible.

* Classification: accuracy and macro F1 (single label), micro/macro F1 and subset accuracy
  (multi-label), MSE and Pearson correlation (regression).
* NER: entity-level precision/recall/F1 with the conventions of ``conlleval`` (seqeval's default
  mode): an ``I-X`` that follows ``O`` or another type opens a new entity, so ``O I-PER I-PER`` is one
  PER entity; an entity counts as correct only if its type, start and end all match.
* Question answering: the official SQuAD v2.0 exact match and F1 (which reduce to v1.1's on
  answerable questions), with its answer normalization.

Every score is a fraction in [0, 1] (the official SQuAD script prints percentages).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence

import numpy as np


# ------------------------------------------------------------------------------ classification
def accuracy(preds: Sequence, labels: Sequence) -> float:
    """Fraction of predictions equal to their label (0.0 for an empty input)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    return float(np.mean(np.asarray(preds) == np.asarray(labels))) if len(labels) else 0.0


def _f1(tp: float, fp: float, fn: float) -> float:
    # Precision or recall undefined (no predictions / no gold items) counts as 0, as in sklearn.
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(preds: Sequence[int], labels: Sequence[int], num_labels: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = range(num_labels) if num_labels else np.union1d(preds, labels)
    scores = [_f1(np.sum((preds == c) & (labels == c)), np.sum((preds == c) & (labels != c)),
                  np.sum((preds != c) & (labels == c))) for c in classes]
    return float(np.mean(scores)) if scores else 0.0


def classification_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> dict[str, float]:
    """Metrics for a sequence-classification head, by ``config.problem_type``.

    Args:
        logits: (n, num_labels) model outputs.
        labels: (n,) class ids, (n, num_labels) 0/1 targets, or (n,) / (n, k) floats for regression.
        problem_type: ``single_label_classification``, ``multi_label_classification`` or ``regression``.

    Returns:
        ``accuracy``/``macro_f1``; ``micro_f1``/``macro_f1``/``subset_accuracy``; or ``mse``/``pearson``.
    """
    if problem_type == "regression":
        pred = logits.reshape(labels.shape).astype(np.float64)
        gold = labels.astype(np.float64)
        pearson = float(np.corrcoef(pred.ravel(), gold.ravel())[0, 1]) if gold.size > 1 and gold.std() > 0 \
            and pred.std() > 0 else 0.0
        return {"mse": float(np.mean((pred - gold) ** 2)), "pearson": pearson}
    if problem_type == "multi_label_classification":
        pred = logits > 0  # sigmoid(x) > 0.5
        gold = labels > 0.5
        tp, fp, fn = (pred & gold).sum(0), (pred & ~gold).sum(0), (~pred & gold).sum(0)
        return {"micro_f1": _f1(tp.sum(), fp.sum(), fn.sum()),
                "macro_f1": float(np.mean([_f1(*c) for c in zip(tp, fp, fn)])),
                "subset_accuracy": float(np.mean((pred == gold).all(1)))}
    pred = logits.argmax(-1)
    return {"accuracy": accuracy(pred, labels), "macro_f1": macro_f1(pred, labels, logits.shape[-1])}


# ------------------------------------------------------------------------------ NER (conlleval)
def _split_tag(tag: str) -> tuple[str, str]:
    # "B-PER" -> ("B", "PER"); "O" -> ("O", ""). A tag without a dash is not BIO; we read "PER" as
    # "I-PER" (conlleval would misread it as prefix "P" of type "ER").
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if kind else ("I", tag)


def _ends(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != kind


def _starts(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != kind


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, first, last)`` (inclusive) in one sentence's BIO/IOB2/IOBES tags.

    Follows conlleval: ``I-X`` after ``O`` or after another type starts an entity, a type change
    ends one, and an entity open at the end of the sentence is closed there.
    """
    entities, prev, prev_type, begin = [], "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel closes an entity at the end
        prefix, kind = _split_tag(tag)
        if _ends(prev, prev_type, prefix, kind):
            entities.append((prev_type, begin, i - 1))
        if _starts(prev, prev_type, prefix, kind):
            begin = i
        prev, prev_type = prefix, kind
    return entities


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity precision/recall/F1 over sentences, plus per-type F1 (``f1_PER``...).

    Args:
        gold: Gold tag sequences, one per sentence.
        pred: Predicted tag sequences, same lengths.

    Returns:
        ``precision``, ``recall``, ``f1``, ``accuracy`` (token level) and ``f1_<TYPE>`` per type.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    true_set, pred_set = set(), set()
    correct_tokens = total_tokens = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        true_set.update((i, *e) for e in get_entities(g))
        pred_set.update((i, *e) for e in get_entities(p))
        correct_tokens += sum(a == b for a, b in zip(g, p))
        total_tokens += len(g)
    tp = len(true_set & pred_set)
    out = {"precision": tp / len(pred_set) if pred_set else 0.0,
           "recall": tp / len(true_set) if true_set else 0.0,
           "f1": _f1(tp, len(pred_set) - tp, len(true_set) - tp),
           "accuracy": correct_tokens / total_tokens if total_tokens else 0.0}
    for kind in sorted({e[1] for e in true_set | pred_set}):
        t = {e for e in true_set if e[1] == kind}
        p = {e for e in pred_set if e[1] == kind}
        out[f"f1_{kind}"] = _f1(len(t & p), len(p - t), len(t - p))
    return out


# ------------------------------------------------------------------------------ SQuAD
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower-case, drop punctuation, drop articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> int:
    """1 if the normalized strings are equal."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between normalized answers; an empty side scores 1 only if both are empty."""
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    same = sum((collections.Counter(pred_toks) & collections.Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], golds: dict[str, Iterable[str]]) -> dict[str, float]:
    """Official SQuAD v2.0 scoring (identical to v1.1 when every question has an answer).

    Args:
        predictions: question id -> predicted text (``""`` = no answer).
        golds: question id -> gold answer texts (empty for an unanswerable question).

    Returns:
        ``exact_match`` and ``f1`` over all questions, plus ``HasAns_*`` / ``NoAns_*`` when both kinds occur.

    Raises:
        ValueError: a question has no prediction.
    """
    missing = [qid for qid in golds if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
    exact, f1, has_answer = {}, {}, {}
    for qid, answers in golds.items():
        # As the official script: gold answers that normalize to "" do not count; none left = no answer.
        answers = [a for a in answers if normalize_answer(a)] or [""]
        has_answer[qid] = answers != [""]
        exact[qid] = max(squad_exact(predictions[qid], a) for a in answers)
        f1[qid] = max(squad_f1(predictions[qid], a) for a in answers)
    n = len(golds)
    out = {"exact_match": sum(exact.values()) / n if n else 0.0, "f1": sum(f1.values()) / n if n else 0.0}
    groups = {"HasAns": [q for q in golds if has_answer[q]], "NoAns": [q for q in golds if not has_answer[q]]}
    if all(groups.values()):
        for name, ids in groups.items():
            out[f"{name}_exact_match"] = sum(exact[q] for q in ids) / len(ids)
            out[f"{name}_f1"] = sum(f1[q] for q in ids) / len(ids)
    return out

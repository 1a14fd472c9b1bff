"""Fine-tuning tasks: how each one turns rows into features, batches, loss terms and metrics.

A task never averages a loss itself. ``loss_terms`` returns *sums* (over examples or tokens) and
``counts`` says what each sum must be divided by; the training loop adds the counts over all
micro-batches and all ranks of an optimizer step before dividing. That makes the gradient of a
step the same whether it is computed in one process, in several, or with gradient accumulation
(a per-micro-batch mean would weight a micro-batch with 3 labelled tokens like one with 300).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from .base import Task, pad_rows, rust_tokenizer
from .data import DataError, read_classification, read_conll, read_multiple_choice
from .metrics import classification_metrics, entity_scores
from .qa import QaTask


# ---------------------------------------------------------------------------------------- classify
class ClassifyTask(Task):
    """Sequence classification: single label, multi-label (list labels) or regression (float labels)."""

    name = "classify"
    model_class = models.BertForSequenceClassification

    def __init__(self, tokenizer, max_length: int = 128, label_type: str = "auto", text_column: str = "text",
                 label_column: str = "label"):
        super().__init__(tokenizer, max_length)
        self.columns = {"text": text_column, "label": label_column}  # --text-column / --label-column
        if label_type not in ("auto", "single", "multi", "regression"):
            raise ValueError(f"label_type={label_type!r}: use auto, single, multi or regression")
        self.label_type = label_type

    def _kind(self, rows: list[dict], path) -> str:
        if self.label_type != "auto":
            return self.label_type
        labels = [r["label"] for r in rows]
        if any(isinstance(x, list) for x in labels):
            return "multi"
        if any(isinstance(x, float) for x in labels):
            bad = [r for r in rows if not isinstance(r["label"], float) and not _is_number(r["label"])]
            if bad:
                raise DataError(f"{path}:{bad[0]['line']}: label {bad[0]['label']!r} is not a number but other "
                                "labels are scores; use numbers only (regression) or names only")
            return "regression"
        return "single"

    def load(self, train, eval):
        train_rows = read_classification(train, **self.columns)
        self.kind = self._kind(train_rows, train)
        self.problem_type = {"single": "single_label_classification", "multi": "multi_label_classification",
                             "regression": "regression"}[self.kind]
        if self.kind == "regression":
            self.labels = ["score"]
        else:
            names = {n for r in train_rows for n in (r["label"] if self.kind == "multi" else [r["label"]])}
            self.labels = sorted(names, key=lambda n: (0, int(n), "") if n.lstrip("-").isdigit() else (1, 0, n))
        self.main_metric, self.greater_is_better = {"single": ("accuracy", True), "multi": ("micro_f1", True),
                                                    "regression": ("mse", False)}[self.kind]
        return self._encode(train_rows, train), self._encode(read_classification(eval, **self.columns), eval) if eval else []

    def model_kwargs(self):
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}, "problem_type": self.problem_type}

    def _target(self, row: dict, path) -> Any:
        label = row["label"]
        if self.kind == "regression":
            try:
                return float(label)
            except (TypeError, ValueError):
                raise DataError(f"{path}:{row['line']}: label {label!r} is not a number (regression)") from None
        index = {n: i for i, n in enumerate(self.labels)}
        names = label if isinstance(label, list) else [label]
        unknown = [n for n in names if n not in index]
        if unknown or (self.kind == "single" and isinstance(label, list)):
            raise DataError(f"{path}:{row['line']}: label {label!r} does not occur in the training data, whose "
                            f"labels are {self.labels}; fix the label or add examples of it to the training file")
        if self.kind == "multi":
            hot = [0.0] * len(self.labels)
            for n in names:
                hot[index[n]] = 1.0
            return hot
        return index[label]

    def _encode(self, rows: list[dict], path) -> list[dict]:
        features = [None] * len(rows)
        for paired in (False, True):
            picked = [i for i, r in enumerate(rows) if (r["text_pair"] is not None) == paired]
            if not picked:
                continue
            enc = self.tokenizer([rows[i]["text"] for i in picked],
                                 text_pair=[rows[i]["text_pair"] for i in picked] if paired else None,
                                 padding=False, truncation=True, max_length=self.max_length, return_tensors=None)
            for j, i in enumerate(picked):
                features[i] = {"input_ids": enc["input_ids"][j], "token_type_ids": enc["token_type_ids"][j],
                               "label": self._target(rows[i], path)}
        return features

    def targets(self, features):
        dtype = torch.long if self.kind == "single" else torch.float32
        return {"labels": torch.tensor([f["label"] for f in features], dtype=dtype)}

    def loss_terms(self, outputs, batch):
        logits, labels = outputs[0].float(), batch["labels"]
        if self.kind == "single":
            return {"loss": F.cross_entropy(logits, labels, reduction="sum")}
        if self.kind == "regression":
            return {"loss": F.mse_loss(logits.view(-1), labels.view(-1), reduction="sum")}
        return {"loss": F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")}

    def counts(self, batch):
        n = batch["labels"].shape[0]
        return {"loss": float(n * len(self.labels) if self.kind == "multi" else n)}

    def evaluate(self, features, outputs):
        logits = np.stack([o[0] for o in outputs])
        labels = np.array([f["label"] for f in features])
        return classification_metrics(logits, labels, self.problem_type)


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- ner
class NerTask(Task):
    """Token classification on CoNLL data; each word's tag goes on its first sub-token (-100 elsewhere)."""

    name = "ner"
    model_class = models.BertForTokenClassification
    main_metric = "f1"

    def load(self, train, eval):
        train_rows = read_conll(train)
        tags = {t for r in train_rows for t in r["tags"]}
        self.labels = ["O"] * ("O" in tags) + sorted(tags - {"O"})
        self._rust = rust_tokenizer(self.tokenizer, self.max_length)
        return self._encode(train_rows, train), self._encode(read_conll(eval), eval) if eval else []

    def model_kwargs(self):
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}}

    def _encode(self, sentences: list[dict], path) -> list[dict]:
        index = {t: i for i, t in enumerate(self.labels)}
        encodings = self._rust.encode_batch([s["words"] for s in sentences], is_pretokenized=True)
        features = []
        for s, enc in zip(sentences, encodings):
            unknown = sorted(set(s["tags"]) - set(index))
            if unknown:
                raise DataError(f"{path}:{s['line']}: tag(s) {unknown} do not occur in the training data, whose "
                                f"tags are {self.labels}; fix the tags or add examples of them to the training file")
            labels, first, seen = [], [], set()
            for position, word in enumerate(enc.word_ids):
                if word is None or word in seen:
                    labels.append(-100)  # special tokens and continuation pieces are not scored
                else:
                    seen.add(word)
                    labels.append(index[s["tags"][word]])
                    first.append((word, position))
            features.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "labels": labels,
                             "first": first, "tags": s["tags"]})
        return features

    def targets(self, features):
        return {"labels": pad_rows([f["labels"] for f in features], -100)}

    def loss_terms(self, outputs, batch):
        logits = outputs[0].float()
        return {"loss": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                        ignore_index=-100, reduction="sum")}

    def counts(self, batch):
        return {"loss": float((batch["labels"] != -100).sum())}

    def evaluate(self, features, outputs):
        gold, pred = [], []
        for f, (logits,) in zip(features, outputs):
            tags = ["O"] * len(f["tags"])  # words cut off by truncation are predicted "O"
            for word, position in f["first"]:
                tags[word] = self.labels[int(logits[position].argmax())]
            gold.append(f["tags"])
            pred.append(tags)
        return entity_scores(gold, pred)


# ---------------------------------------------------------------------------------------- multiple choice
class MultipleChoiceTask(Task):
    """Each (context, [question] ending) pair is encoded; the head scores every choice."""

    name = "multiple-choice"
    model_class = models.BertForMultipleChoice

    def load(self, train, eval):
        return self._encode(read_multiple_choice(train)), self._encode(read_multiple_choice(eval)) if eval else []

    def _encode(self, rows):
        firsts = [r["context"] for r in rows for _ in r["endings"]]
        seconds = [f"{r['question']} {e}".strip() for r in rows for e in r["endings"]]
        enc = self.tokenizer(firsts, text_pair=seconds, padding=False, truncation=True,
                             max_length=self.max_length, return_tensors=None)
        features, k = [], 0
        for r in rows:
            n = len(r["endings"])
            features.append({"input_ids": enc["input_ids"][k:k + n], "token_type_ids": enc["token_type_ids"][k:k + n],
                             "label": r["label"]})
            k += n
        return features

    def length(self, feature):
        return max(len(c) for c in feature["input_ids"])

    def collate(self, features):
        width = max(self.length(f) for f in features)
        ids = [c for f in features for c in f["input_ids"]]
        shape = (len(features), len(features[0]["input_ids"]), width)
        return {"input_ids": pad_rows(ids, self.pad_id, width).view(shape),
                "token_type_ids": pad_rows([c for f in features for c in f["token_type_ids"]], 0, width).view(shape),
                "attention_mask": pad_rows([[1] * len(c) for c in ids], 0, width).view(shape),
                "labels": torch.tensor([f["label"] for f in features])}

    def loss_terms(self, outputs, batch):
        return {"loss": F.cross_entropy(outputs[0].float(), batch["labels"], reduction="sum")}

    def evaluate(self, features, outputs):
        pred = np.array([int(o[0].argmax()) for o in outputs])
        gold = np.array([f["label"] for f in features])
        return {"accuracy": float(np.mean(pred == gold))}


def make_task(name: str, tokenizer, max_length: int = 128, **options) -> Task:
    """Builds a task by its CLI name: ``classify``, ``ner``, ``qa`` or ``multiple-choice``."""
    tasks = {t.name: t for t in (ClassifyTask, NerTask, QaTask, MultipleChoiceTask)}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(tasks)}")
    return tasks[name](tokenizer, max_length, **options)

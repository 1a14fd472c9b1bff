"""Extractive question answering (SQuAD v1.1 / v2.0): windows over long contexts and span search.

A context longer than the model window is cut into overlapping windows (``doc_stride`` tokens of
overlap), each paired with the question. A window that does not contain the whole answer, and
every window of an unanswerable question, is trained to point at ``[CLS]`` (position 0), as in
the original BERT SQuAD code. At evaluation the best span over all windows of a question wins;
for v2 the question gets no answer when the ``[CLS]`` ("null") score beats it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from .data import read_squad
from .metrics import squad_scores
from .base import Task, rust_tokenizer


class QaTask(Task):
    """SQuAD-style span extraction with ``BertForQuestionAnswering``.

    Args:
        tokenizer: The bertkit tokenizer.
        max_length: Window length in tokens (question + context + 3 special tokens).
        doc_stride: Tokens shared by consecutive windows of one context.
        n_best: Start and end candidates considered per window.
        max_answer_length: Longest answer, in tokens.
        version_2: Allow "no answer"; None = decide from the data (any unanswerable question).
        null_threshold: Predict no answer when null score > best span score + this.
    """

    name = "qa"
    model_class = models.BertForQuestionAnswering
    main_metric = "f1"

    def __init__(self, tokenizer, max_length: int = 384, doc_stride: int = 128, n_best: int = 20,
                 max_answer_length: int = 30, version_2: bool | None = None, null_threshold: float = 0.0):
        super().__init__(tokenizer, max_length)
        if doc_stride >= max_length // 2:
            # The windows would advance by less than they overlap (or not at all).
            doc_stride = max(0, max_length // 4)
        self.doc_stride, self.n_best, self.max_answer_length = doc_stride, n_best, max_answer_length
        self.version_2, self.null_threshold = version_2, null_threshold

    def load(self, train, eval):
        train_rows = read_squad(train)
        eval_rows = read_squad(eval) if eval else []
        if self.version_2 is None:
            self.version_2 = any(r["is_impossible"] for r in train_rows + eval_rows)
        self._rust = rust_tokenizer(self.tokenizer, self.max_length, self.doc_stride, "only_second")
        self.eval_examples = eval_rows
        return self._encode(train_rows), self._encode(eval_rows)

    def _encode(self, examples: list[dict]) -> list[dict]:
        if not examples:
            return []
        try:
            encodings = self._rust.encode_batch([(e["question"].lstrip(), e["context"]) for e in examples])
        except Exception as err:  # Rust: the question alone does not fit
            raise ValueError(f"tokenizing SQuAD questions failed ({err}); a question is longer than "
                             f"--max-length {self.max_length} allows: raise --max-length") from None
        features = []
        for index, (example, first) in enumerate(zip(examples, encodings)):
            for enc in [first, *first.overflowing]:
                # Character offsets of context tokens only; None marks question and special tokens.
                offsets = [o if s == 1 else None for o, s in zip(enc.offsets, enc.sequence_ids)]
                start, end = self._positions(example, offsets)
                features.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "offsets": offsets,
                                 "example": index, "start": start, "end": end})
        return features

    @staticmethod
    def _positions(example: dict, offsets: list) -> tuple[int, int]:
        """Token span of the first gold answer inside this window, or (0, 0) ([CLS]) if not inside."""
        if not example["answers"]:
            return 0, 0
        text, start_char = example["answers"][0]
        end_char = start_char + len(text)
        context = [i for i, o in enumerate(offsets) if o is not None]
        if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
            return 0, 0
        start = next(i for i in context if offsets[i][1] > start_char)
        end = next(i for i in reversed(context) if offsets[i][0] < end_char)
        return start, end

    def targets(self, features):
        return {"start_positions": torch.tensor([f["start"] for f in features]),
                "end_positions": torch.tensor([f["end"] for f in features])}

    def forward(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        return out.start_logits, out.end_logits

    def loss_terms(self, outputs, batch):
        start, end = outputs[0].float(), outputs[1].float()
        # Same as BertForQuestionAnswering's loss (mean of start and end cross-entropy), as a sum.
        return {"loss": (F.cross_entropy(start, batch["start_positions"], reduction="sum")
                         + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2}

    def best_answers(self, features: list[dict], outputs: list[tuple[np.ndarray, ...]]) -> dict[str, str]:
        """question id -> predicted answer text ("" = no answer) over all windows of each question."""
        best: dict[int, tuple[float, str]] = {}
        null: dict[int, float] = {}
        for f, (start_logits, end_logits) in zip(features, outputs):
            n = len(f["offsets"])
            start_logits, end_logits = start_logits[:n], end_logits[:n]
            null[f["example"]] = min(null.get(f["example"], np.inf), float(start_logits[0] + end_logits[0]))
            starts = np.argsort(start_logits)[::-1][:self.n_best]
            ends = np.argsort(end_logits)[::-1][:self.n_best]
            context = self.eval_examples[f["example"]]["context"]
            for s in starts:
                for e in ends:
                    if f["offsets"][s] is None or f["offsets"][e] is None or e < s or e - s + 1 > self.max_answer_length:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if score > best.get(f["example"], (-np.inf, ""))[0]:
                        best[f["example"]] = (score, context[f["offsets"][s][0]:f["offsets"][e][1]])
        answers = {}
        for index, example in enumerate(self.eval_examples):
            score, text = best.get(index, (-np.inf, ""))
            if self.version_2 and null.get(index, -np.inf) > score + self.null_threshold:
                text = ""
            answers[example["id"]] = text
        return answers

    def evaluate(self, features, outputs):
        predictions = self.best_answers(features, outputs)
        return squad_scores(predictions, {e["id"]: [a for a, _ in e["answers"]] for e in self.eval_examples})

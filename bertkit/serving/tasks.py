"""Sequence-classification folders on /rerank (one label: a cross-encoder) and /predict (any labels).

The runner's forward is :meth:`bertkit.CrossEncoder.score_rows` without activation (raw logits of rows
from any requests, one padding-free batch); each request then applies its own activation: the
cross-encoder's (sigmoid by default, as sentence-transformers' ``rank``) unless ``raw_scores``, and for
/predict the text-classification pipeline's post-processing (softmax/sigmoid by ``problem_type``).
"""

from __future__ import annotations

import numpy as np
import torch

from .backends import ServedModel


class ClassifierModel(ServedModel):
    """A ``*ForSequenceClassification`` folder; ``task`` is ``reranker`` with one label, else ``classifier``."""

    def __init__(self, name: str, cross_encoder, path: str):
        from ..pipelines.base import Row
        from ..pipelines.text_classification import TextClassificationPipeline

        super().__init__(name, cross_encoder.tokenizer, cross_encoder.max_length, cross_encoder.model, path)
        self.cross = cross_encoder
        self.pipeline = TextClassificationPipeline(cross_encoder.model, cross_encoder.tokenizer,
                                                   max_length=cross_encoder.max_length)
        self.task = "reranker" if cross_encoder.num_labels == 1 else "classifier"
        self._row = Row

    def forward(self, ids: list, types: list | None) -> list[np.ndarray]:
        types = types if types is not None else [[0] * len(row) for row in ids]
        rows = [self._row(list(i), list(t)) for i, t in zip(ids, types)]
        logits = self.cross.score_rows(rows, activation_fn=torch.nn.Identity())
        return list(logits.reshape(len(rows), -1).float().numpy())

    def scores(self, logits: list[np.ndarray], raw: bool) -> list[float]:
        """One relevance score per pair: the logit, or the cross-encoder's activation of it."""
        values = torch.from_numpy(np.stack(logits))[:, 0]
        if not raw and self.cross.activation_fn is not None:
            values = self.cross.activation_fn(values)
        return values.tolist()

    def predictions(self, logits: list[np.ndarray], raw: bool) -> list[list[dict]]:
        """Every label with its score, best first (TEI's /predict); ``raw`` skips softmax/sigmoid."""
        return [self.pipeline.postprocess(torch.from_numpy(row), top_k=None,
                                          function_to_apply="none" if raw else None) for row in logits]

    def info(self) -> dict:
        labels = self.model.config.id2label
        kind = "reranker" if self.task == "reranker" else "classifier"
        return {**super().info(), "model_type": {kind: {"id2label": {str(k): v for k, v in labels.items()}}}}


def load_classifier(name: str, path: str, device=None, dtype=None) -> ClassifierModel:
    from ..crossencoder import CrossEncoder

    return ClassifierModel(name, CrossEncoder.from_pretrained(path, device=device, dtype=dtype), path)

"""Cross-encoders (rerankers): score (query, document) pairs with a sequence-classification BERT, as
``sentence_transformers.CrossEncoder`` does, with the same defaults and output order.

Loads sentence-transformers cross-encoder folders and plain HuggingFace/bertkit sequence-classification
folders (``bertkit finetune --task classify`` output included). The activation applied to the logits is, in
sentence-transformers' order: the ``activation_fn`` argument, the one saved in the folder
(``config_sentence_transformers.json``, or ``config.json``'s ``sentence_transformers.activation_fn`` / legacy
``sbert_ce_default_activation_function``; only ``torch.*`` classes, as without ``trust_remote_code``),
else ``Sigmoid`` for one label and ``Identity`` for several.

For servers that batch across requests, the two steps of :meth:`CrossEncoder.predict` are public:

* :meth:`CrossEncoder.tokenize` turns pairs into :class:`~bertkit.pipelines.base.Row` token-id lists,
  truncated to ``max_length`` (long documents are clipped before tokenizing, never tokenized in full);
* :meth:`CrossEncoder.score_rows` runs any list of rows as one padding-free batch and returns the scores
  (activation applied) -- rows of different requests can be mixed freely.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .models import BertForSequenceClassification
from .pipelines.base import (PipelineError, Row, batched, check_batch_size, check_top_k, encode, load_head,
                             pick_device, progress, resolve_model_dir, run_rows)
from .tokenizer import Tokenizer


def _saved_activation(folder: Path, config) -> Callable | None:
    path = None
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        path = json.loads(st_config.read_text(encoding="utf-8")).get("activation_fn")
    if path is None:
        st_block = config.extra.get("sentence_transformers") or {}
        path = st_block.get("activation_fn") or config.extra.get("sbert_ce_default_activation_function")
    if not path:
        return None
    if not path.startswith("torch."):  # sentence-transformers ignores these without trust_remote_code
        return None
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)()


class CrossEncoder:
    """Scores text pairs with a sequence-classification BERT (a reranker).

    Build it with :meth:`from_pretrained`. Attributes: ``model``, ``tokenizer``, ``max_length`` (tokens per
    pair, longest-first truncation), ``activation_fn`` (applied by :meth:`predict` and :meth:`rank`),
    ``num_labels``.
    """

    def __init__(self, model: BertForSequenceClassification, tokenizer: Tokenizer, max_length: int | None = None,
                 activation_fn: Callable | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.num_labels = model.config.num_labels
        limit = model.config.max_position_embeddings
        self.max_length = min(max_length or tokenizer.model_max_length, limit)
        if activation_fn is None:
            activation_fn = torch.nn.Sigmoid() if self.num_labels == 1 else torch.nn.Identity()
        self.activation_fn = activation_fn

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, max_length: int | None = None,
                        activation_fn: Callable | None = None) -> "CrossEncoder":
        """Loads a sentence-transformers cross-encoder folder or a sequence-classification folder.

        Args:
            path: The folder (a ``bertkit finetune`` run folder means its ``best/``).
            device: Where to run; None picks CUDA when available, else CPU.
            dtype: Weight dtype (``torch.float16``, ``"bfloat16"``...); None keeps float32.
            max_length: Tokens per pair; default the folder's ``max_seq_length`` or tokenizer limit.
            activation_fn: Overrides the saved/default activation.

        Raises:
            FileNotFoundError: The folder, its config or weights are missing.
            PipelineError: The folder is not a sequence classifier.
        """
        folder, _ = resolve_model_dir(path)
        model = load_head(folder, BertForSequenceClassification, "rerank", pick_device(device), dtype)
        sbert = folder / "sentence_bert_config.json"
        if max_length is None and sbert.is_file():
            max_length = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
        if activation_fn is None:
            activation_fn = _saved_activation(folder, model.config)
        return cls(model, Tokenizer.from_pretrained(folder), max_length, activation_fn)

    def __repr__(self) -> str:
        return (f"CrossEncoder(num_labels={self.num_labels}, max_length={self.max_length}, "
                f"activation_fn={type(self.activation_fn).__name__})")

    # ------------------------------------------------------------------ the two steps, for servers
    def tokenize(self, pairs: Sequence[Sequence[str]]) -> list[Row]:
        """Tokenizes ``(text, text_pair)`` pairs into rows, truncated (longest first) to ``max_length``."""
        pairs = [tuple(p) for p in pairs]
        bad = next((i for i, p in enumerate(pairs) if len(p) != 2), None)
        if bad is not None:
            raise PipelineError(f"pair {bad} has {len(pairs[bad])} items; a cross-encoder scores (query, document) "
                                "pairs of two strings")
        encodings = encode(self.tokenizer, [p[0] for p in pairs], [p[1] for p in pairs], max_length=self.max_length)
        return [Row(e.ids, e.type_ids) for e in encodings]

    def score_rows(self, rows: Sequence[Row], activation_fn: Callable | None = None,
                   apply_softmax: bool = False) -> torch.Tensor:
        """Scores rows in one padding-free batch: ``(len(rows),)`` for one label, else ``(len(rows), labels)``.

        The activation (``activation_fn``, default ``self.activation_fn``) is applied, then softmax if asked.
        """
        if not rows:
            return torch.empty(0)
        logits = torch.stack(run_rows(self.model, rows, self.tokenizer.pad_token_id))
        return self._activate(logits, activation_fn, apply_softmax)

    def _activate(self, scores: torch.Tensor, activation_fn, apply_softmax) -> torch.Tensor:
        fn = self.activation_fn if activation_fn is None else activation_fn
        if fn is not None:
            scores = fn(scores)
        if self.num_labels == 1 and scores.ndim > 1:
            scores = scores.squeeze(-1)
        if apply_softmax and scores.ndim > 1:
            scores = torch.nn.functional.softmax(scores, dim=1)
        return scores

    # ------------------------------------------------------------------ sentence-transformers API
    def predict(self, pairs, batch_size: int = 32, activation_fn: Callable | None = None,
                apply_softmax: bool = False, show_progress_bar: bool | None = None,
                convert_to_numpy: bool = True, convert_to_tensor: bool = False):
        """Scores pairs, as ``sentence_transformers.CrossEncoder.predict``.

        Args:
            pairs: One ``(text, text_pair)`` pair, or a list of them.
            batch_size: Pairs per forward pass (pairs are sorted by length; each batch runs padding-free).
            activation_fn: Overrides ``self.activation_fn`` for this call.
            apply_softmax: Softmax over the labels (models with several labels).
            show_progress_bar: None shows a bar on stderr only on a terminal.
            convert_to_numpy: float32 numpy (default); False gives a list of tensors.
            convert_to_tensor: One tensor (overrides ``convert_to_numpy``).

        Returns:
            ``(n,)`` scores for one label, ``(n, num_labels)`` otherwise; a scalar/row for a single pair.
        """
        check_batch_size(batch_size)
        # sentence-transformers' rule: a list/tuple whose first item is not a list/tuple is one pair.
        single = isinstance(pairs, (list, tuple)) and len(pairs) > 0 and not isinstance(pairs[0], (list, tuple))
        batch = [pairs] if single else list(pairs)
        rows = self.tokenize(batch)
        if show_progress_bar is None and len(rows) <= 10 * batch_size:
            show_progress_bar = False
        bar = progress(len(rows), show_progress_bar, "Scoring")
        scores: list = [None] * len(rows)
        for idx in batched(rows, batch_size):
            for i, s in zip(idx, self.score_rows([rows[i] for i in idx], activation_fn, apply_softmax)):
                scores[i] = s
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        out = torch.stack(scores) if scores else torch.tensor([])
        if convert_to_tensor:
            result = out
        elif convert_to_numpy:
            result = out.float().numpy() if len(scores) else np.array([])
        else:
            result = list(out)
        return result[0] if single else result

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int = 32, show_progress_bar: bool | None = None,
             activation_fn: Callable | None = None) -> list[dict]:
        """Ranks documents for a query, as ``sentence_transformers.CrossEncoder.rank``.

        Returns:
            ``[{"corpus_id": i, "score": s[, "text": doc]}, ...]`` sorted by score (highest first, stable for
            ties), the first ``top_k`` when given.

        Raises:
            PipelineError: The model has several labels (ranking needs one score per pair), or ``top_k <= 0``.
        """
        if self.num_labels != 1:
            raise PipelineError(f"rank() needs a model with one label, this one has {self.num_labels}; use "
                                "predict() with pairs instead")
        check_top_k(top_k)
        if isinstance(documents, str):
            raise PipelineError("documents must be a list of strings, got one string")
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size, activation_fn=activation_fn,
                              show_progress_bar=show_progress_bar, convert_to_tensor=True).tolist()
        results = []
        for i, score in enumerate(scores):
            results.append({"corpus_id": i, "score": score})
            if return_documents:
                results[-1]["text"] = documents[i]
        results.sort(key=lambda r: r["score"], reverse=True)
        return results[:top_k]

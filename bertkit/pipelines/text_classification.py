"""``pipeline("text-classification")``: labels and scores for texts or text pairs, as transformers returns them.

For servers that batch across requests, the three steps of a call are public:

* :meth:`TextClassificationPipeline.tokenize` turns inputs (strings or ``{"text", "text_pair"}`` dicts) into
  :class:`~bertkit.pipelines.base.Row` token-id lists, truncated to ``max_length`` (long texts are clipped
  before tokenizing, never tokenized in full);
* :meth:`TextClassificationPipeline.score_rows` runs any list of rows as one padding-free batch and returns
  the logits ``(len(rows), num_labels)`` -- rows of different requests can be mixed freely;
* :meth:`TextClassificationPipeline.postprocess` turns one row's logits into transformers' output.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import PipelineError, Row, check_batch_size, check_top_k, encode, run_rows, run_sorted

FUNCTIONS = ("softmax", "sigmoid", "none")
_UNSET = ""  # transformers' sentinel: top_k not given -> one best label, in the legacy (unlisted) shape


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TextClassificationPipeline:
    """Classifies texts with a sequence-classification model; see :func:`bertkit.pipeline`."""

    task = "text-classification"

    def __init__(self, model, tokenizer, max_length: int | None = None, batch_size: int = 32, top_k=_UNSET,
                 function_to_apply: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length = min(max_length or tokenizer.model_max_length, model.config.max_position_embeddings)
        check_batch_size(batch_size)
        self.batch_size = batch_size
        self.top_k, self.function_to_apply = top_k, function_to_apply
        self._check(top_k, function_to_apply)

    @staticmethod
    def _check(top_k, function_to_apply) -> None:
        if top_k != _UNSET:
            check_top_k(top_k)
        if function_to_apply is not None and str(function_to_apply).lower() not in FUNCTIONS:
            raise PipelineError(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function_to_apply!r}")

    def default_function(self) -> str:
        """transformers' rule: none for regression, sigmoid for multi-label or one label, else softmax."""
        config = self.model.config
        if config.problem_type == "regression":
            return "none"
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return "sigmoid"
        return "softmax"

    # ------------------------------------------------------------------ the three steps, for servers
    def tokenize(self, inputs: Sequence[str | dict]) -> list[Row]:
        """Tokenizes texts or ``{"text": ..., "text_pair": ...}`` dicts into rows (longest-first truncation)."""
        singles = [i for i, x in enumerate(inputs) if not isinstance(x, dict)]
        pairs = [i for i, x in enumerate(inputs) if isinstance(x, dict)]
        rows: list = [None] * len(inputs)
        if singles:
            for i, e in zip(singles, encode(self.tokenizer, [inputs[i] for i in singles], max_length=self.max_length)):
                rows[i] = Row(e.ids, e.type_ids)
        if pairs:
            for i in pairs:
                if "text" not in inputs[i] or set(inputs[i]) - {"text", "text_pair"}:
                    raise PipelineError(f"input {i} is {inputs[i]!r}; a text pair is {{'text': ..., 'text_pair': ...}}")
            texts = [inputs[i]["text"] for i in pairs]
            seconds = [inputs[i].get("text_pair") for i in pairs]
            with_pair = [k for k, s in enumerate(seconds) if s is not None]
            alone = [k for k, s in enumerate(seconds) if s is None]
            if with_pair:
                enc = encode(self.tokenizer, [texts[k] for k in with_pair], [seconds[k] for k in with_pair],
                             max_length=self.max_length)
                for k, e in zip(with_pair, enc):
                    rows[pairs[k]] = Row(e.ids, e.type_ids)
            if alone:
                for k, e in zip(alone, encode(self.tokenizer, [texts[k] for k in alone], max_length=self.max_length)):
                    rows[pairs[k]] = Row(e.ids, e.type_ids)
        return rows

    def score_rows(self, rows: Sequence[Row]) -> torch.Tensor:
        """Logits ``(len(rows), num_labels)`` (float32, CPU) of rows run as one padding-free batch."""
        if not rows:
            return torch.empty(0, self.model.config.num_labels)
        return torch.stack(run_rows(self.model, rows, self.tokenizer.pad_token_id))

    def postprocess(self, logits: torch.Tensor, top_k=_UNSET, function_to_apply: str | None = None):
        """One row's logits -> ``{"label", "score"}`` (``top_k`` unset) or a list of them, best first."""
        function = (function_to_apply or self.default_function()).lower()
        values = logits.float().numpy()
        scores = _softmax(values) if function == "softmax" else 1 / (1 + np.exp(-values)) if function == "sigmoid" \
            else values
        id2label = self.model.config.id2label
        if top_k == _UNSET:
            return {"label": id2label[int(scores.argmax())], "score": float(scores.max())}
        out = [{"label": id2label[i], "score": float(s)} for i, s in enumerate(scores)]
        out.sort(key=lambda d: d["score"], reverse=True)
        return out if top_k is None else out[:top_k]

    # ------------------------------------------------------------------ transformers' call
    def __call__(self, inputs, top_k=_UNSET, function_to_apply: str | None = None, batch_size: int | None = None):
        """Classifies one input or a list.

        Args:
            inputs: A string, a ``{"text": ..., "text_pair": ...}`` dict, or a list of them.
            top_k: Unset: the best label only (``[{"label", "score"}]`` for one input, one dict per input for a
                list). An int: the ``top_k`` best labels per input; None: all labels, best first.
            function_to_apply: ``"softmax"``, ``"sigmoid"`` or ``"none"``; default from the model's
                ``problem_type``/``num_labels`` as transformers chooses.
            batch_size: Inputs per forward pass (default: the pipeline's).

        Returns:
            transformers' shapes: see ``top_k``.
        """
        top_k = self.top_k if top_k == _UNSET else top_k
        function_to_apply = function_to_apply or self.function_to_apply
        self._check(top_k, function_to_apply)
        single = isinstance(inputs, (str, dict))
        batch = [inputs] if single else list(inputs)
        bad = next((i for i, x in enumerate(batch) if not isinstance(x, (str, dict))), None)
        if bad is not None:
            raise PipelineError(f"input {bad} is {type(batch[bad]).__name__}; pass a string or a "
                                "{'text': ..., 'text_pair': ...} dict")
        batch_size = batch_size or self.batch_size
        check_batch_size(batch_size)
        logits = run_sorted(self.model, self.tokenize(batch), self.tokenizer.pad_token_id, batch_size)
        results = [self.postprocess(row, top_k, function_to_apply) for row in logits]
        if single and top_k == _UNSET and isinstance(inputs, str):
            return results  # transformers: [{"label", "score"}] for one string (but a bare dict for one pair)
        return results[0] if single else results

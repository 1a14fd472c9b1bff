"""``pipeline("fill-mask")``: the most likely tokens for each ``[MASK]``, as transformers' ``FillMaskPipeline``.

The vocabulary projection (the largest matrix of a small BERT) runs only at the masked positions: the
encoder runs padding-free, then the MLM head sees one hidden vector per mask.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from .base import PipelineError, Row, check_batch_size, check_top_k, encode, run_sorted, string_inputs


class FillMaskPipeline:
    """Fills ``[MASK]`` tokens with a masked-LM model; see :func:`bertkit.pipeline`."""

    task = "fill-mask"

    def __init__(self, model, tokenizer, max_length: int | None = None, batch_size: int = 32, top_k: int = 5,
                 targets: str | Sequence[str] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length = min(max_length or tokenizer.model_max_length, model.config.max_position_embeddings)
        check_batch_size(batch_size)
        check_top_k(top_k, allow_none=False)
        self.batch_size, self.top_k = batch_size, top_k
        self.targets = targets
        self.mask_token = tokenizer.special_tokens["mask_token"]

    def target_ids(self, targets: str | Sequence[str]) -> np.ndarray:
        """Vocabulary ids of ``targets`` (each must be one token of the vocabulary, e.g. ``"paris"``)."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise PipelineError("targets is empty; pass at least one vocabulary token, or no targets")
        vocab = self.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        unknown = [t for t in targets if t not in vocab]
        if unknown:
            hints = [f"{t!r} -> {self.tokenizer.tokenize(t)}" for t in unknown[:3]]
            raise PipelineError(f"targets {unknown} are not tokens of the vocabulary; each target must be one "
                                f"token (the tokenizer splits them: {', '.join(hints)})")
        # transformers de-duplicates through a set; the order only matters for exact ties.
        return np.array(sorted({vocab[t] for t in targets}))

    def _mask_positions(self, i: int, text: str, ids: list[int]) -> list[int]:
        mask_id = self.tokenizer.mask_token_id
        positions = [k for k, t in enumerate(ids) if t == mask_id]
        if positions:
            return positions
        other = re.search(r"<mask>|\[mask\]|\[MASK\]|<MASK>", text)
        if other and other.group(0) != self.mask_token:
            raise PipelineError(f"input {i} ({text[:60]!r}) uses {other.group(0)!r}, but this model's mask token "
                                f"is {self.mask_token!r}")
        where = " within the first max_length tokens" if self.mask_token in text else ""
        raise PipelineError(f"input {i} ({text[:60]!r}) has no {self.mask_token} token{where}; put "
                            f"{self.mask_token} where a word should be predicted")

    def __call__(self, inputs: str | Sequence[str], top_k: int | None = None,
                 targets: str | Sequence[str] | None = None, batch_size: int | None = None):
        """Predicts each ``[MASK]``: a list of ``{"score", "token", "token_str", "sequence"}`` per mask.

        Args:
            inputs: A text or a list of texts, each with at least one mask token.
            top_k: Predictions per mask (default 5; at most the number of targets).
            targets: Restrict the predictions to these vocabulary tokens.
            batch_size: Texts per forward pass.

        Returns:
            transformers' shapes: for one text with one mask a list of dicts; with several masks a list per
            mask; for a list of texts, one of those per text.
        """
        top_k = self.top_k if top_k is None else top_k
        check_top_k(top_k, allow_none=False)
        targets = self.targets if targets is None else targets
        target_ids = self.target_ids(targets) if targets is not None else None
        if target_ids is not None:
            top_k = min(top_k, len(target_ids))
        single, texts = string_inputs(inputs, "fill-mask")
        batch_size = batch_size or self.batch_size
        check_batch_size(batch_size)
        encodings = encode(self.tokenizer, texts, max_length=self.max_length)
        positions = [self._mask_positions(i, t, e.ids) for i, (t, e) in enumerate(zip(texts, encodings))]
        hidden = run_sorted(self.model.bert, [Row(e.ids, e.type_ids) for e in encodings],
                            self.tokenizer.pad_token_id, batch_size, head=lambda out: out.last_hidden_state,
                            per_token=True)
        results = []
        with torch.inference_mode():
            for enc, pos, states in zip(encodings, positions, hidden):
                head = self.model.cls(states[pos].to(self.model.device, self.model.dtype)).float().cpu()
                probs = head.softmax(dim=-1)
                if target_ids is not None:
                    probs = probs[:, torch.from_numpy(target_ids)]
                values, predictions = probs.topk(top_k)
                results.append(self._rows(enc.ids, pos, values.tolist(), predictions.tolist(), target_ids))
        return results[0] if single or len(texts) == 1 else results

    def _rows(self, ids: list[int], positions: list[int], values, predictions, target_ids):
        single_mask = len(positions) == 1
        per_mask = []
        for pos, vals, preds in zip(positions, values, predictions):
            row = []
            for v, p in zip(vals, preds):
                token = int(target_ids[p]) if target_ids is not None else p
                filled = list(ids)
                filled[pos] = token
                filled = [t for t in filled if t != self.tokenizer.pad_token_id]
                row.append({"score": v, "token": token, "token_str": self.tokenizer.decode([token], False),
                            "sequence": self.tokenizer.decode(filled, skip_special_tokens=single_mask)})
            per_mask.append(row)
        return per_mask[0] if single_mask else per_mask

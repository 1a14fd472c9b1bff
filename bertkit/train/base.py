"""What every fine-tuning task shares: the :class:`Task` contract and the helpers that turn token lists
into batches (``pad_rows``, ``batches``, ``rust_tokenizer``). The tasks themselves are in ``tasks.py`` and
``qa.py``; ``tasks.make_task`` builds one by name.

A task never averages a loss itself. ``loss_terms`` returns *sums* (over examples or tokens) and
``counts`` says what each sum must be divided by; the training loop adds the counts over all
micro-batches and all ranks of an optimizer step before dividing (see ``tasks.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer as RustTokenizer

from ..nn.padding import right_pad


def rust_tokenizer(tokenizer, max_length: int | None = None, stride: int = 0,
                   strategy: str = "longest_first") -> RustTokenizer:
    """A private copy of the wrapper's Rust tokenizer, for word ids and character offsets.

    A copy, because the wrapper resets truncation/padding on its own backend before every call.
    """
    rust = RustTokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    rust.no_padding()
    if max_length:
        rust.enable_truncation(max_length=max_length, stride=stride, strategy=strategy)
    else:
        rust.no_truncation()
    return rust


def pad_rows(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> torch.Tensor:
    """Right-pads int lists into a (len(rows), width) long tensor."""
    return right_pad(rows, value, width or None)[0]


class Task:
    """Base class. Subclasses set the class attributes and implement the hooks below."""

    name = ""
    model_class: type = None
    main_metric = "accuracy"
    greater_is_better = True

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id

    # -- data
    def load(self, train: str | None, eval: str | None) -> tuple[list, list]:
        """Reads and encodes both files; returns (train features, eval features)."""
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        """Config overrides for ``from_pretrained`` (labels, problem type)."""
        return {}

    def length(self, feature: dict) -> int:
        """Tokens in a feature (evaluation batches are sorted by it to pad less)."""
        return len(feature["input_ids"])

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Pads features to the longest into a batch of tensors (inputs and training targets)."""
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad_rows(ids, self.pad_id),
                 "token_type_ids": pad_rows([f["token_type_ids"] for f in features], 0),
                 "attention_mask": pad_rows([[1] * len(i) for i in ids], 0)}
        return batch | self.targets(features)

    def targets(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """The batch's training targets (``labels``, ``start_positions``...)."""
        return {}

    # -- model
    def forward(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Runs the model on a batch; returns its outputs (logits) as a tuple of (batch, ...) tensors."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        return (out.logits,)

    def loss_terms(self, outputs, batch) -> dict[str, torch.Tensor]:
        """Each loss term as a sum over the batch (see the module docstring)."""
        raise NotImplementedError

    def counts(self, batch) -> dict[str, float]:
        """What each term of :meth:`loss_terms` is divided by, counted from the batch's targets."""
        return {"loss": float(batch["input_ids"].shape[0])}

    def evaluate(self, features: list[dict], outputs: list[tuple[np.ndarray, ...]]) -> dict[str, float]:
        """Metrics from the evaluation features and the model's outputs for each (in the same order)."""
        raise NotImplementedError


def batches(order: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive chunks of ``order`` of at most ``size``."""
    return [list(order[i:i + size]) for i in range(0, len(order), size)]

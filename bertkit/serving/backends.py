"""What the server runs: a model folder wrapped as tokenize (any thread) + forward (the runner thread).

``EmbeddingModel`` serves a :class:`~bertkit.SentenceEncoder`; its ``forward`` returns pooled rows that
are neither truncated nor normalized, so each request applies its own ``dimensions`` and ``normalize``.
Rerank and predict models plug in the same way (``task`` says which routes they serve).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


class InputTooLong(ValueError):
    """Row ``index`` has ``tokens`` tokens, more than ``limit``, and truncation is off."""

    def __init__(self, index: int, tokens: int, limit: int):
        self.index, self.tokens, self.limit = index, tokens, limit
        super().__init__(f"input {index} has {tokens} tokens, more than the model's limit of {limit}; "
                         "shorten it, send truncate=true, or start the server with --auto-truncate")


@dataclass
class Tokenized:
    ids: list[list[int]]
    types: list[list[int]] | None = None

    @property
    def tokens(self) -> int:
        return sum(map(len, self.ids))


class ServedModel:
    """Base: a name, a task, a tokenizer and ``max_input_length``; subclasses add ``forward``."""

    task = "embedding"

    def __init__(self, name: str, tokenizer, max_input_length: int, model: torch.nn.Module, path: str):
        self.name = name
        self.tokenizer = tokenizer
        self.max_input_length = max_input_length
        self.model = model
        self.path = path
        # /tokenize needs offsets and token strings, which the shared Tokenizer does not return; a private
        # copy of the Rust tokenizer (never reconfigured: no truncation, no padding) gives them.
        from tokenizers import Tokenizer as RustTokenizer

        self._plain = RustTokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._plain.no_truncation()
        self._plain.no_padding()

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = False) -> Tokenized:
        """Token ids of every text (or pair); raises :class:`InputTooLong` for the first long row unless
        ``truncate``, in which case long rows are cut exactly as the tokenizer truncates."""
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, padding=False,
                             truncation=False, return_tensors=None)
        ids, types = enc["input_ids"], enc["token_type_ids"] if pairs is not None else None
        long = [i for i, row in enumerate(ids) if len(row) > self.max_input_length]
        if long and not truncate:
            raise InputTooLong(long[0], len(ids[long[0]]), self.max_input_length)
        if long:
            cut = self.tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs is not None else None,
                                 padding=False, truncation=True, max_length=self.max_input_length,
                                 return_tensors=None)
            for j, i in enumerate(long):
                ids[i] = cut["input_ids"][j]
                if types is not None:
                    types[i] = cut["token_type_ids"][j]
        return Tokenized(ids, types)

    def describe_tokens(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[dict]]:
        """TEI's /tokenize rows: id, token text, special flag and character offsets (start, stop)."""
        out = []
        for text, enc in zip(texts, self._plain.encode_batch(list(texts), add_special_tokens=add_special_tokens)):
            rows = []
            for tid, tok, special, (start, stop) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets):
                special = bool(special)
                rows.append({"id": tid, "text": tok, "special": special,
                             "start": None if special else start, "stop": None if special else stop})
            out.append(rows)
        return out

    def info(self) -> dict:
        return {"model_id": self.name, "model_path": self.path, "task": self.task, "model_dtype": self.dtype,
                "max_input_length": self.max_input_length}

    def warm_up(self) -> None:
        self.forward(self.tokenize(["warm up"]).ids, None)


class EmbeddingModel(ServedModel):
    """A sentence-transformers (or plain BERT) folder served on /embed and /v1/embeddings."""

    task = "embedding"

    def __init__(self, name: str, encoder, path: str):
        super().__init__(name, encoder.tokenizer, encoder.max_seq_length, encoder.model, path)
        self.encoder = encoder
        self.normalize = encoder.normalize
        self.dim = encoder.dim

    @torch.inference_mode()
    def forward(self, ids: list, types: list | None) -> list[np.ndarray]:
        # SentenceEncoder's own batch path (packed-first, pooling in float32), without normalizing: requests decide.
        return list(self.encoder.embed_token_ids(ids, normalize=False).cpu().numpy())

    def info(self) -> dict:
        pooling = "+".join(self.encoder.pooling)
        return {**super().info(), "model_type": {"embedding": {"pooling": pooling}}, "dimensions": self.dim,
                "normalize": self.normalize}

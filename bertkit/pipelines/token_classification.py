"""``pipeline("token-classification")`` / ``"ner"``: tagged tokens or grouped entities with character offsets.

The grouping follows transformers' ``TokenClassificationPipeline`` step for step, so labels, scores and
``start``/``end`` offsets are the same:

* ``"none"``: one dict per token (``entity``, ``score``, ``index``, ``word``, ``start``, ``end``);
* ``"simple"``: adjacent tokens with the same tag are merged (``I-X`` continues ``B-X``/``I-X``, ``B-X``
  starts a new entity); the score is the mean of their scores;
* ``"first"``, ``"average"``, ``"max"``: subword tokens are first merged into words (the word takes the tag of
  its first token, of the average of its tokens' scores, or of its most confident token), then words are
  grouped as in ``"simple"``.

Unlike transformers, ``word`` is the input substring ``text[start:end]`` (transformers decodes the tokens,
which lower-cases and drops accents with uncased vocabularies).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import PipelineError, Row, check_batch_size, encode, run_sorted, string_inputs

STRATEGIES = ("none", "simple", "first", "average", "max")


def _tag(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label  # a label without prefix continues an entity of the same name, as in transformers


class TokenClassificationPipeline:
    """Tags tokens with a token-classification model; see :func:`bertkit.pipeline`."""

    task = "token-classification"

    def __init__(self, model, tokenizer, max_length: int | None = None, batch_size: int = 32,
                 aggregation_strategy: str = "none", ignore_labels: Sequence[str] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length = min(max_length or tokenizer.model_max_length, model.config.max_position_embeddings)
        check_batch_size(batch_size)
        self.batch_size = batch_size
        self.aggregation_strategy = self._strategy(aggregation_strategy)
        self.ignore_labels = ["O"] if ignore_labels is None else list(ignore_labels)
        prefix = getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None)
        self._has_subword_prefix = bool(prefix)

    @staticmethod
    def _strategy(value) -> str:
        name = str(getattr(value, "value", value)).lower()
        if name not in STRATEGIES:
            raise PipelineError(f"aggregation_strategy must be one of {', '.join(STRATEGIES)}, got {value!r}")
        return name

    def __call__(self, inputs: str | Sequence[str], aggregation_strategy: str | None = None,
                 ignore_labels: Sequence[str] | None = None, batch_size: int | None = None):
        """Tags one text (a list of dicts) or a list of texts (a list of lists)."""
        strategy = self._strategy(aggregation_strategy) if aggregation_strategy is not None \
            else self.aggregation_strategy
        ignore = self.ignore_labels if ignore_labels is None else list(ignore_labels)
        single, texts = string_inputs(inputs, "token-classification")
        batch_size = batch_size or self.batch_size
        check_batch_size(batch_size)
        encodings = encode(self.tokenizer, texts, max_length=self.max_length, offsets=True)
        logits = run_sorted(self.model, [Row(e.ids, e.type_ids) for e in encodings], self.tokenizer.pad_token_id,
                            batch_size, per_token=True)
        results = []
        for text, enc, row_logits in zip(texts, encodings, logits):
            values = row_logits.numpy()
            shifted = np.exp(values - values.max(axis=-1, keepdims=True))
            scores = shifted / shifted.sum(axis=-1, keepdims=True)
            entities = self._aggregate(self._pre_entities(text, enc, scores, strategy), strategy)
            for e in entities:
                e["word"] = text[e["start"]:e["end"]]
            results.append([e for e in entities if e.get("entity", e.get("entity_group")) not in ignore])
        return results[0] if single else results

    def _pre_entities(self, text: str, enc, scores: np.ndarray, strategy: str) -> list[dict]:
        unk = self.tokenizer.unk_token_id
        out = []
        for idx, token_scores in enumerate(scores):
            if enc.special_tokens_mask[idx]:
                continue
            start, end = enc.offsets[idx]
            token, ref = enc.tokens[idx], text[start:end]
            if self._has_subword_prefix:  # "##ing" is longer than "ing": the token continues a word
                is_subword = len(token) != len(ref)
            else:
                is_subword = start > 0 and " " not in text[start - 1:start + 1]
            if enc.ids[idx] == unk:
                is_subword = False
            out.append({"scores": token_scores, "start": start, "end": end, "index": idx, "is_subword": is_subword})
        return out

    def _aggregate(self, pre: list[dict], strategy: str) -> list[dict]:
        id2label = self.model.config.id2label
        if strategy in ("none", "simple"):
            entities = []
            for p in pre:
                best = int(p["scores"].argmax())
                entities.append({"entity": id2label[best], "score": float(p["scores"][best]), "index": p["index"],
                                 "start": p["start"], "end": p["end"]})
        else:
            entities, group = [], []
            for p in pre:
                if group and not p["is_subword"]:
                    entities.append(self._word(group, strategy))
                    group = []
                group.append(p)
            if group:
                entities.append(self._word(group, strategy))
        if strategy == "none":
            return [self._ordered(e, e["start"], e["end"]) for e in entities]
        return self._group(entities)

    def _word(self, tokens: list[dict], strategy: str) -> dict:
        id2label = self.model.config.id2label
        if strategy == "first":
            scores = tokens[0]["scores"]
        elif strategy == "max":
            scores = max(tokens, key=lambda t: t["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
        best = int(scores.argmax())
        return {"entity": id2label[best], "score": float(scores[best]), "start": tokens[0]["start"],
                "end": tokens[-1]["end"]}

    def _group(self, entities: list[dict]) -> list[dict]:
        groups, current = [], []
        for entity in entities:
            if current:
                bi, tag = _tag(entity["entity"])
                if not (tag == _tag(current[-1]["entity"])[1] and bi != "B"):
                    groups.append(self._merge(current))
                    current = []
            current.append(entity)
        if current:
            groups.append(self._merge(current))
        return groups

    def _merge(self, entities: list[dict]) -> dict:
        group = {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                 "score": float(np.nanmean([e["score"] for e in entities]))}
        return self._ordered(group, entities[0]["start"], entities[-1]["end"])

    @staticmethod
    def _ordered(entity: dict, start: int, end: int) -> dict:
        # transformers' key order: entity/entity_group, score, (index,) word, start, end; __call__ fills word.
        out = {k: v for k, v in entity.items() if k not in ("start", "end")}
        out.update(word=None, start=start, end=end)
        return out

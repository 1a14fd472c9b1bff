"""Output dataclasses, readable by attribute (``out.logits``), by key (``out["logits"]``) and by index
(``out[0]``), where the index counts only fields that are set, as in HuggingFace's ``ModelOutput``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
Tensors = tuple[torch.Tensor, ...]


class ModelOutput:
    """Base of every output: a dataclass whose unset (None) fields are skipped by index access."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        # Iterating gives the values, so `a, b = outputs[:2]` and `tuple(outputs)` read like a tuple.
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    past_key_values: tuple[Tensors, ...] | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None
    cross_attentions: Tensors | None = None


# HuggingFace's name for the same thing.
BaseModelOutputWithPoolingAndCrossAttentions = BaseModelOutput


@dataclass
class PreTrainingOutput(ModelOutput):
    loss: Tensor | None = None
    prediction_logits: Tensor | None = None
    seq_relationship_logits: Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: tuple[Tensors, ...] | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None
    cross_attentions: Tensors | None = None


@dataclass
class LogitsOutput(ModelOutput):
    """Masked LM, next-sentence, sequence/token classification and multiple choice."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


MaskedLMOutput = NextSentencePredictorOutput = SequenceClassifierOutput = LogitsOutput
TokenClassifierOutput = MultipleChoiceModelOutput = LogitsOutput


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    loss: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None

"""bertkit: one PyTorch library for the whole BERT family."""

from .config import PRESETS, BertConfig
from .models import (BertForMaskedLM, BertForMultipleChoice, BertForNextSentencePrediction, BertForPreTraining,
                     BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification,
                     BertLMHeadModel, BertModel)
from .pretrained import BertPreTrainedModel

__version__ = "0.1.0"

# Loaded on first use so `import bertkit` stays light for model-only users.
_LAZY = {"Tokenizer": ".tokenizer", "SentenceEncoder": ".encoder"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'bertkit' has no attribute {name!r}")


__all__ = [
    "BertConfig", "PRESETS", "BertPreTrainedModel", "BertModel", "BertForPreTraining", "BertForMaskedLM",
    "BertForNextSentencePrediction", "BertLMHeadModel", "BertForSequenceClassification", "BertForMultipleChoice",
    "BertForTokenClassification", "BertForQuestionAnswering", "Tokenizer", "SentenceEncoder",
]

"""bertkit: one PyTorch library for the whole BERT family."""

__version__ = "0.1.0"

# Every public name is loaded on first use, so `import bertkit` (and `bertkit --help`) do not import
# torch: `from bertkit import BertModel` imports bertkit.models then.  name -> submodule that defines it.
_LAZY = {
    "BertConfig": ".config", "PRESETS": ".config", "BertPreTrainedModel": ".pretrained",
    "BertModel": ".models", "BertForPreTraining": ".models", "BertForMaskedLM": ".models",
    "BertForNextSentencePrediction": ".models", "BertLMHeadModel": ".models",
    "BertForSequenceClassification": ".models", "BertForMultipleChoice": ".models",
    "BertForTokenClassification": ".models", "BertForQuestionAnswering": ".models",
    "Tokenizer": ".tokenizer", "SentenceEncoder": ".encoder",
    "pipeline": ".pipelines", "CrossEncoder": ".crossencoder",
}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if not name.startswith("_"):
        # `import bertkit; bertkit.quant.quantize(...)` worked while the package imported its submodules
        # eagerly; keep it working.
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'bertkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BertConfig", "PRESETS", "BertPreTrainedModel", "BertModel", "BertForPreTraining", "BertForMaskedLM",
    "BertForNextSentencePrediction", "BertLMHeadModel", "BertForSequenceClassification", "BertForMultipleChoice",
    "BertForTokenClassification", "BertForQuestionAnswering", "Tokenizer", "SentenceEncoder",
    "pipeline", "CrossEncoder",
]

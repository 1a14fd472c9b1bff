"""Pipelines: run a trained BERT the way ``transformers.pipeline`` does, padding-free and batched.

``bertkit.pipeline(task, model)`` returns a callable with transformers' task names, arguments and output
shapes (lists of dicts with the same keys):

* ``text-classification`` (alias ``sentiment-analysis``): ``{"label", "score"}`` (``top_k``: a list of them);
* ``token-classification`` (``ner``): ``[{"entity" or "entity_group", "score", "word", "start", "end"}]``;
* ``question-answering``: ``{"score", "start", "end", "answer"}`` (``top_k``: a list of them);
* ``fill-mask``: ``[{"score", "token", "token_str", "sequence"}]`` per mask;
* ``feature-extraction`` (``sentence-embedding``): the embedding, from a :class:`~bertkit.SentenceEncoder`.

Inputs are tokenized in one Rust call, sorted by length and run in padding-free batches; long texts are
truncated to ``max_length`` (question answering splits long contexts into overlapping windows instead).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

# Nothing heavy at import time: `bertkit predict --help` imports this package (through pipelines.cli).
logger = logging.getLogger("bertkit")


class PipelineError(ValueError):
    """A model folder or an input that does not fit the pipeline; the message names it and the fix."""

TASKS = ("text-classification", "token-classification", "question-answering", "fill-mask", "feature-extraction")
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification",
           "sentence-embedding": "feature-extraction"}


def normalize_task(task: str) -> str:
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise PipelineError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} "
                            f"(aliases: {', '.join(ALIASES)})")
    return name


def infer_task(folder: Path) -> str:
    """The task of a model folder: from config.json's ``architectures`` (a sentence-transformers folder
    with ``modules.json`` is ``feature-extraction``, a cross-encoder ``text-classification``)."""
    from ..config import BertConfig
    from .base import supported_tasks

    if (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        return "feature-extraction"
    config = BertConfig.from_pretrained(folder)
    if not config.architectures:
        raise PipelineError(f"{folder}/config.json names no architecture, so the task is unknown; pass task= "
                            f"(one of {', '.join(TASKS)})")
    return supported_tasks(config)[0] if supported_tasks(config)[0] != "rerank" else "text-classification"


class FeatureExtractionPipeline:
    """``pipeline("feature-extraction")``: sentence embeddings from a :class:`~bertkit.SentenceEncoder`."""

    task = "feature-extraction"

    def __init__(self, encoder):
        self.encoder = encoder
        self.model, self.tokenizer = encoder.model, encoder.tokenizer

    def __call__(self, texts, **options):
        """``encoder.encode(texts, **options)``: ``(dim,)`` for one string, ``(n, dim)`` for a list."""
        return self.encoder.encode(texts, **options)


def pipeline(task: str | None = None, model: str | Path | None = None, device=None, dtype=None, **options):
    """Builds a pipeline for a task from a model folder, as ``transformers.pipeline``.

    Args:
        task: ``"text-classification"``, ``"token-classification"`` (``"ner"``), ``"question-answering"``,
            ``"fill-mask"``, ``"feature-extraction"`` (``"sentence-embedding"``); None reads it from the
            folder's ``architectures``.
        model: A HuggingFace/bertkit BERT or Megatron-BERT folder, a sentence-transformers folder, or the run
            folder of ``bertkit finetune`` (its ``best/`` model is used). None: the bundled
            all-MiniLM-L6-v2 for ``feature-extraction``.
        device: Where to run; None picks CUDA when available, else CPU.
        dtype: Weight dtype (``torch.float16``, ``"bfloat16"``...); None keeps float32.
        **options: ``max_length`` and ``batch_size``, and defaults for the call's options (``top_k``,
            ``function_to_apply``, ``aggregation_strategy``, ``ignore_labels``, ``targets``, ``doc_stride``,
            ``max_answer_len``, ``max_seq_len``, ``max_question_len``, ``handle_impossible_answer``).

    Returns:
        A callable pipeline (``pipe(inputs, **call_options)``); ``pipe.model`` and ``pipe.tokenizer`` are the
        loaded model and tokenizer.

    Raises:
        FileNotFoundError: The folder or its files are missing.
        PipelineError: Unknown task, a head that does not do the task, bad option values.
    """
    from ..tokenizer import Tokenizer
    from .base import pick_device, resolve_model_dir

    name = normalize_task(task) if task is not None else None
    if model is None:
        if name not in (None, "feature-extraction"):
            raise PipelineError(f"pass model= (a model folder) for {name}; only feature-extraction has a "
                                "bundled default model")
        name = "feature-extraction"
        folder = None
    else:
        folder, note = resolve_model_dir(model)
        if note:
            logger.warning(note)
        name = name or infer_task(folder)
    if name == "feature-extraction":
        from ..encoder import SentenceEncoder

        allowed = {"max_batch_tokens", "quantize", "unpad", "compile"}
        _no_unknown(options, allowed, name)
        return FeatureExtractionPipeline(SentenceEncoder.from_pretrained(folder, device=device, dtype=dtype,
                                                                         **options))
    import importlib

    from .. import models
    from .base import load_head

    module, class_name, model_name = {
        "text-classification": ("text_classification", "TextClassificationPipeline", "BertForSequenceClassification"),
        "token-classification": ("token_classification", "TokenClassificationPipeline", "BertForTokenClassification"),
        "question-answering": ("question_answering", "QuestionAnsweringPipeline", "BertForQuestionAnswering"),
        "fill-mask": ("fill_mask", "FillMaskPipeline", "BertForMaskedLM"),
    }[name]
    cls = getattr(importlib.import_module(f".{module}", __name__), class_name)
    model_cls = getattr(models, model_name)
    import inspect

    _no_unknown(options, set(inspect.signature(cls.__init__).parameters) - {"self", "model", "tokenizer"}, name)
    loaded = load_head(folder, model_cls, name, pick_device(device), dtype)
    sbert = folder / "sentence_bert_config.json"
    if "max_length" in inspect.signature(cls.__init__).parameters and "max_length" not in options and sbert.is_file():
        options["max_length"] = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
    return cls(loaded, Tokenizer.from_pretrained(folder), **options)


def _no_unknown(options: dict, allowed: set, task: str) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"pipeline({task!r}) got unknown option(s) {unknown}; it accepts {sorted(allowed)}")


__all__ = ["pipeline", "PipelineError", "TASKS"]

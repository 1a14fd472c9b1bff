"""``finetune()``: one call from data files to a fine-tuned model folder, for every task head."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as D
from .loop import FeatureDataset, TrainConfig, Trainer
from .tasks import make_task

# Window lengths that suit each task when --max-length is not given.
DEFAULT_MAX_LENGTH = {"classify": 128, "ner": 128, "qa": 384, "multiple-choice": 128}


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (new head weights are drawn from torch's generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _bundled() -> Path:
    from ..encoder import INSTALL_HINT, bundled_model_dir

    folder = bundled_model_dir()
    if folder is None:
        raise FileNotFoundError(f"no model folder given and the bundled model is not installed ({INSTALL_HINT})")
    return folder


def resolve_folders(model: str | os.PathLike | None, tokenizer: str | os.PathLike | None,
                    default_model: bool = True) -> tuple[Path | None, Path]:
    """(model folder, tokenizer folder) with the defaults filled in.

    The model defaults to the bundled all-MiniLM-L6-v2 (unless ``default_model`` is False); the
    tokenizer to the model folder's when it has one, else the bundled model's.
    """
    if model is None and default_model:
        model = _bundled()
    if tokenizer is None:
        has_own = model is not None and any((Path(model) / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
        tokenizer = model if has_own else _bundled()
    return (Path(model) if model is not None else None), Path(tokenizer)


def finetune(task: str, train: str | os.PathLike, eval: str | os.PathLike | None = None,
             out: str | os.PathLike = "finetuned", model: str | os.PathLike | None = None,
             tokenizer: str | os.PathLike | None = None, max_length: int | None = None,
             task_options: dict[str, Any] | None = None, **hparams) -> dict[str, Any]:
    """Fine-tunes a BERT model on a task and writes ``out/best`` and ``out/final`` model folders.

    Labels come from the training file and are stored as ``id2label``/``label2id`` in the saved
    ``config.json``. Works unchanged under ``torchrun`` (see ``bertkit.train.distributed``).

    Args:
        task: ``classify``, ``ner``, ``qa`` or ``multiple-choice``.
        train: Training file (see ``bertkit.train.data`` for the formats).
        eval: Evaluation file, scored at the end of every epoch; the best epoch is kept in ``out/best``.
        out: Run folder (``metrics.jsonl``, ``checkpoints/``, ``best/``, ``final/``).
        model: Model folder to start from; default the bundled all-MiniLM-L6-v2.
        tokenizer: Tokenizer folder; default the model folder's, else the bundled model's.
        max_length: Truncation length (QA: window length); default 128, QA 384.
        task_options: Task settings: classify ``label_type`` (auto/single/multi/regression); qa
            ``doc_stride``, ``n_best``, ``max_answer_length``, ``version_2``, ``null_threshold``.
        **hparams: :class:`~bertkit.train.loop.TrainConfig` fields: ``epochs``, ``batch_size``, ``lr``,
            ``grad_accum``, ``warmup_ratio``, ``weight_decay``, ``max_grad_norm``, ``seed``, ``max_steps``,
            ``save_every``, ``resume``, ``gradient_checkpointing``, ``fsdp``, ``precision``, ``device``...

    Returns:
        Summary: ``global_step``, ``eval`` (last evaluation), ``best`` (metric, value, step), ``seconds``.

    Example:
        >>> from bertkit.train import finetune
        >>> finetune("classify", "examples/sentiment_train.csv", "examples/sentiment_eval.csv",
        ...          out="runs/sentiment", epochs=3, lr=5e-5)  # doctest: +SKIP
    """
    from ..tokenizer import Tokenizer

    model_dir, tokenizer_dir = resolve_folders(model, tokenizer)
    config = TrainConfig(out=str(out), **hparams)
    info = D.setup(config.device)
    try:
        seed_everything(config.seed)
        tok = Tokenizer.from_pretrained(tokenizer_dir)
        job = make_task(task, tok, max_length or DEFAULT_MAX_LENGTH.get(task, 128), **(task_options or {}))
        train_features, eval_features = job.load(train, eval)
        net = job.model_class.from_pretrained(model_dir, **job.model_kwargs())
        if max_length and net.config.max_position_embeddings < max_length:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings "
                             f"{net.config.max_position_embeddings}")
        trainer = Trainer(net, job, FeatureDataset(train_features, job), config, info, eval_features, tok)
        return trainer.train()
    finally:
        D.teardown(info)

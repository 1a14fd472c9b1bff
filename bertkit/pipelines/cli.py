"""``bertkit predict`` and ``bertkit rerank``: run a trained model from the command line.

``predict`` writes one JSON line per input, in input order, as it goes (files are read and predicted in
chunks, so they can be larger than memory); ``rerank`` scores documents against a query with a
cross-encoder. A ``bertkit finetune`` run folder is accepted as ``--model`` and means its ``best/`` model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

from ..commands import positive_int

CHUNK = 256  # inputs read, sorted by length and predicted together
TASK_CHOICES = ("text-classification", "token-classification", "ner", "question-answering", "fill-mask",
                "feature-extraction", "sentence-embedding")
AGGREGATIONS = ("none", "simple", "first", "average", "max")


def _model_dir(path: str) -> Path:
    from .base import resolve_model_dir

    folder, note = resolve_model_dir(path)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return folder


# ---------------------------------------------------------------------------------------- predict
def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bertkit predict`` options to ``parser``."""
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to run (or use --input)")
    parser.add_argument("--model", "-m", required=True, metavar="PATH", help="model folder, or the run folder of "
                        "`bertkit finetune` (its best/ model is used)")
    parser.add_argument("--input", "-i", metavar="FILE", help=".txt (one text per line), .jsonl or .csv; "
                        "question-answering reads .jsonl records with \"question\" and \"context\"; "
                        "text-classification also reads \"text_pair\" from .jsonl")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the JSON lines here (the file appears only "
                        "when complete); default: stdout")
    parser.add_argument("--column", metavar="NAME", help="JSON field or CSV column with the text (default: text)")
    parser.add_argument("--task", choices=TASK_CHOICES, help="default: from the folder's config.json architectures")
    parser.add_argument("--top-k", type=positive_int, metavar="N", help="labels (classification), predictions "
                        "(fill-mask) or answers (question-answering) per input")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default=None,
                        help="token-classification: how tokens are grouped into entities (default: simple)")
    parser.add_argument("--targets", nargs="+", metavar="TOKEN", help="fill-mask: only score these tokens")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="inputs per forward "
                        "pass (default: 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")


def _options(args: argparse.Namespace, task: str) -> dict:
    options: dict = {}
    if args.top_k is not None:
        if task in ("token-classification", "feature-extraction"):
            raise ValueError(f"--top-k does not apply to {task}")
        options["top_k"] = args.top_k
    if args.aggregation is not None or task == "token-classification":
        if task != "token-classification":
            raise ValueError(f"--aggregation applies to token-classification, not {task}")
        options["aggregation_strategy"] = args.aggregation or "simple"
    if args.targets:
        if task != "fill-mask":
            raise ValueError(f"--targets applies to fill-mask, not {task}")
        options["targets"] = args.targets
    return options


def _records(args: argparse.Namespace, task: str):
    """Yields the inputs: strings, ``{"text", "text_pair"}`` dicts or QA ``{"question", "context"}`` records."""
    from ..io_readers import InputError, input_format, read_rows, read_texts

    if args.texts and args.input:
        raise InputError("give texts on the command line or --input FILE, not both")
    if not args.texts and not args.input:
        raise InputError("nothing to predict: give texts on the command line or --input FILE")
    if task == "question-answering":
        if args.texts or input_format(args.input) != ".jsonl":
            raise InputError("question-answering reads --input FILE.jsonl with one {\"question\": ..., "
                             "\"context\": ...} object per line")
        for number, record in read_rows(args.input):
            missing = [k for k in ("question", "context") if not isinstance(record.get(k), str)]
            if missing:
                raise InputError(f"{args.input}: line {number} has no string {' or '.join(map(repr, missing))} "
                                 f"(it has {sorted(record)}); each line needs \"question\" and \"context\"")
            yield {"question": record["question"], "context": record["context"]}
        return
    if args.texts:
        yield from args.texts
        return
    if task == "text-classification" and input_format(args.input) == ".jsonl":
        column = args.column or "text"
        for number, record in read_rows(args.input):
            if not isinstance(record.get(column), str):
                raise InputError(f"{args.input}: line {number} has no string field {column!r} (it has "
                                 f"{sorted(record)}); pick the field with --column NAME")
            if isinstance(record.get("text_pair"), str):
                yield {"text": record[column], "text_pair": record["text_pair"]}
            else:
                yield record[column]
        return
    yield from read_texts(args.input, args.column)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def cmd_predict(args: argparse.Namespace) -> int:
    """Runs ``bertkit predict``: one JSON line per input on stdout or in ``--output``."""
    from . import infer_task, normalize_task, pipeline
    from .base import progress

    folder = _model_dir(args.model)
    task = normalize_task(args.task) if args.task else infer_task(folder)
    options = _options(args, task)
    records = _records(args, task)
    first = list(itertools.islice(records, CHUNK))  # read input errors before the model loads
    pipe = pipeline(task, folder, device=args.device, **({"batch_size": args.batch_size}
                                                          if task != "feature-extraction" else {}))
    total = len(args.texts) if args.texts else None
    bar = progress(total, None if total is None or total > CHUNK else False, "Predicting")
    out, tmp = _open_output(args.output)
    try:
        chunk = first
        while chunk:
            if task in ("question-answering", "fill-mask"):
                results = pipe(chunk, **options)
                results = [results] if len(chunk) == 1 else results  # transformers unwraps a list of one
            elif task == "feature-extraction":
                results = pipe(chunk, batch_size=args.batch_size)
            else:
                results = pipe(chunk, **options)
            for result in results:
                out.write(json.dumps(_jsonable(result), ensure_ascii=False) + "\n")
            out.flush()
            if bar is not None:
                bar.update(len(chunk))
            chunk = list(itertools.islice(records, CHUNK))
        if tmp is not None:
            out.close()
            os.replace(tmp, args.output)
            tmp = None
    finally:
        if bar is not None:
            bar.close()
        if tmp is not None:
            out.close()
            Path(tmp).unlink(missing_ok=True)
    return 0


def _open_output(path: str | None):
    if path is None:
        return sys.stdout, None
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--output {path}: folder {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


# ---------------------------------------------------------------------------------------- rerank
def add_rerank_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bertkit rerank`` options to ``parser``."""
    parser.add_argument("documents", nargs="*", metavar="DOC", help="documents to rank (or use --corpus)")
    parser.add_argument("--model", "-m", required=True, metavar="PATH", help="cross-encoder folder "
                        "(sentence-transformers or a one-label sequence classifier)")
    parser.add_argument("--query", "-q", required=True, help="the query the documents are ranked for")
    parser.add_argument("--corpus", "-c", metavar="FILE", help=".txt (one document per line), .jsonl or .csv")
    parser.add_argument("--column", metavar="NAME", help="JSON field or CSV column with the text (default: text)")
    parser.add_argument("--top-k", "-k", type=positive_int, metavar="N", help="print the N best (default: all)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line: corpus_id, score, text")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="pairs per forward "
                        "pass (default: 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")


def cmd_rerank(args: argparse.Namespace) -> int:
    """Runs ``bertkit rerank``: documents sorted by cross-encoder score, best first."""
    from ..crossencoder import CrossEncoder
    from ..io_readers import InputError, read_texts

    if bool(args.documents) == bool(args.corpus):
        raise InputError("give the documents on the command line or --corpus FILE (one of the two)")
    documents = list(args.documents) if args.documents else list(read_texts(args.corpus, args.column))
    if not documents:
        raise InputError(f"{args.corpus}: no documents to rank")
    model = CrossEncoder.from_pretrained(_model_dir(args.model), device=args.device)
    ranking = model.rank(args.query, documents, top_k=args.top_k, return_documents=True,
                         batch_size=args.batch_size)
    for hit in ranking:
        if args.json:
            print(json.dumps(hit, ensure_ascii=False))
        else:
            print(f"{hit['score']:.4f}\t{hit['corpus_id']}\t{hit['text']}")
    return 0

"""``bertkit finetune`` / ``bertkit pretrain`` arguments and runners (also ``python -m bertkit.train``).

``bertkit/cli.py`` wires these as subcommands; ``__main__.py`` runs them directly, which is what
``torchrun -m bertkit.train finetune ...`` needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# What a finetune/pretrain run writes into OUT; any of them there means OUT already holds a run.
RUN_FILES = ("metrics.jsonl", "checkpoints", "best", "final", "train_args.json")

FINETUNE_EXAMPLES = """\
  bertkit finetune --task classify --train examples/sentiment_train.csv --eval examples/sentiment_eval.csv --out runs/sentiment
  bertkit finetune --task ner --train train.conll --eval dev.conll --out runs/ner --epochs 5 --lr 3e-5
  bertkit finetune --task qa --train train-v2.0.json --eval dev-v2.0.json --out runs/squad --max-length 384 --doc-stride 128
  torchrun --nproc_per_node 4 -m bertkit.train finetune --task multiple-choice --train swag.jsonl --out runs/mc --fsdp
  bertkit finetune ... --resume          # continue from out/checkpoints/latest after a crash
"""

PRETRAIN_EXAMPLES = """\
  bertkit pretrain --corpus corpus.txt --preset bert-tiny --out runs/mlm --steps 10000
  bertkit pretrain --corpus corpus.txt --preset bert-base --nsp --whole-word-masking --out runs/bert --max-length 512
  bertkit pretrain --corpus domain.txt --model ./bert-base-uncased --out runs/dapt --steps 2000 --lr 5e-5
  torchrun --nproc_per_node 8 -m bertkit.train pretrain --corpus corpus.txt --preset bert-base --out runs/bert
"""


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _common(parser: argparse.ArgumentParser, lr: float, batch: int) -> None:
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch-size", type=_positive(int), default=batch, help="examples per process and micro-batch "
                   f"(global batch = batch-size x grad-accum x processes; default {batch})")
    g.add_argument("--grad-accum", type=_positive(int), default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=_positive(float), default=lr, help=f"peak AdamW learning rate (default {lr})")
    g.add_argument("--warmup-ratio", type=float, default=None, help="fraction of steps of linear warm-up")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, not on biases/LayerNorm "
                   "(default 0.01)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 turns it off (default 1)")
    g.add_argument("--seed", type=int, default=42, help="seeds data order, masking, dropout and new weights (default 42)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto = bf16 (else fp16) on GPU, fp32 on CPU")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy machine)")
    g = parser.add_argument_group("checkpoints and distribution")
    g.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, final/ (and best/)")
    g.add_argument("--save-every", type=int, default=None, metavar="N", help="checkpoint every N optimizer steps")
    g.add_argument("--keep-checkpoints", type=_positive(int), default=2, help="checkpoints kept (default 2)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoints/latest (starts fresh when there is none)")
    again.add_argument("--overwrite", action="store_true", help="OUT already holds a run: delete it (metrics, "
                       "checkpoints, best/, final/) and start again; without this or --resume such an OUT is refused")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                   "state with FSDP2 fully_shard instead of DDP")
    g.add_argument("--log-every", type=_positive(int), default=10, help="steps per line in metrics.jsonl (default 10)")
    g.add_argument("--no-progress", "--quiet", "-q", action="store_true",
                   help="no progress bar (there is one only when stderr is a terminal anyway)")


def _hparams(args: argparse.Namespace) -> dict[str, Any]:
    if not _main_process():  # under torchrun, warnings such as "newly initialised" once, from rank 0
        import logging

        logging.getLogger("bertkit").setLevel(logging.ERROR)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
           "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm, "seed": args.seed,
           "gradient_checkpointing": args.gradient_checkpointing, "precision": args.precision,
           "device": args.device, "keep_checkpoints": args.keep_checkpoints, "resume": args.resume,
           "fsdp": args.fsdp, "log_every": args.log_every, "progress": not args.no_progress}
    for name in ("warmup_ratio", "save_every"):  # None = the command's own default
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bertkit finetune`` options to ``parser``."""
    parser.add_argument("--task", required=True, choices=("classify", "ner", "qa", "multiple-choice"))
    parser.add_argument("--model", default=None, help="model folder to start from (default: the bundled "
                        "all-MiniLM-L6-v2)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--train", required=True, help="training file: .csv/.jsonl (classify, multiple-choice), "
                        "CoNLL (ner), SQuAD .json (qa)")
    parser.add_argument("--eval", default=None, help="evaluation file, scored after every epoch")
    parser.add_argument("--epochs", type=_positive(int), default=3, help="passes over --train (default 3)")
    parser.add_argument("--max-steps", type=_positive(int), default=None, help="stop after N optimizer steps")
    parser.add_argument("--max-length", type=_positive(int), default=None,
                        help="truncation length in tokens (default 128; qa: window length, 384)")
    g = parser.add_argument_group("task options")
    g.add_argument("--label-type", choices=("auto", "single", "multi", "regression"), default="auto",
                   help="classify: label kind (auto: lists = multi-label, non-integer numbers = regression)")
    g.add_argument("--text-column", default="text", help="classify: CSV/TSV column or JSON field of the text "
                   "(default text)")
    g.add_argument("--label-column", default="label", help="classify: column or field of the label (default label)")
    g.add_argument("--doc-stride", type=int, default=128, help="qa: tokens shared by consecutive windows (default 128)")
    g.add_argument("--max-answer-length", type=_positive(int), default=30, help="qa: longest answer in tokens "
                   "(default 30)")
    g.add_argument("--n-best", type=_positive(int), default=20, help="qa: start/end candidates per window (default 20)")
    g.add_argument("--null-threshold", type=float, default=0.0,
                   help="qa v2: answer nothing when null score > best span score + this")
    _common(parser, lr=5e-5, batch=16)


def run_finetune(args: argparse.Namespace) -> int:
    """Runs ``bertkit finetune``; prints the summary as JSON on stdout (rank 0). Returns 0."""
    from .finetuning import finetune

    _check_run_folder(args)
    options: dict[str, Any] = {}
    if args.task == "classify":
        options = {"label_type": args.label_type, "text_column": args.text_column, "label_column": args.label_column}
    elif (args.text_column, args.label_column) != ("text", "label"):
        raise ValueError(f"--text-column/--label-column apply to --task classify, not {args.task}")
    elif args.task == "qa":
        options = {"doc_stride": args.doc_stride, "max_answer_length": args.max_answer_length,
                   "n_best": args.n_best, "null_threshold": args.null_threshold}
    summary = finetune(args.task, args.train, args.eval, out=args.out, model=args.model, tokenizer=args.tokenizer,
                       max_length=args.max_length, task_options=options, epochs=args.epochs,
                       max_steps=args.max_steps, **_hparams(args))
    _print_summary("finetune", args.out, summary)
    return 0


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bertkit pretrain`` options to ``parser``."""
    parser.add_argument("--corpus", required=True, help="text file: one sentence per line, blank line between documents")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--preset", help="new model from a bertkit.PRESETS config (e.g. bert-tiny, bert-base)")
    start.add_argument("--model", help="continue pre-training this model folder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's, else the "
                        "bundled model's)")
    parser.add_argument("--nsp", action="store_true", help="add next-sentence prediction (BertForPreTraining)")
    parser.add_argument("--whole-word-masking", action="store_true", help="mask all pieces of a word together")
    parser.add_argument("--max-length", type=_positive(int), default=128, help="tokens per instance (default 128)")
    parser.add_argument("--steps", type=_positive(int), default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--mlm-probability", type=float, default=0.15, help="fraction of tokens predicted "
                        "(default 0.15)")
    parser.add_argument("--data-dir", default=None, help="token shards folder (default OUT/tokenized)")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --config num_hidden_layers=2 (repeatable)")
    _common(parser, lr=1e-4, batch=32)


def _overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--config {item!r}: expected KEY=VALUE, e.g. --config hidden_size=256")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string such as hidden_act=gelu
    return out


def run_pretrain(args: argparse.Namespace) -> int:
    """Runs ``bertkit pretrain``; prints the summary as JSON on stdout (rank 0). Returns 0."""
    from .pretraining import pretrain

    _check_run_folder(args)
    _check_pretrain_config(args.preset, _overrides(args.config))
    summary = pretrain(args.corpus, args.out, preset=args.preset, model=args.model, tokenizer=args.tokenizer,
                       nsp=args.nsp, whole_word_masking=args.whole_word_masking, max_length=args.max_length,
                       steps=args.steps, mlm_probability=args.mlm_probability, data_dir=args.data_dir,
                       config_overrides=_overrides(args.config), **_hparams(args))
    _print_summary("pretrain", args.out, summary)
    return 0


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _check_run_folder(args: argparse.Namespace) -> None:
    """Refuses an OUT that holds a run unless --resume or --overwrite says what to do with it."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {str(out.parent)!r} does not exist; create it first")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or args.resume:
        return
    if not args.overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it or "
                         "--overwrite to start again")
    if _main_process():  # the other ranks wait for rank 0 in the process-group setup that follows
        for name in found:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()


def _check_pretrain_config(preset: str | None, overrides: dict[str, Any]) -> None:
    # Every key and the preset are checked before the corpus is tokenized (which can take minutes).
    import dataclasses
    import difflib

    from ..config import PRESETS, BertConfig, unknown_field_message

    if preset is not None and preset not in PRESETS:
        near = difflib.get_close_matches(preset, list(PRESETS), n=3)
        raise ValueError(f"--preset {preset!r} is not a preset; {'did you mean ' + ' or '.join(near) + '? ' if near else ''}"
                         f"choose one of {', '.join(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(BertConfig) if f.name != "extra"]  # extra: unknown keys of files
    for key in overrides:
        if key not in fields:
            raise ValueError(f"--config {key}=...: {unknown_field_message(key)}")


def _print_summary(command: str, out: str, summary: dict[str, Any]) -> None:
    # Machine output (one JSON object) on stdout, the human line on stderr: `| jq` works.
    if not _main_process():
        return
    out = Path(out)
    saved = {"out": str(out), "final": str(out / "final")}
    if (out / "best").is_dir():
        saved["best"] = str(out / "best")
    print(f"bertkit {command}: model saved to {saved['final']}"
          + (f" (best evaluation: {saved['best']})" if "best" in saved else ""), file=sys.stderr, flush=True)
    print(json.dumps({**summary, "saved": saved}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m bertkit.train {finetune,pretrain} ...``; errors in the input exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m bertkit.train", description="bertkit training commands")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, run, examples in (("finetune", add_finetune_arguments, run_finetune, FINETUNE_EXAMPLES),
                                     ("pretrain", add_pretrain_arguments, run_pretrain, PRETRAIN_EXAMPLES)):
        child = sub.add_parser(name, epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        add(child)
        child.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as err:
        print(f"bertkit {args.command}: error: {err}", file=sys.stderr)
        return 2

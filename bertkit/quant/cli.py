"""``bertkit quantize`` and ``bertkit export-onnx``: argument builders and runners for bertkit/cli.py.

Wire them as two rows of ``bertkit.cli.COMMANDS``, e.g.::

    "quantize": Command(help=QUANTIZE_HELP, description=QUANTIZE_DESCRIPTION, examples=QUANTIZE_EXAMPLES,
                        arguments=add_quantize_arguments, run=run_quantize),
    "export-onnx": Command(help=EXPORT_HELP, description=EXPORT_DESCRIPTION, examples=EXPORT_EXAMPLES,
                           arguments=add_export_onnx_arguments, run=run_export_onnx),

Errors the user can fix are raised as ``ValueError`` / ``OSError`` with a full message, which
``bertkit.cli.main`` prints without a traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .calib import CALIB_METHODS

QUANTIZE_HELP = "calibrate an int8 QDQ-BERT model from a folder and a text file"
QUANTIZE_DESCRIPTION = ("Add int8 fake quantization (QDQ-BERT placement) to a model folder, calibrate it on the "
                        "texts of a file and save the quantized folder (weights, amax values, quantization "
                        "config, tokenizer). Load it with bertkit.quant.load_quantized or export it with "
                        "`bertkit export-onnx --quantized`.")
QUANTIZE_EXAMPLES = ("  bertkit quantize ./bert-base-uncased --calib texts.txt --out ./bert-int8\n"
                     "  bertkit quantize ./my-model --calib texts.txt --method percentile --percentile 99.9 "
                     "--out ./my-model-int8")
EXPORT_HELP = "export a model folder to ONNX (float, or QDQ int8 with --quantized)"
EXPORT_DESCRIPTION = ("Export a model folder to ONNX with inputs input_ids / attention_mask / token_type_ids and "
                      "dynamic batch and sequence axes. --quantized loads a folder written by `bertkit quantize` "
                      "and writes QuantizeLinear/DequantizeLinear pairs.")
EXPORT_EXAMPLES = ("  bertkit export-onnx ./bert-base-uncased bert.onnx\n"
                   "  bertkit export-onnx ./bert-int8 bert-int8.onnx --quantized")

# sentence-transformers metadata copied along, so a quantized sentence model stays one.
_SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _model_class(folder: Path):
    import bertkit

    config = bertkit.BertConfig.from_pretrained(folder)
    for name in config.architectures or ():
        cls = getattr(bertkit, name.replace("QDQBert", "Bert").replace("MegatronBert", "Bert"), None)
        if isinstance(cls, type) and issubclass(cls, bertkit.BertPreTrainedModel):
            return cls
    return bertkit.BertModel


def _progress(total: int):
    # A progress bar only on a terminal: logs and pipes get the one summary line at the end.
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="text", desc="Calibrating", file=sys.stderr)


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``MODEL --calib FILE --out DIR [--method ...]`` to ``parser``."""
    parser.add_argument("model", metavar="MODEL", help="model folder (config.json + weights + tokenizer)")
    parser.add_argument("--calib", required=True, metavar="FILE",
                        help="calibration texts: .txt (one per line), .jsonl or .csv (see --column)")
    parser.add_argument("--column", default=None, help="field / column of a .jsonl or .csv calibration file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the quantized model to")
    parser.add_argument("--method", choices=CALIB_METHODS, default="max", help="calibration method (default: max)")
    parser.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
    parser.add_argument("--num-bins", type=int, default=2048, help="histogram bins of the histogram methods")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per calibration text")
    parser.add_argument("--max-texts", type=int, default=None, metavar="N",
                        help="calibrate on the first N texts of the file (default: all of them)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave quantizers matching this fnmatch pattern in float (repeatable), e.g. "
                             "'*.output.add_local_input_quantizer'")
    parser.add_argument("--hf-placement", action="store_true",
                        help="HF QDQ-BERT placement: encoder only, -128..127 grid")
    parser.add_argument("--summary", action="store_true", help="print every quantizer with its amax")
    _run_options(parser, device=True)


def _run_options(parser: argparse.ArgumentParser, device: bool) -> None:
    # --threads/--device/--quiet, as on embed and search (issue #18).
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch "
                        "(default: torch's choice)")
    if device:
        parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                            help="where calibration runs (default: auto = cuda if available, else cpu)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary line")


def _apply_run_options(args: argparse.Namespace):
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive number, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def run_quantize(args: argparse.Namespace) -> int:
    """Runs ``bertkit quantize``; returns the exit status."""
    from ..io_readers import read_texts
    from ..tokenizer import Tokenizer
    from .int8 import calibration_batches
    from .transform import QuantConfig, calibrate, calibration_summary, quantize, quantizers

    folder, out = Path(args.model), Path(args.out)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    if out.resolve() == folder.resolve():
        raise ValueError(f"--out {out} is the model folder itself; write the quantized model to a new folder")
    if args.max_texts is not None and args.max_texts < 1:
        raise ValueError(f"--max-texts must be a positive number of texts, got {args.max_texts}")
    # One rule for outputs: the file or folder itself is created, the folder it goes in must exist.
    from ..checkpoints.io import writable_folder

    writable_folder(out, "--out")
    device = _apply_run_options(args)
    texts = [text for text in read_texts(args.calib, args.column) if text.strip()]
    if not texts:
        raise ValueError(f"{args.calib} has no non-empty texts to calibrate on")
    if args.max_texts is not None and len(texts) > args.max_texts:
        print(f"calibrating on the first {args.max_texts} of the {len(texts)} texts of {args.calib} (--max-texts)",
              file=sys.stderr)
        texts = texts[: args.max_texts]
    preset = QuantConfig.hf_qdqbert if args.hf_placement else QuantConfig
    config = preset(calib_method=args.method, percentile=args.percentile, exclude=tuple(args.exclude))
    cls = _model_class(folder)
    model = quantize(cls.from_pretrained(folder), config).to(device)
    tokenizer = Tokenizer.from_pretrained(folder)
    bar = None if args.quiet else _progress(len(texts))
    with calibrate(model, method=args.method, percentile=args.percentile, num_bins=args.num_bins):
        for batch in calibration_batches(tokenizer, texts, args.batch_size, args.max_length):
            model(**{k: v.to(device) for k, v in batch.items()})
            if bar is not None:
                bar.update(len(batch["input_ids"]))
    if bar is not None:
        bar.close()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in _SENTENCE_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    for pooling in folder.glob("*_Pooling"):
        shutil.copytree(pooling, out / pooling.name, dirs_exist_ok=True)
    if args.summary:
        print(calibration_summary(model))
    active = sum(1 for _, q in quantizers(model) if q.is_enabled)
    if not args.quiet:
        print(f"{type(model).__name__}: {active} quantizers calibrated ({args.method}) on {len(texts)} texts; "
              f"saved to {out}")
    return 0


def add_export_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``MODEL OUT.onnx [--quantized] [--opset N]`` to ``parser``."""
    parser.add_argument("model", metavar="MODEL", help="model folder")
    parser.add_argument("output", metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument("--quantized", action="store_true",
                        help="export QuantizeLinear/DequantizeLinear (not needed: a folder written by `bertkit "
                             "quantize` is detected)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 14, default 17)")
    _run_options(parser, device=False)


def run_export_onnx(args: argparse.Namespace) -> int:
    """Runs ``bertkit export-onnx``; returns the exit status."""
    from .int8 import require_onnx

    require_onnx("bertkit export-onnx", runtime=False)  # before any model loads
    from .checkpoint import load_quantized

    folder, output = Path(args.model), Path(args.output)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    if output.suffix != ".onnx":
        raise ValueError(f"{output}: the output file must end in .onnx")
    from ..checkpoints.io import writable_folder

    writable_folder(output, "OUT.onnx")  # before the model loads; the folder is not created (one rule for outputs)
    _apply_run_options(args)
    cls = _model_class(folder)
    stored = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantized = args.quantized or "quantization_config" in stored
    if args.quantized and "quantization_config" not in stored:
        raise ValueError(f"{folder} holds no quantized model (no quantization_config in config.json); drop "
                         "--quantized, or quantize it first with `bertkit quantize`")
    model = load_quantized(cls, folder) if quantized else cls.from_pretrained(folder)
    _export_atomically(model, output, args.opset)
    if not args.quiet:
        print(f"wrote {output} ({'QDQ int8' if quantized else 'float'}, opset {args.opset})", file=sys.stderr)
    return 0


def _export_atomically(model, output: Path, opset: int) -> None:
    # torch.onnx writes in place: a 91 MB file would exist at 58 MB under its final name. Write a hidden
    # temporary file beside it and move it into place only when complete, as every bertkit output.
    import os

    from ..checkpoints.io import _fsync_dir, _umask
    from .onnx_export import export_onnx

    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        export_onnx(model, str(tmp), opset=opset)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(output.parent)

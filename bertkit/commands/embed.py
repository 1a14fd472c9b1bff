"""``bertkit embed`` (resumable, shardable) and ``bertkit merge``.

An output file is built as ``.NAME.partial`` beside it, with ``.NAME.progress.json`` saying how many
rows (and bytes) of it are complete; both are written chunk by chunk (CHUNK_SIZE texts), fsynced, the
progress file atomically. The output appears under its own name only when complete. On an error,
Ctrl-C or SIGTERM both files are removed, unless ``--resume`` was given: then they are kept and the
next ``--resume`` run truncates the partial file to the last complete chunk and continues from there.
Chunks are the same texts in both runs, so the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..checkpoints.io import _fsync_dir, atomic_write_text, atomic_writer, writable_folder
from ..io_readers import STDIN, InputError, count_texts, read_records
from . import positive_int

OUTPUT_FORMATS = (".npy", ".jsonl")
CHUNK_SIZE = 2048  # texts read, sorted and embedded together: bounds memory, and the unit of --resume
_NPY_DTYPE = np.dtype("<f4")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --quantize, --device, --threads, --quiet: shared by embed, search and index."""
    parser.add_argument("--model", metavar="PATH", help="sentence-transformers or HuggingFace BERT folder "
                        "(default: the bundled all-MiniLM-L6-v2; `bertkit info` shows where it lives)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="run the encoder with int8 matrix products on the CPU, calibrated on a small "
                             "built-in text set (accuracy and speed: docs/benchmarks.md)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default: auto = cuda if available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary line on stderr")


def _shard(value: str) -> tuple[int, int]:
    index, sep, count = value.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {value!r}")
    return i, n


def load_encoder(args: argparse.Namespace):
    """The encoder for --model/--quantize/--device/--threads (through bertkit.cli, which tests replace)."""
    from .. import cli

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    device = getattr(args, "device", "auto")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    extra = {} if device in (None, "auto") else {"device": device}
    return cli._load_encoder(args.model, getattr(args, "quantize", None), **extra)


# ---------------------------------------------------------------------------------------- embed
def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bertkit embed`` arguments."""
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (or use --input)")
    parser.add_argument("--input", "-i", metavar="FILE", help=".txt (one text per line; a blank line is the "
                        "empty text, so row i = line i), .jsonl (one object per line), .csv/.tsv (header row), "
                        "or - for .txt lines on stdin")
    parser.add_argument("--output", "-o", metavar="FILE", help=".npy (float32 matrix, row i = text i) or "
                        ".jsonl (index, id if the input has one, text, embedding); default: JSON lines on stdout")
    parser.add_argument("--column", metavar="NAME", help="JSON field or CSV/TSV column with the text (default: text)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="texts per forward "
                        "pass (default: 32)")
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the embeddings "
                        "(by default the model's modules.json decides)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command "
                        "from its last complete chunk (and keep its progress if this run is interrupted too)")
    parser.add_argument("--shard", type=_shard, metavar="I/N", help="embed only texts I, I+N, I+2N... (0-based); "
                        "join the N outputs with `bertkit merge`")
    parser.add_argument("--chunk-size", type=positive_int, default=CHUNK_SIZE, metavar="N",
                        help=f"texts embedded together and saved as one step of --resume (default: {CHUNK_SIZE})")
    add_model_arguments(parser)


def check_output(output: str | None, input_path: str | None, formats=OUTPUT_FORMATS) -> Path | None:
    """The output path, refused before any work if its type, folder or writability is wrong."""
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in formats:
        raise InputError(f"--output {output}: unsupported type {path.suffix or '(no extension)'!r}; "
                         "use .npy (a float32 matrix) or .jsonl (one JSON object per line)")
    writable_folder(path, "--output")
    if path.is_dir():
        raise InputError(f"--output {output} is a folder; give a file name")
    if input_path not in (None, STDIN) and path.resolve() == Path(input_path).resolve():
        raise InputError(f"--output {output} is also the input file; write to another file")
    return path


def _selected(records: Iterable[tuple[str, Any]], shard: tuple[int, int] | None) -> Iterator[tuple[int, str, Any]]:
    # (index in the input, text, id) of this shard's records.
    numbered = ((index, text, id_) for index, (text, id_) in enumerate(records))
    return numbered if shard is None else itertools.islice(numbered, shard[0], None, shard[1])


def _json_line(index: int, text: str, row: np.ndarray, id_: Any = None) -> str:
    # tolist() gives Python floats whose repr reads back to the same float32: no precision lost.
    record = {"index": index, **({"id": id_} if id_ is not None else {}), "text": text, "embedding": row.tolist()}
    return json.dumps(record, ensure_ascii=False) + "\n"


def _chunks(encoder, records: Iterator[tuple[int, str, Any]], args, total: int, quiet: bool):
    """Yields (records, embeddings) per chunk of ``args.chunk_size`` texts, in input order."""
    pending: collections.deque = collections.deque()

    def texts():
        # encode_stream consumes exactly one chunk before yielding its rows, so `pending` holds just
        # the records of the chunk being written, never the whole file.
        for record in records:
            pending.append(record)
            yield record[1]

    for rows in encoder.encode_stream(texts(), batch_size=args.batch_size, chunk_size=args.chunk_size,
                                      normalize_embeddings=False if args.no_normalize else None,
                                      show_progress_bar=False if quiet else None, total=total):
        yield [pending.popleft() for _ in range(len(rows))], rows


class _Job:
    """The partial output file and its progress file (see the module docstring)."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, settings
        self.partial = path.with_name(f".{path.name}.partial")
        self.progress = path.with_name(f".{path.name}.progress.json")
        self.npy = path.suffix.lower() == ".npy"

    def start(self, resume: bool, total: int, dim: int) -> tuple[int, Any]:
        """Opens and locks the partial file; returns (rows already done, open file)."""
        # "a+b" creates the file without truncating it: until the lock is ours, it may be another run's.
        # Every write appends, which is all this writer does (after truncating to the resume point).
        handle = open(self.partial, "a+b")  # a plain open(): the umask's permissions, as the output gets
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close, or when killed
        except ImportError:  # not POSIX: no lock
            pass
        except BlockingIOError:
            handle.close()
            raise InputError(f"--output {self.path}: another bertkit embed is writing it right now; wait for it to "
                             "finish, or write to another file") from None
        done, size = 0, 0
        if resume and self.progress.is_file():
            state = json.loads(self.progress.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(state["settings"]) | set(self.settings)
                             if state["settings"].get(k) != self.settings.get(k))
            if changed:
                handle.close()
                raise InputError(f"--resume: the interrupted run of {self.path} used other settings ({', '.join(changed)} "
                                 "differ, or the input changed); run it again with the same ones, or without "
                                 "--resume to start over")
            if os.fstat(handle.fileno()).st_size >= state["bytes"]:  # else the partial file is gone: start over
                done, size = state["rows"], state["bytes"]
        handle.truncate(size)  # after a kill -9 mid-chunk: the bytes past the last saved chunk go
        handle.seek(size)
        if size == 0:
            done = 0
            if self.npy:  # the header, then rows appended in order: written pages do not stay in RSS
                np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(_NPY_DTYPE),
                                                              "fortran_order": False, "shape": (total, dim)})
            self.save(handle, 0)
        return done, handle

    def save(self, handle, rows: int) -> None:
        handle.flush()
        os.fsync(handle.fileno())  # rows on disk before the progress file says they are
        atomic_write_text(self.progress, json.dumps({"rows": rows, "bytes": handle.tell(),
                                                     "settings": self.settings}) + "\n")

    def finish(self, handle) -> None:
        handle.close()
        os.replace(self.partial, self.path)
        self.progress.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.progress.unlink(missing_ok=True)


def _settings(args, path: Path, total: int) -> dict:
    # Everything that decides the output's bytes: a --resume with any of it changed is refused.
    source = Path(args.input).resolve()
    stat = source.stat()
    model = str(Path(args.model).resolve()) if args.model else "bundled"
    return {"input": str(source), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns,
            "column": args.column, "texts": total, "shard": list(args.shard) if args.shard else None,
            "model": model, "quantize": args.quantize, "normalize": not args.no_normalize,
            "batch_size": args.batch_size, "chunk_size": args.chunk_size, "output": path.name}


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeds TEXT arguments or an input file; writes .npy, .jsonl or JSON lines on stdout."""
    if args.input is not None and args.texts:
        raise InputError("give either TEXT arguments or --input FILE, not both")
    if args.input is None and not args.texts:
        raise InputError("nothing to embed: give TEXT arguments or --input FILE (see bertkit embed --help)")
    if args.input is None and args.column is not None:
        raise InputError("--column applies to --input .jsonl/.csv/.tsv files, not to TEXT arguments")
    if args.resume and (args.output is None or args.input in (None, STDIN)):
        raise InputError("--resume needs --input FILE (not stdin) and --output FILE: it continues writing that file")
    output = check_output(args.output, args.input)
    if args.input == STDIN:  # a pipe can be read once: keep its lines
        stdin = list(read_records(STDIN))
        total, source = len(stdin), (lambda: iter(stdin))
    elif args.input is not None:
        # A full read first: every input error surfaces before any model time is spent, and the
        # count sizes the .npy file and the progress bar.
        total, source = count_texts(args.input, args.column), (lambda: read_records(args.input, args.column))
    else:
        total, source = len(args.texts), (lambda: ((t, None) for t in args.texts))
    if args.shard:
        total = len(range(args.shard[0], total, args.shard[1]))
    encoder = load_encoder(args)
    if output is None:
        for chunk, rows in _chunks(encoder, _selected(source(), args.shard), args, total, args.quiet):
            sys.stdout.write("".join(_json_line(i, t, row, id_) for (i, t, id_), row in zip(chunk, rows)))
        sys.stdout.flush()
        return 0
    job = _Job(output, _settings(args, output, total) if args.input not in (None, STDIN) else {})
    done, handle = job.start(args.resume, total, encoder.dim)
    try:
        records = itertools.islice(_selected(source(), args.shard), done, None)
        written = done
        for chunk, rows in _chunks(encoder, records, args, total - done, args.quiet):
            if written + len(rows) > total:
                raise InputError(f"{args.input} grew while it was being read; run again on a file nobody is writing")
            if job.npy:
                handle.write(np.ascontiguousarray(rows, dtype=_NPY_DTYPE).tobytes())
            else:
                handle.write("".join(_json_line(i, t, row, id_) for (i, t, id_), row
                                     in zip(chunk, rows)).encode("utf-8"))
            written += len(rows)
            job.save(handle, written)
        if written != total:
            raise InputError(f"{args.input} shrank while it was being read ({written} of {total} texts); run again "
                             "on a file nobody is writing")
        job.finish(handle)
    except BaseException:
        handle.close()
        if args.resume:
            print(f"bertkit embed: progress kept ({job.partial.name}); run the same command again to continue",
                  file=sys.stderr)
        else:
            job.discard()
        raise
    if not args.quiet:
        print(f"wrote {total} embeddings of dimension {encoder.dim} to {output}"
              + (f" (from row {done}, resumed)" if done else ""), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- merge
def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bertkit merge`` arguments."""
    parser.add_argument("parts", nargs="+", metavar="PART", help="the outputs of `embed --shard 0/N` ... "
                        "`--shard N-1/N`, in that order (.npy) or any order (.jsonl: rows carry their index)")
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help=".npy or .jsonl, as the parts")
    parser.add_argument("--quiet", "-q", action="store_true", help="no summary line on stderr")


def cmd_merge(args: argparse.Namespace) -> int:
    """Interleaves shard outputs back into input order: row j of the whole is row j // N of part j % N."""
    output = check_output(args.output, None)
    kinds = {Path(p).suffix.lower() for p in args.parts}
    if kinds != {output.suffix.lower()}:
        raise InputError(f"--output {output} and the parts must all be .npy or all .jsonl (got {sorted(kinds)})")
    for part in args.parts:
        if not Path(part).is_file():
            raise InputError(f"part {part!r} does not exist")
        if Path(part).resolve() == output.resolve():
            raise InputError(f"--output {output} is also a part; write to another file")
    total = (_merge_npy if output.suffix.lower() == ".npy" else _merge_jsonl)(args.parts, output)
    if not args.quiet:
        print(f"merged {len(args.parts)} parts, {total} rows, into {output}", file=sys.stderr)
    return 0


def _merge_npy(parts: list[str], output: Path) -> int:
    arrays = []
    for part in parts:
        try:
            arrays.append(np.load(part, mmap_mode="r"))
        except ValueError as err:
            raise InputError(f"part {part}: not a .npy file ({err})") from None
    dims = {a.shape[1:] for a in arrays}
    if len(dims) != 1 or any(a.ndim != 2 for a in arrays):
        raise InputError(f"the parts have different shapes {[a.shape for a in arrays]}; they are not shards of one run")
    n, sizes = len(arrays), [len(a) for a in arrays]
    # Shard i of N holds ceil((total - i) / N) rows: sizes never grow and differ by at most one.
    if any(b > a for a, b in zip(sizes, sizes[1:])) or sizes[0] - sizes[-1] > 1:
        raise InputError(f"the parts have {sizes} rows, which shards 0/{n}..{n - 1}/{n} of one input cannot have; "
                         "give all N parts, in shard order")
    total, dim = sum(sizes), dims.pop()[0]
    with atomic_writer(output) as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(arrays[0].dtype),
                                                      "fortran_order": False, "shape": (total, dim)})
        full, block = sizes[-1], 4096
        for start in range(0, full, block):  # rows every part has: interleave a block at a time
            stop = min(start + block, full)
            handle.write(np.ascontiguousarray(np.stack([a[start:stop] for a in arrays], axis=1)).tobytes())
        handle.write(b"".join(np.ascontiguousarray(a[full]).tobytes() for a in arrays if len(a) > full))
    return total


def _merge_jsonl(parts: list[str], output: Path) -> int:
    # Each row names its index in the input: merge by it, and check that none is missing or repeated.
    handles = [open(p, encoding="utf-8") for p in parts]
    try:
        heads = [(json.loads(line)["index"], line) if (line := h.readline()) else None for h in handles]
        expected = 0
        with atomic_writer(output) as out:
            while any(heads):
                k = min((h[0], i) for i, h in enumerate(heads) if h)[1]
                index, line = heads[k]
                if index != expected:
                    raise InputError(f"{parts[k]}: row {index} where row {expected} was expected; the parts are "
                                     "not all the shards of one run")
                out.write(line.encode("utf-8"))
                expected += 1
                nxt = handles[k].readline()
                heads[k] = (json.loads(nxt)["index"], nxt) if nxt else None
        return expected
    finally:
        for h in handles:
            h.close()

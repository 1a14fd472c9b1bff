"""int8 vs fp32 sentence embeddings with the bundled all-MiniLM-L6-v2: throughput and cosine similarity.

One process, the same threads for every backend (torch.get_num_threads(), onnxruntime intra-op
threads set to match), the same pre-tokenized batches, best of --repeat runs. Calibration uses
examples/corpus.txt plus 64 generated texts; accuracy is measured on other generated texts, never
used for calibration (the generated ones stand in for "the user's own data", which calibration
should resemble: with examples/corpus.txt alone the torch backend's cosine drops to 0.96).

    .venv/bin/python benchmarks/quant_int8.py [--texts 256] [--repeat 5] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch

import bertkit
from bertkit.quant import QuantConfig, calibrate, export_onnx, quantize
from bertkit.quant.int8 import OnnxInt8Model, calibration_batches, quantize_dynamic_int8, to_int8

ROOT = Path(__file__).resolve().parent.parent

SUBJECTS = ["the old engineer", "a young doctor", "my neighbour", "the city council", "our small team", "the river",
            "a hungry cat", "the new phone", "this recipe", "the football club", "the museum", "a famous singer"]
VERBS = ["repaired", "discussed", "painted", "ignored", "celebrated", "measured", "sold", "described", "tested",
         "cleaned", "reviewed", "photographed"]
OBJECTS = ["the broken bridge", "a long report about climate change", "the garden behind the school",
           "an expensive car", "the results of the election", "a quiet village in the mountains",
           "the software update", "fresh bread and cheese", "the history of ancient Rome", "a map of the stars",
           "the price of electricity", "an old wooden boat"]
ENDINGS = ["yesterday", "after a long meeting", "without asking anyone", "during the storm", "with great care",
           "for the third time this week", "before sunrise", "in front of everyone", "", "because nobody else would"]


def held_out_texts(n: int, seed: int = 2) -> list[str]:
    """Deterministic varied sentences (none of them in examples/corpus.txt)."""
    rng = random.Random(seed)
    return [" ".join(filter(None, [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS),
                                   rng.choice(ENDINGS)])).capitalize() + "." for _ in range(n)]


def embed(model, batches) -> torch.Tensor:
    """Mean pooling + L2 normalization, as all-MiniLM-L6-v2's sentence-transformers pipeline."""
    out = []
    with torch.inference_mode():
        for b in batches:
            hidden = model(**b).last_hidden_state.float()
            keep = b["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * keep).sum(1) / keep.sum(1), dim=-1))
    return torch.cat(out)


def best_time(fn, repeat: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run) after one warm-up run."""
    fn()
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    encoder = bertkit.SentenceEncoder.from_pretrained()
    model, tokenizer = encoder.model, encoder.tokenizer
    calib_texts = [t for t in (ROOT / "examples" / "corpus.txt").read_text().splitlines() if t.strip()]
    calib_texts += held_out_texts(64, seed=1)
    texts = [t for t in held_out_texts(2 * args.texts, seed=2) if t not in set(calib_texts)][:args.texts]
    calib = list(calibration_batches(tokenizer, calib_texts, args.batch_size))
    batches = list(calibration_batches(tokenizer, texts, args.batch_size))
    threads = torch.get_num_threads()
    print(f"{len(texts)} held-out texts, batch {args.batch_size}, {threads} threads, "
          f"{len(calib_texts)} calibration texts, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at start")

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, os.path.join(tmp, "fp32.onnx"))
        fake = quantize(copy.deepcopy(model), QuantConfig())  # full QDQ-BERT placement, fake quant
        with calibrate(fake):
            for b in calib:
                fake(**b)
        candidates = {
            "torch fp32": model,
            "onnxruntime fp32": OnnxInt8Model(os.path.join(tmp, "fp32.onnx"), model.config, threads),
            "onnxruntime int8 (to_int8)": to_int8(model, calib, backend="onnxruntime",
                                                  path=os.path.join(tmp, "int8.onnx")),
            "torch dynamic int8 + smoothing": to_int8(model, calib, backend="torch"),
            "torch dynamic int8, no smoothing": quantize_dynamic_int8(model),
            "fake quant, full QDQ placement": fake,
        }
        reference = embed(model, batches)
        rows = []
        for name, candidate in candidates.items():
            cosine = (embed(candidate, batches) * reference).sum(-1)
            timed = name != "fake quant, full QDQ placement"  # an accuracy reference, not a fast path
            wall, cpu = best_time(lambda: embed(candidate, batches), args.repeat) if timed else (float("nan"),) * 2
            rows.append((name, wall, cpu, cosine.min().item(), cosine.mean().item()))
            print(f"  measured {name}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    base_wall, base_cpu = rows[0][1], rows[0][2]
    print(f"\n| backend | texts/s | wall s | x fp32 (wall) | CPU s | x fp32 (CPU) | cosine min | cosine mean |")
    print("|---|---|---|---|---|---|---|---|")
    for name, wall, cpu, cmin, cmean in rows:
        if wall != wall:  # NaN: not timed
            print(f"| {name} | - | - | - | - | - | {cmin:.4f} | {cmean:.4f} |")
        else:
            print(f"| {name} | {len(texts) / wall:.0f} | {wall:.2f} | {base_wall / wall:.2f} | {cpu:.2f} | "
                  f"{base_cpu / cpu:.2f} | {cmin:.4f} | {cmean:.4f} |")


if __name__ == "__main__":
    main()

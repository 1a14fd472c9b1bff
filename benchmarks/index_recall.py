"""Recall and speed of `bertkit index build --approximate` (faiss HNSW) against exact search.

Exact search (``bertkit.commands.search.top_k``) is the reference: recall@k is the fraction of its
top-k rows the HNSW graph returns, averaged over the queries, for several efSearch values. The rows
are synthetic unit vectors, not real embeddings (real corpora of millions of rows are not in this
repository): clusters (topics) in a space of ``--intrinsic-dim`` dimensions mapped into ``--dim``, plus
a little noise. Sentence embeddings have a low intrinsic dimension; ``--intrinsic-dim 384`` gives
near-random directions inside each cluster, the hardest case for any graph index.

    .venv/bin/python benchmarks/index_recall.py                      # 200,000 x 384, 200 queries
    .venv/bin/python benchmarks/index_recall.py --rows 10000 --queries 20   # smoke test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bertkit.commands.search import build_hnsw, search_hnsw, top_k


def clustered(rows: int, dim: int, intrinsic: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, intrinsic)).astype(np.float32)
    latent = centers[rng.integers(0, clusters, rows)] + 0.6 * rng.standard_normal((rows, intrinsic)).astype(np.float32)
    data = latent @ rng.standard_normal((intrinsic, dim)).astype(np.float32)
    data += 0.05 * np.linalg.norm(data, axis=1, keepdims=True) / np.sqrt(dim) * rng.standard_normal(data.shape)
    return (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--intrinsic-dim", type=int, default=32)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 64, 128, 256])
    args = parser.parse_args()
    docs = clustered(args.rows, args.dim, args.intrinsic_dim, clusters=max(10, args.rows // 1000), seed=0)
    rng = np.random.default_rng(1)
    queries = docs[rng.integers(0, args.rows, args.queries)] + 0.3 * rng.standard_normal((args.queries, args.dim))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    start = time.perf_counter()
    exact, _ = top_k(docs, queries, args.k)
    exact_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ann.faiss"
        start = time.perf_counter()
        build_hnsw(docs, path)
        build_s = time.perf_counter() - start
        print(f"{args.rows:,} rows x {args.dim} (intrinsic {args.intrinsic_dim}), {args.queries} queries, k={args.k}; "
              f"HNSW build {build_s:.1f} s")
        print(f"exact top_k: {exact_s * 1000 / args.queries:.2f} ms/query (recall 1.000)")
        for ef in args.ef:
            start = time.perf_counter()
            found, _ = search_hnsw(path, queries, args.k, ef)
            took = time.perf_counter() - start
            recall = np.mean([len(set(f) & set(e)) / args.k for f, e in zip(found, exact)])
            print(f"HNSW efSearch={ef:>4}: {took * 1000 / args.queries:.2f} ms/query (one read of the graph + "
                  f"{args.queries} queries), recall@{args.k} {recall:.3f}")


if __name__ == "__main__":
    main()

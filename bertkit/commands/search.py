"""``bertkit search`` (a corpus file, or an index built once) and ``bertkit index build``.

An index is a folder::

    index.json       format version, rows, the corpus it came from, the model (path, fingerprint, settings)
    embeddings.npy   float32 (rows, dim), L2-normalized: the dot product is the cosine similarity
    texts.jsonl      one {"text", "id"?} per row; offsets.npy holds each line's byte offset (random access)

Search is exact by default (every row scored, memory-mapped, a block at a time); ties rank the earlier
row first, exactly as a stable sort over the whole corpus does, so an index gives the ranking `search
--corpus` gives. ``index build --approximate`` also stores a faiss HNSW graph (``ann.faiss``, needs
``pip install 'bertkit[ann]'``), which `search --index` then uses unless ``--exact``: for corpora past a
few million rows; its recall against exact search is measured by benchmarks/index_recall.py. A query
encoded by another model than the index's is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..checkpoints.io import _fsync_dir, atomic_write_text, atomic_writer
from ..io_readers import InputError, count_texts, read_records
from .embed import add_model_arguments, load_encoder, positive_int

INDEX_FORMAT, INDEX_VERSION = "bertkit-index", 1
_BLOCK = 65536  # rows scored at a time: bounds memory on corpora of any size
ANN_FILE, HNSW_M, HNSW_EF_CONSTRUCTION = "ann.faiss", 32, 200
ANN_HINT = "pip install 'bertkit[ann]'"


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise InputError(f"an approximate index needs faiss ({err.name} is not installed): {ANN_HINT}") from None
    return faiss


def build_hnsw(embeddings: np.ndarray, path: Path, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION):
    """Writes a faiss HNSW (inner product) graph over L2-normalized rows, added a block at a time."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(embeddings.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    for start in range(0, len(embeddings), _BLOCK):
        index.add(np.ascontiguousarray(embeddings[start:start + _BLOCK], dtype=np.float32))
    faiss.write_index(index, str(path))


def search_hnsw(path: Path, queries: np.ndarray, k: int, ef_search: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) from a stored HNSW graph; efSearch trades speed for recall."""
    faiss = _faiss()
    index = faiss.read_index(str(path))
    index.hnsw.efSearch = max(ef_search, k)
    scores, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return indices.astype(np.int64), scores


# ---------------------------------------------------------------------------------------- model identity
def _model_identity(args, encoder) -> dict:
    """What decides an embedding: the model's files (fingerprint) and the encoder's settings."""
    from ..encoder import bundled_model_dir

    folder = Path(args.model) if args.model else bundled_model_dir()
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".txt")):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes())
    for file in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")):
        size = file.stat().st_size  # size and both ends: cheap on GBs, and a retrained model differs
        with open(file, "rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(0, size - (1 << 20)))
            digest.update(f"{file.name}:{size}".encode() + head + handle.read())
    return {"path": str(folder.resolve()), "fingerprint": digest.hexdigest()[:16], "dim": encoder.dim,
            "pooling": list(encoder.pooling), "max_seq_length": encoder.max_seq_length,
            "quantize": getattr(args, "quantize", None)}


# ---------------------------------------------------------------------------------------- index build
def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """``bertkit index build`` (the only action so far, kept as a word so others can follow)."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="embed a corpus once into an index folder",
                               description="Embed a corpus once and store the embeddings, the texts and the "
                                           "model's identity in a folder that `bertkit search --index` reads.")
    build.add_argument("--corpus", "-c", required=True, metavar="FILE", help=".txt, .jsonl, .csv or .tsv file")
    build.add_argument("--out", required=True, metavar="DIR", help="index folder (replaced if it holds an index)")
    build.add_argument("--column", metavar="NAME", help="JSON field or CSV/TSV column with the text (default: text)")
    build.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="default: 32")
    build.add_argument("--approximate", action="store_true", help="also build a faiss HNSW graph for approximate "
                       f"search (corpora past a few million rows; needs {ANN_HINT}); recall: benchmarks/index_recall.py")
    add_model_arguments(build)


def cmd_index(args: argparse.Namespace) -> int:
    """Runs ``bertkit index build``."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.json").is_file())):
        raise InputError(f"--out {out} exists and is not an index folder; give a new or empty folder")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {str(out.parent)!r} does not exist; create it first")
    if args.approximate:
        _faiss()  # a missing extra is reported before any work
    total = count_texts(args.corpus, args.column)  # every input error before any model time
    if total == 0:
        raise InputError(f"{args.corpus} holds no texts to index")
    encoder = load_encoder(args)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    tmp.mkdir()
    try:
        offsets = np.empty(total, dtype=np.int64)
        records = read_records(args.corpus, args.column)
        kept: list = []

        def texts():
            for text, id_ in records:
                kept.append((text, id_))
                yield text

        with atomic_writer(tmp / "embeddings.npy") as emb, atomic_writer(tmp / "texts.jsonl") as lines:
            np.lib.format.write_array_header_1_0(emb, {"descr": "<f4", "fortran_order": False,
                                                       "shape": (total, encoder.dim)})
            row = 0
            for rows in encoder.encode_stream(texts(), batch_size=args.batch_size, normalize_embeddings=True,
                                              show_progress_bar=False if args.quiet else None, total=total):
                emb.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
                for text, id_ in kept[:len(rows)]:
                    offsets[row] = lines.tell()
                    lines.write((json.dumps({"text": text, **({"id": id_} if id_ is not None else {})},
                                            ensure_ascii=False) + "\n").encode("utf-8"))
                    row += 1
                del kept[:len(rows)]
            if row != total:
                raise InputError(f"{args.corpus} changed while it was being read; run again on a file nobody is writing")
        with atomic_writer(tmp / "offsets.npy") as handle:
            np.save(handle, offsets)
        if args.approximate:
            build_hnsw(np.load(tmp / "embeddings.npy", mmap_mode="r"), tmp / ANN_FILE)
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "rows": total, "dim": encoder.dim,
                "corpus": {"path": str(Path(args.corpus).resolve()), "column": args.column},
                "model": _model_identity(args, encoder), "normalized": True, "metric": "cosine",
                "search": "exact", **({"ann": {"library": "faiss", "file": ANN_FILE, "type": "HNSWFlat", "M": HNSW_M,
                                              "efConstruction": HNSW_EF_CONSTRUCTION}} if args.approximate else {})}
        atomic_write_text(tmp / "index.json", json.dumps(meta, indent=2) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not args.quiet:
        print(f"indexed {total} texts ({encoder.dim} dimensions) into {out}", file=sys.stderr)
    return 0


def load_index(folder: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """(index.json, memory-mapped embeddings) of an index folder; raises InputError naming what is wrong."""
    folder = Path(folder)
    if not (folder / "index.json").is_file():
        raise InputError(f"--index {folder}: no index.json there; build one with `bertkit index build`")
    meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        raise InputError(f"--index {folder}: format {meta.get('format')} v{meta.get('version')} is not "
                         f"{INDEX_FORMAT} v{INDEX_VERSION}; rebuild it with this bertkit")
    embeddings = np.load(folder / "embeddings.npy", mmap_mode="r")
    if embeddings.shape != (meta["rows"], meta["dim"]):
        raise InputError(f"--index {folder}: embeddings.npy is {embeddings.shape}, index.json says "
                         f"({meta['rows']}, {meta['dim']}); the folder is damaged, rebuild it")
    return meta, embeddings


# ---------------------------------------------------------------------------------------- search
def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bertkit search`` arguments."""
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="one or more queries")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--corpus", "-c", metavar="FILE", help=".txt, .jsonl, .csv or .tsv file of texts, "
                       "embedded on every call")
    where.add_argument("--index", metavar="DIR", help="an index from `bertkit index build` (embedded once)")
    parser.add_argument("--top-k", "-k", type=positive_int, default=5, metavar="N", help="matches per query "
                        "(default: 5)")
    parser.add_argument("--column", metavar="NAME", help="JSON field or CSV/TSV column with the text (default: text)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="default: 32")
    parser.add_argument("--json", action="store_true", help="one JSON object per query on stdout: query, "
                        "matches [{rank, index, score, text, id?}]")
    parser.add_argument("--exact", action="store_true", help="with an --index built --approximate: score every row "
                        "anyway (exact, slower)")
    parser.add_argument("--ef-search", type=positive_int, default=128, metavar="N", help="approximate search: "
                        "candidates explored per query; more = better recall, slower (default: 128)")
    add_model_arguments(parser)


def _shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores), each (queries, k): the k highest dot products, ties to the lower index.

    Scans the rows a block at a time, so a memory-mapped matrix of any size works; equal to a stable
    ``argsort(-scores)`` over all rows at once.
    """
    k = min(k, len(embeddings))
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    best_s = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(embeddings), _BLOCK):
        scores = queries @ np.asarray(embeddings[start:start + _BLOCK], dtype=np.float32).T
        picked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        cand_i = np.concatenate([best_i, picked + start], axis=1)
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, picked, axis=1)], axis=1)
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]  # score first, then index
        best_i, best_s = np.take_along_axis(cand_i, order, axis=1), np.take_along_axis(cand_s, order, axis=1)
    return best_i, best_s


def cmd_search(args: argparse.Namespace) -> int:
    """Ranks the corpus (or index) rows by cosine similarity to each query and prints the top matches."""
    if args.index is not None:
        if args.column is not None:
            raise InputError("--column applies to --corpus; an index stores its texts")
        meta, docs = load_index(args.index)
        encoder = load_encoder(args)
        identity = _model_identity(args, encoder)
        changed = [k for k in ("fingerprint", "dim", "pooling", "max_seq_length", "quantize")
                   if identity[k] != meta["model"].get(k)]
        if changed:
            raise InputError(f"--index {args.index} was built with the model {meta['model']['path']} "
                             f"({', '.join(changed)} differ from {identity['path']}); search it with that model "
                             "(--model) or rebuild the index")
        folder = Path(args.index)
        offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        with open(folder / "texts.jsonl", "rb") as handle:
            def record(i: int) -> dict:
                handle.seek(int(offsets[i]))
                return json.loads(handle.readline())
            ann = folder / meta["ann"]["file"] if meta.get("ann") and not args.exact else None
            return _print(args, encoder, docs, record, ann)
    if args.exact:
        raise InputError("--exact applies to --index (a --corpus search is always exact)")
    corpus = list(read_records(args.corpus, args.column))
    if not corpus:
        raise InputError(f"{args.corpus} holds no texts to search")
    encoder = load_encoder(args)
    # Always normalize here: the dot product of unit vectors is the cosine similarity.
    docs = encoder.encode([t for t, _ in corpus], batch_size=args.batch_size, normalize_embeddings=True,
                          show_progress_bar=False if args.quiet else None)
    return _print(args, encoder, docs, lambda i: {"text": corpus[i][0], **({"id": corpus[i][1]}
                                                                          if corpus[i][1] is not None else {})})


def _print(args, encoder, docs, record, ann: Path | None = None) -> int:
    queries = encoder.encode(args.queries, batch_size=args.batch_size, normalize_embeddings=True,
                             show_progress_bar=False)
    if ann is not None:
        indices, scores = search_hnsw(ann, queries, args.top_k, args.ef_search)
    else:
        indices, scores = top_k(docs, queries, args.top_k)
    for query, row_i, row_s in zip(args.queries, indices, scores):
        found = [(i, s) for i, s in zip(row_i, row_s) if i >= 0]  # faiss marks "fewer than k found" with -1
        matches = [{"rank": r, "index": int(i), "score": float(s), **record(int(i))}
                   for r, (i, s) in enumerate(found, start=1)]
        if args.json:
            print(json.dumps({"query": query, "matches": matches}, ensure_ascii=False))
            continue
        print(f"Query: {query}")
        for m in matches:
            print(f"  {m['rank']:>2}. {m['score']:.4f}  {_shorten(m['text'])}")
        print()
    return 0

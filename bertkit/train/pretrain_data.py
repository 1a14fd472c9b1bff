"""Pre-training data: the corpus tokenized once into memory-mapped shards, then masked on the fly.

Corpus format (as Google's BERT): one sentence or paragraph per line, a blank line between
documents. ``build_shards`` streams it through the tokenizer and writes, per shard::

    shard-00000.tokens.npy   every token id of the shard, concatenated (uint16, or uint32 for big vocabularies)
    shard-00000.lines.npy    int64 offsets: line i is tokens[lines[i]:lines[i+1]]
    shard-00000.docs.npy     int64 line indices where documents start, plus the number of lines

``manifest.json`` lists the complete shards and the corpus byte offset and line after each; a shard's
files are written (atomically) before the manifest names it, so an interrupted run continues after
the last complete shard instead of starting over.

``PretrainDataset`` packs consecutive lines of a document into instances of about ``max_length``
tokens. Masking (15% of tokens: 80% ``[MASK]``, 10% a random token, 10% unchanged; optionally whole
words) and the NSP partner (50% the true continuation, 50% a random other instance) are drawn from a
generator seeded by (seed, epoch, instance), so they change every epoch (dynamic masking) yet do not
depend on the rank, the batch composition or a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.io import atomic_write_bytes, atomic_writer
from .base import pad_rows, rust_tokenizer

MANIFEST = "manifest.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_writer(path) as f:
        np.save(f, array)


def _say(message: str) -> None:
    print(f"bertkit pretrain: {message}", file=sys.stderr, flush=True)  # stdout is for the JSON summary


def _bar(total: int, done: int):
    # Tokenizing a big corpus takes minutes: a bar when someone watches (a terminal), never in a log.
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)


def _fingerprint(corpus: Path, tokenizer) -> dict:
    stat = corpus.stat()
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    return {"corpus": str(corpus.resolve()), "corpus_bytes": stat.st_size, "corpus_mtime_ns": stat.st_mtime_ns,
            "tokenizer_sha256": digest}


def build_shards(corpus: str | os.PathLike, tokenizer, folder: str | os.PathLike, shard_tokens: int = 1 << 24,
                 read_lines: int = 8192) -> dict:
    """Tokenizes ``corpus`` into ``folder`` (resuming a partial run); returns the manifest.

    Args:
        corpus: Text file, one sentence per line, blank lines between documents.
        tokenizer: bertkit tokenizer; special tokens are not added here.
        folder: Output folder for shards and ``manifest.json``.
        shard_tokens: A shard is closed at the first document end after this many tokens.
        read_lines: Lines tokenized per Rust call.
    """
    corpus, folder = Path(corpus), Path(folder)
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    folder.mkdir(parents=True, exist_ok=True)
    key = _fingerprint(corpus, tokenizer)
    manifest = {}
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if {k: manifest.get(k) for k in key} != key:
            _say(f"{folder} holds shards of another corpus or tokenizer; tokenizing again")
            for old in folder.glob("shard-*"):
                old.unlink()
            manifest = {}
    if manifest.get("complete"):
        return manifest
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    manifest = manifest or {**key, "dtype": np.dtype(dtype).name, "shards": [], "complete": False}
    shards = manifest["shards"]
    offset = shards[-1]["end_byte"] if shards else 0
    line_number = shards[-1]["end_line"] if shards else 0
    if shards:
        _say(f"continuing after {len(shards)} complete shard(s) of {folder}")
    rust = rust_tokenizer(tokenizer)
    tokens: list[np.ndarray] = []
    lines, docs, count = [0], [], 0
    new_doc = True

    def flush(end_byte: int) -> None:
        nonlocal tokens, lines, docs, count
        name = f"shard-{len(shards):05d}"
        _save_npy(folder / f"{name}.tokens.npy", np.concatenate(tokens).astype(dtype) if tokens else np.zeros(0, dtype))
        _save_npy(folder / f"{name}.lines.npy", np.asarray(lines, dtype=np.int64))
        _save_npy(folder / f"{name}.docs.npy", np.asarray(docs + [len(lines) - 1], dtype=np.int64))
        shards.append({"name": name, "tokens": int(count), "lines": len(lines) - 1, "end_byte": end_byte,
                       "end_line": line_number})
        atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
        tokens, lines, docs, count = [], [0], [], 0

    bar = _bar(corpus.stat().st_size, offset)
    with open(corpus, "rb") as f:
        f.seek(offset)
        while True:
            if bar is not None:
                bar.update(f.tell() - bar.n)
            block = []
            for raw in f:
                line_number += 1
                try:
                    block.append(raw.decode("utf-8").strip())
                except UnicodeDecodeError:
                    raise ValueError(f"{corpus}:{line_number}: not UTF-8 text; convert the corpus to UTF-8") from None
                if len(block) == read_lines:
                    break
            if not block:
                break
            encoded = rust.encode_batch([t for t in block if t], add_special_tokens=False)
            it = iter(encoded)
            for text in block:
                if not text:
                    new_doc = True
                    continue
                ids = np.asarray(next(it).ids, dtype=np.int64)
                if not len(ids):
                    continue
                if new_doc:
                    docs.append(len(lines) - 1)
                    new_doc = False
                tokens.append(ids)
                count += len(ids)
                lines.append(lines[-1] + len(ids))
            if count >= shard_tokens:
                # Shards end on a line boundary; a document cut here continues as a new one.
                flush(f.tell())
                new_doc = True
        if count:
            flush(f.tell())
    if bar is not None:
        bar.close()
    manifest["complete"] = True
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


class PretrainDataset:
    """Instances over the shards of ``folder``, masked and paired per (seed, epoch, instance).

    Args:
        folder: Written by :func:`build_shards`.
        tokenizer: The same tokenizer (special token ids, vocabulary for whole-word grouping).
        max_length: Tokens per instance including ``[CLS]``/``[SEP]``.
        nsp: Build sentence pairs with a next-sentence label.
        whole_word_masking: Mask all WordPiece pieces of a word together.
        seed: Seeds masking and NSP partners.
        mlm_probability: Fraction of tokens to predict.
    """

    def __init__(self, folder: str | os.PathLike, tokenizer, max_length: int = 128, nsp: bool = False,
                 whole_word_masking: bool = False, seed: int = 42, mlm_probability: float = 0.15):
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if not manifest.get("complete"):
            raise ValueError(f"{folder} is not completely tokenized; run build_shards first")
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too short for pre-training; use at least 8")
        self.shards = [(np.load(folder / f"{s['name']}.tokens.npy", mmap_mode="r"),
                        np.load(folder / f"{s['name']}.lines.npy"), np.load(folder / f"{s['name']}.docs.npy"))
                       for s in manifest["shards"]]
        self.max_length, self.nsp, self.wwm, self.seed, self.p = max_length, nsp, whole_word_masking, seed, mlm_probability
        self.cls, self.sep, self.mask, self.pad_id = (tokenizer.cls_token_id, tokenizer.sep_token_id,
                                                      tokenizer.mask_token_id, tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        self.continuation = np.zeros(self.vocab_size, dtype=bool)  # "##ing" continues the previous word
        for token, i in vocab.items():
            if token.startswith("##") and i < self.vocab_size:
                self.continuation[i] = True
        self.instances = np.asarray(self._pack(max_length - (3 if nsp else 2)), dtype=np.int64).reshape(-1, 3)
        if len(self.instances) < 2:
            raise ValueError(f"the corpus in {folder} gives {len(self.instances)} instance(s) of {max_length} "
                             "tokens; pre-training needs more text (or a smaller --max-length)")

    def _pack(self, target: int) -> list[tuple[int, int, int]]:
        """(shard, first line, end line) chunks: consecutive lines of one document, ~target tokens each."""
        out = []
        for s, (_, lines, docs) in enumerate(self.shards):
            for d in range(len(docs) - 1):
                first = docs[d]
                for line in range(docs[d], docs[d + 1]):
                    if lines[line + 1] - lines[first] >= target or line + 1 == docs[d + 1]:
                        out.append((s, first, line + 1))
                        first = line + 1
        return out

    def __len__(self) -> int:
        return len(self.instances)

    def _lines(self, index: int) -> list[np.ndarray]:
        s, first, end = self.instances[index]
        tokens, lines, _ = self.shards[s]
        return [np.asarray(tokens[lines[i]:lines[i + 1]], dtype=np.int64) for i in range(first, end)]

    def example(self, index: int, epoch: int) -> dict:
        """One masked instance: input_ids, token_type_ids, labels (-100 = not predicted) [, next_sentence_label]."""
        rng = np.random.default_rng([self.seed, epoch, index])
        parts = self._lines(index)
        if not self.nsp:
            body = np.concatenate(parts)[: self.max_length - 2]
            ids = np.concatenate([[self.cls], body, [self.sep]])
            types = np.zeros(len(ids), dtype=np.int64)
            label = None
        else:
            joined = np.concatenate(parts)
            if len(parts) > 1:
                cut = int(rng.integers(1, len(parts)))
                a, b = np.concatenate(parts[:cut]), np.concatenate(parts[cut:])
            else:  # one long line: split it in the middle
                a, b = joined[: max(1, len(joined) // 2)], joined[max(1, len(joined) // 2):]
            label = int(rng.random() < 0.5)  # 1 = "B is a random segment" (HF's next_sentence_label)
            if label or not len(b):
                other = int(rng.integers(len(self) - 1))
                other += other >= index  # any instance but this one
                b, label = np.concatenate(self._lines(other)), 1
            budget = self.max_length - 3
            while len(a) + len(b) > budget:  # longest-first truncation, from the end
                if len(a) >= len(b):
                    a = a[:-1]
                else:
                    b = b[:-1]
            ids = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]])
            types = np.concatenate([np.zeros(len(a) + 2, dtype=np.int64), np.ones(len(b) + 1, dtype=np.int64)])
        ids, labels = self._mask(ids, rng)
        out = {"input_ids": ids, "token_type_ids": types, "labels": labels}
        if label is not None:
            out["next_sentence_label"] = label
        return out

    def _mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        candidates = np.flatnonzero((ids != self.cls) & (ids != self.sep))
        n_predict = min(len(candidates), max(1, int(round(len(ids) * self.p))))
        if self.wwm:
            # Group candidate positions into words; take whole words in random order while they fit.
            starts = [i for i, pos in enumerate(candidates)
                      if i == 0 or not self.continuation[ids[pos]] or candidates[i - 1] != pos - 1]
            words = [candidates[a:b] for a, b in zip(starts, starts[1:] + [len(candidates)])]
            chosen: list[int] = []
            for w in rng.permutation(len(words)):
                if len(chosen) + len(words[w]) <= n_predict:
                    chosen.extend(words[w].tolist())
                if len(chosen) == n_predict:
                    break
            if not chosen:  # every word is longer than the budget: mask part of one
                chosen = words[int(rng.integers(len(words)))][:n_predict].tolist()
            positions = np.asarray(sorted(chosen), dtype=np.int64)
        else:
            positions = np.sort(rng.choice(candidates, size=n_predict, replace=False))
        labels = np.full(len(ids), -100, dtype=np.int64)
        labels[positions] = ids[positions]
        ids = ids.copy()
        roll = rng.random(len(positions))
        ids[positions[roll < 0.8]] = self.mask
        randomized = positions[(roll >= 0.8) & (roll < 0.9)]
        ids[randomized] = rng.integers(self.vocab_size, size=len(randomized))
        return ids, labels  # the remaining 10% keep their token but are still predicted

    def batch(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        """Padded tensors of the instances ``indices`` as masked in ``epoch``."""
        rows = [self.example(i, epoch) for i in indices]
        out = {"input_ids": pad_rows([r["input_ids"] for r in rows], self.pad_id),
               "token_type_ids": pad_rows([r["token_type_ids"] for r in rows], 0),
               "attention_mask": pad_rows([np.ones(len(r["input_ids"]), dtype=np.int64) for r in rows], 0),
               "labels": pad_rows([r["labels"] for r in rows], -100)}
        if self.nsp:
            out["next_sentence_label"] = torch.tensor([r["next_sentence_label"] for r in rows])
        return out

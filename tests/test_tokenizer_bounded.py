"""Issue #18 point 3: a long text truncated to N tokens is tokenized only as far as needed, and the ids are
exactly those of tokenizing the whole text (checked with hypothesis against the full Rust tokenization)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import normalizers

from bertkit import tokenizer as tokenizer_module
from bertkit.tokenizer import Tokenizer

# The traps: whitespace runs, words past max_input_chars_per_word (100 -> one [UNK]), added tokens that
# contain punctuation ("[MASK]"), combining accents, final sigma, CJK, control and non-ASCII spaces.
FRAGMENTS = ["a", "B", "un", "##able", "Σ", "ς", "é", "e\u0301", "\u0301", "中文", "İ", "ß", "ﬁ", " ", "  ", "\t", "\n",
             "\r", ",", ".", "'", "$", "[", "]", "[MASK]", "[mask]", "[CLS]", "\x00", "\x1c", "\u00a0", "\u3000", "\ufffd",
             "x" * 99, "y" * 100, "z" * 101, "w" * 150, "ab1" * 40, "Q" * 300, " " * 60, "\n" * 30, "é" * 120]
TEXTS = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=80).map("".join)


def _tokenizers():
    base = Tokenizer.from_pretrained()
    st_style = Tokenizer.from_pretrained()  # SentenceEncoder's do_lower_case: Lowercase in front
    st_style.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                                                  st_style.backend_tokenizer.normalizer])
    vocab = base.backend_tokenizer.get_vocab(with_added_tokens=False)
    cased = Tokenizer.from_vocab(vocab, do_lower_case=False, strip_accents=False)
    return [base, st_style, cased]


TOKENIZERS = _tokenizers()


def _full(tok, text, max_length):
    ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids  # nothing bounded, nothing cut
    return [tok.cls_token_id] + ids[:max_length - 2] + [tok.sep_token_id]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, max_length=st.integers(3, 24), which=st.integers(0, len(TOKENIZERS) - 1))
def test_bounded_tokenization_equals_full_tokenization(monkeypatch, text, max_length, which):
    monkeypatch.setattr(tokenizer_module, "BOUND_CHARS_PER_TOKEN", 1)  # pieces of a few characters: many cuts
    tok = TOKENIZERS[which]
    tok._configure(None, None)
    got = tok(text, max_length=max_length, return_tensors=None)["input_ids"]
    assert got == _full(tok, text, max_length)


def test_a_huge_text_is_read_only_as_far_as_the_truncation():
    tok = TOKENIZERS[0]
    text = ("The quick brown fox jumps over the lazy dog. " * 250_000) + "tail"  # 11 MB
    bounded = tok._bounded(text, 126)
    assert len(bounded) < 5000 and text.startswith(bounded)
    assert tok(text, max_length=128, return_tensors=None)["input_ids"] == _full(tok, text[:10_000], 128)
    word = "x" * 5_000_000 + " end"  # one 5 MB word: a single [UNK], shortened before tokenizing
    assert len(tok._bounded(word, 10)) < 300
    assert tok(word, max_length=8, return_tensors=None)["input_ids"] == _full(tok, "x" * 200 + " end", 8)


def test_other_pipelines_are_tokenized_whole():
    tok = Tokenizer.from_pretrained()
    tok.backend_tokenizer.normalizer = normalizers.NFKC()  # cut points unproven for it
    text = "word " * 10_000
    assert tok._bounded(text, 10) == text

"""Reliability: property-based fuzzing (hypothesis) of the tokenizer, SentenceEncoder.encode, the CLI
input readers and the model forward. Only documented ValueErrors may escape; shapes are right, nothing is
NaN/Inf, order is kept, and an item gives the same numbers alone, in a batch, padded and unpadded (fp32, 1e-5)."""

import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bertkit
from bertkit.io_readers import read_texts

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
# Texts hypothesis would rarely invent on its own: control characters, joiners, bidi marks, a 100k-character
# line, empty and whitespace-only strings, and lone surrogates (valid Python str, invalid Unicode).
SPECIAL = ["", " ", "\t \u3000 \n", "\x00\x07\x1b[31m", "👩\u200d👩\u200d👧", "\u200f\u202eabc\u202c", "\ufeffBOM",
           "e\u0301\u0301\u0301", "x" * 100_000, "word " * 20_000, "中文字符测试", "\ud800", "a\udfffb"]
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL))


def _valid(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@pytest.fixture(scope="module")
def encoder():
    return bertkit.SentenceEncoder.from_pretrained()


# ----------------------------------------------------------------------------- tokenizer
@FAST
@given(texts=st.lists(TEXT, min_size=1, max_size=6), max_length=st.integers(2, 64))
def test_tokenizer_fuzz(encoder, texts, max_length):
    tok = encoder.tokenizer
    if not all(map(_valid, texts)):
        with pytest.raises(ValueError, match=r"texts\[\d+\] contains the lone surrogate"):
            tok(texts, max_length=max_length)
        return
    enc = tok(texts, max_length=max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape[0] == len(texts) and ids.shape == mask.shape and ids.shape[1] <= max_length
    assert (ids[:, 0] == tok.cls_token_id).all() and (mask.sum(1) >= 2).all()
    assert int(ids.max()) < len(tok) and int(ids.min()) >= 0
    for row, text in enumerate(texts):  # alone == in the batch, without the padding
        alone = tok(text, max_length=max_length, return_tensors=None)["input_ids"]
        assert ids[row, : len(alone)].tolist() == alone and alone[-1] == tok.sep_token_id
        assert not mask[row, len(alone):].any()


def test_tokenize_lone_surrogate_is_a_clear_value_error(encoder):
    with pytest.raises(ValueError, match=r"text\[0\] contains the lone surrogate '\\ud800' at character 1"):
        encoder.tokenizer.tokenize("a\ud800")


# ----------------------------------------------------------------------------- SentenceEncoder.encode
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(TEXT, min_size=1, max_size=6), pick=st.integers(0, 5), batch_size=st.integers(1, 4))
def test_encode_fuzz(encoder, texts, pick, batch_size):
    if not all(map(_valid, texts)):
        with pytest.raises(ValueError, match="lone surrogate"):
            encoder.encode(texts, batch_size=batch_size)
        return
    out = encoder.encode(texts, batch_size=batch_size)
    assert out.shape == (len(texts), encoder.dim) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)  # the model normalizes
    i = pick % len(texts)
    np.testing.assert_allclose(encoder.encode([texts[i]]), out[i:i + 1], rtol=0, atol=1e-5)  # alone == in batch
    np.testing.assert_allclose(encoder.encode(texts[::-1], batch_size=batch_size), out[::-1], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- CLI readers
LINE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30)


@FAST
@given(texts=st.lists(st.one_of(LINE, st.sampled_from(["", "  ", "\r", "a\rb", "\ufefflead", "x" * 100_000])),
                      max_size=8))
def test_txt_reader_fuzz(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("txt") / "in.txt"
    path.write_bytes("".join(t + "\n" for t in texts).encode("utf-8"))
    expected = [t.rstrip("\r\n") for t in texts]
    if expected and expected[0].startswith("\ufeff"):
        expected[0] = expected[0][1:]  # a UTF-8 byte order mark opens the file, it is not text
    assert list(read_texts(path)) == expected  # blank lines too: row i is always line i (issue #18)


BODY = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), st.sampled_from(SPECIAL[:11]))


@FAST
@given(texts=st.lists(BODY, max_size=8), ascii_json=st.booleans())
def test_jsonl_and_csv_readers_fuzz(tmp_path_factory, texts, ascii_json):
    folder = tmp_path_factory.mktemp("rw")
    lines = [json.dumps({"id": i, "body": t}, ensure_ascii=ascii_json) for i, t in enumerate(texts)]
    (folder / "in.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="")
    assert list(read_texts(folder / "in.jsonl", "body")) == texts
    with open(folder / "in.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "body"])
        writer.writerows([i, t] for i, t in enumerate(texts))
    # Every row has two fields, so no row is blank: every text comes back, embedded newlines included.
    assert list(read_texts(folder / "in.csv", "body")) == texts


# ----------------------------------------------------------------------------- model forward
@st.composite
def tiny_model_inputs(draw):
    heads = draw(st.integers(1, 3))
    cfg = dict(vocab_size=50, hidden_size=heads * draw(st.sampled_from([4, 8])), num_attention_heads=heads,
               num_hidden_layers=draw(st.integers(0, 2)), intermediate_size=draw(st.integers(1, 24)),
               max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               norm_placement=draw(st.sampled_from(["post", "pre"])),
               position_embedding_type=draw(st.sampled_from(["absolute", "absolute", "relative_key_query"])),
               attn_implementation=draw(st.sampled_from(["sdpa", "eager"])))
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    layout = draw(st.sampled_from(["right", "left", "random"]))
    lengths = [draw(st.integers(0, length)) for _ in range(batch)]  # 0 = an all-zero mask row
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        if layout == "right":
            mask[row, :n] = 1
        elif layout == "left":
            mask[row, length - n:] = 1
        else:
            mask[row] = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=length, max_size=length)))
    return cfg, mask, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(case=tiny_model_inputs())
def test_model_forward_fuzz(case):
    cfg, mask, seed = case
    torch.manual_seed(seed % 1000)
    model = bertkit.BertModel(bertkit.BertConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # away from the init so the layers really mix tokens
        ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(seed))
        out = model(ids, mask)
        batch, length = mask.shape
        assert out.last_hidden_state.shape == (batch, length, cfg["hidden_size"])
        assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
        keep = mask.bool()
        packed = model(ids, mask, unpad=True)
        torch.testing.assert_close(packed.last_hidden_state[keep], out.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
        for row in range(batch):  # each sequence alone == inside the batch, at every position
            alone = model(ids[row:row + 1], mask[row:row + 1]).last_hidden_state
            torch.testing.assert_close(alone[0], out.last_hidden_state[row], rtol=1e-5, atol=1e-5)


def test_zero_length_sequences_are_a_value_error():
    model = bertkit.BertModel(bertkit.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=8)).eval()
    for unpad in (False, True):
        with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\): sequences need at least one token"):
            model(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), unpad=unpad)
    assert model(torch.zeros(0, 5, dtype=torch.long)).last_hidden_state.shape == (0, 5, 8)  # an empty batch is fine

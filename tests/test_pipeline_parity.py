"""Pipelines and CrossEncoder give transformers' / sentence-transformers' results on tiny random models they saved.

Every model is built by the reference library, saved as a user would save it, and loaded from that folder by
bertkit. Weights are scaled up so the predicted labels vary from token to token (a near-uniform random head
would make every comparison a tie).
"""

import math
import shutil

import numpy as np
import pytest
import torch
import transformers

import bertkit
from bertkit.encoder import bundled_model_dir

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128)
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC"]
TEXTS = ["I loved it", "The hotel in Paris was run by Jean-Pierre Dupont and his wife.", "ok",
         "Unbelievably, extraordinary hospitality from Mr. Oyelaran at the Zürich branch!!"]


def save_reference(folder, cls, scale=4.0, **config):
    """A tiny random transformers model with the bundled tokenizer, saved to ``folder``."""
    tok = transformers.AutoTokenizer.from_pretrained(bundled_model_dir())
    torch.manual_seed(0)
    model = cls(transformers.BertConfig(vocab_size=len(tok), **TINY, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    save_reference(root / "seq", transformers.BertForSequenceClassification, num_labels=3)
    save_reference(root / "tok", transformers.BertForTokenClassification, scale=6.0,
                   id2label=dict(enumerate(NER_LABELS)), label2id={k: i for i, k in enumerate(NER_LABELS)})
    save_reference(root / "mlm", transformers.BertForMaskedLM)
    save_reference(root / "ce", transformers.BertForSequenceClassification, num_labels=1)
    return root


@pytest.fixture(autouse=True)
def quiet_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same(ours, theirs, path="out"):
    """Same structure, keys, labels and strings; floats within 1e-5."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), f"{path}: keys {sorted(ours)} != {sorted(theirs)}"
        for k in theirs:
            assert_same(ours[k], theirs[k], f"{path}.{k}")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), f"{path}: {ours} != {theirs}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, (float, np.floating)):
        assert math.isclose(float(ours), float(theirs), abs_tol=1e-5), f"{path}: {ours} != {theirs}"
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


# ------------------------------------------------------------------------------------ text classification
@pytest.mark.parametrize("kwargs", [{}, {"top_k": None}, {"top_k": 2, "function_to_apply": "sigmoid"},
                                    {"function_to_apply": "none"}])
@pytest.mark.parametrize("name", ["seq", "ce"])  # 3 labels (softmax by default), 1 label (sigmoid)
def test_text_classification_matches_transformers(folders, kwargs, name):
    theirs = transformers.pipeline("text-classification", model=str(folders / name))
    ours = bertkit.pipeline(model=folders / name)  # the task comes from config.json's architectures
    assert ours.task == "text-classification"
    inputs = TEXTS + [{"text": "is it far?", "text_pair": "It is two hours by train."}]
    assert_same(ours(inputs, **kwargs), theirs(inputs, **kwargs))
    assert_same(ours(TEXTS[1], **kwargs), theirs(TEXTS[1], **kwargs))  # one string: its own output shape
    assert_same(ours(inputs[-1], **kwargs), theirs(inputs[-1], **kwargs))  # one pair


def test_text_classification_truncates_long_texts_without_tokenizing_them(folders):
    pipe = bertkit.pipeline("text-classification", folders / "seq", max_length=32)
    long = "word " * 200_000  # a megabyte: clipped to a bounded prefix before tokenizing
    rows = pipe.tokenize([long, "short text"])
    assert len(rows[0].input_ids) == 32 and rows[0].input_ids[-1] == pipe.tokenizer.sep_token_id
    full = pipe.tokenizer("word " * 100, max_length=32, return_tensors=None)["input_ids"]
    assert rows[0].input_ids == full
    # texts whose bounded prefix holds too few tokens (long whitespace runs, one huge "word") and pairs with
    # one or two long segments come out exactly as the tokenizer truncates the full text
    tricky = ["a" + " " * 5000 + "b c d " * 50, "x" * 3000 + " y" * 40, "word " * 3000]
    for text in tricky:
        assert pipe.tokenize([text])[0].input_ids == pipe.tokenizer(text, max_length=32, return_tensors=None)["input_ids"]
    for a, b in [(tricky[2], "short one"), ("short one", tricky[2]), (tricky[2], "word " * 5000),
                 ("word " * 5000, tricky[2]), (tricky[0], tricky[2])]:  # the longer of two long ones gets the odd token
        expected = pipe.tokenizer(a, b, max_length=32, return_tensors=None)
        row = pipe.tokenize([{"text": a, "text_pair": b}])[0]
        assert (row.input_ids, row.token_type_ids) == (expected["input_ids"], expected["token_type_ids"])
    # one padding-free batch of mixed rows gives the same logits as each row alone
    together = pipe.score_rows(rows)
    alone = torch.cat([pipe.score_rows([r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ cross-encoder
PAIRS = [("how do plants grow?", "Plants grow by photosynthesis, turning light into sugar."),
         ("how do plants grow?", "The train leaves at noon. " * 120),  # longer than max_length: truncated
         ("what is bert", "a transformer encoder"), ("a", "b")]


@pytest.mark.parametrize("saved_activation", [None, "Tanh"])
def test_cross_encoder_matches_sentence_transformers(folders, tmp_path, saved_activation):
    from sentence_transformers import CrossEncoder as Reference

    folder = folders / "ce"
    if saved_activation:  # a sentence-transformers folder that saved its activation function
        Reference(str(folder), activation_fn=getattr(torch.nn, saved_activation)()).save(str(tmp_path / "st"))
        folder = tmp_path / "st"
    theirs, ours = Reference(str(folder)), bertkit.CrossEncoder.from_pretrained(folder)
    assert type(ours.activation_fn).__name__ == (saved_activation or "Sigmoid")
    np.testing.assert_allclose(ours.predict(PAIRS), theirs.predict(PAIRS), atol=1e-6)
    np.testing.assert_allclose(ours.predict(PAIRS[0]), theirs.predict(PAIRS[0]), atol=1e-6)  # one pair
    np.testing.assert_allclose(ours.predict(PAIRS, batch_size=3, activation_fn=torch.nn.Identity()),
                               theirs.predict(PAIRS, batch_size=3, activation_fn=torch.nn.Identity()), atol=1e-5)
    docs = [d for _, d in PAIRS]
    for kwargs in ({}, {"top_k": 2, "return_documents": True}):
        assert_same(ours.rank(PAIRS[0][0], docs, **kwargs), theirs.rank(PAIRS[0][0], docs, **kwargs))


def test_cross_encoder_on_a_multi_label_classifier(folders):
    from sentence_transformers import CrossEncoder as Reference

    theirs, ours = Reference(str(folders / "seq")), bertkit.CrossEncoder.from_pretrained(folders / "seq")
    np.testing.assert_allclose(ours.predict(PAIRS), theirs.predict(PAIRS), atol=1e-6)  # Identity: logits
    np.testing.assert_allclose(ours.predict(PAIRS, apply_softmax=True), theirs.predict(PAIRS, apply_softmax=True),
                               atol=1e-6)
    with pytest.raises(ValueError, match="rank\\(\\) needs a model with one label, this one has 3"):
        ours.rank("q", ["d"])


def test_cross_encoder_rows_batch_across_requests(folders):
    ce = bertkit.CrossEncoder.from_pretrained(folders / "ce")
    first, second = ce.tokenize(PAIRS[:2]), ce.tokenize(PAIRS[2:])
    mixed = ce.score_rows(second + first)  # two "requests" in one padding-free batch
    np.testing.assert_allclose(mixed.numpy(), np.concatenate([ce.predict(PAIRS[2:]), ce.predict(PAIRS[:2])]),
                               atol=1e-6)
    assert len(first[1].input_ids) == ce.max_length


# ------------------------------------------------------------------------------------ token classification
def _comparable(entities):
    """transformers' `word` is the decoded tokens; ours is the input substring: compare the rest exactly."""
    return [{k: v for k, v in e.items() if k != "word"} for e in entities]


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_matches_transformers(folders, strategy):
    theirs = transformers.pipeline("token-classification", model=str(folders / "tok"), aggregation_strategy=strategy)
    ours = bertkit.pipeline("ner", folders / "tok", aggregation_strategy=strategy)
    for ignore in (None, []):
        kwargs = {} if ignore is None else {"ignore_labels": ignore}
        got, want = ours(TEXTS, **kwargs), theirs(TEXTS, **kwargs)
        for text, a, b in zip(TEXTS, got, want):
            assert_same(_comparable(a), _comparable(b))
            for entity, reference in zip(a, b):
                assert entity["word"] == text[entity["start"]:entity["end"]]
                # the decoded tokens are the substring lower-cased, without accents and spaces
                assert reference["word"].replace(" ", "").replace("##", "") in \
                    entity["word"].lower().replace(" ", "").replace("ü", "u")
    assert list(ours(TEXTS[1])[0]) == list(theirs(TEXTS[1])[0])  # same keys in the same order


def test_grouping_of_b_and_i_tags():
    """Hand-checked: I-X continues X, B-X starts a new X, a bare label continues itself; score = mean."""
    from bertkit.pipelines.token_classification import TokenClassificationPipeline

    tags = ["B-PER", "I-PER", "B-PER", "I-PER", "I-LOC", "MISC", "MISC", "B-LOC", "O"]
    entities = [{"entity": t, "score": 0.1 * (i + 1), "start": 2 * i, "end": 2 * i + 1} for i, t in enumerate(tags)]
    groups = TokenClassificationPipeline._group(TokenClassificationPipeline.__new__(TokenClassificationPipeline),
                                                entities)
    assert [(g["entity_group"], g["start"], g["end"]) for g in groups] == [
        ("PER", 0, 3), ("PER", 4, 7), ("LOC", 8, 9), ("MISC", 10, 13), ("LOC", 14, 15), ("O", 16, 17)]
    assert [round(g["score"], 6) for g in groups] == [0.15, 0.35, 0.5, 0.65, 0.8, 0.9]


def test_aggregation_strategies_differ_on_this_model(folders):
    """The parity test above would prove little if every strategy gave the same entities."""
    pipe = bertkit.pipeline("ner", folders / "tok")
    outputs = {s: str(pipe(TEXTS, aggregation_strategy=s, ignore_labels=[])) for s in
               ["simple", "first", "average", "max"]}
    assert len(set(outputs.values())) == 4
    labels = {e["entity"] for row in pipe(TEXTS, ignore_labels=[]) for e in row}
    assert {"O", "B-LOC", "I-LOC", "MISC"} <= labels, labels  # B-/I- grouping and a prefix-less label


# ------------------------------------------------------------------------------------ fill-mask
MASKED = ["Paris is the [MASK] of France.", "The [MASK] sat on the [MASK].", "hello [MASK]"]


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3}, {"targets": ["capital", "city", "paris", "france"]},
                                    {"targets": "capital", "top_k": 3}])
def test_fill_mask_matches_transformers(folders, kwargs):
    theirs = transformers.pipeline("fill-mask", model=str(folders / "mlm"))
    ours = bertkit.pipeline(model=folders / "mlm")
    assert ours.task == "fill-mask"
    assert_same(ours(MASKED, **kwargs), theirs(MASKED, **kwargs))
    assert_same(ours(MASKED[0], **kwargs), theirs(MASKED[0], **kwargs))  # one mask: a flat list
    assert_same(ours(MASKED[1:2], **kwargs), theirs(MASKED[1:2], **kwargs))  # two masks: a list per mask


@pytest.mark.parametrize("task,folder", [("fill-mask", "mlm"), ("ner", "tok")])
def test_non_string_input_is_named_by_its_position(folders, task, folder):
    pipe = bertkit.pipeline(task, folders / folder)
    with pytest.raises(bertkit.pipelines.PipelineError, match=rf"input 1 is int; {pipe.task} takes strings"):
        pipe(["Paris is the [MASK] of France.", 3])


# ------------------------------------------------------------------------------------ feature extraction
def test_sentence_embedding_is_the_sentence_encoder():
    pipe = bertkit.pipeline("sentence-embedding")  # the bundled all-MiniLM-L6-v2
    np.testing.assert_array_equal(pipe(TEXTS), bertkit.SentenceEncoder.from_pretrained().encode(TEXTS))
    assert pipe(TEXTS[0]).shape == (384,)


def test_megatron_bert_folders_work_too(tmp_path):
    """A Megatron-BERT (pre-LayerNorm) token classifier saved by transformers: same entities."""
    tok = transformers.AutoTokenizer.from_pretrained(bundled_model_dir())
    torch.manual_seed(0)
    config = transformers.MegatronBertConfig(vocab_size=len(tok), **TINY, id2label=dict(enumerate(NER_LABELS)),
                                             label2id={k: i for i, k in enumerate(NER_LABELS)})
    model = transformers.MegatronBertForTokenClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    theirs = transformers.pipeline("ner", model=str(tmp_path), aggregation_strategy="average")
    ours = bertkit.pipeline(model=tmp_path, aggregation_strategy="average")
    got, want = ours(TEXTS, ignore_labels=[]), theirs(TEXTS, ignore_labels=[])
    assert len({e["entity_group"] for row in got for e in row}) > 1
    for a, b in zip(got, want):
        assert_same(_comparable(a), _comparable(b))

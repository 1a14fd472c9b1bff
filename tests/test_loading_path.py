"""One loading path: from_pretrained's ignore_unexpected and prepare options, used by SentenceEncoder and
load_quantized (one read of the weight files, no log filtering)."""

import logging

import pytest
import torch

import bertkit
import bertkit.pretrained
from bertkit.quant import calibrate, load_quantized, quantize, quantizers
from test_quant_model import inputs, tiny


def test_ignore_unexpected_hides_only_the_expected_keys(tmp_path, caplog):
    tiny(bertkit.BertForSequenceClassification).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bertkit"):
        model, info = bertkit.BertModel.from_pretrained(tmp_path, add_pooling_layer=False, output_loading_info=True,
                                                        ignore_unexpected=("pooler.*",))
    # The classifier is still reported; the pooler, expected unused, is not.
    assert info["unexpected_keys"] == ["classifier.bias", "classifier.weight"]
    assert "classifier.weight" in caplog.text and "pooler" not in caplog.text
    with pytest.raises(ValueError, match="unexpected keys"):
        bertkit.BertModel.from_pretrained(tmp_path, add_pooling_layer=False, strict=True,
                                          ignore_unexpected=("pooler.*",))
    bertkit.BertModel.from_pretrained(tmp_path, add_pooling_layer=False, strict=True,
                                      ignore_unexpected=("pooler.*", "classifier.*"))


def test_bundled_sentence_encoder_loads_quietly(caplog):
    with caplog.at_level(logging.WARNING, logger="bertkit"):
        bertkit.SentenceEncoder.from_pretrained(device="cpu")
    assert caplog.text == ""


def test_prepare_runs_on_the_meta_model_before_the_weights(tmp_path):
    tiny(bertkit.BertModel).save_pretrained(tmp_path)
    seen = {}

    def prepare(model, keys):
        seen["meta"] = all(p.is_meta for p in model.parameters())
        seen["keys"] = keys

    bertkit.BertModel.from_pretrained(tmp_path, prepare=prepare)
    assert seen["meta"] and "encoder.layer.0.attention.self.query.weight" in seen["keys"]


def test_load_quantized_reads_the_weights_once_and_keeps_amax_float32(tmp_path, monkeypatch):
    model = quantize(tiny(bertkit.BertForSequenceClassification))
    with calibrate(model):
        model(**inputs())
    model.save_pretrained(tmp_path)
    reads = []
    real = bertkit.pretrained.load_state_dict
    monkeypatch.setattr(bertkit.pretrained, "load_state_dict", lambda path: reads.append(path) or real(path))
    loaded = load_quantized(bertkit.BertForSequenceClassification, tmp_path, dtype=torch.bfloat16)
    assert len(reads) == 1
    assert loaded.classifier.weight.dtype == torch.bfloat16
    expected = dict(quantizers(model))
    for name, q in quantizers(loaded):
        assert q.amax.dtype == torch.float32 and torch.equal(q.amax, expected[name].amax), name

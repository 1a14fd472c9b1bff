"""Quantized checkpoints: save_pretrained -> load_quantized round trip, and pytorch-quantization key names."""

import json
import logging

import pytest
import torch
from torch import nn

import bertkit
from bertkit.checkpoints.io import load_safetensors, save_safetensors
from bertkit.quant import QuantConfig, QuantLinear, calibrate, load_quantized, quantize, quantizers
from test_quant_model import inputs, outputs, tiny


def calibrated(cls=bertkit.BertForSequenceClassification, config=None, **changes):
    model = quantize(tiny(cls, **changes), config)
    with calibrate(model, method="percentile"):
        model(**inputs())
    return model


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_round_trip_is_exact_and_quiet(tmp_path, caplog, norm):
    model = calibrated(config=QuantConfig(exclude=("*.intermediate.dense._input_quantizer",)), norm_placement=norm)
    expected = outputs(model, inputs())
    model.save_pretrained(tmp_path)
    saved = load_safetensors(tmp_path / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query._input_quantizer._amax"
    assert saved[key].dim() == 0
    assert saved["bert.encoder.layer.0.attention.self.query._weight_quantizer._amax"].shape == (32, 1)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["calib_method"] == "max" and stored["exclude"] == ["*.intermediate.dense._input_quantizer"]
    with caplog.at_level(logging.WARNING, logger="bertkit"):
        loaded = load_quantized(bertkit.BertForSequenceClassification, tmp_path)
    assert caplog.text == ""
    assert not loaded.bert.encoder.layer[0].intermediate.dense._input_quantizer.is_enabled
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded, inputs()), expected))
    assert {n for n, _ in quantizers(loaded)} == {n for n, _ in quantizers(model)}


def _qdqbert_folder(path):
    """A checkpoint as HF QDQ-BERT + pytorch-quantization save it: model_type qdqbert, encoder-only quantizers,
    per-tensor amax 0-d, per-channel weight amax (out_features, 1)."""
    model = tiny(bertkit.BertForSequenceClassification)
    model.config.model_type = "qdqbert"
    model.save_pretrained(path)
    state = load_safetensors(path / "model.safetensors")
    for i in range(2):
        prefix = f"bert.encoder.layer.{i}."
        for linear in ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense"):
            weight = state[prefix + linear + ".weight"]
            state[prefix + linear + "._input_quantizer._amax"] = torch.tensor(4.0 + i)
            state[prefix + linear + "._weight_quantizer._amax"] = weight.abs().amax(dim=1, keepdim=True)
        for name in ("q", "k", "v", "a"):
            state[prefix + f"attention.self.matmul_{name}_input_quantizer._amax"] = torch.tensor(1.5)
        for block in ("attention.output.", "output."):
            state[prefix + block + "add_local_input_quantizer._amax"] = torch.tensor(2.5)
            state[prefix + block + "add_residual_input_quantizer._amax"] = torch.tensor(3.5)
    save_safetensors(state, path / "model.safetensors")
    return model


def test_pytorch_quantization_names_load(tmp_path, caplog):
    float_model = _qdqbert_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bertkit"):
        model = load_quantized(bertkit.BertForSequenceClassification, tmp_path)
    assert "not used" not in caplog.text
    layer = model.bert.encoder.layer[1]
    assert layer.attention.self.query._input_quantizer.amax.item() == 5.0
    assert layer.attention.self.matmul_a_input_quantizer.amax.item() == 1.5
    assert layer.output.add_local_input_quantizer.amax.item() == 2.5
    assert layer.attention.output.add_residual_input_quantizer.amax.item() == 3.5
    assert torch.equal(layer.intermediate.dense._weight_quantizer.amax,
                       float_model.bert.encoder.layer[1].intermediate.dense.weight.abs().amax(1, keepdim=True))
    # Placement inferred from the keys: encoder only (HF QDQ-BERT), pytorch-quantization's full range.
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    assert isinstance(layer.output.dense, QuantLinear) and not layer.output.dense._input_quantizer.narrow_range
    assert all(q.is_enabled for _, q in quantizers(model))
    got = model(**inputs()).logits
    assert got.shape == (3, 2) and torch.isfinite(got).all()


def test_missing_amax_disables_the_quantizer_with_a_warning(tmp_path, caplog):
    _qdqbert_folder(tmp_path)
    state = load_safetensors(tmp_path / "model.safetensors")
    del state["bert.encoder.layer.0.attention.self.key._input_quantizer._amax"]
    save_safetensors(state, tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="bertkit"):
        model = load_quantized(bertkit.BertForSequenceClassification, tmp_path)
    assert "attention.self.key._input_quantizer" in caplog.text
    assert not model.bert.encoder.layer[0].attention.self.key._input_quantizer.is_enabled


def test_bad_checkpoints_name_the_problem(tmp_path):
    tiny().save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="float checkpoint"):
        load_quantized(bertkit.BertModel, tmp_path / "float")
    _qdqbert_folder(tmp_path / "flat")
    state = load_safetensors(tmp_path / "flat" / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query._weight_quantizer._amax"
    state[key] = state[key].flatten()
    save_safetensors(state, tmp_path / "flat" / "model.safetensors")
    with pytest.raises(ValueError, match=r"\(out_features, 1\)"):
        load_quantized(bertkit.BertForSequenceClassification, tmp_path / "flat")
    with pytest.raises(ValueError, match="matching the checkpoint"):
        load_quantized(bertkit.BertForSequenceClassification, tmp_path / "flat",
                       config=QuantConfig(matmul_inputs=False))


def test_bare_encoder_checkpoint_into_a_task_model(tmp_path):
    model = calibrated(bertkit.BertModel)
    model.save_pretrained(tmp_path)
    loaded = load_quantized(bertkit.BertForSequenceClassification, tmp_path)
    expected = dict(quantizers(model))
    for name, q in quantizers(loaded.bert):
        if name.startswith("encoder."):
            assert torch.equal(q.amax, expected[name].amax), name

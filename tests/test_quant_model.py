"""quantize() on whole models: placement, disabled == float bit for bit, calibrate(), QAT."""

import logging

import pytest
import torch
from torch import nn

import bertkit
from bertkit.quant import (QuantConfig, QuantLinear, TensorQuantizer, calibrate, calibration_summary,
                           disable_quantization, enable_quantization, quantize, quantizers)

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny(cls=bertkit.BertModel, seed=0, **changes):
    torch.manual_seed(seed)
    return cls(bertkit.BertConfig(**{**TINY, **changes})).eval()


def inputs(batch=3, seq=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq - 4:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def outputs(model, batch):
    with torch.no_grad():
        return [t for t in model(**batch, return_dict=True).to_tuple() if isinstance(t, torch.Tensor)]


HEADS = [bertkit.BertModel, bertkit.BertForSequenceClassification, bertkit.BertForQuestionAnswering,
         bertkit.BertForPreTraining, bertkit.BertForMaskedLM, bertkit.BertForTokenClassification]


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_disabled_quantizers_are_bit_identical(cls, norm):
    model, batch = tiny(cls, norm_placement=norm), inputs()
    reference = outputs(model, batch)
    disable_quantization(quantize(model))
    assert any(True for _ in quantizers(model))
    got = outputs(model, batch)
    assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference))


def test_disabled_is_bit_identical_on_the_explicit_path_too():
    model, batch = tiny(), inputs()
    with torch.no_grad():
        reference = model(**batch, output_attentions=True)
        disable_quantization(quantize(model))
        got = model(**batch, output_attentions=True)
    assert torch.equal(got.last_hidden_state, reference.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, reference.attentions))


def test_placement_follows_qdqbert_and_keeps_names_and_tying():
    model = tiny(bertkit.BertForPreTraining)
    float_keys = set(model.state_dict())
    embeddings = model.bert.embeddings.word_embeddings.weight
    quantize(model)
    layer = model.bert.encoder.layer[0]
    for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                   layer.attention.output.dense, layer.intermediate.dense, layer.output.dense,
                   model.bert.pooler.dense, model.cls.predictions.transform.dense, model.cls.seq_relationship):
        assert isinstance(linear, QuantLinear) and linear._weight_quantizer.axis == 0
    for name in ("matmul_q_input_quantizer", "matmul_k_input_quantizer", "matmul_v_input_quantizer",
                 "matmul_a_input_quantizer"):
        assert isinstance(getattr(layer.attention.self, name), TensorQuantizer)
    for block in (layer.attention.output, layer.output):
        assert isinstance(block.add_local_input_quantizer, TensorQuantizer)
        assert isinstance(block.add_residual_input_quantizer, TensorQuantizer)
    # The MLM decoder stays a float nn.Linear tied to the embeddings (HF QDQ-BERT left it float).
    assert type(model.cls.predictions.decoder) is nn.Linear
    assert model.cls.predictions.decoder.weight is embeddings
    # Same parameter names; the weight amax values (known at once) are the only new keys so far.
    new_keys = set(model.state_dict()) - float_keys
    assert float_keys <= set(model.state_dict())
    assert new_keys and all(k.endswith("_weight_quantizer._amax") for k in new_keys)
    assert model.bert.encoder.layer[0].attention.self.query._weight_quantizer.amax.shape == (32, 1)
    assert model.config.extra["quantization_config"]["num_bits"] == 8


def test_hf_placement_and_switches():
    model = quantize(tiny(bertkit.BertForSequenceClassification), QuantConfig.hf_qdqbert())
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].output.dense, QuantLinear)
    assert not next(iter(quantizers(model)))[1].narrow_range
    model = quantize(tiny(), QuantConfig(matmul_inputs=False, residual_adds=False, linear_weights=False))
    attention = model.encoder.layer[0].attention
    assert not hasattr(attention.self, "matmul_a_input_quantizer") and not hasattr(attention.output,
                                                                                   "add_local_input_quantizer")
    assert not attention.self.query._weight_quantizer.is_enabled
    excluded = quantize(tiny(), QuantConfig(exclude=("*.output.add_local_input_quantizer",)))
    states = {n: q.is_enabled for n, q in quantizers(excluded)}
    assert not states["encoder.layer.1.output.add_local_input_quantizer"]
    assert states["encoder.layer.1.output.add_residual_input_quantizer"]


def test_quantize_errors():
    model = quantize(tiny())
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model)
    with pytest.raises(ValueError, match="calib_method"):
        QuantConfig(calib_method="kl")
    with pytest.raises(ValueError, match="tuple of patterns"):
        QuantConfig(exclude="*.add_local_input_quantizer")
    with pytest.raises(RuntimeError, match="no amax"):
        model(**inputs())
    with pytest.raises(ValueError, match="quantize"):
        with calibrate(tiny()):
            pass


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_calibrate_then_quantized_outputs_are_close_but_not_equal(method, norm):
    model, batch = tiny(norm_placement=norm), inputs()
    reference = outputs(model, batch)[0]
    quantize(model)
    with calibrate(model, method=method, num_bins=256):
        for name, q in quantizers(model):
            if "weight" not in name:
                assert q.is_enabled and q._if_calib and not q._if_quant
        inside = outputs(model, batch)[0]
        model(**inputs(seed=2))
    torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5)  # calibrating passes values through
    assert all(q.amax is not None and q._if_quant and not q._if_calib for _, q in quantizers(model))
    got = outputs(model, batch)[0]
    assert not torch.equal(got, reference)
    assert (got - reference).abs().max() < 0.1 * reference.abs().max()


def test_calibrate_restores_modes_on_error_and_training_flag():
    model = quantize(tiny()).train()
    with pytest.raises(KeyError):
        with calibrate(model):
            assert not model.training
            raise KeyError("boom")
    assert model.training
    assert all(not q._if_calib and q._if_quant for _, q in quantizers(model))
    assert all(q.amax is None for n, q in quantizers(model) if "weight" not in n)


def test_unused_quantizers_are_disabled_with_a_warning(caplog):
    model = quantize(tiny(add_cross_attention=True, is_decoder=True))
    with caplog.at_level(logging.WARNING, logger="bertkit"), calibrate(model):
        model(**inputs())  # no encoder_hidden_states: cross-attention never runs
    assert "crossattention" in caplog.text and "now disabled" in caplog.text
    assert not model.encoder.layer[0].crossattention.self.matmul_a_input_quantizer.is_enabled
    model(**inputs())


def test_summary_lists_every_quantizer():
    model = quantize(tiny(bertkit.BertForSequenceClassification))
    with calibrate(model):
        model(**inputs())
    summary = calibration_summary(model).splitlines()
    names = [n for n, _ in quantizers(model)]
    assert len(summary) == len(names) == 2 * (6 * 2 + 4 + 4) + 4
    assert all(line.startswith(n) and "amax=" in line and "amax=None" not in line for line, n in zip(summary, names))
    assert "axis=0" in summary[1] and "amax=[" in summary[1]
    disable_quantization(model)
    assert all(" disabled " in line for line in calibration_summary(model).splitlines())
    enable_quantization(model)
    assert all(" quant " in line for line in calibration_summary(model).splitlines())


def _train(model, steps=8):
    batch = inputs(batch=8, seq=12)
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("learn_amax", [False, True])
def test_qat_reduces_the_loss_and_learns_amax_only_when_asked(learn_amax):
    model = quantize(tiny(bertkit.BertForSequenceClassification), QuantConfig(learn_amax=learn_amax))
    with calibrate(model):
        model(**inputs(batch=8, seq=12))
    before = {n: q.amax.detach().clone() for n, q in quantizers(model)}
    learned = [n for n, p in model.named_parameters() if n.endswith("._amax")]
    assert bool(learned) == learn_amax
    losses = _train(model)
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0  # STE lets it through
    moved = [n for n, q in quantizers(model) if not torch.equal(q.amax.detach(), before[n])]
    if learn_amax:
        assert moved and all("weight" not in n for n in moved)
    else:
        assert moved == []

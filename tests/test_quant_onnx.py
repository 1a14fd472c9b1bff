"""ONNX export: float graphs match PyTorch, QDQ graphs carry QuantizeLinear/DequantizeLinear and match fake quant."""

import collections

import numpy as np
import pytest
import torch

import bertkit
from bertkit.quant import QuantConfig, TensorQuantizer, calibrate, export_onnx, quantize
from test_quant_model import inputs, tiny

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def session(path, optimize=True):
    options = ort.SessionOptions()
    # BASIC keeps Q/DQ as written (exact fake-quant arithmetic); ALL lets onnxruntime fuse them into int8 kernels.
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, batch):
    return sess.run(None, {k: v.numpy() for k, v in batch.items()})


def calibrated(cls=bertkit.BertModel, config=None):
    model = quantize(tiny(cls), config)
    with calibrate(model):
        model(**inputs())
        model(**inputs(batch=4, seq=20, seed=3))
    return model


OTHER_SHAPE = dict(batch=5, seq=23, seed=7)  # not the traced example's shape: the axes are dynamic


def test_float_export_matches_pytorch(tmp_path):
    model = tiny()
    export_onnx(model, tmp_path / "f.onnx")
    sess = session(tmp_path / "f.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    for shape in ({}, OTHER_SHAPE):
        batch = inputs(**shape)
        got = run(sess, batch)
        with torch.no_grad():
            want = model(**batch)
        np.testing.assert_allclose(got[0], want.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got[1], want.pooler_output.numpy(), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = calibrated()
    path = tmp_path_factory.mktemp("qdq") / "q.onnx"
    export_onnx(model, path)
    return model, path


def test_qdq_graph_structure(exported):
    model, path = exported
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    # 2 layers x (6 linears x 2 + 4 matmul inputs + 4 add inputs) + pooler (2) = 42 Q/DQ pairs.
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 42
    constants = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    per_channel = [n for n in graph.node if n.op_type == "QuantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert len(per_channel) == 13  # one per Linear weight: 2 x 6 + the pooler
    query = model.encoder.layer[0].attention.self.query
    scales = [constants[n.input[1]] for n in per_channel]
    expected = (query._weight_quantizer.amax.flatten() / 127).numpy()
    assert any(s.shape == (32,) and np.allclose(s, expected) for s in scales)
    zero_points = [constants[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)


def test_qdq_export_matches_fake_quant(exported):
    model, path = exported
    exact, fused = session(path, optimize=False), session(path)
    for shape in ({}, OTHER_SHAPE):
        batch = inputs(**shape)
        with torch.no_grad():
            want = model(**batch).last_hidden_state.numpy()
        # Q/DQ kept as nodes: the same arithmetic up to float rounding, narrow range kept by the Max node.
        np.testing.assert_allclose(run(exact, batch)[0], want, atol=1e-5, rtol=1e-5)
        # Fused into int8 kernels: requantization rounds differently, a step here and there.
        got = run(fused, batch)[0]
        cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cosine.min() > 0.999 and np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("narrow", [True, False])
def test_single_quantizer_saturates_like_fake_quant(tmp_path, narrow):
    # Values beyond amax: narrow range must stop at -127 steps even though ONNX int8 goes to -128.
    quantizer = TensorQuantizer(amax=torch.tensor([[1.0], [2.0]]), axis=0, narrow_range=narrow).eval()
    x = torch.tensor([[-3.0, -1.004, -0.5, 0.0031, 2.0], [-5.0, -2.01, 1.0, 0.5, 9.0]])
    torch.onnx.export(quantizer, (x,), str(tmp_path / "q.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"])
    got = session(tmp_path / "q.onnx", optimize=False).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, quantizer(x).numpy(), rtol=0, atol=1e-7)
    assert (got[0, 0] == -1.0) == narrow


def test_full_range_and_heads_export(tmp_path):
    model = calibrated(bertkit.BertForQuestionAnswering, QuantConfig(narrow_range=False))
    export_onnx(model, tmp_path / "qa.onnx")
    graph = onnx.load(str(tmp_path / "qa.onnx")).graph
    assert not any(n.op_type == "Max" for n in graph.node)  # -128..127 is ONNX's own range
    sess = session(tmp_path / "qa.onnx", optimize=False)
    assert [o.name for o in sess.get_outputs()] == ["start_logits", "end_logits"]
    batch = inputs(**OTHER_SHAPE)
    with torch.no_grad():
        want = model(**batch)
    got = run(sess, batch)
    np.testing.assert_allclose(got[0], want.start_logits.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1], want.end_logits.numpy(), atol=1e-5, rtol=1e-5)


def test_classifier_export_is_named_logits(tmp_path):
    model = calibrated(bertkit.BertForSequenceClassification)
    export_onnx(model, tmp_path / "c.onnx")
    sess = session(tmp_path / "c.onnx", optimize=False)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    batch = inputs()
    with torch.no_grad():
        want = model(**batch).logits.numpy()
    np.testing.assert_allclose(run(sess, batch)[0], want, atol=1e-5, rtol=1e-5)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny(), tmp_path / "x.onnx", opset=13)
    model = quantize(tiny())
    with pytest.raises(ValueError, match="no amax"):
        export_onnx(model, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="still calibrating"):
        with calibrate(model):
            export_onnx(model, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="8-bit"):
        export_onnx(calibrated(config=QuantConfig(num_bits=4)), tmp_path / "x.onnx")

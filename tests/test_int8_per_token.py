"""Per-token dynamic int8 (bertkit.quant.per_token): each row gets its own scale, so a row's result does not
depend on the other rows of its batch, and the error stays within the int8 grid of that row."""

import numpy as np
import pytest

from bertkit.quant.per_token import per_token_int8, quantize_columns

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

K, N = 64, 48


def _matmul_model(weight, opset=17):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/mlp/MatMul"),
                               helper.make_node("MatMul", ["x", "x_t"], ["scores"])],  # two activations: stays float
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "l", K]),
                                    helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["b", K, "l"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "l", N]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", "l", "l"])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x, "x_t": np.swapaxes(x, 1, 2).copy()})[0]


@pytest.mark.parametrize("opset", [17, 18])
def test_each_row_is_quantized_on_its_own_range(opset):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(K, N)).astype(np.float32)
    model = _matmul_model(w, opset)
    assert per_token_int8(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulIntegerToFloat" in ops and ops.count("MatMul") == 1  # the activation product stays float
    assert "w" not in {i.name for i in model.graph.initializer}  # the float weight is gone

    x = rng.normal(size=(3, 5, K)).astype(np.float32)
    x[0, 1] *= 1000.0  # one outlier token
    y = _run(model, x)
    # The error of each row is bounded by its own grid: |x| <= max|x_row| / 254 per element, weights per column.
    w_q, w_scale = quantize_columns(w)
    step = np.abs(x).max(-1, keepdims=True) / 254  # half the row's grid step
    bound = step * np.abs(w).sum(0) + np.abs(x).sum(-1, keepdims=True) * w_scale / 2 + step * K * w_scale / 2
    assert (np.abs(y - x @ w) <= bound * 1.01 + 1e-5).all()
    # ... and does not depend on the other rows of the batch, the outlier included: bit for bit.
    alone = _run(model, x[1:2, 2:3].copy())
    np.testing.assert_array_equal(alone[0, 0], y[1, 2])


def test_a_known_lower_bound_gives_unsigned_rows_and_is_added_back_exactly():
    rng = np.random.default_rng(1)
    # int8-exact weights (each column's largest is 127 steps): only the activations' grid differs
    w = (rng.integers(-127, 128, size=(K, N)) * 0.01).astype(np.float32)
    w[0] = 1.27
    gelu_like = np.maximum(rng.normal(size=(2, 6, K)), -0.17).astype(np.float32)
    signed, shifted = _matmul_model(w), _matmul_model(w)
    per_token_int8(signed)
    seen = []
    per_token_int8(shifted, lambda name: seen.append(name) or -0.17)
    assert seen == ["/model/mlp/MatMul"]
    assert "Sub" in [n.op_type for n in shifted.graph.node]
    exact = gelu_like @ w
    err_signed = np.abs(_run(signed, gelu_like) - exact).mean()
    err_shifted = np.abs(_run(shifted, gelu_like) - exact).mean()
    assert err_shifted < 0.65 * err_signed, (err_shifted, err_signed)  # about twice the resolution (measured 0.35x)
    assert err_shifted < 0.005 * np.abs(exact).mean()  # lo @ W added back: no offset left


def test_nothing_to_quantize():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    assert per_token_int8(model) == 0 and [n.op_type for n in model.graph.node] == ["Relu"]

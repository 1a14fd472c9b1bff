"""Per-token dynamic int8 for an ONNX graph: every ``MatMul`` by a constant weight becomes an int8 product
whose activation scale is computed at run time for each token (row) separately.

Per-tensor activation scales (static QDQ, or onnxruntime's ``quantize_dynamic``) give all tokens of a batch
one scale, so a token with large activations ([CLS], punctuation, a few outlier channels) costs every other
token its resolution, and the result depends on what else is in the batch. Per token, each row of ``X`` uses
its own full int8 range (what CTranslate2 does); the weights are int8 per output column. Nothing is
calibrated, so an embedding does not depend on its batch.

onnxruntime has no int8 product with per-row activation scales, so each one is written as::

    s   = max(ReduceMax(|x|, axis=-1), eps)                    # (..., 1): the row's largest magnitude
    x_q = QuantizeLinear(x / s, 1/127, zero point 128)         # uint8 1..255 for [-1, 1]: every row, full range
    y   = MatMulIntegerToFloat(x_q, W_q, 1/127, w_scale) * s  # com.microsoft: u8s8 GEMM (VNNI / AVX2) + scale

``x / s`` lies in [-1, 1] on every row, so one fixed scale quantizes every row over its own range: no
statistic is taken over the batch, and a row's result does not depend on the other rows. uint8 activations
times int8 weights is the product the x86 int8 instructions (AVX2 ``vpmaddubsw``, AVX512/AVX-VNNI
``vpdpbusd``, AMX) compute natively; onnxruntime picks the kernel for the CPU it runs on.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

EPS = 1e-12


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K, N)`` float weight -> (int8 weight, float32 scale per column), symmetric: ``W ~= W_q * scale``."""
    scale = np.maximum(np.abs(weight).max(axis=0), EPS) / 127.0
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def per_token_int8(model, lower_bounds: Callable[[str], np.ndarray | None] | None = None) -> int:
    """Rewrites (in place) every ``MatMul`` of ``model`` (an ``onnx.ModelProto``) whose second input is a 2-D
    initializer; returns how many. Products of two activations (attention scores) stay in float.

    ``lower_bounds(node_name)`` may return a known lower bound ``lo`` (per input channel, or a scalar) of a
    product's input, e.g. after GELU (>= -0.17): that row is then shifted to ``x - lo >= 0`` and quantized over
    [0, max] in uint8 (0..255, twice the resolution of the signed grid); ``lo @ W`` is added back exactly.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 17)
    nodes, count = [], 0

    def constant(array, name):
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def row_max(x, out):  # opset 18 made ReduceMax's axes an input
        if opset < 18:
            return helper.make_node("ReduceMax", [x], [out], axes=[-1], keepdims=1)
        return helper.make_node("ReduceMax", [x, "per_token_axes"], [out], keepdims=1)

    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        w_q, w_scale = quantize_columns(w)
        p = f"per_token_{count}_"
        count += 1
        constant(w_q, p + "w_q")
        constant(w_scale, p + "w_scale")
        x, out = node.input[0], node.output[0]
        lo = lower_bounds(node.name) if lower_bounds is not None else None
        if lo is None:  # signed: x / max|x| in [-1, 1] -> uint8 1..255 around 128
            unit, zero = "per_token_unit", "per_token_zero"
            nodes += [helper.make_node("Abs", [x], [p + "abs"]), row_max(p + "abs", p + "amax")]
        else:  # shifted: (x - lo) / max(x - lo) in [0, 1] -> uint8 0..255
            unit, zero = "per_token_unit_u", "per_token_zero_u"
            lo = np.broadcast_to(np.asarray(lo, dtype=np.float32), (w.shape[0],))
            nodes += [helper.make_node("Sub", [x, constant(lo, p + "lo")], [p + "shifted"]),
                      row_max(p + "shifted", p + "amax")]
            x, out = p + "shifted", p + "unshifted"
        nodes += [helper.make_node("Max", [p + "amax", "per_token_eps"], [p + "s"]),
                  helper.make_node("Div", [x, p + "s"], [p + "x"]),
                  helper.make_node("QuantizeLinear", [p + "x", unit, zero], [p + "x_q"]),
                  helper.make_node("MatMulIntegerToFloat", [p + "x_q", p + "w_q", unit, p + "w_scale", zero],
                                   [p + "y"], domain="com.microsoft"),
                  helper.make_node("Mul", [p + "y", p + "s"], [out])]
        if lo is not None:  # (x - lo) @ W + lo @ W, the second term in float
            nodes.append(helper.make_node("Add", [out, constant(lo @ w, p + "lo_w")], [node.output[0]]))
    if not count:
        return 0
    constant(np.array(EPS, dtype=np.float32), "per_token_eps")
    constant(np.array(1 / 127, dtype=np.float32), "per_token_unit")
    constant(np.array(128, dtype=np.uint8), "per_token_zero")
    constant(np.array(1 / 255, dtype=np.float32), "per_token_unit_u")
    constant(np.array(0, dtype=np.uint8), "per_token_zero_u")
    constant(np.array([-1], dtype=np.int64), "per_token_axes")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]  # the float weights go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count

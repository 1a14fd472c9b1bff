"""The core's small objects: the two masks, norm slots, declared quantizer hook points, needs_padded_layout."""

import pytest
import torch
from torch import nn

import bertkit
from bertkit.nn.attention import MATMUL_QUANTIZERS, BertSelfAttention
from bertkit.nn.layer import ADD_QUANTIZERS, BertSelfOutput
from bertkit.nn.masks import AttentionMask, build_attention_mask
from bertkit.nn.padding import PackedBatch
from bertkit.quant import calibrate, disable_quantization, quantize
from test_quant_model import inputs, tiny

MASK = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 6 + [0] * 3, [1] + [0] * 8])


def test_packed_batch_from_lengths_equals_from_mask():
    a = PackedBatch.from_lengths([9, 4, 6, 1], torch.float16)
    b = PackedBatch.from_mask(MASK, torch.float16)
    for field in ("indices", "cu_seqlens", "key_mask", "gather", "positions"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.max_len, a.span, a.batch, a.length) == (b.max_len, b.span, b.batch, b.length)
    with pytest.raises(ValueError, match="positive token counts"):
        PackedBatch.from_lengths([3, 0], torch.float32)


def test_attention_mask_is_the_built_tensors():
    mask = torch.ones(2, 5, 5, dtype=torch.long).tril()
    mask[1, 2] = 0  # a query row with no key
    bias, row_keep = build_attention_mask(mask, 2, 5, 5, torch.float32, torch.device("cpu"))
    built = AttentionMask.build(mask, 2, 5, 5, torch.float32, torch.device("cpu"))
    assert torch.equal(built.bias, bias) and torch.equal(built.row_keep, row_keep)
    assert AttentionMask.build(torch.ones(2, 5), 2, 5, 5, torch.float32, torch.device("cpu")) == AttentionMask()
    rel = torch.randn(1, 1, 5, 5)
    assert torch.equal(built.plus(rel).bias, rel + bias) and built.plus(rel).row_keep is built.row_keep


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_norm_slots_are_identity_where_the_variant_has_no_norm(norm):
    model = tiny(norm_placement=norm)
    layer = model.encoder.layer[0]
    slots = {"embeddings.LayerNorm": model.embeddings.LayerNorm, "attention.ln": layer.attention.ln,
             "attention.output.LayerNorm": layer.attention.output.LayerNorm, "ln": layer.ln,
             "output.LayerNorm": layer.output.LayerNorm, "encoder.ln": model.encoder.ln}
    pre = {"attention.ln", "ln", "encoder.ln"}
    for name, module in slots.items():
        has_norm = (name in pre) == (norm == "pre")
        assert isinstance(module, nn.LayerNorm if has_norm else nn.Identity), name
    # Identity slots hold no state: the state dict has exactly the variant's HF names.
    keys = set(model.state_dict())
    assert ("encoder.layer.0.attention.ln.weight" in keys) == (norm == "pre")
    assert ("encoder.layer.0.attention.output.LayerNorm.weight" in keys) == (norm == "post")


def test_hook_points_are_declared_by_the_core_and_filled_by_quantize():
    assert BertSelfAttention.quantizer_hooks == MATMUL_QUANTIZERS
    assert BertSelfOutput.quantizer_hooks == ADD_QUANTIZERS
    model = quantize(tiny())
    layer = model.encoder.layer[0]
    assert all(hasattr(layer.attention.self, n) for n in MATMUL_QUANTIZERS)
    assert all(hasattr(block, n) for block in (layer.attention.output, layer.output) for n in ADD_QUANTIZERS)


def test_needs_padded_layout():
    assert not tiny().encoder.needs_padded_layout
    assert tiny(position_embedding_type="relative_key").encoder.needs_padded_layout
    assert tiny(attn_implementation="eager").encoder.needs_padded_layout
    model = tiny()
    model.encoder.layer[1].attention.self.save_attention = True
    assert model.encoder.needs_padded_layout
    model = quantize(tiny())
    with calibrate(model):
        model(**inputs())
    assert model.encoder.needs_padded_layout  # enabled matmul quantizers quantize the probabilities
    assert not disable_quantization(model).encoder.needs_padded_layout
    pruned = tiny()
    pruned.prune_heads({0: [0, 1, 2, 3]})
    assert pruned.encoder.needs_padded_layout
    # A layer given a bare additive mask (as BLIP code builds them) gets the same result as the mask object.
    model, batch = tiny(bertkit.BertModel), inputs()
    h = model.embeddings(batch["input_ids"])
    bias, _ = build_attention_mask(batch["attention_mask"], 3, 11, 11, h.dtype, h.device)
    with torch.no_grad():
        a = model.encoder.layer[0](h, bias)[0]
        b = model.encoder.layer[0](h, attention_mask=AttentionMask(bias))[0]
    assert torch.equal(a, b)

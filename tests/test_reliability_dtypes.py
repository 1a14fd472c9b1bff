"""Reliability: fp32, fp16 and bf16 forward on CPU for every variant, with padding, a fully masked row and a
cross-attention mask that masks everything: never NaN/Inf, and half precision stays close to fp32.

Tolerances (max |half - fp32| over all outputs, relative to max |fp32|): fp16 2e-2, bf16 5e-2. The
hidden states are LayerNorm outputs of size ~1, and bf16 keeps 8 bits of mantissa (~4e-3 per rounding),
accumulated over two layers."""

import pytest
import torch

import bertkit

BASE = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VARIANTS = {
    "bert_post_norm": dict(),
    "megatron_pre_norm": dict(norm_placement="pre"),
    "blip_cross_attention": dict(add_cross_attention=True, encoder_width=12),  # encoder_width != hidden_size
    "relative_key_query": dict(position_embedding_type="relative_key_query"),
    "decoder_with_cache": dict(is_decoder=True, add_cross_attention=True, encoder_width=12),
}
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])  # padding, fully masked row


def _run(model, dtype, variant, impl):
    model.config.attn_implementation = impl
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, MASK.shape, generator=g)
    kw = {}
    if "encoder_width" in VARIANTS[variant]:
        kw["encoder_hidden_states"] = torch.randn(3, 5, 12, generator=g).to(dtype)
        kw["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    outs = []
    with torch.no_grad():
        out = model(ids, MASK, **kw, use_cache=variant == "decoder_with_cache")
        outs += [out.last_hidden_state, out.pooler_output]
        if variant == "decoder_with_cache":  # one cached step, then a cross-attention mask hiding everything
            step = model(torch.randint(0, 40, (3, 1), generator=g), torch.cat([MASK, torch.ones(3, 1)], 1).long(),
                         past_key_values=out.past_key_values, **kw)
            outs.append(step.last_hidden_state)
        if "encoder_width" in VARIANTS[variant]:
            kw["encoder_attention_mask"] = torch.zeros(3, 5, dtype=torch.long)
            outs.append(model(ids, MASK, **kw).last_hidden_state)
    return [o.float() for o in outs]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_dtype_is_finite_and_close_to_fp32(variant):
    torch.manual_seed(0)
    model = bertkit.BertModel(bertkit.BertConfig(**BASE, **VARIANTS[variant])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for impl in ("sdpa", "eager"):
        reference = _run(model, torch.float32, variant, impl)
        assert all(torch.isfinite(r).all() for r in reference), (variant, impl)
        for dtype, tol in TOLERANCE.items():
            half = _run(model.to(dtype), dtype, variant, impl)
            model.float()
            for i, (h, r) in enumerate(zip(half, reference, strict=True)):
                assert torch.isfinite(h).all(), (variant, impl, dtype, i)
                err = (h - r).abs().max() / r.abs().max().clamp(min=1e-6)
                assert err < tol, (variant, impl, dtype, i, float(err))

"""CPU inference fusions (bertkit.nn.fusion): oneDNN Linear + GELU / + residual and the stacked q/k/v GEMM give
the unfused numbers, are used only where exact, and never hide a change of weights or a hook."""

import pytest
import torch

from bertkit import BertConfig, BertModel
from bertkit.nn import fusion

pytestmark = pytest.mark.skipif(not fusion._kernel(), reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def small_batches_fused(monkeypatch):
    monkeypatch.setattr(fusion, "MIN_ROWS", 0)  # the test models are tiny; test_small_forwards_run_unfused sets its own


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused kernel's calls (plain and binary)."""
    kernel = fusion._kernel()
    count = {"n": 0}

    class Counting:
        def __call__(self, *args):
            count["n"] += 1
            return kernel(*args)

        def binary(self, *args):
            count["n"] += 1
            return kernel.binary(*args)

    monkeypatch.setitem(fusion._state, "kernel", Counting())
    return count


def _model(**overrides):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, **overrides)
    return BertModel(config, add_pooling_layer=False).eval()


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 120, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu_new"}, {"norm_placement": "pre"}])
@pytest.mark.parametrize("unpad", [True, False])
def test_fused_equals_unfused(overrides, unpad, calls):
    model, (ids, mask) = _model(**overrides), _inputs()
    with torch.inference_mode():
        with fusion.enabled(False):
            ref = model(ids, attention_mask=mask, unpad=unpad).last_hidden_state
        assert calls["n"] == 0
        out = model(ids, attention_mask=mask, unpad=unpad).last_hidden_state
    # per layer: q/k/v, attention output + residual, MLP in + GELU, MLP out + residual
    assert calls["n"] == 2 * 4
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_not_used_with_autograd_or_in_training(calls):
    model, (ids, mask) = _model(), _inputs()
    model(ids, attention_mask=mask)  # grad enabled
    with torch.no_grad():
        model.train()
        model(ids, attention_mask=mask)
    assert calls["n"] == 0
    with torch.no_grad():
        model.eval()
        model(ids, attention_mask=mask)
    assert calls["n"] == 8


def test_stacked_qkv_follows_weight_changes():
    model, (ids, mask) = _model(), _inputs()
    with torch.inference_mode():
        model(ids, attention_mask=mask)  # builds the stacked weights
    with torch.no_grad():
        model.encoder.layer[0].attention.self.key.weight.mul_(1.5)  # in place, same storage
        model.encoder.layer[1].attention.self.value.bias.add_(0.3)
    with torch.inference_mode():
        out = model(ids, attention_mask=mask).last_hidden_state
        with fusion.enabled(False):
            ref = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hooked_linears_still_run_their_hooks(calls):
    model, (ids, mask) = _model(), _inputs()
    seen = []
    handle = model.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        model(ids, attention_mask=mask)
    handle.remove()
    assert len(seen) == 1
    assert calls["n"] == 8 - 1  # layer 0's q/k/v run unfused; everything else stays fused


def test_bfloat16_close_to_float32():
    model, (ids, mask) = _model(), _inputs()
    with torch.inference_mode():
        ref = model(ids, attention_mask=mask).last_hidden_state
        out = model.to(torch.bfloat16)(ids, attention_mask=mask).last_hidden_state.float()
    keep = mask.bool()
    cos = torch.nn.functional.cosine_similarity(out[keep], ref[keep], dim=-1)
    assert cos.min() > 0.999


def test_small_forwards_run_unfused(calls, monkeypatch):
    # oneDNN builds a primitive per new row count; below MIN_ROWS rows a forward runs unfused, decided on the
    # shape alone so the same input always gives the same bits.
    model = _model()
    monkeypatch.setattr(fusion, "MIN_ROWS", 40)
    with torch.inference_mode():
        model(torch.randint(1, 120, (3, 13)))  # 39 rows
        assert calls["n"] == 0
        model(torch.randint(1, 120, (2, 20)))  # 40 rows
        assert calls["n"] == 8
        model(torch.randint(1, 120, (3, 13)))
        assert calls["n"] == 8

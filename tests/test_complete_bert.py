"""Decoder cache, memory tools, helper API and their error messages (issue: the complete BERT)."""

import warnings

import pytest
import torch
import transformers

import bertkit
from bertkit import utils

CFG = dict(vocab_size=29, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
           max_position_embeddings=20)


def decoder(pos="absolute", cross=True, **kw):
    torch.manual_seed(0)
    cfg = bertkit.BertConfig(**CFG, position_embedding_type=pos, is_decoder=True, add_cross_attention=cross, **kw)
    model = bertkit.BertLMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("pos", ["absolute", "relative_key", "relative_key_query"])
def test_incremental_decoding_equals_full_forward(pos):
    model = decoder(pos)
    ids = torch.randint(0, 29, (2, 7))
    enc = torch.randn(2, 5, 12)
    enc_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        full = model(ids, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).logits
        out = model(ids[:, :2], encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=True)
        steps = [out.logits]
        for t in range(2, 7):
            out = model(ids[:, t:t + 1], encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                        past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    layer_cache = out.past_key_values[0]
    assert len(layer_cache) == 4  # self key, self value, cross key, cross value
    assert layer_cache[0].shape == (2, 3, 7, 4) and layer_cache[2].shape == (2, 3, 5, 4)


def test_cross_attention_keys_values_computed_once_per_sequence():
    model = decoder()
    calls = []
    for layer in model.bert.encoder.layer:
        layer.crossattention.self.key.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 29, (1, 4))
    enc = torch.randn(1, 5, 12)
    with torch.no_grad():
        out = model(ids[:, :1], encoder_hidden_states=enc, use_cache=True)
        for t in range(1, 4):
            out = model(ids[:, t:t + 1], encoder_hidden_states=enc, past_key_values=out.past_key_values,
                        use_cache=True)
    assert len(calls) == CFG["num_hidden_layers"]  # the first step only


def test_cached_decoding_matches_transformers_5(tmp_path):
    cfg = transformers.BertConfig(**CFG, is_decoder=True, add_cross_attention=True)
    torch.manual_seed(1)
    ref = transformers.BertLMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = bertkit.BertLMHeadModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 29, (2, 5))
    enc = torch.randn(2, 4, 12)
    with torch.no_grad():
        a = ours(ids[:, :3], encoder_hidden_states=enc, use_cache=True)
        b = ref(ids[:, :3], encoder_hidden_states=enc, use_cache=True)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        a = ours(ids[:, 3:4], encoder_hidden_states=enc, past_key_values=a.past_key_values, use_cache=True)
        b = ref(ids[:, 3:4], encoder_hidden_states=enc, past_key_values=b.past_key_values, use_cache=True)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_decoder_3d_mask_is_taken_as_given():
    # One layer, so the last position's output depends only on the (identical) embeddings of the others.
    model = bertkit.BertLMHeadModel(bertkit.BertConfig(**dict(CFG, num_hidden_layers=1), is_decoder=True)).eval()
    ids = torch.randint(0, 29, (1, 4))
    bidirectional = torch.ones(1, 4, 4, dtype=torch.long)
    with torch.no_grad():
        a = model(ids, attention_mask=bidirectional).logits
        b = model(ids).logits  # causal
    assert not torch.allclose(a[:, 0], b[:, 0])  # with a full 3-D mask, position 0 sees the future
    torch.testing.assert_close(a[:, -1], b[:, -1], rtol=1e-5, atol=1e-5)  # the last position sees all either way


@pytest.mark.parametrize("pos", ["absolute", "relative_key_query"])
def test_gradient_checkpointing_gives_the_same_gradients(pos):
    torch.manual_seed(0)
    cfg = bertkit.BertConfig(**CFG, position_embedding_type=pos, hidden_dropout_prob=0.1)
    model = bertkit.BertForMaskedLM(cfg).train()
    ids = torch.randint(0, 29, (2, 6))

    def grads():
        model.zero_grad()
        torch.manual_seed(5)  # same dropout masks in both runs
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_with_frozen_embeddings_and_cache_warning():
    model = decoder(cross=False)
    model.train()
    model.gradient_checkpointing_enable()
    model.bert.embeddings.requires_grad_(False)
    ids = torch.randint(0, 29, (2, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, labels=ids, use_cache=True)
        out2 = model.bert(ids, use_cache=True)
    assert out2.past_key_values is None
    assert sum("gradient checkpointing" in str(w.message) for w in caught) == 1  # once per forward, not per layer
    out.loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert model.bert.embeddings.word_embeddings.weight.grad is None


def test_chunked_feed_forward_equals_unchunked():
    torch.manual_seed(0)
    model = bertkit.BertModel(bertkit.BertConfig(**CFG)).eval()
    ids = torch.randint(0, 29, (2, 9))
    with torch.no_grad():
        plain = model(ids).last_hidden_state
        model.config.chunk_size_feed_forward = 2
        chunked = model(ids).last_hidden_state
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def test_bad_head_mask_prune_and_encoder_width():
    model = decoder()
    ids = torch.randint(0, 29, (1, 3))
    with pytest.raises(ValueError, match=r"head_mask has shape \(4,\); use \(3,\) or \(2, 3\)"):
        model(ids, head_mask=torch.ones(4))
    with pytest.raises(ValueError, match=r"head_mask has shape \(3, 3\)"):
        model(ids, head_mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"cannot prune heads \[3\]: the layer has heads 0..2"):
        model.prune_heads({0: [3]})
    with pytest.raises(ValueError, match=r"cannot prune layer 5"):
        model.prune_heads({5: [0]})
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(1, 4, 7\) but cross-attention "
                                         r"expects \(batch, seq_len, 12\)"):
        model(ids, encoder_hidden_states=torch.randn(1, 4, 7))


def test_encoder_width_for_cross_attention():
    cfg = bertkit.BertConfig(**CFG, add_cross_attention=True, encoder_width=7)
    model = bertkit.BertModel(cfg).eval()
    assert model.encoder.layer[0].crossattention.self.key.in_features == 7
    out = model(torch.randint(0, 29, (2, 3)), encoder_hidden_states=torch.randn(2, 4, 7))
    assert out.last_hidden_state.shape == (2, 3, 12)


# ----------------------------------------------------------------------------- helper API
def test_get_extended_attention_mask_by_hand():
    m = torch.tensor([[1, 1, 0]])
    lo = torch.finfo(torch.float32).min
    enc = utils.get_extended_attention_mask(m, (1, 3))
    torch.testing.assert_close(enc, torch.tensor([[[[0.0, 0.0, lo]]]]))
    dec = utils.get_extended_attention_mask(m, (1, 3), is_decoder=True)
    expected = torch.tensor([[0, lo, lo], [0, 0, lo], [0, 0, lo]]).view(1, 1, 3, 3)
    torch.testing.assert_close(dec, expected)
    # A cached prefix of 2 keys: the one new query sees everything unmasked.
    step = utils.get_extended_attention_mask(torch.ones(1, 3), (1, 1), is_decoder=True)
    torch.testing.assert_close(step, torch.zeros(1, 1, 1, 3))
    inv = utils.invert_attention_mask(torch.tensor([[0, 1]]), dtype=torch.float16)
    assert inv.dtype == torch.float16 and inv[0, 0, 0, 0] == torch.finfo(torch.float16).min and inv[0, 0, 0, 1] == 0


def test_head_mask_chunking_and_pruning_helpers():
    hm = utils.get_head_mask(torch.tensor([1.0, 0.0, 1.0]), 2)
    assert hm.shape == (2, 1, 3, 1, 1) and hm[1, 0, 1, 0, 0] == 0
    assert utils.get_head_mask(None, 4) == [None] * 4
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(utils.apply_chunking_to_forward(lambda t: t * 2 + 1, 2, 1, x), x * 2 + 1)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        utils.apply_chunking_to_forward(lambda t: t, 4, 1, x)
    heads, index = utils.find_pruneable_heads_and_indices([0, 2], n_heads=3, head_size=2, already_pruned_heads=set())
    assert heads == {0, 2} and index.tolist() == [2, 3]
    # Head 3 of 4 after head 1 was pruned sits at position 2 now.
    heads, index = utils.find_pruneable_heads_and_indices([3, 1], n_heads=3, head_size=1, already_pruned_heads={1})
    assert heads == {3} and index.tolist() == [0, 1]
    lin = torch.nn.Linear(4, 6)
    keep = torch.tensor([0, 5])
    out_pruned = utils.prune_linear_layer(lin, keep)
    in_pruned = utils.prune_linear_layer(lin, torch.tensor([1, 3]), dim=1)
    x = torch.randn(2, 4)
    torch.testing.assert_close(out_pruned(x), lin(x)[:, keep])
    torch.testing.assert_close(in_pruned(x[:, [1, 3]]), x[:, [1, 3]] @ lin.weight[:, [1, 3]].T + lin.bias)

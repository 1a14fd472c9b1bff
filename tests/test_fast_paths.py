"""Fast paths against transformers: sparse MLM prediction (the vocabulary projection only at labelled
positions) and the fused QKV projection give transformers' outputs, losses and gradients."""

import pytest
import torch
import transformers

import bertkit

CFG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
           max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _pair(name, tmp_path):
    torch.manual_seed(0)
    ref = getattr(transformers, name)(transformers.BertConfig(**CFG)).eval()
    ref.save_pretrained(tmp_path)
    return ref, getattr(bertkit, name).from_pretrained(tmp_path).eval()


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.full_like(ids, -100)
    picks = torch.rand(ids.shape) < 0.3
    picks[0, 2] = True
    labels[picks] = ids[picks]
    labels[mask == 0] = -100
    return ids, mask, labels


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_sparse_prediction_matches_transformers_dense_loss_logits_and_grads(name, tmp_path):
    ref, ours = _pair(name, tmp_path)
    ids, mask, labels = _inputs()
    extra = {"next_sentence_label": torch.tensor([0, 1, 0])} if name == "BertForPreTraining" else {}
    expected = ref(ids, mask, labels=labels, **extra)
    ref_logits = expected.logits if name == "BertForMaskedLM" else expected.prediction_logits
    expected.loss.backward()
    keep = labels != -100
    sparse = ours(ids, mask, labels=labels, sparse_prediction=True, **extra)
    got_logits = sparse.logits if name == "BertForMaskedLM" else sparse.prediction_logits
    assert got_logits.shape == (int(keep.sum()), 50)
    torch.testing.assert_close(got_logits, ref_logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.loss, expected.loss, rtol=1e-5, atol=1e-6)
    sparse.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[key].grad, rtol=1e-4, atol=1e-6, msg=key)
    # The config switch does the same; without labels the logits stay dense.
    ours.config.sparse_prediction = True
    torch.testing.assert_close(ours(ids, mask, labels=labels, **extra).loss, expected.loss, rtol=1e-5, atol=1e-6)
    dense = ours(ids, mask).logits if name == "BertForMaskedLM" else ours(ids, mask).prediction_logits
    assert dense.shape == (3, 10, 50)
    assert "sparse_prediction" not in ours.config.to_dict()  # a run-time choice, not saved


@pytest.mark.parametrize("unpad", [False, True])
def test_fused_qkv_matches_transformers_outputs_cache_and_grads(unpad, tmp_path):
    torch.manual_seed(0)
    ref = transformers.BertLMHeadModel(transformers.BertConfig(**CFG, is_decoder=True)).eval()
    ref.save_pretrained(tmp_path)
    ours = bertkit.BertLMHeadModel.from_pretrained(tmp_path, fused_qkv=True).eval()
    assert ours.config.fused_qkv
    ids, mask, _ = _inputs()
    expected = ref(ids, mask, labels=ids)
    expected.loss.backward()
    got = ours(ids, mask, labels=ids)
    torch.testing.assert_close(got.logits[mask.bool()], expected.logits[mask.bool()], rtol=1e-5, atol=1e-5)
    got.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for key in ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.self.key.bias",
                "bert.encoder.layer.1.attention.self.value.weight"):
        torch.testing.assert_close(dict(ours.named_parameters())[key].grad, ref_grads[key].grad,
                                   rtol=1e-4, atol=1e-6, msg=key)
    # Bidirectional encoder, padded or padding-free, and an incremental decode with the KV cache.
    encoder = bertkit.BertModel.from_pretrained(tmp_path, fused_qkv=True, add_pooling_layer=False).eval()
    with torch.no_grad():
        full = ref.bert(ids[:1, :6]).last_hidden_state
        step = encoder(ids[:1, :5], use_cache=True, is_decoder=True)
        nxt = encoder(ids[:1, 5:6], past_key_values=step.past_key_values, is_decoder=True).last_hidden_state
        torch.testing.assert_close(nxt, full[:, 5:], rtol=1e-5, atol=1e-5)
        ref_enc = transformers.BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
        keep = mask.bool()
        torch.testing.assert_close(encoder(ids, mask, unpad=unpad).last_hidden_state[keep],
                                   ref_enc(ids, mask).last_hidden_state[keep], rtol=1e-5, atol=1e-5)

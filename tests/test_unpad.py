"""Padding-free execution: exact pad/unpad round trips, and unpadded == padded for every variant."""

import pytest
import torch

import bertkit
from bertkit.nn.padding import PackedBatch, pad, unpad, unpad_indices

CFG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
           max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MASK = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 6 + [0] * 3, [1] + [0] * 8])


def test_pad_unpad_round_trip_is_exact():
    x = torch.randn(4, 9, 3, 2)
    indices, cu, max_len = unpad_indices(MASK)
    packed = unpad(x, indices)
    assert packed.shape == (20, 3, 2) and cu.tolist() == [0, 9, 13, 19, 20] and max_len == 9
    back = pad(packed, indices, 4, 9)
    assert torch.equal(back[MASK.bool()], x[MASK.bool()]) and not back[~MASK.bool()].any()
    assert torch.equal(unpad(back, indices), packed)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    batch = PackedBatch.from_mask(left, torch.float32)
    assert batch.span == 4  # left padding: attention must cover the whole length
    assert PackedBatch.from_mask(MASK[1:3, :7], torch.float32).span == 6


def _model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(bertkit.BertConfig(**CFG, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_unpadded_equals_padded(norm):
    model = _model(bertkit.BertModel, norm_placement=norm)
    ids = torch.randint(0, 40, MASK.shape)
    types = torch.randint(0, 2, MASK.shape)
    keep = MASK.bool()
    with torch.no_grad():
        a = model(ids, MASK, types, output_hidden_states=True)
        b = model(ids, MASK, types, output_hidden_states=True, unpad=True)
    torch.testing.assert_close(b.last_hidden_state[keep], a.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=1e-5, atol=1e-5)
    for x, y in zip(b.hidden_states, a.hidden_states, strict=True):
        torch.testing.assert_close(x[keep], y[keep], rtol=1e-5, atol=1e-5)
    assert not b.last_hidden_state[~keep].any()  # padded positions are zeros, not computed


def test_left_padding_and_task_head_via_config():
    model = _model(bertkit.BertForTokenClassification, num_labels=3)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = torch.randint(0, 40, left.shape)
    with torch.no_grad():
        a = model(ids, left).logits
        model.config.unpad_inputs = True
        b = model(ids, left).logits
    torch.testing.assert_close(b[left.bool()], a[left.bool()], rtol=1e-5, atol=1e-5)


def test_training_gradients_match():
    model = _model(bertkit.BertForSequenceClassification, num_labels=2).train()
    ids = torch.randint(0, 40, MASK.shape)
    labels = torch.tensor([0, 1, 1, 0])

    def grads(unpadded):
        model.zero_grad()
        model.config.unpad_inputs = unpadded
        model(ids, MASK, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, packed = grads(False), grads(True)
    assert plain.keys() == packed.keys()
    for name in plain:
        torch.testing.assert_close(packed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kw", [dict(position_embedding_type="relative_key"), dict(is_decoder=True)])
def test_what_needs_padding_falls_back(kw):
    model = _model(bertkit.BertModel, **kw)
    ids = torch.randint(0, 40, MASK.shape)
    with torch.no_grad():
        a = model(ids, MASK).last_hidden_state
        b = model(ids, MASK, unpad=True).last_hidden_state
    assert torch.equal(a, b)  # the padded path ran: pad positions computed, identical bits
    assert b[~MASK.bool()].abs().sum() > 0


HEADS = ["BertForMaskedLM", "BertForPreTraining", "BertForNextSentencePrediction", "BertForSequenceClassification",
         "BertForMultipleChoice", "BertForTokenClassification", "BertForQuestionAnswering", "BertLMHeadModel"]


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("head", HEADS)
def test_every_head_unpadded_equals_padded(head, norm):
    model = _model(getattr(bertkit, head), norm_placement=norm, num_labels=2 if head == "BertForQuestionAnswering" else 3)
    ids = torch.randint(0, 40, MASK.shape)
    mask = MASK
    if head == "BertForMultipleChoice":  # (batch, choices, length)
        ids, mask = ids.view(2, 2, 9), MASK.view(2, 2, 9)
    keep = mask.bool()
    with torch.no_grad():
        model.config.unpad_inputs = False
        a = model(ids, mask)
        model.config.unpad_inputs = True
        b = model(ids, mask)
    compared = 0
    for x, y in zip(b.to_tuple(), a.to_tuple(), strict=True):
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape[:keep.dim()] == keep.shape:  # per-token outputs: the real tokens
            x, y = x[keep], y[keep]
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        compared += 1
    assert compared >= 1


def test_cross_attention_encoder_unpadded_equals_padded():
    # BLIP's image-grounded text encoder: bidirectional self-attention plus cross-attention to image features.
    model = _model(bertkit.BertModel, add_cross_attention=True)
    ids = torch.randint(0, 40, MASK.shape)
    image = torch.randn(4, 5, 16)
    image_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] * 4 + [0]])
    keep = MASK.bool()
    with torch.no_grad():
        a = model(ids, MASK, encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state
        b = model(ids, MASK, encoder_hidden_states=image, encoder_attention_mask=image_mask,
                  unpad=True).last_hidden_state
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-5)

"""Packed-first inference: BertModel.forward_packed on concatenated token lists equals the padded forward, and
SentenceEncoder takes that path (no padded tensor) where the layers allow it."""

import pytest
import torch

from bertkit import BertConfig, BertModel, SentenceEncoder
from bertkit.nn import padding

LENGTHS = [11, 7, 7, 3, 1]


def _model(**overrides):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=80, max_position_embeddings=32, **overrides)
    return BertModel(config, add_pooling_layer=False).eval()


def _padded(lengths):
    torch.manual_seed(2)
    ids = torch.randint(1, 99, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("overrides", [{}, {"norm_placement": "pre"}])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_packed_equals_padded_forward(overrides, grad):
    model = _model(**overrides)
    ids, mask = _padded(LENGTHS)
    keep = mask.bool()
    types = torch.randint(0, 2, ids.shape) * mask
    with torch.set_grad_enabled(grad):  # with autograd on, the unfused kernels run: both paths checked
        ref = model(ids, attention_mask=mask, token_type_ids=types, unpad=False).last_hidden_state
        out = model.forward_packed(ids[keep], LENGTHS, token_type_ids=types[keep])
    assert out.shape == (sum(LENGTHS), 48)
    torch.testing.assert_close(out, ref[keep], atol=1e-5, rtol=1e-5)


def test_forward_packed_rejects_bad_input():
    model = _model()
    ids = torch.randint(1, 99, (10,))
    with pytest.raises(ValueError, match="1-D packed token ids"):
        model.forward_packed(ids.view(2, 5), [5, 5])
    with pytest.raises(ValueError, match="lengths sum to 9 but input_ids has 10 tokens"):
        model.forward_packed(ids, [4, 5])
    with pytest.raises(ValueError, match="positive token counts"):
        model.forward_packed(ids, [10, 0])
    with pytest.raises(ValueError, match="input_ids contains 99 but vocab_size is 99"):
        model.forward_packed(torch.tensor([1, 99, 3]), [3])
    with pytest.raises(ValueError, match="sequence length 40 exceeds max_position_embeddings=32"):
        model.forward_packed(torch.ones(40, dtype=torch.long), [40])
    with pytest.raises(ValueError, match="need the padded layout"):
        _model(position_embedding_type="relative_key").forward_packed(ids, [10])


def test_encoder_runs_packed_first_and_matches_the_padded_path(monkeypatch):
    encoder = SentenceEncoder.from_pretrained()
    texts = ["A short one.", "A somewhat longer sentence about packing tokens without padding.", "Mid length text.",
             "x", "Another sentence of a different length, to make the batch ragged."]
    seen = []
    original = padding.PackedBatch.from_lengths
    monkeypatch.setattr(padding.PackedBatch, "from_lengths",
                        classmethod(lambda cls, lengths, *a, **k: seen.append(list(lengths)) or original(lengths, *a, **k)))
    packed = encoder.encode(texts, batch_size=4)
    assert seen and sorted(n for batch in seen for n in batch) == sorted(
        len(ids) for ids in encoder.tokenizer(texts, padding=False, truncation=True, max_length=256, return_tensors=None)["input_ids"])
    seen.clear()
    encoder.unpad = False  # the padded reference path
    padded = encoder.encode(texts, batch_size=4)
    assert not seen
    assert abs(packed - padded).max() < 1e-5

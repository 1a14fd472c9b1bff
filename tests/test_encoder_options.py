"""SentenceEncoder options: padding-free default, token-budget batches, int8; same embeddings either way."""

import numpy as np
import pytest

import bertkit

TEXTS = ["short", "a somewhat longer sentence about gardening and tomatoes",
         "word " * 200, "", "Caf\u00e9 au lait, s'il vous pla\u00eet", "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059",
         "The committee will meet on Thursday to review the proposal."] * 3


@pytest.fixture(scope="module")
def encoder():
    return bertkit.SentenceEncoder.from_pretrained()


def test_unpadded_and_padded_agree(encoder):
    assert encoder.unpad  # the default
    fast = encoder.encode(TEXTS, batch_size=8)
    encoder.unpad = False
    try:
        slow = encoder.encode(TEXTS, batch_size=8)
    finally:
        encoder.unpad = True
    np.testing.assert_allclose(fast, slow, atol=1e-5, rtol=0)


def test_token_budget_batches(encoder):
    order = np.argsort(-np.array([50, 40, 30, 10, 10, 5]), kind="stable")
    lengths = np.array([50, 40, 30, 10, 10, 5])
    encoder.max_batch_tokens = 100
    try:
        batches = [b.tolist() for b in encoder._batches(order, lengths, batch_size=4)]
        assert batches == [[0, 1], [2, 3, 4], [5]]  # 2x50, 3x30, then 1x5 (batch_size still caps at 4)
        encoder.max_batch_tokens = 10  # a text longer than the budget still gets a batch of its own
        assert [len(b) for b in encoder._batches(order, lengths, 4)][:3] == [1, 1, 1]
        encoder.max_batch_tokens = 64
        budgeted = encoder.encode(TEXTS, batch_size=32)
    finally:
        encoder.max_batch_tokens = None
    np.testing.assert_allclose(budgeted, encoder.encode(TEXTS, batch_size=32), atol=1e-5, rtol=0)


def test_int8_encoder_keeps_cosine(encoder):
    # Natural sentences; the default calibration set is small and generic (the 200-text accuracy check with
    # proper calibration is in test_quant_int8.py). A 200-times repeated word drops to ~0.94 here.
    natural = [t for t in TEXTS if t and not t.startswith("word")]
    int8 = bertkit.SentenceEncoder.from_pretrained(quantize="int8")
    a, b = encoder.encode(natural), int8.encode(natural)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.98 and cosine.mean() >= 0.99, cosine
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        bertkit.SentenceEncoder.from_pretrained(quantize="int4")

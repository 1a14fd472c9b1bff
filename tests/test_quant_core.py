"""TensorQuantizer arithmetic, straight-through gradients and the calibrators, against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from bertkit.quant import FakeQuantFunction, HistogramCalibrator, MaxCalibrator, TensorQuantizer, fake_quant
from bertkit.quant.calib import entropy_amax, reduce_amax


# ------------------------------------------------------------------ fake quantization
def test_signed_narrow_rounds_half_to_even_and_clips():
    # amax = 127 makes the scale 1, so the expected values are the integer grid itself.
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.4, 126.6, 130.0, -130.0])
    out = fake_quant(x, torch.tensor(127.0))
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 3.0, 127.0, 127.0, -127.0]


def test_full_range_reaches_minus_128():
    x = torch.tensor([-130.0, -127.6, 130.0])
    assert fake_quant(x, torch.tensor(127.0), narrow_range=False).tolist() == [-128.0, -128.0, 127.0]


def test_scale_is_max_bound_over_amax():
    # amax 1: scale 127; 0.3 * 127 = 38.1 -> 38 -> 38 / 127.
    out = fake_quant(torch.tensor([0.3, -0.3, 1.0]), torch.tensor(1.0))
    torch.testing.assert_close(out, torch.tensor([38 / 127, -38 / 127, 1.0]))


def test_unsigned_uses_0_to_255_and_rejects_negative_inputs():
    x = torch.tensor([0.5, 1.5, 254.5, 300.0])
    assert fake_quant(x, torch.tensor(255.0), unsigned=True).tolist() == [0.0, 2.0, 254.0, 255.0]
    q = TensorQuantizer(unsigned=True, amax=255.0)
    with pytest.raises(ValueError, match="unsigned"):
        q(torch.tensor([-1.0]))


def test_four_bits():
    x = torch.tensor([3.5, 4.5, 8.0, -8.0])
    assert fake_quant(x, torch.tensor(7.0), num_bits=4).tolist() == [4.0, 4.0, 7.0, -7.0]
    assert fake_quant(x, torch.tensor(7.0), num_bits=4, narrow_range=False).tolist() == [4.0, 4.0, 7.0, -8.0]


def test_per_channel_amax_broadcasts_along_axis_0():
    x = torch.tensor([[0.5, 1.0, 2.0], [0.5, 1.0, -3.0]])
    amax = torch.tensor([[1.0], [2.0]])  # scales 127 and 63.5
    expected = torch.tensor([[64 / 127, 1.0, 1.0], [32 / 63.5, 64 / 63.5, -2.0]])  # 63.5 -> 64 (half to even)
    torch.testing.assert_close(fake_quant(x, amax), expected)


def test_zero_amax_quantizes_to_zero():
    assert fake_quant(torch.tensor([1.0, -2.0]), torch.tensor(0.0)).tolist() == [0.0, 0.0]
    out = fake_quant(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [1.0]]))
    assert out.flatten().tolist() == [0.0, 1.0]


def test_half_inputs_are_quantized_in_float32():
    x = torch.tensor([300.0, -300.0], dtype=torch.float16)
    out = fake_quant(x, torch.tensor(400.0))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), fake_quant(x.float(), torch.tensor(400.0)), atol=0.5, rtol=0)


# ------------------------------------------------------------------ gradients
def test_ste_gradient_is_one_inside_and_zero_outside():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], requires_grad=True)
    FakeQuantFunction.apply(x, torch.tensor(1.0), 8, False, True).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_ste_per_channel():
    x = torch.tensor([[1.5, 0.5], [1.5, 0.5]], requires_grad=True)
    FakeQuantFunction.apply(x, torch.tensor([[1.0], [2.0]]), 8, False, True).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("value, expected", [
    (0.3, (38 - 38.1) / 127),  # inside: (round(u) - u) / max_bound, u = 0.3 * 127
    (5.0, 1.0),                # clipped at the top: the output is amax itself
    (-5.0, -1.0),              # clipped at -max_bound (narrow range)
])
def test_learned_amax_gets_the_lsq_gradient(value, expected):
    amax = torch.tensor(1.0, requires_grad=True)
    FakeQuantFunction.apply(torch.tensor([value]), amax, 8, False, True).sum().backward()
    assert amax.grad.item() == pytest.approx(expected, abs=1e-6)


def test_learned_amax_gradient_full_range_bottom_and_per_channel_shape():
    amax = torch.tensor([[1.0], [1.0]], requires_grad=True)
    x = torch.tensor([[-5.0, -5.0], [5.0, 0.0]])
    FakeQuantFunction.apply(x, amax, 8, False, False).sum().backward()
    assert amax.grad.shape == (2, 1)
    torch.testing.assert_close(amax.grad, torch.tensor([[-2 * 128 / 127], [1.0]]))


# ------------------------------------------------------------------ TensorQuantizer modes
def test_modes_and_is_enabled():
    q = TensorQuantizer()
    x = torch.randn(4, 5)
    assert q.is_enabled and q.amax is None
    with pytest.raises(RuntimeError, match="no amax"):
        q(x)
    q.enable_calib()
    q.disable_quant()
    assert q.is_enabled  # calibrating counts as enabled: the attention must take the explicit path
    assert torch.equal(q(x), x)
    q.load_calib_amax()
    assert q.amax.item() == x.abs().max().item() and q.amax.dim() == 0
    q.disable_calib()
    q.enable_quant()
    assert not torch.equal(q(x), x)
    q.disable()
    assert not q.is_enabled and q(x) is x
    q.enable()
    assert "_amax" in q.state_dict()


def test_load_calib_amax_without_data():
    q = TensorQuantizer()
    with pytest.raises(RuntimeError, match="enable_calib"):
        q.load_calib_amax()
    q.enable_calib()
    with pytest.raises(RuntimeError, match="saw no data"):
        q.load_calib_amax()
    assert q.load_calib_amax(strict=False) is None


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_bits"):
        TensorQuantizer(num_bits=0)
    with pytest.raises(ValueError, match="calib_method"):
        TensorQuantizer(calib_method="kl")
    with pytest.raises(ValueError, match="amax"):
        TensorQuantizer(amax=-1.0)


def test_histogram_quantizer_needs_a_method():
    q = TensorQuantizer(calib_method="histogram")
    q.enable_calib()
    q.disable_quant()
    q(torch.randn(1000))
    with pytest.raises(ValueError, match="percentile"):
        q.load_calib_amax()
    assert q.load_calib_amax("percentile", percentile=100.0).item() > 0


# ------------------------------------------------------------------ calibrators
def test_max_calibrator_is_exact_and_streams():
    torch.manual_seed(0)
    batches = [torch.randn(8, 16) * s for s in (1.0, 3.0, 0.5)]
    cal = MaxCalibrator()
    for b in batches:
        cal.collect(b)
    assert cal.compute_amax().item() == max(b.abs().max().item() for b in batches)
    per_channel = MaxCalibrator(axis=0)
    w = torch.randn(5, 7)
    per_channel.collect(w)
    assert per_channel.compute_amax().shape == (5, 1)  # pytorch-quantization's keepdim shape
    assert torch.equal(per_channel.compute_amax(), w.abs().amax(dim=1, keepdim=True))
    assert reduce_amax(w, None).dim() == 0


def test_percentile_matches_numpy_within_one_bin():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    cal = HistogramCalibrator(num_bins=2048)
    for part in x.split(50_000):
        cal.collect(part)
    width = cal.range / cal.num_bins
    for p in (90.0, 99.0, 99.9):
        expected = np.percentile(x.abs().numpy(), p)
        got = cal.compute_amax("percentile", percentile=p).item()
        assert expected <= got + 1e-6 and got - expected <= width + 1e-6


def test_histogram_grows_by_exact_bin_merges():
    torch.manual_seed(0)
    a, b = torch.rand(10_000), torch.rand(10_000) * 3.7
    cal = HistogramCalibrator(num_bins=64)
    cal.collect(a)
    first_range = cal.range
    cal.collect(b)
    assert cal.range == pytest.approx(first_range * math.ceil(b.max().item() / first_range))
    direct = torch.histc(torch.cat([a, b]), bins=64, min=0, max=cal.range).double()
    assert cal.hist.sum().item() == 20_000
    assert (cal.hist - direct).abs().max().item() <= 2  # only float ties at bin edges may move


def heavy_tail(n=100_000, seed=0):
    # Student-t with 3 degrees of freedom: a few values far beyond the bulk, like BERT activations.
    return torch.from_numpy(np.random.default_rng(seed).standard_t(3.0, n).astype(np.float32))


@pytest.mark.parametrize("method, below", [("mse", 0.8), ("entropy", 0.4)])
def test_mse_and_entropy_clip_heavy_tails(method, below):
    x = heavy_tail()
    cal = HistogramCalibrator()
    cal.collect(x)
    amax = cal.compute_amax(method).item()
    assert 2.0 < amax < below * x.abs().max().item(), (amax, x.abs().max().item())


def test_mse_amax_is_near_the_best_amax_for_the_sample_itself():
    x = heavy_tail(30_000).double()
    cal = HistogramCalibrator()
    cal.collect(x.float())

    def sample_mse(a):
        return ((fake_quant(x.float(), torch.tensor(a)).double() - x) ** 2).sum().item()

    best = min(sample_mse(a) for a in np.linspace(2.0, x.abs().max().item(), 80))
    assert sample_mse(cal.compute_amax("mse").item()) <= best * 1.02


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_mse_and_entropy_keep_the_range_of_a_uniform_sample(method):
    cal = HistogramCalibrator()
    cal.collect(torch.rand(100_000) * 2 - 1)
    assert cal.compute_amax(method).item() > 0.9


def _entropy_loop(hist, edges, num_bits=8, start_bin=128):
    # The straightforward loop (as pytorch-quantization writes it): reference for the vectorised search.
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    levels = 1 << (num_bits - 1)
    best_i, best = len(bins), math.inf
    for i in range(start_bin, len(bins) + 1):
        counts = bins[:i]
        group = (np.arange(i) * levels) // i
        nz = counts > 0
        sums = np.bincount(group, weights=counts, minlength=levels)
        nnz = np.bincount(group, weights=nz, minlength=levels)
        q = np.where(nz, sums[group] / np.maximum(nnz[group], 1), 0.0)
        p = counts.copy()
        p[-1] += bins[i:].sum()
        if q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        used = p > 0
        kl = math.inf if np.any(q[used] == 0) else float(np.sum(p[used] * np.log(p[used] / q[used])))
        if kl <= best + 1e-12:
            best_i, best = i, kl
    return edges[best_i]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_entropy_matches_the_loop(seed):
    cal = HistogramCalibrator(num_bins=512)
    # With a spike of exact zeros (padding, ReLU), which TensorRT's search flattens into bin 1's height.
    cal.collect(torch.cat([heavy_tail(20_000, seed + 1) * (seed + 1), torch.zeros(20_000)]))
    hist, edges = cal.hist.numpy(), cal.edges
    assert entropy_amax(hist, edges, 8, False) == pytest.approx(_entropy_loop(hist, edges), rel=1e-9)


def test_histogram_of_zeros_and_bad_values():
    cal = HistogramCalibrator()
    cal.collect(torch.zeros(10))
    assert cal.compute_amax("percentile").item() == 0.0
    with pytest.raises(ValueError, match="inf or NaN"):
        cal.collect(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="percentile, mse, entropy"):
        cal.compute_amax("kl")

"""Streaming calibrators: a running max, or a running histogram of |x| searched for the best amax.

Nothing here keeps activations. :class:`MaxCalibrator` keeps one running maximum (per channel when
``axis`` is set); :class:`HistogramCalibrator` keeps ``num_bins`` counts over ``[0, range]`` and, when
a batch exceeds the range, widens it by an integer factor ``k`` so that every ``k`` old bins merge
exactly into one new bin (no re-sampling error, bounded memory).

The amax searches follow NVIDIA pytorch-quantization ``calib/histogram.py`` (``_compute_amax_entropy``,
``_compute_amax_mse``, ``_compute_amax_percentile``, TensorRT's KL-divergence calibration), rewritten
here (vectorised, no scipy) rather than copied.
"""

from __future__ import annotations

import math

import numpy as np
import torch

HISTOGRAM_METHODS = ("percentile", "mse", "entropy")
CALIB_METHODS = ("max",) + HISTOGRAM_METHODS


def reduce_amax(x: torch.Tensor, axis: int | tuple[int, ...] | None) -> torch.Tensor:
    """max(|x|) over every dimension except ``axis``, in pytorch-quantization's shapes.

    Per-tensor (``axis=None``) gives a 0-d tensor; per-channel keeps the reduced dimensions with size 1,
    so a Linear weight ``(out, in)`` with ``axis=0`` gives ``(out, 1)`` -- the shape pytorch-quantization
    checkpoints store (``utils/reduce_amax.py``, ``keepdims=True``).
    """
    x = x.detach().abs()
    if axis is None:
        return x.max().float()
    keep = {a % x.dim() for a in ((axis,) if isinstance(axis, int) else axis)}
    for dim in range(x.dim()):
        if dim not in keep:
            x = x.amax(dim=dim, keepdim=True)
    return x.float()


class MaxCalibrator:
    """Running absolute maximum (per tensor, or per channel along ``axis``)."""

    def __init__(self, axis: int | tuple[int, ...] | None = None):
        self.axis = axis
        self.amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        local = reduce_amax(x, self.axis)
        if self.amax is None:
            self.amax = local
        elif local.shape != self.amax.shape:
            raise ValueError(f"per-channel calibration saw shape {tuple(x.shape)} whose amax {tuple(local.shape)} "
                             f"differs from the earlier {tuple(self.amax.shape)}; axis={self.axis} must name "
                             "a dimension of fixed size")
        else:
            self.amax = torch.maximum(self.amax, local)

    def reset(self) -> None:
        self.amax = None

    def compute_amax(self, method: str = "max", **_) -> torch.Tensor | None:
        if method != "max":
            raise ValueError(f"a max calibrator can only compute method='max', not {method!r}; "
                             "calibrate with calib_method='histogram' (or calibrate(model, method=...)) instead")
        return self.amax


class HistogramCalibrator:
    """Running histogram of |x| with ``num_bins`` bins; amax by percentile, MSE or entropy (KL) search.

    Args:
        num_bits: Bits of the quantizer being calibrated (the MSE and entropy searches quantize with them).
        unsigned: The quantizer is unsigned (one more bit of magnitude).
        narrow_range: The quantizer's signed range is symmetric (-127..127 for 8 bits).
        num_bins: Histogram resolution.
    """

    def __init__(self, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True, num_bins: int = 2048):
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        self.num_bits, self.unsigned, self.narrow_range, self.num_bins = num_bits, unsigned, narrow_range, num_bins
        self.reset()

    def reset(self) -> None:
        self.hist: torch.Tensor | None = None  # float64 counts, num_bins of them
        self.range = 0.0                       # the bins cover [0, range]
        self._zeros = 0                        # exact zeros seen before any non-zero value fixed the range

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().abs().float().flatten()
        if x.numel() == 0:
            return
        x_max = float(x.max())
        if not math.isfinite(x_max):
            raise ValueError("calibration saw inf or NaN; check the model's inputs (or the dtype) before calibrating")
        if self.hist is None:
            if x_max == 0.0:
                self._zeros += x.numel()
                return
            self.range = x_max
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64)
            self.hist[0] += self._zeros
        elif x_max > self.range:
            # Widen by an integer factor k: new bin j holds old bins j*k .. j*k+k-1 exactly.
            k = math.ceil(x_max / self.range)
            padded = torch.zeros(self.num_bins * k, dtype=torch.float64)
            padded[: self.num_bins] = self.hist
            self.hist = padded.view(self.num_bins, k).sum(dim=1)
            self.range *= k
        self.hist += torch.histc(x, bins=self.num_bins, min=0.0, max=self.range).double()

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.range, self.num_bins + 1)

    def compute_amax(self, method: str, *, percentile: float = 99.99, start_bin: int = 128, stride: int = 1,
                     **_) -> torch.Tensor | None:
        """The amax chosen by ``method`` ("percentile", "mse" or "entropy"); None if nothing was collected."""
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"histogram calibration method {method!r} is unknown; use one of "
                             f"{', '.join(HISTOGRAM_METHODS)}")
        if self.hist is None:
            return torch.tensor(0.0) if self._zeros else None
        hist, edges = self.hist.numpy(), self.edges
        if method == "percentile":
            amax = percentile_amax(hist, edges, percentile)
        elif method == "mse":
            amax = mse_amax(hist, edges, self.num_bits, self.unsigned, self.narrow_range, start_bin, stride)
        else:
            amax = entropy_amax(hist, edges, self.num_bits, self.unsigned, start_bin, stride)
        return torch.tensor(float(amax), dtype=torch.float32)


def percentile_amax(hist: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """Upper edge of the bin where the cumulative count reaches ``percentile`` %.

    pytorch-quantization returns that bin's lower edge; the upper edge guarantees that at least
    ``percentile`` % of the values lie within amax (the two differ by one bin width).
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    cdf = np.cumsum(hist) / hist.sum()
    idx = min(int(np.searchsorted(cdf, percentile / 100.0 - 1e-12)), len(hist) - 1)
    return float(edges[idx + 1])


def mse_amax(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, narrow_range: bool,
             start_bin: int = 128, stride: int = 1) -> float:
    """The bin centre that, used as amax, minimises the histogram-weighted quantization MSE.

    As in pytorch-quantization, every value is represented by its bin centre. Candidates stop one bin
    past the last non-empty bin: a larger amax clips nothing and only coarsens the grid.
    """
    centers = (edges[1:] + edges[:-1]) / 2
    nonzero = np.flatnonzero(hist)
    values, counts = centers[nonzero], hist[nonzero].astype(np.float64)
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1
    min_bound = 0.0 if unsigned else (-max_bound if narrow_range else -max_bound - 1)
    last = min(int(nonzero[-1]) + 2, len(centers))
    candidates = centers[min(start_bin, last - 1):last:stride]
    errors = []
    for chunk in np.array_split(candidates, max(1, len(candidates) // 128)):  # bounded memory
        scale = (max_bound / chunk)[:, None]
        quantized = np.clip(np.round(values[None] * scale), min_bound, max_bound) / scale
        errors.append((((quantized - values[None]) ** 2) * counts[None]).sum(axis=1))
    return float(candidates[int(np.argmin(np.concatenate(errors)))])


def entropy_amax(hist: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, start_bin: int = 128,
                 stride: int = 1) -> float:
    """TensorRT's KL-divergence threshold search over a histogram of |x|.

    For each candidate threshold ``i`` (in bins): the reference P is the first ``i`` bins with every
    count beyond the threshold added to the last one (clipping); the candidate Q merges those ``i``
    bins into ``L = 2**(num_bits-1)`` levels and spreads each level's count evenly over its non-empty
    bins (empty bins stay empty). The threshold with the smallest KL(P || Q) wins; among equal minima
    the largest, as in pytorch-quantization's loop.

    Vectorised over all candidates with prefix sums: with T = sum(P) and C = sum(bins[:i]) = sum(Q),
    ``KL = (sum P log P - sum P log Q) / T + log(C / T)``, and ``sum P log Q`` is a sum over the L
    levels (each a contiguous run of bins) plus the clipped tail times log Q of the last bin.
    """
    bins = hist.astype(np.float64).copy()
    if len(bins) > 1:
        bins[0] = bins[1]  # the zero bin is often a spike (padding, ReLU); TensorRT ignores its height
    levels = 1 << (num_bits - 1 + int(unsigned))
    n = len(bins)
    last = int(np.flatnonzero(bins)[-1]) + 1 if bins.any() else n
    cands = np.arange(min(max(start_bin, levels), last), last + 1, stride)
    if len(cands) == 0:
        return float(edges[last])
    total = bins.sum()
    prefix = np.concatenate([[0.0], np.cumsum(bins)])                       # sum(bins[:j])
    prefix_nz = np.concatenate([[0.0], np.cumsum(bins > 0)])                 # non-empty bins in [:j]
    plogp = np.where(bins > 0, bins * np.log(np.where(bins > 0, bins, 1.0)), 0.0)
    prefix_plogp = np.concatenate([[0.0], np.cumsum(plogp)])
    # Level g of candidate i covers bins [ceil(g*i/L), ceil((g+1)*i/L)).
    g = np.arange(levels + 1)
    starts = (g[None, :] * cands[:, None] + levels - 1) // levels             # (cands, L+1)
    level_sum = prefix[starts[:, 1:]] - prefix[starts[:, :-1]]
    level_nz = prefix_nz[starts[:, 1:]] - prefix_nz[starts[:, :-1]]
    level_avg = np.divide(level_sum, level_nz, out=np.zeros_like(level_sum), where=level_nz > 0)
    log_avg = np.log(np.where(level_avg > 0, level_avg, 1.0))
    sum_plogq = (level_sum * log_avg).sum(axis=1)
    tail = total - prefix[cands]
    last_bin = bins[cands - 1]
    sum_plogq += tail * np.where(last_bin > 0, log_avg[:, -1], 0.0)
    clipped = last_bin + tail
    sum_plogp = prefix_plogp[cands - 1] + clipped * np.log(np.where(clipped > 0, clipped, 1.0))
    with np.errstate(divide="ignore"):
        kl = (sum_plogp - sum_plogq) / total + np.log(prefix[cands] / total)
    kl[(last_bin == 0) & (tail > 0)] = np.inf  # mass clipped into an empty bin: Q is 0 where P is not
    kl[prefix[cands] == 0] = np.inf
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))  # the largest threshold among equal minima
    return float(edges[cands[best]])

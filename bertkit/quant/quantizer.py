"""Fake quantization and :class:`TensorQuantizer`, with NVIDIA pytorch-quantization's semantics and names.

The arithmetic is pytorch-quantization's ``tensor_quant.py`` (``_tensor_quant``)::

    max_bound = 2**(num_bits - 1) - 1        (signed)     or 2**num_bits - 1 (unsigned)
    min_bound = -max_bound  (narrow range)   or -max_bound - 1 (full range)   or 0 (unsigned)
    scale     = max_bound / amax
    fake_quant(x) = clamp(round(x * scale), min_bound, max_bound) / scale

``torch.round`` rounds halves to even, as ONNX ``QuantizeLinear`` does. An amax of (almost) zero
quantizes everything to zero (pytorch-quantization treats amax <= 2**-24 so). The backward pass is
the clipped straight-through estimator of ``tensor_quant.py`` (gradient 1 where ``|x| <= amax``, else 0).
"""

from __future__ import annotations

import torch
from torch import nn

from .calib import CALIB_METHODS, HISTOGRAM_METHODS, HistogramCalibrator, MaxCalibrator

_EPS = 1.0 / (1 << 24)  # pytorch-quantization: smaller amax is treated as 0


def quant_bounds(num_bits: int, unsigned: bool, narrow_range: bool) -> tuple[float, float]:
    """(min_bound, max_bound) of the integer grid, as pytorch-quantization computes them."""
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    if unsigned:
        return 0.0, max_bound
    return (-max_bound if narrow_range else -max_bound - 1.0), max_bound


def _scale(amax: torch.Tensor, max_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Returns (scale, dead) where dead marks amax ~ 0; there the scale is 1 and the output is forced to 0.
    dead = amax <= _EPS
    return max_bound / torch.where(dead, torch.ones_like(amax), amax), dead


def fake_quant(x: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
               narrow_range: bool = True) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``amax`` (broadcast against ``x``), without autograd bookkeeping."""
    min_bound, max_bound = quant_bounds(num_bits, unsigned, narrow_range)
    dtype = x.dtype
    x, amax = x.float(), amax.detach().float()  # in float32 so half inputs cannot overflow x * scale
    scale, dead = _scale(amax, max_bound)
    out = torch.clamp(torch.round(x * scale), min_bound, max_bound) / scale
    if bool(dead.any()):
        out = out.masked_fill(dead, 0.0)
    return out.to(dtype)


class FakeQuantFunction(torch.autograd.Function):
    """Fake quantization with the clipped straight-through estimator, and an LSQ gradient for amax.

    Gradient for ``x``: ``1`` where ``|x| <= amax``, ``0`` outside (pytorch-quantization's STE).
    Gradient for ``amax`` (only when it requires grad, i.e. ``learn_amax=True``): the exact derivative
    of the fake-quantized value with ``round`` passed straight through -- the LSQ rule (Esser et al.
    2020, "Learned Step Size Quantization") written for amax = step * max_bound: ``(round(u) - u) /
    max_bound`` inside the grid (``u = x * scale``), ``+1`` where clipped at the top, ``min_bound /
    max_bound`` at the bottom. LSQ's per-layer gradient scaling is left out (use a smaller learning
    rate for amax if it moves too fast). pytorch-quantization learns amax PACT-style through its
    ``Clip`` module instead, which is the same rule without the rounding term.
    """

    @staticmethod
    def forward(ctx, x, amax, num_bits, unsigned, narrow_range):
        ctx.save_for_backward(x, amax)
        ctx.bounds = quant_bounds(num_bits, unsigned, narrow_range)
        return fake_quant(x, amax, num_bits, unsigned, narrow_range)

    @staticmethod
    def backward(ctx, grad):
        x, amax = ctx.saved_tensors
        grad_x = grad_amax = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(x.abs() <= amax, grad, torch.zeros_like(grad))
        if ctx.needs_input_grad[1]:
            min_bound, max_bound = ctx.bounds
            scale, _ = _scale(amax.detach().float(), max_bound)
            u = x.float() * scale
            r = torch.round(u)
            local = torch.where(r > max_bound, torch.ones_like(u),
                                torch.where(r < min_bound, torch.full_like(u, min_bound / max_bound),
                                            (r - u) / max_bound))
            grad_amax = (grad.float() * local).sum_to_size(amax.shape).to(amax.dtype)
        return grad_x, grad_amax, None, None, None


class _QDQ(torch.autograd.Function):
    """Fake quantization during ``torch.onnx.export`` tracing; a QuantizeLinear/DequantizeLinear pair in the graph.

    ``symbolic`` needs amax as a constant ("t"): :func:`qdq` passes a fresh ``torch.tensor`` built from
    the values (a constant in the trace); the ``_amax`` buffer itself would be a graph parameter.
    ``bertkit.quant.onnx_export`` explains the graph: ``x -> [Max(x, -amax)] -> QuantizeLinear -> DequantizeLinear``.
    """

    @staticmethod
    def forward(ctx, x, amax, num_bits, unsigned, narrow_range):
        return fake_quant(x, amax, num_bits, unsigned, narrow_range)

    @staticmethod
    def symbolic(g, x, amax, num_bits, unsigned, narrow_range):
        from torch.onnx import symbolic_helper  # export only: keeps `import bertkit.quant` light

        return symbolic_helper.parse_args("v", "t", "i", "b", "b")(_qdq_graph)(g, x, amax, num_bits, unsigned,
                                                                               narrow_range)


def _qdq_graph(g, x, amax, num_bits, unsigned, narrow_range):
    if num_bits != 8:
        raise ValueError(f"ONNX QuantizeLinear is 8-bit; a {num_bits}-bit quantizer cannot be exported "
                         "(export with 8 bits, or disable that quantizer)")
    _, max_bound = quant_bounds(num_bits, unsigned, narrow_range)
    amax = amax.float()
    if bool((amax <= _EPS).all()):  # fake_quant gives zeros; a zero scale is invalid in ONNX
        return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(0.0)))
    scale = torch.where(amax <= _EPS, torch.ones_like(amax), amax) / max_bound
    zp_dtype = torch.uint8 if unsigned else torch.int8
    kwargs = {}
    if amax.numel() > 1:
        channel_dims = [d for d, size in enumerate(amax.shape) if size > 1]
        if len(channel_dims) != 1:
            raise ValueError(f"amax of shape {tuple(amax.shape)} varies along several axes; ONNX "
                             "QuantizeLinear supports one channel axis")
        kwargs["axis_i"] = channel_dims[0]
        scale = scale.flatten()
    else:
        scale = scale.reshape(())
    zero_point = torch.zeros(scale.shape, dtype=zp_dtype)
    if narrow_range and not unsigned:
        x = g.op("Max", x, g.op("Constant", value_t=-amax))
    scale_c = g.op("Constant", value_t=scale)
    zp_c = g.op("Constant", value_t=zero_point)
    q = g.op("QuantizeLinear", x, scale_c, zp_c, **kwargs)
    return g.op("DequantizeLinear", q, scale_c, zp_c, **kwargs)


def qdq(x: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned: bool, narrow_range: bool) -> torch.Tensor:
    """What an enabled :class:`TensorQuantizer` runs while ``torch.onnx.export`` traces it."""
    constant = torch.tensor(amax.detach().cpu().tolist(), dtype=torch.float32, device=x.device)
    return _QDQ.apply(x, constant, num_bits, unsigned, narrow_range)


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor; pytorch-quantization's ``TensorQuantizer`` API and checkpoint names.

    Modes: *quantize* (the default once ``amax`` is known), *calibrate* (``enable_calib()`` +
    ``disable_quant()``: statistics are collected and the input passes through unchanged), *disabled*
    (``disable()``: identity, ``is_enabled`` False, so the attention hook keeps the float SDPA path).

    Args:
        num_bits: Bits of the integer grid.
        unsigned: Use ``[0, 2**num_bits - 1]`` (inputs must be >= 0).
        narrow_range: Signed grid ``[-max_bound, max_bound]`` (e.g. -127..127) instead of -128..127.
            pytorch-quantization's ``QuantDescriptor`` defaults to False; its functions default to True.
        axis: None for one amax per tensor, or the dimension(s) that keep their own amax
            (0 for the output channels of a Linear weight).
        amax: Initial amax (float or tensor); None until calibrated or loaded.
        learn_amax: Make ``_amax`` an ``nn.Parameter`` trained with the LSQ gradient (see
            :class:`FakeQuantFunction`).
        calib_method: "max" (running max) or a histogram method ("histogram", "percentile", "mse",
            "entropy"); :func:`bertkit.quant.calibrate` may override it.

    The amax lives in ``_amax`` (a persistent buffer, or a Parameter with ``learn_amax``): 0-d per
    tensor, keep-dim shape per channel (``(out_features, 1)`` for a Linear weight), as in
    pytorch-quantization checkpoints.
    """

    def __init__(self, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True, axis=None,
                 amax=None, learn_amax: bool = False, calib_method: str = "max"):
        super().__init__()
        if not isinstance(num_bits, int) or isinstance(num_bits, bool) or not 1 <= num_bits <= 16:
            raise ValueError(f"num_bits must be an integer in 1..16, got {num_bits!r}")
        if calib_method not in CALIB_METHODS + ("histogram",):
            raise ValueError(f"calib_method {calib_method!r} is unknown; use one of "
                             f"{', '.join(CALIB_METHODS + ('histogram',))}")
        if axis is not None and calib_method != "max":
            raise ValueError("histogram calibration is per tensor only (as in pytorch-quantization); "
                             f"use calib_method='max' with axis={axis!r}")
        self.num_bits, self.unsigned, self.narrow_range = num_bits, unsigned, narrow_range
        self.axis, self.learn_amax, self.calib_method = axis, learn_amax, calib_method
        self._disabled, self._if_quant, self._if_calib = False, True, False
        self.name = ""  # set by quantize(), used in messages
        self.num_bins = 2048
        self._calibrator = None
        self._calib_method_now = calib_method  # the method of the running calibration
        self.register_buffer("_amax", None)
        if amax is not None:
            self._set_amax(torch.as_tensor(amax, dtype=torch.float32))

    # ------------------------------------------------------------------ state
    @property
    def is_enabled(self) -> bool:
        """True when the module does something: quantizes or collects statistics."""
        return not self._disabled and (self._if_quant or self._if_calib)

    @property
    def amax(self) -> torch.Tensor | None:
        return self._amax

    @amax.setter
    def amax(self, value) -> None:
        self._set_amax(torch.as_tensor(value, dtype=torch.float32))

    def _set_amax(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        if bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{self._label()}: amax must be finite and >= 0, got {value}")
        current = self._amax
        if current is not None and current.shape == value.shape and not current.is_meta:
            with torch.no_grad():  # in place, so an optimizer holding a learned amax keeps training it
                current.copy_(value)
            return
        if current is not None:
            value = value.to(current.device)
        if self.learn_amax:
            self._buffers.pop("_amax", None)
            self._amax = nn.Parameter(value.clone())  # registers a Parameter under the same name
        else:
            self._parameters.pop("_amax", None)
            self._buffers["_amax"] = value.clone()

    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self, method: str | None = None, num_bins: int | None = None) -> None:
        """Starts collecting statistics (a fresh calibrator; ``method`` overrides ``calib_method``)."""
        method = method or self.calib_method
        if method not in CALIB_METHODS + ("histogram",):
            raise ValueError(f"{self._label()}: calibration method {method!r} is unknown; use one of "
                             f"{', '.join(CALIB_METHODS)}")
        self.num_bins = num_bins or self.num_bins
        if method == "max" or self.axis is not None:
            self._calibrator = MaxCalibrator(self.axis)
        else:
            self._calibrator = HistogramCalibrator(self.num_bits, self.unsigned, self.narrow_range, self.num_bins)
        self._calib_method_now = method
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    def load_calib_amax(self, method: str | None = None, strict: bool = True, **kwargs) -> torch.Tensor | None:
        """Sets ``_amax`` from the collected statistics.

        Args:
            method: "max", "percentile", "mse" or "entropy"; default: the method calibration ran with.
            strict: Raise if nothing was collected; with False, return None and leave amax unchanged.
            **kwargs: ``percentile=99.99``, ``start_bin=128``, ``stride=1`` for the histogram searches.

        Returns:
            The new amax, or None (strict=False and no data).
        """
        if self._calibrator is None:
            raise RuntimeError(f"{self._label()}: no calibrator; call enable_calib() (or use "
                               "bertkit.quant.calibrate(model)) and run data through the model first")
        method = method or self._calib_method_now
        if method == "histogram":
            raise ValueError(f"{self._label()}: say which histogram method to use: one of "
                             f"{', '.join(HISTOGRAM_METHODS)}")
        if isinstance(self._calibrator, MaxCalibrator) and method != "max" and self.axis is not None:
            method = "max"  # per-channel statistics are always a running max
        amax = self._calibrator.compute_amax(method, **kwargs)
        if amax is None:
            if strict:
                raise RuntimeError(f"{self._label()}: the calibrator saw no data; run batches through the model "
                                   "inside calibrate(), or pass strict=False")
            return None
        self._set_amax(amax)
        return self._amax

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return x
        if self._if_calib:
            self._calibrator.collect(x)
        if not self._if_quant:
            return x
        if self._amax is None:
            raise RuntimeError(f"{self._label()} has no amax: calibrate the model (bertkit.quant.calibrate), "
                               "load a quantized checkpoint, or disable this quantizer")
        if torch.onnx.is_in_onnx_export():
            return qdq(x, self._amax, self.num_bits, self.unsigned, self.narrow_range)
        if self.unsigned and bool((x < 0).any()):
            raise ValueError(f"{self._label()} is unsigned but its input has negative values; "
                             "build it with unsigned=False")
        return FakeQuantFunction.apply(x, self._amax, self.num_bits, self.unsigned, self.narrow_range)

    # ------------------------------------------------------------------ checkpoints
    def _apply(self, fn, recurse=True):
        # amax stays float32 (as _set_amax stores it) when the model is cast (from_pretrained(dtype=...),
        # model.half()): fake_quant computes in float32, and a half-precision amax would round the scale.
        amax = self._amax
        super()._apply(fn, recurse)
        if amax is not None and self._amax.dtype != torch.float32:
            self._amax.data = amax.detach().to(device=self._amax.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The buffer exists only once amax is known; create it from the checkpoint (pytorch-quantization
        # does the same) so a freshly quantized model loads calibrated amax values.
        key = prefix + "_amax"
        if key in state_dict:
            value = state_dict[key]
            if self.axis is not None and value.dim() == 1 and value.numel() > 1:
                error_msgs.append(f"{key} has shape {tuple(value.shape)}; per-channel amax must keep the reduced "
                                  "dimensions, e.g. (out_features, 1) for a Linear weight as pytorch-quantization "
                                  "saves it: reshape it with .view(-1, 1)")
                return
            if self._amax is None or self._amax.shape != value.shape:
                self._set_amax(torch.zeros(value.shape, device="cpu" if value.is_meta else value.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _label(self) -> str:
        return f"TensorQuantizer {self.name!r}" if self.name else "TensorQuantizer"

    def _short_amax(self) -> str:
        if self._amax is None:
            return "None"
        a = self._amax.detach()
        if a.numel() == 1:
            return f"{a.item():.4g}"
        return f"[{a.min().item():.4g}, {a.max().item():.4g}]({a.numel()})"

    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        parts = [f"{'unsigned ' if self.unsigned else ''}{self.num_bits}bit", "narrow" if self.narrow_range else "",
                 f"axis={self.axis}" if self.axis is not None else "per-tensor", f"amax={self._short_amax()}",
                 "learned" if self.learn_amax else "", "quant" if self._if_quant else "",
                 "calib" if self._if_calib else ""]
        return " ".join(p for p in parts if p)

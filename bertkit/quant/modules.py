"""``QuantLinear``: an ``nn.Linear`` whose input and weight pass through fake quantizers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import TensorQuantizer


class QuantLinear(nn.Linear):
    """Linear layer with ``_input_quantizer`` (per tensor) and ``_weight_quantizer`` (per output channel).

    A subclass of ``nn.Linear`` holding the very same ``weight``/``bias`` Parameters as the layer it
    replaces, so state-dict names, weight tying, optimizers and PEFT target names keep working; the
    quantizer names are pytorch-quantization's (``quant_linear.py``), so their ``_amax`` keys load.

    Args:
        in_features, out_features, bias: As for ``nn.Linear``.
        num_bits, narrow_range: Passed to both quantizers.
        per_channel: One weight amax per output channel (axis 0, shape ``(out_features, 1)``).
        learn_amax: Learn the input amax (the weight amax is always its max).
        quantize_input, quantize_weight: False creates that quantizer disabled.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_bits: int = 8,
                 narrow_range: bool = True, per_channel: bool = True, learn_amax: bool = False,
                 quantize_input: bool = True, quantize_weight: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._input_quantizer = TensorQuantizer(num_bits, narrow_range=narrow_range, learn_amax=learn_amax)
        self._weight_quantizer = TensorQuantizer(num_bits, narrow_range=narrow_range,
                                                 axis=0 if per_channel else None)
        if not quantize_input:
            self._input_quantizer.disable()
        if not quantize_weight:
            self._weight_quantizer.disable()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s Parameters (no copy); ``kwargs`` as for the constructor."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias)

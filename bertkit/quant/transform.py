"""``quantize(model)``: turn a built bertkit model into QDQ-BERT in place; calibration and mode helpers.

Placement (HF QDQ-BERT, ``transformers`` 4.x ``models/qdqbert/modeling_qdqbert.py``): every encoder
Linear gets a per-tensor input quantizer and a per-output-channel weight quantizer; each attention
gets ``matmul_{q,k,v,a}_input_quantizer`` (q, k, v and the probabilities); each residual add gets
``add_local_input_quantizer`` (the branch) and ``add_residual_input_quantizer``. These hook points are
declared in the core, where they are called: ``MATMUL_QUANTIZERS`` on ``BertSelfAttention``
(``bertkit/nn/attention.py``), ``ADD_QUANTIZERS`` on ``BertSelfOutput`` (``bertkit/nn/layer.py``), as
each class's ``quantizer_hooks``; a float model has no module under those names.

Heads: HF QDQ-BERT left the pooler and every head (classifier, qa_outputs, the MLM transform,
seq_relationship, the MLM decoder) as float ``nn.Linear``. bertkit quantizes the pooler and the
small heads too by default (``QuantConfig.heads``; ``QuantConfig.hf_qdqbert()`` reproduces HF's
placement) but never the MLM decoder: HF kept it float, it is tied to the word embeddings, and
``BertLMPredictionHead.forward`` calls ``F.linear(x, decoder.weight, bias)``, so a swapped module would
never run anyway.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..config import BertConfig
from ..nn.attention import BertSelfAttention
from ..nn.heads import BertLMPredictionHead
from ..nn.layer import BertSelfOutput
from .calib import CALIB_METHODS, reduce_amax
from .modules import QuantLinear
from .quantizer import TensorQuantizer

logger = logging.getLogger("bertkit")

CONFIG_KEY = "quantization_config"  # where quantize() records its QuantConfig in config.extra


@dataclass
class QuantConfig:
    """What ``quantize()`` does. The default is full QDQ-BERT placement, 8 bits, max calibration.

    Attributes:
        num_bits: Bits of every quantizer.
        calib_method: Default method of :func:`calibrate`: "max", "percentile", "mse" or "entropy".
        percentile: For "percentile" calibration.
        narrow_range: Symmetric signed grid (-127..127). pytorch-quantization's ``QuantDescriptor``
            default (and so HF QDQ-BERT's) is False (-128..127).
        per_channel_weights: One weight amax per output channel (axis 0) instead of one per tensor.
        linear_inputs, linear_weights: Quantize Linear inputs / weights.
        matmul_inputs: Quantize q, k, v and the attention probabilities (forces the explicit softmax path).
        residual_adds: Quantize both inputs of each residual add.
        heads: Also quantize the pooler and the task heads (never the MLM decoder).
        learn_amax: Activation amax values become Parameters trained by QAT (LSQ gradient).
        exclude: ``fnmatch`` patterns of quantizer names created disabled (they never calibrate, export
            or load), e.g. ``("*.output.add_local_input_quantizer",)`` keeps the MLP branch of each
            residual add in float -- where BERT's outlier features live (see docs/benchmarks.md).
    """

    num_bits: int = 8
    calib_method: str = "max"
    percentile: float = 99.99
    narrow_range: bool = True
    per_channel_weights: bool = True
    linear_inputs: bool = True
    linear_weights: bool = True
    matmul_inputs: bool = True
    residual_adds: bool = True
    heads: bool = True
    learn_amax: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.exclude, str):
            raise ValueError("QuantConfig.exclude must be a tuple of patterns, not one string; "
                             f"write exclude=({self.exclude!r},)")
        self.exclude = tuple(self.exclude)
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(f"QuantConfig.calib_method {self.calib_method!r} is unknown; use one of "
                             f"{', '.join(CALIB_METHODS)}")
        if not isinstance(self.num_bits, int) or not 2 <= self.num_bits <= 16:
            raise ValueError(f"QuantConfig.num_bits must be an integer in 2..16, got {self.num_bits!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"QuantConfig.percentile must be in (0, 100], got {self.percentile}")

    @classmethod
    def hf_qdqbert(cls, **changes) -> "QuantConfig":
        """HF QDQ-BERT's placement and pytorch-quantization's default grid (encoder only, -128..127)."""
        return cls(**{"heads": False, "narrow_range": False, **changes})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["exclude"] = list(self.exclude)  # JSON has no tuples
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"quantization_config has unknown keys {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)


def stored_config(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig recorded in ``model.config.extra`` by :func:`quantize`, or None."""
    extra = getattr(getattr(model, "config", None), "extra", None) or {}
    return QuantConfig.from_dict(extra[CONFIG_KEY]) if CONFIG_KEY in extra else None


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """Every ``TensorQuantizer`` of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def _is_head(name: str) -> bool:
    # Encoder Linears live under ".encoder." (BertModel's or a task model's "bert.encoder.").
    return not (name.startswith("encoder.") or ".encoder." in name)


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Adds QDQ-BERT fake quantization to a built bertkit model, in place.

    Works on ``BertModel`` and every task model, post-norm BERT and pre-norm Megatron-BERT. The
    quantizers start in quantize mode without amax: run :func:`calibrate` (or load a checkpoint with
    :func:`bertkit.quant.load_quantized`) before using the model. The config is recorded in
    ``model.config.extra["quantization_config"]`` so ``save_pretrained`` keeps it.

    Args:
        model: The model (modified in place).
        config: Placement and grid; default :class:`QuantConfig()` (full placement, 8 bits).

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` already has quantizers.
    """
    config = config or QuantConfig()
    if any(True for _ in quantizers(model)):
        raise ValueError("model is already quantized (it has TensorQuantizer modules); quantize a float model")
    grid = dict(num_bits=config.num_bits, narrow_range=config.narrow_range)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear:
                continue
            if isinstance(module, BertLMPredictionHead) and child_name == "decoder":
                continue  # see the module docstring
            if _is_head(full) and not config.heads:
                continue
            setattr(module, child_name, QuantLinear.from_linear(
                child, per_channel=config.per_channel_weights, learn_amax=config.learn_amax,
                quantize_input=config.linear_inputs, quantize_weight=config.linear_weights, **grid))
        # The core declares its hook points (module.quantizer_hooks): MATMUL_QUANTIZERS on each
        # BertSelfAttention, ADD_QUANTIZERS on each BertSelfOutput (and BertOutput).
        if (isinstance(module, BertSelfAttention) and config.matmul_inputs) or \
                (isinstance(module, BertSelfOutput) and config.residual_adds):
            for attr in module.quantizer_hooks:
                setattr(module, attr, TensorQuantizer(learn_amax=config.learn_amax, **grid))
    for name, quantizer in quantizers(model):
        quantizer.name = name
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude):
            quantizer.disable()
    if not any(p.is_meta for p in model.parameters()):
        calibrate_weights(model)  # weights are known now; activations need calibrate()
    if isinstance(getattr(model, "config", None), BertConfig):
        model.config.extra[CONFIG_KEY] = config.to_dict()
    return model


def disable_quantization(model: nn.Module) -> nn.Module:
    """Turns every quantizer into the identity: the model computes exactly what the float model does."""
    for _, quantizer in quantizers(model):
        quantizer.disable()
    return model


def enable_quantization(model: nn.Module) -> nn.Module:
    """Re-enables every quantizer that has an amax (calibrated or loaded) in quantize mode."""
    for _, quantizer in quantizers(model):
        if quantizer.amax is not None:
            quantizer.enable()
            quantizer.disable_calib()
            quantizer.enable_quant()
    return model


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> None:
    """Sets every enabled weight quantizer's amax to the max of its current weight (per channel)."""
    for module in model.modules():
        if isinstance(module, QuantLinear) and not module._weight_quantizer._disabled:
            module._weight_quantizer.amax = reduce_amax(module.weight, module._weight_quantizer.axis)


@contextmanager
def calibrate(model: nn.Module, method: str | None = None, percentile: float | None = None, num_bins: int = 2048,
              **search):
    """Context manager: batches run inside it calibrate the activation quantizers.

    Inside, the model is in eval mode under ``torch.no_grad()`` and every enabled quantizer collects
    statistics and passes its input through unchanged (a running max, or a running histogram for the
    other methods -- never the activations). On a normal exit each amax is computed and quantization is
    switched on; weights always get their exact (per-channel) max. An activation quantizer that saw no
    data (e.g. cross-attention that never ran) is disabled, with a warning.

    Args:
        model: A model returned by :func:`quantize`.
        method: "max", "percentile", "mse" or "entropy"; default: the model's ``QuantConfig.calib_method``.
        percentile: For "percentile"; default the config's (99.99).
        num_bins: Histogram bins for the histogram methods.
        **search: ``start_bin`` (128) and ``stride`` (1) of the mse/entropy searches.

    Example:
        >>> with calibrate(model, method="percentile"):
        ...     for batch in batches:
        ...         model(**batch)
    """
    stored = stored_config(model) or QuantConfig()
    method = method or stored.calib_method
    percentile = stored.percentile if percentile is None else percentile
    if method not in CALIB_METHODS:
        raise ValueError(f"calibration method {method!r} is unknown; use one of {', '.join(CALIB_METHODS)}")
    weights = [m._weight_quantizer for m in model.modules() if isinstance(m, QuantLinear)]
    active = [(n, q) for n, q in quantizers(model) if not q._disabled and all(q is not w for w in weights)]
    if not active:
        raise ValueError("the model has no enabled activation quantizers; call bertkit.quant.quantize(model) first")
    was_training = model.training
    model.eval()
    for _, quantizer in active:
        quantizer.enable_calib(method, num_bins)
        quantizer.disable_quant()
    for quantizer in weights:  # float weights while collecting, as pytorch-quantization calibrates
        quantizer.disable_quant()
    try:
        with torch.no_grad():
            yield model
    except BaseException:
        for quantizer in [q for _, q in active] + weights:  # leave the model as it was
            quantizer.disable_calib()
            quantizer.enable_quant()
        model.train(was_training)
        raise
    for quantizer in weights:
        quantizer.enable_quant()
    unseen = []
    for name, quantizer in active:
        amax = quantizer.load_calib_amax(method, strict=False, percentile=percentile, **search)
        quantizer.disable_calib()
        quantizer.enable_quant()
        if amax is None and quantizer.amax is None:
            quantizer.disable()
            unseen.append(name)
    calibrate_weights(model)
    model.train(was_training)
    if unseen:
        logger.warning("calibration saw no data for %d quantizer(s), now disabled: %s", len(unseen), ", ".join(unseen))


def calibration_summary(model: nn.Module) -> str:
    """One line per quantizer: name, state, grid and amax (``[min, max](count)`` when per channel)."""
    lines = []
    for name, q in quantizers(model):
        state = "disabled" if q._disabled else ("calib" if q._if_calib else ("quant" if q._if_quant else "off"))
        grid = f"{'u' if q.unsigned else ''}int{q.num_bits}{' narrow' if q.narrow_range and not q.unsigned else ''}"
        axis = "per-tensor" if q.axis is None else f"axis={q.axis}"
        lines.append(f"{name:<70} {state:<8} {grid:<12} {axis:<10} amax={q._short_amax()}")
    if not lines:
        return "no quantizers (call bertkit.quant.quantize(model) first)"
    return "\n".join(lines)

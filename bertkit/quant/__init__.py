"""QDQ-BERT: int8 fake quantization for every bertkit model, without NVIDIA-only dependencies.

Typical use::

    from bertkit.quant import quantize, calibrate, export_onnx
    model = quantize(bertkit.BertForSequenceClassification.from_pretrained(path))
    with calibrate(model, method="percentile"):
        for batch in calibration_batches:
            model(**batch)
    ...                                   # QAT: fine-tune as usual, gradients flow through the STE
    model.save_pretrained(out)            # _amax buffers + quantization_config in config.json
    model = load_quantized(bertkit.BertForSequenceClassification, out)
    export_onnx(model, "model.onnx")      # QuantizeLinear/DequantizeLinear pairs

Names and checkpoint keys follow NVIDIA pytorch-quantization (``TensorQuantizer``, ``QuantLinear``,
``_input_quantizer._amax``...). Fake quantization simulates int8; for int8 *speed* on CPU use
:func:`bertkit.quant.int8.to_int8` (onnxruntime int8 kernels). ``bertkit.quant.cli`` holds the
``bertkit quantize`` / ``bertkit export-onnx`` commands.
"""

from .calib import HistogramCalibrator, MaxCalibrator
from .checkpoint import load_quantized
from .modules import QuantLinear
from .quantizer import FakeQuantFunction, TensorQuantizer, fake_quant
from .transform import (QuantConfig, calibrate, calibrate_weights, calibration_summary, disable_quantization,
                        enable_quantization, quantize, quantizers)


def export_onnx(*args, **kwargs):
    """See :func:`bertkit.quant.onnx_export.export_onnx` (imported on first use: it needs ``onnx``)."""
    from .onnx_export import export_onnx as _export

    return _export(*args, **kwargs)


__all__ = [
    "TensorQuantizer", "QuantLinear", "QuantConfig", "quantize", "calibrate", "calibrate_weights",
    "calibration_summary", "disable_quantization", "enable_quantization", "quantizers", "load_quantized",
    "export_onnx", "fake_quant", "FakeQuantFunction", "MaxCalibrator", "HistogramCalibrator",
]

"""ONNX export of bertkit models, float or QDQ (QuantizeLinear/DequantizeLinear pairs).

Uses ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``): the dynamo exporter needs
``onnxscript``, which bertkit does not depend on. Each enabled quantizer becomes, through
:func:`bertkit.quant.quantizer.qdq` (beside the fake quantization it stands for)::

    x -> [Max(x, -amax)] -> QuantizeLinear(scale, zero_point=0, axis) -> DequantizeLinear -> ...

with ``scale = amax / max_bound`` (amax / 127 for int8), int8 zero point 0 (uint8 when unsigned) and
``axis`` for per-channel weights (opset >= 13). ONNX's int8 ``QuantizeLinear`` saturates to
-128..127, so the narrow range -127..127 of ``narrow_range=True`` is kept exactly by the ``Max``
in front of it (pytorch-quantization instead refuses to export narrow range). What remains is float
rounding: PyTorch computes ``round(x * (127 / amax))``, ONNX ``round(x / (amax / 127))``; the two can
differ by one step on rare exact ties (see ``tests/test_quant_onnx.py`` for the measured tolerance).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .transform import quantizers

OUTPUT_FIELDS = ("last_hidden_state", "pooler_output", "logits", "prediction_logits", "seq_relationship_logits",
                 "start_logits", "end_logits")
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


class _Exported(nn.Module):
    # Positional (input_ids, attention_mask, token_type_ids) in, a tuple of the chosen output fields out.
    def __init__(self, model: nn.Module, fields: tuple[str, ...]):
        super().__init__()
        self.model, self.fields = model, fields

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         return_dict=True)
        return tuple(getattr(out, f) for f in self.fields)


def _example_inputs(model: nn.Module, batch: int, seq_len: int, choices: int | None):
    config = model.config
    shape = (batch, choices, seq_len) if choices else (batch, seq_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    # Padding in the example, so the traced graph keeps the attention-mask computation (bertkit skips it
    # when nothing is masked, and tracing records only the branch taken).
    mask[-1, ..., seq_len // 2:] = 0
    types = torch.zeros(shape, dtype=torch.long)
    device = next(model.parameters()).device
    return tuple(t.to(device) for t in (ids, mask, types))


def export_onnx(model: nn.Module, path: str, opset: int = 17, batch_size: int = 2, seq_len: int = 16,
                output_names: list[str] | None = None) -> Path:
    """Exports a bertkit model (float, or quantized with enabled quantizers) to an ONNX file.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, dynamic batch and sequence
    axes; multiple choice adds a ``num_choices`` axis). Outputs are named after the model's output
    fields: ``last_hidden_state`` (+ ``pooler_output``) for BertModel, ``logits``, ``start_logits`` /
    ``end_logits``, ``prediction_logits`` / ``seq_relationship_logits`` for the heads.

    Args:
        model: A bertkit model in float32. Enabled quantizers must be calibrated.
        path: The ``.onnx`` file to write.
        opset: ONNX opset, >= 14 (per-channel QuantizeLinear needs 13, SDPA 14).
        batch_size, seq_len: Shape of the example used for tracing (any shape runs afterwards).
        output_names: Override the output names (one per exported field).

    Returns:
        The path written.

    Raises:
        ValueError: opset too old, a quantizer still calibrating or without amax, or a non-8-bit quantizer.
    """
    if opset < 14:
        raise ValueError(f"opset {opset} is too old: QuantizeLinear with a channel axis needs 13, attention 14; "
                         "use opset=17")
    for name, q in quantizers(model):
        if q._if_calib and not q._disabled:
            raise ValueError(f"quantizer {name} is still calibrating; leave the calibrate() block first")
        if q.is_enabled and q._if_quant and q.amax is None:
            raise ValueError(f"quantizer {name} has no amax; calibrate the model or disable that quantizer")
        if q.is_enabled and q.num_bits != 8:
            raise ValueError(f"quantizer {name} has {q.num_bits} bits but ONNX QuantizeLinear is 8-bit; "
                             "quantize with QuantConfig(num_bits=8) or disable that quantizer")
    choices = 2 if type(model).__name__ == "BertForMultipleChoice" else None
    inputs = _example_inputs(model, batch_size, seq_len, choices)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=inputs[0], attention_mask=inputs[1], token_type_ids=inputs[2], return_dict=True)
        fields = tuple(f for f in OUTPUT_FIELDS if getattr(out, f, None) is not None)
        names = list(output_names or fields)
        if len(names) != len(fields):
            raise ValueError(f"output_names has {len(names)} names but the model returns {len(fields)} outputs "
                             f"({', '.join(fields)})")
        axes = {0: "batch", 1: "num_choices", 2: "sequence"} if choices else {0: "batch", 1: "sequence"}
        dynamic = {n: axes for n in INPUT_NAMES}
        for n, f in zip(names, fields):
            dims = getattr(out, f).dim()
            dynamic[n] = {0: "batch", 1: "sequence"} if dims >= 3 or f in ("start_logits", "end_logits") \
                else {0: "batch"}
            if choices:
                dynamic[n] = {0: "batch"}
        with warnings.catch_warnings():
            # Tracing warns about Python branches on tensor values (input checks, mask shortcuts) and
            # about the TorchScript exporter being legacy; neither changes the exported graph.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(_Exported(model, fields), inputs, str(path), dynamo=False, opset_version=opset,
                              input_names=INPUT_NAMES, output_names=names, dynamic_axes=dynamic,
                              do_constant_folding=True)
    finally:
        model.train(was_training)
    return Path(path)

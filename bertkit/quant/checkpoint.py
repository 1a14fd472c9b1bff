"""Loading quantized checkpoints: bertkit's own and pytorch-quantization / HF QDQ-BERT ones.

``save_pretrained`` already writes what a quantized model needs: the ``_amax`` tensors are persistent
buffers in ``state_dict()`` and ``quantize()`` records its :class:`QuantConfig` in
``config.extra["quantization_config"]`` (so config.json has it). Loading is one ``from_pretrained`` pass
over the weight files: its ``prepare`` step quantizes the model while it is still on the meta device, so
the ``_amax`` values load together with the weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..nn.attention import MATMUL_QUANTIZERS
from ..nn.layer import ADD_QUANTIZERS
from .calib import reduce_amax
from .modules import QuantLinear
from .transform import CONFIG_KEY, QuantConfig, quantize, quantizers

logger = logging.getLogger("bertkit")


def is_quantizer_key(key: str) -> bool:
    """True for a state-dict key that belongs to a quantizer (``..._quantizer._amax`` and the like)."""
    return "_quantizer." in key


def infer_config(keys, model_type: str | None = None) -> QuantConfig:
    """Guesses the placement of a checkpoint that carries no ``quantization_config``.

    Each placement is on when the checkpoint has an amax for it; heads count when any Linear outside
    the encoder has one. HF QDQ-BERT folders (``model_type == "qdqbert"``) used pytorch-quantization's
    default full-range grid (-128..127), others get bertkit's default narrow grid.
    """
    keys = [k for k in keys if is_quantizer_key(k)]
    encoder = [k for k in keys if k.startswith("encoder.") or ".encoder." in k]
    return QuantConfig(
        narrow_range=model_type != "qdqbert",
        linear_inputs=any("._input_quantizer." in k for k in encoder) or not encoder,
        linear_weights=any("._weight_quantizer." in k for k in encoder) or not encoder,
        matmul_inputs=any(f".{n}." in k for k in keys for n in MATMUL_QUANTIZERS),
        residual_adds=any(f".{n}." in k for k in keys for n in ADD_QUANTIZERS),
        heads=any(k not in encoder for k in keys),
    )


def _fits(small: torch.Size, big: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(small, big) == big
    except RuntimeError:
        return False


def _check_weight_amax(model, path) -> None:
    for name, module in model.named_modules():
        amax = getattr(getattr(module, "_weight_quantizer", None), "amax", None)
        if amax is not None and not _fits(amax.shape, module.weight.shape):
            raise ValueError(f"{path}: {name}._weight_quantizer._amax has shape {tuple(amax.shape)}, which does "
                             f"not fit the weight {tuple(module.weight.shape)}; per-channel amax must be "
                             f"({module.weight.shape[0]}, 1)")


def load_quantized(cls, path: str | os.PathLike, config: QuantConfig | None = None, **kwargs):
    """Loads a quantized model folder: float weights, then ``quantize()``, then every ``_amax``.

    Reads folders written by ``save_pretrained`` after :func:`quantize` (their config.json has
    ``quantization_config``) and pytorch-quantization / HF QDQ-BERT checkpoints (keys such as
    ``bert.encoder.layer.0.attention.self.query._input_quantizer._amax``; per-channel weight amax of
    shape ``(out_features, 1)``, per-tensor amax 0-d), whose placement is inferred from the keys.
    Quantizers without an amax in the checkpoint are disabled (HF QDQ-BERT, for one, never quantized
    the pooler), with a warning.

    Args:
        cls: The model class, e.g. ``bertkit.BertForSequenceClassification``.
        path: The folder.
        config: Override the stored / inferred :class:`QuantConfig`.
        **kwargs: Passed to ``cls.from_pretrained`` (``dtype``, ``device``, ``num_labels``...).

    Returns:
        The quantized model in eval mode, in quantize mode.

    Raises:
        ValueError: An amax does not fit its quantizer (names the key), or the folder has no amax at all
            and no ``quantization_config`` (it is a float checkpoint: use ``from_pretrained`` + ``quantize``).
    """
    path = Path(path)

    def add_quantizers(model, keys) -> None:
        # Runs on the meta-device model before the weights load, so the amax values load with them.
        nonlocal config
        if config is None:
            stored = model.config.extra.get(CONFIG_KEY)
            if stored is not None:
                config = QuantConfig.from_dict(stored)
            elif any(is_quantizer_key(k) for k in keys):
                config = infer_config(keys, model.config.model_type)
            else:
                raise ValueError(f"{path} holds no quantizer amax and no {CONFIG_KEY} in config.json: it is a float "
                                 "checkpoint; load it with from_pretrained() and call bertkit.quant.quantize()")
        quantize(model, config)
        # The checkpoint's keys under this model's names (the one prefix rule of from_pretrained).
        names = model._adapt_state_dict(dict.fromkeys(keys))
        expected = {f"{name}._amax" for name, _ in quantizers(model)}
        unexpected = sorted(k for k in names if is_quantizer_key(k) and k not in expected)
        if unexpected:
            raise ValueError(f"{path}: quantizer keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} have "
                             f"no quantizer in the model built with {config}; pass config=QuantConfig(...) matching "
                             "the checkpoint")

    model = cls.from_pretrained(path, prepare=add_quantizers, **kwargs)
    _check_weight_amax(model, path)
    for module in model.modules():  # a weight amax the checkpoint lacks is the weight's max, as quantize() sets it
        weight_quantizer = module._weight_quantizer if isinstance(module, QuantLinear) else None
        if weight_quantizer is not None and weight_quantizer.amax is None and not weight_quantizer._disabled:
            weight_quantizer.amax = reduce_amax(module.weight.detach(), weight_quantizer.axis)
    missing = []
    for name, quantizer in quantizers(model):
        if quantizer.amax is None:
            if not quantizer._disabled:
                missing.append(name)
            quantizer.disable()
    if missing:
        logger.warning("%s: no amax in the checkpoint for %d quantizer(s), left disabled: %s", path, len(missing),
                       ", ".join(missing))
    return model.eval()

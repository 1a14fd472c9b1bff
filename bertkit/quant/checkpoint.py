"""Loading quantized checkpoints: bertkit's own and pytorch-quantization / HF QDQ-BERT ones.

``save_pretrained`` already writes what a quantized model needs: the ``_amax`` tensors are persistent
buffers in ``state_dict()`` and ``quantize()`` records its :class:`QuantConfig` in
``config.extra["quantization_config"]`` (so config.json has it). Loading must do three steps in order
-- build the float model, quantize it, then load the amax values -- which ``from_pretrained`` alone
cannot (it would report the ``_amax`` keys as unexpected).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpoints.io import load_state_dict
from ..config import BertConfig
from ..nn.attention import MATMUL_QUANTIZERS
from ..nn.layer import ADD_QUANTIZERS
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


@contextmanager
def _quiet_quantizer_keys():
    # from_pretrained builds a float model and logs the checkpoint's quantizer keys as unused; they are
    # loaded right after, so drop them from that one warning (other unused keys are still reported).
    def keep(record: logging.LogRecord) -> bool:
        if "not used" not in str(record.msg) or not record.args:
            return True
        others = [k for k in str(record.args[-1]).split(", ") if not is_quantizer_key(k)]
        if not others:
            return False
        record.args = (*record.args[:-1], ", ".join(others))
        return True

    log = logging.getLogger("bertkit")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _match_prefix(state: dict, expected: set[str], prefix: str) -> dict:
    # A bare-encoder checkpoint loaded into a task model lacks "bert."; a task checkpoint loaded into
    # BertModel has it (the same rule from_pretrained applies to the weights).
    out = {}
    for key, value in state.items():
        if key not in expected and f"{prefix}.{key}" in expected:
            key = f"{prefix}.{key}"
        elif key not in expected and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            key = key[len(prefix) + 1:]
        out[key] = value
    return out


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
    state = load_state_dict(path)
    amax_state = {k: v for k, v in state.items() if is_quantizer_key(k)}
    del state
    bert_config = BertConfig.from_pretrained(path)
    if config is None:
        stored = bert_config.extra.get(CONFIG_KEY)
        if stored is not None:
            config = QuantConfig.from_dict(stored)
        elif amax_state:
            config = infer_config(amax_state, bert_config.model_type)
        else:
            raise ValueError(f"{path} holds no quantizer amax and no {CONFIG_KEY} in config.json: it is a float "
                             "checkpoint; load it with from_pretrained() and call bertkit.quant.quantize()")
    with _quiet_quantizer_keys():
        model = cls.from_pretrained(path, **kwargs)
    quantize(model, config)
    expected = {f"{name}._amax" for name, _ in quantizers(model)}
    amax_state = _match_prefix(amax_state, expected, getattr(model, "base_model_prefix", "bert"))
    unexpected = sorted(set(amax_state) - expected)
    if unexpected:
        raise ValueError(f"{path}: quantizer keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} have no "
                         f"quantizer in the model built with {config}; pass config=QuantConfig(...) matching "
                         "the checkpoint")
    try:
        model.load_state_dict(amax_state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{path}: {err}") from None
    _check_weight_amax(model, path)
    device = next(model.parameters()).device
    missing = []
    for name, quantizer in quantizers(model):
        if quantizer.amax is None:
            if not quantizer._disabled:
                missing.append(name)
            quantizer.disable()
        else:
            quantizer._amax.data = quantizer._amax.data.to(device)
    if missing:
        logger.warning("%s: no amax in the checkpoint for %d quantizer(s), left disabled: %s", path, len(missing),
                       ", ".join(missing))
    return model.eval()

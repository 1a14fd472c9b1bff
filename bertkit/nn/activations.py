"""Activation functions by their HF config names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ACTIVATIONS


def _gelu_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # "gelu_new" (GPT-2/BERT-TF's tanh approximation) is exactly PyTorch's tanh-approximate GELU.
    return F.gelu(x, approximate="tanh")


ACT2FN = {
    "gelu": F.gelu,
    "gelu_python": _gelu_python,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "mish": F.mish,
}

if tuple(ACT2FN) != ACTIVATIONS:  # pragma: no cover - a name added in one place only
    raise ImportError(f"bertkit.config.ACTIVATIONS {ACTIVATIONS} and nn.activations.ACT2FN {tuple(ACT2FN)} disagree")


def get_activation(name: str):
    try:
        return ACT2FN[name]
    except KeyError:
        raise ValueError(f"hidden_act {name!r} is unknown; choose one of {', '.join(ACT2FN)}") from None

"""BLIP helpers on the one core: attention-map capture, Grad-CAM over the image patch grid, PNG rendering.

The BLIP text encoder/decoder itself is a configuration (``add_cross_attention``, ``encoder_width``,
``type_vocab_size=0``) of :class:`bertkit.BertModel` / :class:`bertkit.BertLMHeadModel`; HF ``BlipText*``
folders and Salesforce checkpoints load with ``from_pretrained(path, prefix="text_decoder")``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


def _cross_attentions(model: nn.Module, layers: Iterable[int] | None):
    base = getattr(model, "bert", model)
    blocks = base.encoder.layer
    chosen = range(len(blocks)) if layers is None else layers
    out = []
    for i in chosen:
        if not 0 <= i < len(blocks) or not hasattr(blocks[i], "crossattention"):
            raise ValueError(f"layer {i} has no cross-attention (the model has {len(blocks)} layers; "
                             "build it with config.add_cross_attention=True)")
        out.append(blocks[i].crossattention.self)
    return out


def save_cross_attention(model: nn.Module, layers: Iterable[int] | None = None, enabled: bool = True) -> None:
    """Turns capture of cross-attention maps (and their gradients on backward) on or off for ``layers``."""
    for module in _cross_attentions(model, layers):
        module.save_attention = enabled


def gradcam(attention_map: torch.Tensor, attn_gradients: torch.Tensor, grid: tuple[int, int],
            text_mask: torch.Tensor | None = None, skip_first: bool = True) -> torch.Tensor:
    """Grad-CAM over image patches from one cross-attention layer, as BLIP/ALBEF compute it.

    ``cam = mean over heads of (attention * relu(gradient))`` on the patch tokens.

    Args:
        attention_map: ``(B, H, L_text, N)`` saved probabilities (``get_attention_map()``).
        attn_gradients: their gradients, same shape (``get_attn_gradients()``).
        grid: ``(h, w)`` patch grid with ``h * w`` patch tokens.
        text_mask: ``(B, L_text)``; padded text positions get a zero map.
        skip_first: drop the first image token (the ViT [CLS]) before reshaping to the grid.

    Returns:
        ``(B, L_text, h, w)`` heat maps.
    """
    if attention_map.shape != attn_gradients.shape:
        raise ValueError(f"attention_map {tuple(attention_map.shape)} and attn_gradients "
                         f"{tuple(attn_gradients.shape)} must have the same shape")
    cams, grads = (attention_map[..., 1:], attn_gradients[..., 1:]) if skip_first else (attention_map, attn_gradients)
    h, w = grid
    if cams.shape[-1] != h * w:
        raise ValueError(f"{cams.shape[-1]} image tokens do not fill a {h}x{w} grid"
                         + (" (after dropping the first token)" if skip_first else ""))
    b, heads, length, _ = cams.shape
    cam = (cams * grads.clamp(min=0)).reshape(b, heads, length, h, w).mean(dim=1)
    if text_mask is not None:
        cam = cam * text_mask[:, :, None, None].to(cam.dtype)
    return cam


def render_heatmap_png(image: np.ndarray, heatmap: np.ndarray | torch.Tensor, path: str | os.PathLike,
                       alpha: float = 0.5) -> None:
    """Writes ``image`` (H, W, 3 uint8) with ``heatmap`` (h, w) upsampled over it to a PNG file.

    Needs matplotlib (``pip install bertkit[viz]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as exc:
        raise ImportError("render_heatmap_png needs matplotlib: pip install 'bertkit[viz]'") from exc
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    heat = torch.as_tensor(heatmap, dtype=torch.float32)
    if heat.dim() != 2:
        raise ValueError(f"heatmap must be (h, w), got shape {tuple(heat.shape)}")
    heat = torch.nn.functional.interpolate(heat[None, None], size=image.shape[:2], mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colored = matplotlib.colormaps["jet"](heat)[..., :3]
    base = image.astype(np.float32) / 255.0
    blended = (1 - alpha) * base + alpha * colored
    plt.imsave(os.fspath(path), np.clip(blended, 0, 1))

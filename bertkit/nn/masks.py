"""Attention masks: additive, built once per forward, ``finfo(dtype).min`` (never -10000)."""

from __future__ import annotations

import torch


def build_attention_mask(
    mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    device: torch.device,
    causal: bool = False,
    past_length: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Turns a 0/1 mask into an additive mask for attention.

    Args:
        mask: ``(B, K)`` key mask or ``(B, Q, K)`` full mask, 1 = attend; None = attend everywhere.
        causal: add the decoder's causal mask (query i sees keys ``<= i + past_length``) to a 2-D mask;
            a 3-D mask is taken as the whole mask, as HF and BLIP do.

    Returns:
        ``(additive (B, 1, Q|1, K) or None, row_keep (B, 1, Q, 1) or None)``. ``row_keep`` marks the
        query rows that can attend to something; rows that cannot are computed unmasked and then
        multiplied by 0, so they give zeros instead of NaN in every dtype.
    """
    keep = None
    if mask is not None:
        keep = mask.to(device=device, dtype=torch.bool)
        keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None, :, :]
    if causal and (mask is None or mask.dim() == 2):
        pos_q = torch.arange(past_length, past_length + q_len, device=device).view(-1, 1)
        tri = (torch.arange(k_len, device=device).view(1, -1) <= pos_q)[None, None]
        keep = tri if keep is None else keep & tri
    if keep is None or bool(keep.all()):
        return None, None  # nothing masked: SDPA's fastest path
    keep = keep.expand(batch, 1, keep.shape[2], k_len)
    alive = keep.any(dim=-1, keepdim=True)  # (B, 1, Q|1, 1)
    row_keep = None
    if not bool(alive.all()):
        keep = keep | ~alive
        row_keep = alive.to(dtype)
        if row_keep.shape[2] != q_len:
            row_keep = row_keep.expand(batch, 1, q_len, 1)
    additive = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
    return additive, row_keep

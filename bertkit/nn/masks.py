"""The attention mask of a padded batch: one small object, built once per forward, passed by keyword.

Attention takes one of two mask objects, chosen by the layout of the hidden states:

* :class:`AttentionMask` -- padded ``(B, L, hidden)`` states: an additive ``bias`` (``finfo(dtype).min``
  where masked, never -10000) and ``row_keep`` for query rows that may attend to nothing.
* :class:`bertkit.nn.padding.PackedBatch` -- packed ``(T, hidden)`` tokens: where each sequence starts.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    rows_alive = keep.any(dim=-1, keepdim=True)  # (B, 1, Q|1, 1)
    row_keep = None
    if not bool(rows_alive.all()):
        keep = keep | ~rows_alive
        row_keep = rows_alive.to(dtype)
        if row_keep.shape[2] != q_len:
            row_keep = row_keep.expand(batch, 1, q_len, 1)
    additive = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
    return additive, row_keep


@dataclass(frozen=True)
class AttentionMask:
    """The mask of a padded batch, as every attention module reads it.

    Attributes:
        bias: Additive ``(B, 1, Q|1, K)``, broadcast over heads; None when nothing is masked (SDPA's
            fastest path). Relative position scores are added to it (:meth:`plus`).
        row_keep: ``(B, 1, Q, 1)`` 1/0 per query row, or None: rows with no key to attend to are
            computed unmasked and multiplied by 0 (zeros, never NaN).
    """

    bias: torch.Tensor | None = None
    row_keep: torch.Tensor | None = None

    @classmethod
    def build(cls, mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, dtype: torch.dtype,
              device: torch.device, causal: bool = False, past_length: int = 0) -> "AttentionMask":
        """From a 0/1 ``(B, K)`` or ``(B, Q, K)`` mask; see :func:`build_attention_mask`."""
        return cls(*build_attention_mask(mask, batch, q_len, k_len, dtype, device, causal, past_length))

    def plus(self, scores: torch.Tensor) -> "AttentionMask":
        """The same mask with ``scores`` added to the bias (relative position scores)."""
        return AttentionMask(scores if self.bias is None else scores + self.bias, self.row_keep)


def as_attention_mask(mask) -> object:
    """A layer's ``attention_mask`` argument as a mask object: an AttentionMask or PackedBatch passes
    through; a bare additive tensor (or None) is wrapped, for callers that build masks themselves."""
    if mask is None or isinstance(mask, torch.Tensor):
        return AttentionMask(bias=mask)
    return mask

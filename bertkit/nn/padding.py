"""Padding-free execution: the layers run on packed tokens ``(total_tokens, hidden)``; only attention sees
the sequence structure, through :class:`PackedBatch`.

Padding is waste: with mixed-length text a padded batch spends most of its Linear/MLP FLOPs on pad
tokens. Packing removes them; attention then either re-pads q/k/v for one SDPA call (CPU) or runs
PyTorch's variable-length flash attention on the packed tensors (CUDA, fp16/bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _varlen_attn():
    # PyTorch >= 2.9 on CUDA: flash attention over packed sequences. Imported on first CUDA use only:
    # torch.nn.attention.varlen pulls in torch._dynamo (about 1 s of `import bertkit` on a CPU).
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - older PyTorch
        return None
    return varlen_attn


def right_pad(rows, value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``(ids, mask)``: ``(len(rows), width)`` int64 CPU tensors, ``ids`` right-padded with ``value``,
    ``mask`` 1 on real tokens (``width`` defaults to the longest row)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max(initial=0)) if width is None else width
    ids = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :lengths[i]] = row
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def unpad_indices(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(B, L)`` 0/1 mask -> (flat indices of kept tokens, cu_seqlens ``(B+1,)`` int32, longest length)."""
    keep = attention_mask.bool()
    indices = keep.flatten().nonzero().squeeze(1)
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def unpad(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(B, L, ...)`` -> ``(T, ...)``: the kept tokens, in row-major order (each sequence contiguous)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices)


def pad(x: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``(T, ...)`` -> ``(B, L, ...)`` with zeros where the tokens were padding; exact inverse of :func:`unpad`."""
    out = x.new_zeros(batch * length, *x.shape[1:])
    out.index_copy_(0, indices, x)
    return out.view(batch, length, *x.shape[1:])


def _repad_maps(indices: torch.Tensor, length: int, span: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For attention over ``(batch, span)``: ``gather`` (B*span,) maps each padded slot to its packed row (row 0
    for padding, which the key mask hides and :meth:`PackedBatch.attend` drops), ``positions`` (T,) maps each
    packed row to its slot."""
    positions = indices if span == length else indices // length * span + indices % length
    gather = torch.zeros(batch * span, dtype=torch.long, device=indices.device)
    gather[positions] = torch.arange(indices.numel(), device=indices.device)
    return gather, positions


@dataclass
class PackedBatch:
    """The mask of a packed batch: where each sequence starts, handed to attention in place of an
    :class:`bertkit.nn.masks.AttentionMask` (its sibling for padded batches)."""

    indices: torch.Tensor       # (T,) flat positions in the padded (B, L) batch
    cu_seqlens: torch.Tensor    # (B+1,) int32 sequence starts in the packed tensor
    max_len: int
    span: int                   # padded positions attention must cover: max_len if right-padded, else length
    batch: int
    length: int
    key_mask: torch.Tensor      # (B, 1, 1, L) additive mask for the re-padded path
    gather: torch.Tensor | None = None     # (B*span,) packed row of each re-padded slot (see _repad_maps)
    positions: torch.Tensor | None = None  # (T,) re-padded slot of each packed row

    def __post_init__(self):
        if self.gather is None:
            self.gather, self.positions = _repad_maps(self.indices, self.length, self.span, self.batch)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, dtype: torch.dtype) -> "PackedBatch":
        indices, cu_seqlens, max_len = unpad_indices(attention_mask)
        batch, length = attention_mask.shape
        key_mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=attention_mask.device)
        key_mask.masked_fill_(~attention_mask.bool()[:, None, None, :], torch.finfo(dtype).min)
        # With right padding every token sits before max_len, so the re-padded path can stop there.
        right_padded = not bool(attention_mask[:, max_len:].any())
        return cls(indices, cu_seqlens, max_len, max_len if right_padded else length, batch, length, key_mask)

    @classmethod
    def from_lengths(cls, lengths: list[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> "PackedBatch":
        """From the sequence lengths alone (right-padded layout), computed on the host: no padded mask and no
        device sync, for callers that pack token lists themselves. Equal to :meth:`from_mask` of the
        right-padded mask of these lengths."""
        if not len(lengths) or min(lengths) < 1:
            raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
        n = np.asarray(lengths, dtype=np.int64)
        batch, max_len = len(n), int(n.max())
        starts = np.concatenate([[0], np.cumsum(n)])
        rows = np.repeat(np.arange(batch), n)
        indices = rows * max_len + (np.arange(int(starts[-1])) - np.repeat(starts[:-1], n))
        keep = np.arange(max_len)[None, :] < n[:, None]
        key_mask = torch.from_numpy(np.where(keep, 0.0, torch.finfo(dtype).min)).to(dtype).view(batch, 1, 1, max_len)
        gather = np.zeros(batch * max_len, dtype=np.int64)
        gather[indices] = np.arange(indices.size)
        as_tensor = (lambda a, **kw: torch.from_numpy(a).to(device, **kw))
        return cls(as_tensor(indices), as_tensor(starts, dtype=torch.int32), max_len, max_len, batch, max_len,
                   key_mask.to(device), as_tensor(gather), as_tensor(indices))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
        """Attention per sequence on packed ``(T, heads, D)`` tensors; returns ``(T, heads, D)``."""
        varlen = _varlen_attn() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0 \
            else None
        if varlen is not None:
            return varlen(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len, scale=scale)
        if q.shape[0] == self.batch * self.length:
            # No padding at all (equal lengths: long texts truncated alike, sorted batches): the packed rows are
            # the padded batch already. Views instead of the pad/unpad copies (17% of a 256-token CPU batch).
            out = F.scaled_dot_product_attention(*(t.view(self.batch, self.length, *t.shape[1:]).transpose(1, 2)
                                                   for t in (q, k, v)), dropout_p=dropout_p, scale=scale)
            return out.transpose(1, 2).reshape(q.shape)
        # Re-pad (to the longest sequence when right-padded) with one gather per tensor, one SDPA call, one
        # gather back. Padded slots hold a copy of row 0: the key mask hides them as keys, and their query
        # rows are never gathered back (a zero-filled buffer and index_copy_ cost twice as much).
        span = self.span
        qp, kp, vp = (t.index_select(0, self.gather).view(self.batch, span, *t.shape[1:]).transpose(1, 2)
                      for t in (q, k, v))
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=self.key_mask[..., :span],
                                             dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).reshape(self.batch * span, *q.shape[1:]).index_select(0, self.positions)

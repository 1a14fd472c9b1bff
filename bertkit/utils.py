"""The helper functions that vendored BERTs (BLIP's med.py, DPR, GroundingDINO, ...) import from
``transformers``, with their classic signatures, so such code can import them from here instead."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _min(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def get_extended_attention_mask(attention_mask: torch.Tensor, input_shape: tuple[int, ...],
                                device: torch.device | None = None, is_decoder: bool = False,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turns a 0/1 mask into the additive ``(B, 1, Q|1, K)`` mask (``finfo(dtype).min`` where masked).

    A 3-D mask ``(B, Q, K)`` is used as given; a 2-D mask gets the causal mask added when
    ``is_decoder`` (keys beyond the mask's length, i.e. a cached prefix, stay visible).
    """
    if attention_mask.dim() == 3:
        extended = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        if is_decoder:
            batch, q_len = input_shape[0], input_shape[1]
            k_len = attention_mask.shape[1]
            past = k_len - q_len
            pos_q = torch.arange(past, past + q_len, device=attention_mask.device).view(-1, 1)
            causal = (torch.arange(k_len, device=attention_mask.device).view(1, -1) <= pos_q)
            extended = causal[None, None].to(attention_mask.dtype) * attention_mask[:, None, None, :]
        else:
            extended = attention_mask[:, None, None, :]
    else:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} for input shape {tuple(input_shape)}; "
            "it must be (batch, seq_len) or (batch, seq_len, seq_len)"
        )
    extended = extended.to(dtype)
    return (1.0 - extended) * _min(dtype)


def invert_attention_mask(encoder_attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 encoder mask ``(B, K)`` or ``(B, Q, K)`` -> additive mask broadcastable over heads."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    elif encoder_attention_mask.dim() == 2:
        extended = encoder_attention_mask[:, None, None, :]
    else:
        raise ValueError(f"encoder_attention_mask must be 2-D or 3-D, got shape {tuple(encoder_attention_mask.shape)}")
    extended = extended.to(dtype)
    return (1.0 - extended) * _min(dtype)


def get_head_mask(head_mask: torch.Tensor | None, num_hidden_layers: int, is_attention_chunked: bool = False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor | list[None]:
    """``(H,)`` or ``(layers, H)`` -> ``(layers, 1, H, 1, 1)``; None -> ``[None] * layers``."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    else:
        raise ValueError(f"head_mask has shape {tuple(head_mask.shape)}; use (num_heads,) or (num_layers, num_heads)")
    if head_mask.shape[0] != num_hidden_layers:
        raise ValueError(
            f"head_mask has shape {tuple(head_mask.shape[0:1]) + tuple(head_mask.shape[2:3])} but the model has "
            f"{num_hidden_layers} layers"
        )
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask.to(dtype)


def apply_chunking_to_forward(forward_fn: Callable[..., torch.Tensor], chunk_size: int, chunk_dim: int,
                              *input_tensors: torch.Tensor) -> torch.Tensor:
    """Applies ``forward_fn`` to slices of ``chunk_size`` along ``chunk_dim`` and concatenates: same result,
    lower peak memory for position-wise layers."""
    if not input_tensors:
        raise ValueError("apply_chunking_to_forward needs at least one input tensor")
    if chunk_size <= 0:
        return forward_fn(*input_tensors)
    length = input_tensors[0].shape[chunk_dim]
    for t in input_tensors:
        if t.shape[chunk_dim] != length:
            raise ValueError(f"all inputs must have the same size along dim {chunk_dim}: {t.shape[chunk_dim]} != {length}")
    if length % chunk_size != 0:
        raise ValueError(f"the size along dim {chunk_dim} ({length}) must be a multiple of chunk_size ({chunk_size})")
    chunks = zip(*(t.chunk(length // chunk_size, dim=chunk_dim) for t in input_tensors))
    return torch.cat([forward_fn(*c) for c in chunks], dim=chunk_dim)


def find_pruneable_heads_and_indices(heads: Iterable[int], n_heads: int, head_size: int,
                                     already_pruned_heads: set[int]) -> tuple[set[int], torch.LongTensor]:
    """Heads (original numbering) still present to prune, and the flat indices of the dims to keep.

    Raises:
        ValueError: a head index outside ``[0, n_heads + len(already_pruned_heads))``.
    """
    total = n_heads + len(already_pruned_heads)
    heads = set(int(h) for h in heads)
    bad = sorted(h for h in heads if not 0 <= h < total)
    if bad:
        raise ValueError(f"cannot prune heads {bad}: the layer has heads 0..{total - 1}")
    heads = heads - already_pruned_heads
    mask = torch.ones(n_heads, head_size)
    for head in heads:
        # Positions shift left by the number of heads already removed before this one.
        head -= sum(1 for h in already_pruned_heads if h < head)
        mask[head] = 0
    index = torch.arange(n_heads * head_size)[mask.view(-1).eq(1)].long()
    return heads, index


def prune_linear_layer(layer: nn.Linear, index: torch.LongTensor, dim: int = 0) -> nn.Linear:
    """A new Linear keeping only ``index`` along ``dim`` (0 = outputs, 1 = inputs), weights copied."""
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().clone() if dim == 1 else layer.bias[index].detach().clone()
    size = list(layer.weight.shape)
    size[dim] = len(index)
    new = nn.Linear(size[1], size[0], bias=bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad = layer.weight.requires_grad
    if bias is not None:
        new.bias.requires_grad = layer.bias.requires_grad
    return new

"""Self- and cross-attention on one module: project q/k/v, then one attention function, chosen once.

=====================  ====================================================================================
``packed_attention``   the mask is a :class:`PackedBatch`: packed ``(T, hidden)`` tokens, attention per
                       sequence (varlen flash attention on CUDA, re-padded SDPA elsewhere)
``sdpa_attention``     the default: ``F.scaled_dot_product_attention``, no probabilities
``eager_attention``    explicit softmax, when the probabilities are needed: ``output_attentions``,
                       ``head_mask``, ``save_attention`` (Grad-CAM), enabled QDQ matmul quantizers,
                       ``config.attn_implementation == "eager"``
=====================  ====================================================================================

Each function takes ``(module, q, k, v, mask, head_mask)`` with q/k/v as ``(B, heads, L, D)`` (``(T, heads,
D)`` when packed) and returns ``(context, probabilities or None)``, context with tokens before heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BertConfig
from . import fusion
from .masks import AttentionMask
from .padding import PackedBatch

# QDQ-BERT hook points (pytorch-quantization's names) on the inputs of the two matmuls: q, k, v and the
# probabilities ("a"). bertkit.quant.quantize() registers a TensorQuantizer under each name; a float
# model has none of them, so its path stays bit for bit the float one.
MATMUL_QUANTIZERS = ("matmul_q_input_quantizer", "matmul_k_input_quantizer", "matmul_v_input_quantizer",
                     "matmul_a_input_quantizer")


def _dropout_p(module: nn.Module) -> float:
    return module.dropout.p if module.training else 0.0


def sdpa_attention(module, q, k, v, mask: AttentionMask, head_mask=None):
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias, dropout_p=_dropout_p(module),
                                             scale=module.scaling)
    if mask.row_keep is not None:
        context = context * mask.row_keep
    return context.transpose(1, 2), None


def eager_attention(module, q, k, v, mask: AttentionMask, head_mask=None):
    scores = torch.matmul(q, k.transpose(-1, -2)) * module.scaling
    if mask.bias is not None:
        scores = scores + mask.bias
    probs = scores.softmax(dim=-1)
    if mask.row_keep is not None:
        probs = probs * mask.row_keep
    if module.save_attention:
        module.save_attention_map(probs)
        if probs.requires_grad:
            probs.register_hook(module.save_attn_gradients)
    probs = module.dropout(probs)
    if head_mask is not None:
        probs = probs * head_mask
    weights = module.matmul_a_input_quantizer(probs) if module.quantizes_matmuls else probs
    return torch.matmul(weights, v).transpose(1, 2), probs


def packed_attention(module, q, k, v, mask: PackedBatch, head_mask=None):
    return mask.attend(q, k, v, module.scaling, _dropout_p(module)), None


class BertSelfAttention(nn.Module):
    """Multi-head attention with HF's parameter names (``query``, ``key``, ``value``).

    One module serves self-attention and cross-attention: for cross-attention the keys and values
    come from ``kv_states`` (image features in BLIP, of width ``config.encoder_width``).
    """

    quantizer_hooks = MATMUL_QUANTIZERS  # see MATMUL_QUANTIZERS; called in forward and eager_attention

    def __init__(self, config: BertConfig, is_cross_attention: bool = False, pruned_heads: int = 0):
        super().__init__()
        self.config = config
        self.is_cross_attention = is_cross_attention
        self.num_attention_heads = config.num_attention_heads - pruned_heads
        self.attention_head_size = config.head_dim
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size ** -0.5
        kv_width = (config.encoder_width or config.hidden_size) if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_width, self.all_head_size)
        self.value = nn.Linear(kv_width, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        # As in HF, cross-attention always uses absolute positions (there is no distance between a
        # text token and an image patch).
        self.position_embedding_type = "absolute" if is_cross_attention else config.position_embedding_type
        if self.position_embedding_type != "absolute":
            self.max_position_embeddings = config.max_position_embeddings
            self.distance_embedding = nn.Embedding(2 * config.max_position_embeddings - 1, self.attention_head_size)

    # BLIP's med.py API for Grad-CAM: set `save_attention = True` on a module to keep its attention
    # probabilities and, on backward, their gradients. Off by default, and then it costs one bool check.
    save_attention = False

    def save_attention_map(self, attention_map: torch.Tensor) -> None:
        self.attention_map = attention_map

    def get_attention_map(self) -> torch.Tensor:
        return self.attention_map

    def save_attn_gradients(self, attn_gradients: torch.Tensor) -> None:
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self) -> torch.Tensor:
        return self.attn_gradients

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, H*D) -> (B, H, L, D)
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def _project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # CPU inference: one oneDNN GEMM over the stacked weights, cached (bertkit.nn.fusion).
        # config.fused_qkv: one GEMM with the three weight matrices stacked (built per call from the
        # same parameters, so state-dict names, training and pruning are untouched). Quantized
        # (QuantLinear) projections keep their own path.
        linears = (self.query, self.key, self.value)
        if fusion.applies(self, hidden_states, *linears):
            stacked = self.__dict__.get("_stacked_qkv")
            if stacked is None:
                stacked = self.__dict__["_stacked_qkv"] = fusion.StackedLinear()
            return stacked(hidden_states, linears).split(self.all_head_size, dim=-1)
        if (self.config.fused_qkv and all(type(m) is nn.Linear and m.bias is not None
                                          for m in (self.query, self.key, self.value))):
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            return F.linear(hidden_states, weight, bias).split(self.all_head_size, dim=-1)
        return self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)

    def _relative_scores(self, q: torch.Tensor, k: torch.Tensor, past_length: int) -> torch.Tensor:
        # Scores of query i against key j from the embedding of their distance (Shaw et al. 2018),
        # with query positions offset by the cached length so a KV-cache step sees the same distances.
        q_len, k_len = q.shape[2], k.shape[2]
        pos_q = torch.arange(past_length, past_length + q_len, device=q.device).view(-1, 1)
        pos_k = torch.arange(k_len, device=q.device).view(1, -1)
        distance = (pos_q - pos_k).clamp(-(self.max_position_embeddings - 1), self.max_position_embeddings - 1)
        emb = self.distance_embedding(distance + self.max_position_embeddings - 1).to(q.dtype)  # (Q, K, D)
        scores = torch.einsum("bhld,lrd->bhlr", q, emb)
        if self.position_embedding_type == "relative_key_query":
            scores = scores + torch.einsum("bhrd,lrd->bhlr", k, emb)
        return scores

    @property
    def quantizes_matmuls(self) -> bool:
        """True when QDQ quantizers act on the matmul inputs. The four act together, switched by the one
        on the probabilities: enabled, they need the explicit path (the probabilities themselves are
        quantized); disabled, the float computation stays untouched, bit for bit."""
        quantizer = self._modules.get("matmul_a_input_quantizer")  # absent in a float model
        return quantizer is not None and quantizer.is_enabled

    @property
    def needs_padded_layout(self) -> bool:
        """True when this module cannot run on packed tokens (see :class:`bertkit.nn.padding.PackedBatch`):
        relative positions, the explicit softmax, saved attention maps, enabled matmul quantizers, or every
        head pruned."""
        return (self.position_embedding_type != "absolute" or self.config.attn_implementation == "eager"
                or self.save_attention or self.quantizes_matmuls or self.num_attention_heads == 0)

    def _project(self, hidden_states, kv_states, past_key_value):
        """q, k, v as ``(B, heads, L, D)``, with the cache prepended to k/v; and the cached length."""
        past_length = 0
        if self.is_cross_attention:
            q = self._heads(self.query(hidden_states))
            if past_key_value is not None:  # keys/values of the image are computed once per sequence
                k, v = past_key_value
            else:
                k, v = self._heads(self.key(kv_states)), self._heads(self.value(kv_states))
        else:
            q, k, v = (self._heads(x) for x in self._project_qkv(hidden_states))
            if past_key_value is not None:
                past_length = past_key_value[0].shape[2]
                k = torch.cat([past_key_value[0], k], dim=2)
                v = torch.cat([past_key_value[1], v], dim=2)
        return q, k, v, past_length

    def _attention_function(self, output_attentions: bool, head_mask):
        if (output_attentions or head_mask is not None or self.save_attention or self.quantizes_matmuls
                or self.config.attn_implementation == "eager"):
            return eager_attention
        return sdpa_attention

    def forward(self, hidden_states: torch.Tensor, attention_mask: AttentionMask | PackedBatch | None = None,
                kv_states: torch.Tensor | None = None, past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
                head_mask: torch.Tensor | None = None, output_attentions: bool = False, use_cache: bool = False):
        """Returns ``(context (..., L, H*D), probabilities or None, (key, value) or None)``.

        ``attention_mask`` is an :class:`AttentionMask` for padded ``(B, L, hidden)`` states, or a
        :class:`PackedBatch` for packed ``(T, hidden)`` tokens (no cache, no probabilities there).
        """
        if isinstance(attention_mask, PackedBatch):
            t = hidden_states.shape[0]
            q, k, v = (x.view(t, self.num_attention_heads, self.attention_head_size)
                       for x in self._project_qkv(hidden_states))
            context, _ = packed_attention(self, q, k, v, attention_mask)
            return context.reshape(t, self.all_head_size), None, None
        mask = attention_mask if attention_mask is not None else AttentionMask()
        q, k, v, past_length = self._project(hidden_states, kv_states, past_key_value)
        present = (k, v) if use_cache else None
        if self.position_embedding_type != "absolute":
            # HF adds relative scores before scaling; SDPA scales q.k only, so scale them here.
            mask = mask.plus(self._relative_scores(q, k, past_length) * self.scaling)
        attend = self._attention_function(output_attentions, head_mask)
        if self.quantizes_matmuls:
            q = self.matmul_q_input_quantizer(q)
            k = self.matmul_k_input_quantizer(k)
            v = self.matmul_v_input_quantizer(v)
        context, probs = attend(self, q, k, v, mask, head_mask)
        context = context.reshape(*hidden_states.shape[:-1], self.all_head_size)
        return context, (probs if output_attentions else None), present

"""Self- and cross-attention on one module, SDPA by default, explicit softmax when probabilities are needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BertConfig
from .padding import PackedBatch


class BertSelfAttention(nn.Module):
    """Multi-head attention with HF's parameter names (``query``, ``key``, ``value``).

    One module serves self-attention and cross-attention: for cross-attention the keys and values
    come from ``kv_states`` (image features in BLIP, of width ``config.encoder_width``).
    """

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
        # config.fused_qkv: one GEMM with the three weight matrices stacked (built per call from the
        # same parameters, so state-dict names, training and pruning are untouched). Quantized
        # (QuantLinear) projections keep their own path.
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_states: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        head_mask: torch.Tensor | None = None,
        row_keep: torch.Tensor | None = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ):
        """Returns ``(context (B, L, H*D), probabilities or None, (key, value) or None)``.

        ``attention_mask`` is additive, broadcastable to (B, H, Q, K); ``row_keep`` (B, 1, Q, 1) zeroes
        query rows that may attend to nothing, so they give zeros rather than NaN.
        """
        if isinstance(attention_mask, PackedBatch):
            # Padding-free path: (T, hidden) tokens; the packed batch knows where each sequence starts.
            t = hidden_states.shape[0]
            q, k, v = (x.view(t, self.num_attention_heads, self.attention_head_size)
                       for x in self._project_qkv(hidden_states))
            context = attention_mask.attend(q, k, v, self.scaling, self.dropout.p if self.training else 0.0)
            return context.reshape(t, self.all_head_size), None, None
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
        present = (k, v) if use_cache else None

        bias = attention_mask
        if self.position_embedding_type != "absolute":
            # HF adds relative scores before scaling; SDPA scales q.k only, so scale them here.
            rel = self._relative_scores(q, k, past_length) * self.scaling
            bias = rel if bias is None else rel + bias

        dropout_p = self.dropout.p if self.training else 0.0
        eager = (output_attentions or head_mask is not None or self.save_attention
                 or self.config.attn_implementation == "eager")
        # QDQ-BERT (bertkit.quant.quantize) adds fake quantizers on the four matmul inputs. Enabled ones
        # need the explicit path, since the probabilities themselves are quantized; disabled ones leave the
        # float computation untouched, bit for bit.
        quant = self._modules.get("matmul_a_input_quantizer")
        if quant is not None and quant.is_enabled:
            eager = True
            q = self.matmul_q_input_quantizer(q)
            k = self.matmul_k_input_quantizer(k)
            v = self.matmul_v_input_quantizer(v)
        else:
            quant = None
        if eager:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
            if bias is not None:
                scores = scores + bias
            probs = scores.softmax(dim=-1)
            if row_keep is not None:
                probs = probs * row_keep
            if self.save_attention:
                self.save_attention_map(probs)
                if probs.requires_grad:
                    probs.register_hook(self.save_attn_gradients)
            probs = self.dropout(probs)
            if head_mask is not None:
                probs = probs * head_mask
            context = torch.matmul(probs if quant is None else quant(probs), v)
        else:
            probs = None
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.scaling)
            if row_keep is not None:
                context = context * row_keep
        context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
        return context, (probs if output_attentions else None), present

"""The transformer layer and encoder. One flag, ``config.norm_placement``, gives BERT or Megatron-BERT:

    post (BERT):           x = LN(x + attn(x));     x = LN(x + mlp(x))
    pre  (Megatron-BERT):  x = x + attn(ln(x));     x = x + mlp(ln(x));  final ln after the last layer

Module names follow each variant's HF state dict, so checkpoints load by name: BERT keeps its
norms in ``attention.output.LayerNorm`` / ``output.LayerNorm`` (the TensorFlow spelling, kept for
checkpoint compatibility); Megatron keeps them in ``attention.ln`` / ``ln`` / ``encoder.ln``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import BertConfig
from ..utils import find_pruneable_heads_and_indices, prune_linear_layer
from .activations import get_activation
from .attention import BertSelfAttention


class BertSelfOutput(nn.Module):
    """Projection after attention and the residual add (with the post-LayerNorm for BERT)."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size if in_features is None else in_features, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if not config.pre_norm:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        if "add_local_input_quantizer" in self._modules:
            # QDQ-BERT quantizes both inputs of the residual add (names as in pytorch-quantization checkpoints).
            hidden_states = self.add_local_input_quantizer(hidden_states)
            residual = self.add_residual_input_quantizer(residual)
        if hasattr(self, "LayerNorm"):
            return self.LayerNorm(hidden_states + residual)
        return hidden_states + residual


# The MLP's second half has the same shape of computation: dense, dropout, residual, (LayerNorm).
class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config, in_features=config.intermediate_size)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertAttention(nn.Module):
    """Attention block: (pre-norm ``ln``), ``self`` (the heads) and ``output`` (projection + residual)."""

    def __init__(self, config: BertConfig, is_cross_attention: bool = False, pruned_heads: Iterable[int] = ()):
        super().__init__()
        if config.pre_norm:
            self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Heads removed so far, in the original numbering (a checkpoint saved after pruning has the
        # smaller shapes already; config.pruned_heads says which heads are gone).
        self.pruned_heads = set(pruned_heads)
        self.self = BertSelfAttention(config, is_cross_attention=is_cross_attention,
                                      pruned_heads=len(self.pruned_heads))
        self.output = BertSelfOutput(config, in_features=self.self.all_head_size)

    def prune_heads(self, heads: Iterable[int]) -> None:
        """Removes heads (original numbering) from the q/k/v projections and the output projection."""
        heads, index = find_pruneable_heads_and_indices(heads, self.self.num_attention_heads,
                                                        self.self.attention_head_size, self.pruned_heads)
        if not heads:
            return
        attn = self.self
        attn.query, attn.key, attn.value = (prune_linear_layer(m, index) for m in (attn.query, attn.key, attn.value))
        self.output.dense = prune_linear_layer(self.output.dense, index, dim=1)
        attn.num_attention_heads -= len(heads)
        attn.all_head_size = attn.num_attention_heads * attn.attention_head_size
        self.pruned_heads |= heads

    def forward(self, hidden_states, attention_mask=None, kv_states=None, past_key_value=None, head_mask=None,
                row_keep=None, output_attentions=False, use_cache=False):
        normed = self.ln(hidden_states) if hasattr(self, "ln") else hidden_states
        if self.self.num_attention_heads == 0:
            # Every head pruned: the block adds only the output bias to the residual stream.
            context = normed.new_zeros(*normed.shape[:-1], 0)
            probs = None
            if output_attentions:
                k_len = (kv_states if kv_states is not None else hidden_states).shape[1]
                probs = normed.new_zeros(normed.shape[0], 0, normed.shape[1], k_len)
            return self.output(context, hidden_states), probs, None
        if head_mask is not None and self.pruned_heads:
            # The mask is given for the original heads; keep the entries of the heads still here.
            kept = [h for h in range(head_mask.shape[1]) if h not in self.pruned_heads]
            head_mask = head_mask[:, kept]
        context, probs, present = self.self(normed, attention_mask, kv_states, past_key_value, head_mask,
                                            row_keep, output_attentions, use_cache)
        return self.output(context, hidden_states), probs, present


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.attention = BertAttention(config, pruned_heads=config.pruned_heads.get(layer_idx, ()))
        # Cross-attention exists whenever the config asks for it; BLIP's image-grounded encoder uses it too.
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        if config.pre_norm:
            self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def feed_forward(self, attention_output: torch.Tensor) -> torch.Tensor:
        normed = self.ln(attention_output) if hasattr(self, "ln") else attention_output
        return self.output(self.intermediate(normed), attention_output)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                head_mask=None, past_key_value=None, row_keep=None, encoder_row_keep=None,
                output_attentions=False, use_cache=False):
        """Returns ``(hidden_states, self_probs, cross_probs, present_key_value)``.

        ``past_key_value`` is the legacy tuple layout: (self key, self value[, cross key, cross value]).
        """
        self_past = past_key_value[:2] if past_key_value is not None else None
        out, self_probs, present = self.attention(hidden_states, attention_mask, None, self_past, head_mask,
                                                  row_keep, output_attentions, use_cache)
        cross_probs = None
        cross_past = past_key_value[2:4] if past_key_value is not None and len(past_key_value) == 4 else None
        if encoder_hidden_states is not None or cross_past is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError(
                    "encoder_hidden_states were given but the model has no cross-attention; "
                    "build it with config.add_cross_attention=True"
                )
            out, cross_probs, cross_present = self.crossattention(
                out, encoder_attention_mask, encoder_hidden_states, cross_past, head_mask, encoder_row_keep,
                output_attentions, use_cache)
            if use_cache:
                present = present + cross_present
        chunk = self.config.chunk_size_feed_forward
        if chunk and out.dim() == 3 and out.shape[1] > chunk:
            # Position-wise MLP in slices of the sequence: same numbers, smaller peak memory.
            out = torch.cat([self.feed_forward(part) for part in out.split(chunk, dim=1)], dim=1)
        else:
            out = self.feed_forward(out)
        return out, self_probs, cross_probs, present


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        if config.pre_norm:
            self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                head_mask=None, past_key_values=None, row_keep=None, encoder_row_keep=None,
                output_attentions=False, output_hidden_states=False, use_cache=False):
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_self, all_cross = ((), ()) if output_attentions else (None, None)
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Warned here, once per forward, not once per layer.
            warnings.warn("use_cache=True does not work with gradient checkpointing; setting use_cache=False",
                          stacklevel=3)
            use_cache = False
        presents = () if use_cache else None
        for i, layer in enumerate(self.layer):
            layer_head_mask = head_mask[i] if head_mask is not None else None
            enc_states, enc_mask, enc_keep = encoder_hidden_states, encoder_attention_mask, encoder_row_keep
            if isinstance(enc_states, list):  # several images (NLVR2): layer i attends to image i % n
                j = i % len(enc_states)
                enc_states, enc_mask, enc_keep = enc_states[j], enc_mask[j], enc_keep[j]
            past = past_key_values[i] if past_key_values is not None else None
            args = (hidden_states, attention_mask, enc_states, enc_mask, layer_head_mask,
                    past, row_keep, enc_keep, output_attentions, use_cache)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states, self_probs, cross_probs, present = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states, self_probs, cross_probs, present = layer(*args)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_self += (self_probs,)
                if cross_probs is not None:
                    all_cross += (cross_probs,)
            if use_cache:
                presents += (present,)
        if hasattr(self, "ln"):
            # Megatron-BERT: one final LayerNorm. As in HF, the last entry of hidden_states is the normalised
            # output; the earlier ones stay un-normalised.
            hidden_states = self.ln(hidden_states)
            if output_hidden_states:
                all_hidden = all_hidden[:-1] + (hidden_states,)
        return hidden_states, all_hidden, all_self, (all_cross or None) if output_attentions else None, presents

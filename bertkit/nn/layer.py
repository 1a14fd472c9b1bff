"""The transformer layer and encoder. One flag, ``config.norm_placement``, gives BERT or Megatron-BERT.

Every norm is a *slot*: a LayerNorm where the variant has one, ``nn.Identity()`` (no state, so no
checkpoint key) where it has none. Both layouts then run the same lines: each block is
``x = post(x + branch(pre(x)))``::

    post (BERT)                                 pre (Megatron-BERT)
    embeddings -> LayerNorm                     embeddings                      (LayerNorm = Identity)
    +-- layer ---------------------------+      +-- layer ---------------------------+
    | x = LN(x + attn(x))                |      | x = x + attn(ln(x))                |
    |     attention.output.LayerNorm     |      |     attention.ln                   |
    | x = LN(x + mlp(x))                 |      | x = x + mlp(ln(x))                 |
    |     output.LayerNorm               |      |     ln                             |
    +------------------------------------+      +------------------------------------+
    (attention.ln, ln, encoder.ln = Identity)   encoder.ln after the last layer
                                                (attention.output.LayerNorm, output.LayerNorm = Identity)

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
from . import fusion
from .attention import BertSelfAttention
from .masks import AttentionMask, as_attention_mask
from .padding import PackedBatch

# QDQ-BERT hook points (pytorch-quantization's names) on both inputs of each residual add: the branch
# ("local") and the residual. bertkit.quant.quantize() registers a TensorQuantizer under each name; a
# float model has none of them.
ADD_QUANTIZERS = ("add_local_input_quantizer", "add_residual_input_quantizer")


def norm_slot(config: BertConfig, present: bool) -> nn.Module:
    """A LayerNorm where the variant has one, else ``nn.Identity()`` (no parameters, no checkpoint key)."""
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if present else nn.Identity()


class BertSelfOutput(nn.Module):
    """Projection after attention and the residual add, then the post-norm slot: ``LayerNorm(branch + residual)``."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size if in_features is None else in_features, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = norm_slot(config, not config.pre_norm)

    quantizer_hooks = ADD_QUANTIZERS  # see ADD_QUANTIZERS

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if "add_local_input_quantizer" not in self._modules and fusion.applies(self, hidden_states, self.dense):
            # CPU inference: the residual add in the GEMM's epilogue (bertkit.nn.fusion); dropout is off in eval.
            return self.LayerNorm(fusion.linear_add(hidden_states, self.dense, residual))
        hidden_states = self.dropout(self.dense(hidden_states))
        if "add_local_input_quantizer" in self._modules:  # QDQ-BERT (absent in a float model)
            hidden_states = self.add_local_input_quantizer(hidden_states)
            residual = self.add_residual_input_quantizer(residual)
        return self.LayerNorm(hidden_states + residual)


# The MLP's second half has the same shape of computation: dense, dropout, residual, post-norm slot.
class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config, in_features=config.intermediate_size)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)
        self.gelu_algorithm = fusion.GELU_ALGORITHMS.get(config.hidden_act)  # None: no fused kernel for it

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gelu_algorithm is not None and fusion.applies(self, hidden_states, self.dense):
            # CPU inference: the GELU in the GEMM's epilogue (bertkit.nn.fusion).
            return fusion.linear_act(hidden_states, self.dense, self.gelu_algorithm)
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertAttention(nn.Module):
    """Attention block: pre-norm slot ``ln``, ``self`` (the heads), ``output`` (projection, residual, post-norm)."""

    def __init__(self, config: BertConfig, is_cross_attention: bool = False, pruned_heads: Iterable[int] = ()):
        super().__init__()
        self.ln = norm_slot(config, config.pre_norm)
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
                output_attentions=False, use_cache=False):
        """Returns ``(hidden_states, probabilities or None, (key, value) or None)``."""
        normed = self.ln(hidden_states)
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
        context, probs, present = self.self(normed, attention_mask=attention_mask, kv_states=kv_states,
                                            past_key_value=past_key_value, head_mask=head_mask,
                                            output_attentions=output_attentions, use_cache=use_cache)
        return self.output(context, hidden_states), probs, present


class BertLayer(nn.Module):
    """Self-attention, cross-attention when the config has it, then the MLP; see the module docstring."""

    def __init__(self, config: BertConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.attention = BertAttention(config, pruned_heads=config.pruned_heads.get(layer_idx, ()))
        # Cross-attention exists whenever the config asks for it; BLIP's image-grounded encoder uses it too.
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.ln = norm_slot(config, config.pre_norm)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def feed_forward(self, attention_output: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(self.ln(attention_output)), attention_output)

    def forward(self, hidden_states, attention_mask: AttentionMask | PackedBatch | None = None,
                encoder_hidden_states=None, encoder_attention_mask: AttentionMask | None = None, *,
                head_mask=None, past_key_value=None, output_attentions=False, use_cache=False):
        """Returns ``(hidden_states, self_probs, cross_probs, present_key_value)``.

        The masks are mask objects (:class:`AttentionMask`, or :class:`PackedBatch` for packed tokens); a
        bare additive tensor is accepted too. ``past_key_value`` is the legacy tuple layout: (self key,
        self value[, cross key, cross value]).
        """
        self_past = past_key_value[:2] if past_key_value is not None else None
        out, self_probs, present = self.attention(
            hidden_states, attention_mask=as_attention_mask(attention_mask), past_key_value=self_past,
            head_mask=head_mask, output_attentions=output_attentions, use_cache=use_cache)
        cross_probs = None
        cross_past = past_key_value[2:4] if past_key_value is not None and len(past_key_value) == 4 else None
        if encoder_hidden_states is not None or cross_past is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError(
                    "encoder_hidden_states were given but the model has no cross-attention; "
                    "build it with config.add_cross_attention=True"
                )
            out, cross_probs, cross_present = self.crossattention(
                out, attention_mask=as_attention_mask(encoder_attention_mask), kv_states=encoder_hidden_states,
                past_key_value=cross_past, head_mask=head_mask, output_attentions=output_attentions,
                use_cache=use_cache)
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
        self.ln = norm_slot(config, config.pre_norm)  # Megatron-BERT's final LayerNorm
        self.gradient_checkpointing = False

    @property
    def needs_padded_layout(self) -> bool:
        """True when some layer's self-attention cannot run on packed tokens (see BertSelfAttention)."""
        return any(layer.attention.self.needs_padded_layout for layer in self.layer)

    def forward(self, hidden_states, *, attention_mask: AttentionMask | PackedBatch, encoder_hidden_states=None,
                encoder_attention_mask=None, head_mask=None, past_key_values=None, output_attentions=False,
                output_hidden_states=False, use_cache=False):
        """Returns ``(hidden_states, all hidden states, self probs, cross probs, presents)``.

        ``encoder_hidden_states`` / ``encoder_attention_mask`` may be lists (NLVR2's two images): layer
        ``i`` then attends to entry ``i % len(list)``.
        """
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_self, all_cross = ((), ()) if output_attentions else (None, None)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if use_cache and checkpointing:
            # Warned here, once per forward, not once per layer.
            warnings.warn("use_cache=True does not work with gradient checkpointing; setting use_cache=False",
                          stacklevel=3)
            use_cache = False
        presents = () if use_cache else None
        # One decision per forward on the CPU fusions (nn/fusion.py: new row counts of small batches run unfused).
        with fusion.forward_scope(hidden_states):
            for i, layer in enumerate(self.layer):
                enc_states, enc_mask = encoder_hidden_states, encoder_attention_mask
                if isinstance(enc_states, list):  # several images (NLVR2): layer i attends to image i % n
                    j = i % len(enc_states)
                    enc_states, enc_mask = enc_states[j], enc_mask[j]
                kwargs = dict(attention_mask=attention_mask, encoder_hidden_states=enc_states,
                              encoder_attention_mask=enc_mask,
                              head_mask=head_mask[i] if head_mask is not None else None,
                              past_key_value=past_key_values[i] if past_key_values is not None else None,
                              output_attentions=output_attentions, use_cache=use_cache)
                if checkpointing:
                    hidden_states, self_probs, cross_probs, present = checkpoint(
                        layer, hidden_states, use_reentrant=False, **kwargs)
                else:
                    hidden_states, self_probs, cross_probs, present = layer(hidden_states, **kwargs)
                if output_hidden_states:
                    all_hidden += (hidden_states,)
                if output_attentions:
                    all_self += (self_probs,)
                    if cross_probs is not None:
                        all_cross += (cross_probs,)
                if use_cache:
                    presents += (present,)
        # Megatron-BERT's final LayerNorm (Identity for BERT). As in HF, the last entry of hidden_states is
        # the normalised output; the earlier ones stay un-normalised.
        hidden_states = self.ln(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        return hidden_states, all_hidden, all_self, (all_cross or None) if output_attentions else None, presents

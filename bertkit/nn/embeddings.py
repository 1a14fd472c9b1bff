"""Word + position + token-type embeddings (LayerNorm after them only for post-norm BERT)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import BertConfig


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        # Created for relative position types too (unused there), as HF does, so their checkpoints load cleanly.
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.type_vocab_size:  # BLIP's text model has none
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        # A norm slot (see nn/layer.py): LayerNorm for BERT, Identity for Megatron-BERT, which normalises
        # inside each layer instead.
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if not config.pre_norm \
            else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                past_length: int = 0) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if hasattr(self, "token_type_embeddings"):
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.config.position_embedding_type == "absolute":
            if position_ids is None:
                position_ids = torch.arange(past_length, past_length + x.shape[-2], device=x.device)
            x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))

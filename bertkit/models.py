"""BertModel and the task models: the one core plus a head plus HF's loss, each a few lines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BertConfig
from .nn.embeddings import BertEmbeddings
from .nn.heads import BertOnlyMLMHead, BertOnlyNSPHead, BertPooler, BertPreTrainingHeads
from .nn.layer import BertEncoder
from .nn.masks import AttentionMask
from .nn.padding import PackedBatch, pad, unpad
from .outputs import (BaseModelOutput, CausalLMOutput, LogitsOutput, PreTrainingOutput,
                      QuestionAnsweringOutput)
from .pretrained import BertPreTrainedModel
from .utils import get_head_mask


def _check_inputs(config: BertConfig, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                  past_length: int) -> None:
    """Turns every bad input into a ValueError that names it (never an IndexError or a device assert)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:-1])
    if len(shape) != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {shape}")
    if shape[1] == 0:  # would fail later as an IndexError in the pooler
        raise ValueError(f"input_ids has shape {shape}: sequences need at least one token "
                         "(a tokenizer always adds [CLS] and [SEP])")
    if input_ids is not None:
        if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = torch.aminmax(input_ids)
            if lo < 0 or hi >= config.vocab_size:
                bad = int(hi) if hi >= config.vocab_size else int(lo)
                raise ValueError(
                    f"input_ids contains {bad} but vocab_size is {config.vocab_size}; ids must be in "
                    f"[0, {config.vocab_size}) (was the text tokenized with this model's tokenizer?)"
                )
    elif inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds has width {inputs_embeds.shape[-1]} but hidden_size is {config.hidden_size}")
    if attention_mask is not None:
        ok = tuple(attention_mask.shape) in ((shape[0], past_length + shape[1]),
                                             (shape[0], shape[1], past_length + shape[1]))
        if not ok:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape {shape}"
                + (f" (plus {past_length} cached positions)" if past_length else "")
                + "; it must be (batch, seq_len) or (batch, seq_len, seq_len)"
            )
    if token_type_ids is not None:
        if tuple(token_type_ids.shape) != shape:
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)} but input_ids has shape {shape}")
        if token_type_ids.numel():
            lo, hi = torch.aminmax(token_type_ids)
            if lo < 0 or hi >= config.type_vocab_size:
                raise ValueError(
                    f"token_type_ids contains {int(hi) if hi >= config.type_vocab_size else int(lo)} but "
                    f"type_vocab_size is {config.type_vocab_size}"
                )
    if position_ids is not None and tuple(position_ids.shape) not in (shape, (1, shape[1]), (shape[1],)):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)} but input_ids has shape {shape}")
    if config.position_embedding_type == "absolute":
        longest = past_length + shape[1]
        if position_ids is not None and position_ids.numel():
            longest = int(position_ids.max()) + 1
        if longest > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {longest} exceeds max_position_embeddings={config.max_position_embeddings}; "
                f"truncate the input (tokenizer(..., truncation=True, max_length={config.max_position_embeddings}))"
            )


def _head_mask(head_mask, config: BertConfig, dtype):
    # (H,) applies to every layer, (num_layers, H) per layer; shaped to broadcast over (B, H, Q, K).
    if head_mask is None:
        return None
    if head_mask.dim() not in (1, 2) or head_mask.shape[-1] != config.num_attention_heads or (
            head_mask.dim() == 2 and head_mask.shape[0] != config.num_hidden_layers):
        raise ValueError(
            f"head_mask has shape {tuple(head_mask.shape)}; use ({config.num_attention_heads},) or "
            f"({config.num_hidden_layers}, {config.num_attention_heads}) (num_hidden_layers, num_attention_heads)"
        )
    return get_head_mask(head_mask, config.num_hidden_layers, dtype=dtype)


class BertModel(BertPreTrainedModel):
    """The encoder (or decoder, with ``config.is_decoder``), with an optional pooler.

    ``forward`` returns a :class:`BaseModelOutput` with ``last_hidden_state`` and ``pooler_output``
    (``outputs[0]``, ``outputs[1]``), plus ``hidden_states`` / ``attentions`` / ``cross_attentions``
    / ``past_key_values`` when asked for.
    """

    base_model_prefix = "bert"

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                is_decoder=None, mode=None, encoder_embeds=None, unpad=None):
        """Runs the encoder (or decoder).

        Args:
            is_decoder: causal self-attention for this call (default ``config.is_decoder``), as BLIP's med.py.
            mode: ``"text"`` skips cross-attention (BLIP's unimodal text encoder); ``"multimodal"`` requires
                ``encoder_hidden_states`` and attends to them; None uses cross-attention when states are given.
            encoder_embeds: precomputed embeddings ``(B, L, hidden)`` fed straight to the layers.
            encoder_hidden_states: ``(B, N, encoder_width)``, or a list of them with a list of masks (NLVR2's
                two images): layer ``i`` then attends to entry ``i % len(list)``.
            unpad: run padding-free (default ``config.unpad_inputs``): embeddings, Linears and MLP see only
                real tokens, attention runs per sequence; padded positions of the outputs are zeros. Used when
                a 2-D padding mask is given and nothing needs the padded layout (falls back silently otherwise).
        """
        config = self.config
        is_decoder = config.is_decoder if is_decoder is None else is_decoder
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
        if encoder_embeds is not None:
            if input_ids is not None or inputs_embeds is not None:
                raise ValueError("pass encoder_embeds alone, without input_ids or inputs_embeds")
            if encoder_embeds.dim() != 3 or encoder_embeds.shape[-1] != config.hidden_size:
                raise ValueError(f"encoder_embeds has shape {tuple(encoder_embeds.shape)}; expected "
                                 f"(batch, seq_len, {config.hidden_size})")
            if attention_mask is not None and tuple(attention_mask.shape[:2]) != tuple(encoder_embeds.shape[:2]):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but encoder_embeds has "
                                 f"shape {tuple(encoder_embeds.shape)}")
        else:
            _check_inputs(config, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                          past_length)
        if (config.unpad_inputs if unpad is None else unpad) and self._can_unpad(
                attention_mask, input_ids, is_decoder, past_key_values, output_attentions, head_mask,
                encoder_hidden_states, encoder_embeds, mode):
            return self._forward_unpadded(input_ids, attention_mask, token_type_ids, position_ids,
                                          output_hidden_states, return_dict)
        if encoder_embeds is not None:
            embeddings = encoder_embeds
        else:
            embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, past_length)
        use_cache = bool((config.use_cache if use_cache is None else use_cache) and is_decoder)
        batch, seq_len = embeddings.shape[:2]
        mask = AttentionMask.build(attention_mask, batch, seq_len, past_length + seq_len, embeddings.dtype,
                                   embeddings.device, causal=is_decoder, past_length=past_length)
        if mode not in (None, "text", "multimodal"):
            raise ValueError(f"mode must be 'text' or 'multimodal', got {mode!r}")
        if mode == "text":
            encoder_hidden_states = encoder_attention_mask = None
        elif mode == "multimodal" and encoder_hidden_states is None and not (
                past_key_values and len(past_key_values[0]) == 4):
            raise ValueError("mode='multimodal' needs encoder_hidden_states (the image features); "
                             "pass them, or use mode='text' for the text-only encoder")
        encoder_mask = None
        if encoder_hidden_states is not None:
            encoder_hidden_states, encoder_mask = self._encoder_masks(
                encoder_hidden_states, encoder_attention_mask, batch, seq_len, embeddings)
        sequence, hidden, attentions, cross, presents = self.encoder(
            embeddings, attention_mask=mask, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_mask, head_mask=_head_mask(head_mask, config, embeddings.dtype),
            past_key_values=past_key_values, output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states), use_cache=use_cache)
        pooled = self.pooler(sequence) if self.pooler is not None else None
        out = BaseModelOutput(sequence, pooled, presents, hidden, attentions, cross)
        return out if return_dict is not False else out.to_tuple()

    def _can_unpad(self, attention_mask, input_ids, is_decoder, past_key_values, output_attentions, head_mask,
                   encoder_hidden_states, encoder_embeds, mode) -> bool:
        # What needs the padded (B, L) layout falls back to it: caches, causal masks, probabilities, head
        # masks, cross-attention, and whatever the layers say they need (encoder.needs_padded_layout).
        if attention_mask is None or attention_mask.dim() != 2 or input_ids is None or input_ids.dim() != 2:
            return False
        if is_decoder or past_key_values or output_attentions or head_mask is not None or encoder_embeds is not None:
            return False
        if encoder_hidden_states is not None and mode != "text":
            return False
        return not self.encoder.needs_padded_layout

    def forward_packed(self, input_ids: torch.Tensor, lengths, token_type_ids: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Packed-first inference: the token lists of a batch concatenated, no padded tensor at all.

        Args:
            input_ids: ``(T,)`` the sequences' token ids one after another (each starts with [CLS]).
            lengths: the token count of each sequence, summing to ``T`` (host integers: no device sync).
            token_type_ids: ``(T,)``, default zeros.

        Returns:
            ``(T, hidden)``: the last hidden state of every token, in the same order (no pooler).

        Raises:
            ValueError: bad shapes or ids, or a model whose layers need the padded layout (relative
                positions, enabled QDQ matmul quantizers...): call the model with ``attention_mask`` instead.
        """
        lengths = [int(n) for n in lengths]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D packed token ids (T,), got shape {tuple(input_ids.shape)}; "
                             "for a (batch, seq_len) tensor call the model with attention_mask")
        if sum(lengths) != input_ids.numel():
            raise ValueError(f"lengths sum to {sum(lengths)} but input_ids has {input_ids.numel()} tokens")
        if token_type_ids is not None and tuple(token_type_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)} but input_ids has shape "
                             f"{tuple(input_ids.shape)}")
        if self.encoder.needs_padded_layout:
            raise ValueError("this model's layers need the padded layout (relative positions, explicit softmax or "
                             "QDQ matmul quantizers); call the model with input_ids (batch, seq_len) and "
                             "attention_mask instead")
        packed = PackedBatch.from_lengths(lengths, self.embeddings.word_embeddings.weight.dtype, input_ids.device)
        position_ids = packed.indices % packed.max_len  # each sequence counts from 0
        _check_inputs(self.config, input_ids.view(1, -1), None, None,
                      token_type_ids.view(1, -1) if token_type_ids is not None else None, position_ids.view(1, -1), 0)
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.encoder(embeddings, attention_mask=packed)[0]

    def _forward_unpadded(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                          return_dict):
        batch, length = input_ids.shape
        packed = PackedBatch.from_mask(attention_mask, self.embeddings.word_embeddings.weight.dtype)
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)
        position_ids = position_ids.expand(batch, length)
        pick = packed.indices
        embeddings = self.embeddings(unpad(input_ids, pick),
                                     unpad(token_type_ids, pick) if token_type_ids is not None else None,
                                     unpad(position_ids, pick))
        sequence, hidden, _, _, _ = self.encoder(embeddings, attention_mask=packed,
                                                 output_hidden_states=bool(output_hidden_states))
        sequence = pad(sequence, pick, batch, length)
        if hidden is not None:
            hidden = tuple(pad(h, pick, batch, length) for h in hidden)
        pooled = self.pooler(sequence) if self.pooler is not None else None
        out = BaseModelOutput(sequence, pooled, None, hidden, None, None)
        return out if return_dict is not False else out.to_tuple()

    def _encoder_masks(self, states, masks, batch, seq_len, embeddings):
        """Validates the cross-attended states and builds their mask objects (one per entry of a list)."""
        if not hasattr(self.encoder.layer[0] if len(self.encoder.layer) else self, "crossattention"):
            raise ValueError("encoder_hidden_states were given but the model has no cross-attention; "
                             "build it with config.add_cross_attention=True")
        many = isinstance(states, (list, tuple))
        states_list = list(states) if many else [states]
        masks_list = list(masks) if isinstance(masks, (list, tuple)) else [masks] * len(states_list)
        if len(masks_list) != len(states_list):
            raise ValueError(f"got {len(states_list)} encoder_hidden_states but {len(masks_list)} encoder_attention_masks")
        width = self.config.encoder_width or self.config.hidden_size
        built = []
        for st, m in zip(states_list, masks_list):
            if st.dim() != 3 or st.shape[-1] != width:
                raise ValueError(
                    f"encoder_hidden_states has shape {tuple(st.shape)} but cross-attention "
                    f"expects (batch, seq_len, {width}) (config.encoder_width or hidden_size)")
            if m is not None and m.shape[-1] != st.shape[1]:
                raise ValueError(f"encoder_attention_mask has shape {tuple(m.shape)} but encoder_hidden_states "
                                 f"has {st.shape[1]} positions")
            built.append(AttentionMask.build(m, batch, seq_len, st.shape[1], embeddings.dtype, embeddings.device))
        if many:
            return states_list, built
        return states_list[0], built[0]


class BertTaskModel(BertPreTrainedModel):
    """Base of the task models: ``self.bert`` (a :class:`BertModel`) plus a head and its loss."""

    def _bert(self, input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
              output_attentions, output_hidden_states, **extra):
        # The encoder's optional outputs (hidden states, attentions, cache) pass through to the task output.
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True, **extra)

    def _dropout(self) -> nn.Dropout:
        p = self.config.classifier_dropout
        return nn.Dropout(self.config.hidden_dropout_prob if p is None else p)

    def _predicted(self, hidden, labels, sparse_prediction):
        # Sparse MLM prediction: keep only the positions that have a label (see BertForMaskedLM).
        sparse = self.config.sparse_prediction if sparse_prediction is None else sparse_prediction
        if not sparse or labels is None:
            return hidden, labels
        keep = labels != -100
        return hidden[keep], labels[keep]

    @staticmethod
    def _finish(out, return_dict):
        return out if return_dict is not False else out.to_tuple()


class BertForPreTraining(BertTaskModel):
    """Masked LM + next-sentence prediction; loss is their sum when both label sets are given."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, sparse_prediction=None):
        """``sparse_prediction`` (default ``config.sparse_prediction``): see :class:`BertForMaskedLM`."""
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
                         output_attentions, output_hidden_states)
        hidden, labels = self._predicted(out.last_hidden_state, labels, sparse_prediction)
        scores, nsp = self.cls(hidden, out.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = F.cross_entropy(scores.view(-1, self.config.vocab_size), labels.reshape(-1)) + \
                F.cross_entropy(nsp.view(-1, 2), next_sentence_label.view(-1))
        return self._finish(PreTrainingOutput(loss, scores, nsp, out.hidden_states, out.attentions), return_dict)


class BertForMaskedLM(BertTaskModel):
    """Masked LM.

    With ``sparse_prediction=True`` (argument, or ``config.sparse_prediction``) and ``labels`` given, the
    vocabulary projection runs only at the predicted positions (``labels != -100``, about 15% in BERT's
    recipe), as Google's BERT pre-training and ModernBERT do: the same loss and gradients, without the
    (tokens x vocab) logits that dominate a training step. ``logits`` are then ``(predicted tokens, vocab)``,
    in row-major order of the positions.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, sparse_prediction=None):
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
                         output_attentions, output_hidden_states, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask)
        hidden, labels = self._predicted(out.last_hidden_state, labels, sparse_prediction)
        scores = self.cls(hidden)
        loss = None
        if labels is not None:  # -100 marks positions that are not predicted
            loss = F.cross_entropy(scores.view(-1, self.config.vocab_size), labels.reshape(-1))
        return self._finish(LogitsOutput(loss, scores, out.hidden_states, out.attentions), return_dict)


class BertLMHeadModel(BertTaskModel):
    """Left-to-right LM: loss on logits shifted by one position (BERT decoder, BLIP's caption decoder).

    Causal by default whatever ``config.is_decoder`` says (an LM head predicts the next token); pass
    ``is_decoder=False`` for a bidirectional call as med.py allows.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, labels=None,
                past_key_values=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, is_decoder=True, mode=None, return_logits=False, reduction="mean"):
        """``labels`` give the shifted LM loss with ``config.label_smoothing``; ``reduction="none"`` returns one
        loss per sample (the sum over its tokens, as BLIP's med.py); ``return_logits=True`` returns only the
        logits without the last position."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if labels is not None:
            use_cache = False
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
                         output_attentions, output_hidden_states, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                         use_cache=use_cache, is_decoder=is_decoder, mode=mode)
        logits = self.cls(out.last_hidden_state)
        if return_logits:
            return logits[:, :-1].contiguous()
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                                   label_smoothing=self.config.label_smoothing, reduction=reduction)
            if reduction == "none":
                loss = loss.view(logits.shape[0], -1).sum(1)
        return self._finish(CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states, out.attentions,
                                           out.cross_attentions), return_dict)

    def generate(self, input_ids=None, **kwargs):
        """Greedy, beam-search or sampled generation over the KV cache; see :func:`bertkit.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)


class BertForNextSentencePrediction(BertTaskModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
                         output_attentions, output_hidden_states)
        logits = self.cls(out.pooler_output)
        loss = F.cross_entropy(logits.view(-1, 2), labels.view(-1)) if labels is not None else None
        return self._finish(LogitsOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


def sequence_classification_loss(config: BertConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's rule: 1 label = regression, integer labels = single-label, otherwise multi-label (BCE)."""
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class BertForSequenceClassification(BertTaskModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = self._dropout()
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
                         output_attentions, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        return self._finish(LogitsOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


class BertForMultipleChoice(BertTaskModel):
    """Inputs are (batch, num_choices, seq_len); each choice is scored from its pooled output."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = self._dropout()
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None or ref.dim() < 3:
            raise ValueError("BertForMultipleChoice expects input_ids of shape (batch, num_choices, seq_len)")
        num_choices = ref.shape[1]

        def flat(t):
            return t.reshape(-1, *t.shape[2:]) if t is not None else None

        out = self._bert(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids), head_mask,
                         flat(inputs_embeds), output_attentions, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output)).view(-1, num_choices)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return self._finish(LogitsOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


class BertForTokenClassification(BertTaskModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = self._dropout()
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
                         output_attentions, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return self._finish(LogitsOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


class BertForQuestionAnswering(BertTaskModel):
    """Span start/end logits; gold positions outside the input are clamped to ``seq_len`` and ignored."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        out = self._bert(input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
                         output_attentions, output_hidden_states)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.shape[1]
            start_positions = start_positions.reshape(-1).clamp(0, ignored)
            end_positions = end_positions.reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start, start_positions, ignore_index=ignored)
                    + F.cross_entropy(end, end_positions, ignore_index=ignored)) / 2
        return self._finish(QuestionAnsweringOutput(loss, start, end, out.hidden_states, out.attentions), return_dict)

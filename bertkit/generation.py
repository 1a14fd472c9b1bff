"""Text generation over the KV cache: greedy, multinomial sampling (temperature, top-k, top-p), beam search.

The semantics are those of ``transformers`` 5.x ``GenerationMixin.generate`` for the options below, so the
same model and inputs give the same tokens: logits are processed in HF's order (repetition penalty, min
length; then, when sampling, temperature, top-k, top-p), and beam search keeps HF's bookkeeping (2 *
num_beams candidates per step, finished hypotheses scored ``sum_logprobs / generated_len ** length_penalty``,
the same early-stopping heuristic). Beam *sampling* follows transformers >= 5.24: the ``2 * num_beams``
sampled candidates are sorted by score before the first ``num_beams`` of them may finish (4.50-5.23 left
them in draw order, a regression of their vectorized beam search that 5.24 fixed).

Two things make it cheaper than HF's loop without changing the result:

* The prompt (and, with cross-attention, the image features) runs once per *input* row; only then are
  the cache and the first logits repeated for the beams / returned sequences. Every beam of a row has the
  same prompt, so this is the same computation, ``num_beams`` times less of it; for BLIP the 577-token
  cross-attention keys/values are the larger part of the work.
* On a beam reorder only the self-attention cache is gathered: beams are only ever reordered within their
  own row, and the cross-attention keys/values are identical across those beams.

Deliberate differences from transformers: beam search fills finished hypotheses with ``pad_token_id``
(transformers uses EOS when the pad id is 0, since it writes ``pad or eos``); ``max_length`` defaults to 20
*including* the prompt (transformers 5 adds 20 to the prompt length when max_length is unset); options that
transformers only warns about (a max_length beyond the position table, temperature <= 0) raise ValueError.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_NEG = -1.0e9  # HF's "impossible" score for beams; kept identical so ties resolve the same way


@dataclass(frozen=True)
class GenerationOptions:
    """The decoding options of :func:`generate` (same names, defaults and meaning), checked and passed as one."""

    max_length: int = 20
    min_length: int = 0
    num_beams: int = 1
    do_sample: bool = False
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, *, max_length: int = 20, min_length: int = 0,
             max_new_tokens: int | None = None, num_beams: int = 1, do_sample: bool = False, top_k: int = 50,
             top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
             length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             bos_token_id: int | None = None, encoder_hidden_states: torch.Tensor | None = None,
             encoder_attention_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, seed: int | None = None) -> torch.LongTensor:
    """Generates token ids with a causal LM head, e.g. BLIP's caption decoder loaded as ``BertLMHeadModel``.

    Args:
        model: a ``BertLMHeadModel`` (or any model with its forward signature and tuple cache).
        input_ids: ``(batch, prompt_len)`` prompt, left-padded if lengths differ (pass ``attention_mask``).
            None starts every sequence with ``bos_token_id``, one per row of ``encoder_hidden_states``.
        max_length: the longest output, prompt included.
        min_length: EOS is forbidden until the sequence (prompt included) is this long.
        max_new_tokens: if given, overrides ``max_length`` with ``prompt_len + max_new_tokens``.
        num_beams: 1 for greedy/sampling, more for beam search.
        do_sample: sample from the processed distribution instead of taking the best token(s).
        top_k: when sampling, keep the ``top_k`` most likely tokens (0 disables).
        top_p: when sampling, keep the smallest set of tokens whose probability reaches ``top_p``.
        temperature: when sampling, divide the logits by this.
        repetition_penalty: CTRL penalty on every token already in the sequence (prompt included).
        length_penalty: beam search ranks finished hypotheses by ``score / generated_len ** length_penalty``.
        early_stopping: beam search stops a row when ``num_beams`` hypotheses are finished (True), or when
            no running beam can beat them judging by its current length (False) or, with a positive
            length_penalty, by ``max_length`` ("never", the canonical beam search).
        num_return_sequences: sequences returned per input row (at most ``num_beams``; with ``num_beams=1``
            only when sampling).
        eos_token_id: id or ids that end a sequence; default ``model.config.eos_token_id``.
        pad_token_id: fills finished sequences; default ``model.config.pad_token_id``, else the first EOS.
        bos_token_id: the start token when ``input_ids`` is None; default ``model.config.bos_token_id``.
        encoder_hidden_states: ``(batch, S, encoder_width)`` features to cross-attend (image embeddings).
            Rows already repeated ``repeat_interleave(num_beams, 0)`` (BLIP's habit) are accepted too.
        encoder_attention_mask: ``(batch, S)``, 1 for features to attend.
        attention_mask: ``(batch, prompt_len)``, 0 on left padding of the prompt.
        generator: random generator for sampling; default the global one (as ``transformers``).
        seed: shortcut for ``generator=torch.Generator().manual_seed(seed)``.

    Returns:
        ``(batch * num_return_sequences, length)`` token ids, prompt included; rows of the same input are
        adjacent, best beam first; sequences that ended early are filled with ``pad_token_id``.

    Raises:
        ValueError: an argument is out of range or inconsistent; the message names it.
    """
    config = model.config
    accepts = inspect.signature(model.forward).parameters
    if "past_key_values" not in accepts or not ("is_decoder" in accepts or getattr(config, "is_decoder", False)):
        raise ValueError(f"generate needs a causal LM with a KV cache; {type(model).__name__} with "
                         f"config.is_decoder=False is not one: use BertLMHeadModel (or set is_decoder=True)")
    # BertLMHeadModel chooses causality per call (BLIP configs say is_decoder=False); ask for it explicitly.
    causal = {"is_decoder": True} if "is_decoder" in accepts else {}
    eos = _eos_list(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = eos[0] if pad is None and eos else pad  # as HF: finished rows need some filler
    bos = bos_token_id if bos_token_id is not None else getattr(config, "bos_token_id", None)
    if input_ids is None:
        if bos is None:
            raise ValueError("input_ids is None and there is no bos_token_id to start from; pass input_ids or "
                             "bos_token_id (or set model.config.bos_token_id)")
        rows = encoder_hidden_states.shape[0] if encoder_hidden_states is not None else 1
        device = encoder_hidden_states.device if encoder_hidden_states is not None else \
            next((p.device for p in model.parameters()), None)
        input_ids = torch.full((rows, 1), bos, dtype=torch.long, device=device)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be (batch, prompt_len) integer ids, got shape {tuple(input_ids.shape)} "
                         f"and dtype {input_ids.dtype}")
    input_ids = input_ids.long()
    batch, prompt_len = input_ids.shape
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        max_length = prompt_len + max_new_tokens
    opts = GenerationOptions(max_length, min_length, num_beams, do_sample, top_k, top_p, temperature,
                             repetition_penalty, length_penalty, early_stopping, num_return_sequences)
    _check_options(config, prompt_len, opts, generator, seed)
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    expand = max(num_beams, num_return_sequences)

    if attention_mask is None and pad is not None and (input_ids == pad).any() and pad not in eos:
        # HF infers the mask of a padded prompt from pad tokens (unless pad doubles as EOS).
        attention_mask = input_ids.ne(pad).long()
    position_ids = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, prompt_len):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{(batch, prompt_len)}; pass one 0/1 entry per prompt token")
        if bool((attention_mask != 0).all()):
            attention_mask = None  # nothing to mask: the model's fastest path
        else:
            # Left padding: positions count real tokens only, as HF's generate does.
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    encoder_hidden_states, encoder_attention_mask = _one_row_per_input(
        encoder_hidden_states, encoder_attention_mask, batch, expand)

    # Prefill: one forward per input row, then repeat the cache for the beams / returned sequences.
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                use_cache=True, return_dict=True, **causal)
    logits = out.logits[:, -1].float().repeat_interleave(expand, 0)
    past = tuple(tuple(t.repeat_interleave(expand, 0) for t in layer) for layer in out.past_key_values)
    tokens = input_ids.repeat_interleave(expand, 0)
    mask = attention_mask.repeat_interleave(expand, 0) if attention_mask is not None else None
    next_position = position_ids[:, -1:].repeat_interleave(expand, 0) + 1 if position_ids is not None else None
    if encoder_attention_mask is not None:
        # The cached cross keys/values are reused from now on; the states are passed again only so the model
        # can build the mask of padded features (it builds none without them).
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(expand, 0)
        encoder_attention_mask = encoder_attention_mask.repeat_interleave(expand, 0)
    else:
        encoder_hidden_states = None

    def step(new_tokens, past):
        nonlocal mask, next_position
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=new_tokens[:, None], attention_mask=mask, position_ids=next_position,
                    encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                    past_key_values=past, use_cache=True, return_dict=True, **causal)
        if next_position is not None:
            next_position = next_position + 1
        return out.logits[:, -1].float(), out.past_key_values

    # Repetition penalty skips left padding (HF: everything before the first attended prompt token).
    skip = mask.ne(0).int().argmax(dim=1) if mask is not None else None
    process = _Processor(eos, min_length, repetition_penalty, skip, do_sample, temperature, top_k, top_p,
                         min_keep=(len(eos) + 1 if eos else 2) if num_beams > 1 else 1)
    if num_beams == 1:
        return _greedy_or_sample(step, tokens, logits, past, process, opts, eos, pad, generator)
    return _beam_search(step, tokens, logits, past, process, opts, batch, eos, pad, generator)


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _check_options(config, prompt_len: int, opts: GenerationOptions, generator, seed) -> None:
    max_length, min_length, num_beams, num_return_sequences = (opts.max_length, opts.min_length, opts.num_beams,
                                                               opts.num_return_sequences)
    top_k, top_p, temperature, early_stopping = opts.top_k, opts.top_p, opts.temperature, opts.early_stopping
    do_sample, repetition_penalty = opts.do_sample, opts.repetition_penalty
    if max_length <= prompt_len:
        raise ValueError(f"max_length ({max_length}) counts the prompt and must exceed its length ({prompt_len}); "
                         f"raise max_length or pass max_new_tokens")
    limit = getattr(config, "max_position_embeddings", None)
    if getattr(config, "position_embedding_type", "absolute") == "absolute" and limit and max_length > limit:
        raise ValueError(f"max_length ({max_length}) exceeds max_position_embeddings ({limit}); lower max_length "
                         f"or max_new_tokens")
    if min_length < 0:
        raise ValueError(f"min_length must be >= 0, got {min_length}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if num_beams == 1 and num_return_sequences > 1 and not do_sample:
        raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True or "
                         f"num_beams >= {num_return_sequences}; greedy decoding has only one answer")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}); "
                         f"raise num_beams or lower num_return_sequences")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to disable nucleus sampling")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}; use 0 to disable top-k filtering")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; for greedy decoding keep temperature=1.0 "
                         f"and set do_sample=False")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = no penalty), got {repetition_penalty}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")


def _one_row_per_input(states, mask, batch, expand):
    """Returns the encoder states with one row per prompt, undoing a caller's repeat_interleave(expand)."""
    if states is None:
        if mask is not None:
            raise ValueError("encoder_attention_mask was given without encoder_hidden_states")
        return None, None
    rows = states.shape[0]
    if mask is not None and tuple(mask.shape) != tuple(states.shape[:2]):
        raise ValueError(f"encoder_attention_mask has shape {tuple(mask.shape)} but encoder_hidden_states has "
                         f"{tuple(states.shape[:2])} (batch, positions)")
    if rows == batch * expand and expand > 1:
        one, one_mask = states[::expand], (mask[::expand] if mask is not None else None)
        if not torch.equal(states, one.repeat_interleave(expand, 0)) or (
                mask is not None and not torch.equal(mask, one_mask.repeat_interleave(expand, 0))):
            raise ValueError(f"encoder_hidden_states has {rows} rows = batch {batch} x {expand}, but they are not "
                             f"{expand} copies of each row; pass one row per prompt (batch {batch})")
        states, mask = one, one_mask
    elif rows != batch:
        raise ValueError(f"encoder_hidden_states has {rows} rows but input_ids has {batch}; pass one row per "
                         f"prompt (or {batch * expand} = each repeated {expand} times)")
    if mask is not None and bool((mask != 0).all()):
        mask = None  # nothing masked: later steps need not pass the states at all
    return states, mask


class _Processor:
    """HF's logits processors and warpers, in HF's order, for the options generate() exposes."""

    def __init__(self, eos, min_length, penalty, skip, do_sample, temperature, top_k, top_p, min_keep):
        self.eos, self.min_length, self.penalty, self.skip = eos, min_length, float(penalty), skip
        self.do_sample, self.temperature, self.top_p, self.min_keep = do_sample, temperature, top_p, min_keep
        self.top_k = max(top_k, min_keep) if top_k else 0

    def __call__(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        if self.penalty != 1.0:
            seen = tokens
            if self.skip is not None:  # left padding points at a dummy column, dropped below
                seen = seen.masked_fill(torch.arange(seen.shape[1], device=seen.device) < self.skip[:, None], vocab)
            hit = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
            hit = hit.scatter_(1, seen, True)[:, :vocab]
            # CTRL: a seen token gets less likely whatever the sign of its logit.
            scores = torch.where(hit, torch.where(scores < 0, scores * self.penalty, scores / self.penalty), scores)
        if self.eos and self.min_length > 0 and tokens.shape[1] < self.min_length:
            scores = scores.clone()
            scores[:, self.eos] = -float("inf")
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, vocab)).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p < 1.0:
            # Drop the least likely tokens while their total stays <= 1 - top_p, keeping min_keep at least.
            ascending, order = torch.sort(scores, descending=False)
            drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            drop[..., -self.min_keep:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        return scores


def _greedy_or_sample(step, tokens, logits, past, process, opts: GenerationOptions, eos, pad, generator):
    max_length, do_sample = opts.max_length, opts.do_sample
    eos_t = torch.tensor(eos, device=tokens.device)
    unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    while True:
        scores = process(tokens, logits)
        if do_sample:
            new = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            new = scores.argmax(dim=-1)
        if eos:
            new = torch.where(unfinished, new, pad)
            unfinished &= ~torch.isin(new, eos_t)
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        if tokens.shape[1] >= max_length or not bool(unfinished.any()):
            return tokens
        logits, past = step(new, past)


def _beam_search(step, tokens, logits, past, process, opts: GenerationOptions, batch, eos, pad, generator):
    num_beams, max_length, do_sample = opts.num_beams, opts.max_length, opts.do_sample
    length_penalty, early_stopping, num_return_sequences = (opts.length_penalty, opts.early_stopping,
                                                            opts.num_return_sequences)
    prompt_len, vocab = tokens.shape[1], logits.shape[-1]
    device = tokens.device
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    # Look at (EOS count + 1) * num_beams candidates, so num_beams of them are always still running.
    k = max(2, 1 + len(eos)) * num_beams
    top_beams = torch.arange(k, device=device) < num_beams  # only these may enter the finished set
    fill = pad if pad is not None else 0
    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = tokens.view(batch, num_beams, prompt_len)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _NEG  # all beams start equal: let only the first one propose continuations
    finished = running.clone()
    finished_scores = torch.full((batch, num_beams), _NEG, device=device)
    finished_len = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    row_offset = torch.arange(batch, device=device)[:, None] * num_beams
    cur = prompt_len
    while True:
        log_probs = process(running[:, :, :cur].reshape(-1, cur), F.log_softmax(logits, dim=-1))
        total = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        if do_sample:
            index = torch.multinomial(total.softmax(dim=-1), k, generator=generator)
            # Order the draws by score, as transformers >= 5.24 (and <= 4.49) does: only the first
            # num_beams columns may finish (top_beams), so the order decides which hypotheses end.
            # transformers 4.50-5.23 dropped this sort (a bug, fixed upstream in 5.24); the same
            # descending torch.sort keeps ties in the same order as the reference.
            cand_scores, order = total.gather(1, index).sort(dim=-1, descending=True)
            index = index.gather(1, order)
        else:
            cand_scores, index = torch.topk(total, k)
        source, new = index // vocab, index % vocab
        cand = running.gather(1, source[:, :, None].expand(-1, -1, max_length)).clone()
        cand[:, :, cur] = new
        ends = torch.isin(new, eos_t) | (cur + 1 >= max_length)

        # The best num_beams candidates that did not end keep running.
        alive_scores = cand_scores + ends.float() * _NEG
        keep = torch.topk(alive_scores, num_beams).indices
        running = cand.gather(1, keep[:, :, None].expand(-1, -1, max_length))
        running_scores = alive_scores.gather(1, keep)
        beam_source = source.gather(1, keep)

        # Ended candidates compete with the finished set, scored with the length penalty.
        new_len = cur + 1 - prompt_len
        scores = cand_scores / (new_len ** length_penalty)
        scores += (is_finished.all(dim=1, keepdim=True) & (early_stopping is True)).float() * _NEG
        scores += (~improvable).float() * _NEG
        just_ended = ends & top_beams
        scores += (~just_ended).float() * _NEG
        best = torch.topk(torch.cat([finished_scores, scores], dim=1), num_beams).indices
        finished_scores = torch.cat([finished_scores, scores], dim=1).gather(1, best)
        finished = torch.cat([finished, cand], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_length))
        is_finished = torch.cat([is_finished, just_ended], dim=1).gather(1, best)
        finished_len = torch.cat([finished_len, torch.full_like(cand_scores, new_len, dtype=torch.long)],
                                 dim=1).gather(1, best)
        cur += 1

        # HF's heuristic: can the best running beam still beat the worst finished hypothesis?
        best_len = max_length - prompt_len if early_stopping == "never" and length_penalty > 0 else cur - prompt_len
        best_running = running_scores[:, :1] / (best_len ** length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)
        all_full = bool(is_finished.all()) and early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ends.all()):
            break
        rows = (beam_source + row_offset).view(-1)
        # Cross-attention entries (layer[2:]) are identical across a row's beams: no need to gather them.
        past = tuple((layer[0].index_select(0, rows), layer[1].index_select(0, rows)) + tuple(layer[2:])
                     for layer in past)
        logits, past = step(running[:, :, cur - 1].reshape(-1), past)

    out = finished[:, :num_return_sequences].reshape(batch * num_return_sequences, max_length)
    return out[:, :prompt_len + int(finished_len[:, :num_return_sequences].max())]

"""bertkit.generation: token-for-token parity with transformers 5.x generate (BERT decoder and BLIP text
decoder), sampling filters on hand-made distributions, cache reuse and error messages."""

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers

import bertkit
from bertkit.generation import generate

BOS, EOS, PAD = 1, 2, 3
CFG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
           max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
BLIP = dict(CFG, encoder_hidden_size=24, sep_token_id=EOS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: a second intra-op thread only adds synchronisation per op, and on a busy 2-core
    # machine made this file ~10x slower. Restored afterwards for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaky(model, seed=0):
    # Weights ~ N(0, 0.3) (LayerNorm scales stay 1): distributions peaky enough that the ~1e-6 differences
    # between the two implementations never flip a choice, yet still input dependent (N(0, 0.5) everywhere
    # makes this tiny model emit the same token whatever the input). EOS is boosted so sequences end at
    # different lengths; PAD is suppressed so filler is never mistaken for a generated token.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("LayerNorm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.cls.predictions.bias[EOS] += 2.0
        model.cls.predictions.bias[PAD] -= 5.0
    return model.eval()


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    ref = peaky(transformers.BertLMHeadModel(transformers.BertConfig(**CFG, is_decoder=True, add_cross_attention=True)))
    path = tmp_path_factory.mktemp("bert_decoder")
    ref.save_pretrained(path)
    return ref, bertkit.BertLMHeadModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def blip_pair(tmp_path_factory):
    ref = peaky(transformers.BlipTextLMHeadModel(transformers.BlipTextConfig(**BLIP)))
    path = tmp_path_factory.mktemp("blip_decoder")
    ref.save_pretrained(path)
    return ref, bertkit.BertLMHeadModel.from_pretrained(path).eval()


def prompt(batch=4, width=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((batch, 1), BOS), torch.randint(4, 50, (batch, 2), generator=g)], dim=1)
    return ids, torch.randn(batch, 6, width, generator=g)


def hf_generate(ref, ids, **kw):
    if isinstance(ref, transformers.BertLMHeadModel):
        # transformers 5.x BertLMHeadModel.generate builds a DynamicCache, which its cross-attention cannot use.
        cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
        kw["past_key_values"] = cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.generate(ids, use_cache=True, **kw)


CASES = {
    "greedy": dict(max_length=15),
    "greedy_min_length": dict(max_length=15, min_length=11),
    "greedy_repetition_penalty": dict(max_length=15, repetition_penalty=1.7),
    "greedy_max_new_tokens": dict(max_new_tokens=6),
    "greedy_two_eos_pad0": dict(max_length=15, eos_token_id=[EOS, 9], pad_token_id=0),
    "beam3": dict(max_length=15, num_beams=3),
    "beam3_return2_lp": dict(max_length=15, num_beams=3, num_return_sequences=2, length_penalty=0.3),
    "beam3_early_lp2": dict(max_length=15, num_beams=3, early_stopping=True, length_penalty=2.0),
    "beam3_never": dict(max_length=15, num_beams=3, early_stopping="never", num_return_sequences=3),
    "beam4_negative_lp_penalty_min": dict(max_length=15, num_beams=4, num_return_sequences=4, length_penalty=-1.0,
                                          repetition_penalty=1.3, min_length=6),
    "beam3_two_eos": dict(max_length=12, num_beams=3, num_return_sequences=2, eos_token_id=[EOS, 9]),
    # every returned hypothesis ends early, so the output is cropped well before max_length
    "beam4_all_end_early": dict(max_length=15, num_beams=4, length_penalty=0.0, eos_token_id=[EOS, 12]),
}


@pytest.mark.parametrize("case", CASES)
def test_bert_decoder_matches_transformers(bert_pair, case):
    ref, ours = bert_pair
    ids, image = prompt()
    image_mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]])
    kw = dict(CASES[case], encoder_hidden_states=image, encoder_attention_mask=image_mask)
    expected = hf_generate(ref, ids, **kw)
    assert torch.equal(generate(ours, ids, **kw), expected)


def test_cases_exercise_what_they_claim(bert_pair):
    # Guards the parity cases against silently testing nothing: EOS occurs, fills follow it, and the image
    # padding mask changes the result (so the masked states must reach every step).
    ref, ours = bert_pair
    ids, image = prompt()
    out = generate(ours, ids, max_length=15, encoder_hidden_states=image)
    assert (out == EOS).any() and (out == PAD).any() and not (out == EOS).all(dim=1).any()
    beams = generate(ours, ids, max_length=15, num_beams=3, num_return_sequences=3, early_stopping="never",
                     encoder_hidden_states=image)
    assert len({tuple(r) for r in beams.tolist()}) == 12
    masked = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]])
    assert not torch.equal(generate(ours, ids, max_length=15, encoder_hidden_states=image,
                                    encoder_attention_mask=masked), out)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_prompt_matches_transformers(bert_pair, num_beams):
    ref, ours = bert_pair
    ids, image = prompt()
    # Padding slots hold tokens the model likes to generate: the repetition penalty must skip them.
    ids = torch.cat([torch.tensor([[12, 16]] * 4), ids], dim=1)
    mask = torch.ones_like(ids)
    mask[0, :2] = mask[2, :1] = 0
    ids[1, :2] = torch.tensor([BOS, 20])  # rows 1 and 3 are full length
    ids[3, :2] = torch.tensor([BOS, 21])
    # Recent transformers 5.x exempt left padding from the repetition penalty (`prompt_ignore_length`); older 5.x
    # releases penalise it, so there the penalty stays off and only positions and masking are compared.
    exempt = "prompt_ignore_length" in inspect.getsource(transformers.GenerationMixin._get_logits_processor)
    penalty = 1.5 if exempt else 1.0
    kw = dict(max_length=16, num_beams=num_beams, repetition_penalty=penalty, attention_mask=mask,
              encoder_hidden_states=image)
    assert torch.equal(generate(ours, ids, **kw), hf_generate(ref, ids, **kw))


def test_start_from_bos_matches_transformers(bert_pair):
    ref, ours = bert_pair
    _, image = prompt()
    expected = hf_generate(ref, None, encoder_hidden_states=image, max_length=10, num_beams=2)
    assert torch.equal(generate(ours, encoder_hidden_states=image, max_length=10, num_beams=2), expected)
    assert (expected[:, 0] == BOS).all()


@pytest.mark.parametrize("kw", [dict(top_k=10, top_p=0.9, temperature=0.7, num_return_sequences=2),
                                dict(num_beams=3, top_k=5, temperature=1.3)], ids=["sample", "beam_sample"])
def test_sampling_matches_transformers_on_the_global_rng(bert_pair, kw):
    ref, ours = bert_pair
    ids, image = prompt()
    kw = dict(kw, do_sample=True, max_length=14, encoder_hidden_states=image)
    torch.manual_seed(123)
    expected = hf_generate(ref, ids, **kw)
    torch.manual_seed(123)
    assert torch.equal(generate(ours, ids, **kw), expected)


BLIP_CASES = ["greedy", "greedy_repetition_penalty", "beam3_return2_lp", "beam3_early_lp2", "beam3_never"]


@pytest.mark.parametrize("case", BLIP_CASES)
def test_blip_text_decoder_matches_transformers(blip_pair, case):
    ref, ours = blip_pair
    assert ours.config.encoder_width == 24 != ours.config.hidden_size
    ids, image = prompt(width=24)
    # transformers 5.x BlipText* ignores encoder_attention_mask, so the images are unpadded here.
    kw = dict(CASES[case], encoder_hidden_states=image)
    assert torch.equal(generate(ours, ids, **kw), hf_generate(ref, ids, **kw))


def test_beam_fill_is_pad_even_when_pad_is_zero(bert_pair):
    # transformers fills finished beams with `pad_token_id or eos_token_id`, i.e. with EOS when pad is 0
    # (a tensor 0 is falsy). bertkit fills with pad as documented; everything else is identical.
    ref, ours = bert_pair
    ids, image = prompt()
    kw = dict(max_length=15, num_beams=3, num_return_sequences=3, pad_token_id=0, encoder_hidden_states=image)
    ours_out, expected = generate(ours, ids, **kw), hf_generate(ref, ids, **kw)
    ended = (ours_out[:, ids.shape[1]:] == EOS).cumsum(dim=1) > 0
    filler = ended & ~((ours_out[:, ids.shape[1]:] == EOS) & (ended.cumsum(dim=1) == 1))
    assert filler.any() and (ours_out[:, ids.shape[1]:][filler] == 0).all()
    assert torch.equal(ours_out, torch.cat([ids.repeat_interleave(3, 0),
                                            expected[:, ids.shape[1]:].masked_fill(filler, 0)], dim=1))


def test_cross_attention_keys_computed_once_per_input_row(bert_pair):
    _, ours = bert_pair
    ids, image = prompt()
    rows = []
    hooks = [layer.crossattention.self.key.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for layer in ours.bert.encoder.layer]
    try:
        for kw in (dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, num_return_sequences=2, seed=0)):
            rows.clear()
            generate(ours, ids, max_length=15, encoder_hidden_states=image, **kw)
            # One call per layer (the prefill), on one row per prompt: never per beam, never per step.
            assert rows == [4] * CFG["num_hidden_layers"], kw
    finally:
        for h in hooks:
            h.remove()


def test_pre_expanded_image_features_are_accepted(bert_pair):
    # BLIP's own code repeats the image embeddings num_beams times before calling generate.
    _, ours = bert_pair
    ids, image = prompt()
    kw = dict(max_length=12, num_beams=3)
    out = generate(ours, ids, encoder_hidden_states=image, **kw)
    assert torch.equal(generate(ours, ids, encoder_hidden_states=image.repeat_interleave(3, 0), **kw), out)
    with pytest.raises(ValueError, match="not 3 copies of each row"):
        generate(ours, ids, encoder_hidden_states=image.repeat(3, 1, 1), **kw)


# ---------------------------------------------------------------- hand-made distributions


class FixedLM(torch.nn.Module):
    """A 'model' whose next-token distribution is ``probs`` (1-D), or ``probs[last token]`` (2-D)."""

    def __init__(self, probs, eos=None):
        super().__init__()
        self.config = SimpleNamespace(is_decoder=True, bos_token_id=0, eos_token_id=eos, pad_token_id=None,
                                      max_position_embeddings=512)
        self.logits = torch.tensor(probs).log()
        self.calls = []

    def forward(self, input_ids, past_key_values=None, **kwargs):
        batch, new = input_ids.shape
        seen = past_key_values[0][0].shape[2] if past_key_values else 0
        self.calls.append(new)
        cache = (torch.zeros(batch, 1, seen + new, 1),) * 2  # only its length matters
        logits = self.logits[input_ids] if self.logits.dim() == 2 else self.logits.expand(batch, new, -1)
        return SimpleNamespace(logits=logits, past_key_values=(cache,))


def draws(model, seed=0, **kw):
    start = torch.zeros(500, 1, dtype=torch.long)
    return generate(model, start, do_sample=True, max_length=9, seed=seed, **kw)[:, 1:]


def test_top_k_keeps_only_the_k_best():
    counts = torch.bincount(draws(FixedLM([0.4, 0.3, 0.2, 0.1]), top_k=2).flatten(), minlength=4)
    assert counts[0] > 0 and counts[1] > 0 and counts[2:].sum() == 0


@pytest.mark.parametrize("top_p, allowed", [(0.5, {0}), (0.8, {0, 1}), (0.95, {0, 1, 2}), (1e-6, {0})])
def test_top_p_keeps_the_nucleus(top_p, allowed):
    assert set(draws(FixedLM([0.6, 0.3, 0.1]), top_p=top_p, top_k=0).unique().tolist()) == allowed


def test_temperature_reshapes_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    freq = torch.bincount(draws(FixedLM(probs.tolist()), temperature=2.0, top_k=0).flatten(), minlength=3) / 4000
    tempered = probs.sqrt() / probs.sqrt().sum()  # p ** (1 / T), renormalised
    torch.testing.assert_close(freq, tempered, atol=0.025, rtol=0)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone():
    model = FixedLM([0.3, 0.3, 0.2, 0.2])
    state = torch.get_rng_state()
    a, b = draws(model, seed=7), draws(model, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, draws(model, seed=8))
    assert torch.equal(torch.get_rng_state(), state)
    start = torch.zeros(500, 1, dtype=torch.long)
    with_generator = generate(model, start, do_sample=True, max_length=9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(with_generator[:, 1:], a)


def test_min_length_forbids_eos_then_allows_it():
    model = FixedLM([0.5, 0.3, 0.2], eos=0)  # EOS is the most likely token
    start = torch.zeros(2, 1, dtype=torch.long)
    assert generate(model, start, max_length=10).tolist() == [[0, 0]] * 2
    # EOS is allowed once the sequence is 5 long, so it comes 6th.
    assert generate(model, start, max_length=10, min_length=5).tolist() == [[0, 1, 1, 1, 1, 0]] * 2


def test_repetition_penalty_demotes_tokens_of_the_prompt():
    model = FixedLM([0.5, 0.45, 0.05])
    start = torch.tensor([[0], [2]])
    # log 0.5 * 2 < log 0.45: token 0 loses once it is in the sequence (here: in the prompt of row 0).
    assert generate(model, start, max_length=2, repetition_penalty=2.0).tolist() == [[0, 1], [2, 0]]


def test_a_beam_that_ends_does_not_cost_a_running_beam():
    # Token 1 is EOS. After the start token: 2 (0.4) > EOS (0.35) > 3 (0.15); after 3 comes 4 almost surely.
    # The best two hypotheses are [EOS] (0.35) and [3, 4] (0.147): found only if [3] keeps running while
    # [EOS] is set aside, which is why beam search looks at 2 * num_beams candidates.
    table = [[1e-4, 0.35, 0.4, 0.15, 0.0999],
             [0.2] * 5,
             [1e-4, 0.3, 0.26, 0.24, 0.1999],
             [1e-4, 0.005, 0.005, 0.0099, 0.98],
             [0.2] * 5]
    out = generate(FixedLM(table, eos=1), torch.zeros(1, 1, dtype=torch.long), num_beams=2, num_return_sequences=2,
                   max_length=3, length_penalty=0.0, early_stopping="never")
    assert out.tolist() == [[0, 1, 1], [0, 3, 4]]  # pad defaults to EOS here


@pytest.mark.parametrize("probs, early_stopping, calls", [
    ([0.5, 0.3, 0.2], False, 2),      # heuristic: the running beams can no longer beat the finished ones
    ([0.5, 0.3, 0.2], "never", 15),   # ... unless they could grow to max_length (length_penalty > 0)
    ([0.35, 0.6, 0.05], True, 2),     # True: num_beams finished hypotheses are enough
    ([0.35, 0.6, 0.05], False, 19),   # False: the running beam keeps improving its average, up to max_length
])
def test_beam_search_stops_when_early_stopping_says_so(probs, early_stopping, calls):
    model = FixedLM(probs, eos=0)
    generate(model, torch.ones(1, 1, dtype=torch.long), num_beams=2, max_length=20, early_stopping=early_stopping)
    assert len(model.calls) == calls


def test_filters_keep_one_token_per_eos_plus_one_for_beam_sampling():
    # HF keeps len(eos) + 1 tokens in top-k/top-p with beams, so a beam can always continue past an EOS.
    from bertkit.generation import _Processor
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
    for min_keep, kept in [(1, 1), (2, 2)]:
        for kw in (dict(top_k=1, top_p=1.0), dict(top_k=0, top_p=0.01)):
            process = _Processor([], 0, 1.0, None, True, 1.0, min_keep=min_keep, **kw)
            assert int(process(torch.zeros(1, 1, dtype=torch.long), logits).isfinite().sum()) == kept


def test_kv_cache_feeds_one_token_per_step():
    model = FixedLM([0.1, 0.9])
    generate(model, torch.zeros(3, 4, dtype=torch.long), max_length=9)
    assert model.calls == [4] + [1] * 4


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, message", [
    (dict(num_return_sequences=2), "num_return_sequences=2 needs do_sample=True"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must be <= num_beams \(2\)"),
    (dict(num_beams=0), "num_beams must be a positive integer"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be a non-negative integer"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(max_length=3), r"max_length \(3\) counts the prompt and must exceed its length \(3\)"),
    (dict(max_length=100), r"max_length \(100\) exceeds max_position_embeddings \(64\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(min_length=-1), "min_length must be >= 0"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(seed=1, generator=torch.Generator()), "either generator or seed"),
    (dict(attention_mask=torch.ones(4, 2)), r"attention_mask has shape \(4, 2\)"),
    (dict(encoder_hidden_states=torch.randn(3, 6, 32)), "encoder_hidden_states has 3 rows but input_ids has 4"),
    (dict(encoder_hidden_states=torch.randn(4, 6, 32), encoder_attention_mask=torch.ones(4, 5)),
     r"encoder_attention_mask has shape \(4, 5\)"),
])
def test_bad_arguments_name_themselves(bert_pair, kw, message):
    ids, _ = prompt()
    with pytest.raises(ValueError, match=message):
        generate(bert_pair[1], ids, **kw)


def test_models_that_cannot_decode_are_refused(bert_pair):
    mlm = bertkit.BertForMaskedLM(bertkit.BertConfig(**dict(CFG, num_hidden_layers=1)))
    with pytest.raises(ValueError, match="needs a causal LM with a KV cache; BertForMaskedLM"):
        generate(mlm, torch.ones(1, 2, dtype=torch.long))
    no_bos = FixedLM([0.5, 0.5])
    no_bos.config.bos_token_id = None
    with pytest.raises(ValueError, match="no bos_token_id to start from"):
        generate(no_bos)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, prompt_len\) integer ids"):
        generate(bert_pair[1], torch.ones(3, dtype=torch.long))

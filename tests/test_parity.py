"""Parity with transformers 5.x (BERT and Megatron-BERT) through the real path: HF save_pretrained -> bertkit
from_pretrained (and back).

Every weight of the reference model is re-drawn with a large spread (LayerNorm scales and biases
included), so a missing bias or a misplaced LayerNorm cannot hide behind HF's near-zero init.
"""

import pytest
import torch
import transformers

import bertkit

TASKS = [
    "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction", "BertLMHeadModel",
    "BertForSequenceClassification", "BertForMultipleChoice", "BertForTokenClassification",
    "BertForQuestionAnswering",
]

BASE = dict(vocab_size=37, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=17,
            max_position_embeddings=23, type_vocab_size=3, num_labels=3, pad_token_id=1)


# Megatron-BERT is the same bertkit classes with norm_placement="pre"; HF keeps a separate copy of each.
HF_MEGATRON = {"BertModel": "MegatronBertModel", "BertLMHeadModel": "MegatronBertForCausalLM"}


def hf_class(task, family):
    if family == "bert":
        return getattr(transformers, task)
    return getattr(transformers, HF_MEGATRON.get(task, task.replace("Bert", "MegatronBert")))


def hf_config(family="bert", **kw):
    task = kw.pop("task", None)
    cfg = dict(BASE, **kw)
    if task == "BertForQuestionAnswering":
        cfg["num_labels"] = 2  # start and end
    return (transformers.BertConfig if family == "bert" else transformers.MegatronBertConfig)(**cfg)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if name.endswith(("LayerNorm.weight", "ln.weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + offset)
    return model


def make_inputs(task, config, seed=1, batch=3, seq=7):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 2, seq) if task == "BertForMultipleChoice" else (batch, seq)
    ids = torch.randint(0, config.vocab_size, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    mask[..., 0, -3:] = 0 if task == "BertForMultipleChoice" else 1
    mask.view(-1, seq)[0, -3:] = 0  # padding in the first row
    mask.view(-1, seq)[-1, -1:] = 0
    types = torch.randint(0, config.type_vocab_size, shape, generator=g)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if task in ("BertForPreTraining", "BertForMaskedLM", "BertLMHeadModel"):
        labels = torch.randint(0, config.vocab_size, shape, generator=g)
        labels[0, :2] = -100
        inputs["labels"] = labels
    if task == "BertForPreTraining":
        inputs["next_sentence_label"] = torch.randint(0, 2, (batch,), generator=g)
    if task == "BertForNextSentencePrediction":
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g)
    if task == "BertForSequenceClassification":
        inputs["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    if task == "BertForMultipleChoice":
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g)
    if task == "BertForTokenClassification":
        inputs["labels"] = torch.randint(0, config.num_labels, shape, generator=g)
    if task == "BertForQuestionAnswering":
        inputs["start_positions"] = torch.tensor([1, 3, 40])  # 40 is out of range: clamped and ignored
        inputs["end_positions"] = torch.tensor([2, 5, 6])
    return inputs


def outputs_of(out):
    names = ["loss", "logits", "last_hidden_state", "pooler_output", "prediction_logits", "seq_relationship_logits",
             "start_logits", "end_logits"]
    return {n: getattr(out, n) for n in names if getattr(out, n, None) is not None}


def assert_same(ours, ref):
    a, b = outputs_of(ours), outputs_of(ref)
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("act,family", [("gelu", "bert"), ("relu", "bert"), ("gelu_new", "bert"), ("silu", "bert"),
                                        ("gelu", "megatron"), ("relu", "megatron")])
def test_hf_to_bertkit(task, act, family, tmp_path):
    kw = dict(hidden_act=act, task=task)
    if task == "BertLMHeadModel":
        kw["is_decoder"] = True
    ref = randomize(hf_class(task, family)(hf_config(family, **kw)).eval())
    ref.save_pretrained(tmp_path)
    ours = getattr(bertkit, task).from_pretrained(tmp_path)
    inputs = make_inputs(task, ref.config)
    with torch.no_grad():
        assert_same(ours(**inputs), ref(**inputs))


@pytest.mark.parametrize("family", ["bert", "megatron"])
@pytest.mark.parametrize("task", TASKS)
def test_train_mode_dropout_zero_and_gradients(task, family, tmp_path):
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, task=task)
    if task == "BertLMHeadModel":
        kw["is_decoder"] = True
    ref = randomize(hf_class(task, family)(hf_config(family, **kw)), seed=3)
    ref.save_pretrained(tmp_path)
    ours = getattr(bertkit, task).from_pretrained(tmp_path)
    ref.train(), ours.train()
    inputs = make_inputs(task, ref.config, seed=4)
    out_ours, out_ref = ours(**inputs), ref(**inputs)
    assert_same(out_ours, out_ref)
    if "loss" in outputs_of(out_ref):
        out_ours.loss.backward()
        out_ref.loss.backward()
        g_ours = ours.get_input_embeddings().weight.grad
        g_ref = ref.get_input_embeddings().weight.grad
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "megatron"])
@pytest.mark.parametrize("task", TASKS)
def test_bertkit_to_hf(task, family, tmp_path):
    kw = dict(hidden_act="gelu_new", is_decoder=task == "BertLMHeadModel",
              norm_placement="post" if family == "bert" else "pre")
    cfg = bertkit.BertConfig(**dict(BASE, **kw, num_labels=2 if task == "BertForQuestionAnswering" else 3))
    ours = randomize(getattr(bertkit, task)(cfg), seed=5).eval()
    ours.save_pretrained(tmp_path)
    ref = hf_class(task, family).from_pretrained(tmp_path).eval()
    assert ref.config.model_type == ("bert" if family == "bert" else "megatron-bert")
    inputs = make_inputs(task, cfg, seed=6)
    with torch.no_grad():
        assert_same(ours(**inputs), ref(**inputs))
    # Tied weights survive the trip: the HF decoder is our embedding matrix.
    if ref.get_output_embeddings() is not None:
        torch.testing.assert_close(ref.get_output_embeddings().weight, ours.get_input_embeddings().weight)


@pytest.mark.parametrize("family", ["bert", "megatron"])
def test_hidden_states_and_attentions_match_eager_reference(family, tmp_path):
    ref = randomize(hf_class("BertModel", family)(hf_config(family, attn_implementation="eager")).eval())
    ref.save_pretrained(tmp_path)
    ours = bertkit.BertModel.from_pretrained(tmp_path)
    inputs = make_inputs("BertModel", ref.config)
    with torch.no_grad():
        a = ours(**inputs, output_hidden_states=True, output_attentions=True)
        b = ref(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(b.hidden_states) == BASE["num_hidden_layers"] + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert len(a.attentions) == len(b.attentions)
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # The explicit path and SDPA agree.
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).last_hidden_state, a.last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "megatron"])
def test_decoder_with_cross_attention(family, tmp_path):
    ref = randomize(hf_class("BertLMHeadModel", family)(hf_config(family, is_decoder=True,
                                                                  add_cross_attention=True)).eval())
    ref.save_pretrained(tmp_path)
    ours = bertkit.BertLMHeadModel.from_pretrained(tmp_path)
    inputs = make_inputs("BertLMHeadModel", ref.config)
    g = torch.Generator().manual_seed(9)
    # transformers 5's Megatron-BERT reshapes cross-attention keys with the *query* length, so it only runs
    # when both lengths agree (7); bertkit has no such limit (BERT uses 5 encoder positions here).
    n = 5 if family == "bert" else 7
    enc = torch.randn(3, n, BASE["hidden_size"], generator=g)
    enc_mask = torch.ones(3, n, dtype=torch.long)
    enc_mask[0, 3:] = 0
    enc_mask[2, 2:] = 0
    with torch.no_grad():
        a = ours(**inputs, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
        b = ref(**inputs, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    assert_same(a, b)


def test_outputs_by_attribute_index_and_tuple(tmp_path):
    cfg = bertkit.BertConfig(**BASE)
    model = bertkit.BertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model(ids)
    assert out[0] is out.last_hidden_state and out["pooler_output"] is out.pooler_output
    seq, pooled = out[:2]
    assert pooled.shape == (2, cfg.hidden_size)
    tup = model(ids, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2
    torch.testing.assert_close(tup[0], seq)


@pytest.mark.parametrize("direction", ["hf_to_bertkit", "bertkit_to_hf"])
def test_untied_decoder_keeps_its_own_bias(direction, tmp_path):
    # tie_word_embeddings=False: transformers uses cls.predictions.decoder.bias, separate from predictions.bias.
    if direction == "hf_to_bertkit":
        ref = randomize(transformers.BertForMaskedLM(hf_config(tie_word_embeddings=False)).eval(), seed=11)
        assert not torch.equal(ref.cls.predictions.decoder.bias, ref.cls.predictions.bias)
        ref.save_pretrained(tmp_path)
        ours = bertkit.BertForMaskedLM.from_pretrained(tmp_path, strict=True)
    else:
        ours = randomize(bertkit.BertForMaskedLM(bertkit.BertConfig(**BASE, tie_word_embeddings=False)), seed=11).eval()
        ours.save_pretrained(tmp_path)
        ref = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    inputs = make_inputs("BertForMaskedLM", ref.config)
    with torch.no_grad():
        assert_same(ours(**inputs), ref(**inputs))

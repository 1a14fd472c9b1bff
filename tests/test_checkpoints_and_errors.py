"""Checkpoint I/O (every HF layout, prefixes, legacy names) and every bad-input error message."""

import json
import os
import pickle

import pytest
import torch
import transformers
from safetensors.torch import save_file

import bertkit
from bertkit.checkpoints.io import atomic_write_bytes

TINY = dict(vocab_size=31, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=10,
            max_position_embeddings=16)


@pytest.fixture
def hf_folder(tmp_path):
    ref = transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).eval()
    ref.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", ref


def _ids(n=2, length=6, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- layouts
def test_sharded_safetensors_with_index(tmp_path):
    ref = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="2KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = bertkit.BertModel.from_pretrained(tmp_path)
    with torch.no_grad():
        _same(ours(_ids()).last_hidden_state, ref(_ids()).last_hidden_state)


def test_pytorch_model_bin_with_legacy_names(tmp_path, hf_folder):
    folder, ref = hf_folder
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in ref.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(16)[None]  # old non-persistent buffer
    out = tmp_path / "bin"
    out.mkdir()
    torch.save(state, out / "pytorch_model.bin")
    (out / "config.json").write_text((folder / "config.json").read_text())
    ours, info = bertkit.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    with torch.no_grad():
        _same(ours(_ids()).logits, ref(_ids()).logits)


def test_bare_model_into_task_model_and_back(tmp_path, hf_folder):
    folder, ref = hf_folder
    base = bertkit.BertModel.from_pretrained(folder, add_pooling_layer=False)
    with torch.no_grad():
        _same(base(_ids()).last_hidden_state, ref.bert(_ids()).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    clf, info = bertkit.BertForSequenceClassification.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert "classifier.weight" in info["missing_keys"] and "bert.pooler.dense.weight" in info["missing_keys"]
    assert not any(k.startswith("bert.encoder") for k in info["missing_keys"])
    torch.testing.assert_close(clf.bert.embeddings.word_embeddings.weight, ref.bert.embeddings.word_embeddings.weight)
    _, info = bertkit.BertModel.from_pretrained(folder, output_loading_info=True, add_pooling_layer=False)
    assert info["missing_keys"] == []
    assert "cls.predictions.bias" in info["unexpected_keys"]


def test_dtype_and_strict(hf_folder):
    folder, _ = hf_folder
    m = bertkit.BertForMaskedLM.from_pretrained(folder, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="missing keys"):
        bertkit.BertForSequenceClassification.from_pretrained(folder, strict=True)


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    model = bertkit.BertModel(bertkit.BertConfig(**TINY))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    target = tmp_path / "model.safetensors"
    before = target.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # the write fails half-way: the old file must survive
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_unknown_config_keys_survive_a_round_trip(tmp_path):
    cfg = bertkit.BertConfig.from_dict(dict(TINY, my_custom_field=[1, 2], gradient_checkpointing=True))
    assert cfg.extra == {"my_custom_field": [1, 2], "gradient_checkpointing": True}
    bertkit.BertModel(cfg).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["my_custom_field"] == [1, 2]
    assert bertkit.BertConfig.from_pretrained(tmp_path).extra["my_custom_field"] == [1, 2]


def test_resize_token_embeddings_keeps_rows_and_tying(hf_folder):
    folder, ref = hf_folder
    m = bertkit.BertForMaskedLM.from_pretrained(folder)
    old = m.get_input_embeddings().weight.detach().clone()
    m.resize_token_embeddings(40)
    assert m.config.vocab_size == 40 and m.cls.predictions.bias.shape == (40,)
    assert m.cls.predictions.decoder.weight is m.get_input_embeddings().weight
    torch.testing.assert_close(m.get_input_embeddings().weight[:31], old)
    assert m(torch.tensor([[39, 3]])).logits.shape == (1, 2, 40)
    # Same logits as HF's resize on the vocabulary both share.
    ref.resize_token_embeddings(40)
    with torch.no_grad():
        ref.get_input_embeddings().weight[31:] = m.get_input_embeddings().weight[31:]
        _same(m(_ids()).logits[..., :31], ref(_ids()).logits[..., :31])


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def model():
    return bertkit.BertModel(bertkit.BertConfig(**TINY)).eval()


def test_input_id_out_of_range(model):
    with pytest.raises(ValueError, match=r"input_ids contains 31 but vocab_size is 31"):
        model(torch.tensor([[1, 31]]))
    with pytest.raises(ValueError, match=r"input_ids contains -1 but vocab_size is 31"):
        model(torch.tensor([[-1, 3]]))


def test_too_long_says_truncate(model):
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_position_embeddings=16; truncate"):
        model(torch.ones(1, 17, dtype=torch.long))


def test_mask_and_token_type_shapes(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\) but input_ids has shape \(2, 6\)"):
        model(_ids(), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(1, 6\) but input_ids has shape \(2, 6\)"):
        model(_ids(), token_type_ids=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_type_ids contains 2 but type_vocab_size is 2"):
        model(_ids(), token_type_ids=torch.full((2, 6), 2))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_missing_path_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bertkit.BertModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.json"):
        bertkit.BertModel.from_pretrained(tmp_path / "empty")
    bertkit.BertConfig(**TINY).save_pretrained(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*noweights"):
        bertkit.BertModel.from_pretrained(tmp_path / "noweights")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        bertkit.BertModel.from_pretrained(tmp_path / "badjson")


def test_truncated_and_corrupted_safetensors(tmp_path, hf_folder):
    folder, _ = hf_folder
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: tensors need \d+ bytes but the file has \d+"):
        bertkit.BertModel.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"header claims 1000000000 bytes"):
        bertkit.BertModel.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x03")
    with pytest.raises(ValueError, match=r"model.safetensors is truncated"):
        bertkit.BertModel.from_pretrained(folder)


def test_shape_mismatch_names_the_key(tmp_path, hf_folder):
    folder, ref = hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 11
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.intermediate.dense.bias' has shape \(10,\) "
                                         r"but the model built from its config expects \(11,\)"):
        bertkit.BertForMaskedLM.from_pretrained(folder)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.sentinel}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    _RunsCode.sentinel = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    bertkit.BertConfig(**TINY).save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _RunsCode()}, f)
    with pytest.raises(ValueError, match=r"pytorch_model.bin was refused"):
        bertkit.BertModel.from_pretrained(folder)
    assert not _RunsCode.sentinel.exists()


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 10, r"hidden_size \(10\) must be divisible by num_attention_heads \(4\)"),
    ("num_hidden_layers", -1, r"num_hidden_layers must be positive, got -1"),
    ("vocab_size", 0, r"vocab_size must be positive, got 0"),
    ("hidden_act", "gelu2", r"hidden_act 'gelu2' is unknown"),
    ("position_embedding_type", "rotary", r"position_embedding_type 'rotary' is unknown"),
    ("norm_placement", "sandwich", r"norm_placement 'sandwich' is unknown"),
    ("hidden_dropout_prob", 1.5, r"hidden_dropout_prob must be in \[0, 1\]"),
    ("hidden_size", 10**9, r"parameters .* over the"),
])
def test_config_validation_names_the_field(field, value, message):
    kw = dict(num_attention_heads=4)
    kw[field] = value
    if field == "hidden_size" and value == 10**9:
        kw["num_attention_heads"] = 1
    with pytest.raises(ValueError, match=message):
        bertkit.BertConfig(**kw)


def test_config_file_error_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 10, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"config.json: hidden_size \(10\) must be divisible"):
        bertkit.BertConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_rows_give_zeros_not_nan(dtype):
    torch.manual_seed(0)
    model = bertkit.BertModel(bertkit.BertConfig(**TINY, is_decoder=True, add_cross_attention=True)).eval().to(dtype)
    ids = _ids()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0  # a row with nothing to attend to
    enc = torch.randn(2, 3, 8, dtype=dtype)
    enc_mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with torch.no_grad():
        for attn_impl in ("sdpa", "eager"):
            model.config.attn_implementation = attn_impl
            out = model(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                        output_attentions=attn_impl == "eager")
            assert torch.isfinite(out.last_hidden_state).all()
            if attn_impl == "eager":
                assert (out.attentions[0][1] == 0).all() and (out.cross_attentions[0][1] == 0).all()

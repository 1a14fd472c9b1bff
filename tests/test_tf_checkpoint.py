"""Google BERT TensorFlow checkpoints, read and converted without TensorFlow.

The fixture under tests/fixtures/tf_bert/ was written by real TensorFlow (tests/make_tf_fixture.py);
each ``.npz`` holds what TensorFlow itself reads back from the checkpoint beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bertkit.checkpoints import convert as cv
from bertkit.checkpoints.tables.tf_bert import TF_BERT
from bertkit.checkpoints.tf import _architecture, add_tf_arguments, convert_tf_checkpoint
from bertkit.checkpoints.tf_bundle import TFCheckpointReader, _crc_bytes, crc32c, read_tf_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "tf_bert"
BERT = FIXTURE / "bert_model.ckpt"
DTYPES = FIXTURE / "dtypes.ckpt"
CONFIG = json.loads((FIXTURE / "bert_config.json").read_text())


def expected(prefix: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with np.load(f"{prefix}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(str(arrays.pop("__tf_dtypes__")))


def copy_checkpoint(prefix: Path, tmp_path: Path) -> Path:
    for f in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / prefix.name


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------- reader
@pytest.mark.parametrize("prefix", [BERT, DTYPES], ids=["bert", "dtypes"])
def test_every_tensor_equals_what_tensorflow_reads(prefix):
    arrays, tf_dtypes = expected(prefix)
    reader = TFCheckpointReader(prefix)
    assert sorted(reader) == sorted(tf_dtypes)
    for name, tf_dtype in tf_dtypes.items():
        assert reader.dtype(name) == tf_dtype, name
        if tf_dtype == "string":
            continue
        value = reader.get_tensor(name)
        assert reader.shape(name) == arrays[name].shape == value.shape, name
        assert value.dtype == arrays[name].dtype, name
        np.testing.assert_array_equal(value, arrays[name], err_msg=name)


def test_bert_fixture_has_google_names_slots_and_step():
    reader = TFCheckpointReader(BERT)
    assert reader.shape("bert/encoder/layer_1/intermediate/dense/kernel") == (8, 12)  # (in, out)
    assert reader.shape("bert/encoder/layer_1/intermediate/dense/kernel/adam_m") == (8, 12)
    assert reader.dtype("global_step") == "int64" and reader["global_step"] == 12345
    assert len(reader) == 3 * 46 + 1  # weights, two Adam slots each, global_step


def test_dtypes_fixture_covers_half_precision_int64_and_two_shards():
    reader = TFCheckpointReader(DTYPES)
    bf16 = reader["bfloat16"]  # written from [[1.5, -2.25], [3e38, 1e-3]]: 8 significant bits survive
    assert bf16.dtype == np.float32 and not (bf16.view(np.uint32) & 0xFFFF).any()
    np.testing.assert_allclose(bf16, [[1.5, -2.25], [3e38, 1e-3]], rtol=2**-8)
    assert reader["half"].dtype == np.float16
    assert reader["int64"].tolist() == [-5, 2**40 + 3, 2**62]
    assert {e.shard for e in reader._entries.values()} == {0, 1}


def test_read_tf_checkpoint_and_prefix_spellings(tmp_path):
    arrays, _ = expected(BERT)
    state = read_tf_checkpoint(BERT)
    assert state.keys() == arrays.keys()
    for spelling in (f"{BERT}.index", f"{BERT}.data-00000-of-00001"):
        assert TFCheckpointReader(spelling).prefix == BERT
    copy = copy_checkpoint(BERT, tmp_path)
    assert TFCheckpointReader(tmp_path).prefix == copy  # a folder with one checkpoint
    with pytest.raises(FileNotFoundError, match="2 .index files"):
        TFCheckpointReader(FIXTURE)


def test_crc32c_known_value_and_numpy_lanes_agree_with_bytewise_loop():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in (1, 16383, 16384, 16385, 3 * 16384 + 7, 200_003):  # below, at and above one lane width
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        want = _crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF
        assert crc32c(data) == want, n
        assert crc32c(data[n // 3:], crc32c(data[: n // 3])) == want, n  # continuing a crc


# ------------------------------------------------------------------------------------ bad input
def test_missing_index_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint index at .*nothing.ckpt.index"):
        TFCheckpointReader(tmp_path / "nothing.ckpt")


def test_corrupted_index_block_is_reported(tmp_path):
    prefix = copy_checkpoint(BERT, tmp_path)
    flip_byte(Path(f"{prefix}.index"), 100)  # inside the first data block
    with pytest.raises(ValueError, match=r"bert_model.ckpt.index: block checksum mismatch"):
        TFCheckpointReader(prefix)


def test_bad_magic_is_reported(tmp_path):
    prefix = copy_checkpoint(BERT, tmp_path)
    index = Path(f"{prefix}.index")
    flip_byte(index, index.stat().st_size - 1)
    with pytest.raises(ValueError, match="bad magic number.*not a TensorFlow checkpoint"):
        TFCheckpointReader(prefix)


def test_truncated_index_is_reported(tmp_path):
    prefix = copy_checkpoint(BERT, tmp_path)
    index = Path(f"{prefix}.index")
    index.write_bytes(index.read_bytes()[-60:])  # footer intact, blocks gone
    with pytest.raises(ValueError, match="bert_model.ckpt.index: block at offset .* runs past the end"):
        TFCheckpointReader(prefix)


def test_truncated_data_file_is_reported(tmp_path):
    prefix = copy_checkpoint(BERT, tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:-10])
    reader = TFCheckpointReader(prefix)
    reader["bert/embeddings/word_embeddings"]  # early tensors still read
    last = max(reader._entries, key=lambda k: reader._entries[k].offset)
    with pytest.raises(ValueError, match=r"data-00000-of-00001 is truncated: .* needs bytes"):
        reader[last]


def test_missing_data_shard_is_reported(tmp_path):
    prefix = copy_checkpoint(DTYPES, tmp_path)
    Path(f"{prefix}.data-00001-of-00002").unlink()
    with pytest.raises(ValueError, match=r"data shard\(s\) dtypes.ckpt.data-00001-of-00002 missing"):
        TFCheckpointReader(prefix)


def test_crc_mismatch_in_data_is_reported(tmp_path):
    prefix = copy_checkpoint(BERT, tmp_path)
    reader = TFCheckpointReader(prefix)
    entry = reader._entries["bert/pooler/dense/kernel"]
    flip_byte(Path(f"{prefix}.data-00000-of-00001"), entry.offset + 5)
    with pytest.raises(ValueError, match="crc32c mismatch for 'bert/pooler/dense/kernel'"):
        reader["bert/pooler/dense/kernel"]
    reader["bert/pooler/dense/bias"]  # the neighbours are intact
    assert TFCheckpointReader(prefix, verify_crc=False)["bert/pooler/dense/kernel"].shape == (8, 8)


def test_unsupported_dtype_is_refused_by_name():
    reader = TFCheckpointReader(DTYPES)
    assert reader.dtype("string") == "string"
    with pytest.raises(ValueError, match="'string' in .*dtypes.ckpt has dtype string, which bertkit does not read"):
        reader["string"]
    with pytest.raises(KeyError, match="'nope' is not in the checkpoint"):
        reader["nope"]


# ----------------------------------------------------------------------------------------- engine
TOY = [
    cv.transpose("enc/{i}/kernel", "enc.{i}.weight"),
    cv.copy("enc/{i}/bias", "enc.{i}.bias"),
    cv.split("enc/{i}/qkv", [f"enc.{{i}}.{p}" for p in "qkv"],
             lambda x: np.split(x, 3), lambda *parts: np.concatenate(parts)),
    cv.fuse(["enc/{i}/gate", "enc/{i}/up"], "enc.{i}.gate_up",
            lambda g, u: np.concatenate([g, u]), lambda x: np.split(x, 2)),
    cv.drop("{var:.+}/adam_m"),
    cv.drop("step"),
]


def toy_state():
    rng = np.random.default_rng(1)
    state = {}
    for i in range(2):
        state |= {f"enc/{i}/kernel": rng.standard_normal((3, 4)), f"enc/{i}/bias": rng.standard_normal(4),
                  f"enc/{i}/qkv": rng.standard_normal((6, 4)), f"enc/{i}/gate": rng.standard_normal((2, 4)),
                  f"enc/{i}/up": rng.standard_normal((2, 4)), f"enc/{i}/kernel/adam_m": rng.standard_normal((3, 4))}
    return state | {"step": np.array(7)}


def test_engine_converts_and_round_trips():
    state = toy_state()
    out = cv.apply(TOY, state)
    assert sorted(out) == sorted(f"enc.{i}.{n}" for i in range(2) for n in ("weight", "bias", "q", "k", "v", "gate_up"))
    np.testing.assert_array_equal(out["enc.1.weight"], state["enc/1/kernel"].T)
    np.testing.assert_array_equal(out["enc.0.k"], state["enc/0/qkv"][2:4])
    np.testing.assert_array_equal(out["enc.0.gate_up"][2:], state["enc/0/up"])
    back = cv.apply(cv.inverse(TOY), out)
    kept = {k: v for k, v in state.items() if not k.endswith("adam_m") and k != "step"}
    assert back.keys() == kept.keys()
    for k in kept:
        np.testing.assert_array_equal(back[k], kept[k], err_msg=k)


def test_engine_names_every_unknown_key_before_reading_anything():
    class Untouchable(dict):
        def __getitem__(self, key):
            raise AssertionError(f"read {key} although the conversion must fail first")

    state = Untouchable(toy_state() | {"enc/0/mystery": 1, "other/thing": 2})
    with pytest.raises(ValueError, match=r"2 key\(s\) match no rule.*\n  'enc/0/mystery'\n  'other/thing'"):
        cv.apply(TOY, state)


def test_engine_never_reads_dropped_tensors():
    class Recording(dict):
        read: set = set()

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

    state = Recording(toy_state())
    cv.apply(TOY, state)
    assert state.read and not any(k.endswith("adam_m") or k == "step" for k in state.read)


def test_engine_reports_ambiguity_missing_partners_and_bad_rules():
    with pytest.raises(ValueError, match="'a/b' matches several rules: copy.*; drop"):
        cv.apply([cv.copy("a/{x}", "a.{x}"), cv.drop("{p:.+}/b")], {"a/b": 1})
    with pytest.raises(ValueError, match="'enc/0/gate' needs 'enc/0/up' too"):
        cv.apply(TOY, {"enc/0/gate": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"several sources would write 'x'"):
        cv.apply([cv.copy("a", "x"), cv.copy("b", "x")], {"a": 1, "b": 2})
    with pytest.raises(ValueError, match=r"transpose\(enc/\{i\}/kernel -> .*'enc/0/kernel'.*expects a matrix"):
        cv.apply(TOY, {"enc/0/kernel": np.zeros(3)})
    halves = cv.split("w", ["a", "b", "c"], lambda x: np.split(x, 2), np.concatenate)
    with pytest.raises(ValueError, match=r"split\(w -> a, b, c\) failed on 'w'"):
        cv.apply([halves], {"w": np.zeros(4)})
    with pytest.raises(ValueError, match="needs the placeholders"):
        cv.copy("layer_{i}/w", "layer.w")


# ---------------------------------------------------------------------------------- BERT table
def test_table_gives_hf_names_and_transposes_only_kernels():
    raw = read_tf_checkpoint(BERT)
    out = cv.apply(TF_BERT, raw)
    assert len(out) == 46 and not any("adam" in k or "step" in k for k in out)
    pairs = {  # HF name -> (TF name, transposed?)
        "bert.embeddings.word_embeddings.weight": ("bert/embeddings/word_embeddings", False),
        "bert.embeddings.LayerNorm.weight": ("bert/embeddings/LayerNorm/gamma", False),
        "bert.embeddings.LayerNorm.bias": ("bert/embeddings/LayerNorm/beta", False),
        "bert.encoder.layer.1.attention.self.query.weight": ("bert/encoder/layer_1/attention/self/query/kernel", True),
        "bert.encoder.layer.0.attention.self.value.bias": ("bert/encoder/layer_0/attention/self/value/bias", False),
        "bert.encoder.layer.0.attention.output.LayerNorm.weight": ("bert/encoder/layer_0/attention/output/LayerNorm/gamma", False),
        "bert.encoder.layer.1.intermediate.dense.weight": ("bert/encoder/layer_1/intermediate/dense/kernel", True),
        "bert.encoder.layer.1.output.dense.weight": ("bert/encoder/layer_1/output/dense/kernel", True),
        "bert.pooler.dense.weight": ("bert/pooler/dense/kernel", True),
        "cls.predictions.transform.dense.weight": ("cls/predictions/transform/dense/kernel", True),
        "cls.predictions.transform.LayerNorm.bias": ("cls/predictions/transform/LayerNorm/beta", False),
        "cls.predictions.bias": ("cls/predictions/output_bias", False),
        "cls.seq_relationship.weight": ("cls/seq_relationship/output_weights", False),  # stored (2, hidden)
    }
    for hf, (tf, transposed) in pairs.items():
        np.testing.assert_array_equal(out[hf], raw[tf].T if transposed else raw[tf], err_msg=hf)
    assert out["bert.encoder.layer.1.intermediate.dense.weight"].shape == (12, 8)  # (out, in)


def test_table_knows_the_squad_and_classifier_heads():
    h = np.zeros((4, 8), np.float32)
    out = cv.apply(TF_BERT, {"cls/squad/output_weights": h[:2], "cls/squad/output_bias": h[0, :2],
                             "output_weights": h[:3], "output_bias": h[0, :3]})
    assert {k: v.shape for k, v in out.items()} == {"qa_outputs.weight": (2, 8), "qa_outputs.bias": (2,),
                                                    "classifier.weight": (3, 8), "classifier.bias": (3,)}
    assert _architecture(out) == "BertForQuestionAnswering"
    assert _architecture({"classifier.weight": h}) == "BertForSequenceClassification"
    assert _architecture({"bert.pooler.dense.weight": h}) == "BertModel"


def test_table_round_trip_exports_google_names():
    raw = read_tf_checkpoint(BERT)
    back = cv.apply(cv.inverse(TF_BERT), cv.apply(TF_BERT, raw))
    weights = {k: v for k, v in raw.items() if not k.endswith(("/adam_m", "/adam_v")) and k != "global_step"}
    assert back.keys() == weights.keys()
    for k, v in weights.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


# ------------------------------------------------------------------------------------- converter
def test_convert_writes_an_hf_folder(tmp_path):
    out = convert_tf_checkpoint(BERT, FIXTURE / "bert_config.json", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config == CONFIG | {"model_type": "bert", "architectures": ["BertForPreTraining"], "layer_norm_eps": 1e-12}
    assert (out / "vocab.txt").read_text() == (FIXTURE / "vocab.txt").read_text()
    from safetensors.numpy import load_file

    state = load_file(out / "model.safetensors")
    assert len(state) == 46
    np.testing.assert_array_equal(state["bert.encoder.layer.0.attention.self.key.weight"],
                                  TFCheckpointReader(BERT)["bert/encoder/layer_0/attention/self/key/kernel"].T)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_convert_never_reads_optimizer_slots(tmp_path):
    # Real fine-tuned checkpoints carry two Adam slots per weight (2/3 of the file): they must not
    # be read, so a corrupted slot does not matter.
    prefix = copy_checkpoint(BERT, tmp_path)
    entries = TFCheckpointReader(prefix)._entries
    data = Path(f"{prefix}.data-00000-of-00001")
    for name in entries:
        if name.endswith(("/adam_m", "/adam_v")):
            flip_byte(data, entries[name].offset)
    convert_tf_checkpoint(prefix, FIXTURE / "bert_config.json", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_convert_refuses_unknown_names_and_wrong_config(tmp_path):
    without_slot_drops = [r for r in TF_BERT if r.sources[0] not in ("{var:.+}/adam_m", "{var:.+}/adam_v")]
    with pytest.raises(ValueError, match=r"92 key\(s\) match no rule(.|\n)*'bert/embeddings/LayerNorm/beta/adam_m'"):
        convert_tf_checkpoint(BERT, FIXTURE / "bert_config.json", tmp_path / "a", table=without_slot_drops)
    wrong = tmp_path / "bert_config.json"
    wrong.write_text(json.dumps(CONFIG | {"hidden_size": 16, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"bert_config.json does not describe this checkpoint:(.|\n)*"
                                         r"word_embeddings.weight: checkpoint \(20, 8\), config \(20, 16\)(.|\n)*"
                                         r"the checkpoint has 2 layers, the config num_hidden_layers=1"):
        convert_tf_checkpoint(BERT, wrong, tmp_path / "b")
    wrong.write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match="bert_config.json lacks vocab_size"):
        convert_tf_checkpoint(BERT, wrong, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_arguments(tmp_path, capsys):
    parser = add_tf_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(BERT), str(tmp_path / "out"), "--config", str(FIXTURE / "bert_config.json")])
    assert args.func(args) == 0
    assert "BertForPreTraining" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------ parity with a raw forward
def reference_forward(t: dict[str, np.ndarray], ids, token_types, mask):
    """BERT written straight from the TF tensors, in float64: x @ kernel, as TF computes it."""
    t = {k: torch.from_numpy(v).double() for k, v in t.items() if v.dtype == np.float32}
    heads = CONFIG["num_attention_heads"]

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-12) * t[f"{name}/gamma"] + t[f"{name}/beta"]

    def dense(x, name):
        return x @ t[f"{name}/kernel"] + t[f"{name}/bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    batch, length = ids.shape
    x = (t["bert/embeddings/word_embeddings"][ids] + t["bert/embeddings/token_type_embeddings"][token_types]
         + t["bert/embeddings/position_embeddings"][:length])
    x = ln(x, "bert/embeddings/LayerNorm")
    adder = (1.0 - mask.double())[:, None, None, :] * -10000.0  # modeling.py's attention mask
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}"

        def split_heads(y):
            return y.view(batch, length, heads, -1).transpose(1, 2)

        q, k, v = (split_heads(dense(x, f"{p}/attention/self/{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + adder
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        attn = ln(dense(context, f"{p}/attention/output/dense") + x, f"{p}/attention/output/LayerNorm")
        x = ln(dense(gelu(dense(attn, f"{p}/intermediate/dense")), f"{p}/output/dense") + attn,
               f"{p}/output/LayerNorm")
    pooled = torch.tanh(dense(x[:, 0], "bert/pooler/dense"))
    h = ln(gelu(dense(x, "cls/predictions/transform/dense")), "cls/predictions/transform/LayerNorm")
    mlm = h @ t["bert/embeddings/word_embeddings"].T + t["cls/predictions/output_bias"]  # tied embeddings
    nsp = pooled @ t["cls/seq_relationship/output_weights"].T + t["cls/seq_relationship/output_bias"]
    return mlm.float(), nsp.float()


INPUTS = dict(
    input_ids=torch.tensor([[2, 5, 7, 9, 10, 5, 11, 3], [2, 6, 8, 12, 13, 3, 0, 0]]),
    token_type_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0]]),
    attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]),
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = convert_tf_checkpoint(BERT, FIXTURE / "bert_config.json", tmp_path_factory.mktemp("tf") / "hf")
    mlm, nsp = reference_forward(read_tf_checkpoint(BERT), INPUTS["input_ids"], INPUTS["token_type_ids"],
                                 INPUTS["attention_mask"])
    return out, mlm, nsp


def test_bertkit_outputs_equal_the_raw_forward(converted):
    from bertkit import BertForPreTraining

    out, mlm, nsp = converted
    model = BertForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        outputs = model(**INPUTS)
    torch.testing.assert_close(outputs.prediction_logits, mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs.seq_relationship_logits, nsp, rtol=1e-5, atol=1e-5)


def test_transformers_outputs_equal_the_raw_forward(converted):
    transformers = pytest.importorskip("transformers")
    out, mlm, nsp = converted
    model = transformers.BertForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        outputs = model(**INPUTS)
    torch.testing.assert_close(outputs.prediction_logits, mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs.seq_relationship_logits, nsp, rtol=1e-5, atol=1e-5)

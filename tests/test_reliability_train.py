"""Issue #18 points 1, 8, 11 and 16 for `bertkit finetune` / `pretrain`: a run folder is never silently
replaced, every argument is checked before any work, stdout carries only the JSON summary."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

import bertkit
from bertkit.encoder import bundled_model_dir
from bertkit.train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = bertkit.Tokenizer.from_pretrained()
    torch.manual_seed(0)
    bertkit.BertForMaskedLM(bertkit.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(bundled_model_dir() / name, folder)
    return folder


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    # Columns named as a user's export names them: --text-column/--label-column pick them.
    rows = list(csv.DictReader(open(ROOT / "examples" / "sentiment_eval.csv", encoding="utf-8")))[:16]
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        writer.writerows([r["text"], r["label"]] for r in rows)
    return path


def _finetune(tiny, data, out, *extra):
    return train_main(["finetune", "--task", "classify", "--model", str(tiny), "--train", str(data), "--eval", str(data),
                       "--text-column", "review", "--label-column", "sentiment", "--out", str(out), "--max-steps", "2",
                       "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--threads", "1", *extra])


def test_an_existing_run_is_refused_then_overwritten(tiny, renamed, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "config.json").write_text('{"the": "0.906 model"}')
    (out / "metrics.jsonl").write_text('{"type": "eval", "step": 900}\n')
    assert _finetune(tiny, renamed, out) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run (metrics.jsonl, best)" in err and "--resume" in err and "--overwrite" in err
    assert (out / "best" / "config.json").read_text() == '{"the": "0.906 model"}'  # untouched
    assert _finetune(tiny, renamed, out, "--overwrite") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is exactly one JSON object: `| jq` works
    assert summary["global_step"] == 2 and summary["saved"] == {"out": str(out), "final": str(out / "final"),
                                                                 "best": str(out / "best")}
    assert f"model saved to {out / 'final'}" in captured.err
    assert '"step": 900' not in (out / "metrics.jsonl").read_text()  # the old run's log is gone, not appended to
    assert json.loads((out / "best" / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


def test_pretrain_arguments_are_checked_before_any_work(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one sentence.\nanother one.\n\nnew document.\n")
    common = ["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "out")]
    assert train_main([*common, "--preset", "bert-tiny", "--config", "hidden_sise=3"]) == 2
    assert "BertConfig has no field 'hidden_sise'; did you mean hidden_size" in capsys.readouterr().err
    assert train_main([*common, "--preset", "bert-tinny"]) == 2
    assert "--preset 'bert-tinny' is not a preset; did you mean bert-tiny" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing tokenized, no folder left behind


def test_warnings_come_from_rank_0_only(monkeypatch):
    # Issue #18 point 13: under torchrun "newly initialised: classifier.*" was printed once per process.
    import argparse
    import logging

    from bertkit.train.cli import _hparams, add_finetune_arguments

    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    args = parser.parse_args(["--task", "classify", "--train", "t.csv", "--out", "o"])
    logger = logging.getLogger("bertkit")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    monkeypatch.setenv("RANK", "0")
    _hparams(args)
    assert logging.getLogger("bertkit.pretrained").isEnabledFor(logging.WARNING)
    monkeypatch.setenv("RANK", "1")
    _hparams(args)
    assert not logging.getLogger("bertkit.pretrained").isEnabledFor(logging.WARNING)


def test_config_typo_in_python_names_the_key_and_the_nearest_fields():
    # The dataclass __init__ alone would say only "unexpected keyword argument 'hidden_sise'".
    from bertkit import BertConfig

    with pytest.raises(TypeError, match=r"BertConfig has no field 'hidden_sise'; did you mean hidden_size"):
        BertConfig(hidden_sise=3)
    assert BertConfig(hidden_size=12, num_attention_heads=3).hidden_size == 12  # valid keys still work

"""Fine-tuning the bundled all-MiniLM-L6-v2 on the sentiment data learns (a shortened benchmark run).

The full run (all 400 training sentences, 3 epochs; docs/benchmarks.md) reaches ~95% on the 160
evaluation sentences; this one trains on 128 sentences for one epoch and asserts well above chance.
"""

import csv
import json
from pathlib import Path

import torch

import bertkit
from bertkit.train import finetune

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _subset(source: Path, target: Path, n: int) -> Path:
    rows = list(csv.DictReader(open(source, encoding="utf-8")))[:n]
    with open(target, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return target


def test_bundled_model_learns_sentiment(tmp_path):
    train = _subset(EXAMPLES / "sentiment_train.csv", tmp_path / "train.csv", 128)
    evaluation = _subset(EXAMPLES / "sentiment_eval.csv", tmp_path / "eval.csv", 80)
    labels = [r["label"] for r in csv.DictReader(open(evaluation, encoding="utf-8"))]
    assert 0.4 < labels.count("positive") / len(labels) < 0.6  # so chance is about 0.5
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two contending threads on a busy 2-core machine
    try:
        summary = finetune("classify", train, evaluation, out=tmp_path / "run", epochs=1, batch_size=8, lr=2e-4,
                           progress=False)
    finally:
        torch.set_num_threads(before)
    assert summary["eval"]["accuracy"] >= 0.75, summary
    # The kept model predicts with its label names, from bertkit and from its config.json.
    model = bertkit.BertForSequenceClassification.from_pretrained(tmp_path / "run" / "best")
    tok = bertkit.Tokenizer.from_pretrained(tmp_path / "run" / "best")
    with torch.no_grad():
        logits = model(**tok(["I loved this hotel, the staff were wonderful.", "A dreadful phone, avoid it."])).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ["positive", "negative"]
    assert json.loads((tmp_path / "run" / "best" / "eval_metrics.json").read_text())["accuracy"] >= 0.75

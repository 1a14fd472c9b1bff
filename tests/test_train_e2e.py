"""Training end to end on a tiny random model: every task, pre-training, resume after kills, torchrun.

Runs that are compared step by step use one intra-op thread everywhere (in this process and in the
subprocesses), so that "the same trajectory" can be checked exactly rather than up to reduction order.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bertkit
from bertkit.encoder import bundled_model_dir
from bertkit.train import finetune, pretrain
from bertkit.train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "train_data"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128)


def _tiny_model(folder: Path, **overrides) -> Path:
    tok = bertkit.Tokenizer.from_pretrained()
    torch.manual_seed(0)
    bertkit.BertForMaskedLM(bertkit.BertConfig(vocab_size=len(tok), **TINY, **overrides)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(bundled_model_dir() / name, folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_no_dropout(tmp_path_factory):
    # Dropout masks depend on how examples are spread over processes, so the multi-process check uses none.
    return _tiny_model(tmp_path_factory.mktemp("tiny0"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def sentiment_small(tmp_path_factory):
    rows = list(csv.DictReader(open(ROOT / "examples" / "sentiment_eval.csv", encoding="utf-8")))[:32]
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    # Also much faster: on a busy 2-core machine, two OpenMP threads spend their time waiting for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out, "train")}


def _subprocess(args: list[str], crash: str | None = None, nproc: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BERTKIT_TRAIN_CRASH", None)
    if crash:
        env["BERTKIT_TRAIN_CRASH"] = crash
    launcher = [sys.executable, "-m", "bertkit.train"]
    if nproc:  # --standalone: a local rendezvous on a free port
        launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
                    "-m", "bertkit.train"]
    # A session of its own, so a timeout can end torchrun's workers too, not only the launcher.
    proc = subprocess.Popen(launcher + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(args[:3])} timed out:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# ------------------------------------------------------------------------------ every task
TASKS = {
    "classify": (None, {"accuracy", "macro_f1"}),
    "ner": (DATA / "tiny_ner.conll", {"precision", "recall", "f1", "f1_PER"}),
    "qa": (DATA / "tiny_squad_v2.json", {"exact_match", "f1", "HasAns_f1", "NoAns_f1"}),
    "multiple-choice": (DATA / "tiny_mc.jsonl", {"accuracy"}),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_task_end_to_end(task, tiny, sentiment_small, tmp_path):
    import transformers

    data, keys = TASKS[task]
    data = data or sentiment_small
    out = tmp_path / "run"
    summary = finetune(task, data, data, out=out, model=tiny, epochs=3, batch_size=4, max_length=64, lr=2e-3,
                       log_every=1, progress=False, task_options={"doc_stride": 16} if task == "qa" else None)
    evals = _records(out, "eval")
    assert len(evals) == 3 and keys <= set(evals[-1]) and summary["best"]["value"] == max(
        e[summary["best"]["metric"]] for e in evals)
    assert all(0 < loss < 20 for loss in _losses(out).values())
    for folder in (out / "best", out / "final"):
        config = json.loads((folder / "config.json").read_text())
        model = getattr(bertkit, config["architectures"][0]).from_pretrained(folder)
        reference = getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
        batch = bertkit.Tokenizer.from_pretrained(folder)(["a short text", "and a somewhat longer one"])
        if task == "multiple-choice":
            batch = {k: v.unsqueeze(0) for k, v in batch.items()}
        with torch.no_grad():
            torch.testing.assert_close(model(**batch)[0], reference(**batch)[0], rtol=1e-5, atol=1e-5)
    labels = {"classify": {"0": "negative", "1": "positive"}, "ner": None}.get(task)
    if labels:
        assert config["id2label"] == labels
    if task == "ner":
        assert sorted(config["id2label"].values()) == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]


def test_multilabel_and_regression(tiny, tmp_path):
    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in [
        ("cheap and fast", ["price", "speed"]), ("slow", ["speed"]), ("too expensive", ["price"]), ("ok", [])] * 3))
    finetune("classify", multi, multi, out=tmp_path / "m", model=tiny, epochs=1, batch_size=4, progress=False)
    config = json.loads((tmp_path / "m" / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and config["id2label"] == {"0": "price", "1": "speed"}
    assert {"micro_f1", "macro_f1", "subset_accuracy"} <= set(_records(tmp_path / "m", "eval")[-1])
    scores = tmp_path / "scores.csv"
    scores.write_text("text,label\n" + "".join(f"text number {i},{i / 10}\n" for i in range(12)))
    finetune("classify", scores, scores, out=tmp_path / "r", model=tiny, epochs=1, batch_size=4, progress=False)
    config = json.loads((tmp_path / "r" / "final" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    assert {"mse", "pearson"} <= set(_records(tmp_path / "r", "eval")[-1])


def test_gradient_checkpointing_gives_the_same_losses(tiny, sentiment_small, tmp_path):
    common = dict(model=tiny, epochs=1, max_steps=4, batch_size=8, lr=1e-3, log_every=1, progress=False)
    finetune("classify", sentiment_small, out=tmp_path / "plain", **common)
    finetune("classify", sentiment_small, out=tmp_path / "ckpt", gradient_checkpointing=True, **common)
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ckpt")


def test_cli_errors_name_the_input_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhi,positive\n")
    code = train_main(["finetune", "--task", "classify", "--train", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "bad.csv:2: missing column(s) ['text']" in capsys.readouterr().err


# ------------------------------------------------------------------------------ resume
RESUME_ARGS = ["--task", "classify", "--epochs", "1", "--max-steps", "8", "--batch-size", "8", "--max-length", "32",
               "--lr", "1e-3", "--log-every", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted(tiny, sentiment_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(["finetune", *RESUME_ARGS, "--model", str(tiny), "--train", str(sentiment_small),
                           "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return _losses(out)


def test_resume_after_kill_continues_the_same_trajectory(uninterrupted, tiny, sentiment_small, tmp_path):
    args = [*RESUME_ARGS, "--model", str(tiny), "--train", str(sentiment_small), "--out", str(tmp_path),
            "--save-every", "4"]
    killed = _subprocess(["finetune", *args], crash="after-step:4")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]
    assert train_main(["finetune", *args, "--resume"]) == 0
    resumed = _losses(tmp_path)
    assert resumed == uninterrupted  # steps 1-4 from the killed run, 5-8 after the resume: exactly equal
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_kill_during_checkpoint_write_resumes_from_previous(uninterrupted, tiny, sentiment_small, tmp_path):
    args = [*RESUME_ARGS, "--model", str(tiny), "--train", str(sentiment_small), "--out", str(tmp_path),
            "--save-every", "2"]
    killed = _subprocess(["finetune", *args], crash="during-save:4")
    assert killed.returncode == -9, killed.stderr[-2000:]
    root = tmp_path / "checkpoints"
    partial = list(root.glob(".tmp-step-00000004-*"))
    assert len(partial) == 1 and (partial[0] / "optimizer.pt").is_file()  # died mid-write
    assert (root / "latest").read_text() == "step-00000002" and not (root / "step-00000004").exists()
    assert train_main(["finetune", *args, "--resume"]) == 0
    assert _losses(tmp_path) == uninterrupted
    # Steps 3 and 4 were logged before the kill; the resumed run replaced them rather than repeating them.
    assert [r["step"] for r in _records(tmp_path, "train")] == list(range(1, 9))
    assert not list(root.glob(".tmp-*")) and (root / "latest").read_text() == "step-00000008"


# ------------------------------------------------------------------------------ distributed
@pytest.mark.parametrize("split", [["--batch-size", "4"], ["--batch-size", "2", "--grad-accum", "2", "--fsdp"]],
                         ids=["ddp", "fsdp-grad-accum"])
def test_torchrun_two_processes_match_one(split, tiny_no_dropout, sentiment_small, tmp_path):
    common = ["--task", "classify", "--model", str(tiny_no_dropout), "--train", str(sentiment_small), "--epochs", "1",
              "--max-steps", "5", "--max-length", "32", "--lr", "1e-3", "--log-every", "1", "--no-progress",
              "--device", "cpu"]
    assert train_main(["finetune", *common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    # 2 ranks x 4 examples (DDP), or 2 ranks x 2 micro-batches x 2 examples (FSDP2): the same global batch of 8.
    two = _subprocess(["finetune", *common, *split, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one, other = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(other) == [1, 2, 3, 4, 5]
    # Same examples per step, same normalisation; only the summation order differs.
    torch.testing.assert_close(torch.tensor([other[s] for s in one]), torch.tensor(list(one.values())),
                               rtol=1e-5, atol=0)
    first = bertkit.BertForSequenceClassification.from_pretrained(tmp_path / "one" / "final").state_dict()
    second = bertkit.BertForSequenceClassification.from_pretrained(tmp_path / "two" / "final").state_dict()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ pre-training
def _corpus(path: Path) -> Path:
    texts = [r["text"] for name in ("train", "eval")
             for r in csv.DictReader(open(ROOT / "examples" / f"sentiment_{name}.csv", encoding="utf-8"))]
    path.write_text("".join("\n".join(texts[i:i + 5]) + "\n\n" for i in range(0, len(texts), 5)))
    return path


def test_pretraining_lowers_mlm_loss(tmp_path):
    config = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    pretrain(_corpus(tmp_path / "corpus.txt"), tmp_path / "mlm", preset="bert-tiny", steps=60, max_length=32,
             batch_size=16, lr=5e-3, log_every=5, progress=False, config_overrides=config)
    losses = [r["loss"] for r in _records(tmp_path / "mlm", "train")]
    assert losses[-1] < 0.7 * losses[0], losses  # >= 30% lower
    model = bertkit.BertForMaskedLM.from_pretrained(tmp_path / "mlm" / "final")
    assert model.config.hidden_size == 32


def test_pretraining_nsp_whole_words_via_cli(tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    args = ["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "nsp"), "--preset", "bert-tiny", "--nsp",
            "--whole-word-masking", "--max-length", "32", "--steps", "3", "--batch-size", "4", "--log-every", "1",
            "--no-progress", "--config", "hidden_size=32", "--config", "intermediate_size=64",
            "--config", "num_hidden_layers=1"]
    assert train_main(args) == 0
    assert len(_losses(tmp_path / "nsp")) == 3
    model = bertkit.BertForPreTraining.from_pretrained(tmp_path / "nsp" / "final")
    assert model.config.num_hidden_layers == 1
    assert train_main(["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "x"), "--preset", "nope"]) == 2

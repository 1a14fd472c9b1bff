"""Training data: readers and their errors, feature building, masking, shards, sharding, checkpoint writes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import bertkit
from bertkit.train import checkpoint as ckpt
from bertkit.train.data import DataError, read_classification, read_conll, read_multiple_choice, read_squad
from bertkit.train.distributed import DistInfo, step_micro_batches
from bertkit.train.pretrain_data import PretrainDataset, build_shards
from bertkit.train.tasks import make_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tok():
    return bertkit.Tokenizer.from_pretrained()


# ------------------------------------------------------------------------------ readers
def test_classification_reader_errors(tmp_path, tok):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,positive\n")
    with pytest.raises(DataError, match=r"bad.csv:2: missing column\(s\) \['text'\].*Rename your columns"):
        read_classification(bad)
    train, evaluation = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text("text,label\ngood,positive\nbad,negative\n")
    evaluation.write_text("text,label\nfine,positive\nmeh,neutral\n")
    task = make_task("classify", tok)
    with pytest.raises(DataError, match=r"eval.csv:3: label 'neutral' does not occur in the training data, whose "
                                        r"labels are \['negative', 'positive'\]"):
        task.load(train, evaluation)
    (tmp_path / "x.txt").write_text("text,label\n")
    with pytest.raises(DataError, match="unknown extension '.txt'; use .csv, .tsv or .jsonl"):
        read_classification(tmp_path / "x.txt")


def test_classification_label_kinds(tmp_path, tok):
    path = tmp_path / "multi.jsonl"
    path.write_text('{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": ["y"]}\n')
    task = make_task("classify", tok)
    features, _ = task.load(path, None)
    assert task.kind == "multi" and task.labels == ["x", "y"] and features[1]["label"] == [0.0, 1.0]
    path = tmp_path / "reg.csv"
    path.write_text("text,text_pair,label\na,b,0.5\nc,,2\n")
    task = make_task("classify", tok)
    features, _ = task.load(path, None)
    assert task.kind == "regression" and [f["label"] for f in features] == [0.5, 2.0]
    assert 1 in features[0]["token_type_ids"] and 1 not in features[1]["token_type_ids"]  # pair vs single


def test_conll_reader(tmp_path):
    sentences = read_conll(EXAMPLES / "train_data" / "tiny_ner.conll")
    assert sentences[0]["words"] == ["John", "Smith", "lives", "in", "Paris", "."]
    assert sentences[0]["tags"][:2] == ["B-PER", "I-PER"] and len(sentences) == 6
    bad = tmp_path / "bad.conll"
    bad.write_text("John B-PER\nSmith\n")
    with pytest.raises(DataError, match=r"bad.conll:2: 'Smith' has one column"):
        read_conll(bad)


def test_squad_and_mc_reader_errors(tmp_path):
    bad = tmp_path / "squad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "Paris is nice.", "qas": [
        {"id": "1", "question": "q?", "answers": [{"text": "nice", "answer_start": 0}]}]}]}]}))
    with pytest.raises(DataError, match="answer 'nice' is not at answer_start=0.*fix answer_start"):
        read_squad(bad)
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"context": "c", "endings": ["a", "b"], "label": 0}\n{"context": "c", "endings": ["a"], "label": 5}\n')
    with pytest.raises(DataError, match=r"mc.jsonl:2: 'endings' must be a list of at least 2"):
        read_multiple_choice(mc)


# ------------------------------------------------------------------------------ features
def test_ner_labels_on_first_subtoken_only(tmp_path, tok):
    path = tmp_path / "a.conll"
    path.write_text("Neuchatel B-LOC\nis O\nlovely O\n")
    task = make_task("ner", tok)
    (feature,), _ = task.load(path, None)
    pieces = tok.backend_tokenizer.encode(["Neuchatel", "is", "lovely"], is_pretokenized=True).tokens
    assert len(pieces) > 5  # [CLS] ne ##uch ##ate ##l is lovely [SEP]: several pieces for one word
    index = {t: i for i, t in enumerate(task.labels)}
    expected = [-100, index["B-LOC"]] + [-100] * (len(pieces) - 5) + [index["O"], index["O"], -100]
    assert feature["labels"] == expected


def test_qa_windows_find_the_answer(tok):
    task = make_task("qa", tok, max_length=48, doc_stride=16)
    train, _ = task.load(EXAMPLES / "train_data" / "tiny_squad_v2.json", None)
    examples = read_squad(EXAMPLES / "train_data" / "tiny_squad_v2.json")
    assert task.version_2 and len(train) > len(examples)  # long contexts give several windows
    found = set()
    for f in train:
        example = examples[f["example"]]
        if f["start"]:
            text = example["context"][f["offsets"][f["start"]][0]:f["offsets"][f["end"]][1]]
            assert text == example["answers"][0][0]
            found.add(example["id"])
        elif example["answers"]:
            assert f["end"] == 0
    assert found == {e["id"] for e in examples if e["answers"]}


def test_qa_postprocess_picks_best_span_and_null(tok):
    task = make_task("qa", tok, max_length=64, doc_stride=16, version_2=True)
    _, features = task.load(EXAMPLES / "train_data" / "tiny_squad_v2.json",
                            EXAMPLES / "train_data" / "tiny_squad_v2.json")
    outputs = []
    for f in features:
        start, end = np.full(len(f["offsets"]), -5.0), np.full(len(f["offsets"]), -5.0)
        example = task.eval_examples[f["example"]]
        if example["id"] == "q1" and f["start"]:  # make this window point at the gold span
            start[f["start"]], end[f["end"]] = 10.0, 10.0
        else:  # everything else prefers "no answer"
            start[0] = end[0] = 0.0
        outputs.append((start, end))
    answers = task.best_answers(features, outputs)
    assert answers["q1"] == "Herman Melville"
    assert answers["q4"] == "" and answers["q2"] == ""


# ------------------------------------------------------------------------------ pre-training data
def _corpus(path: Path, docs: int = 40) -> Path:
    words = "the cat sat on a mat while unbelievably enthusiastic researchers tokenized everything".split()
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(docs):
            for _ in range(4):
                f.write(" ".join(rng.choice(words, 9)) + ".\n")
            f.write("\n")
    return path


def test_shards_are_resumable(tmp_path, tok):
    corpus = _corpus(tmp_path / "corpus.txt")
    whole = build_shards(corpus, tok, tmp_path / "a", shard_tokens=200, read_lines=16)
    assert whole["complete"] and len(whole["shards"]) > 3 and whole["dtype"] == "uint16"
    # Simulate a crash after two shards: the manifest names two, the build continues from there.
    partial = dict(whole, complete=False, shards=whole["shards"][:2])
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(partial))
    (tmp_path / "a" / f"{whole['shards'][2]['name']}.tokens.npy").unlink()
    again = build_shards(corpus, tok, tmp_path / "a", shard_tokens=200, read_lines=16)
    assert again == whole
    tokens = np.concatenate([np.load(tmp_path / "a" / f"{s['name']}.tokens.npy") for s in again["shards"]])
    expected = tok(corpus.read_text().split("\n"), padding=False, add_special_tokens=False, return_tensors=None)
    assert tokens.tolist() == [i for ids in expected["input_ids"] for i in ids]


def test_masking_statistics_and_whole_words(tmp_path, tok):
    corpus = _corpus(tmp_path / "corpus.txt", docs=200)
    build_shards(corpus, tok, tmp_path / "d")
    data = PretrainDataset(tmp_path / "d", tok, max_length=64, seed=1)
    masked = kept = randomized = total = 0
    for i in range(len(data)):
        ex = data.example(i, epoch=0)
        original = np.where(ex["labels"] != -100, ex["labels"], ex["input_ids"])
        chosen = ex["labels"] != -100
        assert not chosen[0] and not chosen[-1]  # never [CLS]/[SEP]
        assert chosen.sum() == max(1, round(len(ex["input_ids"]) * 0.15))
        total += chosen.sum()
        masked += (ex["input_ids"][chosen] == tok.mask_token_id).sum()
        kept += (ex["input_ids"][chosen] == original[chosen]).sum()
        randomized += ((ex["input_ids"][chosen] != original[chosen]) & (ex["input_ids"][chosen] != tok.mask_token_id)).sum()
    assert abs(masked / total - 0.8) < 0.03 and abs(kept / total - 0.1) < 0.03 and abs(randomized / total - 0.1) < 0.03
    assert not np.array_equal(data.example(0, 0)["labels"], data.example(0, 1)["labels"])  # dynamic masking
    assert np.array_equal(data.example(3, 2)["input_ids"], data.example(3, 2)["input_ids"])  # deterministic
    wwm = PretrainDataset(tmp_path / "d", tok, max_length=64, seed=1, whole_word_masking=True)
    for i in range(30):
        ex = wwm.example(i, 0)
        chosen = ex["labels"] != -100
        original = np.where(chosen, ex["labels"], ex["input_ids"])
        for pos in np.flatnonzero(wwm.continuation[original]):  # a piece is chosen iff its word start is
            assert chosen[pos] == chosen[pos - 1]


def test_nsp_pairs(tmp_path, tok):
    build_shards(_corpus(tmp_path / "corpus.txt"), tok, tmp_path / "d")
    data = PretrainDataset(tmp_path / "d", tok, max_length=48, nsp=True)
    labels = [data.example(i, 0)["next_sentence_label"] for i in range(len(data))]
    assert 0.25 < np.mean(labels) < 0.75
    ex = data.example(0, 0)
    assert (ex["input_ids"] == tok.sep_token_id).sum() == 2 and len(ex["input_ids"]) <= 48
    batch = data.batch([0, 1, 2], epoch=0)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"}


# ------------------------------------------------------------------------------ sharding and checkpoints
@pytest.mark.parametrize("n, batch, accum", [(37, 4, 1), (37, 2, 3), (8, 4, 1)])
def test_step_partition_is_independent_of_world_size(n, batch, accum):
    one = DistInfo(0, 1)
    steps = -(-n // (batch * accum * 2))
    seen = []
    for step in range(steps):
        two = [sorted(i for r in range(2) for m in step_micro_batches(n, 7, 3, step, batch, accum, DistInfo(r, 2))
                      for i in m)]
        single = sorted(i for m in step_micro_batches(n, 7, 3, step, batch * 2, accum, one) for i in m)
        assert two[0] == single
        seen += single
    assert sorted(seen) == list(range(n))  # every example once per epoch, nothing padded or dropped


def test_checkpoint_write_is_atomic(tmp_path):
    root = tmp_path / "checkpoints"

    def write(folder):
        ckpt.write_state(folder, 1, {"global_step": 1, "rng": [ckpt.rng_state()]}, {"state": {}, "param_groups": []})

    ckpt.save_checkpoint(root, 1, write)

    def broken(folder):
        (folder / "trainer_state.pt").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(root, 2, broken)
    assert ckpt.find_latest(root).name == "step-00000001"
    state, _ = ckpt.load_state(ckpt.find_latest(root))
    ckpt.set_rng_state(state["rng"][0])  # loads with weights_only=True and restores
    first = torch.rand(3)
    ckpt.set_rng_state(state["rng"][0])
    assert torch.equal(first, torch.rand(3))
    for step in (2, 3, 4):
        ckpt.save_checkpoint(root, step, write, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    (root / "latest").write_text("step-00000099")  # a pointer to nothing falls back to the newest
    assert ckpt.find_latest(root).name == "step-00000004"

"""Question answering gives transformers==4.46.3's answers (transformers 5 removed the pipeline).

tests/golden/qa446/ holds a tiny random BertForQuestionAnswering as 4.46.3 saved it and the pipeline's outputs
(made by tests/golden/make_golden_qa_446.py): windows with doc_stride, top_k, impossible answers,
max_answer_len, several questions. Same answers and character offsets, scores within 1e-5.
"""

import json
import math
from pathlib import Path

import pytest

import bertkit

GOLDEN = Path(__file__).parent / "golden" / "qa446"
CASES = json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def qa():
    return bertkit.pipeline(model=GOLDEN)  # task from config.json: question-answering


def _same(ours, theirs, name):
    assert type(ours) is type(theirs), f"{name}: {ours} != {theirs}"
    if isinstance(theirs, dict):
        ours, theirs = [ours], [theirs]
    assert len(ours) == len(theirs), f"{name}: {len(ours)} answers, 4.46.3 gave {len(theirs)}"
    # Spans scored exactly 0 (outside max_answer_len, end before start) tie; their order is numpy's sort order,
    # so compare them as a set and everything above in order.
    ranked = [(a["answer"], a["start"], a["end"]) for a in theirs if a["score"] > 1e-6]
    assert [(a["answer"], a["start"], a["end"]) for a in ours[:len(ranked)]] == ranked, name
    assert sorted((a["answer"], a["start"], a["end"]) for a in ours[len(ranked):]) == \
        sorted((a["answer"], a["start"], a["end"]) for a in theirs[len(ranked):]), name
    for a, b in zip(ours, theirs):
        assert math.isclose(a["score"], b["score"], abs_tol=1e-5), (name, a, b)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_question_answering_matches_transformers_446(qa, case):
    out = qa(**case["inputs"], **case["kwargs"])
    expected = case["output"]
    if isinstance(case["inputs"]["question"], list):
        assert len(out) == len(expected)
        for i, (a, b) in enumerate(zip(out, expected)):
            _same(a, b, f"{case['name']}[{i}]")
    else:
        _same(out, expected, case["name"])


def test_records_and_windows_in_one_batch(qa):
    """Records (the CLI's JSONL shape) give the same answers as keyword calls, all windows batched together."""
    cases = [c for c in CASES if isinstance(c["inputs"]["question"], str) and not c["kwargs"]]
    records = [c["inputs"] for c in cases] + [CASES[2]["inputs"]]
    out = qa(records, max_seq_len=48, doc_stride=16)
    _same(out[-1], qa(**CASES[2]["inputs"], max_seq_len=48, doc_stride=16), "long context")
    _same(out[0], qa(**cases[0]["inputs"], max_seq_len=48, doc_stride=16), "short context")


@pytest.mark.parametrize("call, message", [
    (lambda qa: qa({"question": "Who?"}), "input 0 is \\['question'\\]; each needs 'question' and 'context'"),
    (lambda qa: qa(question="Who?"), "needs both question= and context="),
    (lambda qa: qa(question="Who?", context="  "), "input 0: context is empty"),
    (lambda qa: qa(question=["a", "b"], context=["c"]), "got 2 questions and 1 contexts"),
    (lambda qa: qa(question="a", context="b c", top_k=0), "top_k must be a positive integer, got 0"),
    (lambda qa: qa(question="a", context="b c", max_answer_len=0), "max_answer_len must be a positive integer"),
    (lambda qa: qa(question="a", context="b c", max_seq_len=32, doc_stride=40), "doc_stride \\(40\\) is larger"),
    (lambda qa: qa(question="a " * 40, context="b c", max_seq_len=32), "tokenization failed"),
])
def test_bad_question_answering_input(qa, call, message):
    with pytest.raises(ValueError, match=message):
        call(qa)

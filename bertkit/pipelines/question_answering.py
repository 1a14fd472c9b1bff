"""``pipeline("question-answering")``: extractive answers as character spans of the context.

transformers 5 removed this pipeline; this one gives what ``transformers==4.46.3`` gave with a fast tokenizer
(tests/golden/make_golden_qa_446.py checks it): the question and context are tokenized as a pair, a context
longer than ``max_seq_len`` is split into windows that overlap by ``doc_stride`` tokens, start/end scores are
softmaxed per window over the context tokens (and ``[CLS]``), and spans of at most ``max_answer_len``
tokens are ranked by ``p(start) * p(end)``. ``handle_impossible_answer`` adds the empty answer with the
lowest ``[CLS]`` score over the windows. Answers are widened to whole words (``start``/``end`` are character
offsets into the context, ``answer`` is ``context[start:end]``).

All windows of all examples run together in length-sorted, padding-free batches.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import PipelineError, Row, check_batch_size, check_top_k, encode, run_sorted


def decode_spans(start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int, allowed: np.ndarray):
    """Best ``top_k`` spans (start <= end < start + max_answer_len) by ``p(start) * p(end)``, as 4.46.3."""
    outer = np.matmul(start[None, :, None], end[None, None, :])
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        order = [np.argmax(flat)]
    elif len(flat) < top_k:
        order = np.argsort(-flat)
    else:
        idx = np.argpartition(-flat, top_k)[0:top_k]
        order = idx[np.argsort(-flat[idx])]
    starts, ends = np.unravel_index(order, candidates.shape)[1:]
    keep = np.isin(starts, allowed.nonzero()) & np.isin(ends, allowed.nonzero())
    starts, ends = starts[keep], ends[keep]
    return starts, ends, candidates[0, starts, ends]


class QuestionAnsweringPipeline:
    """Answers questions from a context with a question-answering model; see :func:`bertkit.pipeline`."""

    task = "question-answering"

    def __init__(self, model, tokenizer, batch_size: int = 32, top_k: int = 1, doc_stride: int | None = None,
                 max_answer_len: int = 15, max_seq_len: int | None = None, max_question_len: int = 64,
                 handle_impossible_answer: bool = False):
        self.model, self.tokenizer = model, tokenizer
        check_batch_size(batch_size)
        self.batch_size = batch_size
        self.defaults = dict(top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len,
                             max_seq_len=max_seq_len, handle_impossible_answer=handle_impossible_answer)
        self._settings(**self.defaults)
        self.max_question_len = max_question_len  # accepted for transformers' signature; fast tokenizers ignore it

    def _settings(self, top_k, doc_stride, max_answer_len, max_seq_len, handle_impossible_answer):
        check_top_k(top_k, allow_none=False)
        check_top_k(max_answer_len, "max_answer_len", allow_none=False)
        limit = self.model.config.max_position_embeddings
        max_seq_len = min(self.tokenizer.model_max_length, 384, limit) if max_seq_len is None else max_seq_len
        check_top_k(max_seq_len, "max_seq_len", allow_none=False)
        if max_seq_len > limit:
            raise PipelineError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={limit}")
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
        if isinstance(doc_stride, bool) or not isinstance(doc_stride, int) or doc_stride < 0:
            raise PipelineError(f"doc_stride must be a non-negative integer, got {doc_stride!r}")
        if doc_stride > max_seq_len:
            raise PipelineError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")
        return top_k, doc_stride, max_answer_len, max_seq_len, bool(handle_impossible_answer)

    @staticmethod
    def _examples(question, context, inputs) -> list[tuple[str, str]]:
        if inputs is not None:
            records = [inputs] if isinstance(inputs, dict) else list(inputs)
            examples = []
            for i, r in enumerate(records):
                if not isinstance(r, dict) or "question" not in r or "context" not in r:
                    what = sorted(r) if isinstance(r, dict) else type(r).__name__
                    raise PipelineError(f"question-answering input {i} is {what}; each needs 'question' and "
                                        "'context'")
                examples.append((r["question"], r["context"]))
        else:
            if question is None or context is None:
                raise PipelineError("question-answering needs both question= and context= (or "
                                    "{'question': ..., 'context': ...} records)")
            questions = [question] if isinstance(question, str) else list(question)
            contexts = [context] * len(questions) if isinstance(context, str) else list(context)
            if isinstance(question, str) and not isinstance(context, str):
                questions = questions * len(contexts)
            if len(questions) != len(contexts):
                raise PipelineError(f"got {len(questions)} questions and {len(contexts)} contexts; pass as many of "
                                    "each, or one context for all questions")
            examples = list(zip(questions, contexts))
        for i, (q, c) in enumerate(examples):
            for name, value in (("question", q), ("context", c)):
                if not isinstance(value, str):
                    raise PipelineError(f"question-answering input {i}: {name} is {type(value).__name__}, "
                                        "expected a string")
                if not value.strip():
                    raise PipelineError(f"question-answering input {i}: {name} is empty")
        return examples

    def __call__(self, question: str | Sequence[str] | None = None, context: str | Sequence[str] | None = None,
                 inputs: dict | Sequence[dict] | None = None, batch_size: int | None = None, **options):
        """Answers questions.

        Args:
            question: A question or a list (with one context for all, or one context each).
            context: The text to take the answer from, or a list.
            inputs: Instead of question/context: ``{"question": ..., "context": ...}`` or a list of them.
            batch_size: Windows per forward pass.
            **options: ``top_k`` (1), ``doc_stride`` (``min(max_seq_len // 2, 128)``), ``max_answer_len``
                (15 tokens), ``max_seq_len`` (``min(384, model_max_length)``), ``handle_impossible_answer``.

        Returns:
            Per example ``{"score", "start", "end", "answer"}``, or a list of them when ``top_k`` > 1 finds
            several; a list of those for several examples.
        """
        if isinstance(question, dict) or (isinstance(question, list) and question and isinstance(question[0], dict)):
            question, inputs = None, question
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise TypeError(f"unknown question-answering option(s) {sorted(unknown)}; use {sorted(self.defaults)}")
        top_k, stride, max_answer_len, max_seq_len, impossible = self._settings(**{**self.defaults, **options})
        examples = self._examples(question, context, inputs)
        batch_size = batch_size or self.batch_size
        check_batch_size(batch_size)
        windows, owner = [], []
        firsts = encode(self.tokenizer, [q for q, _ in examples], [c for _, c in examples], max_length=max_seq_len,
                        truncation="only_second", stride=stride, offsets=True)
        for i, first in enumerate(firsts):
            for enc in [first, *first.overflowing]:
                windows.append(enc)
                owner.append(i)
        logits = run_sorted(self.model, [Row(e.ids, e.type_ids) for e in windows], self.tokenizer.pad_token_id,
                            batch_size, head=lambda out: torch.stack([out.start_logits, out.end_logits], -1),
                            per_token=True)
        per_example: list[list] = [[] for _ in examples]
        for enc, i, row in zip(windows, owner, logits):
            per_example[i].append((enc, row.numpy()))
        results = [self._answers(examples[i][1], per_example[i], top_k, max_answer_len, impossible)
                   for i in range(len(examples))]
        return results[0] if len(results) == 1 else results

    def _answers(self, context: str, windows, top_k, max_answer_len, impossible):
        min_null = 1000000.0
        answers = []
        cls_id = self.tokenizer.cls_token_id
        for enc, logits in windows:
            # Allowed positions: the context tokens and [CLS] (the "no answer" position).
            allowed = np.array([1 if s == 1 or t == cls_id else 0 for s, t in zip(enc.sequence_ids, enc.ids)])
            start = np.where(allowed == 0, -10000.0, logits[:, 0])
            end = np.where(allowed == 0, -10000.0, logits[:, 1])
            start = np.exp(start - start.max())
            start = start / start.sum()
            end = np.exp(end - end.max())
            end = end / end.sum()
            if impossible:
                min_null = min(min_null, float(start[0] * end[0]))
            start[0] = end[0] = 0.0
            for s, e, score in zip(*decode_spans(start, end, top_k, max_answer_len, allowed)):
                first, last = self._chars(enc, int(s), int(e))
                answers.append({"score": float(score), "start": first, "end": last, "answer": context[first:last]})
        if impossible:
            answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers

    @staticmethod
    def _chars(enc, s: int, e: int) -> tuple[int, int]:
        # Widen the token span to whole words of the context (transformers' align_to_words=True).
        try:
            return (enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0],
                    enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1])
        except Exception:  # [CLS] has no word
            return enc.offsets[s][0], enc.offsets[e][1]

"""The runner's batching rules, in process with a recording forward (no model, no HTTP)."""

from __future__ import annotations

import threading

import pytest

from bertkit.serving.batcher import BatchError, Job, Runner


class Recorder:
    """A forward that blocks until released, and records every batch it saw (as row lengths)."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.fail_on = fail_on

    def __call__(self, ids, types):
        self.gate.wait(10)
        self.batches.append([len(row) for row in ids])
        if self.fail_on is not None and any(len(row) == self.fail_on for row in ids):
            raise RuntimeError("bad row")
        return [sum(row) for row in ids]


def _rows(*lengths):
    return [[1] * n for n in lengths]


def _start_busy(runner: Runner, rec: Recorder) -> Job:
    # A first job that the runner picks up at once and that blocks in forward until the gate opens, so the
    # jobs submitted next all wait together.
    busy = runner.submit(Job(_rows(1)))
    while not rec.batches and runner.queued_rows:
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)
    return busy


def test_batches_cut_by_token_budget_over_length_sorted_rows_of_all_jobs():
    rec = Recorder()
    runner = Runner(rec, max_batch_tokens=40, max_batch_rows=100).start()
    busy = _start_busy(runner, rec)
    a = runner.submit(Job(_rows(10, 3)))
    b = runner.submit(Job(_rows(2, 8, 4)))
    rec.gate.set()
    assert a.future.result(5) == [10, 3] and b.future.result(5) == [2, 8, 4]  # answers in each job's order
    runner.stop(5)
    assert busy.future.result() == [1]
    # shortest first across both jobs; a batch closes before rows x longest passes 40 tokens
    assert rec.batches[1:] == [[2, 3, 4, 8], [10]]
    assert all(len(b) * max(b) <= 40 for b in rec.batches[1:])


def test_short_query_waits_at_most_one_batch_behind_long_documents():
    rec = Recorder()
    runner = Runner(rec, max_batch_tokens=512, max_batch_rows=100).start()
    _start_busy(runner, rec)
    docs = runner.submit(Job(_rows(*[256] * 6)))   # three batches' worth of long rows
    query = runner.submit(Job(_rows(5)))           # arrives after them
    rec.gate.set()
    assert query.future.result(5) == [5]
    docs.future.result(5)
    runner.stop(5)
    assert rec.batches[1][0] == 5  # the very next batch after the running one starts with the query


def test_rows_skipped_too_often_go_first():
    rec = Recorder()
    runner = Runner(rec, max_batch_tokens=8, max_batch_rows=100, max_skips=2).start()
    _start_busy(runner, rec)
    long = runner.submit(Job(_rows(8)))
    shorts = [runner.submit(Job(_rows(4, 4))) for _ in range(5)]  # each fills a whole batch, shorter than 8
    rec.gate.set()
    long.future.result(5)
    for job in shorts:
        job.future.result(5)
    runner.stop(5)
    position = rec.batches.index([8])
    assert position <= 1 + 2 + 1, rec.batches  # after at most max_skips batches of shorter rows


def test_cancelled_job_rows_never_run_and_failure_hits_only_its_batch():
    rec = Recorder(fail_on=7)
    runner = Runner(rec, max_batch_tokens=7, max_batch_rows=1).start()
    _start_busy(runner, rec)
    left = runner.submit(Job(_rows(3, 3)))
    bad = runner.submit(Job(_rows(7)))
    good = runner.submit(Job(_rows(2)))
    left.cancel()
    rec.gate.set()
    with pytest.raises(BatchError, match="RuntimeError: bad row"):
        bad.future.result(5)
    assert good.future.result(5) == [2]
    runner.stop(5)
    assert 3 not in [n for batch in rec.batches for n in batch]
    assert not left.future.done()


def test_stop_finishes_the_queue_then_refuses():
    rec = Recorder()
    rec.gate.set()
    runner = Runner(rec).start()
    jobs = [runner.submit(Job(_rows(i + 1))) for i in range(20)]
    runner.stop(5)
    assert [j.future.result(0) for j in jobs] == [[i + 1] for i in range(20)]
    with pytest.raises(RuntimeError, match="shutting down"):
        runner.submit(Job(_rows(1)))


def test_a_much_longer_row_starts_the_next_batch():
    rec = Recorder()
    runner = Runner(rec, max_batch_tokens=10_000, max_batch_rows=100).start()
    _start_busy(runner, rec)
    jobs = [runner.submit(Job(_rows(*[4] * 10))), runner.submit(Job(_rows(200, 180)))]
    rec.gate.set()
    for job in jobs:
        job.future.result(5)
    runner.stop(5)
    # 12 rows would fit the budget (12 x 200), but attention would then compute 2400 positions for 420 tokens.
    assert rec.batches[1:] == [[4] * 10, [180, 200]]

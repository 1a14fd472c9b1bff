"""Cross-request batching: one runner thread per model owns the model and forms token-budget batches.

Requests only enqueue token lists (a :class:`Job`); the event loop never runs the model. Each batch is
cut from *all* waiting rows, sorted by length, so short rows of many requests travel together and a
long document shares its batch with whatever fits beside it:

    waiting rows (any request)  --sort: aged first, then shortest-->  fill up to max_batch_tokens
                                                                      (rows x longest row, the cost
                                                                       of the re-padded attention),
                                                                      at most 2x the real tokens

A short query therefore waits at most for the batch already running. A row that has waited
``max_skips`` batches (because shorter rows kept arriving) goes to the front, oldest first, so long
documents cannot starve. A job
is answered as soon as its last row is done, and a job whose client left (``cancel``) frees its rows.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass(eq=False)
class Job:
    """One request's rows: ``rows[i]`` is a token-id list (``types[i]`` its token types, or None)."""

    rows: Sequence[Sequence[int]]
    types: Sequence[Sequence[int]] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    results: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    enqueued: float = 0.0
    started: bool = False
    batch_seq: int = 0          # the runner's batch counter when the job arrived (for ageing)

    def cancel(self) -> None:
        """Drops the rows not yet run (the client left or timed out); safe from any thread."""
        self.cancelled = True


class BatchError(RuntimeError):
    """The batch holding one of the job's rows raised; carries the original exception."""


class Runner:
    """Owns one model in a thread; ``submit`` jobs from anywhere, results arrive on ``job.future``.

    Args:
        forward: Runs one batch: ``forward(ids, types)`` with lists of token-id lists, returns one result
            per row (same order).
        max_batch_tokens: Budget of a batch, counted as rows x longest row.
        max_batch_rows: At most this many rows per batch.
        max_skips: A row passed over this many batches goes first in the next one.
        max_padding: A batch's rows x longest row stays within this multiple of its real tokens.
        metrics: Optional :class:`~bertkit.serving.metrics.Metrics`; ``name`` labels its series.
    """

    def __init__(self, forward: Callable[[list, list | None], Sequence[Any]], *, max_batch_tokens: int = 16384,
                 max_batch_rows: int = 256, max_skips: int = 4, max_padding: float = 2.0, metrics=None,
                 name: str = "model"):
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.max_skips = max_skips
        self.max_padding = max_padding
        self.metrics = metrics
        self.name = name
        self._pending: list[tuple[Job, int]] = []   # (job, row index), arrival order
        self._cond = threading.Condition()
        self._stopping = False
        self._batch_seq = 0
        self._thread = threading.Thread(target=self._loop, name=f"bertkit-runner-{name}", daemon=True)

    def start(self) -> "Runner":
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        """Queues every row of ``job``; raises RuntimeError once the runner is stopping."""
        job.results = [None] * len(job.rows)
        job.remaining = len(job.rows)
        job.enqueued = time.perf_counter()
        if not job.rows:
            job.future.set_result([])
            return job
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            job.batch_seq = self._batch_seq
            self._pending.extend((job, i) for i in range(len(job.rows)))
            self._cond.notify()
            self._gauge()
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Finishes every queued row, then ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued_rows(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ the thread
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_size.labels(self.name).set(len(self._pending))

    def _next_batch(self) -> list[tuple[Job, int]]:
        # Caller holds the lock. Rows of finished or cancelled jobs are dropped here.
        live = [(job, i) for job, i in self._pending if not job.cancelled and not job.future.done()]
        aged = self._batch_seq - self.max_skips
        # Aged rows first, oldest first (FIFO among them); then the rest, shortest first.
        live.sort(key=lambda r: (0, r[0].enqueued, 0) if r[0].batch_seq <= aged else (1, 0, len(r[0].rows[r[1]])))
        batch, longest, real = [], 0, 0
        for row in live:
            n = len(row[0].rows[row[1]])
            cost = max(longest, n) * (len(batch) + 1)
            # Stop at the budget, the row cap, or when the padded size (what CPU attention computes) would
            # pass max_padding x the real tokens: a long row then starts the next batch with its peers.
            if batch and (cost > self.max_batch_tokens or len(batch) >= self.max_batch_rows
                          or cost > self.max_padding * (real + n)):
                break
            batch.append(row)
            longest, real = max(longest, n), real + n
        chosen = set(map(id, batch))
        self._pending = [r for r in live if id(r) not in chosen]
        self._batch_seq += 1
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending and self._stopping:
                    return
                batch = self._next_batch()
                self._gauge()
            if batch:
                self._run(batch)

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        now = time.perf_counter()
        jobs = list({id(job): job for job, _ in batch}.values())
        for job in jobs:
            if not job.started:
                job.started = True
                if self.metrics is not None:
                    self.metrics.queue_wait.labels(self.name).observe(now - job.enqueued)
        ids = [job.rows[i] for job, i in batch]
        types = None
        if any(job.types is not None for job in jobs):
            types = [job.types[i] if job.types is not None else [0] * len(job.rows[i]) for job, i in batch]
        try:
            results = self.forward(ids, types)
        except Exception as err:  # noqa: BLE001 - one bad batch fails its own requests, not the server
            for job in jobs:
                job.cancel()
                if not job.future.done():
                    job.future.set_exception(BatchError(f"{type(err).__name__}: {err}"))
            if self.metrics is not None:
                self.metrics.batch_failures.labels(self.name).inc()
            return
        elapsed = time.perf_counter() - now
        if self.metrics is not None:
            tokens = sum(itertools.chain(map(len, ids)))
            self.metrics.observe_batch(self.name, len(ids), tokens, elapsed)
        for (job, i), result in zip(batch, results):
            if job.future.done():
                continue
            job.results[i] = result
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.results)

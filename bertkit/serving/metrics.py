"""Prometheus metrics of one server (its own registry, so two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Request counts and latency by route and status, queue, batch and inference series by model."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bertkit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("bertkit_request_duration_seconds", "Request latency by route and status",
                                 ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("bertkit_rejected", "Requests refused by a limit (reason = the flag or check)",
                                ["reason"], registry=r)
        self.in_flight = Gauge("bertkit_requests_in_flight", "Inference requests being served", registry=r)
        self.queue_size = Gauge("bertkit_queue_rows", "Rows (texts) waiting for a batch", ["model"], registry=r)
        self.queue_wait = Histogram("bertkit_queue_wait_seconds", "Time from enqueue to a request's first batch",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_texts = Histogram("bertkit_batch_texts", "Texts per batch", ["model"], buckets=TEXT_BUCKETS,
                                     registry=r)
        self.batch_tokens = Histogram("bertkit_batch_tokens", "Real (unpadded) tokens per batch", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.inference = Histogram("bertkit_inference_seconds", "Model time per batch", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("bertkit_tokens", "Tokens run through the model (rate() gives tokens/s)", ["model"],
                              registry=r)
        self.tokens_per_second = Gauge("bertkit_tokens_per_second", "Tokens/s of the last batch", ["model"],
                                       registry=r)
        self.batch_failures = Counter("bertkit_batch_failures", "Batches whose forward raised", ["model"],
                                      registry=r)

    def observe_batch(self, model: str, texts: int, tokens: int, seconds: float) -> None:
        self.batch_texts.labels(model).observe(texts)
        self.batch_tokens.labels(model).observe(tokens)
        self.inference.labels(model).observe(seconds)
        self.tokens.labels(model).inc(tokens)
        self.tokens_per_second.labels(model).set(tokens / seconds if seconds > 0 else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The limits of a server (the ``bertkit serve`` flags of the same names); no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Every limit of the server; the ``bertkit serve`` flags of the same names."""

    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    payload_limit: int = 2_000_000          # bytes of a request body
    max_batch_tokens: int = 16384           # rows x longest row per batch
    max_batch_requests: int = 256           # rows per batch
    auto_truncate: bool = False
    request_timeout: float = 30.0           # seconds, from arrival to answer
    api_key: str | None = None
    tokenization_workers: int = 2
    drain_seconds: float = 0.0              # SIGTERM: /health answers 503 this long before the port closes

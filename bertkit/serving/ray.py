"""Beyond one machine on existing engines: a Ray Serve deployment of ``bertkit serve`` and a Ray Data path.

Needs ``pip install 'ray[serve,data]'``. Both run unchanged on a laptop (``ray.init()``) and on a
cluster (``ray.init("ray://head:10001")`` or ``RAY_ADDRESS``); docs/serving.md has the recipe.

Online, each Ray Serve replica is one complete bertkit server (the same routes, runner threads, limits
and metrics); Ray's proxy spreads requests over the replicas and autoscales them::

    from ray import serve
    from bertkit.serving.ray import deployment
    serve.run(deployment(["./all-MiniLM-L6-v2"], num_replicas=4), route_prefix="/")

Offline, :func:`embed_dataset` maps a Ray Dataset through :class:`Embedder` actors (one model each)
and :func:`embed_files` reads sharded text/JSONL/CSV/Parquet files and writes Parquet with an
``embedding`` column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ray import serve

from .app import ServerState, create_app
from .config import ServeConfig


@serve.ingress()
class BertkitDeployment:
    """One replica: loads the models, then serves the bertkit app (built by Ray at replica start)."""

    def __init__(self, models: Sequence[str | None], config: ServeConfig | None = None, device: str | None = None,
                 threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.state = ServerState(specs=list(models) or [None], config=config or ServeConfig(), device=device)
        self.state.load()
        if self.state.load_error is not None:
            raise RuntimeError(self.state.load_error)  # Ray marks the replica failed and reports this

    def __serve_build_asgi_app__(self):
        return create_app(self.state, load_in_background=False)

    def check_health(self) -> None:  # Ray Serve calls this periodically; raising restarts the replica
        if not self.state.ready:
            raise RuntimeError("bertkit models are not loaded")


def deployment(models: Sequence[str | None] = (None,), config: ServeConfig | None = None, *, num_replicas: int
               | str | None = 1, autoscaling_config: dict | None = None, ray_actor_options: dict | None = None,
               device: str | None = None, threads: int | None = None, name: str = "bertkit"):
    """A Ray Serve application serving ``models`` (``--model`` specs) with every bertkit route.

    Args:
        models: Model folders, ``NAME=PATH`` or None for the bundled model; as ``bertkit serve --model``.
        config: Limits of each replica (:class:`~bertkit.serving.ServeConfig`).
        num_replicas: Fixed replica count, or ``"auto"`` with ``autoscaling_config``.
        autoscaling_config: Ray Serve autoscaling, e.g. ``{"min_replicas": 1, "max_replicas": 8,
            "target_ongoing_requests": 64}`` (a replica batches well with dozens of requests in flight).
        ray_actor_options: Resources of a replica, e.g. ``{"num_cpus": 4}`` or ``{"num_gpus": 1}``.
        device: ``"cpu"``/``"cuda"`` inside each replica (default: cuda if the replica sees a GPU).
        threads: torch threads per replica (match ``num_cpus``).

    Returns:
        An application for ``serve.run(app, route_prefix="/")``.
    """
    options: dict[str, Any] = {"name": name, "ray_actor_options": ray_actor_options or {"num_cpus": 1}}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    # Each replica admits up to the server's own limit; Ray's queue in front holds the rest.
    options["max_ongoing_requests"] = (config or ServeConfig()).max_concurrent_requests
    return serve.deployment(BertkitDeployment, **options).bind(list(models), config, device, threads)


class Embedder:
    """A Ray Data ``map_batches`` class: one SentenceEncoder per actor, adds an ``embedding`` column.

    Args:
        model: Model folder (None: the bundled model).
        column: The text column of the batches.
        batch_size: Texts per forward pass inside a Ray batch.
        normalize: As ``normalize_embeddings`` of :meth:`~bertkit.SentenceEncoder.encode`.
        device, threads: Where to run and torch threads per actor.
    """

    def __init__(self, model: str | None = None, column: str = "text", batch_size: int = 64,
                 normalize: bool | None = None, device: str | None = None, threads: int | None = None):
        import torch

        from ..encoder import SentenceEncoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = SentenceEncoder.from_pretrained(model, device=device)
        self.column, self.batch_size, self.normalize = column, batch_size, normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise KeyError(f"column {self.column!r} is not in the data (columns: {sorted(batch)}); pass column=")
        texts = [str(t) for t in batch[self.column]]
        batch["embedding"] = self.encoder.encode(texts, batch_size=self.batch_size,
                                                 normalize_embeddings=self.normalize)
        return batch


def embed_dataset(ds, model: str | None = None, *, column: str = "text", concurrency: int = 1,
                  batch_size: int = 1024, num_cpus: float | None = None, num_gpus: float | None = None,
                  **embedder_kwargs):
    """``ds`` with an ``embedding`` column, computed by ``concurrency`` :class:`Embedder` actors.

    ``batch_size`` texts go to an actor at a time (it sorts them by length inside); ``num_cpus``/``num_gpus``
    are each actor's resources. Extra keyword arguments go to :class:`Embedder`.
    """
    resources = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
    return ds.map_batches(Embedder, fn_constructor_kwargs={"model": model, "column": column, **embedder_kwargs},
                          batch_size=batch_size, batch_format="numpy", concurrency=concurrency, **resources)


_READERS = {".txt": "read_text", ".jsonl": "read_json", ".json": "read_json", ".csv": "read_csv",
            ".parquet": "read_parquet"}


def embed_files(inputs: str | Sequence[str], output: str, model: str | None = None, *, column: str = "text",
                **kwargs) -> None:
    """Reads sharded files (``.txt`` one text a line, ``.jsonl``, ``.csv``, ``.parquet``; local paths or any
    URL Ray reads, such as ``s3://``), embeds them and writes Parquet files under ``output``.

    Keyword arguments go to :func:`embed_dataset` (``concurrency``, ``batch_size``, ``num_cpus``...).
    """
    import ray

    paths = [inputs] if isinstance(inputs, str) else list(inputs)
    suffixes = {Path(p).suffix.lower() for p in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _READERS:
        raise ValueError(f"inputs {paths[:3]}: give files of one type among {sorted(_READERS)}, got {sorted(suffixes)}")
    ds = getattr(ray.data, _READERS[suffixes.pop()])(paths)
    embed_dataset(ds, model, column=column, **kwargs).write_parquet(output)

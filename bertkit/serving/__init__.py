"""``bertkit serve``: an HTTP server with TEI's and OpenAI's routes, cross-request token-budget batching,
limits and Prometheus metrics (needs ``pip install 'bertkit[serve]'``); Ray Serve / Ray Data glue in
:mod:`bertkit.serving.ray`. See docs/serving.md.

Layout: ``config`` (limits), ``batcher`` (one runner thread per model), ``backends``/``tasks`` (a model
as tokenize + forward), ``loading`` (--model -> model), ``schemas``, ``app`` (routes, state), ``metrics``,
``cli`` (flags, uvicorn, SIGTERM), ``ray``.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "ServerState", "create_app"]


def __getattr__(name):
    # The app needs the serve extra (starlette, orjson, prometheus-client): imported on first use only.
    if name in ("ServerState", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'bertkit.serving' has no attribute {name!r}")

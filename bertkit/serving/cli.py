"""``bertkit serve``: flags, start-up checks, and uvicorn with a graceful SIGTERM.

SIGTERM: /health turns 503 at once (readiness fails first), the port stays open ``--drain-seconds`` so
a load balancer can notice, then uvicorn stops accepting, every request in flight is answered, the
runners finish their queues and the process exits 0. A second SIGTERM or Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from ..commands import positive_int
from ..io_readers import InputError

EXTRA_HINT = "pip install 'bertkit[serve]'"


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return number


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import ServeConfig

    d = ServeConfig()
    parser.add_argument("--model", action="append", metavar="[NAME=]PATH",
                        help="a sentence-transformers, cross-encoder or classification folder; repeat to serve "
                             "several (requests pick one with their `model` field; the name defaults to the "
                             "folder's name). Default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; "
                        "0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weight dtype (default: float32)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="torch threads for inference (default: torch's choice, one per core)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=d.max_batch_tokens, metavar="N",
                        help=f"token budget of one batch, rows x longest row (default: {d.max_batch_tokens})")
    parser.add_argument("--max-batch-requests", type=positive_int, default=d.max_batch_requests, metavar="N",
                        help=f"texts per batch at most (default: {d.max_batch_requests})")
    parser.add_argument("--max-concurrent-requests", type=positive_int, default=d.max_concurrent_requests,
                        metavar="N", help="requests in flight before new ones get 429 "
                                          f"(default: {d.max_concurrent_requests})")
    parser.add_argument("--max-client-batch-size", type=positive_int, default=d.max_client_batch_size,
                        metavar="N", help=f"inputs per request, else 413 (default: {d.max_client_batch_size})")
    parser.add_argument("--payload-limit", type=positive_int, default=d.payload_limit, metavar="BYTES",
                        help=f"request body size, else 413 (default: {d.payload_limit})")
    parser.add_argument("--auto-truncate", action="store_true",
                        help="truncate inputs longer than the model's limit (default: refuse them with 413)")
    parser.add_argument("--request-timeout", type=_positive_float, default=d.request_timeout, metavar="S",
                        help=f"seconds from arrival to answer, else 504 (default: {d.request_timeout:g})")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route "
                        "but /health (default: none; also read from $BERTKIT_API_KEY)")
    parser.add_argument("--tokenization-workers", type=positive_int, default=d.tokenization_workers,
                        metavar="N", help=f"threads that tokenize requests (default: {d.tokenization_workers})")
    parser.add_argument("--drain-seconds", type=float, default=d.drain_seconds, metavar="S",
                        help="on SIGTERM, answer /health with 503 this long before closing the port "
                             f"(default: {d.drain_seconds:g}; a few seconds behind a load balancer)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="log every request (default: off)")


class _GracefulServer:
    """Builds a uvicorn.Server whose SIGTERM drains instead of exiting by the signal."""

    @staticmethod
    def build(config, state, drain_seconds: float):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if sig == signal.SIGTERM and not state.draining:
                    state.draining = True  # /health answers 503 from now on
                    logging.getLogger("bertkit.serving").info(
                        "SIGTERM: draining (health 503), closing the port in %g s", drain_seconds)
                    threading.Timer(drain_seconds, self._close).start()
                    return  # not recorded: uvicorn would re-raise it after shutdown (exit by signal, not 0)
                if sig == signal.SIGTERM:
                    self.force_exit = True
                super().handle_exit(sig, frame)

            def _close(self):
                self.should_exit = True

        return Server(config)


def run_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import orjson  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise InputError(f"bertkit serve needs the `serve` extra ({err.name} is not installed): {EXTRA_HINT}")
    from .app import ServerState, create_app
    from .config import ServeConfig
    from .loading import parse_model_spec

    specs = args.model or [None]
    names = set()
    for spec in specs:
        name, path = parse_model_spec(spec)
        if path is not None and not Path(path).is_dir():
            what = "is a file" if Path(path).exists() else "does not exist"
            raise InputError(f"--model {spec}: {path!r} {what}; pass a model folder (config.json inside)")
        if name in names:
            raise InputError(f"--model {spec}: the name {name!r} is used twice; name them with NAME=PATH")
        names.add(name)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: expected 0-65535")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = ServeConfig(max_concurrent_requests=args.max_concurrent_requests,
                         max_client_batch_size=args.max_client_batch_size, payload_limit=args.payload_limit,
                         max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
                         auto_truncate=args.auto_truncate, request_timeout=args.request_timeout,
                         api_key=args.api_key or os.environ.get("BERTKIT_API_KEY") or None,
                         tokenization_workers=args.tokenization_workers, drain_seconds=args.drain_seconds)
    state = ServerState(specs=specs, config=config, device=args.device, dtype=args.dtype)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s: %(message)s")
    uv_config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level=args.log_level,
                               access_log=args.access_log, timeout_graceful_shutdown=int(args.request_timeout) + 5)
    server = _GracefulServer.build(uv_config, state, args.drain_seconds)

    def stop_if_failed():  # a model that does not load ends the process (status 1), not a 503 forever
        while not state.ready and state.load_error is None:
            threading.Event().wait(0.2)
        if state.load_error is not None:
            server.should_exit = True

    threading.Thread(target=stop_if_failed, daemon=True).start()
    server.run()
    if state.load_error is not None:
        print(f"bertkit serve: {state.load_error}", file=sys.stderr)
        return 1
    return 0

"""The HTTP routes (TEI and OpenAI shapes) on Starlette, and the state they share.

Request path: API key -> concurrency limit (429) -> body size (413) -> JSON + fields (422) -> model
(404) -> client batch size (413) -> tokenize in a worker thread (413 if too long) -> the model's
:class:`~bertkit.serving.batcher.Runner` -> answer, or 504 at the deadline, or rows freed when the client
leaves. Errors are ``{"error": ..., "error_type": ...}`` (TEI), under ``/v1`` OpenAI's
``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from . import schemas
from .backends import InputTooLong, ServedModel
from .loading import load_model
from .batcher import BatchError, Job, Runner
from .config import ServeConfig
from .metrics import Metrics

log = logging.getLogger("bertkit.serving")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


class ClientGone(Exception):
    pass


@dataclass
class ServerState:
    """The models, their runners, the limits and the metrics of one server."""

    specs: list = field(default_factory=lambda: [None])
    config: ServeConfig = field(default_factory=ServeConfig)
    device: str | None = None
    dtype: str | None = None
    models: dict = field(default_factory=dict)
    runners: dict = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    in_flight: int = 0

    def __post_init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(self.config.tokenization_workers,
                                                          thread_name_prefix="bertkit-tokenize")

    def add(self, model: ServedModel) -> None:
        if model.name in self.models:
            raise ValueError(f"two --model flags are both named {model.name!r}; name them with NAME=PATH")
        self.models[model.name] = model
        self.runners[model.name] = Runner(model.forward, max_batch_tokens=self.config.max_batch_tokens,
                                          max_batch_rows=self.config.max_batch_requests,
                                          metrics=self.metrics, name=model.name).start()

    def load(self) -> None:
        """Loads and warms up every model, then starts answering (/health turns 200)."""
        try:
            for spec in self.specs:
                model = load_model(spec, device=self.device, dtype=self.dtype)
                model.warm_up()
                self.add(model)
            self.ready = True
            log.info("ready: %s", ", ".join(f"{m.name} ({m.task})" for m in self.models.values()))
        except Exception as err:  # noqa: BLE001 - reported by /health and the log, the process keeps running
            self.load_error = f"{type(err).__name__}: {err}"
            log.error("loading the models failed: %s", self.load_error)

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.stop()
        self.pool.shutdown(wait=False)

    def pick(self, name: str | None, tasks: tuple[str, ...]) -> ServedModel:
        if name is None:
            # The first model of the route's first task (/predict prefers a classifier to a reranker).
            model = next((m for task in tasks for m in self.models.values() if m.task == task), None)
            if model is None:
                raise HTTPError(404, f"no model for this route: it needs a {' or '.join(tasks)} model and the "
                                f"server has {self._listing()}", "NotFound")
            return model
        model = self.models.get(name)
        if model is None:
            raise HTTPError(404, f"model {name!r} is not served here; this server has {self._listing()}",
                            "NotFound")
        if model.task not in tasks:
            raise HTTPError(422, f"model: {name!r} is a {model.task} model; this route needs a "
                            f"{' or '.join(tasks)} model", "Validation")
        return model

    def _listing(self) -> str:
        return ", ".join(f"{m.name!r} ({m.task})" for m in self.models.values()) or "no models"


# ------------------------------------------------------------------------------------------- plumbing
def _json(data, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def _error(err: HTTPError, openai: bool) -> Response:
    if openai:
        body = {"error": {"message": err.message, "type": err.error_type, "code": err.status}}
    else:
        body = {"error": err.message, "error_type": err.error_type}
    return _json(body, err.status)


def _check_key(state: ServerState, request: Request) -> None:
    key = state.config.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        state.metrics.rejected.labels("api_key").inc()
        raise HTTPError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                        "Unauthorized")


async def _read_body(state: ServerState, request: Request) -> bytes:
    limit = state.config.payload_limit
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        state.metrics.rejected.labels("payload_limit").inc()
        raise HTTPError(413, f"request body is {declared} bytes, more than --payload-limit {limit}", "Validation")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            state.metrics.rejected.labels("payload_limit").inc()
            raise HTTPError(413, f"request body is more than --payload-limit {limit} bytes", "Validation")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, schema):
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise HTTPError(422, f"body: not valid JSON ({err})", "Validation") from None
    if not isinstance(data, dict):
        raise HTTPError(422, f"body: expected a JSON object, got {schemas._kind(data)}", "Validation")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise HTTPError(422, schemas.describe(err), "Validation") from None


def _check_batch(state: ServerState, n: int, what: str) -> None:
    if n > state.config.max_client_batch_size:
        state.metrics.rejected.labels("max_client_batch_size").inc()
        raise HTTPError(413, f"{what}: {n} inputs, more than --max-client-batch-size "
                        f"{state.config.max_client_batch_size}; split the request", "Validation")


async def _wait_disconnect(request: Request) -> None:
    # After the body is read, the server's receive() only returns when the client goes away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Call:
    """One request's context: its state, deadline and the helpers routes await."""

    def __init__(self, state: ServerState, request: Request):
        self.state, self.request = state, request
        self.deadline = time.monotonic() + state.config.request_timeout

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._timeout()
        return left

    def _timeout(self):
        self.state.metrics.rejected.labels("request_timeout").inc()
        raise HTTPError(504, f"no answer within --request-timeout {self.state.config.request_timeout} s", "Timeout")

    async def tokenize(self, model: ServedModel, texts, pairs=None, truncate: bool | None = None):
        truncate = self.state.config.auto_truncate if truncate is None else truncate
        work = partial(model.tokenize, texts, pairs, truncate)
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.state.pool, work),
                                          self._left())
        except InputTooLong as err:
            self.state.metrics.rejected.labels("input_too_long").inc()
            raise HTTPError(413, str(err), "Validation") from None
        except (TypeError, ValueError) as err:  # the tokenizer's own refusals (e.g. lone surrogates)
            raise HTTPError(422, f"inputs: {err}", "Tokenizer") from None
        except asyncio.TimeoutError:
            self._timeout()

    async def in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.state.pool, partial(fn, *args))

    async def run(self, model: ServedModel, tokenized) -> list:
        job = Job(tokenized.ids, tokenized.types)
        try:
            self.state.runners[model.name].submit(job)
        except RuntimeError as err:
            raise HTTPError(503, str(err), "Unhealthy") from None
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_wait_disconnect(self.request))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=self._left(),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result in done:
            try:
                return result.result()
            except BatchError as err:
                raise HTTPError(500, f"inference failed for the batch holding this request: {err}",
                                "Backend") from None
        job.cancel()  # frees the rows not yet run
        result.cancel()
        if gone in done:
            self.state.metrics.rejected.labels("client_disconnected").inc()
            raise ClientGone()
        self._timeout()


def _endpoint(state: ServerState, schema, handler, openai: bool = False):
    async def endpoint(request: Request) -> Response:
        counted = False
        try:
            _check_key(state, request)
            if not state.ready:  # while draining (SIGTERM) requests are still served; only /health fails
                raise HTTPError(503, state.load_error or "the models are still loading", "Unhealthy")
            if state.in_flight >= state.config.max_concurrent_requests:
                state.metrics.rejected.labels("max_concurrent_requests").inc()
                raise HTTPError(429, f"--max-concurrent-requests {state.config.max_concurrent_requests} "
                                "requests are already in flight; retry later", "Overloaded")
            state.in_flight += 1
            state.metrics.in_flight.inc()
            counted = True
            body = _parse(await _read_body(state, request), schema)
            return await handler(Call(state, request), body)
        except HTTPError as err:
            return _error(err, openai)
        except (ClientGone, ClientDisconnect):
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except Exception as err:  # noqa: BLE001 - a bug answers 500 in the API's shape, logged with its traceback
            log.exception("unexpected error on %s", request.url.path)
            return _error(HTTPError(500, f"internal error: {type(err).__name__}: {err}", "Backend"), openai)
        finally:
            if counted:
                state.in_flight -= 1
                state.metrics.in_flight.dec()
    return endpoint


# ------------------------------------------------------------------------------------------- routes
def _finish(rows: list, dimensions: int | None, normalize: bool, dim: int) -> np.ndarray:
    out = np.stack(rows).astype(np.float32, copy=False)
    if dimensions is not None:
        if dimensions > dim:
            raise HTTPError(422, f"dimensions: {dimensions} is more than the model's {dim}", "Validation")
        out = out[:, :dimensions]  # Matryoshka: the leading dimensions, normalized after cutting
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out)


async def embed(call: Call, body: schemas.EmbedRequest) -> Response:
    model = call.state.pick(body.model, ("embedding",))
    _check_batch(call.state, len(body.inputs), "inputs")
    if body.dimensions is not None and body.dimensions > model.dim:
        raise HTTPError(422, f"dimensions: {body.dimensions} is more than the model's {model.dim}", "Validation")
    tokens = await call.tokenize(model, body.inputs, truncate=body.truncate)
    rows = await call.run(model, tokens)
    normalize = model.normalize if body.normalize is None else body.normalize
    return _json(_finish(rows, body.dimensions, normalize, model.dim))


async def openai_embeddings(call: Call, body: schemas.OpenAIEmbeddingRequest) -> Response:
    model = call.state.pick(body.model, ("embedding",))
    _check_batch(call.state, len(body.input), "input")
    if body.dimensions is not None and body.dimensions > model.dim:
        raise HTTPError(422, f"dimensions: {body.dimensions} is more than the model's {model.dim}", "Validation")
    tokens = await call.tokenize(model, body.input)
    rows = await call.run(model, tokens)
    out = _finish(rows, body.dimensions, model.normalize, model.dim)
    if body.encoding_format == "base64":  # OpenAI: little-endian float32 bytes, base64
        data = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in out]
    else:
        data = out
    return _json({"object": "list", "model": model.name,
                  "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(data)],
                  "usage": {"prompt_tokens": tokens.tokens, "total_tokens": tokens.tokens}})


async def tokenize(call: Call, body: schemas.TokenizeRequest) -> Response:
    model = call.state.pick(body.model, ("embedding", "classifier", "reranker"))
    _check_batch(call.state, len(body.inputs), "inputs")
    return _json(await call.in_pool(model.describe_tokens, body.inputs, body.add_special_tokens))


async def rerank(call: Call, body: schemas.RerankRequest) -> Response:
    model = call.state.pick(body.model, ("reranker",))
    _check_batch(call.state, len(body.texts), "texts")
    tokens = await call.tokenize(model, [body.query] * len(body.texts), body.texts, body.truncate)
    scores = model.scores(await call.run(model, tokens), raw=body.raw_scores)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n]
    return _json([{"index": i, "score": float(scores[i]), **({"text": body.texts[i]} if body.return_text else {})}
                  for i in order])


async def predict(call: Call, body: schemas.PredictRequest) -> Response:
    model = call.state.pick(body.model, ("classifier", "reranker"))
    rows = body.inputs["rows"]
    _check_batch(call.state, len(rows), "inputs")
    texts = [a for a, _ in rows]
    has_pairs = any(b is not None for _, b in rows)
    if has_pairs and not all(b is not None for _, b in rows):
        raise HTTPError(422, "inputs: mix of single texts and pairs; send one kind per request", "Validation")
    tokens = await call.tokenize(model, texts, [b for _, b in rows] if has_pairs else None, body.truncate)
    answers = model.predictions(await call.run(model, tokens), raw=body.raw_scores)
    return _json(answers[0] if body.inputs["single"] else answers)


# ------------------------------------------------------------------------------------------- GET routes
def create_app(state: ServerState, load_in_background: bool = True) -> Starlette:
    """The ASGI app; with ``load_in_background`` the models load after the port opens (/health 503 until then)."""

    async def health(request: Request) -> Response:
        if state.ready and not state.draining:
            return _json({"status": "ok"})
        why = state.load_error or ("shutting down" if state.draining else "loading")
        return _json({"status": why}, 503)

    async def info(request: Request) -> Response:
        try:
            _check_key(state, request)
        except HTTPError as err:
            return _error(err, False)
        c = state.config
        models = [m.info() for m in state.models.values()]
        first = models[0] if models else {}
        return _json({**first, "models": models, "version": __version__, "ready": state.ready,
                      "max_concurrent_requests": c.max_concurrent_requests,
                      "max_client_batch_size": c.max_client_batch_size, "payload_limit": c.payload_limit,
                      "max_batch_tokens": c.max_batch_tokens, "max_batch_requests": c.max_batch_requests,
                      "auto_truncate": c.auto_truncate, "request_timeout": c.request_timeout,
                      "tokenization_workers": c.tokenization_workers})

    async def metrics(request: Request) -> Response:
        try:
            _check_key(state, request)
        except HTTPError as err:
            return _error(err, False)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        try:
            _check_key(state, request)
        except HTTPError as err:
            return _error(err, True)
        return _json({"object": "list", "data": [{"id": m.name, "object": "model", "owned_by": "bertkit",
                                                  "task": m.task} for m in state.models.values()]})

    routes = [
        Route("/embed", _endpoint(state, schemas.EmbedRequest, embed), methods=["POST"]),
        Route("/v1/embeddings", _endpoint(state, schemas.OpenAIEmbeddingRequest, openai_embeddings, True),
              methods=["POST"]),
        Route("/rerank", _endpoint(state, schemas.RerankRequest, rerank), methods=["POST"]),
        Route("/predict", _endpoint(state, schemas.PredictRequest, predict), methods=["POST"]),
        Route("/tokenize", _endpoint(state, schemas.TokenizeRequest, tokenize), methods=["POST"]),
        Route("/info", info), Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not state.ready and not state.models:
            if load_in_background:
                threading.Thread(target=state.load, name="bertkit-load", daemon=True).start()
            else:
                state.load()
        yield
        state.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    known = {route.path for route in routes}
    return _Measured(app, state.metrics, known)


class _Measured:
    """ASGI middleware: counts every HTTP request and its latency by route and status."""

    def __init__(self, app, metrics: Metrics, known: set[str]):
        self.app, self.metrics, self.known = app, metrics, known

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope["path"] if scope["path"] in self.known else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route, str(status[0])).observe(time.perf_counter() - start)

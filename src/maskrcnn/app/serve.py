"""`maskrcnn serve`: a model behind HTTP (FastAPI on uvicorn), concurrent requests batched into its calls.

    POST /predict   an image (raw bytes with their Content-Type, or a multipart form's file) -> its detections as
                    predictions.json holds them, under "detections"; query: score_thresh, format, max_detections
    GET  /health    200 once the model is loaded and warmed up, 503 before
    GET  /info      classes, model file, runtime, precision, the server's limits
    GET  /metrics   Prometheus text (`serve_metrics`)
    GET  /          a page to try it (assets/serve.html)

Threads: the event loop reads requests; `encode_threads` threads decode images and encode detections; one model
thread runs the batches (`batcher.DynamicBatcher`). Back-pressure: a request beyond --max-queue waiting ones is
answered 503 with Retry-After at once. Every refusal is one JSON line {"error": ...}, never a traceback.
Stop: SIGTERM or Ctrl-C closes the listening socket, answers the requests already in, then exits with status 0.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from importlib import resources
from typing import Literal

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from maskrcnn.app.batcher import DynamicBatcher, QueueFull
from maskrcnn.app.serve_metrics import ServeMetrics
from maskrcnn.app.serve_model import ServedModel, load_served_model
from maskrcnn.app.serve_request import RequestError, decode_image, image_bytes
from maskrcnn.app.serve_settings import API_KEY_ENV, ServeSettings
from maskrcnn.errors import UserError

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
OPEN_PATHS = ("/", "/health")  # answered without the API key: the page holds no data, /health is for probes
DEFAULT_SCORE_THRESH = 0.5  # `maskrcnn predict --score-thresh`'s default


def check_access(settings: ServeSettings) -> None:
    """Refuses to open the service to the network without an API key unless told so (allow_open)."""
    try:
        loopback = settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and settings.api_key is None and not settings.allow_open:
        raise UserError(f"--host {settings.host}: the service would be open to the network; give --api-key KEY "
                        f"(or ${API_KEY_ENV}) to require a key, or --no-api-key to serve without one")


class ModelServer:
    """The served model with its batcher, encoding threads and metrics; `app` is the ASGI application."""

    def __init__(self, model: ServedModel, settings: ServeSettings) -> None:
        self.model, self.settings = model, settings
        self.ready = False
        self.seconds_per_image = 0.0  # of the model calls, smoothed: the Retry-After estimate
        self.batcher = DynamicBatcher(model.detect, max_batch=settings.max_batch,
                                      max_wait_s=settings.max_wait_ms / 1000.0, max_queue=settings.max_queue,
                                      on_batch=self._observe_batch)
        self.metrics = ServeMetrics(settings.max_batch, lambda: self.batcher.depth)
        self.pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        self.app = create_app(self)

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.observe_batch(size, seconds)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / size

    async def warm_up(self) -> None:
        """Warms the model up off the event loop, then starts the model thread and reports ready."""
        await asyncio.get_running_loop().run_in_executor(self.pool, self.model.warm_up, self.settings.max_batch)
        self.batcher.start()
        self.ready = True
        self.metrics.ready.set(1)
        log.info("serve: ready")

    def retry_after(self) -> str:
        """Seconds until the queue has room again, estimated from the recent model calls (at least 1)."""
        return str(max(1, math.ceil(self.batcher.depth * self.seconds_per_image)))

    async def predict(self, request: Request, score_thresh: float, mask_format: str,
                      max_detections: int | None) -> dict:
        """The answer of POST /predict, within the request timeout (504 past it)."""
        if not self.ready:
            raise RequestError(503, "the model is still warming up", {"Retry-After": "1"})
        try:
            self.batcher.admit()
        except QueueFull as error:
            raise RequestError(503, f"the server is busy: {error}; retry later",
                               {"Retry-After": self.retry_after()}) from None
        try:
            return await asyncio.wait_for(self._answer(request, score_thresh, mask_format, max_detections),
                                          self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"no answer within {self.settings.timeout_s:g} s (--timeout)") from None

    async def _answer(self, request: Request, score_thresh: float, mask_format: str,
                      max_detections: int | None) -> dict:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            data = await image_bytes(request, self.settings.max_bytes)
            image = await loop.run_in_executor(self.pool, decode_image, data, self.settings.max_pixels)
        except BaseException:  # refused or cancelled before reaching the queue: its place is free again
            self.batcher.leave()
            raise
        size = (int(image.shape[-2]), int(image.shape[-1]))
        decoded = time.perf_counter()
        detections = await asyncio.wrap_future(self.batcher.submit(size, image))
        detected = time.perf_counter()
        entries = await loop.run_in_executor(self.pool, lambda: self.model.encode(
            image, detections, score_thresh=score_thresh, max_detections=max_detections, mask_format=mask_format))
        timing = {"decode_ms": (decoded - started) * 1e3, "model_ms": (detected - decoded) * 1e3,
                  "encode_ms": (time.perf_counter() - detected) * 1e3}
        return {"image": {"height": size[0], "width": size[1]}, "detections": entries,
                "timing": {key: round(value, 2) for key, value in timing.items()}}

    def info(self) -> dict:
        limits = {key: value for key, value in asdict(self.settings).items() if key not in ("api_key", "allow_open")}
        return {**self.model.info, "api_key_required": self.settings.api_key is not None, "settings": limits}

    def authorised(self, request: Request) -> bool:
        """Whether the request may use the path: an open path, no key set, or the right key."""
        if self.settings.api_key is None or request.url.path in OPEN_PATHS:
            return True
        given = request.headers.get(API_KEY_HEADER) or request.headers.get("authorization", "").removeprefix(
            "Bearer ")
        return hmac.compare_digest(given.encode(), self.settings.api_key.encode())

    def close(self) -> None:
        """Runs the queued requests, then stops the model and encoding threads."""
        self.batcher.close()
        self.pool.shutdown(wait=True)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI application of a `ModelServer`: its routes, error answers and metrics."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        warming = asyncio.create_task(server.warm_up())
        yield
        await warming
        await asyncio.get_running_loop().run_in_executor(None, server.close)

    app = FastAPI(title="maskrcnn serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    _add_error_answers(app, server)
    page = resources.files("maskrcnn.app").joinpath("assets/serve.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ready" if server.ready else "warming up"}, status_code=200 if server.ready else 503)

    @app.get("/info")
    async def info() -> dict:
        return server.info()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request, score_thresh: float = Query(DEFAULT_SCORE_THRESH, ge=0.0, le=1.0),
                      format: Literal["rle", "polygons", "none"] = "rle",
                      max_detections: int | None = Query(None, ge=1)) -> dict:
        return await server.predict(request, score_thresh, format, max_detections)

    return app


def _add_error_answers(app: FastAPI, server: ModelServer) -> None:
    """Refusals as one JSON line, the API key check, and every answer counted in the metrics."""

    @app.middleware("http")
    async def count_and_authorise(request: Request, call_next):
        started = time.perf_counter()
        if not server.authorised(request):
            response = _error(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header")
        else:
            response = await call_next(request)
        endpoint = request.url.path if request.url.path in ("/predict", "/health", "/info", "/metrics", "/") else "other"
        server.metrics.observe_request(endpoint, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, error.message, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:  # 404, 405
        return _error(error.status_code, f"{request.method} {request.url.path}: {error.detail}", error.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'][1:])}: {e['msg']}" for e in error.errors())
        return _error(400, f"bad request parameter: {problems}")

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        log.error("serve: %s failed: %s: %s", request.url.path, type(error).__name__, error)
        first_line = " ".join(str(error).split())[:300]
        return _error(500, f"internal error: {type(error).__name__}: {first_line}")


@contextmanager
def _stop_signals_end_quietly() -> Iterator[None]:
    """uvicorn raises the signal that stopped it again once it has shut down; handlers of our own take it there,
    so that a server stopped by SIGTERM or Ctrl-C ends with status 0."""
    previous = {sig: signal.signal(sig, lambda number, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here so that a taken port is a one-line error, not uvicorn's exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None
    return sock


def run_server(model_path: str | os.PathLike, settings: ServeSettings, *, runtime: str | None = None,
               precision: str | None = None, overrides: list[str] = ()) -> str:
    """`maskrcnn serve`: loads the model, serves it until SIGTERM or Ctrl-C. Returns the line to print.

    Raises:
        UserError: a bad model file, runtime, precision or override, an address that needs an API key, or a taken port.
    """
    check_access(settings)
    sock = bind(settings.host, settings.port)
    model = load_served_model(model_path, runtime=runtime, precision=precision, overrides=overrides)
    server = ModelServer(model, settings)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(server.app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    log.info(f"serve: {model_path} on http://{host}:{port} (try it at /; ready once warmed up: GET /health)")
    with _stop_signals_end_quietly():
        uvicorn.Server(config).run(sockets=[sock])
    return f"serve: stopped ({model_path} on http://{host}:{port})"

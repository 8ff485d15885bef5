"""The recognition service: PaddleX's PP-ShiTuV2 serving routes and a native ``/v1`` REST API on FastAPI.

:func:`create_app` builds the ASGI app from :class:`ServeSettings`; :func:`run` serves it with uvicorn. The
model is loaded and every batch shape compiled in the background after startup: ``/healthz`` answers at
once, ``/readyz`` (and every route that needs the model) only once that is done.

Inputs are image bytes only: Base64 strings (or ``data:`` URLs) in JSON bodies, or files in multipart
bodies; http(s) URLs only for the hosts of an allow-list. No request can name a file on the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shitu.errors import ShituError
from shitu.serve.state import DEFAULT_GALLERY, REF_PATTERN, Conflict, GalleryStore, NotFound

try:  # the serve extra installs orjson; without it answers fall back to the standard library's encoder
    import orjson
except ImportError:  # pragma: no cover - exercised by the fallback test through monkeypatching
    orjson = None  # type: ignore[assignment]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
PADDLEX_PREFIX = "/shitu-"
#: Routes that answer without the API key (a load balancer's probes).
OPEN_ROUTES = frozenset({"/healthz", "/readyz"})


@dataclass
class ServeSettings:
    """Everything ``shitu serve`` can set. ``model`` is a bundle folder or a registered model name;
    ``backend``/``precision``/``calibration`` where its forward pass runs (see :mod:`shitu.export.backends`)."""

    model: str | os.PathLike[str]
    index: Path | None = None
    state_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    input_size: int | None = None
    backend: str = "jax"
    precision: str = "fp32"
    calibration: Any = None  # int8: a shitu.export.quantize.CalibrationSet, or what calibration_set accepts
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_images: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    api_key: str | None = None
    url_hosts: tuple[str, ...] = ()
    decode_workers: int = field(default_factory=lambda: max(2, min(8, os.cpu_count() or 1)))
    compact_every: int = 256
    default_min_score: float = 0.5

    def resolved_state_dir(self) -> Path:
        from shitu.runtime import cache_dir

        return Path(self.state_dir) if self.state_dir is not None else cache_dir() / "serve"


class ApiError(Exception):
    """A request the service refuses: HTTP ``status``, a one-line message and the field it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


# -- JSON answers ------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """What the standard library's encoder writes for a numpy value."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_json(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON. numpy arrays and scalars are written directly (orjson: a float32
    as the shortest text that reads back as the same float32, so ``np.float32(json.loads(...))`` gives the
    very values that were sent); without orjson, through ``tolist()`` and :mod:`json`."""
    if orjson is not None:
        if isinstance(content, dict):
            content = {k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v for k, v in content.items()}
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    import json

    return json.dumps(content, default=_plain, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class FastJSONResponse(Response):
    """A JSON answer encoded by :func:`encode_json` (routes return it directly, so FastAPI's
    ``jsonable_encoder`` never walks a large feature matrix)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encode_json(content)


# -- request and response schemas ----------------------------------------------------------------------------

Label = Annotated[str, Field(min_length=1, max_length=256)]
ItemId = Annotated[int, Field(ge=0, lt=2**63)]
ImageText = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageLabelPair(_Strict):
    image: ImageText
    label: Label


class BuildIndexRequest(_Strict):
    imageLabelPairs: list[ImageLabelPair] = Field(min_length=1)


class AddImagesToIndexRequest(_Strict):
    imageLabelPairs: list[ImageLabelPair] = Field(min_length=1)
    indexKey: str


class RemoveImagesFromIndexRequest(_Strict):
    ids: list[ItemId]
    indexKey: str


class InferRequest(_Strict):
    image: ImageText
    indexKey: str | None = None
    detThreshold: float | None = None
    recThreshold: float | None = None
    hammingRadius: float | None = None
    topk: Annotated[int, Field(ge=1, le=1000)] | None = None


class EmbedRequest(_Strict):
    images: list[ImageText] = Field(min_length=1)


class SearchRequest(_Strict):
    images: list[ImageText] = Field(min_length=1)
    k: Annotated[int, Field(ge=1, le=1000)] = 5
    min_score: Annotated[float, Field(ge=-1.0, le=1.0)] | None = None
    labels: list[Label] | None = None


class AddRequest(_Strict):
    images: list[ImageText] = Field(min_length=1)
    labels: list[Label] = Field(min_length=1)
    refs: list[Annotated[str, Field(pattern=REF_PATTERN.pattern)] | None] | None = None
    allow_duplicates: bool = False


class RemoveRequest(_Strict):
    ids: list[ItemId] = Field(default_factory=list)
    labels: list[Label] = Field(default_factory=list)
    refs: list[str] = Field(default_factory=list)


# -- the service -------------------------------------------------------------------------------------------


class Metrics:
    """The Prometheus metrics of one app, in their own registry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shitu_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "shitu_request_seconds",
            "Request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "shitu_batch_size",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.model_seconds = Histogram("shitu_model_seconds", "Model call time", registry=self.registry)
        self.queue_depth = Gauge("shitu_queue_depth", "Images waiting for the model", registry=self.registry)
        self.index_size = Gauge("shitu_index_items", "Items per gallery", ["gallery"], registry=self.registry)
        self.ready = Gauge("shitu_ready", "1 once the model is loaded and warm", registry=self.registry)


@dataclass
class Decoded:
    """One input image: its bytes' SHA-256, size, and the preprocessed array the model takes."""

    sha256: str
    width: int
    height: int
    array: np.ndarray


class Service:
    """The model, the batcher and the galleries of one app, and how requests reach them."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.recognizer: Any = None
        self.batcher: Any = None
        self.store: GalleryStore | None = None
        self.ready = False
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] = lambda message: None
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="shitu-decode")
        self.io_pool = ThreadPoolExecutor(4, thread_name_prefix="shitu-index")

    # -- startup ----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model, compile its batch shapes and open the galleries (blocking; run in a thread)."""
        from shitu.embed.resolve import resolve_model
        from shitu.serve.batching import warm_up

        settings = self.settings
        recognizer = resolve_model(
            settings.model,
            input_size=settings.input_size,
            backend=settings.backend,
            precision=settings.precision,
            calibration=settings.calibration,
        )
        recognizer.max_pixels = settings.max_pixels
        warm_up(recognizer.embed_arrays, recognizer.embedder.buckets, recognizer.input_size, settings.max_batch)
        store = GalleryStore(settings.resolved_state_dir(), recognizer.describe(), compact_every=settings.compact_every)
        store.open_all(seed_index=settings.index)
        self.recognizer, self.store = recognizer, store
        for name in store.names():
            self.metrics.index_size.labels(name).set(len(store.get(name)))

    async def start(self) -> None:
        from shitu.serve.batching import DynamicBatcher

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.io_pool, self.load)
        except Exception as exc:  # the process cannot serve: report one line and stop
            self.failure = str(exc) if isinstance(exc, ShituError) else f"{type(exc).__name__}: {exc}"
            self.on_failure(self.failure)
            return
        self.batcher = DynamicBatcher(
            self.recognizer.embed_arrays,
            max_batch=self.settings.max_batch,
            max_wait=self.settings.max_wait_ms / 1000.0,
            sizes=getattr(self.recognizer.forward, "buckets", None),  # JAX pads to these; ONNX/OpenVINO do not
            on_batch=self._on_batch,
            on_queue=self.metrics.queue_depth.set,
        )
        self.batcher.start()
        self.ready = True
        self.metrics.ready.set(1)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.model_seconds.observe(seconds)

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()
        if self.store is not None:
            self.store.close()  # folds the journals into the indexes
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=True)

    def backend_choice(self) -> Any:
        """The :class:`~shitu.export.backends.BackendChoice` the model embeds with (JAX fp32 by default)."""
        from shitu.export.backends import BackendChoice

        return self.recognizer.backend or BackendChoice()

    # -- helpers for the routes --------------------------------------------------------------------------
    def require_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, self.failure or "the model is still loading; retry when /readyz answers 200")

    def gallery(self, name: str | None) -> Any:
        assert self.store is not None
        try:
            return self.store.get(name or DEFAULT_GALLERY)
        except NotFound as exc:
            raise ApiError(404, exc.message, "indexKey" if name else None) from None
        except ShituError as exc:
            raise ApiError(422, exc.message, "gallery") from None

    async def run_blocking(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, lambda: function(*args, **kwargs))

    async def image_bytes(self, text: str, field_name: str) -> bytes:
        """The bytes of one image given as Base64, a ``data:`` URL, or an allowed http(s) URL."""
        if text[:8].lower().startswith(("http://", "https://")):
            return await self._fetch(text, field_name)
        payload = text
        if payload.startswith("data:"):
            header, comma, payload = payload.partition(",")
            if not comma or not header.endswith(";base64"):
                raise ApiError(422, "a data: URL must be Base64 ('data:image/...;base64,...')", field_name)
        try:  # one pass in C over the usual, unbroken Base64 text
            return binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            pass
        try:  # line-wrapped Base64 (whitespace between the characters) is accepted too
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "not Base64 image data (file paths are not accepted)", field_name) from None

    async def _fetch(self, url: str, field_name: str) -> bytes:
        import httpx

        host = (urlsplit(url).hostname or "").lower()
        if not self.settings.url_hosts:
            raise ApiError(422, "URL inputs are disabled on this server (send the image as Base64)", field_name)
        if host not in self.settings.url_hosts:
            raise ApiError(422, f"URL host {host!r} is not in the server's allow-list", field_name)
        limit = self.settings.max_body_bytes
        try:
            async with (
                httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise ApiError(422, f"fetching the URL gave HTTP {response.status_code}", field_name)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise ApiError(413, f"the URL's image is larger than {limit} bytes", field_name)
                return bytes(data)
        except httpx.HTTPError as exc:
            raise ApiError(422, f"cannot fetch the URL: {type(exc).__name__}", field_name) from None

    def _decode_one(self, data: bytes, field_name: str) -> Decoded:
        try:
            image, array = self.recognizer.load(data)
        except ShituError as exc:
            raise ApiError(422, exc.message, field_name) from None
        except Exception as exc:  # whatever a decoder raises on hostile bytes is still the client's input
            raise ApiError(422, f"cannot decode image: {type(exc).__name__}", field_name) from None
        return Decoded(hashlib.sha256(data).hexdigest(), int(image.shape[1]), int(image.shape[0]), array)

    async def decode(self, images: list[bytes], field_name: str, *, single: bool = False) -> list[Decoded]:
        """Decode and preprocess every image in the thread pool; the first bad one is a 422 naming it
        (``FIELD.N``, or ``FIELD`` for a ``single`` image)."""
        if len(images) > self.settings.max_images:
            raise ApiError(413, f"at most {self.settings.max_images} images per request", field_name)
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(
                self.decode_pool, self._decode_one, data, field_name if single else f"{field_name}.{position}"
            )
            for position, data in enumerate(images)
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def embed(self, decoded: list[Decoded]) -> np.ndarray:
        return await self.batcher.embed([item.array for item in decoded])  # stacked in the model thread

    def count(self, gallery: Any) -> None:
        self.metrics.index_size.labels(gallery.name).set(len(gallery))


# -- reading bodies ----------------------------------------------------------------------------------------


def _first_error(exc: ValidationError | RequestValidationError) -> tuple[str, str]:
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    return ".".join(location) or "body", str(error.get("msg", "invalid"))


async def read_body(
    request: Request, model: type[BaseModel], service: Service, *, image_field: str = "images"
) -> tuple[Any, list[bytes]]:
    """The validated body of a JSON or multipart request and its images' bytes (multipart: the files of
    ``image_field``; JSON: the field's Base64 strings or allowed URLs)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, model, service, image_field)
    if content_type not in ("application/json", ""):
        raise ApiError(415, f"send application/json or multipart/form-data, not {content_type!r}", "content-type")
    raw = await request.body()
    try:
        body = model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        where, message = _first_error(exc)
        raise ApiError(422, f"{where}: {message}", where) from None
    texts = getattr(body, image_field, None)
    if texts is None:
        return body, []
    images = [await service.image_bytes(text, f"{image_field}.{i}") for i, text in enumerate(texts)]
    return body, images


_LIST_FIELDS = {"labels", "refs", "ids"}


async def _read_multipart(
    request: Request, model: type[BaseModel], service: Service, image_field: str
) -> tuple[Any, list[bytes]]:
    from starlette.datastructures import UploadFile

    limit = service.settings.max_images
    try:
        form = await request.form(max_files=limit + 1, max_fields=4 * limit + 16)
    except Exception as exc:  # starlette's own refusal of a malformed or oversized form
        raise ApiError(400, f"unreadable multipart body: {getattr(exc, 'detail', exc)}", "body") from None
    images: list[bytes] = []
    data: dict[str, Any] = {}
    known = set(model.model_fields)
    for key, value in form.multi_items():
        if key == image_field:
            if not isinstance(value, UploadFile):
                raise ApiError(422, f"{image_field} must be file parts", image_field)
            images.append(await value.read())
            continue
        if key not in known:
            raise ApiError(422, f"{key}: Extra inputs are not permitted", key)
        if isinstance(value, UploadFile):
            raise ApiError(422, f"{key} must be a text field, not a file", key)
        data.setdefault(key, []).append(value)
    if len(images) > limit:
        raise ApiError(413, f"at most {limit} images per request", image_field)
    parsed: dict[str, Any] = {image_field: ["<upload>"] * len(images)}
    for key, values in data.items():
        parsed[key] = values if key in _LIST_FIELDS else _scalar(values[-1])
    try:
        body = model.model_validate(parsed)
    except ValidationError as exc:
        where, message = _first_error(exc)
        raise ApiError(422, f"{where}: {message}", where) from None
    return body, images


def _scalar(text: str) -> Any:
    """A form field's text as the JSON value it stands for (numbers, booleans); text otherwise."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


# -- the app -----------------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body above ``limit`` bytes is refused (413) before it is all read."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse(
                _error_document(scope["path"], 413, f"request body above {self.limit} bytes", "body"), 413
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


class Observe:
    """ASGI middleware: the API key check and the request metrics. A plain ASGI wrapper: Starlette's
    ``@app.middleware("http")`` would run every request through an extra task and memory streams."""

    def __init__(self, app: Any, service: Service, api_key: str | None) -> None:
        self.app = app
        self.service = service
        self.api_key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what an exception that escapes the app becomes

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"] not in OPEN_ROUTES and not self._authorised(scope):
                document = _error_document(scope["path"], 401, "missing or wrong API key", "authorization")
                await JSONResponse(document, 401)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            metrics = self.service.metrics
            metrics.requests.labels(name, scope["method"], str(status)).inc()
            metrics.latency.labels(name).observe(time.perf_counter() - started)

    def _authorised(self, scope: dict[str, Any]) -> bool:
        from starlette.datastructures import Headers

        assert self.api_key is not None
        headers = Headers(scope=scope)
        given = headers.get("x-api-key") or ""
        bearer = headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            given = given or bearer[7:].strip()
        return hmac.compare_digest(given.encode(), self.api_key)


def _error_document(path: str, status: int, message: str, field_name: str | None) -> dict[str, Any]:
    """An error body: PaddleX's envelope on its routes, ``{"error": {...}}`` on the others."""
    if path.startswith(PADDLEX_PREFIX):
        text = f"{field_name}: {message}" if field_name and not message.startswith(field_name) else message
        return {"logId": uuid.uuid4().hex, "errorCode": status, "errorMsg": text}
    return {"error": {"status": status, "message": message, "field": field_name}}


def _paddlex_result(result: dict[str, Any]) -> dict[str, Any]:
    return {"logId": uuid.uuid4().hex, "errorCode": 0, "errorMsg": "Success", "result": result}


def _json_schema_body(model: type[BaseModel], multipart: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema()}}
    if multipart:
        schema = model.model_json_schema()
        properties = dict(schema.get("properties", {}))
        properties["images"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": properties}}
    return {"requestBody": {"required": True, "content": content}}


def create_app(settings: ServeSettings, *, service: Service | None = None) -> FastAPI:
    """The ASGI app. Its model loads in the background once the app starts (see the module docstring)."""
    from shitu import __version__

    service = service or Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        task = asyncio.get_running_loop().create_task(service.start())
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
            await service.stop()

    app = FastAPI(
        title="shitu recognition service",
        version=__version__,
        description="Image recognition by feature extraction: embed, search, and a live gallery.",
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
    )
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_document(request.url.path, exc.status, exc.message, exc.field), exc.status)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse(
            _error_document(request.url.path, 413, f"request body above {settings.max_body_bytes} bytes", "body"), 413
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where, message = _first_error(exc)
        return JSONResponse(_error_document(request.url.path, 422, f"{where}: {message}", where), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_document(request.url.path, exc.status_code, str(exc.detail), None), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        sys.stderr.write(f"error: {request.url.path}: {type(exc).__name__}: {exc}\n")
        return JSONResponse(_error_document(request.url.path, 500, "internal error", None), 500)

    app.add_middleware(Observe, service=service, api_key=settings.api_key)
    _add_probe_routes(app, service)
    _add_paddlex_routes(app, service)
    _add_native_routes(app, service)
    return BodyLimit(app, settings.max_body_bytes)  # type: ignore[return-value]


def _add_probe_routes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, Any]:
        """The process answers (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        """200 once the model is loaded and warm and the galleries are open; 503 before."""
        if service.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "failed" if service.failure else "loading", "error": service.failure}, 503)

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        """Prometheus metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _decision(matches: list[Any]) -> dict[str, Any] | None:
    """The label the matches vote for (largest sum of scores) and its best score; None without matches."""
    from shitu.index.core import Hit, vote

    label, score = vote([Hit(m.id, m.label, "", m.score) for m in matches])  # labels compare as names here
    return None if label is None else {"label": label, "score": score}


def _add_paddlex_routes(app: FastAPI, service: Service) -> None:
    async def pairs(body: Any) -> tuple[list[Any], list[str]]:
        images = [
            await service.image_bytes(p.image, f"imageLabelPairs.{i}.image") for i, p in enumerate(body.imageLabelPairs)
        ]
        decoded = await service.decode(images, "imageLabelPairs")  # a bad one is named imageLabelPairs.N
        return decoded, [pair.label for pair in body.imageLabelPairs]

    async def add_pairs(gallery: Any, decoded: list[Decoded], labels: list[str]) -> None:
        features = await service.embed(decoded)
        await service.run_blocking(gallery.add, features, labels, [d.sha256 for d in decoded])
        service.count(gallery)

    @app.post("/shitu-index-build", tags=["PaddleX"], openapi_extra=_json_schema_body(BuildIndexRequest, False))
    async def build_index(request: Request) -> dict[str, Any]:
        """PaddleX ``buildIndex``: a new gallery of the images and labels; its key and id map."""
        service.require_ready()
        body, _ = await read_body(request, BuildIndexRequest, service, image_field="")
        decoded, labels = await pairs(body)
        assert service.store is not None
        gallery = await service.run_blocking(service.store.create, uuid.uuid4().hex)
        await add_pairs(gallery, decoded, labels)
        return _paddlex_result({"indexKey": gallery.name, "idMap": gallery.id_map()})

    @app.post("/shitu-index-add", tags=["PaddleX"], openapi_extra=_json_schema_body(AddImagesToIndexRequest, False))
    async def add_images(request: Request) -> dict[str, Any]:
        """PaddleX ``addImagesToIndex``: add images with labels; the gallery's whole id map."""
        service.require_ready()
        body, _ = await read_body(request, AddImagesToIndexRequest, service, image_field="")
        gallery = service.gallery(body.indexKey)
        decoded, labels = await pairs(body)
        await add_pairs(gallery, decoded, labels)
        return _paddlex_result({"idMap": gallery.id_map()})

    @app.post(
        "/shitu-index-remove", tags=["PaddleX"], openapi_extra=_json_schema_body(RemoveImagesFromIndexRequest, False)
    )
    async def remove_images(request: Request) -> dict[str, Any]:
        """PaddleX ``removeImagesFromIndex``: remove items by id; the gallery's whole id map."""
        service.require_ready()
        body, _ = await read_body(request, RemoveImagesFromIndexRequest, service, image_field="")
        gallery = service.gallery(body.indexKey)
        await _remove(service, gallery, ids=body.ids)
        return _paddlex_result({"idMap": gallery.id_map()})

    @app.post("/shitu-infer", tags=["PaddleX"], openapi_extra=_json_schema_body(InferRequest, False))
    async def infer(request: Request) -> dict[str, Any]:
        """PaddleX ``infer``. This module has no main-body detector: the whole image is the one detected
        object (bbox = the image, score 1.0); ``detThreshold`` and ``hammingRadius`` are accepted and unused."""
        service.require_ready()
        body, _ = await read_body(request, InferRequest, service, image_field="")
        gallery = service.gallery(body.indexKey)
        decoded = await service.decode([await service.image_bytes(body.image, "image")], "image", single=True)
        features = await service.embed(decoded)
        threshold = body.recThreshold if body.recThreshold is not None else service.settings.default_min_score
        matches = (await service.run_blocking(gallery.search, features, k=body.topk or 5, min_score=threshold))[0]
        image = decoded[0]
        detected = {
            "bbox": [0.0, 0.0, float(image.width), float(image.height)],
            "recResults": [{"label": m.label, "score": m.score} for m in matches],
            "score": 1.0,
        }
        return _paddlex_result({"detectedObjects": [detected], "image": None})


async def _remove(service: Service, gallery: Any, **names: Any) -> list[Any]:
    try:
        removed = await service.run_blocking(gallery.remove, **names)
    except NotFound as exc:
        raise ApiError(404, exc.message, next((k for k, v in names.items() if v), None)) from None
    service.count(gallery)
    return removed


GalleryQuery = Annotated[
    str | None, Query(description="The gallery (PaddleX indexKey); default: the default gallery.", max_length=64)
]


def _add_native_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/embed", tags=["v1"], openapi_extra=_json_schema_body(EmbedRequest, True))
    async def embed(request: Request) -> FastJSONResponse:
        """Unit-length features of one or many images (JSON with Base64 strings, or multipart files)."""
        service.require_ready()
        _, images = await read_body(request, EmbedRequest, service)
        decoded = await service.decode(images, "images")
        features = await service.embed(decoded)
        return FastJSONResponse(
            {
                "model": service.recognizer.name,
                "dim": int(features.shape[1]),
                "features": features,
                "sha256": [d.sha256 for d in decoded],
            }
        )

    @app.post("/v1/search", tags=["v1"], openapi_extra=_json_schema_body(SearchRequest, True))
    async def search(request: Request, gallery: GalleryQuery = None) -> FastJSONResponse:
        """The k best matches of each image (score ≥ min_score, optionally only some labels), and the
        label they vote for (null: nothing matched, the image is unknown)."""
        service.require_ready()
        target = service.gallery(gallery)
        body, images = await read_body(request, SearchRequest, service)
        decoded = await service.decode(images, "images")
        features = await service.embed(decoded)
        min_score = body.min_score if body.min_score is not None else service.settings.default_min_score
        found = await service.run_blocking(target.search, features, k=body.k, min_score=min_score, labels=body.labels)
        return FastJSONResponse(
            {
                "gallery": target.name,
                "results": [{"matches": [m.to_json() for m in row], "decision": _decision(row)} for row in found],
            }
        )

    @app.post("/v1/items", tags=["v1"], openapi_extra=_json_schema_body(AddRequest, True))
    async def add_items(request: Request, gallery: GalleryQuery = None) -> dict[str, Any]:
        """Add images with their labels (and optional refs: the client's own unique ids); returns each
        image's id. An image already stored (same bytes) gives its id back with ``existing: true`` unless
        ``allow_duplicates``. Acknowledged only once written to disk."""
        service.require_ready()
        target = service.gallery(gallery)
        body, images = await read_body(request, AddRequest, service)
        if len(body.labels) != len(images):
            raise ApiError(422, f"{len(images)} images but {len(body.labels)} labels", "labels")
        if body.refs is not None and len(body.refs) != len(images):
            raise ApiError(422, f"{len(images)} images but {len(body.refs)} refs", "refs")
        decoded = await service.decode(images, "images")
        features = await service.embed(decoded)
        try:
            added = await service.run_blocking(
                target.add,
                features,
                body.labels,
                [d.sha256 for d in decoded],
                body.refs,
                allow_duplicates=body.allow_duplicates,
            )
        except Conflict as exc:
            raise ApiError(409, exc.message, "refs") from None
        service.count(target)
        return {
            "gallery": target.name,
            "ids": [a.id for a in added],
            "items": [{"id": a.id, "existing": a.existing} for a in added],
        }

    @app.post("/v1/items/remove", tags=["v1"], openapi_extra=_json_schema_body(RemoveRequest, False))
    async def remove_items(request: Request, gallery: GalleryQuery = None) -> dict[str, Any]:
        """Remove items by id, label or ref (all or nothing: an unknown id or ref is a 404)."""
        service.require_ready()
        target = service.gallery(gallery)
        body, _ = await read_body(request, RemoveRequest, service, image_field="")
        removed = await _remove(service, target, ids=body.ids, labels=body.labels, refs=body.refs)
        return {"gallery": target.name, "removed": [item.id for item in removed], "count": len(target)}

    @app.delete("/v1/items/{item_id}", tags=["v1"])
    async def delete_item(item_id: ItemId, gallery: GalleryQuery = None) -> dict[str, Any]:
        """Remove one item."""
        service.require_ready()
        target = service.gallery(gallery)
        removed = await _remove(service, target, ids=[item_id])
        return {"gallery": target.name, "removed": [item.id for item in removed], "count": len(target)}

    @app.get("/v1/items", tags=["v1"])
    async def list_items(
        gallery: GalleryQuery = None,
        offset: Annotated[int, Query(ge=0, lt=2**63)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        label: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
        ref: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    ) -> dict[str, Any]:
        """A page of items in id order (optionally of one label, or the one item with ``ref``)."""
        service.require_ready()
        target = service.gallery(gallery)
        if ref is not None:
            try:
                items, total = [target.by_ref(ref)], 1
            except NotFound as exc:
                raise ApiError(404, exc.message, "ref") from None
        else:
            items, total = target.page(offset=offset, limit=limit, label=label)
        return {
            "gallery": target.name,
            "items": [i.to_json() for i in items],
            "total": total,
            "offset": offset,
            "limit": limit,
        }

    @app.get("/v1/items/{item_id}", tags=["v1"])
    async def get_item(item_id: ItemId, gallery: GalleryQuery = None) -> dict[str, Any]:
        """One item."""
        service.require_ready()
        try:
            return service.gallery(gallery).get(item_id).to_json()
        except NotFound as exc:
            raise ApiError(404, exc.message, "item_id") from None

    @app.get("/v1/index", tags=["v1"])
    async def index_info(gallery: GalleryQuery = None) -> dict[str, Any]:
        """The gallery: model, size, dtype, counts."""
        service.require_ready()
        target = service.gallery(gallery)
        info = target.info()
        info["model"] = service.recognizer.describe()
        info["backend"] = service.backend_choice().to_json()
        return info

    @app.get("/v1/galleries", tags=["v1"])
    async def galleries() -> dict[str, Any]:
        """The names of the galleries (PaddleX index keys included)."""
        service.require_ready()
        assert service.store is not None
        return {"galleries": service.store.names()}


def run(settings: ServeSettings) -> None:
    """Serve until SIGINT/SIGTERM; a ShituError when the model or the galleries cannot be loaded."""
    import uvicorn

    if settings.host not in LOOPBACK_HOSTS and not settings.api_key:
        raise ShituError(
            f"binding {settings.host} (not loopback) needs an API key",
            hint="set SHITU_API_KEY or pass --api-key-file",
        )
    service = Service(settings)
    app = create_app(settings, service=service)
    loop, http = server_implementations()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    failures: list[str] = []

    def failed(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    service.on_failure = failed
    ready_line = threading.Thread(target=_announce, args=(service, settings), daemon=True)
    ready_line.start()
    server.run()
    if failures:
        raise ShituError(failures[0])


def server_implementations() -> tuple[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools (C; the serve extra installs them) where
    they import, else asyncio and h11 (pure Python, slower per request)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None and sys.platform != "win32" else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return loop, http


def _announce(service: Service, settings: ServeSettings) -> None:
    """One stderr line once the service is ready (what a person or a script waits for)."""
    while not service.ready and service.failure is None:
        time.sleep(0.05)
    if service.ready:
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        loop, http = server_implementations()
        sys.stderr.write(
            f"shitu serve: ready on http://{host}:{settings.port} (docs at /docs; model on "
            f"{service.backend_choice().describe()}; {loop} + {http})\n"
        )
        sys.stderr.flush()
